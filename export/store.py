"""Hands verified artifacts to the service through BentoML's model store (``$BENTOML_HOME`` respected)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

MODEL_NAME = "mnist-convnet"


def register(export_dir: Path, manifest: dict, name: str = MODEL_NAME) -> str:
    """Copy the export (artifacts + manifest) into a new model-store entry; return its tag."""
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
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        for entry in [*manifest["artifacts"].values(), {"file": "manifest.json"}]:
            shutil.copy2(export_dir / entry["file"], model.path_of(entry["file"]))
    log.info("registered %s in the BentoML model store", model.tag)
    return str(model.tag)


def ensure_registered(export_dir: Path, manifest: dict, name: str = MODEL_NAME) -> tuple[str, bool]:
    """Register the export unless ``name:latest`` already holds these exact files. Returns (tag, registered)."""
    import bentoml

    try:
        latest = bentoml.models.get(f"{name}:latest")
    except bentoml.exceptions.NotFound:
        latest = None
    if latest is not None and all(
        latest.info.metadata.get(f"{fmt}_sha256") == a["sha256"] for fmt, a in manifest["artifacts"].items()
    ):
        return str(latest.tag), False
    return register(export_dir, manifest, name), True
