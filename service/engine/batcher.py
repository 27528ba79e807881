"""The one batcher every predict path goes through, feeding its work processes.

Dynamic batching with no queue delay, as Triton's dynamic batcher does it: a request goes to a work process at
once when one is idle; requests that arrive while every process is busy queue, and the next process to finish
takes all of them (up to ``max_batch_size`` images and one request's pixel budget) as one batch.

The queue is bounded in images and in estimated seconds of work. A request's work is counted in units: the
pixels its images declare (service/inputs/image_size.py; 28x28 for arrays) plus a fixed ``IMAGE_UNITS`` per
image; recent batches give the seconds per unit. Past either bound a request is refused at once with 503 and
Retry-After. Why pixels and this fixed cost: docs/performance.md.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from service.engine.messages import Batch, Done, Init, InputKind, Job
from service.engine.process import WorkerFailed, WorkProcess
from service.errors import RequestError, overloaded
from service.inputs.image_size import declared_pixels

log = logging.getLogger("service.engine")
MNIST_PIXELS = 28 * 28  # what an array input costs, against the pixels an image file declares
START_TRIES = 3  # failed starts of a replacement before requests stop waiting for it
IMAGE_UNITS = 65_536  # an image's fixed cost in pixel units: 0.12 ms, at the 2 ns a pixel of a large PNG


@dataclass
class Timeline:
    """When a request entered the queue and left it for a work process (``time.time_ns()``): filled in for a
    caller that traces its requests."""

    queued_ns: int = 0
    dispatched_ns: int = 0


@dataclass
class Pending:
    job: Job
    images: int  # its weight in the image bounds (an upper bound where the payload is not parsed yet)
    pixels: int  # the pixels its images declare: its weight in the batch's pixel bound
    units: int  # its estimated work: pixels + IMAGE_UNITS per image
    future: asyncio.Future
    timeline: Timeline | None = None
    at_once: bool = False


@dataclass
class Counters:
    """What the batcher did, for tests and metrics: counts, never timings."""

    batches: int = 0
    at_once: int = 0  # requests that found a process idle and went to it without waiting
    queued: int = 0  # requests that waited for a process to finish its batch
    refused: int = 0  # requests refused because the queue was full
    abandoned: int = 0  # requests dropped before they ran: their clients had gone
    restarts: int = 0
    last_batch: list[int] = field(default_factory=list)  # images per request in the latest batch


class Batcher:
    def __init__(self, start: Callable[[], WorkProcess], processes: int, config, metrics=None):
        self.start, self.config, self.metrics = start, config, metrics
        self.processes = [start() for _ in range(processes)]  # blocking: runs at service start-up
        self.info = self.processes[0].info  # what the work processes loaded (every one loads the same files)
        self.idle: deque[WorkProcess] = deque(self.processes)
        self.queue: deque[Pending] = deque()
        self.admitted = 0  # images admitted and not answered yet: queued or in a batch
        self.admitted_units = 0  # and their estimated work (see the module's docstring)
        self.seconds_per_unit = 0.0  # a moving average over recent batches, for the queue's depth in time
        self.counters = Counters()
        self.closing = False
        self.restarting = 0  # replacements being started: requests wait for them rather than being refused
        self.start_failed = False  # the latest start of a replacement failed: refuse until one is up
        self._ids = itertools.count()
        self._tasks: set[asyncio.Task] = set()

    @property
    def ready(self) -> bool:
        return bool(self.processes) and not self.closing

    def state(self) -> dict:
        """Now, on this worker: for /model_info and for tests that must wait for a state, not a time."""
        c = self.counters
        return {
            "processes": len(self.processes),
            "busy_processes": len(self.processes) - len(self.idle),
            "queued_requests": len(self.queue),
            "admitted_images": self.admitted,
            "admitted_units": self.admitted_units,
            "queued_seconds": round(self._queued_seconds(0), 3),
            "seconds_per_unit": self.seconds_per_unit,
            "counters": {k: v for k, v in vars(c).items() if k != "last_batch"},
        }

    async def submit(
        self,
        kind: InputKind,
        payload,
        images: int,
        want_inputs: bool = False,
        request_id: str = "",
        timeline: Timeline | None = None,
    ) -> Done:
        """The work process's answer for one request of at most ``images`` images, or the RequestError it
        ends in."""
        if not self.processes and (not self.restarting or self.start_failed):
            raise RequestError(503, "unavailable", "no work process is running; retry later", self.config.retry_after_s)
        declared = None
        if kind is InputKind.ENCODED:  # what each header says; the work process refuses a file that decodes larger
            declared = tuple(declared_pixels(data, self.config.max_image_pixels) for data in payload)
        pixels = images * MNIST_PIXELS if declared is None else sum(declared)
        units = pixels + images * IMAGE_UNITS
        self._admit(images, units)
        future = asyncio.get_running_loop().create_future()
        job = Job(next(self._ids), kind, payload, want_inputs, declared, request_id)
        pending = Pending(job, images, pixels, units, future, timeline)
        if timeline is not None:
            timeline.queued_ns = time.time_ns()
        self.admitted += images
        self.admitted_units += units
        self.queue.append(pending)
        self._dispatch()
        pending.at_once = not self.queue or self.queue[-1] is not pending  # already on its way to a process
        self.counters.at_once += pending.at_once
        self.counters.queued += not pending.at_once
        try:
            return await pending.future
        finally:
            self.admitted -= images
            self.admitted_units -= units

    def _queued_seconds(self, more_units: int) -> float:
        return (self.admitted_units + more_units) * self.seconds_per_unit / max(1, len(self.processes))

    def _admit(self, images: int, units: int) -> None:
        """Refuse at once what would pass the queue's bound in images or in estimated seconds of work."""
        if not self.admitted:
            return  # an idle worker takes any request the per-request limits allow
        config = self.config
        wait_s = self._queued_seconds(units)
        if self.admitted + images > config.max_queue_images:
            problem = f"{self.admitted} images are queued on this worker and the limit is {config.max_queue_images}"
        elif wait_s > config.max_queue_s:
            problem = f"this worker has about {wait_s:.1f} s of work queued and the limit is {config.max_queue_s:g} s"
        else:
            return
        self.counters.refused += 1
        raise overloaded(problem, max(config.retry_after_s, math.ceil(min(wait_s, config.max_queue_s))))

    def _dispatch(self) -> None:
        while self.idle and self.queue:
            if self.idle[0].proc.poll() is not None:  # it died while idle: the batch waits for its replacement
                self._replace(self.idle.popleft())
                continue
            batch = self._take()
            if batch:
                task = asyncio.get_running_loop().create_task(self._run(self.idle.popleft(), batch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[Pending]:
        """Queued requests in order, up to the batch bounds (at least one request): ``max_batch_size`` images,
        and as many pixels as one request may decode, so that no batch holds more than a maximal request's
        work and legal requests never add up to a batch that runs past the work timeout."""
        batch, images, pixels = [], 0, 0
        while self.queue:
            pending = self.queue[0]
            if pending.future.done():  # its client went away: nobody to answer, nothing to run
                self.queue.popleft()
                self.counters.abandoned += 1
                if self.metrics is not None:
                    self.metrics.abandoned.inc()
                continue
            full = images + pending.images > self.config.max_batch_size
            full |= pixels + pending.pixels > self.config.max_request_pixels
            if batch and (not self.config.batching or full):
                break
            batch.append(self.queue.popleft())
            images += pending.images
            pixels += pending.pixels
        return batch

    async def _run(self, process: WorkProcess, batch: list[Pending]) -> None:
        self.counters.batches += 1
        self.counters.last_batch = [p.images for p in batch]
        started = time.perf_counter()
        for pending in batch:
            if pending.timeline is not None:
                pending.timeline.dispatched_ns = time.time_ns()
        try:
            done = await asyncio.wait_for(
                process.run(Batch(next(self._ids), [p.job for p in batch])), self.config.work_timeout_s
            )
        except (TimeoutError, WorkerFailed, OSError) as exc:
            reason = f"ran past {self.config.work_timeout_s:g} s" if isinstance(exc, asyncio.TimeoutError) else exc
            self._learn_price(time.perf_counter() - started, sum(p.units for p in batch), at_least=True)
            log.error("work process %s failed on a batch of %d requests: %s", process.proc.pid, len(batch), reason)
            self._fail(
                batch,
                RequestError(
                    503,
                    "unavailable",
                    "the work process handling this request failed and was restarted; retry",
                    self.config.retry_after_s,
                ),
            )
            self._replace(process)
            return
        except Exception:  # a bug on our side of the socket: answer, and start from a clean process
            log.exception("a batch of %d requests failed", len(batch))
            self._fail(batch, RequestError(500, "internal", "the server failed to process this request"))
            self._replace(process)
            return
        seconds = time.perf_counter() - started
        # priced on the requests that were served: a refused one cost little whatever it declared, and counting
        # its units would let cheap refusals (truncated files declaring 25 megapixels) talk the price down
        answers = done.answers
        self._learn_price(seconds, sum(p.units for p in batch if not isinstance(answers[p.job.id], Exception)))
        if self.metrics is not None:
            self.metrics.observe_batch(done.stats, seconds)
        for pending in batch:
            answer = answers[pending.job.id]
            if not pending.future.done():
                if isinstance(answer, Exception):
                    pending.future.set_exception(answer)
                else:
                    pending.future.set_result(answer)
        self.idle.append(process)
        self._dispatch()

    def _learn_price(self, seconds: float, units: int, at_least: bool = False) -> None:
        """The seconds per unit of work: a moving average over batches (none learned from a batch with no units).
        ``at_least``: a batch that failed part way (a crash, the timeout) only ever raises the price."""
        if units:
            per_unit = seconds / units
            if at_least and per_unit <= self.seconds_per_unit:
                return
            previous = self.seconds_per_unit or per_unit
            self.seconds_per_unit = 0.8 * previous + 0.2 * per_unit

    def _fail(self, batch: list[Pending], error: RequestError) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(error)

    def _replace(self, dead: WorkProcess) -> None:
        """Start a replacement for a process that died or hung. Only the batch it held has failed: requests
        queued meanwhile, and those that come while it starts, wait for it (within the queue's bounds)."""
        dead.close(kill=True)
        self.processes.remove(dead)
        self.counters.restarts += 1
        if self.metrics is not None:
            self.metrics.restarts.inc()
        self.restarting += 1
        task = asyncio.get_running_loop().create_task(self._restart(dead))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart(self, dead: WorkProcess) -> None:
        """Start a replacement; on failure try again at once, then after 0.5 s, 1 s, ... up to 30 s. Requests
        wait for it through the first START_TRIES failures (a replacement killed while it starts, say); past
        them, the queue and new requests are refused until a process is up."""
        delay, failures = 0.0, 0
        try:
            await asyncio.to_thread(dead.proc.wait)  # reaped (it was killed), so that no zombie is left
            while not self.closing:
                try:
                    process = await asyncio.to_thread(self.start)
                except (WorkerFailed, OSError) as exc:  # OSError: no process could be made (file descriptors, ...)
                    failures += 1
                    log.error("restarting a work process failed (%s); next try in %.1f s", exc, delay)
                    if failures >= START_TRIES:
                        self.start_failed = True
                        if not self.processes:  # nobody left to run the queue, and no replacement soon: refuse it
                            error = RequestError(
                                503, "unavailable", "no work process could be started; retry", self.config.retry_after_s
                            )
                            self._fail(list(self.queue), error)
                            self.queue.clear()
                    await asyncio.sleep(delay)
                    delay = min(max(2 * delay, 0.5), 30)
                    continue
                if self.closing:
                    process.close()
                    return
                self.start_failed = False
                self.processes.append(process)
                self.idle.append(process)
                self._dispatch()
                return
        finally:
            self.restarting -= 1

    def close(self) -> None:
        """Let each process finish its batch and exit."""
        self.closing = True
        for process in self.processes:
            process.close()
        for process in self.processes:
            try:
                process.proc.wait(timeout=self.config.work_timeout_s)
            except subprocess.TimeoutExpired:
                process.proc.kill()


def start_batcher(model_dir, manifest: dict, config, metrics=None) -> Batcher:
    """The batcher for one HTTP worker, with ``config.work_procs`` work processes serving the exported model
    in ``model_dir``. Blocks until they are ready; raises WorkerFailed with the reason when one cannot start."""
    init = Init(str(model_dir), manifest, config.runtime, config.work_settings())
    return Batcher(lambda: WorkProcess(init), config.work_procs, config, metrics)
