"""The one core every way in calls (the data plane of KServe and MLServer): the readiness rule, what the models
are, and classification over the one batcher, with the answer's format. The adapters (service/protocols/ and
the API methods of service/service.py) only parse, validate and format.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from service.engine.batcher import Batcher, Timeline
from service.engine.messages import Done, InputKind, RuntimeInfo
from service.model.calibration import probabilities
from service.observe.drift import DriftMonitor

CONVNET, PIPELINE = "mnist-convnet", "mnist"  # the network as exported; the classifier end to end


class Lifecycle:
    """This worker's stage in its life: set by the server glue on SIGTERM, read by the readiness rule."""

    draining = False

    def drain(self) -> None:
        self.draining = True


LIFECYCLE = Lifecycle()


def not_ready(core: Core | None) -> str | None:
    """The one readiness rule, behind every readiness path and BentoML's ``__is_ready__``: the model loaded,
    its work processes up and their golden-set checks passed, and the worker not draining. None when ready, else
    why not."""
    if LIFECYCLE.draining:
        return "draining: this worker is shutting down"
    if core is None:
        return "starting: the model is not loaded yet"
    if core.engine.problem:
        return core.engine.problem
    if not core.engine.ready:
        return "no work process is running"
    return None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # a numpy dtype name, or "bytes" for encoded files
    shape: tuple[int, ...]  # -1: any size


@dataclass(frozen=True)
class ModelSpec:
    """One model the service answers for, described from the export's manifest."""

    name: str
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    also_accepts: tuple[TensorSpec, ...] = ()  # another form of the same input


def model_specs(manifest: dict, runtime: str) -> dict[str, ModelSpec]:
    x, y = manifest["input"], manifest["output"]
    side = manifest["model_config"]["image_size"]
    classes = y["shape"][-1]

    def dims(shape: list) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else -1 for d in shape)  # the manifest names the batch axis "batch"

    return {
        CONVNET: ModelSpec(
            CONVNET,
            "onnxruntime_onnx" if runtime == "onnx" else "pytorch_libtorch",
            (TensorSpec(x["name"], x["dtype"], dims(x["shape"])),),
            (TensorSpec(y["name"], y["dtype"], dims(y["shape"])),),
        ),
        PIPELINE: ModelSpec(
            PIPELINE,
            "mnist_pipeline",
            (TensorSpec(x["name"], "bytes", (-1,)),),  # encoded image files
            (
                TensorSpec("digit", "int64", (-1,)),
                TensorSpec("probabilities", "float32", (-1, classes)),
                TensorSpec("looks_like_digit", "bool", (-1,)),
                TensorSpec("digit_score", "float32", (-1,)),
            ),
            also_accepts=(TensorSpec(x["name"], "uint8", (-1, side, side)),),  # MNIST-format pixels
        ),
    }


@dataclass
class Call:
    """Who is asking, for the logs and the trace: the request's id, and its OpenTelemetry span when tracing is
    on (service/observe/tracing.py)."""

    request_id: str = ""
    span: object = None


@dataclass(frozen=True)
class Answer:
    log_probs: np.ndarray  # [N, 10], as the network gave them
    inputs: np.ndarray | None  # [N, 28, 28] in 0..1, the images the model saw, when asked for
    temperature: float | None = None  # the manifest's calibration: probabilities are softmax(log_probs / T)
    digit_scores: np.ndarray | None = None  # [N] the not-a-digit detector's scores (service/model/runtime.py)
    threshold: float = 0.0  # below it, an image does not look like a digit (the export set it)

    def probabilities(self) -> np.ndarray:
        return self._probs

    @functools.cached_property
    def _probs(self) -> np.ndarray:
        return probabilities(self.log_probs, self.temperature)

    @functools.cached_property
    def _rows(self) -> tuple[list[int], list[list[float]]]:
        """The digits and the probabilities as Python numbers: one conversion, shared by the metrics and the
        answer (numpy calls on a row of 10 cost more than the arithmetic)."""
        probs = self._probs
        return probs.argmax(axis=1).tolist(), probs.tolist()

    def digits_and_confidences(self) -> tuple[list[int], list[float]]:
        """Each image's digit and the probability the answer reports for it (what the metrics count)."""
        digits, rows = self._rows
        return digits, [row[d] for d, row in zip(digits, rows)]

    @functools.cached_property
    def _looks(self) -> tuple[list[bool], list[float]]:
        scores = self.digit_scores.astype(np.float64).tolist()
        return [s >= self.threshold for s in scores], scores

    def looks_like_digit(self) -> list[bool]:
        """Whether each image looks like a digit at all: its detector score at or above the threshold."""
        return self._looks[0]

    def predictions(self) -> list[dict]:
        """One answer per image, as /predict, /predict_array and the API methods return them; with ``inputs``,
        each also carries the 28x28 image the model saw (intensities 0..1, 3 decimals)."""
        digits, rows = self._rows
        looks, scores = self._looks
        answers = [
            {
                "digit": d,
                "confidence": row[d],
                "probabilities": [round(v, 6) for v in row],
                "looks_like_digit": looks_like,
                "digit_score": round(score, 6),
            }
            for d, row, looks_like, score in zip(digits, rows, looks, scores)
        ]
        if self.inputs is not None:
            for answer, image in zip(answers, np.round(self.inputs.astype(np.float64), 3)):
                answer["input"] = image.tolist()
        return answers


def _prepare_s(done: Done, kind: InputKind) -> float | None:
    """The time the request's images spent being prepared, for the metrics: image inputs only."""
    return None if kind is InputKind.NORMALIZED else done.prepare_s


class Core:
    def __init__(self, config, manifest: dict, tag: str, engine: Batcher, metrics=None, tracing=None, recorder=None):
        self.config, self.manifest, self.tag, self.engine = config, manifest, tag, engine
        self.recorder = recorder  # service/feedback/recorder.py: answers remembered for POST /feedback
        self.version = tag.partition(":")[2]
        self.metrics, self.tracing = metrics, tracing
        self.runtime: RuntimeInfo = engine.info
        self.models = model_specs(manifest, self.runtime.runtime)
        self._checks_started = False
        self.calibration = manifest.get("calibration") or {}  # exports before calibration have none
        self.temperature = self.calibration.get("temperature")
        self.threshold = float(manifest["detector"]["threshold"])
        self.drift = DriftMonitor.from_manifest(manifest, config.drift_window, metrics)  # None: no drift section

    @property
    def ready(self) -> bool:
        return not_ready(self) is None

    async def classify(
        self, kind: InputKind, payload, images: int, return_input: bool = False, call: Call | None = None
    ) -> Answer:
        """Classify one request of at most ``images`` images (an upper bound where the payload is not parsed
        yet): the model's answer, or the RequestError the request ends in."""
        keep = self.recorder is not None and self.recorder.keep_images and call is not None
        done = await self._run(kind, payload, images, return_input or keep, call)
        inputs = done.inputs if return_input or done.asked else None  # not those kept only for the store
        answer = Answer(done.log_probs, inputs, self.temperature, done.digit_scores, self.threshold)
        if self.metrics is not None:
            self.metrics.observe_answer(
                *answer.digits_and_confidences(), _prepare_s(done, kind), answer.looks_like_digit().count(False)
            )
        if self.drift is not None:
            self.drift.observe(answer, done.stats)
        if self.recorder is not None and call is not None and call.request_id:
            self.recorder.remember(
                call.request_id, *answer.digits_and_confidences(), answer.looks_like_digit(), done.inputs
            )
        return answer

    def start_checks(self) -> None:
        """On the worker's event loop, once it runs: the periodic golden-set checks (``MNIST_GOLDEN_CHECK_S``)."""
        if not self._checks_started:
            self._checks_started = True
            self.engine.start_checks(self.config.golden_check_s)

    def refuses_unread(self, body_bytes: int):
        """The 503 every request of a ``body_bytes`` body would get now, or None: asked before reading a body."""
        return self.engine.refuses_unread(body_bytes)

    async def network(self, x: np.ndarray, call: Call | None = None) -> np.ndarray:
        """The exported network on its own input, [N, 1, 28, 28] normalized: its log-probabilities."""
        done = await self._run(InputKind.NORMALIZED, x, len(x), False, call)
        if self.metrics is not None:
            self.metrics.observe_answer(*Answer(done.log_probs, None, self.temperature).digits_and_confidences())
        return done.log_probs

    async def _run(self, kind: InputKind, payload, images: int, want_inputs: bool, call: Call | None) -> Done:
        call = call or Call()
        timeline = Timeline() if call.span is not None else None
        done = await self.engine.submit(kind, payload, max(1, images), want_inputs, call.request_id, timeline)
        if timeline is not None:
            self.tracing.record_work(call.span, timeline, done)
        return done

    def model_info(self) -> dict:
        verification = self.manifest["verification"]
        config, runtime = self.config, self.runtime
        return {
            "tag": self.tag,
            "runtime": runtime.runtime,
            "device": runtime.device,
            "file": runtime.file,
            # what this worker's work processes loaded: the file's sha256, computed from the bytes they load and
            # checked against the manifest before the model was built from those bytes
            "served": {"file": runtime.file, "sha256": runtime.sha256, "matches_manifest": True},
            "formats": {
                fmt: {"file": a["file"], "sha256": a["sha256"]} for fmt, a in self.manifest["artifacts"].items()
            },
            "normalization": self.manifest["normalization"],
            "opset": self.manifest["opset"],
            "test_accuracy": verification["eager_test_accuracy"],
            "verified": verification["passed"],
            "calibration": {
                k: self.calibration.get(k) for k in ("temperature", "ece", "ece_at_temperature", "bins", "reason")
            },
            "max_images_per_request": config.max_images_per_request,
            "batching": {
                "enabled": config.batching,
                "max_batch_size": config.max_batch_size,
                "max_queue_images": config.max_queue_images,
                "workers": config.workers,
                "work_processes_per_worker": config.work_procs,
            },
            "settings": {f["env"]: f["value"] for f in config.describe()},
            "batcher": self.engine.state(),  # this worker's: each worker has its own batcher
        }

    def close(self) -> None:
        self.engine.close()
        if self.recorder is not None:
            self.recorder.close()
