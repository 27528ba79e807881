"""The model is checked at start-up: each broken model store stops `bentoml serve` with one line naming the file
and the fix, exit code non-zero, no traceback, no restart loop. Plus what /model_info says was served."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store_copy(book_export, tmp_path_factory):
    """A function that copies the test model store to a new BENTOML_HOME and returns (home, model dir)."""
    source = os.environ["BENTOML_HOME"]

    def copy():
        home = tmp_path_factory.mktemp("home")
        shutil.copytree(source, home, dirs_exist_ok=True)
        (model_dir,) = [p for p in (home / "models" / "mnist-convnet").iterdir() if (p / "manifest.json").exists()]
        return home, model_dir

    return copy


def _flip(path, start=50_000, length=4096):
    data = bytearray(path.read_bytes())
    data[start : start + length] = bytes(b ^ 0xFF for b in data[start : start + length])
    path.write_bytes(bytes(data))


def _flip_exponent(path):
    """One byte changed: the sign and exponent byte of the model's largest weight (its largest tensor's), as a bit
    rot or a hand edit could; what it changes is far beyond round-off. (A flip in a low mantissa byte changes a
    weight by about 1e-5 of itself and the answers by less than the export's tolerance: not an edit that changes
    answers.)"""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    data = bytearray(path.read_bytes())
    tensor = max(onnx.load_from_string(bytes(data)).graph.initializer, key=lambda t: len(t.raw_data))
    values = numpy_helper.to_array(tensor).ravel()
    at = data.find(tensor.raw_data)
    assert at >= 0 and values.dtype == np.float32
    data[at + 4 * int(np.abs(values).argmax()) + 3] ^= 0xFF  # little-endian: the fourth byte holds sign and exponent
    path.write_bytes(bytes(data))


def _edit(model_dir, change):
    manifest = json.loads((model_dir / "manifest.json").read_text())
    change(manifest)
    (model_dir / "manifest.json").write_text(json.dumps(manifest))


def _replace_with_link(path, target):
    path.unlink()
    path.symlink_to(target)


def _replace_with_fifo(path):
    path.unlink()
    os.mkfifo(path)


def _rehash(model_dir, section=("artifacts", "onnx")):
    """A manifest that agrees with whatever the file of ``section`` now holds (as if a broken file had been
    exported): what a writer who changes a model file and its manifest's sha256 leaves."""
    manifest = json.loads((model_dir / "manifest.json").read_text())
    entry = manifest
    for key in section:
        entry = entry[key]
    path = model_dir / entry["file"]
    entry.update(sha256=hashlib.sha256(path.read_bytes()).hexdigest(), bytes=path.stat().st_size)
    (model_dir / "manifest.json").write_text(json.dumps(manifest))


def _cut_golden(model_dir):
    golden = json.loads((model_dir / "golden.json").read_text())
    golden["inputs"] = golden["inputs"][:1]
    (model_dir / "golden.json").write_text(json.dumps(golden))


def _scale(model_dir, key, factor):
    _edit(model_dir, lambda m: m["normalization"].update({key: m["normalization"][key] * factor}))


GOLDEN_FAILED = "the golden-set check failed: "


BREAKAGES = {  # name -> (how to break the copied store, what the one line must say)
    "flipped weight bytes": (lambda d: _flip(d / "convnet.onnx"), "convnet.onnx does not match its manifest"),
    "int8 file over the float one": (
        lambda d: shutil.copy(d / "convnet.int8.onnx", d / "convnet.onnx"),
        "convnet.onnx does not match its manifest",
    ),
    "truncated": (
        lambda d: (d / "convnet.onnx").write_bytes((d / "convnet.onnx").read_bytes()[:5000]),
        "convnet.onnx does not match its manifest",
    ),
    "missing file": (lambda d: (d / "convnet.onnx").unlink(), "convnet.onnx is missing"),
    "missing manifest": (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
    "manifest not JSON": (lambda d: (d / "manifest.json").write_text("{not json"), "manifest.json cannot be read"),
    "manifest of something else": (lambda d: (d / "manifest.json").write_text("[1, 2]"), "not a JSON object"),
    "manifest without an output": (lambda d: _edit(d, lambda m: m.pop("output")), "(output: name and dtype)"),
    "manifest of another dtype": (
        lambda d: _edit(d, lambda m: m["input"].update(dtype="float16")),
        "(input: name and dtype)",
    ),
    "manifest without opset": (lambda d: _edit(d, lambda m: m.pop("opset")), "(opset)"),
    "manifest pointing outside": (
        lambda d: _edit(d, lambda m: m["artifacts"]["onnx"].update(file="../../../etc/passwd")),
        "a plain file name",
    ),
    "manifest nested deeply": (lambda d: (d / "manifest.json").write_text("[" * 200_000), "cannot be read"),
    "manifest a device": (lambda d: _replace_with_link(d / "manifest.json", "/dev/zero"), "is not a regular file"),
    "model a fifo": (lambda d: _replace_with_fifo(d / "convnet.onnx"), "is not a regular file"),
    "model.yaml garbage": (lambda d: (d / "model.yaml").write_text("{{{: ["), "model store entry cannot be read"),
    # edits that keep every hash in agreement: the golden set catches what they change in the answers
    "normalization std x10": (lambda d: _scale(d, "std", 10), GOLDEN_FAILED),
    "normalization mean negated": (lambda d: _scale(d, "mean", -1), GOLDEN_FAILED),
    "normalization std 1e-30": (lambda d: _scale(d, "std", 1e-30 / 0.3069), GOLDEN_FAILED),
    "a weight's exponent flipped, manifest agreeing": (
        lambda d: (_flip_exponent(d / "convnet.onnx"), _rehash(d)),
        GOLDEN_FAILED,
    ),
    "a detector weight changed, manifest agreeing": (
        lambda d: (_flip_exponent(d / "detector.onnx"), _rehash(d, ("detector",))),
        "digit score",
    ),
    "the verification recorded as failed": (
        lambda d: _edit(d, lambda m: m["verification"].update(passed=False)),
        "(verification.passed: the export's verification must have passed)",
    ),
    "input shape edited": (
        lambda d: _edit(d, lambda m: m["input"].update(shape=["batch", 1, 32, 32])),
        "(input.shape: [batch, channels, side, side], side the model_config.image_size (28))",
    ),
    "input name edited": (
        lambda d: _edit(d, lambda m: m["input"].update(name="pixels")),
        "convnet.onnx: its input is 'images' tensor(float) [-1, 1, 28, 28], the manifest says 'pixels'",
    ),
    "output shape edited": (
        lambda d: _edit(d, lambda m: m["output"].update(shape=["batch", 12])),
        "convnet.onnx: its output is 'log_probs' tensor(float) [-1, 10], the manifest says",
    ),
    "golden set deleted from the manifest": (lambda d: _edit(d, lambda m: m.pop("golden")), "(golden)"),
    "detector threshold 0": (lambda d: _edit(d, lambda m: m["detector"].update(threshold=0.0)), "looks_like_digit"),
    "detector threshold 1": (lambda d: _edit(d, lambda m: m["detector"].update(threshold=1.0)), "looks_like_digit"),
    "a temperature added": (
        lambda d: _edit(d, lambda m: m["calibration"].update(temperature=2.0)),
        "(the calibration temperature?)",
    ),
    "a temperature of 1e-9": (
        lambda d: _edit(d, lambda m: m["calibration"].update(temperature=1e-9)),
        "(calibration.temperature: a number in 0.05..20",
    ),
    "golden set cut to one input, manifest agreeing": (
        lambda d: (_cut_golden(d), _rehash(d, ("golden",))),
        "golden.json: its inputs are not the 44 the export records",
    ),
    "unparseable model, manifest agreeing": (
        lambda d: ((d / "convnet.onnx").write_bytes(b"\x08\x07garbage" * 100), _rehash(d)),
        "is not a model ONNX Runtime can load",
    ),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_broken_model_stops_the_server_with_one_line(store_copy, breakage):
    home, model_dir = store_copy()
    if breakage == "int8 file over the float one" and not (model_dir / "convnet.int8.onnx").exists():
        pytest.skip("this export has no INT8 file")
    damage, expected = BREAKAGES[breakage]
    damage(model_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", "0"],
        env={**os.environ, "BENTOML_HOME": str(home)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,  # it must exit by itself: a restart loop would run until this kills it
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model mnist-convnet:latest: ") and expected in last, last
    assert "re-export the model (`make export`" in last


def test_model_info_reports_the_hash_of_what_was_loaded(classifier, book_export):
    served = classifier.model_info()["served"]
    onnx = book_export.out / "convnet.onnx"
    assert served == {
        "file": "convnet.onnx",
        "sha256": hashlib.sha256(onnx.read_bytes()).hexdigest(),
        "matches_manifest": True,
    }
