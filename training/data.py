"""MNIST as tensors prepared once: the chapter's ToTensor + Normalize, applied to the whole set at load time."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DATA_ENV = "MNIST_DATA_DIR"
DEFAULT_DATA_DIR = "data"
RAW_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataError(Exception):
    """The data set is missing, partial or corrupt; the message says which folder and how to fix it."""


@dataclass(frozen=True)
class Normalization:
    """The chapter's constants: mean and std of the MNIST training pixels scaled to 0..1."""

    mean: float = 0.1302
    std: float = 0.3069

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """An explicit folder wins, then ``$MNIST_DATA_DIR``, then ``./data``."""
    return Path(data_dir or os.environ.get(DATA_ENV) or DEFAULT_DATA_DIR)


def raw_folder(root: Path) -> Path:
    return Path(root) / "MNIST" / "raw"


def _fix_hint(root: Path) -> str:
    return (
        f"put the four uncompressed MNIST IDX files in {raw_folder(root)} "
        f"(torchvision's layout), or pass --data-dir / set {DATA_ENV} to a folder that has them"
    )


def _missing_files(root: Path) -> list[str]:
    raw = raw_folder(root)
    return [name for names in RAW_FILES.values() for name in names if not (raw / name).is_file()]


def _download(root: Path) -> None:
    """torchvision's own download; its chatter goes to the debug log, a failure becomes one DataError."""
    from torchvision.datasets import MNIST

    log.info("MNIST not found in %s: downloading it with torchvision", raw_folder(root))
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            MNIST(str(root), train=True, download=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means "no data", said in one line
        log.debug("download output:\n%s", chatter.getvalue())
        missing = ", ".join(_missing_files(root)) or "files"
        raise DataError(
            f"MNIST data missing in {raw_folder(root)} ({missing}) and the download failed "
            f"({type(exc).__name__}); {_fix_hint(root)}"
        ) from None


def _read_idx(reader, path: Path, root: Path) -> torch.Tensor:
    try:
        return reader(str(path))
    except Exception as exc:  # noqa: BLE001 - torchvision raises assorted errors on a bad header or length
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise DataError(f"MNIST file {path} is corrupt or truncated ({reason}); {_fix_hint(root)}") from None


def load_mnist(root: str | os.PathLike, train: bool, download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images uint8 [N, 28, 28], labels int64 [N])`` for the training or the test split."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    root = Path(root)
    missing = _missing_files(root)
    if missing and download:
        _download(root)
        missing = _missing_files(root)
    if missing:
        raise DataError(f"MNIST data missing in {raw_folder(root)}: {', '.join(missing)}; {_fix_hint(root)}")

    image_file, label_file = (raw_folder(root) / name for name in RAW_FILES[train])
    images = _read_idx(read_image_file, image_file, root)
    labels = _read_idx(read_label_file, label_file, root)
    if images.dim() != 3 or images.shape[1:] != (28, 28) or images.dtype != torch.uint8:
        raise DataError(f"MNIST file {image_file} holds {tuple(images.shape)} {images.dtype}, not N x 28 x 28 bytes")
    if labels.shape != images.shape[:1]:
        raise DataError(
            f"MNIST files disagree: {len(images)} images in {image_file.name}, "
            f"{len(labels)} labels in {label_file.name}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"MNIST file {label_file} has labels outside 0..9")
    return images, labels.long()


def to_model_input(images: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """uint8 [N, 28, 28] -> normalized float [N, 1, 28, 28], bit for bit what ToTensor then Normalize give."""
    x = images.unsqueeze(1).to(torch.float32).div(255)
    return x.sub_(norm.mean).div_(norm.std)


def dataset_sha256(root: str | os.PathLike) -> str:
    """One digest over the four raw files, recorded as the checkpoint's data provenance."""
    digest = hashlib.sha256()
    for name in sorted(n for names in RAW_FILES.values() for n in names):
        with open(raw_folder(Path(root)) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
