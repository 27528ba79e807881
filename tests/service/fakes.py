"""What the fast service tests run on: a Core over a fake engine, and an ASGI client over a fake receive/send.

The fake engine does the real input decoding and preprocessing in process (service/inputs/) and stands in only
for the work processes and the network: its "model" is a fixed linear map, so answers are deterministic."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import numpy as np

from service.config import ServiceConfig
from service.core import Core
from service.engine.messages import Done, InputKind, RuntimeInfo
from service.engine.work import model_input
from service.inputs.image_size import declared_pixels
from service.inputs.stats import input_stats

MANIFEST = {
    "input": {"name": "images", "dtype": "float32", "shape": ["batch", 1, 28, 28]},
    "output": {"name": "log_probs", "dtype": "float32", "shape": ["batch", 10]},
    "model_config": {"image_size": 28},
    "normalization": {"mean": 0.1302, "std": 0.3069},
    "artifacts": {"onnx": {"file": "convnet.onnx", "sha256": "ab" * 32, "bytes": 1}},
    "verification": {"passed": True, "eager_test_accuracy": 0.9871},
    "opset": 18,
    "detector": {"file": "detector.onnx", "sha256": "cd" * 32, "bytes": 1, "threshold": 0.5},
    "golden": {"file": "golden.json", "sha256": "ef" * 32, "bytes": 1},
}
WEIGHTS = np.random.default_rng(0).normal(size=(28 * 28, 10)).astype(np.float32) / 28


def fake_digit_scores(x: np.ndarray) -> np.ndarray:
    """The fake detector: an image with no ink (a blank, all at the normalized background) does not look like a
    digit; any other does."""
    flat = x.reshape(len(x), -1)
    inked = (flat > flat.min(axis=1, keepdims=True) + 1e-6).any(axis=1)
    return np.where(inked, 0.9, 0.1).astype(np.float32)


def fake_log_probs(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # a runtime's overflow is silent: inf and NaN, no warning
        logits = x.reshape(len(x), -1) @ WEIGHTS
        logits -= logits.max(axis=1, keepdims=True)
        return (logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))).astype(np.float32)


class FakeEngine:
    """The batcher's interface, answered in process."""

    def __init__(self, config: ServiceConfig):
        self.config = config
        self.info = RuntimeInfo("onnx", "cpu", "convnet.onnx", "ab" * 32)
        self.ready = True
        self.problem = None  # the batcher's: a failed golden-set check or a non-finite output
        self.checks_every_s = None  # what start_checks was called with
        self.calls: list[dict] = []
        self.closed = False
        self.refusal = None  # what refuses_unread answers: set it to a RequestError to refuse bodies unread
        self.asked_unread: list[int] = []

    async def submit(self, kind, payload, images, want_inputs=False, request_id="", timeline=None) -> Done:
        self.calls.append({"kind": kind, "images": images, "want_inputs": want_inputs, "request_id": request_id})
        declared = None
        if kind is InputKind.ENCODED:
            declared = tuple(declared_pixels(data, self.config.max_image_pixels) for data in payload)
        if timeline is not None:
            timeline.queued_ns = time.time_ns()
            timeline.dispatched_ns = time.time_ns()
        start = time.time_ns()
        norm = MANIFEST["normalization"]
        x, seen, asked = model_input(kind, payload, self.config, norm["mean"], norm["std"], declared)
        end = time.time_ns()
        stats = None if seen is None else input_stats(seen)
        seen = seen if want_inputs or asked else None
        scores = fake_digit_scores(x)
        return Done(fake_log_probs(x), seen, start, end, end, time.time_ns(), len(x), scores, stats, asked)

    def refuses_unread(self, body_bytes: int):
        self.asked_unread.append(body_bytes)
        return self.refusal

    def state(self) -> dict:
        return {"processes": 1, "fake": True}

    def start_checks(self, every_s: float) -> None:
        self.checks_every_s = every_s

    def close(self) -> None:
        self.closed = True


def make_core(config: ServiceConfig | None = None, tracing=None, manifest: dict = MANIFEST) -> Core:
    config = config or ServiceConfig()
    return Core(config, manifest, "mnist-convnet:v1", FakeEngine(config), None, tracing)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    sent: list = field(default_factory=list)
    unread: int = 0  # pieces of the request's body the app never asked for

    def json(self):
        return json.loads(self.body)


async def call(app, method: str, path: str, body: bytes | list[bytes] = b"", headers=(), query: bytes = b""):
    """One request through an ASGI app: ``body`` in one message or a list of chunks. After the body the client
    stays connected until the answer is sent (the front watches for a disconnect to drop abandoned work)."""
    chunks = list(body) if isinstance(body, list) else [body]
    answered = asyncio.Event()
    sent = []

    async def receive():
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            answered.set()

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": query,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
    }
    await app(scope, receive, send)
    if not sent:
        return Answer(0, {}, b"", sent, len(chunks))
    start = sent[0]
    names = {k.decode(): v.decode() for k, v in start["headers"]}
    return Answer(start["status"], names, b"".join(m.get("body", b"") for m in sent[1:]), sent, len(chunks))


def run(app, *args, **kwargs) -> Answer:
    return asyncio.run(call(app, *args, **kwargs))
