"""Model runtimes for the service: ONNX Runtime (default, no torch import) or TorchScript (CPU or CUDA)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

RUNTIMES = ("onnx", "torchscript")


class ConfigError(ValueError):
    """A setting from the environment has a value the service cannot use."""


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class ServiceConfig:
    """Every knob of the service, read once from the environment; defaults tuned on a 2-core machine."""

    model_tag: str = "mnist-convnet:latest"
    runtime: str = "onnx"
    workers: int = 2  # one per core: each worker decodes, preprocesses and runs its own model session
    threads_per_worker: int = 1  # intra-op threads of each session, so workers do not oversubscribe the cores
    batching: bool = True  # MNIST_BATCHING=0 serves each request on its own (for comparison)
    # images per model call; room for several 64-image requests, which BentoML's batcher otherwise dispatches
    # one by one after waiting for company (docs/performance.md: 1.26-1.37x the images/s of 64)
    max_batch_size: int = 256
    max_latency_ms: int = 2000  # the cork dispatcher's budget: 503 only when a request would wait longer
    max_images_per_request: int = 64
    max_request_bytes: int = 32 * 1024 * 1024

    @classmethod
    def from_env(cls) -> ServiceConfig:
        runtime = os.environ.get("MNIST_RUNTIME", cls.runtime).lower()
        if runtime not in RUNTIMES:
            raise ConfigError(f"MNIST_RUNTIME must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        cpus = os.cpu_count() or 1
        return cls(
            model_tag=os.environ.get("MNIST_MODEL_TAG", cls.model_tag),
            runtime=runtime,
            workers=_env_int("MNIST_WORKERS", min(cls.workers, cpus)),
            threads_per_worker=_env_int("MNIST_THREADS", cls.threads_per_worker),
            batching=_env_int("MNIST_BATCHING", 1, minimum=0) != 0,
            max_batch_size=_env_int("MNIST_MAX_BATCH_SIZE", cls.max_batch_size, minimum=2),
            max_latency_ms=_env_int("MNIST_MAX_LATENCY_MS", cls.max_latency_ms),
            max_images_per_request=_env_int("MNIST_MAX_IMAGES", cls.max_images_per_request),
        )


def read_manifest(model_dir: str | os.PathLike) -> dict:
    return json.loads((Path(model_dir) / "manifest.json").read_text())


def _softmax_from_log(log_probs: np.ndarray) -> np.ndarray:
    probs = np.exp(log_probs.astype(np.float64))
    return probs / probs.sum(axis=1, keepdims=True)


class Runtime:
    """Loads one exported format and turns a normalized batch into per-image predictions."""

    name: str
    device: str
    file: str

    def log_probs(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - implemented below
        raise NotImplementedError

    def predict(self, x: np.ndarray) -> list[dict]:
        probs = _softmax_from_log(self.log_probs(x))
        digits = probs.argmax(axis=1)
        return [
            {"digit": int(d), "confidence": float(p[d]), "probabilities": [round(float(v), 6) for v in p]}
            for d, p in zip(digits, probs)
        ]


class OnnxRuntime(Runtime):
    name = "onnx"

    def __init__(self, model_dir: Path, manifest: dict, threads: int):
        import onnxruntime as ort

        self.file = manifest["artifacts"]["onnx"]["file"]
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
        self.session = ort.InferenceSession(str(model_dir / self.file), options, providers=providers)
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        if cuda_asked and self.device == "cpu":
            log.warning("onnxruntime-gpu could not start CUDA (no GPU or driver? its message is above): serving on CPU")
        self.input_name = manifest["input"]["name"]

    def log_probs(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


class TorchScriptRuntime(Runtime):
    name = "torchscript"

    def __init__(self, model_dir: Path, manifest: dict, threads: int):
        import torch

        from export.formats import torchscript_deprecation_silenced

        self.torch = torch
        self.file = manifest["artifacts"]["torchscript"]["file"]
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(threads)
        with torchscript_deprecation_silenced():
            self.module = torch.jit.load(str(model_dir / self.file), map_location=self.device).eval()

    def log_probs(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            out = self.module(torch.from_numpy(x).to(self.device, non_blocking=True))
        return out.float().cpu().numpy()


def load_runtime(kind: str, model_dir: str | os.PathLike, manifest: dict, threads: int) -> Runtime:
    cls = {"onnx": OnnxRuntime, "torchscript": TorchScriptRuntime}[kind]
    return cls(Path(model_dir), manifest, threads)
