"""``build``: checkpoint -> TorchScript, ONNX, torch.export (+ INT8 ONNX) -> verified -> manifest -> model store.

``verify_dir``: re-check a built folder against its manifest (hashes first, then numbers).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from export import formats
from export.detector import DetectorConfig
from export.signing import SIGNATURE, check_private_key, sign_folder
from export.verify import verify
from training.checkpoint import Checkpoint, build_model, file_sha256, load_checkpoint, save_checkpoint
from training.data import dataset_sha256, load_mnist, resolve_data_dir, to_model_input

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SOURCE_FILE = "checkpoint.pt"  # the eager reference, re-saved in the project's format, so a folder verifies alone
MANIFEST_VERSION = 2  # 2: the not-a-digit detector and the golden set


class ExportError(Exception):
    """A problem with the export folder itself: no manifest, a missing or changed file."""


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: str
    out: str = "artifacts/export"
    opset: int = formats.DEFAULT_OPSET
    register: bool = True
    int8: bool = True
    data_dir: str | None = None  # MNIST for verification and INT8 calibration; None: $MNIST_DATA_DIR, then ./data
    sign_key: str | None = None  # a PEM EC private key: the folder is signed (export/signing.py) before registration
    detector: DetectorConfig = field(default_factory=DetectorConfig)

    def __post_init__(self):
        if not 18 <= self.opset <= 23:
            raise ValueError(
                f"opset must be between 18 and 23 (the torch.export-based exporter's range), got {self.opset}"
            )


@dataclass(frozen=True)
class BuildResult:
    out: Path
    manifest: dict
    tag: str | None


def _describe(path: Path) -> dict:
    return {"file": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size}


def _versions() -> dict:
    import onnx
    import onnxruntime

    return {"torch": str(torch.__version__), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _write_json_atomically(data: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def export_all(model: torch.nn.Module, out: Path, opset: int) -> dict[str, Path]:
    paths = {
        "torchscript": formats.export_torchscript(model, out / formats.FILES["torchscript"]),
        "onnx": formats.export_onnx(model, out / formats.FILES["onnx"], opset),
    }
    try:
        paths["pt2"] = formats.export_pt2(model, out / formats.FILES["pt2"])
    except Exception as exc:  # noqa: BLE001 - torch.export is optional here; the other formats still ship
        log.warning("torch.export failed, skipping convnet.pt2: %s", str(exc).splitlines()[0])
    return paths


def _calibration(model, ckpt: Checkpoint, root: Path, x_test: torch.Tensor, test_labels, out: Path) -> dict:
    """The manifest's calibration section (export/calibration.py) from the eager model: the test set's ECE and
    diagram, and a temperature fitted on the training images the checkpoint says the model never saw."""
    from export.calibration import calibrate

    def log_probs(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([model(x[i : i + 1000]) for i in range(0, len(x), 1000)]).numpy()

    holdout, heldout = ckpt.provenance.get("holdout"), (None, None)
    missing = "the checkpoint records no held-out split (its model may have seen every training image)"
    if holdout and holdout["stop"] == holdout["start"]:
        missing = "the checkpoint was trained with no held-out split (holdout 0)"
    elif holdout and ckpt.provenance.get("data_sha256") != dataset_sha256(root):
        missing = f"the MNIST files in {root} differ from those the checkpoint was trained on (data sha256)"
    elif holdout:
        images, labels = load_mnist(root, train=True)
        part = slice(holdout["start"], holdout["stop"])
        heldout = (log_probs(to_model_input(images[part], ckpt.normalization)), labels[part].numpy())
    section = calibrate(log_probs(x_test), test_labels.numpy(), *heldout, out, missing)
    log.info("calibration: test ECE %.2f%% (%d bins); %s", 100 * section["ece"], section["bins"], section["reason"])
    return section


def _detector_and_golden(
    model, ckpt: Checkpoint, root: Path, test_images, test_labels, temperature: float | None, cfg: ExportConfig
) -> dict:
    """The not-a-digit detector (export/detector.py) and the golden set (export/golden.py): their manifest
    sections, each with its file's hash; and the drift reference made with both (export/drift.py)."""
    from export import detector as detectors
    from export import drift, golden

    out, norm = Path(cfg.out), ckpt.normalization
    train_images, _ = load_mnist(root, train=True)
    test_u8 = test_images.numpy()
    detector, section = detectors.build_detector(
        train_images.numpy(), test_u8, norm.mean, norm.std, out, cfg.opset, cfg.detector
    )
    summary = golden.record(test_u8, test_labels.numpy(), model, detector, norm, temperature, section["threshold"], out)
    section.update(_accuracy_accepted(model, detector, to_model_input(test_images, norm), test_labels, section))
    return {
        "detector": {**_describe(out / detectors.FILE), **section},
        "golden": {**_describe(out / golden.FILE), **summary},
        "drift": drift.record(test_u8, model, detector, norm, temperature, section["threshold"]),
    }


def _accuracy_accepted(model, detector, x: torch.Tensor, labels: torch.Tensor, section: dict) -> dict:
    """The classifier's test accuracy on every digit and on the digits the detector accepts (the target: no lower)."""
    with torch.no_grad():
        right = torch.cat([model(b).argmax(1) for b in x.split(1000)]) == labels
        accepted = torch.cat([detector(b) for b in x.split(1000)]) >= section["threshold"]
    return {
        "test_accuracy": float(right.float().mean()),
        "test_accuracy_accepted": float(right[accepted].float().mean()) if accepted.any() else None,
    }


def build(cfg: ExportConfig) -> BuildResult:
    if cfg.sign_key:
        check_private_key(cfg.sign_key)  # a bad key fails now, not after the export
    ckpt = load_checkpoint(cfg.checkpoint)
    model = build_model(ckpt)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a stale manifest must never vouch for new files
    (out / SIGNATURE).unlink(missing_ok=True)  # nor a stale signature

    root = resolve_data_dir(cfg.data_dir)
    test_images, test_labels = load_mnist(root, train=False)
    x_test = to_model_input(test_images, ckpt.normalization)

    source = save_checkpoint(ckpt, out / SOURCE_FILE)
    log.info("exporting %s to %s", cfg.checkpoint, out)
    paths = export_all(model, out, cfg.opset)
    int8_speed = None
    if cfg.int8:
        from export.quantize import CALIBRATION_IMAGES, quantize_int8, speedup

        train_images, _ = load_mnist(root, train=True)
        calibration = to_model_input(train_images[:CALIBRATION_IMAGES], ckpt.normalization).numpy()
        paths["onnx-int8"] = quantize_int8(paths["onnx"], out / formats.FILES["onnx-int8"], calibration)
        int8_speed = speedup(paths["onnx"], paths["onnx-int8"], x_test[:2048].numpy())

    runners = {fmt: formats.load_runner(fmt, path) for fmt, path in paths.items()}
    report = verify(model, runners, x_test, test_labels)  # raises VerificationError: then no manifest is written
    calibration = _calibration(model, ckpt, root, x_test, test_labels, out)  # raw log-probs verified, above
    checks = _detector_and_golden(model, ckpt, root, test_images, test_labels, calibration["temperature"], cfg)
    if int8_speed:
        report["formats"]["onnx-int8"]["speed"] = int8_speed
        log.info(
            "onnx-int8: %.2fx the float model's images/s in ONNX Runtime (batch %d)",
            int8_speed["speedup"],
            int8_speed["batch"],
        )

    cfg_m = ckpt.model_config  # the shapes come from the checkpoint, not re-typed here
    side = cfg_m.image_size
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "model": "mnist-convnet",
        "artifacts": {fmt: _describe(path) for fmt, path in paths.items()},
        "input": {"name": formats.INPUT_NAME, "shape": ["batch", cfg_m.in_channels, side, side], "dtype": "float32"},
        "output": {
            "name": formats.OUTPUT_NAME,
            "shape": ["batch", cfg_m.num_classes],
            "dtype": "float32",
            "meaning": "log-probabilities of the digits 0-9",
        },
        "normalization": ckpt.normalization.to_dict(),
        "model_config": ckpt.model_config.to_dict(),
        "opset": cfg.opset,
        "versions": _versions(),
        "source": {
            "path": str(cfg.checkpoint),
            "kind": ckpt.provenance.get("source", "checkpoint"),
            "sha256": ckpt.provenance["checkpoint_sha256"],
            "reference": _describe(source),
            "metrics": {k: v for k, v in ckpt.metrics.items() if k != "history"},
            "provenance": {k: v for k, v in ckpt.provenance.items() if k != "checkpoint_sha256"},
        },
        # the labelled feedback rows the model was trained on (training/feedback.py): store, rows, id range, hash
        "feedback": ckpt.provenance.get("feedback"),
        "verification": report,
        "calibration": calibration,  # the served probabilities are softmax(log_probs / temperature)
        **checks,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    _write_json_atomically(manifest, out / MANIFEST)
    if cfg.sign_key:  # the last file written: it covers all the others, the manifest included
        sign_folder(out, cfg.sign_key)
    tag = None
    if cfg.register:
        from export.store import register

        tag = register(out, manifest)
    return BuildResult(out=out, manifest=manifest, tag=tag)


def read_manifest(export_dir: Path) -> dict:
    path = Path(export_dir) / MANIFEST
    if not path.is_file():
        raise ExportError(f"no {MANIFEST} in {export_dir}: run `python -m export build` first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path} is not valid JSON ({exc})") from None
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise ExportError(
            f"{path} has manifest_version {manifest.get('manifest_version')!r}, expected {MANIFEST_VERSION}"
        )
    return manifest


def check_files(export_dir: Path, manifest: dict) -> None:
    """Every file the manifest lists (the artifacts, the reference checkpoint, the detector, the golden set) is
    present with the manifest's sha256."""
    entries = [
        *manifest["artifacts"].values(),
        manifest["source"]["reference"],
        manifest["detector"],
        manifest["golden"],
    ]
    problems = []
    for entry in entries:
        path = Path(export_dir) / entry["file"]
        if not path.is_file():
            problems.append(f"{entry['file']} is missing")
        elif (digest := file_sha256(path)) != entry["sha256"]:
            problems.append(
                f"{entry['file']} has changed (sha256 {digest[:12]}..., manifest {entry['sha256'][:12]}...)"
            )
    if problems:
        raise ExportError(f"{export_dir}: " + "; ".join(problems))


def verify_dir(export_dir: str | os.PathLike, data_dir: str | None = None) -> dict:
    """Hashes against the manifest, then the numerical check of every format against the reference model."""
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    check_files(export_dir, manifest)
    ckpt: Checkpoint = load_checkpoint(export_dir / manifest["source"]["reference"]["file"])
    model = build_model(ckpt)
    images, labels = load_mnist(resolve_data_dir(data_dir), train=False)
    runners = {fmt: formats.load_runner(fmt, export_dir / a["file"]) for fmt, a in manifest["artifacts"].items()}
    return verify(model, runners, to_model_input(images, ckpt.normalization), labels)
