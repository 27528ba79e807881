"""The exported model's files as the service reads them: the manifest, checked field by field, and the model
file, checked against the sha256 the export recorded before a single byte of it is used.

Every problem is a ModelFileError whose message names the file and the fix (re-export) on one line: the
service stops start-up with it, before any worker starts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from pathlib import Path

from service.model.calibration import TEMPERATURE_BOUNDS
from service.observe.drift import METHOD, QUANTITIES

REEXPORT = "re-export the model (`make export`, or `python -m export build --checkpoint artifacts/convnet.pt`)"
MAX_MANIFEST_BYTES = 1024 * 1024  # the export writes a few KB
MAX_MODEL_BYTES = 512 * 1024 * 1024
DTYPES = ("float32",)


class ModelFileError(Exception):
    """The model's files cannot be served as exported; the message names the file and the fix, on one line."""


def read_manifest(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / "manifest.json"
    data = _read_regular_file(path, MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, an integer past the limit
        raise ModelFileError(f"{path} cannot be read ({str(exc)[:120] or type(exc).__name__}); {REEXPORT}") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise ModelFileError(f"{path} is not a valid export manifest ({problem}); {REEXPORT}")
    return manifest


def read_verified(model_dir: str | os.PathLike, manifest: dict, fmt: str) -> tuple[str, bytes, str]:
    """The bytes of the ``fmt`` file, checked against the manifest: (file name, bytes, sha256). The model is
    then built from these very bytes, so what is served is what was checked."""
    artifact = manifest["artifacts"].get(fmt)
    if not artifact:
        raise ModelFileError(f"the manifest in {model_dir} lists no {fmt} file; {REEXPORT}")
    return read_entry(model_dir, artifact)


def read_entry(model_dir: str | os.PathLike, entry: dict) -> tuple[str, bytes, str]:
    """A file the manifest lists (``{"file", "sha256", "bytes"}``), read once and checked against its sha256."""
    path = Path(model_dir) / entry["file"]
    data = _read_regular_file(path, min(MAX_MODEL_BYTES, entry["bytes"] + 1))
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise ModelFileError(
            f"{path} does not match its manifest (sha256 {digest[:12]}..., {len(data)} bytes; exported as "
            f"{entry['sha256'][:12]}..., {entry['bytes']} bytes): it changed after export; {REEXPORT}"
        )
    return entry["file"], data, digest


def _read_regular_file(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of a regular file (not a FIFO, a device or a directory, which could block or
    never end)."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ModelFileError(f"{path} is not a regular file; {REEXPORT}")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise ModelFileError(f"{path} is missing; {REEXPORT}") from None
    except OSError as exc:
        raise ModelFileError(f"{path} cannot be read ({exc.strerror or exc}); {REEXPORT}") from None
    if len(data) > limit:
        raise ModelFileError(f"{path} is larger than the export ever writes ({limit} bytes); {REEXPORT}")
    return data


def _manifest_problem(m) -> str | None:
    """What is wrong with a manifest, as the path of the first bad field, or None."""
    if not isinstance(m, dict):
        return "not a JSON object"
    artifacts = m.get("artifacts")
    if not isinstance(artifacts, dict) or not artifacts:
        return "artifacts"
    entries = {f"artifacts.{fmt}": a for fmt, a in artifacts.items()}
    entries.update({key: m.get(key) for key in ("detector", "golden")})  # both required: the golden set is how a
    # changed answer is caught without a signature, and it checks the detector too
    for where, a in entries.items():
        if problem := _entry_problem(where, a):
            return problem
    if not _number(m["detector"].get("threshold")) or not 0 <= m["detector"]["threshold"] <= 1:
        return "detector.threshold: a number in 0..1"
    norm = m.get("normalization")
    if not isinstance(norm, dict) or not _number(norm.get("mean")) or not _number(norm.get("std")) or norm["std"] <= 0:
        return "normalization: mean and a positive std"
    for key in ("input", "output"):
        t = m.get(key)
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or t.get("dtype") not in DTYPES:
            return f"{key}: name and dtype"
        if not isinstance(t.get("shape"), list) or not all(isinstance(d, (int, str)) for d in t["shape"]):
            return f"{key}.shape"
    classes = m["output"]["shape"][-1:]
    if not classes or type(classes[0]) is not int:
        return "output.shape: the number of classes last"
    config = m.get("model_config")
    if not isinstance(config, dict) or type(config.get("image_size")) is not int:
        return "model_config.image_size"
    shape, side = m["input"]["shape"], config["image_size"]
    if len(shape) != 4 or shape[2:] != [side, side] or type(shape[1]) is not int:
        return f"input.shape: [batch, channels, side, side], side the model_config.image_size ({side})"
    if len(m["output"]["shape"]) != 2:
        return "output.shape: [batch, classes]"
    verification = m.get("verification")
    if not isinstance(verification, dict) or verification.get("passed") is not True:
        return "verification.passed: the export's verification must have passed"
    if not _number(verification.get("eager_test_accuracy")):
        return "verification.eager_test_accuracy"
    if type(m.get("opset")) is not int:
        return "opset"
    calibration = m.get("calibration", {})  # absent in exports made before it
    if not isinstance(calibration, dict):
        return "calibration"
    temperature = calibration.get("temperature")  # every answer's probabilities are divided by it
    low, high = TEMPERATURE_BOUNDS
    if temperature is not None and (not _number(temperature) or not low <= temperature <= high):
        return f"calibration.temperature: a number in {low:g}..{high:g} (the range the export fits it in), or null"
    if m.get("drift") is not None:  # absent in exports made before it: the service then exports no drift scores
        return _drift_problem(m["drift"])
    return None


def _drift_problem(d) -> str | None:
    """What is wrong with the drift section (export/drift.py), as the path of the first bad field, or None."""
    if not isinstance(d, dict) or d.get("method") != METHOD:
        return f"drift.method: {METHOD!r}"
    quantities = d.get("quantities")
    if not isinstance(quantities, dict) or set(quantities) != set(QUANTITIES):
        return f"drift.quantities: exactly {', '.join(QUANTITIES)}"
    for name, q in quantities.items():
        edges, reference = (q.get("edges"), q.get("reference")) if isinstance(q, dict) else (None, None)
        if not _numbers(edges) or any(a >= b for a, b in zip(edges, edges[1:])):
            return f"drift.quantities.{name}.edges: increasing numbers"
        if not _numbers(reference) or len(reference) != len(edges) + 1 or min(reference) < 0:
            return f"drift.quantities.{name}.reference: a share per bin, one more than the edges"
        if abs(sum(reference) - 1) > 1e-3:
            return f"drift.quantities.{name}.reference: shares that sum to 1"
    thresholds = d.get("thresholds")
    if not isinstance(thresholds, dict) or not thresholds:
        return "drift.thresholds: thresholds per window size"
    for window, per in thresholds.items():
        if not re.fullmatch(r"[1-9][0-9]{0,6}", window):
            return f"drift.thresholds.{window[:20]}: a window size (images)"
        if not isinstance(per, dict) or set(per) != set(QUANTITIES):
            return f"drift.thresholds.{window}: a threshold for each of {', '.join(QUANTITIES)}"
        if not _numbers(list(per.values())) or not all(0 < t <= 1 for t in per.values()):
            return f"drift.thresholds.{window}: numbers in (0, 1] (divergences in bits)"
    return None


def _numbers(values) -> bool:
    return isinstance(values, list) and all(_number(v) for v in values)


def _entry_problem(where: str, a) -> str | None:
    if not isinstance(a, dict):
        return where
    name = a.get("file")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name):
        return f"{where}.file: a plain file name in the model's folder"
    if not isinstance(a.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", a["sha256"]):
        return f"{where}.sha256"
    if type(a.get("bytes")) is not int or a["bytes"] < 0:
        return f"{where}.bytes"
    return None


def _number(value) -> bool:
    return type(value) is int or (type(value) is float and math.isfinite(value))  # JSON's NaN, Infinity: floats
