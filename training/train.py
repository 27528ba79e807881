"""The chapter's recipe (Adadelta lr 0.5, batch 32, 2 epochs, seed 0) on the training set less a held-out split,
fed from tensors prepared once."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from training.checkpoint import Checkpoint, save_checkpoint
from training.data import Normalization, dataset_sha256, load_mnist, resolve_data_dir, to_model_input
from training.feedback import load_feedback, store_name, with_feedback
from training.model import ConvNet, ModelConfig

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "convnet.pt"
METRICS_NAME = "metrics.json"
CURVES_NAME = "training_curves.png"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2
    batch_size: int = 32
    test_batch_size: int = 500
    lr: float = 0.5
    seed: int = 0
    data_dir: str | None = None  # None: $MNIST_DATA_DIR, then ./data
    out: str = "artifacts"
    device: str = "auto"
    limit: int | None = None  # train on the first N training images not held out; the test set stays whole
    # The last N training images are never trained on: the export fits its temperature on them, so that the
    # test set is never used to fit anything. 0 trains on all 60,000, as the book does (and fits no temperature).
    holdout: int = 5000
    download: bool = True
    # A feedback store (a SQLite path or postgresql://...): its digit-labelled images join the training set, each
    # seen feedback_weight times per epoch (training/feedback.py)
    feedback: str | None = None
    feedback_weight: float = 10.0
    normalization: Normalization = field(default_factory=Normalization)
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self):
        for name in ("epochs", "batch_size", "test_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1, got {self.limit}")
        if not 0 < self.feedback_weight < float("inf"):
            raise ValueError(f"feedback_weight must be positive and finite, got {self.feedback_weight}")
        if self.holdout < 0:
            raise ValueError(f"holdout must be at least 0, got {self.holdout}")
        if self.device not in ("auto", "cpu", "cuda", "mps"):
            raise ValueError(f"device must be auto, cpu, cuda or mps, got {self.device!r}")


@dataclass(frozen=True)
class TrainResult:
    checkpoint_path: Path
    metrics: dict


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but torch sees no CUDA device")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device mps was asked for, but torch sees no MPS device")
    return torch.device(name)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> tuple[float, float]:
    """Mean NLL loss and accuracy (a fraction) of ``model`` on normalized inputs, as the book's test()."""
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        out = model(x[i : i + batch_size])
        target = y[i : i + batch_size]
        loss += F.nll_loss(out, target, reduction="sum").item()
        correct += (out.argmax(dim=1) == target).sum().item()
    model.train(was_training)
    return loss / len(x), correct / len(x)


def held_out(train_images: int, holdout: int) -> dict:
    """The held-out slice of the training set, as the checkpoint records it: its last ``holdout`` images."""
    if holdout >= train_images:
        raise ValueError(f"holdout {holdout} leaves none of the {train_images} training images to train on")
    return {"split": "train", "start": train_images - holdout, "stop": train_images}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _train_epoch(model, optimizer, x, y, cfg: TrainConfig, generator: torch.Generator, epoch: int) -> float:
    model.train()
    order = torch.randperm(len(x), generator=generator).to(x.device)
    steps = range(0, len(x), cfg.batch_size)
    bar = tqdm(steps, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False, disable=None)
    running, total = 0.0, 0.0
    for step, start in enumerate(bar):
        idx = order[start : start + cfg.batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = F.nll_loss(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        if step % 50 == 0:  # .item() syncs with the device; do it rarely
            running = loss.item()
            bar.set_postfix(loss=f"{running:.4f}")
        total += loss.detach() * len(idx)
    return float(total) / len(x)


def train(cfg: TrainConfig) -> TrainResult:
    """Train, evaluate after each epoch, and write the checkpoint, metrics.json and the curves PNG."""
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)

    feedback = load_feedback(cfg.feedback, cfg.feedback_weight) if cfg.feedback else None  # its errors first
    root = resolve_data_dir(cfg.data_dir)
    train_images, train_labels = load_mnist(root, train=True, download=cfg.download)
    test_images, test_labels = load_mnist(root, train=False, download=False)
    holdout = held_out(len(train_images), cfg.holdout)
    train_images, train_labels = train_images[: holdout["start"]], train_labels[: holdout["start"]]
    if cfg.limit is not None:
        train_images, train_labels = train_images[: cfg.limit], train_labels[: cfg.limit]
    if feedback is not None:
        train_images, train_labels = with_feedback(train_images, train_labels, feedback, generator)
    x_train = to_model_input(train_images, cfg.normalization).to(device)
    y_train = train_labels.to(device)
    x_test = to_model_input(test_images, cfg.normalization).to(device)
    y_test = test_labels.to(device)
    log.info(
        "training on %d images (holding out %d), testing on %d, device %s",
        len(x_train),
        holdout["stop"] - holdout["start"],
        len(x_test),
        device,
    )

    # channels_last lets oneDNN run the convolutions and the max-pool vectorized over channels: about a
    # fifth less time a step on CPU than the default layout, for the same function.
    model = ConvNet(cfg.model).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=cfg.lr, foreach=True)  # one kernel per op, not per tensor
    history = []
    started = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        train_loss = _train_epoch(model, optimizer, x_train, y_train, cfg, generator, epoch)
        seconds = time.perf_counter() - t0
        test_loss, test_acc = evaluate(model, x_test, y_test, cfg.test_batch_size)
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "test_loss": test_loss,
                "test_accuracy": test_acc,
                "epoch_seconds": seconds,
            }
        )
        log.info(
            "epoch %d/%d: train loss %.4f, test loss %.4f, test accuracy %.2f%% (%.1fs)",
            epoch,
            cfg.epochs,
            train_loss,
            test_loss,
            100 * test_acc,
            seconds,
        )
    train_seconds = time.perf_counter() - started

    metrics = {
        "test_accuracy": history[-1]["test_accuracy"],
        "test_loss": history[-1]["test_loss"],
        "epochs": cfg.epochs,
        "train_samples": len(x_train),
        "test_samples": len(x_test),
        "train_seconds": train_seconds,
        "device": str(device),
        "history": history,
    }
    provenance = {
        "torch": str(torch.__version__),  # a TorchVersion object would not load with weights_only
        "data_sha256": dataset_sha256(root),
        "holdout": holdout,  # training images [start, stop) the model never saw, for the export's calibration
        "feedback": feedback.provenance if feedback is not None else None,
        "git_commit": _git_commit(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    train_config = {k: v for k, v in asdict(cfg).items() if k not in ("normalization", "model")}
    train_config["feedback"] = store_name(cfg.feedback) if cfg.feedback else None  # never a password
    ckpt = Checkpoint(
        model_state={k: v.detach().cpu() for k, v in model.state_dict().items()},
        model_config=cfg.model,
        normalization=cfg.normalization,
        train_config=train_config,
        metrics=metrics,
        provenance=provenance,
    )
    out = Path(cfg.out)
    path = save_checkpoint(ckpt, out / CHECKPOINT_NAME)
    (out / METRICS_NAME).write_text(json.dumps({**metrics, "provenance": provenance}, indent=2) + "\n")
    plot_curves(history, out / CURVES_NAME)
    return TrainResult(checkpoint_path=path, metrics=metrics)


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["test_loss"] for h in history], "o-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="NLL loss", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * h["test_accuracy"] for h in history], "o-", color="C2")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
