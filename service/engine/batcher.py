"""The one batcher every predict path goes through, feeding its work processes.

Dynamic batching with no queue delay, as Triton's dynamic batcher does it: a request goes to a work process at
once when one is idle; requests that arrive while every process is busy queue, and the next process to finish
takes all of them (up to ``max_batch_size`` images and one request's pixel budget) as one batch. A request far
smaller than the average admitted one queues ahead of the larger ones.

The queue is bounded in images and in estimated seconds of work. A request's work is counted in units
(``work_units`` in service/engine/messages.py): the pixels its images declare (service/inputs/image_size.py;
28x28 for arrays), a fixed cost per image, and a JSON body's bytes. The price of a unit is learned from the CPU
time the work processes measure for the work they really did, never from what a request declared (a header
cannot talk it down). Past either bound a request is refused at once with 503 and Retry-After.

Express processes (``express_procs``) take only small requests, and only while every other process runs a
long batch: a lone small request never waits behind a 64-megapixel upload. Why: docs/performance.md.
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

from service.engine.messages import MNIST_PIXELS, Batch, Done, Init, InputKind, Job, work_units
from service.engine.process import WorkerFailed, WorkProcess
from service.errors import RequestError, overloaded
from service.inputs.image_size import declared_pixels

log = logging.getLogger("service.engine")
START_TRIES = 3  # failed starts of a replacement before requests stop waiting for it
EXPRESS_MAX_S = 0.02  # a request estimated at most this long may go to an express process
EXPRESS_AFTER_S = 0.25  # ... once every other process runs a batch estimated at least this long
# Past the bound in seconds, a request this many times smaller than the average admitted one may still come in, up
# to this share of the bound in all: a lone small request is not shut out by a crowd of large ones resending at once
FAR_SMALLER = 8
OVERDRAFT_SHARE = 0.2
# The price before any batch has taught one: the dearest per unit measured here (an RGBA PNG decodes at about
# 26 ns a pixel), so that the first burst after a start is bounded in seconds, not only in images
PRIOR_SECONDS_PER_UNIT = 2.5e-8


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
    units: int  # its estimated work (``work_units``)
    future: asyncio.Future
    timeline: Timeline | None = None
    at_once: bool = False
    ahead: bool = False  # queued ahead of the larger requests (``Batcher._enqueue``)
    dispatched: bool = False  # handed to a work process


@dataclass
class Counters:
    """What the batcher did, for tests and metrics: counts, never timings."""

    batches: int = 0
    at_once: int = 0  # requests that found a process idle and went to it without waiting
    queued: int = 0  # requests that waited for a process to finish its batch
    refused: int = 0  # requests refused because the queue was full
    express: int = 0  # requests an express process ran
    abandoned: int = 0  # requests dropped before they ran: their clients had gone
    restarts: int = 0
    last_batch: list[int] = field(default_factory=list)  # images per request in the latest batch


class Batcher:
    def __init__(self, start: Callable[[], WorkProcess], processes: int, config, metrics=None, express: int = 0):
        self.start, self.config, self.metrics = start, config, metrics
        self.processes = [start() for _ in range(processes + express)]  # blocking: runs at service start-up
        self.express = set(self.processes[processes:])  # kept for small requests (see the module's docstring)
        self.info = self.processes[0].info  # what the work processes loaded (every one loads the same files)
        self.idle: deque[WorkProcess] = deque(self.processes[:processes])
        self.idle_express: deque[WorkProcess] = deque(self.processes[processes:])
        self.running: dict[WorkProcess, int] = {}  # busy process -> its batch's units
        self.queue: deque[Pending] = deque()
        self.admitted = 0  # images admitted and not answered yet: queued or in a batch
        self.admitted_units = 0  # and their estimated work (see the module's docstring)
        self.small_units = 0  # the part of it an express process may take
        self.overdraft_units = 0  # the part of it admitted past the bounds (FAR_SMALLER)
        self.overdraft_images = 0
        self.requests = 0  # requests admitted and not answered yet
        self.seconds_per_unit = PRIOR_SECONDS_PER_UNIT  # CPU seconds: a moving average over recent batches
        self.learned = False  # whether a batch has set the price yet
        # the wall time batches took, and their CPU time, moving averages: how much longer than its CPU a batch
        # runs when the cores are shared (uploads read, other processes' batches), for ``_all_long``
        self.batch_wall_s = self.batch_cpu_s = 0.0
        self.counters = Counters()
        self.closing = False
        self.restarting = 0  # replacements being started: requests wait for them rather than being refused
        self.start_failed = False  # the latest start of a replacement failed: refuse until one is up
        self._ids = itertools.count()
        self._tasks: set[asyncio.Task] = set()
        # the golden set (service/model/golden.py): processes to check before their next batch, and the first
        # failure of a check or of the model's output, which makes this worker unready for good
        self.check_due: set[WorkProcess] = set()
        self.problem: str | None = None
        for process in self.processes:
            self._observe_check(process.checked)

    @property
    def ready(self) -> bool:
        return bool(self.processes) and not self.closing and self.problem is None

    def state(self) -> dict:
        """Now, on this worker: for /model_info and for tests that must wait for a state, not a time."""
        c = self.counters
        return {
            "processes": len(self.processes),
            "express_processes": len(self.express),
            "busy_processes": len(self.running),
            "queued_requests": len(self.queue),
            "admitted_images": self.admitted,
            "admitted_units": self.admitted_units,
            "queued_seconds": round(self._queued_seconds(0), 3),
            "seconds_per_unit": self.seconds_per_unit,
            "wall_over_cpu": round(self.stretch(), 2),
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
        units = work_units(kind, pixels, images, len(payload) if kind is InputKind.JSON else 0)
        small = self._small(units)
        overdraft = self._admit(images, units, small)
        future = asyncio.get_running_loop().create_future()
        job = Job(next(self._ids), kind, payload, want_inputs, declared, request_id)
        pending = Pending(job, images, pixels, units, future, timeline, ahead=self._far_smaller(units))
        if timeline is not None:
            timeline.queued_ns = time.time_ns()
        self.admitted += images
        self.admitted_units += units
        self.small_units += units if small else 0
        self.overdraft_units += units if overdraft else 0
        self.overdraft_images += images if overdraft else 0
        self.requests += 1
        self._enqueue(pending)
        self._dispatch()
        pending.at_once = pending.dispatched  # already on its way to a process
        self.counters.at_once += pending.at_once
        self.counters.queued += not pending.at_once
        try:
            return await pending.future
        finally:
            self.admitted -= images
            self.admitted_units -= units
            self.small_units -= units if small else 0
            self.overdraft_units -= units if overdraft else 0
            self.overdraft_images -= images if overdraft else 0
            self.requests -= 1

    def refuses_unread(self, body_bytes: int) -> RequestError | None:
        """The refusal that any request of a ``body_bytes`` body would get now, decided before its body is read
        (None when one might be admitted): the cheapest such request has one 28x28 image and parses a byte of its
        body for at least the price of a pixel."""
        units = work_units(InputKind.PIXELS, MNIST_PIXELS + body_bytes, 1)
        try:
            self._admit(1, units, self._small(units), count=False)
        except RequestError as exc:
            return exc
        return None

    def _small(self, units: int) -> bool:
        """Whether express processes may take this much work: known to be small once a price is learned."""
        return bool(self.express) and 0 < units * self.seconds_per_unit <= EXPRESS_MAX_S

    def _normal(self) -> int:
        return max(1, len(self.processes) - len(self.express))

    def _queued_seconds(self, more_units: int) -> float:
        return (self.admitted_units + more_units) * self.seconds_per_unit / self._normal()

    def _admit(self, images: int, units: int, small: bool, count: bool = True) -> bool:
        """Refuse at once what would pass the queue's bound in images or in estimated seconds of work; True when
        admitted on the overdraft. A small request, where express processes take them, is bounded by the small
        work queued alone; one far smaller than those admitted may pass the bound by a share of it."""
        if not self.admitted:
            return False  # an idle worker takes any request the per-request limits allow
        config = self.config
        wait_s = self._queued_seconds(units)
        if small:
            wait_s = min(wait_s, (self.small_units + units) * self.seconds_per_unit / len(self.express))
        over_images = self.admitted + images > config.max_queue_images
        if not over_images and wait_s <= config.max_queue_s:
            return False
        if self._overdraft_admits(units, images):
            return True
        if over_images:
            problem = f"{self.admitted} images are queued on this worker and the limit is {config.max_queue_images}"
        else:
            problem = f"this worker has about {wait_s:.1f} s of work queued and the limit is {config.max_queue_s:g} s"
        self.counters.refused += count
        raise overloaded(problem, max(config.retry_after_s, math.ceil(min(wait_s, config.max_queue_s))))

    def _far_smaller(self, units: int) -> bool:
        """Whether a request is far smaller than the average one admitted (before it is)."""
        return bool(self.requests) and units * FAR_SMALLER <= self.admitted_units / self.requests

    def _enqueue(self, pending: Pending) -> None:
        """At the back of the queue; a request far smaller than the average admitted one goes ahead of the larger
        ones, behind the others that went ahead: a lone digit waits for the next batch, not for every 9-megapixel
        upload queued before it. The larger requests wait longer by little: the work that goes ahead is far
        smaller than theirs, and the overdraft bounds how much of it is admitted past the queue's bounds."""
        if not pending.ahead:
            self.queue.append(pending)
            return
        place = 0
        while place < len(self.queue) and self.queue[place].ahead:
            place += 1
        self.queue.insert(place, pending)

    def _overdraft_admits(self, units: int, images: int) -> bool:
        """A request far smaller than the average admitted one, within a share of both bounds in all."""
        far_smaller = self._far_smaller(units)
        overdraft_s = (self.overdraft_units + units) * self.seconds_per_unit / self._normal()
        within = overdraft_s <= OVERDRAFT_SHARE * self.config.max_queue_s
        within &= self.overdraft_images + images <= OVERDRAFT_SHARE * self.config.max_queue_images
        return far_smaller and within

    def _dispatch(self) -> None:
        while self.idle and self.queue:
            if self.idle[0].proc.poll() is not None:  # it died while idle: the batch waits for its replacement
                self._replace(self.idle.popleft())
                continue
            if batch := self._take():
                self._start(self.idle.popleft(), batch)
        while self.idle_express and self.queue and self._all_long():
            if self.idle_express[0].proc.poll() is not None:
                self._replace(self.idle_express.popleft())
                continue
            if not (batch := self._take(small_only=True)):
                break
            self.counters.express += len(batch)
            self._start(self.idle_express.popleft(), batch)

    def _all_long(self) -> bool:
        """Whether every process but the express ones is busy with a long batch, or being replaced."""
        if self.idle:
            return False
        others = (p for p in self.processes if p not in self.express)
        long_units = EXPRESS_AFTER_S / (self.seconds_per_unit * self.stretch())  # long in the time a client waits
        return all(self.running.get(p, 0) >= long_units for p in others)

    def stretch(self) -> float:
        """Wall time over CPU time of recent batches (at least 1): the price is CPU time, a client waits in wall
        time, and on shared cores a batch of 0.2 s of CPU kept a lone digit waiting 0.9 s (docs/performance.md)."""
        return max(1.0, self.batch_wall_s / self.batch_cpu_s) if self.batch_cpu_s > 0 else 1.0

    def _learn_stretch(self, wall_s: float, cpu_s: float) -> None:
        if cpu_s <= 0:  # this VM's CPU clock moves in ticks: a short batch may read 0
            return
        if self.batch_cpu_s == 0:
            self.batch_wall_s, self.batch_cpu_s = wall_s, cpu_s
        else:
            self.batch_wall_s = 0.9 * self.batch_wall_s + 0.1 * wall_s
            self.batch_cpu_s = 0.9 * self.batch_cpu_s + 0.1 * cpu_s

    def _start(self, process: WorkProcess, batch: list[Pending]) -> None:
        self.running[process] = sum(p.units for p in batch)
        for pending in batch:
            pending.dispatched = True
        self._spawn(self._run(process, batch))

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _release(self, process: WorkProcess) -> None:
        """A process done with its batch or its check: checked first if a check is due, then idle."""
        if process in self.check_due:
            self._spawn(self._check(process))
            return
        (self.idle_express if process in self.express else self.idle).append(process)
        self._dispatch()

    def start_checks(self, every_s: float) -> None:
        """Re-run the golden set in every process each ``every_s`` seconds (an idle one at once, a busy one after
        its batch); on the running event loop, once."""
        if every_s > 0:
            self._spawn(self._check_periodically(every_s))

    async def _check_periodically(self, every_s: float) -> None:
        """One process at a time, in turn, each every ``every_s``: a check takes a process out of service for
        0.1-0.2 s, and checking them all at once left none to answer (p99 3-5x at 1 s)."""
        turn = 0
        while not self.closing:
            await asyncio.sleep(every_s / max(1, len(self.processes)))
            if not self.processes or self.closing:
                continue
            process = self.processes[turn % len(self.processes)]
            turn += 1
            self.check_due.add(process)
            for idle in (self.idle, self.idle_express):
                if process in idle:
                    idle.remove(process)
                    self._spawn(self._check(process))

    async def _check(self, process: WorkProcess) -> None:
        self.check_due.discard(process)
        try:
            result = await asyncio.wait_for(process.check(), self.config.work_timeout_s)
        except (TimeoutError, WorkerFailed, OSError) as exc:
            log.error("work process %s failed its golden-set check: %s", process.proc.pid, exc or "timed out")
            self._replace(process)
            return
        self._observe_check(result)
        if result.problem:
            self._unfit(process, f"the golden-set check failed: {result.problem}")
        else:
            log.info(
                "golden-set check of work process %s: %d inputs match the export (max difference %.3g, %.0f ms)",
                process.proc.pid,
                result.inputs,
                result.max_diff,
                1000 * result.seconds,
            )
        self._release(process)

    def _observe_check(self, result) -> None:
        if self.metrics is not None and result is not None:
            self.metrics.observe_golden(result)

    def _unfit(self, process: WorkProcess, problem: str) -> None:
        """The model misbehaves in ``process``: this worker reports unready from now on (its answers can no longer
        be trusted; a restart would load the same files)."""
        log.error("work process %s: %s; this worker is now unready", process.proc.pid, problem)
        self.problem = self.problem or problem

    def _take(self, small_only: bool = False) -> list[Pending]:
        """Queued requests in order, up to the batch bounds (at least one request): ``max_batch_size`` images,
        and as many pixels as one request may decode, so that no batch holds more than a maximal request's
        work and legal requests never add up to a batch that runs past the work timeout. ``small_only``: the
        small requests only, wherever they are in the queue, up to ``EXPRESS_MAX_S`` of work."""
        batch, images, pixels, units = [], 0, 0, 0
        skipped: list[Pending] = []
        while self.queue:
            pending = self.queue[0]
            if pending.future.done():  # its client went away: nobody to answer, nothing to run
                self.queue.popleft()
                self.counters.abandoned += 1
                if self.metrics is not None:
                    self.metrics.abandoned.inc()
                continue
            if small_only and not self._small(pending.units):
                skipped.append(self.queue.popleft())
                continue
            full = images + pending.images > self.config.max_batch_size
            full |= pixels + pending.pixels > self.config.max_request_pixels
            full |= small_only and (units + pending.units) * self.seconds_per_unit > EXPRESS_MAX_S
            # the small requests that went ahead run on their own: beside a large one they would wait for its work
            full |= bool(batch) and batch[0].ahead and not pending.ahead
            if batch and (not self.config.batching or full):
                break
            batch.append(self.queue.popleft())
            images += pending.images
            pixels += pending.pixels
            units += pending.units
        self.queue.extendleft(reversed(skipped))  # the large requests keep their places
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
            self.running.pop(process, None)
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
            self.running.pop(process, None)
            log.exception("a batch of %d requests failed", len(batch))
            self._fail(batch, RequestError(500, "internal", "the server failed to process this request"))
            self._replace(process)
            return
        seconds = time.perf_counter() - started
        self.running.pop(process, None)
        answers = done.answers
        # priced on the CPU time the work took and the work it really did: neither a request's headers nor a
        # slow machine (refusals competing for the cores, another job) moves it
        self._learn_stretch(seconds, done.stats.cpu_ns / 1e9)
        if done.stats.units:
            self._learn_price(done.stats.cpu_ns / 1e9, done.stats.units)
        else:  # nothing was done in full (every request failed): its CPU time may raise the price, never lower it
            self._learn_price(done.stats.cpu_ns / 1e9, sum(p.units for p in batch), at_least=True)
        if self.metrics is not None:
            self.metrics.observe_batch(done.stats, seconds)
        if done.problem:
            self._unfit(process, done.problem)
        for pending in batch:
            answer = answers[pending.job.id]
            if not pending.future.done():
                if isinstance(answer, Exception):
                    pending.future.set_exception(answer)
                else:
                    pending.future.set_result(answer)
        self._release(process)

    def _learn_price(self, seconds: float, units: int, at_least: bool = False) -> None:
        """The CPU seconds per unit of work: a moving average over batches (none learned from a batch with no
        units). ``at_least``: a batch that failed part way (a crash, the timeout: wall time, the only measure
        left) or did nothing in full (priced then at what it declared) only ever raises the price."""
        if units:
            per_unit = seconds / units
            if at_least and per_unit <= self.seconds_per_unit:
                return
            previous = self.seconds_per_unit if self.learned else per_unit  # the first replaces the prior
            self.seconds_per_unit = 0.8 * previous + 0.2 * per_unit
            self.learned = True

    def _fail(self, batch: list[Pending], error: RequestError) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(error)

    def _replace(self, dead: WorkProcess) -> None:
        """Start a replacement for a process that died or hung. Only the batch it held has failed: requests
        queued meanwhile, and those that come while it starts, wait for it (within the queue's bounds)."""
        dead.close(kill=True)
        self.processes.remove(dead)
        self.check_due.discard(dead)
        express = dead in self.express
        self.express.discard(dead)
        self.counters.restarts += 1
        if self.metrics is not None:
            self.metrics.restarts.inc()
        self.restarting += 1
        self._spawn(self._restart(dead, express))

    async def _restart(self, dead: WorkProcess, express: bool = False) -> None:
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
                self._observe_check(process.checked)
                self.processes.append(process)
                if express:
                    self.express.add(process)
                (self.idle_express if express else self.idle).append(process)
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
    """The batcher for one HTTP worker, with ``config.work_procs`` work processes and ``config.express_procs``
    express ones serving the exported model in ``model_dir``. Blocks until they are ready; raises WorkerFailed
    with the reason when one cannot start."""
    init = Init(str(model_dir), manifest, config.runtime, config.work_settings())
    return Batcher(lambda: WorkProcess(init), config.work_procs, config, metrics, config.express_procs)
