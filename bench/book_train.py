"""The book's own training loop (Mastering PyTorch, chapter 1), kept as the baseline for speed comparisons.

It decodes every image through PIL and torchvision transforms, one sample at a time, inside a DataLoader,
exactly as the chapter does, and trains the chapter's network as the chapter writes it (ReLU before the
max-pool, the default memory layout). One change: the second dropout is element-wise ``nn.Dropout``, the
behaviour the book had; current PyTorch reads the book's 2-D ``Dropout2d`` input as one channel per sample.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import datasets, transforms

from training.data import Normalization


class BookConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.cn1 = nn.Conv2d(1, 16, 3, 1)
        self.cn2 = nn.Conv2d(16, 32, 3, 1)
        self.dp1 = nn.Dropout2d(0.10)
        self.dp2 = nn.Dropout(0.25)
        self.fc1 = nn.Linear(4608, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = self.cn1(x)
        x = F.relu(x)
        x = self.cn2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dp1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dp2(x)
        x = self.fc2(x)
        op = F.log_softmax(x, dim=1)
        return op


def book_dataloaders(root: str, norm: Normalization, limit: int | None = None, batch_size: int = 32):
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((norm.mean,), (norm.std,))])
    train_set = datasets.MNIST(root, train=True, download=False, transform=tf)
    test_set = datasets.MNIST(root, train=False, download=False, transform=tf)
    if limit is not None:
        train_set = torch.utils.data.Subset(train_set, range(limit))
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=500, shuffle=False)
    return train_loader, test_loader


def book_train_epoch(model, device, train_dataloader, optim) -> None:
    model.train()
    for X, y in train_dataloader:
        X, y = X.to(device), y.to(device)
        optim.zero_grad()
        pred_prob = model(X)
        loss = F.nll_loss(pred_prob, y)
        loss.backward()
        optim.step()


def book_test(model, device, test_dataloader) -> tuple[float, float]:
    model.eval()
    loss, success = 0.0, 0
    with torch.no_grad():
        for X, y in test_dataloader:
            X, y = X.to(device), y.to(device)
            pred_prob = model(X)
            loss += F.nll_loss(pred_prob, y, reduction="sum").item()
            pred = pred_prob.argmax(dim=1, keepdim=True)
            success += pred.eq(y.view_as(pred)).sum().item()
    n = len(test_dataloader.dataset)
    return loss / n, success / n


def run_book_training(root: str, epochs: int = 2, seed: int = 0, limit: int | None = None, device: str = "cpu") -> dict:
    """The chapter's script as a function: per-epoch seconds and final test accuracy."""
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    dev = torch.device(device)
    train_loader, test_loader = book_dataloaders(root, Normalization(), limit)
    model = BookConvNet().to(dev)
    optim = torch.optim.Adadelta(model.parameters(), lr=0.5)
    epoch_seconds = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        book_train_epoch(model, dev, train_loader, optim)
        epoch_seconds.append(time.perf_counter() - t0)
        test_loss, test_acc = book_test(model, dev, test_loader)
    return {
        "epoch_seconds": epoch_seconds,
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "train_samples": len(train_loader.dataset),
    }
