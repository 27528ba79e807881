"""A work process: ``python -m service.worker --fd N``, started by each HTTP worker (service/batcher.py).

It does every CPU-heavy step of a request, so that the HTTP worker's event loop only moves bytes and always
answers its health checks: decoding images and JSON, the MNIST-style preprocessing, and the model call. It
takes one batch at a time (the requests that queued while it was busy), prepares each request on its own (a
bad image fails only its own request), runs one model call for all of them, and sends the answers back.

A crash here (a decoder on a hostile file, say) costs only this process: the worker restarts it. The messages
on the socket are length-prefixed pickles between two processes of the same service; nothing else writes to it.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import time
import traceback
from dataclasses import dataclass

import numpy as np

from service import memory

HEADER = struct.Struct("<Q")
LARGE_DECODE_PIXELS = 4_000_000  # after decoding this much in one batch, give the freed memory back
log = logging.getLogger("service.worker")


# ---- framing, used by both ends ---------------------------------------------------------------------------
def pack(message) -> list[bytes]:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return [HEADER.pack(len(data)), data]


def send(sock: socket.socket, message) -> None:
    sock.sendall(b"".join(pack(message)))


def receive(sock: socket.socket):
    """The next message, or None when the other end has closed."""
    header = _read_exactly(sock, HEADER.size)
    if header is None:
        return None
    data = _read_exactly(sock, HEADER.unpack(header)[0])
    return None if data is None else pickle.loads(data)


def _read_exactly(sock: socket.socket, n: int) -> bytearray | None:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return buf


# ---- one batch -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Done:
    """A request's answer: the model's log-probabilities per image, and the 28x28 images the model saw (before
    normalization) if asked for."""

    log_probs: np.ndarray
    inputs: np.ndarray | None
    prepare_s: float


@dataclass(frozen=True)
class BatchStats:
    model_images: int  # images in the model call (requests that failed preparation are not in it)
    model_s: float
    decoded_images: int = 0  # image files whose pixels were decoded (or tried), for all requests of the batch
    decoded_pixels: int = 0


class Work:
    """The model and the settings a work process needs, loaded once."""

    def __init__(self, init: dict):
        from service.config import ServiceConfig
        from service.runtime import load_runtime

        self.limits = ServiceConfig(**init["limits"])
        self.mean, self.std = init["normalization"]["mean"], init["normalization"]["std"]
        threads = self.limits.threads_per_worker
        self.runtime = load_runtime(init["runtime"], init["model_dir"], init["manifest"], threads)
        self.runtime.log_probs(np.zeros((2, 1, 28, 28), dtype=np.float32))  # warm-up: first-call allocations
        self._warm_up_preprocessing()

    def _warm_up_preprocessing(self) -> None:
        """Import and run the decoding and preprocessing once before the first request: the imports alone took
        0.25 s here, and a first batch that slow taught the batcher a price per pixel that refused the first
        burst after start-up with 503s (the price then took tens of batches to come down)."""
        import io

        from PIL import Image

        from service.inputs import Counts, model_input

        stroke = Image.new("L", (28, 28))
        stroke.paste(255, (12, 5, 16, 23))
        buf = io.BytesIO()
        stroke.save(buf, format="PNG")
        counted = Counts.decoded_images, Counts.decoded_pixels
        model_input("encoded", [buf.getvalue()], self.limits, self.mean, self.std, [28 * 28])
        Counts.decoded_images, Counts.decoded_pixels = counted  # what clients sent, only

    def run(self, jobs: list[tuple]) -> tuple[dict, BatchStats]:
        """jobs: (job id, input kind, payload, want inputs, declared pixels) -> ({job id: Done or RequestError},
        stats)."""
        from service.errors import RequestError
        from service.inputs import Counts, model_input

        answers, ready, decoded_before, pixels_before = {}, [], Counts.decoded_images, Counts.decoded_pixels
        for job_id, kind, payload, want_inputs, declared in jobs:
            start = time.perf_counter()
            try:
                x, seen = model_input(kind, payload, self.limits, self.mean, self.std, declared)
                ready.append((job_id, x, seen if want_inputs else None, time.perf_counter() - start))
            except RequestError as exc:  # a fresh copy: the raised one's traceback holds the decoded images
                answers[job_id] = RequestError(exc.status, exc.reason, exc.message, exc.retry_after)
            except Exception:  # noqa: BLE001 - a bug, not the client's input: logged, answered 500
                log.error("preparing a request failed:\n%s", traceback.format_exc())
                answers[job_id] = RequestError(500, "internal", "the server failed to prepare this request")
        decoded = (Counts.decoded_images - decoded_before, Counts.decoded_pixels - pixels_before)
        if not ready:
            return answers, BatchStats(0, 0.0, *decoded)
        start = time.perf_counter()
        images = np.concatenate([x for _, x, _, _ in ready])
        try:
            log_probs = self.runtime.log_probs(images)
        except Exception:  # noqa: BLE001 - the runtime failed: every request of the batch gets a 500
            log.error("the model call failed:\n%s", traceback.format_exc())
            failed = RequestError(500, "internal", "the model failed on this batch")
            return {**answers, **{job_id: failed for job_id, *_ in ready}}, BatchStats(0, 0.0, *decoded)
        stats = BatchStats(len(images), time.perf_counter() - start, *decoded)
        offset = 0
        for job_id, x, seen, prepare_s in ready:
            answers[job_id] = Done(log_probs[offset : offset + len(x)].copy(), seen, prepare_s)
            offset += len(x)
        return answers, stats


def _die_with_parent() -> None:
    try:  # Linux: SIGKILL when the HTTP worker that started us dies, however it dies
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def serve(sock: socket.socket) -> int:
    init = receive(sock)
    if init is None:
        return 0
    from service.model_files import ModelFileError

    try:
        work = Work(init)
    except ModelFileError as exc:  # reported to the worker, which stops start-up with it
        send(sock, ("failed", str(exc)))
        return 1
    except Exception as exc:  # noqa: BLE001 - the same, for what the runtime raises on its own
        send(sock, ("failed", f"{type(exc).__name__}: {str(exc).strip()[:300]}"))
        return 1
    runtime = work.runtime
    info = {"runtime": runtime.name, "device": runtime.device, "file": runtime.file, "sha256": runtime.sha256}
    send(sock, ("ready", info))
    while (message := receive(sock)) is not None:
        _, batch_id, jobs = message
        answers, stats = work.run(jobs)
        send(sock, ("done", batch_id, answers, stats))
        del jobs, message, answers  # nothing of this batch outlives it
        if stats.decoded_pixels > LARGE_DECODE_PIXELS or stats.model_images > 1024:
            memory.release()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.worker", description=__doc__.splitlines()[0])
    p.add_argument("--fd", type=int, required=True, help="the socket to the HTTP worker")
    args = p.parse_args(argv)
    # The HTTP worker decides when we stop (it closes the socket once its requests are answered): a Ctrl-C or a
    # SIGTERM sent to the whole process group must not cut the requests in progress.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    memory.fix_mmap_threshold()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [%(levelname)s] [work:{os.getpid()}] %(message)s")
    with socket.socket(fileno=args.fd) as sock:
        try:
            return serve(sock)
        except (BrokenPipeError, ConnectionResetError):
            return 0


if __name__ == "__main__":
    # Run from the imported module, so that what the answers pickle refers to is service.worker.Done, which
    # the HTTP worker can find, and not __main__.Done.
    from service.worker import main as worker_main

    sys.exit(worker_main())
