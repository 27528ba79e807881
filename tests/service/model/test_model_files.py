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


def _rehash(model_dir):
    """A manifest that agrees with whatever convnet.onnx now holds (as if a broken file had been exported)."""
    manifest = json.loads((model_dir / "manifest.json").read_text())
    onnx = model_dir / "convnet.onnx"
    manifest["artifacts"]["onnx"].update(
        sha256=hashlib.sha256(onnx.read_bytes()).hexdigest(), bytes=onnx.stat().st_size
    )
    (model_dir / "manifest.json").write_text(json.dumps(manifest))


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
