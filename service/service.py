"""The BentoML service: ``bentoml serve`` from the project root (see bentofile.yaml).

Endpoints: POST /predict (multipart images), POST /predict_array (JSON 28x28 arrays), GET /model_info, plus
BentoML's /livez, /readyz, /metrics and the OpenAPI page at /. Both predict paths are batchable: requests
are validated and preprocessed one by one (a bad image fails only its own request), then BentoML's
adaptive batcher merges them into one model call.
"""

from __future__ import annotations

import json
import logging
import sys
from http import HTTPStatus
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
from bentoml.exceptions import BadInput, BentoMLException
from bentoml.models import BentoModel
from pydantic import AfterValidator, BaseModel, Field

from service.preprocess import ImageError, ImageTooLarge, image_to_mnist, mnist_style, normalize
from service.runtime import ConfigError, ServiceConfig, load_runtime, read_manifest

log = logging.getLogger("service")

try:
    CONFIG = ServiceConfig.from_env()
except ConfigError as exc:
    sys.exit(f"error: {exc}")


class PayloadTooLarge(BentoMLException):
    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


def _stored_manifest(tag: str) -> dict:
    """The manifest of the model the service will load; a missing model stops start-up with one line."""
    try:
        stored = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        sys.exit(
            f"error: model {tag} is not in the BentoML model store ("
            f"BENTOML_HOME={_store_home()}); run `make export` "
            "(or `python -m export build --checkpoint artifacts/convnet.pt`) first"
        )
    return read_manifest(stored.path)


def _store_home() -> str:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return str(BentoMLContainer.bentoml_home.get())


MANIFEST = _stored_manifest(CONFIG.model_tag)
MEAN, STD = MANIFEST["normalization"]["mean"], MANIFEST["normalization"]["std"]


def _check_count(n: int) -> None:
    if n == 0:
        raise BadInput("no images: send one or more images (multipart field 'images', or JSON 'images': [...])")
    if n > CONFIG.max_images_per_request:
        raise PayloadTooLarge(f"{n} images in one request; the limit is {CONFIG.max_images_per_request}")


def files_to_batch(files: list[Path]) -> np.ndarray:
    """Multipart uploads -> normalized [N, 1, 28, 28]; runs per request, before batching."""
    _check_count(len(files))
    images = []
    for i, path in enumerate(files):
        try:
            images.append(image_to_mnist(Path(path).read_bytes(), name=f"images[{i}]"))
        except ImageTooLarge as exc:
            raise PayloadTooLarge(str(exc)) from None
        except ImageError as exc:
            raise BadInput(str(exc)) from None
    return normalize(np.stack(images), MEAN, STD)


def arrays_to_batch(images: list) -> np.ndarray:
    """JSON arrays (N x 28 x 28, 0..1, white on black) -> normalized [N, 1, 28, 28]; per request."""
    _check_count(len(images))
    try:
        batch = np.asarray(images, dtype=np.float32)
    except (ValueError, TypeError):
        raise BadInput("images must be a list of 28x28 arrays of numbers (ragged or non-numeric input)") from None
    if batch.ndim != 3 or batch.shape[1:] != (28, 28):
        raise BadInput(f"images must have shape [N, 28, 28], got {list(batch.shape)}")
    if not np.isfinite(batch).all():
        raise BadInput("images contain NaN or infinite values; expected pixel intensities in 0..1")
    if batch.min() < 0.0 or batch.max() > 1.0:
        raise BadInput(f"pixel intensities must be in 0..1, got {batch.min():g}..{batch.max():g}")
    return normalize(np.stack([mnist_style(img) for img in batch]), MEAN, STD)


class Prediction(BaseModel):
    digit: int = Field(description="the most likely digit, 0-9")
    confidence: float = Field(description="its probability")
    probabilities: list[float] = Field(description="probability of each digit 0-9")


class ContentTypeGuard:
    """ASGI middleware: wrong media types get 415 and oversized bodies 413 before any parsing."""

    EXPECTED = {"/predict": "multipart/form-data", "/predict_array": "application/json"}

    def __init__(self, app, max_bytes: int = CONFIG.max_request_bytes):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.EXPECTED:
            headers = dict(scope["headers"])
            expected = self.EXPECTED[scope["path"]]
            content_type = headers.get(b"content-type", b"").decode("latin-1").lower()
            if not content_type.startswith(expected):
                return await _reject(send, 415, f"{scope['path']} expects {expected}, got {content_type or 'none'}")
            length = headers.get(b"content-length", b"0")
            if length.isdigit() and int(length) > self.max_bytes:
                return await _reject(send, 413, f"request body is {int(length)} bytes; the limit is {self.max_bytes}")
        return await self.app(scope, receive, send)


async def _reject(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


BATCHING = (
    {"batchable": True, "max_batch_size": CONFIG.max_batch_size, "max_latency_ms": CONFIG.max_latency_ms}
    if CONFIG.batching
    else {}
)


@bentoml.service(
    name="mnist_classifier",
    workers=CONFIG.workers,
    threads=1,
    traffic={"timeout": 30},
    metrics={"enabled": True},
)
class MNISTClassifier:
    """Handwritten-digit classifier: the Mastering PyTorch chapter 1 ConvNet, exported and verified."""

    model = BentoModel(CONFIG.model_tag)

    def __init__(self) -> None:
        self.model_dir = Path(self.model.path)
        self.manifest = MANIFEST  # read once at import: the validators need its normalization before any instance
        self.runtime = load_runtime(CONFIG.runtime, self.model_dir, self.manifest, CONFIG.threads_per_worker)
        self._ready = False
        self.runtime.predict(np.zeros((2, 1, 28, 28), dtype=np.float32))  # warm-up: first-call allocations
        self._ready = True
        log.info("loaded %s (%s on %s)", self.model.tag, self.runtime.name, self.runtime.device)

    def __is_ready__(self) -> bool:
        return self._ready

    @bentoml.api(
        route="/predict", batchable=True, max_batch_size=CONFIG.max_batch_size, max_latency_ms=CONFIG.max_latency_ms
    )
    async def predict(self, images: Annotated[list[Path], AfterValidator(files_to_batch)]) -> list[Prediction]:
        """Classify uploaded images (PNG, JPEG, ...; repeated multipart field `images`), one result each."""
        return self.runtime.predict(images)

    @bentoml.api(
        route="/predict_array",
        batchable=True,
        max_batch_size=CONFIG.max_batch_size,
        max_latency_ms=CONFIG.max_latency_ms,
    )
    async def predict_array(self, images: Annotated[list, AfterValidator(arrays_to_batch)]) -> list[Prediction]:
        """Classify 28x28 arrays of intensities in 0..1 (white digit on black, as in MNIST)."""
        return self.runtime.predict(images)

    @bentoml.api(route="/model_info")
    def model_info(self) -> dict:
        """Which model is served, how, and what its export proved."""
        verification = self.manifest["verification"]
        return {
            "tag": str(self.model.tag),
            "runtime": self.runtime.name,
            "device": self.runtime.device,
            "file": self.runtime.file,
            "formats": {
                fmt: {"file": a["file"], "sha256": a["sha256"]} for fmt, a in self.manifest["artifacts"].items()
            },
            "normalization": self.manifest["normalization"],
            "opset": self.manifest["opset"],
            "test_accuracy": verification["eager_test_accuracy"],
            "verified": verification["passed"],
            "max_images_per_request": CONFIG.max_images_per_request,
            "batching": {
                "max_batch_size": CONFIG.max_batch_size,
                "max_latency_ms": CONFIG.max_latency_ms,
                "workers": CONFIG.workers,
            },
        }


MNISTClassifier.add_asgi_middleware(ContentTypeGuard)
