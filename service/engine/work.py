"""A work process: ``python -m service.engine.work --fd N``, started by each HTTP worker (service/engine/process.py).

It does every CPU-heavy step of a request, so that the HTTP worker's event loop only moves bytes and always
answers its health checks: decoding images and JSON, the MNIST-style preprocessing, and the model call. It
takes one batch at a time, prepares each request on its own (a bad image fails only its own request), runs one
model call for all of them, and sends the answers back. A crash here costs only this process: the worker
restarts it.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import signal
import socket
import sys
import time
import traceback

import numpy as np

from service import linux
from service.engine.messages import (
    MNIST_PIXELS,
    Batch,
    BatchDone,
    BatchStats,
    Check,
    Done,
    Failed,
    Init,
    InputKind,
    Job,
    Ready,
    RuntimeInfo,
    receive,
    send,
    work_units,
)
from service.inputs.stats import input_stats

LARGE_DECODE_PIXELS = 4_000_000  # after decoding this much in one batch, give the freed memory back
# The CPU a request of image files may spend being decoded: this much, plus this much per pixel its headers declare
# (4x the dearest pixel measured here). A file crafted to be costly to parse for its size (a small JPEG padded with
# megabytes of marker bytes, a PNG of thousands of empty chunks) is stopped there instead of taking seconds.
DECODE_BUDGET_S = 0.25
DECODE_BUDGET_PER_PIXEL_S = 100e-9


class OverCpuBudget(BaseException):
    """Raised by the profiling timer in the middle of a request's decoding (BaseException: no ``except
    Exception`` of a decoder may take it for a bad file and go on)."""


class _CpuBudget:
    """A profiling timer (CPU time of this process) that interrupts Python code past a budget; only in the main
    thread, where signal handlers run (elsewhere it does nothing)."""

    armed = False
    installed = False

    @classmethod
    def install(cls) -> None:
        import threading

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGPROF, cls._expired)
            cls.installed = True

    @classmethod
    def _expired(cls, signum, frame) -> None:
        if cls.armed:  # a signal that arrives after disarm() is ignored
            cls.armed = False
            raise OverCpuBudget

    @classmethod
    def arm(cls, seconds: float) -> None:
        if cls.installed:
            cls.armed = True
            signal.setitimer(signal.ITIMER_PROF, seconds)

    @classmethod
    def disarm(cls) -> None:
        cls.armed = False
        if cls.installed:
            signal.setitimer(signal.ITIMER_PROF, 0)


log = logging.getLogger("service.work")


def model_input(
    kind: InputKind, payload, limits, mean: float, std: float, declared: tuple[int, ...] | None = None
) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """One request's payload -> (the model's input [N, 1, 28, 28], the 28x28 images in 0..1 it was made from,
    whether the payload itself asks for those images back: a JSON body's ``"return_input": true``)."""
    from service.inputs import decode
    from service.inputs.preprocess import normalize

    asked = False
    if kind is InputKind.NORMALIZED:
        return decode.checked_network_input(payload, limits), None, False
    if kind is InputKind.ENCODED:
        images = decode.encoded_to_mnist(payload, limits, declared)
    elif kind is InputKind.JSON:
        pixels, asked = decode.json_images(payload)
        images = decode.pixels_to_mnist(pixels, limits)
    elif kind is InputKind.PIXELS:
        images = decode.pixels_to_mnist(payload, limits)
    else:
        raise ValueError(f"unknown input kind {kind!r}")
    return normalize(images, mean, std), images, asked


class Work:
    """The model and the settings a work process needs, loaded once."""

    def __init__(self, init: Init):
        from service.config import ServiceConfig
        from service.model import golden
        from service.model.files import REEXPORT, ModelFileError, read_entry
        from service.model.runtime import Detector, load_runtime

        self.limits = ServiceConfig(**init.limits)
        manifest = init.manifest
        normalization = manifest["normalization"]
        self.mean, self.std = normalization["mean"], normalization["std"]
        self.temperature = (manifest.get("calibration") or {}).get("temperature")
        threads = self.limits.threads_per_worker
        self.runtime = load_runtime(init.runtime, init.model_dir, manifest, threads)
        self.detector = Detector(init.model_dir, manifest, threads)
        _, raw, _ = read_entry(init.model_dir, manifest["golden"])
        try:
            self.golden = golden.Golden.parse(raw)
        except golden.GoldenError as exc:
            raise ModelFileError(f"{init.model_dir}/{manifest['golden']['file']}: {exc}; {REEXPORT}") from None
        _, channels, side, _ = manifest["input"]["shape"]
        out = self.runtime.log_probs(np.zeros((2, channels, side, side), dtype=np.float32))  # warm-up, and the spec
        if out.shape != (2, manifest["output"]["shape"][-1]):
            raise ModelFileError(
                f"{self.runtime.file} answers a batch of 2 with shape {list(out.shape)}, the manifest says "
                f"{manifest['output']['shape']}; {REEXPORT}"
            )
        _CpuBudget.install()
        self._warm_up_preprocessing()
        self.checked = checked = self.check()
        if checked.problem:
            raise ModelFileError(f"the golden-set check failed: {checked.problem}; {REEXPORT}")
        log.info("golden set: %d inputs match the export (max difference %.3g)", checked.inputs, checked.max_diff)

    def check(self):
        """The golden set through this process's serving path, as a request's images go, at the default limits
        (a CheckResult): the golden set is the export's, not a request, and an operator's tighter request limits
        must not refuse it."""
        from service.config import ServiceConfig
        from service.inputs.decode import Counts

        limits = ServiceConfig()
        from service.model.golden import compare

        start, counted = time.perf_counter(), (Counts.decoded_images, Counts.decoded_pixels)
        try:
            x = np.concatenate(
                [model_input(InputKind.ENCODED, [g.data], limits, self.mean, self.std)[0] for g in self.golden.inputs]
            )
            result = compare(
                self.golden,
                self.runtime.log_probs(x),
                self.detector.scores(x),
                self.temperature,
                self.detector.threshold,
            )
        except Exception as exc:  # noqa: BLE001 - a golden file the path now refuses, a runtime error: the same verdict
            from service.model.golden import CheckResult

            result = CheckResult(f"the serving path failed on the golden set ({type(exc).__name__}: {exc})"[:300], 0, 0)
        finally:
            Counts.decoded_images, Counts.decoded_pixels = counted
        return type(result)(result.problem, result.max_diff, result.inputs, time.perf_counter() - start)

    @property
    def info(self) -> RuntimeInfo:
        r = self.runtime
        return RuntimeInfo(r.name, r.device, r.file, r.sha256)

    def _warm_up_preprocessing(self) -> None:
        """Import and run the decoding and preprocessing once before the first request: a slow first batch
        would teach the batcher a price that refuses the first burst after start-up (docs/performance.md)."""
        from PIL import Image

        from service.inputs.decode import Counts

        stroke = Image.new("L", (28, 28))
        stroke.paste(255, (12, 5, 16, 23))
        buf = io.BytesIO()
        stroke.save(buf, format="PNG")
        counted = Counts.decoded_images, Counts.decoded_pixels
        model_input(InputKind.ENCODED, [buf.getvalue()], self.limits, self.mean, self.std, (28 * 28,))
        Counts.decoded_images, Counts.decoded_pixels = counted  # what clients sent, only

    def run(self, batch: Batch) -> BatchDone:
        from service.errors import RequestError
        from service.inputs.decode import Counts

        cpu_start = time.process_time_ns()
        answers, ready, decoded_before, pixels_before = {}, [], Counts.decoded_images, Counts.decoded_pixels
        units = 0
        for job in batch.jobs:
            start, pixels, images = time.time_ns(), Counts.loaded_pixels, Counts.loaded_images
            prepared = self._prepare(job)
            if isinstance(prepared, Exception):
                answers[job.id] = prepared
            else:
                ready.append((job, *prepared, start, time.time_ns()))
            units += self._units(job, prepared, Counts.loaded_pixels - pixels, Counts.loaded_images - images)
        decoded = {
            "decoded_images": Counts.decoded_images - decoded_before,
            "decoded_pixels": Counts.decoded_pixels - pixels_before,
        }
        if not ready:
            return BatchDone(batch.id, answers, self._stats(0, decoded, cpu_start, units))
        images = np.concatenate([x for _, x, *_ in ready])
        model_start = time.time_ns()
        try:
            log_probs = self.runtime.log_probs(images)
            digit_scores = self.detector.scores(images)
        except Exception:  # noqa: BLE001 - the runtime failed: every request of the batch gets a 500
            ids = ", ".join(job.request_id for job, *_ in ready)
            log.error("the model call failed (requests %s):\n%s", ids, traceback.format_exc())
            failed = _internal("the model failed on this batch")
            stats = self._stats(0, decoded, cpu_start, units)
            return BatchDone(batch.id, {**answers, **{job.id: failed for job, *_ in ready}}, stats)
        model_end = time.time_ns()
        inputs = _input_stats([seen for _, _, seen, *_ in ready])
        stats = self._stats(len(images), decoded, cpu_start, units)
        finite = np.isfinite(log_probs).all(axis=1) & np.isfinite(digit_scores)
        offset, problem = 0, None
        for (job, x, seen, wanted, asked, start, end), own in zip(ready, inputs, strict=True):
            rows = slice(offset, offset + len(x))
            offset += len(x)
            if finite[rows].all() or job.kind is InputKind.NORMALIZED:  # the network's own input: the client's
                # values may be too large for float32, and its adapter answers that with a 400
                answers[job.id] = Done(
                    log_probs[rows].copy(),
                    seen if wanted else None,
                    start,
                    end,
                    model_start,
                    model_end,
                    len(images),
                    digit_scores[rows],
                    own,
                    asked,
                )
            else:  # images in 0..1, normalized by the manifest's constants: the model itself is broken
                problem = problem or f"the model's output is not finite for request {job.request_id or job.id}"
                answers[job.id] = RequestError(
                    503, "unavailable", "the model's output is not finite; this worker stops serving it; retry"
                )
        if problem:
            log.error("%s: this work process reports itself unfit to serve", problem)
        return BatchDone(batch.id, answers, stats, problem)

    @staticmethod
    def _units(job: Job, prepared, loaded_pixels: int, loaded_images: int) -> int:
        """The work a request really did, whatever its headers declared: the pixels of the files it decoded in
        full (the batcher priced a header it could not read at the maximum; a truncated file did no such work),
        or its arrays; and its JSON."""
        if job.kind is InputKind.ENCODED:
            return work_units(job.kind, loaded_pixels, loaded_images)
        failed = isinstance(prepared, Exception)
        images = 0 if failed else len(prepared[0])
        body = len(job.payload) if job.kind is InputKind.JSON and not failed else 0  # a body refused at its first
        # byte did no parsing work: counting its bytes would let invalid JSON talk the price down
        return work_units(job.kind, images * MNIST_PIXELS, images, body)

    @staticmethod
    def _stats(model_images: int, decoded: dict, cpu_start: int, units: int) -> BatchStats:
        return BatchStats(model_images, **decoded, cpu_ns=time.process_time_ns() - cpu_start, units=units)

    def _prepare(self, job: Job):
        """(the model's input, the 28x28 images it was made from (None for the network's own input), whether they
        go back with the answer, whether the payload itself asked for that), or the RequestError the request ends
        in."""
        from service.errors import RequestError

        budget = None
        if job.kind is InputKind.ENCODED and job.declared is not None:
            budget = DECODE_BUDGET_S + DECODE_BUDGET_PER_PIXEL_S * sum(job.declared)
        try:
            if budget is not None:
                _CpuBudget.arm(budget)
            try:
                x, seen, asked = model_input(job.kind, job.payload, self.limits, self.mean, self.std, job.declared)
            finally:
                _CpuBudget.disarm()
            return x, seen, job.want_inputs or asked, asked
        except OverCpuBudget:
            return RequestError(
                413,
                "over_budget",
                f"decoding the request's images took more than {budget:.2f} s of CPU, far more than images of their "
                "declared size take; re-save them with an image editor or library",
            )
        except RequestError as exc:  # a fresh copy: the raised one's traceback holds the decoded images
            return RequestError(exc.status, exc.reason, exc.message, exc.retry_after)
        except Exception:  # noqa: BLE001 - a bug, not the client's input: logged, answered 500
            log.error("preparing request %s failed:\n%s", job.request_id or job.id, traceback.format_exc())
            return _internal("the server failed to prepare this request")


def _input_stats(images: list) -> list:
    """Each request's input statistics (service/inputs/stats.py) for drift monitoring, computed in one pass over
    the batch's images; None for a request of the network's own input."""
    present = [seen for seen in images if seen is not None]
    if not present:
        return [None] * len(images)
    stats = input_stats(np.concatenate(present))
    out, offset = [], 0
    for seen in images:
        out.append(None if seen is None else stats[offset : offset + len(seen)])
        offset += 0 if seen is None else len(seen)
    return out


def _internal(message: str):
    from service.errors import RequestError

    return RequestError(500, "internal", message)


def serve(sock: socket.socket) -> int:
    init = receive(sock)
    if init is None:
        return 0
    from service.model.files import ModelFileError

    if init.limits.get("work_batch_scheduling", True):  # before any thread starts: they inherit the policy
        linux.batch_scheduling()
    try:
        work = Work(init)
    except ModelFileError as exc:  # reported to the worker, which stops start-up with it
        send(sock, Failed(str(exc)))
        return 1
    except Exception as exc:  # noqa: BLE001 - the same, for what the runtime raises on its own
        send(sock, Failed(f"{type(exc).__name__}: {str(exc).strip()[:300]}"))
        return 1
    send(sock, Ready(work.info, work.checked))
    while (batch := receive(sock)) is not None:
        if type(batch) is Check:
            send(sock, work.check())
            continue
        done = work.run(batch)
        send(sock, done)
        stats = done.stats
        del batch, done  # nothing of this batch outlives it
        if stats.decoded_pixels > LARGE_DECODE_PIXELS or stats.model_images > 1024:
            linux.release()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.engine.work", description=__doc__.splitlines()[0])
    p.add_argument("--fd", type=int, required=True, help="the socket to the HTTP worker")
    args = p.parse_args(argv)
    # The HTTP worker decides when we stop (it closes the socket once its requests are answered): a Ctrl-C or a
    # SIGTERM sent to the whole process group must not cut the requests in progress.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    linux.on_parent_death(signal.SIGKILL)
    linux.fix_mmap_threshold(linux.WORK_MMAP_THRESHOLD, linux.WORK_TRIM_THRESHOLD)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [%(levelname)s] [work:{os.getpid()}] %(message)s")
    with socket.socket(fileno=args.fd) as sock:
        try:
            return serve(sock)
        except (BrokenPipeError, ConnectionResetError):
            return 0


if __name__ == "__main__":
    # Run from the imported module, so that the classes the messages pickle are service.engine.work's imports,
    # not __main__'s.
    from service.engine.work import main as work_main

    sys.exit(work_main())
