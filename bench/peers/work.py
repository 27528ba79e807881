"""The work every peer server does, the same as our service's POST /predict does per request.

Each request: every uploaded image through the project's own preprocessing (``image_to_mnist``), the
manifest's normalization, then ONNX Runtime on the export's ONNX file with one intra-op and one inter-op
thread, and one ``{"digit", "confidence", "probabilities"}`` per image (softmax of the model's
log-probabilities, rounded as the service rounds them). Peers that batch run several requests' images in one
model call (``predict_requests``). Runs inside the peers' own venv (.bench-venv): numpy, Pillow, scipy and
onnxruntime only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.inputs.preprocess import image_to_mnist, normalize

THREADS = 1  # per worker process, as the service's MNIST_THREADS: two workers on two cores


class Pipeline:
    """One export loaded in one process: bytes -> normalized batch -> ONNX Runtime -> per-image answers."""

    def __init__(self, export_dir: str | Path):
        export_dir = Path(export_dir)
        manifest = json.loads((export_dir / "manifest.json").read_text())
        self.mean = manifest["normalization"]["mean"]
        self.std = manifest["normalization"]["std"]
        self.input_name = manifest["input"]["name"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        options.inter_op_num_threads = 1
        model = export_dir / manifest["artifacts"]["onnx"]["file"]
        self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self.predict(np.zeros((2, 1, 28, 28), dtype=np.float32))  # warm-up, as the service does

    def preprocess(self, images: list[bytes]) -> np.ndarray:
        """One request's encoded images -> the model's normalized [N, 1, 28, 28] input."""
        batch = np.stack([image_to_mnist(data, name=f"images[{i}]") for i, data in enumerate(images)])
        return normalize(batch, self.mean, self.std)

    def predict(self, x: np.ndarray) -> list[dict]:
        log_probs = self.session.run(None, {self.input_name: x})[0]
        probs = np.exp(log_probs.astype(np.float64))
        probs /= probs.sum(axis=1, keepdims=True)
        digits = probs.argmax(axis=1)
        return [
            {"digit": int(d), "confidence": float(p[d]), "probabilities": [round(float(v), 6) for v in p]}
            for d, p in zip(digits, probs)
        ]

    def predict_requests(self, inputs: list[np.ndarray]) -> list[list[dict]]:
        """Several requests' inputs in one model call; the answers split back, one list per request."""
        answers = self.predict(np.concatenate(inputs))
        ends = np.cumsum([len(x) for x in inputs])
        return [answers[end - len(x) : end] for x, end in zip(inputs, ends)]

    def __call__(self, images: list[bytes]) -> list[dict]:
        return self.predict(self.preprocess(images))
