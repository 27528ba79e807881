"""The messages between an HTTP worker and its work processes, and how they travel: one module both ends import.

Each message is a frozen dataclass sent as a length-prefixed pickle over a socket pair between two processes of
the same service (nothing else writes to it). The conversation: ``Init`` -> ``Ready`` or ``Failed``, then
``Batch`` -> ``BatchDone`` (and now and then ``Check`` -> ``CheckResult``) for as long as the socket is open.
``Batch`` and ``BatchDone``, once per request, travel as plain tuples and are rebuilt on arrival: pickling
dataclasses and an enum costs several times as much (about 14 µs a request against 3, measured with ``timeit``).
"""

from __future__ import annotations

import enum
import pickle
import socket
import struct
from dataclasses import dataclass

import numpy as np

HEADER = struct.Struct("<Q")


class InputKind(enum.Enum):
    """What a request's payload is; the work process turns each into the model's input."""

    ENCODED = "encoded"  # image files, a list of bytes: decoded and preprocessed
    JSON = "json"  # a JSON body {"images": [28x28 arrays]}: parsed in the work process
    PIXELS = "pixels"  # N x 28 x 28 intensities in 0..1 (a list or an array): MNIST-style preprocessing
    NORMALIZED = "normalized"  # the network's own input [N, 1, 28, 28] float32: checked, not changed


@dataclass(frozen=True)
class Init:
    model_dir: str
    manifest: dict
    runtime: str
    limits: dict  # ServiceConfig.work_settings(): the settings a work process needs, no secrets


@dataclass(frozen=True)
class RuntimeInfo:
    """What a work process loaded: the runtime, its device, and the model file's sha256 from the bytes it read."""

    runtime: str
    device: str
    file: str
    sha256: str


@dataclass(frozen=True)
class Ready:
    info: RuntimeInfo
    checked: object = None  # the golden-set check it passed before reporting ready (a golden.CheckResult)


@dataclass(frozen=True)
class Failed:
    reason: str  # one line, shown to the operator at start-up


@dataclass(frozen=True)
class Job:
    """One request's work."""

    id: int
    kind: InputKind
    payload: object
    want_inputs: bool  # send back the 28x28 images the model saw
    declared: tuple[int, ...] | None  # ENCODED: the pixels each file's header declares (the price it was queued at)
    request_id: str = ""  # for the work process's log lines


@dataclass(frozen=True)
class Batch:
    id: int
    jobs: list[Job]


@dataclass(frozen=True)
class Done:
    """A request's answer: the model's log-probabilities per image, the 28x28 images the model saw (before
    normalization) if asked for, and when its preparation and its batch's model call ran (``time.time_ns()``:
    one clock for both processes), for the request's trace."""

    log_probs: np.ndarray
    inputs: np.ndarray | None
    prepare_start_ns: int
    prepare_end_ns: int
    model_start_ns: int
    model_end_ns: int
    batch_images: int  # images in the model call this request's images were part of
    digit_scores: np.ndarray | None = None  # the not-a-digit detector's score per image (service/model/detector.py)
    stats: np.ndarray | None = None  # [N, 4] float32 per image: service/inputs/stats.py (None: the network's own input)
    asked: bool = False  # the payload itself asked for ``inputs`` (a JSON body's "return_input": true)

    @property
    def prepare_s(self) -> float:
        return (self.prepare_end_ns - self.prepare_start_ns) / 1e9


@dataclass(frozen=True)
class BatchStats:
    model_images: int  # images in the model call (requests that failed preparation are not in it)
    decoded_images: int = 0  # image files whose pixels were decoded (or tried), for all requests of the batch
    decoded_pixels: int = 0
    cpu_ns: int = 0  # the CPU time the work process spent on the batch (all its threads), by its own clock
    units: int = 0  # the work it did, in units (``work_units``): what the price is learned from


# ---- the unit of work ----------------------------------------------------------------------------------------
# Both ends count work alike: the batcher prices a request before it runs from what it declares, the work process
# counts what it really did, and the price per unit is learned from the second (docs/performance.md).
MNIST_PIXELS = 28 * 28  # what an array image costs, against the pixels an image file's header declares
IMAGE_UNITS = 65_536  # an image's fixed cost in pixel units: 0.12 ms, at the 2 ns a pixel of a large PNG
JSON_BYTE_UNITS = 8  # parsing a byte of JSON costs about as much as 8 pixels of a PNG


def work_units(kind: InputKind, pixels: int, images: int, body_bytes: int = 0) -> int:
    """A request's work: the pixels of its images, a fixed cost per image, and the parsing of a JSON body."""
    return pixels + images * IMAGE_UNITS + (body_bytes * JSON_BYTE_UNITS if kind is InputKind.JSON else 0)


@dataclass(frozen=True)
class BatchDone:
    id: int
    answers: dict  # Job.id -> Done, or the RequestError that request ends in
    stats: BatchStats
    problem: str | None = None  # the model misbehaved (a non-finite output): one line; this process is not served


@dataclass(frozen=True)
class Check:
    """Run the golden set through the serving path now; the answer is a service.model.golden.CheckResult."""


# ---- framing -------------------------------------------------------------------------------------------------
_BATCH, _BATCH_DONE = 1, 2
_KINDS = {kind.value: kind for kind in InputKind}


def _to_wire(message):
    if type(message) is Batch:
        jobs = [(j.id, j.kind.value, j.payload, j.want_inputs, j.declared, j.request_id) for j in message.jobs]
        return (_BATCH, message.id, jobs)
    if type(message) is BatchDone:
        answers = {k: v if isinstance(v, Exception) else tuple(v.__dict__.values()) for k, v in message.answers.items()}
        return (_BATCH_DONE, message.id, answers, tuple(message.stats.__dict__.values()), message.problem)
    return message  # the others are sent once per process


def _from_wire(data):
    if type(data) is not tuple:
        return data
    if data[0] == _BATCH:
        return Batch(data[1], [Job(i, _KINDS[k], p, w, d, r) for i, k, p, w, d, r in data[2]])
    answers = {k: v if isinstance(v, Exception) else Done(*v) for k, v in data[2].items()}
    return BatchDone(data[1], answers, BatchStats(*data[3]), data[4])


def pack(message) -> bytes:
    data = pickle.dumps(_to_wire(message), protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


def send(sock: socket.socket, message) -> None:
    sock.sendall(pack(message))


def receive(sock: socket.socket):
    """The next message from a blocking socket, or None when the other end has closed."""
    header = _read_exactly(sock, HEADER.size)
    if header is None:
        return None
    data = _read_exactly(sock, HEADER.unpack(header)[0])
    return None if data is None else _from_wire(pickle.loads(data))


async def receive_async(loop, sock: socket.socket):
    """The next message from a non-blocking socket, on ``loop``; EOFError when the other end has closed."""
    (size,) = HEADER.unpack(await _read_async(loop, sock, HEADER.size))
    return _from_wire(pickle.loads(await _read_async(loop, sock, size)))


def _read_exactly(sock: socket.socket, n: int) -> bytearray | None:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return buf


async def _read_async(loop, sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = await loop.sock_recv_into(sock, view[got:])
        if k == 0:
            raise EOFError
        got += k
    return buf
