"""The chapter's ConvNet, the one model definition every stage and test uses."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network; stored in every checkpoint."""

    in_channels: int = 1
    image_size: int = 28
    conv1_channels: int = 16
    conv2_channels: int = 32
    hidden: int = 64
    num_classes: int = 10
    dropout_conv: float = 0.10
    dropout_fc: float = 0.25

    @property
    def flat_features(self) -> int:
        # two valid 3x3 convolutions (-4 pixels) then a 2x2 max-pool: 28 -> 24 -> 12, so 32 * 12 * 12 = 4608
        side = (self.image_size - 4) // 2
        return self.conv2_channels * side * side

    def to_dict(self) -> dict:
        return asdict(self)


class ConvNet(nn.Module):
    """conv 1->16->32, max-pool, dropout, fc 4608->64->10, log-softmax (Mastering PyTorch, chapter 1).

    The layer names match the book's, so its published ``state_dict`` loads with ``strict=True``.
    """

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config or ModelConfig()
        c = self.config
        self.cn1 = nn.Conv2d(c.in_channels, c.conv1_channels, 3, 1)
        self.cn2 = nn.Conv2d(c.conv1_channels, c.conv2_channels, 3, 1)
        self.dp1 = nn.Dropout2d(c.dropout_conv)
        # The book uses Dropout2d here too, on the 2-D output of fc1. PyTorch of the book's day treated a
        # 2-D input element-wise; current PyTorch warns that this is deprecated and instead reads the batch
        # axis as channels, dropping whole samples. Plain Dropout is the book's intended element-wise
        # behaviour, has no parameters (so checkpoints are unaffected) and raises no warning.
        self.dp2 = nn.Dropout(c.dropout_fc)
        self.fc1 = nn.Linear(c.flat_features, c.hidden)
        self.fc2 = nn.Linear(c.hidden, c.num_classes)

    @property
    def example_input_array(self) -> torch.Tensor:
        """A normalized batch of two images: the shape exporters trace with (a batch of 1 would fix it)."""
        c = self.config
        return torch.zeros(2, c.in_channels, c.image_size, c.image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.cn1(x))
        # The book applies ReLU before the max-pool. ReLU is monotonic, so max-pooling first gives the same
        # values bit for bit (and the same gradients), on a quarter of the elements: a cheaper training step.
        x = F.relu(F.max_pool2d(self.cn2(x), 2))
        x = self.dp1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dp2(x)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
