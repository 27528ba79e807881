"""The BentoML service: ``bentoml serve`` from the project root (see bentofile.yaml).

Endpoints: POST /predict (multipart images), POST /predict_array (JSON 28x28 arrays), GET /model_info, plus
BentoML's /livez, /readyz, /metrics and the OpenAPI page at /. Both predict paths are batchable: requests
are validated and preprocessed one by one (a bad image fails only its own request), then BentoML's
adaptive batcher merges them into one model call.
"""

from __future__ import annotations

import gc
import logging
import sys
from http import HTTPStatus
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
from bentoml.exceptions import BadInput, BentoMLException
from bentoml.models import BentoModel
from bentoml.validators import ContentType
from pydantic import AfterValidator, BaseModel, Field, ValidatorFunctionWrapHandler, WrapValidator

from service.middleware import ContentTypeGuard, install_timeout_fix
from service.preprocess import ImageError, ImageTooLarge, image_to_mnist, mnist_style, normalize
from service.runtime import ConfigError, ServiceConfig, load_runtime, read_manifest

log = logging.getLogger("service")
install_timeout_fix()  # before BentoML builds the app; see service/middleware.py

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


def _upload_bytes(item: object, handler: ValidatorFunctionWrapHandler) -> bytes:
    """One multipart part, read in memory. Starlette has already parsed it (spooled to disk only above
    1 MB); BentoML's own path for `Path` inputs would write every upload to a temp file and hand us its
    name, which costs more than the model call. Anything else goes through BentoML's validation."""
    if isinstance(item, bytes):
        return item
    file = getattr(item, "file", None)  # starlette's UploadFile
    if file is not None:
        file.seek(0)
        return file.read()
    return Path(handler([item])[0]).read_bytes()


def files_to_batch(files: object, handler: ValidatorFunctionWrapHandler) -> np.ndarray:
    """Multipart uploads -> normalized [N, 1, 28, 28]; runs per request, before batching."""
    if not isinstance(files, (list, tuple)):
        files = [files]
    _check_count(len(files))
    images = []
    for i, item in enumerate(files):
        try:
            images.append(image_to_mnist(_upload_bytes(item, handler), name=f"images[{i}]"))
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


BATCHING = (
    {"batchable": True, "max_batch_size": CONFIG.max_batch_size, "max_latency_ms": CONFIG.max_latency_ms}
    if CONFIG.batching
    else {"batchable": False}
)
# Declared, so that BentoML does not rebuild the output's JSON schema for every response to find its type
Predictions = Annotated[list[Prediction], ContentType("application/json")]


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
        # Everything alive now (modules, the model, BentoML's machinery) lives as long as the worker: move it
        # out of the garbage collector's view, so that a full collection under load takes a few ms, not ~70.
        gc.collect()
        gc.freeze()
        self._ready = True
        log.info("loaded %s (%s on %s)", self.model.tag, self.runtime.name, self.runtime.device)

    def __is_ready__(self) -> bool:
        return self._ready

    @bentoml.api(route="/predict", **BATCHING)
    async def predict(self, images: Annotated[list[Path], WrapValidator(files_to_batch)]) -> Predictions:
        """Classify uploaded images (PNG, JPEG, ...; repeated multipart field `images`), one result each."""
        return self.runtime.predict(images)

    @bentoml.api(route="/predict_array", **BATCHING)
    async def predict_array(self, images: Annotated[list, AfterValidator(arrays_to_batch)]) -> Predictions:
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
                "enabled": CONFIG.batching,
                "max_batch_size": CONFIG.max_batch_size,
                "max_latency_ms": CONFIG.max_latency_ms,
                "workers": CONFIG.workers,
            },
        }


MNISTClassifier.add_asgi_middleware(ContentTypeGuard, max_bytes=CONFIG.max_request_bytes)
