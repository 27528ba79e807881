"""Hands verified artifacts to the service through BentoML's model store (``$BENTOML_HOME`` respected)."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

from training.checkpoint import file_sha256

log = logging.getLogger(__name__)

MODEL_NAME = "mnist-convnet"
BENTOML_INFO = "model.yaml"  # BentoML writes its own into each store entry: an export's file of this name is not copied


def _files(export_dir: Path) -> list[Path]:
    return sorted(p for p in Path(export_dir).iterdir() if p.is_file() and p.name != BENTOML_INFO)


def _files_sha256(files: list[Path]) -> str:
    """One digest over every file's name and content: the same export folder, the same digest."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def register(export_dir: Path, manifest: dict, name: str = MODEL_NAME) -> str:
    """Copy the export folder's files (artifacts, manifest, signature, ...) into a new model-store entry; return
    its tag."""
    import bentoml

    verification = manifest["verification"]
    labels = {
        "source": manifest["source"]["kind"],
        "test_accuracy": f"{verification['eager_test_accuracy']:.4f}",
        "formats": "-".join(sorted(manifest["artifacts"])),
    }
    # BentoML metadata must be flat-ish JSON; the whole manifest travels as a file, its headline numbers here.
    metadata = {
        "opset": manifest["opset"],
        "normalization_mean": manifest["normalization"]["mean"],
        "normalization_std": manifest["normalization"]["std"],
        "eager_test_accuracy": verification["eager_test_accuracy"],
        "source_sha256": manifest["source"]["sha256"],
        **{f"{fmt}_sha256": a["sha256"] for fmt, a in manifest["artifacts"].items()},
    }
    files = _files(export_dir)
    metadata["files_sha256"] = _files_sha256(files)
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        for path in files:  # all of them: a signature covers the whole folder, so the entry must hold it whole
            shutil.copy2(path, model.path_of(path.name))
    log.info("registered %s in the BentoML model store", model.tag)
    return str(model.tag)


def ensure_registered(export_dir: Path, manifest: dict, name: str = MODEL_NAME) -> tuple[str, bool]:
    """Register the export unless ``name:latest`` already holds these exact files (its signature included).
    Returns (tag, registered)."""
    import bentoml

    try:
        latest = bentoml.models.get(f"{name}:latest")
    except bentoml.exceptions.NotFound:
        latest = None
    if latest is not None and latest.info.metadata.get("files_sha256") == _files_sha256(_files(Path(export_dir))):
        return str(latest.tag), False
    return register(export_dir, manifest, name), True
