"""The one checkpoint format: weights plus everything needed to rebuild, normalize and trust them.

A checkpoint is a plain dict that ``torch.load(path, weights_only=True)`` opens::

    format        "mnist-convnet/1"
    model_state   the state_dict
    model_config  ModelConfig as a dict
    normalization {"mean": ..., "std": ...}
    train_config  the TrainConfig it came from (empty for imported weights)
    metrics       test accuracy and loss, history
    provenance    torch version, data sha256, the held-out training images, git commit, creation time

A bare ``state_dict`` (the book's ``convnet.pth``) is accepted too, with the chapter's defaults.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from training.data import Normalization
from training.model import ConvNet, ModelConfig

FORMAT = "mnist-convnet/1"


class CheckpointError(Exception):
    """The file is not a usable checkpoint; the message says why."""


@dataclass(frozen=True)
class Checkpoint:
    model_state: dict[str, torch.Tensor]
    model_config: ModelConfig = field(default_factory=ModelConfig)
    normalization: Normalization = field(default_factory=Normalization)
    train_config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "model_state": self.model_state,
            "model_config": self.model_config.to_dict(),
            "normalization": self.normalization.to_dict(),
            "train_config": self.train_config,
            "metrics": self.metrics,
            "provenance": self.provenance,
        }


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(ckpt.to_dict(), tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint where a later stage would trust it
    return path


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a project checkpoint or a bare state_dict, safely (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and weights_only errors all mean "not a checkpoint"
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not a checkpoint dict or a state_dict")
    if "model_state" in raw:
        if raw.get("format") != FORMAT:
            raise CheckpointError(f"{path} has format {raw.get('format')!r}; this version reads {FORMAT!r}")
        try:
            model_config = ModelConfig(**raw["model_config"])
            normalization = Normalization(**raw["normalization"])
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{path} has a malformed model_config or normalization ({exc})") from None
        return Checkpoint(
            model_state=raw["model_state"],
            model_config=model_config,
            normalization=normalization,
            train_config=raw.get("train_config", {}),
            metrics=raw.get("metrics", {}),
            provenance={**raw.get("provenance", {}), "checkpoint_sha256": file_sha256(path)},
        )
    if raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        return Checkpoint(
            model_state=raw,
            provenance={"source": "state_dict", "checkpoint_sha256": file_sha256(path)},
        )
    raise CheckpointError(f"{path} is a dict without 'model_state' and is not a state_dict of tensors")


def build_model(ckpt: Checkpoint) -> ConvNet:
    """The ConvNet the checkpoint describes, its weights loaded strictly, in eval mode."""
    model = ConvNet(ckpt.model_config)
    expected = model.state_dict()
    problems = []
    for name, tensor in expected.items():
        if name not in ckpt.model_state:
            problems.append(f"missing {name}")
        elif ckpt.model_state[name].shape != tensor.shape:
            got = tuple(ckpt.model_state[name].shape)
            problems.append(f"{name} has shape {got}, the model expects {tuple(tensor.shape)}")
    problems += [f"unexpected {name}" for name in ckpt.model_state if name not in expected]
    if problems:
        raise CheckpointError("weights do not fit the ConvNet: " + "; ".join(problems))
    model.load_state_dict(ckpt.model_state, strict=True)
    return model.eval()
