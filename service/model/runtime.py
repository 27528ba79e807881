"""Model runtimes for the work processes: ONNX Runtime (default, no torch import) or TorchScript (CPU or CUDA)."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np

from service.model.files import REEXPORT, ModelFileError, read_entry, read_verified

log = logging.getLogger(__name__)


def _unloadable(path: Path, what: str, exc: Exception) -> ModelFileError:
    """A model file that passed its hash check but that the runtime cannot load: one line, its first."""
    reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    return ModelFileError(f"{path} is not {what} ({reason}); {REEXPORT}")


class Runtime:
    """Loads one exported format, from bytes checked against the manifest, and runs a normalized batch."""

    name: str  # MNIST_RUNTIME's value, which is also the key of the manifest's artifact it loads
    device: str
    file: str
    sha256: str

    def log_probs(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - implemented below
        raise NotImplementedError


class OnnxRuntime(Runtime):
    name = "onnx"

    def __init__(self, model_dir: Path, manifest: dict, threads: int):
        import onnxruntime as ort

        self.file, model, self.sha256 = read_verified(model_dir, manifest, self.name)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        available = ort.get_available_providers()
        cuda_asked = "CUDAExecutionProvider" in available  # onnxruntime-gpu is installed
        if cuda_asked and hasattr(ort, "preload_dlls"):
            # PyPI's onnxruntime-gpu finds CUDA and cuDNN in the nvidia-* packages (the GPU image's) only once
            # they are preloaded; without this its CUDA provider fails to load libcublasLt.so.12, GPU or not
            ort.preload_dlls()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(model, options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types for a file it cannot parse
            raise _unloadable(model_dir / self.file, "a model ONNX Runtime can load", exc) from None
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        if cuda_asked and self.device == "cpu":
            log.warning("onnxruntime-gpu could not start CUDA (no GPU or driver? its message is above): serving on CPU")
        self.input_name = manifest["input"]["name"]
        _check_spec(model_dir / self.file, self.session, manifest)

    def log_probs(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


class TorchScriptRuntime(Runtime):
    name = "torchscript"

    def __init__(self, model_dir: Path, manifest: dict, threads: int):
        import torch

        from export.formats import torchscript_deprecation_silenced

        self.torch = torch
        self.file, model, self.sha256 = read_verified(model_dir, manifest, self.name)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(threads)
        torch.backends.cudnn.allow_tf32 = False  # float32 convolutions as exported: the golden set checks them
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            with torchscript_deprecation_silenced():
                self.module = torch.jit.load(io.BytesIO(model), map_location=self.device).eval()
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError and others for a file it cannot parse
            raise _unloadable(model_dir / self.file, "a TorchScript model", exc) from None

    def log_probs(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            out = self.module(torch.from_numpy(x).to(self.device, non_blocking=True))
        return out.float().cpu().numpy()


_ONNX_TYPES = {"float32": "tensor(float)"}


def _check_spec(path: Path, session, manifest: dict) -> None:
    """The manifest's input and output, as v2 metadata advertises them, against the ONNX file's own."""
    for key, declared in (("input", session.get_inputs()), ("output", session.get_outputs())):
        spec, own = manifest[key], declared[0]
        shape = [d if isinstance(d, int) else -1 for d in own.shape]
        wanted = [d if isinstance(d, int) else -1 for d in spec["shape"]]
        if len(declared) != 1 or own.name != spec["name"] or own.type != _ONNX_TYPES[spec["dtype"]] or shape != wanted:
            raise ModelFileError(
                f"{path}: its {key} is {own.name!r} {own.type} {shape}, the manifest says {spec['name']!r} "
                f"{spec['dtype']} {wanted}; {REEXPORT}"
            )


class Detector:
    """The not-a-digit detector (export/detector.py): the model's input -> the probability that it is a digit.
    Always ONNX Runtime on CPU: a few hundred kFLOPs an image, not worth a device transfer."""

    def __init__(self, model_dir: Path, manifest: dict, threads: int):
        import onnxruntime as ort

        entry = manifest["detector"]
        self.file, model, self.sha256 = read_entry(model_dir, entry)
        self.threshold = float(entry["threshold"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types for a file it cannot parse
            raise _unloadable(Path(model_dir) / self.file, "a model ONNX Runtime can load", exc) from None
        self.input_name = self.session.get_inputs()[0].name

    def scores(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


def load_runtime(kind: str, model_dir: str | os.PathLike, manifest: dict, threads: int) -> Runtime:
    cls = {"onnx": OnnxRuntime, "torchscript": TorchScriptRuntime}[kind]
    return cls(Path(model_dir), manifest, threads)
