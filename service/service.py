"""The BentoML service: ``bentoml serve`` from the project root (see bentofile.yaml).

Endpoints: POST /predict (multipart images), POST /predict_array (JSON 28x28 arrays), GET|POST /model_info,
/livez, /readyz, plus BentoML's /metrics and the OpenAPI page at /. The request path, from the socket to the
model and back:

    service/connections.py  connection cap, request-head deadline, keep-alive, drain on SIGTERM (uvicorn)
    service/frontend.py     routing, body limits and timeouts, errors as JSON, metrics; BentoML's pages behind it
    service/routes.py       the HTTP adapters: parse, validate, format
    service/batcher.py      one dynamic batcher, bounded queue, work processes (restarted if they die)
    service/worker.py       in the work processes: decode and budgets (inputs.py, preprocess.py), model call
"""

from __future__ import annotations

import gc
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import bentoml
from bentoml.models import BentoModel
from bentoml.validators import ContentType
from pydantic import BaseModel, Field

from service import connections
from service.batcher import WorkerFailed, start_batcher
from service.config import ConfigError, ServiceConfig
from service.frontend import lean
from service.metrics import metrics
from service.middleware import install_timeout_fix
from service.model_files import REEXPORT, ModelFileError, read_manifest
from service.routes import ROUTES
from service.runtime import predictions
from service.v2 import model_metadata

log = logging.getLogger("service")
log.setLevel(logging.INFO)  # BentoML's server logging shows the root logger's warnings only

try:
    CONFIG = ServiceConfig.from_env()
except ConfigError as exc:
    sys.exit(f"error: {exc}")
connections.install(CONFIG)  # before the worker builds its uvicorn config
install_timeout_fix()  # before BentoML builds its app; see service/middleware.py


def _stored_manifest(tag: str) -> dict:
    """The manifest of the model the service will load; a missing model or manifest stops start-up with one
    line."""
    try:
        stored = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        sys.exit(
            f"error: model {tag} is not in the BentoML model store ("
            f"BENTOML_HOME={_store_home()}); run `make export` "
            "(or `python -m export build --checkpoint artifacts/convnet.pt`) first"
        )
    except Exception as exc:  # noqa: BLE001 - a damaged store entry (its model.yaml, say): one line, not a traceback
        sys.exit(f"error: model {tag}: its model store entry cannot be read ({type(exc).__name__}); {REEXPORT}")
    try:
        return read_manifest(stored.path)
    except ModelFileError as exc:
        sys.exit(f"error: model {tag}: {exc}")


def _check_the_model_loads(tag: str, manifest: dict) -> None:
    """Before ``bentoml serve`` starts any worker: load the model once the way a work process does (its file
    checked against the manifest's sha256, then parsed and run), so that a broken model stops the server
    with one line instead of sending its workers into a restart loop. Workers skip this: the server did it."""
    from bentoml._internal.context import server_context

    if server_context.worker_index is not None:
        return
    try:
        start_batcher(bentoml.models.get(tag).path, manifest, replace(CONFIG, work_procs=1)).close()
    except WorkerFailed as exc:
        sys.exit(f"error: model {tag}: {exc}")


def _store_home() -> str:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return str(BentoMLContainer.bentoml_home.get())


MANIFEST = _stored_manifest(CONFIG.model_tag)
V2_MODELS = model_metadata(MANIFEST, CONFIG.runtime)  # from the manifest read above, so it is checked here too
_check_the_model_loads(CONFIG.model_tag, MANIFEST)


class Prediction(BaseModel):
    digit: int = Field(description="the most likely digit, 0-9")
    confidence: float = Field(description="its probability")
    probabilities: list[float] = Field(description="probability of each digit 0-9")


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


@bentoml.service(name="mnist_classifier", workers=CONFIG.workers, threads=1, traffic={"timeout": 30})
class MNISTClassifier:
    """Handwritten-digit classifier: the Mastering PyTorch chapter 1 ConvNet, exported and verified."""

    model = BentoModel(CONFIG.model_tag)
    settings = CONFIG  # (not `config`: the BentoML service object has a `config` of its own)

    def __init__(self) -> None:
        self.model_dir = Path(self.model.path)
        self.manifest = MANIFEST
        try:
            self.batcher = start_batcher(self.model_dir, self.manifest, CONFIG, metrics(CONFIG.max_batch_size))
        except WorkerFailed as exc:
            sys.exit(f"error: the model {self.model.tag} could not be loaded: {exc}")
        self.runtime = self.batcher.processes[0].info
        self.v2_models = V2_MODELS
        # Everything alive now (modules, BentoML's machinery) lives as long as the worker: move it out of the
        # garbage collector's view, so that a full collection under load takes a few ms, not ~70.
        gc.collect()
        gc.freeze()
        log.info(
            "loaded %s (%s on %s, %d work processes)",
            self.model.tag,
            self.runtime["runtime"],
            self.runtime["device"],
            CONFIG.work_procs,
        )

    def __is_ready__(self) -> bool:
        return self.batcher.ready

    @bentoml.on_shutdown
    def stop_work_processes(self) -> None:
        self.batcher.close()

    # The API methods: what BentoML's OpenAPI page and client describe, and the entry for in-process callers.
    # Over HTTP the same paths are answered by service/routes.py, through the same batcher. (Inside a running
    # server BentoML sends calls of these methods through HTTP, so the routes call the plain methods below.)
    @bentoml.api(route="/predict")
    async def predict(self, images: list[Path]) -> Predictions:
        """Classify uploaded images (PNG, JPEG, ...; repeated multipart field `images`), one result each."""
        done = await self.batcher.submit("encoded", [_file_bytes(item) for item in images], max(1, len(images)))
        return predictions(done.log_probs)

    @bentoml.api(route="/predict_array")
    async def predict_array(self, images: list) -> Predictions:
        """Classify 28x28 arrays of intensities in 0..1 (white digit on black, as in MNIST)."""
        done = await self.batcher.submit("pixels", images, max(1, len(images)))
        return predictions(done.log_probs)

    @bentoml.api(route="/model_info")
    def model_info(self) -> dict:
        """Which model is served, how, and what its export proved."""
        return self.info()

    def info(self) -> dict:
        verification = self.manifest["verification"]
        return {
            "tag": str(self.model.tag),
            "runtime": self.runtime["runtime"],
            "device": self.runtime["device"],
            "file": self.runtime["file"],
            # what this worker's work processes loaded: the file's sha256, computed from the bytes they load and
            # checked against the manifest before the model was built from those bytes
            "served": {"file": self.runtime["file"], "sha256": self.runtime["sha256"], "matches_manifest": True},
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
                "max_queue_images": CONFIG.max_queue_images,
                "workers": CONFIG.workers,
                "work_processes_per_worker": CONFIG.work_procs,
            },
            "settings": {f["env"]: f["value"] for f in CONFIG.describe()},
            "batcher": self.batcher.state(),  # this worker's: each worker has its own batcher
        }


lean(MNISTClassifier, ROUTES, CONFIG)
