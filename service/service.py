"""The BentoML service: ``bentoml serve`` from the project root (see bentofile.yaml). The path of a request
through the packages is in docs/architecture.md."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import bentoml
from bentoml.models import BentoModel
from bentoml.validators import ContentType
from pydantic import BaseModel, Field

from service import bentoml_glue, linux
from service.config import ConfigError, ServiceConfig
from service.core import Core, InputKind
from service.engine.batcher import start_batcher
from service.engine.process import WorkerFailed
from service.feedback.recorder import Recorder
from service.feedback.store import StoreError, open_store
from service.http import uvicorn_glue
from service.http.front import FrontedService
from service.model.files import REEXPORT, ModelFileError, read_manifest
from service.model.signature import verify_signature
from service.observe import access
from service.observe.drift import window_problem
from service.observe.metrics import metrics
from service.observe.tracing import Tracing, exporters_named
from service.protocols import ROUTES

log = logging.getLogger("service")
log.setLevel(logging.INFO)  # BentoML's server logging shows the root logger's warnings only

try:
    CONFIG = ServiceConfig.from_env()
    exporters_named(os.environ)  # OpenTelemetry's settings, checked here so that a bad one stops start-up at once
except ConfigError as exc:
    sys.exit(f"error: {exc}")
uvicorn_glue.install(CONFIG)  # before the worker builds its uvicorn config
bentoml_glue.install_timeout_fix()  # before BentoML builds its app


def _stored_manifest(tag: str) -> dict:
    """The manifest of the model the service will load, its signature checked first where MNIST_MODEL_PUBLIC_KEY
    asks for one; a missing, unsigned or changed model or manifest stops start-up with one line."""
    try:
        stored = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        sys.exit(
            f"error: model {tag} is not in the BentoML model store (BENTOML_HOME={bentoml_glue.bentoml_home()}); "
            "run `make export` (or `python -m export build --checkpoint artifacts/convnet.pt`) first"
        )
    except Exception as exc:  # noqa: BLE001 - a damaged store entry (its model.yaml, say): one line, not a traceback
        sys.exit(f"error: model {tag}: its model store entry cannot be read ({type(exc).__name__}); {REEXPORT}")
    try:
        if CONFIG.public_key:  # before a byte of the model is read: the manifest included
            verify_signature(stored.path, CONFIG.public_key)
        return read_manifest(stored.path)
    except ModelFileError as exc:
        sys.exit(f"error: model {tag}: {exc}")


MANIFEST = _stored_manifest(CONFIG.model_tag)
if drift_problem := window_problem(MANIFEST, CONFIG.drift_window):  # a window the thresholds were not made for
    sys.exit(f"error: model {CONFIG.model_tag}: {drift_problem}")


def feedback_store() -> str:
    """Where feedback goes: MNIST_FEEDBACK_URL, else MNIST_FEEDBACK_DB, else feedback.sqlite3 in $BENTOML_HOME."""
    return CONFIG.feedback_url or CONFIG.feedback_db or os.path.join(bentoml_glue.bentoml_home(), "feedback.sqlite3")


def _check_feedback_store() -> None:
    """Before any worker starts: open the feedback store (creating or migrating its schema) once, so that a
    setting that cannot work stops the server with one line."""
    if CONFIG.feedback:
        try:
            open_store(feedback_store()).close()
        except StoreError as exc:
            sys.exit(f"error: {exc} (MNIST_FEEDBACK=0 serves without feedback)")


def _feedback_recorder(tag: str) -> Recorder | None:
    """This worker's side of the feedback store (MNIST_FEEDBACK); one that fails later costs feedback a 503."""
    if not CONFIG.feedback:
        return None
    recorder = Recorder(feedback_store(), tag, CONFIG, metrics(CONFIG.max_batch_size))
    recorder.metrics.set_accuracy_settings(CONFIG.accuracy_window, CONFIG.accuracy_alert_below)
    return recorder


class Prediction(BaseModel):
    digit: int = Field(description="the most likely digit, 0-9")
    confidence: float = Field(description="its probability")
    probabilities: list[float] = Field(description="probability of each digit 0-9")
    input: list[list[float]] | None = Field(None, description="with return_input: the 28x28 image the model saw")


Predictions = Annotated[list[Prediction], ContentType("application/json")]


def _file_bytes(item) -> bytes:
    """An in-process caller's image: bytes, a path, or an open upload."""
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if hasattr(item, "read"):
        return item.read()
    if hasattr(getattr(item, "file", None), "read"):
        return item.file.read()
    return Path(item).read_bytes()


@bentoml.service(
    name="mnist_classifier",
    workers=CONFIG.workers,
    threads=1,
    traffic={"timeout": 30},
    service_class=FrontedService,
)
class MNISTClassifier:
    """Handwritten-digit classifier: the Mastering PyTorch chapter 1 ConvNet, exported and verified."""

    model = BentoModel(CONFIG.model_tag)
    settings = CONFIG  # (not `config`: the BentoML service object has a `config` of its own)
    routes = ROUTES  # what the HTTP front answers (service/protocols/); BentoML serves its own pages behind it

    @bentoml.on_deployment
    def check_the_model_loads() -> None:
        """Once, in ``bentoml serve`` before any worker starts: load the model the way a work process does (its
        file checked against the manifest's sha256, then parsed and run), so that a broken model stops the
        server with one line instead of sending its workers into a restart loop."""
        tag = CONFIG.model_tag
        _check_feedback_store()
        try:
            start_batcher(bentoml.models.get(tag).path, MANIFEST, replace(CONFIG, work_procs=1)).close()
        except WorkerFailed as exc:
            sys.exit(f"error: model {tag}: {exc}")

    def __init__(self) -> None:
        self.access_log = None
        if bentoml_glue.in_worker():
            linux.on_parent_death(signal.SIGTERM)  # drain and exit when `bentoml serve` is gone, even killed with -9
            self.access_log = access.install()
        try:
            engine = start_batcher(Path(self.model.path), MANIFEST, CONFIG, metrics(CONFIG.max_batch_size))
        except WorkerFailed as exc:
            sys.exit(f"error: the model {self.model.tag} could not be loaded: {exc}")
        tag = str(self.model.tag)
        recorder = _feedback_recorder(tag)
        self.core = Core(CONFIG, MANIFEST, tag, engine, metrics(CONFIG.max_batch_size), Tracing.from_env(), recorder)
        # Everything alive now (modules, BentoML's machinery) lives as long as the worker: move it out of the
        # garbage collector's view, so that a full collection under load takes a few ms, not ~70.
        gc.collect()
        gc.freeze()
        runtime = self.core.runtime
        procs, express = CONFIG.work_procs, CONFIG.express_procs
        log.info(
            "loaded %s (%s on %s, %d work processes, %d express)", tag, runtime.runtime, runtime.device, procs, express
        )

    def __is_ready__(self) -> bool:
        return self.core.ready

    @bentoml.on_shutdown
    def stop(self) -> None:
        self.core.close()
        if self.access_log is not None:
            self.access_log.flush()
        if self.core.tracing is not None:
            self.core.tracing.shutdown()

    # The API methods: what BentoML's OpenAPI page and client describe, and the entry for in-process callers.
    # Over HTTP the same paths are answered by the adapters in service/protocols/rest.py, through the same core.
    @bentoml.api(route="/predict")
    async def predict(self, images: list[Path], return_input: bool = False) -> Predictions:
        """Classify uploaded images (PNG, JPEG, ...; repeated multipart field `images`), one result each. With
        return_input, each result also carries the 28x28 image the model saw."""
        files = [_file_bytes(item) for item in images]
        answer = await self.core.classify(InputKind.ENCODED, files, len(files), return_input)
        return answer.predictions()

    @bentoml.api(route="/predict_array")
    async def predict_array(self, images: list, return_input: bool = False) -> Predictions:
        """Classify 28x28 arrays of intensities in 0..1 (white digit on black, as in MNIST)."""
        answer = await self.core.classify(InputKind.PIXELS, images, len(images), return_input)
        return answer.predictions()

    @bentoml.api(route="/model_info")
    def model_info(self) -> dict:
        """Which model is served, how, and what its export proved."""
        return self.core.model_info()
