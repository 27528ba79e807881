import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.build import MANIFEST, ExportConfig, ExportError, build, verify_dir
from export.detector import DetectorConfig
from export.formats import FILES, OUTPUT_NAME, export_torchscript, load_runner
from export.verify import ATOL, BATCH_SIZES, INT8_MAX_ACCURACY_DROP, RTOL, VerificationError, check_batch, verify
from tests.conftest import REPO
from training.checkpoint import build_model, load_checkpoint
from training.model import ConvNet

pytestmark = pytest.mark.slow
FORMATS = ("torchscript", "onnx", "pt2", "onnx-int8")


@pytest.fixture(scope="module")
def book_model(book_checkpoint):
    return build_model(load_checkpoint(book_checkpoint))


def test_manifest_describes_every_artifact(book_export):
    manifest = json.loads((book_export.out / MANIFEST).read_text())
    assert set(manifest["artifacts"]) == set(FORMATS)
    for fmt, entry in manifest["artifacts"].items():
        assert entry["file"] == FILES[fmt]
        assert (book_export.out / entry["file"]).stat().st_size == entry["bytes"]
        assert len(entry["sha256"]) == 64
    assert manifest["input"] == {"name": "images", "shape": ["batch", 1, 28, 28], "dtype": "float32"}
    assert manifest["normalization"] == {"mean": 0.1302, "std": 0.3069}
    assert manifest["opset"] == 18
    assert set(manifest["versions"]) == {"torch", "onnx", "onnxruntime"}
    assert manifest["verification"]["passed"] is True
    assert manifest["verification"]["batch_sizes"] == list(BATCH_SIZES)


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_matches_eager(book_export, book_model, test_inputs, fmt, batch):
    x = test_inputs[0][:batch].numpy()
    with torch.no_grad():
        expected = book_model(test_inputs[0][:batch]).numpy().astype(np.float64)
    run, names = load_runner(fmt, book_export.out / FILES[fmt])
    exact = fmt != "onnx-int8"
    diff, failure = check_batch(run, names, x, expected, exact=exact)
    assert failure is None
    assert run(x).shape == (batch, 10)
    if exact:
        assert diff <= ATOL + RTOL * np.abs(expected).max()


def test_books_model_keeps_its_accuracy(book_export):
    report = book_export.manifest["verification"]
    assert report["eager_test_accuracy"] == pytest.approx(0.9871, abs=1e-9)
    for fmt in ("torchscript", "onnx", "pt2"):
        assert report["formats"][fmt]["argmax_agreement"] == 1.0
        assert report["formats"][fmt]["test_accuracy"] == report["eager_test_accuracy"]


def test_int8_within_its_accuracy_bound_and_timed(book_export):
    report = book_export.manifest["verification"]
    int8 = report["formats"]["onnx-int8"]
    assert 100 * (report["eager_test_accuracy"] - int8["test_accuracy"]) <= INT8_MAX_ACCURACY_DROP
    assert int8["speed"]["int8_images_per_s"] > 0 and int8["speed"]["float_images_per_s"] > 0
    # it really is quantized: QDQ nodes and int8 weights
    proto = onnx.load(str(book_export.out / FILES["onnx-int8"]))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in proto.graph.node}


def test_onnx_has_dynamic_batch_pinned_opset_and_passes_checker(book_export):
    path = book_export.out / FILES["onnx"]
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [o.name for o in proto.graph.output] == [OUTPUT_NAME]
    assert {op.domain: op.version for op in proto.opset_import}[""] == 18
    onnx.checker.check_model(str(path), full_check=True)


def test_registered_in_the_model_store(book_export):
    import bentoml

    assert os.environ["BENTOML_HOME"] in str(bentoml.models.get(book_export.tag).path)
    model = bentoml.models.get("mnist-convnet:latest")
    assert str(model.tag) == book_export.tag
    assert model.info.labels["test_accuracy"] == "0.9871"
    assert model.info.metadata["onnx_sha256"] == book_export.manifest["artifacts"]["onnx"]["sha256"]
    stored = json.loads(Path(model.path_of(MANIFEST)).read_text())
    assert stored["artifacts"] == book_export.manifest["artifacts"]
    for entry in stored["artifacts"].values():
        assert os.path.isfile(model.path_of(entry["file"]))


def test_onnx_runs_in_a_fresh_runtime_without_torch(book_export, test_inputs, book_model, tmp_path):
    x = test_inputs[0][:16]
    np.save(tmp_path / "x.npy", x.numpy())
    with torch.no_grad():
        expected = book_model(x).argmax(1).tolist()
    code = (
        "import sys, numpy as np, onnxruntime as ort\n"
        f"s = ort.InferenceSession({str(book_export.out / FILES['onnx'])!r}, providers=['CPUExecutionProvider'])\n"
        f"out = s.run(None, {{'images': np.load({str(tmp_path / 'x.npy')!r})}})[0]\n"
        "assert 'torch' not in sys.modules\n"
        "print(out.argmax(1).tolist())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == expected


def tampered_copy(book_export, tmp_path):
    target = tmp_path / "export"
    shutil.copytree(book_export.out, target)
    return target


def test_tampered_artifact_is_caught(book_export, tmp_path):
    target = tampered_copy(book_export, tmp_path)
    data = bytearray((target / FILES["onnx"]).read_bytes())
    data[-100] ^= 0xFF
    (target / FILES["onnx"]).write_bytes(bytes(data))
    with pytest.raises(ExportError, match="convnet.onnx has changed"):
        verify_dir(target)


def test_verify_cli_names_a_missing_file(book_export, tmp_path):
    target = tampered_copy(book_export, tmp_path)
    (target / FILES["pt2"]).unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "export", "verify", str(target)], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "convnet.pt2 is missing" in proc.stderr.strip().splitlines()[-1]


def test_verify_cli_passes_on_an_untouched_export(book_export):
    proc = subprocess.run(
        [sys.executable, "-m", "export", "verify", str(book_export.out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "all files match the manifest" in proc.stderr


def test_verification_catches_a_different_function(book_export, book_model, test_inputs):
    other = ConvNet().eval()  # random weights: same shapes and names, another function
    runners = {"onnx": load_runner("onnx", book_export.out / FILES["onnx"])}
    x, y = test_inputs
    with pytest.raises(VerificationError) as info:
        verify(other, runners, x[:600], y[:600])
    assert all(f"onnx at batch size {b}" in str(info.value) for b in BATCH_SIZES)
    assert info.value.report["passed"] is False
    assert info.value.report["formats"]["onnx"]["max_abs_diff"] > ATOL


def test_project_checkpoint_exports_without_store(tiny_run, data_dir, tmp_path):
    result = build(
        ExportConfig(
            checkpoint=str(tiny_run.checkpoint_path),
            out=str(tmp_path),
            register=False,
            int8=False,
            data_dir=str(data_dir),
            detector=DetectorConfig.quick(),  # the full detector is the book export's (tests/conftest.py)
        )
    )
    assert result.tag is None
    assert set(result.manifest["artifacts"]) == {"torchscript", "onnx", "pt2"}
    assert result.manifest["source"]["kind"] == "checkpoint"
    assert result.manifest["source"]["metrics"]["test_accuracy"] == tiny_run.metrics["test_accuracy"]
    assert result.manifest["verification"]["eager_test_accuracy"] == pytest.approx(tiny_run.metrics["test_accuracy"])
    # the tiny run held out the last 5,000 training images: the temperature is fitted on them
    calibration = result.manifest["calibration"]
    assert calibration["heldout_images"] == 5_000 and calibration["fitted_temperature"] > 0
    assert (calibration["temperature"] is not None) == (calibration["ece_at_temperature"] < calibration["ece"])
    assert (tmp_path / calibration["diagram"]).is_file()


def test_wrong_shape_checkpoint_names_the_layer(tmp_path):
    state = ConvNet().state_dict()
    state["cn2.weight"] = torch.zeros(8, 16, 3, 3)
    torch.save(state, tmp_path / "bad.pth")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "export",
            "build",
            "--checkpoint",
            str(tmp_path / "bad.pth"),
            "--out",
            str(tmp_path / "out"),
            "--no-register",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "cn2.weight has shape (8, 16, 3, 3)" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_export_restores_the_training_flag(tmp_path):
    model = ConvNet().train()
    export_torchscript(model, tmp_path / "m.pt")
    assert model.training
