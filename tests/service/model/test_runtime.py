"""service/model/runtime.py on a tiny real model built here: an ONNX graph (Flatten -> Gemm -> LogSoftmax, fixed
random weights) and, when torch is at hand, the same weights traced to TorchScript. Each runtime must compute what
numpy computes, load only bytes whose sha256 the manifest records, and refuse a file it cannot load with one
line that names it."""

from __future__ import annotations

import hashlib
import io
import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.model.files import REEXPORT, ModelFileError, read_manifest
from service.model.runtime import OnnxRuntime, TorchScriptRuntime, _unloadable, load_runtime

SIDE, CLASSES = 28, 10
RNG = np.random.default_rng(20240607)
WEIGHTS = (RNG.normal(size=(SIDE * SIDE, CLASSES)) / SIDE).astype(np.float32)
BIAS = RNG.normal(size=CLASSES).astype(np.float32)
ONNX_FILE, TS_FILE = "convnet.onnx", "convnet.ts"


def onnx_model_bytes() -> bytes:
    """images [batch, 1, 28, 28] -> Flatten -> Gemm(WEIGHTS, BIAS) -> LogSoftmax -> log_probs [batch, 10]."""
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["images"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "weights", "bias"], ["logits"]),
            helper.make_node("LogSoftmax", ["logits"], ["log_probs"], axis=1),
        ],
        "tiny-convnet",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 1, SIDE, SIDE])],
        [helper.make_tensor_value_info("log_probs", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=[numpy_helper.from_array(WEIGHTS, "weights"), numpy_helper.from_array(BIAS, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def reference(x: np.ndarray) -> np.ndarray:
    """The same model in numpy, in float64."""
    logits = x.reshape(len(x), -1).astype(np.float64) @ WEIGHTS.astype(np.float64) + BIAS
    logits -= logits.max(axis=1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def batch(n: int, seed: int = 0) -> np.ndarray:
    """A normalized input batch, as the work process hands it to the runtime."""
    return ((np.random.default_rng(seed).random((n, 1, SIDE, SIDE)) - 0.13) / 0.31).astype(np.float32)


def artifact(name: str, data: bytes) -> dict:
    return {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def write_model(folder, files: dict[str, tuple[str, bytes]]) -> dict:
    """Each format's file and a manifest that vouches for it; the manifest as read_manifest reads it back."""
    for name, data in files.values():
        (folder / name).write_bytes(data)
    manifest = {
        "manifest_version": 1,
        "model": "mnist-convnet",
        "artifacts": {fmt: artifact(name, data) for fmt, (name, data) in files.items()},
        "input": {"name": "images", "dtype": "float32", "shape": ["batch", 1, SIDE, SIDE]},
        "output": {"name": "log_probs", "dtype": "float32", "shape": ["batch", CLASSES]},
        "normalization": {"mean": 0.1307, "std": 0.3081},
        "model_config": {"image_size": SIDE, "in_channels": 1, "num_classes": CLASSES},
        "verification": {"passed": True, "eager_test_accuracy": 0.99},
        "opset": 18,
        "detector": {"file": "detector.onnx", "sha256": "cd" * 32, "bytes": 10, "threshold": 0.62},
        "golden": {"file": "golden.json", "sha256": "ef" * 32, "bytes": 10},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return read_manifest(folder)


def rehash(folder, manifest: dict, fmt: str) -> dict:
    """The manifest rewritten for what the ``fmt`` file now holds, as if a broken file had been exported."""
    name = manifest["artifacts"][fmt]["file"]
    manifest["artifacts"][fmt] = artifact(name, (folder / name).read_bytes())
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return read_manifest(folder)


def refused(kind: str, folder, manifest: dict) -> str:
    with pytest.raises(ModelFileError) as caught:
        load_runtime(kind, folder, manifest, threads=1)
    message = str(caught.value)
    assert "\n" not in message and message.endswith(REEXPORT), message
    return message


@pytest.fixture(scope="module")
def onnx_bytes() -> bytes:
    return onnx_model_bytes()


@pytest.fixture
def onnx_dir(tmp_path, onnx_bytes):
    return tmp_path, write_model(tmp_path, {"onnx": (ONNX_FILE, onnx_bytes)})


# ---- ONNX Runtime ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("threads", [1, 2])
def test_the_onnx_runtime_reports_what_it_loaded(onnx_dir, onnx_bytes, threads):
    folder, manifest = onnx_dir
    runtime = load_runtime("onnx", folder, manifest, threads=threads)

    assert isinstance(runtime, OnnxRuntime)
    assert runtime.name == "onnx" and runtime.file == ONNX_FILE
    assert runtime.sha256 == hashlib.sha256(onnx_bytes).hexdigest() == manifest["artifacts"]["onnx"]["sha256"]
    cuda = "CUDAExecutionProvider" in ort.get_available_providers() and (
        runtime.session.get_providers()[0] == "CUDAExecutionProvider"
    )
    assert runtime.device == ("cuda" if cuda else "cpu")
    options = runtime.session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (threads, 1)
    assert runtime.input_name == "images"


@pytest.mark.parametrize("n", [1, 7])
def test_onnx_log_probs_are_the_models(onnx_dir, n):
    folder, manifest = onnx_dir
    runtime = load_runtime("onnx", str(folder), manifest, threads=1)  # a str path too
    x = batch(n, seed=n)

    out = runtime.log_probs(x)

    assert out.dtype == np.float32 and out.shape == (n, CLASSES)
    np.testing.assert_allclose(out, reference(x), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.exp(out).sum(axis=1), 1.0, atol=1e-5)
    assert len(set(out.argmax(axis=1).tolist())) > 1 or n == 1  # not a constant answer


def test_different_inputs_get_different_answers(onnx_dir):
    folder, manifest = onnx_dir
    runtime = load_runtime("onnx", folder, manifest, threads=1)
    a, b = runtime.log_probs(batch(1, seed=1)), runtime.log_probs(batch(1, seed=2))
    assert not np.allclose(a, b)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda data: data[: len(data) // 2],
        lambda data: b"this is not a protobuf at all" * 40,
        lambda data: bytes(b ^ 0xFF for b in data[:64]) + data[64:],
        lambda data: b"",
    ],
    ids=["truncated", "text", "flipped header", "empty"],
)
def test_an_onnx_file_its_manifest_vouches_for_but_ort_cannot_load(onnx_dir, onnx_bytes, corrupt):
    folder, manifest = onnx_dir
    (folder / ONNX_FILE).write_bytes(corrupt(onnx_bytes))
    manifest = rehash(folder, manifest, "onnx")

    message = refused("onnx", folder, manifest)

    assert message.startswith(f"{folder / ONNX_FILE} is not a model ONNX Runtime can load (")


@pytest.mark.parametrize(
    "change",
    [
        lambda data: data[:-1] + bytes([data[-1] ^ 1]),  # one bit of a weight: still a loadable model
        lambda data: data[:-1],
        lambda data: data + b"\0",
    ],
    ids=["a flipped bit", "one byte short", "one byte more"],
)
def test_an_onnx_file_changed_after_its_manifest_is_refused_by_its_hash(onnx_dir, onnx_bytes, change):
    folder, manifest = onnx_dir
    (folder / ONNX_FILE).write_bytes(change(onnx_bytes))

    message = refused("onnx", folder, manifest)

    assert message.startswith(f"{folder / ONNX_FILE} does not match its manifest")
    assert manifest["artifacts"]["onnx"]["sha256"][:12] in message


def test_a_missing_onnx_file(onnx_dir):
    folder, manifest = onnx_dir
    (folder / ONNX_FILE).unlink()
    assert refused("onnx", folder, manifest).startswith(f"{folder / ONNX_FILE} is missing")


def test_an_unknown_runtime_is_a_key_error(onnx_dir):
    folder, manifest = onnx_dir
    with pytest.raises(KeyError):
        load_runtime("tensorrt", folder, manifest, threads=1)


# ---- the CUDA provider, without a GPU ------------------------------------------------------------------------
REAL_SESSION = ort.InferenceSession


class FakeSession:
    """An InferenceSession that runs on whichever provider the test says it got (and describes the model's inputs
    and outputs as the real one does)."""

    got = "CPUExecutionProvider"
    made: list = []

    def __init__(self, model, options, providers):
        FakeSession.made.append((model, options, providers))
        real = REAL_SESSION(model, providers=["CPUExecutionProvider"])
        self.get_inputs, self.get_outputs = real.get_inputs, real.get_outputs

    def get_providers(self):
        return [self.got, "CPUExecutionProvider"] if self.got != "CPUExecutionProvider" else [self.got]


@pytest.mark.parametrize("preload", [True, False], ids=["preload_dlls", "an older onnxruntime"])
@pytest.mark.parametrize("got", ["CUDAExecutionProvider", "CPUExecutionProvider"], ids=["cuda", "cpu fallback"])
def test_onnxruntime_gpu_asks_for_cuda_and_says_when_it_falls_back(
    onnx_dir, onnx_bytes, monkeypatch, caplog, got, preload
):
    folder, manifest = onnx_dir
    preloaded = []
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    if preload:
        monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: preloaded.append(True), raising=False)
    else:
        monkeypatch.delattr(ort, "preload_dlls", raising=False)
    monkeypatch.setattr(FakeSession, "got", got)
    monkeypatch.setattr(FakeSession, "made", [])
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    caplog.set_level(logging.WARNING, logger="service.model.runtime")

    runtime = load_runtime("onnx", folder, manifest, threads=3)

    (model, options, providers), *more = FakeSession.made
    assert not more and model == onnx_bytes and options.intra_op_num_threads == 3
    assert providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]  # CUDA first, CPU behind it
    assert preloaded == ([True] if preload else [])
    assert runtime.device == ("cuda" if got == "CUDAExecutionProvider" else "cpu")
    assert ("could not start CUDA" in caplog.text) is (got == "CPUExecutionProvider")


def test_without_onnxruntime_gpu_only_cpu_is_asked_for(onnx_dir, monkeypatch, caplog):
    folder, manifest = onnx_dir
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["AzureExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: pytest.fail("preloaded CUDA libraries"), raising=False)
    monkeypatch.setattr(FakeSession, "got", "CPUExecutionProvider")
    monkeypatch.setattr(FakeSession, "made", [])
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    caplog.set_level(logging.WARNING, logger="service.model.runtime")

    runtime = load_runtime("onnx", folder, manifest, threads=1)

    assert FakeSession.made[0][2] == ["CPUExecutionProvider"]
    assert runtime.device == "cpu" and "CUDA" not in caplog.text


# ---- the one-line message -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "exc, reason",
    [
        (RuntimeError("[ONNXRuntimeError] : 7 : INVALID_PROTOBUF\nstack trace line\nmore"), "[ONNXRuntimeError]"),
        (ValueError("x" * 500), "x" * 160),
        (ValueError(), "ValueError"),
        (RuntimeError("  \n "), "RuntimeError"),
        (OSError("\n  first words after a blank line  \nsecond"), "first words after a blank line"),
    ],
    ids=["multi-line", "long", "empty", "blank", "leading newline"],
)
def test_an_unloadable_file_is_one_line(tmp_path, exc, reason):
    message = str(_unloadable(tmp_path / ONNX_FILE, "a model ONNX Runtime can load", exc))
    assert "\n" not in message and message.endswith(REEXPORT)
    assert message.startswith(f"{tmp_path / ONNX_FILE} is not a model ONNX Runtime can load ({reason}")
    assert len(message) < 400


# ---- TorchScript ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture
def torch_threads(torch):
    """The runtime sets torch's thread count for the whole process: put it back for the tests after this one."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ts_bytes(torch) -> bytes:
    from export.formats import torchscript_deprecation_silenced

    linear = torch.nn.Linear(SIDE * SIDE, CLASSES)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(WEIGHTS.T.copy()))
        linear.bias.copy_(torch.from_numpy(BIAS))
    model = torch.nn.Sequential(torch.nn.Flatten(), linear, torch.nn.LogSoftmax(dim=1)).eval()
    buf = io.BytesIO()
    with torch.no_grad(), torchscript_deprecation_silenced():
        torch.jit.save(torch.jit.trace(model, torch.from_numpy(batch(2))), buf)
    return buf.getvalue()


@pytest.fixture
def both_dir(tmp_path, onnx_bytes, ts_bytes, torch_threads):
    return tmp_path, write_model(tmp_path, {"onnx": (ONNX_FILE, onnx_bytes), "torchscript": (TS_FILE, ts_bytes)})


def test_torchscript_agrees_with_onnx_on_the_same_weights(both_dir, ts_bytes, torch):
    folder, manifest = both_dir
    scripted = load_runtime("torchscript", folder, manifest, threads=1)
    onnx_runtime = load_runtime("onnx", folder, manifest, threads=1)
    x = batch(7, seed=3)

    out = scripted.log_probs(x)

    assert isinstance(scripted, TorchScriptRuntime)
    assert scripted.name == "torchscript" and scripted.file == TS_FILE
    assert scripted.sha256 == hashlib.sha256(ts_bytes).hexdigest()
    assert scripted.device == ("cuda" if torch.cuda.is_available() else "cpu")
    if scripted.device == "cpu":
        assert torch.get_num_threads() == 1
    assert out.dtype == np.float32 and out.shape == (7, CLASSES)
    np.testing.assert_allclose(out, onnx_runtime.log_probs(x), rtol=0, atol=1e-5)
    np.testing.assert_allclose(out, reference(x), rtol=0, atol=1e-5)


def test_a_torchscript_file_its_manifest_vouches_for_but_torch_cannot_load(both_dir, ts_bytes):
    folder, manifest = both_dir
    (folder / TS_FILE).write_bytes(ts_bytes[: len(ts_bytes) // 3])
    manifest = rehash(folder, manifest, "torchscript")

    message = refused("torchscript", folder, manifest)

    assert message.startswith(f"{folder / TS_FILE} is not a TorchScript model (")


def test_a_torchscript_file_changed_after_its_manifest_is_refused_by_its_hash(both_dir, ts_bytes):
    folder, manifest = both_dir
    (folder / TS_FILE).write_bytes(ts_bytes[:-1] + bytes([ts_bytes[-1] ^ 1]))
    assert refused("torchscript", folder, manifest).startswith(f"{folder / TS_FILE} does not match its manifest")


def test_a_manifest_without_torchscript(onnx_dir, torch, torch_threads):
    folder, manifest = onnx_dir
    assert "lists no torchscript file" in refused("torchscript", folder, manifest)
