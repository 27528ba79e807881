"""service/engine/batcher.py in process, over fake work processes: what the batcher admits, how it groups queued
requests into batches, where each answer goes, and what it does when a process crashes, hangs or is gone.

The fake processes answer with a fixed linear "model" over the request's own pixels, so an answer that went to
the wrong request would show. The batcher's clock (``time.perf_counter`` and ``time.time_ns`` as the module sees
them) is a fake too: the price it learns is exact, and no assertion reads a stopwatch. The same behaviours with
real work processes: tests/service/engine/test_batcher.py (slow)."""

from __future__ import annotations

import asyncio
import io
import logging
import subprocess
import threading
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from service.config import ServiceConfig
from service.engine import batcher as batcher_module
from service.engine.batcher import PRIOR_SECONDS_PER_UNIT, START_TRIES, Batcher, Timeline
from service.engine.messages import (
    IMAGE_UNITS,
    MNIST_PIXELS,
    BatchDone,
    BatchStats,
    Done,
    InputKind,
    RuntimeInfo,
    work_units,
)
from service.engine.process import WorkerFailed
from service.errors import RequestError
from service.model.golden import CheckResult

INFO = RuntimeInfo("onnx", "cpu", "convnet.onnx", "ab" * 32)
WEIGHTS = np.random.default_rng(0).normal(size=(MNIST_PIXELS, 10)).astype(np.float32) / 28
ONE_PIXEL_IMAGE = MNIST_PIXELS + IMAGE_UNITS  # the units of one array image
GUARD_S = 30


# ---- the fakes ------------------------------------------------------------------------------------------------
class FakeTime:
    """What the batcher module sees as ``time``: a perf_counter the fake processes advance, and a time_ns that
    ticks once per call (so that one timestamp taken after another is larger)."""

    def __init__(self):
        self.now = 0.0
        self.ticks = 0

    def perf_counter(self) -> float:
        return self.now

    def time_ns(self) -> int:
        self.ticks += 1
        return self.ticks


def model(x: np.ndarray) -> np.ndarray:
    """The fake's model: a fixed linear map and a log-softmax, [n, 28, 28] -> [n, 10] float32."""
    logits = x.reshape(len(x), -1).astype(np.float64) @ WEIGHTS
    logits -= logits.max(axis=1, keepdims=True)
    return (logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))).astype(np.float32)


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("L").resize((28, 28)), dtype=np.float32) / 255


def images_of(kind: InputKind, payload) -> np.ndarray:
    """The request's images as the fake model sees them, or the RequestError a bad file ends in."""
    if kind is InputKind.PIXELS:
        return np.asarray(payload, dtype=np.float32).reshape(-1, 28, 28)
    assert kind is InputKind.ENCODED, kind
    images = []
    for i, data in enumerate(payload):
        try:
            images.append(decode(data))
        except OSError:
            raise RequestError(400, "not_an_image", f"images[{i}] is not an image") from None
    return np.stack(images)


def real_pixels(kind: InputKind, payload) -> int:
    """What a real work process counts: the pixels of the images as decoded, whatever their headers declared."""
    if kind is InputKind.PIXELS:
        return len(payload) * MNIST_PIXELS
    sizes = [Image.open(io.BytesIO(data)).size for data in payload]
    return sum(w * h for w, h in sizes)


class FakeProc:
    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None  # set: the process has died
        self.killed = False
        self.waited: list = []  # the timeout of each wait()
        self.wait_hangs = False  # wait() runs past its timeout

    def poll(self) -> int | None:
        return self.returncode

    def kill(self) -> None:
        self.killed = True

    def wait(self, timeout=None) -> int:
        self.waited.append(timeout)
        if self.wait_hangs:
            raise subprocess.TimeoutExpired(["work"], timeout)
        return 0


@dataclass
class Seen:
    """A batch as a fake process received it."""

    pid: int
    jobs: list  # the Job objects

    def __repr__(self) -> str:  # an assertion's message shows the batch, not its arrays
        return f"Seen(pid={self.pid}, jobs={[(job.id, job.kind.value, len(job.payload)) for job in self.jobs]})"


class FakeWork:
    """What the batcher uses of a WorkProcess, answering in process."""

    def __init__(self, farm: Farm, pid: int):
        self.farm, self.info, self.proc = farm, INFO, FakeProc(pid)
        self.fail: Exception | None = None  # raised by the next run, after any hold: a crash
        self.hang = False  # the next run never answers
        self.closed: list[bool] = []  # the kill argument of each close()
        self.checked = CheckResult(None, 1e-6, 40)  # its golden-set check at start-up
        self.check_answer = CheckResult(None, 2e-6, 40)  # what each later check finds
        self.checks = 0
        self.problem: str | None = None  # the next batch reports the model unfit (a non-finite output)

    async def check(self):
        self.checks += 1
        return self.check_answer

    async def run(self, batch):
        farm = self.farm
        farm.batches.append(Seen(self.proc.pid, list(batch.jobs)))
        if farm.hold is not None:
            await farm.hold.wait()
        if self.hang:
            await asyncio.Event().wait()
        farm.clock.now += farm.seconds
        if self.fail is not None:
            raise self.fail
        prepared, answers, units = {}, {}, 0
        start = farm.clock.time_ns()
        for job in batch.jobs:
            try:
                prepared[job.id] = images_of(job.kind, job.payload)
            except RequestError as exc:
                answers[job.id] = exc
                continue
            units += work_units(job.kind, real_pixels(job.kind, job.payload), len(prepared[job.id]))
        model_images = sum(map(len, prepared.values()))
        model_start, model_end = farm.clock.time_ns(), farm.clock.time_ns()
        for job in batch.jobs:
            if job.id in prepared:
                x = prepared[job.id]
                inputs = x if job.want_inputs else None
                answers[job.id] = Done(model(x), inputs, start, model_start, model_start, model_end, model_images)
        stats = BatchStats(model_images, cpu_ns=round(farm.seconds * farm.cpu_share * 1e9), units=units)
        return BatchDone(batch.id, answers, stats, self.problem)

    def close(self, kill: bool = False) -> None:
        self.closed.append(kill)


class Farm:
    """The batcher's ``start``: makes fake processes and holds what the test controls and what it saw."""

    def __init__(self, clock: FakeTime):
        self.clock = clock
        self.made: list[FakeWork] = []
        self.batches: list[Seen] = []
        self.hold: asyncio.Event | None = None  # every run waits for it: the processes are busy until it is set
        self.seconds = 0.0  # what each batch costs on the fake clock
        self.cpu_share = 1.0  # the part of it the process reports as its CPU time (the rest: shared cores)
        # what the next starts do (restarts run in a thread): a threading.Event is waited for, an exception is
        # raised (ending that start); a start takes entries until it raises or the plan is empty, then starts
        self.plan: list[threading.Event | Exception] = []
        self.starts = 0  # calls, including those that failed or are still waiting

    def __call__(self) -> FakeWork:
        self.starts += 1
        while self.plan:
            step = self.plan.pop(0)
            if isinstance(step, Exception):
                raise step
            assert step.wait(timeout=GUARD_S), "the test never let the start go on"
        work = FakeWork(self, 1000 + len(self.made))
        self.made.append(work)
        return work

    def batch_sizes(self) -> list[list[int]]:
        """The images of each request, per batch received."""
        return [[len(job.payload) for job in seen.jobs] for seen in self.batches]


class Count:
    def __init__(self):
        self.n = 0

    def inc(self) -> None:
        self.n += 1


class Recorder:
    """The batcher's metrics: the images of every model call and the seconds of every batch, in order."""

    def __init__(self):
        self.model_images: list[int] = []
        self.seconds: list[float] = []
        self.abandoned = Count()
        self.restarts = Count()
        self.golden: list[str | None] = []  # each check's problem, in order

    def observe_golden(self, result) -> None:
        self.golden.append(result.problem)

    def observe_batch(self, stats, seconds) -> None:
        self.model_images.append(stats.model_images)
        self.seconds.append(seconds)


@dataclass
class Rig:
    batcher: Batcher
    farm: Farm
    metrics: Recorder
    clock: FakeTime


@pytest.fixture
def clock(monkeypatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(batcher_module, "time", fake)
    return fake


@pytest.fixture
def rig(clock):
    def make(processes: int = 1, express: int = 0, **settings) -> Rig:
        farm, metrics = Farm(clock), Recorder()
        return Rig(Batcher(farm, processes, ServiceConfig(**settings), metrics, express), farm, metrics, clock)

    return make


# ---- helpers --------------------------------------------------------------------------------------------------
def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 28, 28), dtype=np.float32)


def png(width: int, height: int | None = None, seed: int = 0) -> bytes:
    data = np.random.default_rng(seed).integers(0, 256, size=(height or width, width), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(data, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def run(coro):
    """One test's scenario on a fresh event loop; a regression that leaves a request unanswered fails the test
    after GUARD_S instead of hanging the suite (a guard, not a measurement: nothing asserts on time)."""
    return asyncio.run(asyncio.wait_for(coro, GUARD_S))


async def submitted(coro) -> asyncio.Task:
    """The request started and waiting: admitted, and queued or dispatched."""
    task = asyncio.ensure_future(coro)
    await asyncio.sleep(0)
    return task


async def until(predicate, what: str, steps: int = 2000) -> None:
    """Wait for a state, not a time: the event loop turns until ``predicate()`` holds (a restart runs in a
    thread, so the later turns sleep a little)."""
    for step in range(steps):
        if predicate():
            return
        await asyncio.sleep(0 if step < 50 else 0.005)
    pytest.fail(f"never happened: {what}")


async def settled() -> None:
    """Every task started so far has run up to its first wait (a batch handed to a fake process is seen)."""
    for _ in range(20):
        await asyncio.sleep(0)


def busy(r: Rig) -> asyncio.Event:
    """Every batch from now on is held (its process busy) until the returned event is set."""
    r.farm.hold = asyncio.Event()
    return r.farm.hold


async def refused(coro) -> RequestError:
    with pytest.raises(RequestError) as caught:
        await coro
    return caught.value


async def refused_at_once(coro) -> RequestError:
    """The RequestError a request is refused with before it is admitted: in its first step, never queued."""
    task = asyncio.ensure_future(coro)
    await asyncio.sleep(0)
    if not task.done():
        task.cancel()
        pytest.fail("the request was admitted")
    return await refused(task)


def assert_answers(done: Done, x: np.ndarray) -> None:
    assert done.log_probs.dtype == np.float32 and done.log_probs.shape == (len(x), 10)
    np.testing.assert_array_equal(done.log_probs, model(x))


# ---- dispatch and batching ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 5])
def test_a_request_to_an_idle_process_goes_at_once(rig, n):
    r = rig()
    x = pixels(n)

    done = run(r.batcher.submit(InputKind.PIXELS, x, n))

    assert_answers(done, x)
    assert done.inputs is None and done.batch_images == n
    c = r.batcher.counters
    assert (c.at_once, c.queued, c.batches, c.last_batch) == (1, 0, 1, [n])
    assert r.farm.batch_sizes() == [[n]] and r.metrics.model_images == [n]
    assert r.batcher.admitted == 0 and r.batcher.admitted_units == 0
    assert list(r.batcher.idle) == r.farm.made  # the process is idle again


def test_the_job_carries_what_submit_was_given(rig):
    r = rig(max_image_pixels=10_000)
    files = [png(20, seed=1), png(5, 7, seed=2), b"junk that no header reader knows"]
    x = pixels(2)

    async def scenario():
        a = await r.batcher.submit(InputKind.ENCODED, files[:2], 2, want_inputs=True, request_id="req-a")
        b = await r.batcher.submit(InputKind.PIXELS, x, 2, request_id="req-b")
        return a, b, await refused(r.batcher.submit(InputKind.ENCODED, files[2:], 1))

    a, b, bad = run(scenario())
    jobs = [seen.jobs[0] for seen in r.farm.batches]
    assert [job.kind for job in jobs] == [InputKind.ENCODED, InputKind.PIXELS, InputKind.ENCODED]
    assert [job.request_id for job in jobs] == ["req-a", "req-b", ""]
    assert [job.want_inputs for job in jobs] == [True, False, False]
    assert jobs[0].declared == (400, 35)  # the PNG headers' width x height
    assert jobs[1].declared is None and jobs[1].payload is x
    assert jobs[2].declared == (10_000,)  # an unreadable header counts as the largest image allowed
    assert len({job.id for job in jobs}) == 3
    assert a.inputs.shape == (2, 28, 28) and b.inputs is None
    assert_answers(a, np.stack([decode(f) for f in files[:2]]))
    assert bad.status == 400 and bad.reason == "not_an_image"


def test_requests_that_arrive_while_busy_queue_and_go_as_one_batch(rig):
    r = rig()
    xs = [pixels(i + 1, seed=i) for i in range(5)]

    async def scenario():
        hold = busy(r)
        first = await submitted(r.batcher.submit(InputKind.PIXELS, xs[0], 1))
        await until(lambda: len(r.farm.batches) == 1, "the first batch reached the process")
        rest = [await submitted(r.batcher.submit(InputKind.PIXELS, x, len(x))) for x in xs[1:]]
        state = r.batcher.state()
        hold.set()
        return state, await asyncio.gather(first, *rest)

    state, answers = run(scenario())
    assert state["busy_processes"] == 1 and state["queued_requests"] == 4 and state["admitted_images"] == 15
    assert r.farm.batch_sizes() == [[1], [2, 3, 4, 5]]
    assert r.metrics.model_images == [1, 14]
    c = r.batcher.counters
    assert (c.at_once, c.queued, c.batches, c.last_batch) == (1, 4, 2, [2, 3, 4, 5])
    for done, x in zip(answers, xs):  # each answer is its own request's
        assert_answers(done, x)
        assert done.batch_images == (1 if len(x) == 1 else 14)


def test_a_request_far_smaller_than_those_admitted_goes_ahead_of_them_in_order_of_arrival(rig):
    """Batches of at most 16 images: three 14-image requests queued behind a running one. Two lone images that
    come next go ahead of the three (each far smaller than the average admitted request), the first first, and
    run as a batch of their own; a 3-image request is not that much smaller and keeps its place at the back."""
    r = rig(max_batch_size=16)

    async def scenario():
        hold = busy(r)
        tasks = [await submitted(r.batcher.submit(InputKind.PIXELS, pixels(14, seed=i), 14)) for i in range(4)]
        await until(lambda: len(r.farm.batches) == 1, "the first batch reached the process")
        tasks.append(await submitted(r.batcher.submit(InputKind.PIXELS, pixels(3, seed=7), 3)))
        for seed in (8, 9):
            tasks.append(await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1, seed=seed), 1)))
        queued = [p.images for p in r.batcher.queue]
        hold.set()
        return queued, await asyncio.gather(*tasks)

    queued, answers = run(scenario())
    assert queued == [1, 1, 14, 14, 14, 3]
    # the two lone images run on their own: beside a 14-image request they would wait for its work
    assert r.farm.batch_sizes() == [[14], [1, 1], [14], [14], [14], [3]]
    seeds = [0, 1, 2, 3, 7, 8, 9]
    for done, seed, n in zip(answers, seeds, [14, 14, 14, 14, 3, 1, 1]):
        assert_answers(done, pixels(n, seed=seed))  # each answer is its own request's
    c = r.batcher.counters
    assert (c.at_once, c.queued) == (1, 6)


@pytest.mark.parametrize(
    "max_batch_size, per_request, requests, expected",
    [
        (8, 3, 12, [3, 6, 6, 6, 6, 6, 3]),  # the first alone, then two by two: 9 would pass 8
        (8, 4, 5, [4, 8, 8]),  # exactly full
        (256, 1, 10, [1, 9]),
        (2, 5, 3, [5, 5, 5]),  # a request larger than the bound still goes, alone
    ],
)
def test_batches_are_bounded_in_images(rig, max_batch_size, per_request, requests, expected):
    r = rig(max_batch_size=max_batch_size)

    async def scenario():
        hold = busy(r)
        tasks = [await submitted(r.batcher.submit(InputKind.PIXELS, pixels(per_request), per_request))]
        tasks += [
            await submitted(r.batcher.submit(InputKind.PIXELS, pixels(per_request), per_request))
            for _ in range(requests - 1)
        ]
        hold.set()
        return await asyncio.gather(*tasks)

    answers = run(scenario())
    assert r.metrics.model_images == expected
    assert [sum(sizes) for sizes in r.farm.batch_sizes()] == expected
    assert len(answers) == requests and r.batcher.counters.batches == len(expected)


@pytest.mark.parametrize(
    "kind, payload, max_request_pixels, expected",
    [
        (InputKind.ENCODED, [png(20)], 1_000, [1, 2, 2, 2]),  # 400 pixels declared each: two fit in 1,000
        (InputKind.ENCODED, [png(20)], 1_200, [1, 3, 3]),  # three fit exactly
        (InputKind.ENCODED, [png(30)], 1_000, [1, 1, 1, 1, 1, 1, 1]),  # 900 each: one per batch
        (InputKind.ENCODED, [png(10, 5)], 1_000, [1, 6]),  # 50 each
        (InputKind.PIXELS, pixels(1), 1_600, [1, 2, 2, 2]),  # an array image costs 28 x 28 = 784
        (InputKind.PIXELS, pixels(1), 1_567, [1, 1, 1, 1, 1, 1, 1]),  # one pixel short of two
    ],
    ids=["png 20x20", "png exact", "png 30x30", "png 10x5", "pixels", "pixels one short"],
)
def test_batches_are_bounded_in_declared_pixels(rig, kind, payload, max_request_pixels, expected):
    r = rig(max_request_pixels=max_request_pixels)

    async def scenario():
        hold = busy(r)
        tasks = [await submitted(r.batcher.submit(kind, payload, 1)) for _ in range(7)]
        hold.set()
        return await asyncio.gather(*tasks)

    answers = run(scenario())
    assert r.metrics.model_images == expected
    assert all(len(done.log_probs) == 1 for done in answers)


def test_a_batch_bound_in_pixels_and_images_together(rig):
    """Mixed requests in order: each batch stops at the first request that passes either bound."""
    r = rig(max_batch_size=4, max_request_pixels=2_000)
    requests = [[png(40)], [png(20)] * 3, [png(10)], [png(10)] * 2, [png(10)] * 2, [png(30)]]

    async def scenario():
        hold = busy(r)
        first = await submitted(r.batcher.submit(InputKind.ENCODED, [png(10)], 1))
        tasks = [await submitted(r.batcher.submit(InputKind.ENCODED, files, len(files))) for files in requests]
        hold.set()
        return await asyncio.gather(first, *tasks)

    run(scenario())
    # the first alone; 40x40 (1,600 pixels) alone: 3 x 20x20 more would be 2,800; those 3 and a 10x10 (4 images);
    # two requests of 2 x 10x10 (4 images); the 30x30 that would have made 5
    assert r.farm.batch_sizes() == [[1], [1], [3, 1], [2, 2], [1]]


def test_batching_off_runs_each_request_alone(rig):
    r = rig(batching=False)

    async def scenario():
        hold = busy(r)
        tasks = [await submitted(r.batcher.submit(InputKind.PIXELS, pixels(2, seed=i), 2)) for i in range(6)]
        hold.set()
        return await asyncio.gather(*tasks)

    answers = run(scenario())
    assert r.farm.batch_sizes() == [[2]] * 6
    c = r.batcher.counters
    assert (c.batches, c.at_once, c.queued) == (6, 1, 5)
    for i, done in enumerate(answers):
        assert_answers(done, pixels(2, seed=i))


def test_two_processes_each_take_a_request_at_once(rig):
    r = rig(processes=2)

    async def scenario():
        hold = busy(r)
        tasks = [await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1), 1)) for _ in range(5)]
        await until(lambda: len(r.farm.batches) == 2, "both processes took a request")
        state = r.batcher.state()
        hold.set()
        await asyncio.gather(*tasks)
        return state

    state = run(scenario())
    assert state["processes"] == 2 and state["busy_processes"] == 2 and state["queued_requests"] == 3
    assert {seen.pid for seen in r.farm.batches} == {1000, 1001}
    c = r.batcher.counters
    assert (c.at_once, c.queued) == (2, 3)
    assert sum(map(len, r.farm.batch_sizes())) == 5  # every request ran once


def test_the_timeline_is_filled_in_order(rig):
    r = rig()

    async def scenario():
        hold = busy(r)
        first, second = Timeline(), Timeline()
        a = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1), 1, timeline=first))
        b = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1), 1, timeline=second))
        await until(lambda: len(r.farm.batches) == 1, "the first batch reached the process")
        while_queued = (second.queued_ns, second.dispatched_ns)
        hold.set()
        await asyncio.gather(a, b)
        return first, second, while_queued

    first, second, while_queued = run(scenario())
    assert 0 < first.queued_ns <= first.dispatched_ns
    assert 0 < second.queued_ns <= second.dispatched_ns
    assert while_queued[0] > 0 and while_queued[1] == 0  # not dispatched while it waited
    assert second.dispatched_ns > first.dispatched_ns


def test_a_request_without_a_timeline_is_served(rig):
    r = rig()
    done = run(r.batcher.submit(InputKind.PIXELS, pixels(1), 1, timeline=None))
    assert done.log_probs.shape == (1, 10)


# ---- answers and errors ---------------------------------------------------------------------------------------
def test_a_request_error_reaches_only_its_own_request(rig):
    r = rig()
    good = [png(28, seed=i) for i in range(4)]

    async def scenario():
        hold = busy(r)
        first = await submitted(r.batcher.submit(InputKind.ENCODED, good[:1], 1))
        a = await submitted(r.batcher.submit(InputKind.ENCODED, good[1:2], 1))
        bad = await submitted(r.batcher.submit(InputKind.ENCODED, [good[2], b"not an image"], 2))
        c = await submitted(r.batcher.submit(InputKind.ENCODED, good[3:], 1))
        hold.set()
        return await asyncio.gather(first, a, bad, c, return_exceptions=True)

    answers = run(scenario())
    failed = answers.pop(2)
    assert isinstance(failed, RequestError) and failed.status == 400 and failed.message == "images[1] is not an image"
    for done, data in zip(answers, [good[0], good[1], good[3]]):
        assert_answers(done, decode(data)[None])
    # the bad request ran in the same batch as the one before it; its unreadable file is priced as the largest
    # image, so the lone request after it, far smaller, went ahead and ran on its own
    assert r.farm.batch_sizes() == [[1], [1], [1, 2]]
    assert r.metrics.model_images == [1, 1, 1]  # its images are not in the model call
    assert r.batcher.counters.restarts == 0 and len(r.farm.made) == 1  # nobody's process was at fault


@pytest.mark.parametrize(
    "error, status, reason, message",
    [
        (WorkerFailed("the work process 1000 exited (EOFError)"), 503, "unavailable", "failed and was restarted"),
        (ConnectionResetError(104, "reset"), 503, "unavailable", "failed and was restarted"),
        (TimeoutError(), 503, "unavailable", "failed and was restarted"),
        (RuntimeError("a bug in the batch's pickling"), 500, "internal", "the server failed to process"),
    ],
    ids=["worker failed", "os error", "timeout", "a bug"],
)
def test_a_crash_fails_only_its_batch_and_the_process_is_replaced(rig, error, status, reason, message):
    r = rig(processes=2, retry_after_s=4)

    async def scenario():
        hold = busy(r)
        doomed = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1, seed=1), 1))
        fine = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1, seed=2), 1))
        queued = [await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1, seed=s), 1)) for s in (3, 4)]
        await until(lambda: len(r.farm.batches) == 2, "both processes are busy")
        victim = next(w for w in r.farm.made if w.proc.pid == r.farm.batches[0].pid)
        victim.fail = error
        hold.set()
        answers = await asyncio.gather(doomed, fine, *queued, return_exceptions=True)
        await until(lambda: len(r.batcher.processes) == 2, "the replacement started")
        later = await r.batcher.submit(InputKind.PIXELS, pixels(3, seed=5), 3)
        return victim, answers, later

    victim, answers, later = run(scenario())
    failed = answers[0]
    assert isinstance(failed, RequestError) and (failed.status, failed.reason) == (status, reason)
    assert message in failed.message
    if status == 503:
        assert failed.retry_after == 4
    for done, seed in zip(answers[1:], (2, 3, 4)):  # the other process's request and the queue are served
        assert_answers(done, pixels(1, seed=seed))
    assert_answers(later, pixels(3, seed=5))
    assert victim.closed == [True] and victim not in r.batcher.processes and victim not in r.batcher.idle
    assert victim.proc.waited == [None]  # killed and reaped
    assert len(r.farm.made) == 3 and r.farm.made[2] in r.batcher.processes  # start called again
    assert r.batcher.counters.restarts == 1 and r.metrics.restarts.n == 1
    assert r.batcher.ready


def test_a_batch_past_the_work_timeout_is_failed_and_its_process_replaced(rig, caplog):
    r = rig(work_timeout_s=0.05, retry_after_s=2)
    caplog.set_level(logging.ERROR, logger="service.engine")

    async def scenario():
        r.farm.made[0].hang = True
        error = await refused(r.batcher.submit(InputKind.PIXELS, pixels(2), 2))
        await until(lambda: r.batcher.processes, "the replacement started")
        return error, await r.batcher.submit(InputKind.PIXELS, pixels(1), 1)

    error, later = run(scenario())
    assert (error.status, error.reason, error.retry_after) == (503, "unavailable", 2)
    assert "ran past 0.05 s" in caplog.text
    hung = r.farm.made[0]
    assert hung.closed == [True] and hung.proc.waited == [None] and hung not in r.batcher.processes
    assert r.batcher.counters.restarts == 1 and r.metrics.restarts.n == 1 and len(r.farm.made) == 2
    assert_answers(later, pixels(1))
    assert r.farm.batches[-1].pid == r.farm.made[1].proc.pid


def test_when_the_last_process_dies_its_queue_waits_for_the_replacement(rig):
    r = rig(retry_after_s=3)
    gate = threading.Event()

    async def scenario():
        hold = busy(r)
        running = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1, seed=0), 1))
        queued = [await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1, seed=s), 1)) for s in (1, 2)]
        await until(lambda: len(r.farm.batches) == 1, "the first batch reached the process")
        r.farm.plan = [gate]  # the replacement does not start until the test says so
        try:
            r.farm.made[0].fail = WorkerFailed("killed")
            hold.set()
            failed = await refused(running)
            await until(lambda: r.farm.starts == 2, "the replacement is starting")
            meanwhile = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(2, seed=3), 2))  # admitted
            during = (r.batcher.state(), r.batcher.ready, [task.done() for task in [*queued, meanwhile]])
        finally:
            gate.set()
        return failed, during, await asyncio.gather(*queued, meanwhile)

    failed, (state, ready, done_early), answers = run(scenario())
    assert (failed.status, failed.reason, failed.retry_after) == (503, "unavailable", 3)
    assert "restarted" in failed.message
    assert state["processes"] == 0 and state["queued_requests"] == 3 and state["admitted_images"] == 4
    assert not ready and done_early == [False, False, False]
    for done, x in zip(answers, [pixels(1, seed=1), pixels(1, seed=2), pixels(2, seed=3)]):
        assert_answers(done, x)
    assert r.farm.batch_sizes() == [[1], [1, 1, 2]]  # the queue went to the replacement as one batch
    assert r.farm.batches[1].pid == r.farm.made[1].proc.pid
    assert r.batcher.counters.restarts == 1 and r.farm.made[0].proc.waited == [None]  # the dead one was reaped


def test_when_no_replacement_can_start_the_queue_is_refused(rig, caplog):
    """After START_TRIES failed starts in a row the waiting requests are refused, and new ones at once."""
    r = rig(retry_after_s=3)
    caplog.set_level(logging.ERROR, logger="service.engine")
    second_try = threading.Event()

    async def scenario():
        hold = busy(r)
        running = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1), 1))
        queued = [await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1), 1)) for _ in range(2)]
        await until(lambda: len(r.farm.batches) == 1, "the first batch reached the process")
        r.farm.plan = [WorkerFailed("the model file is gone")] * START_TRIES + [second_try]
        try:
            r.farm.made[0].fail = WorkerFailed("killed")
            hold.set()
            await refused(running)
            await until(lambda: all(task.done() for task in queued), "the queue was answered")
            answers = await asyncio.gather(*queued, return_exceptions=True)
            await until(lambda: r.farm.starts == 2 + START_TRIES, "the next try is starting")
            meanwhile = await refused_at_once(r.batcher.submit(InputKind.PIXELS, pixels(1), 1))
        finally:
            second_try.set()
        await until(lambda: r.batcher.processes, "the second try started a process")
        later = await r.batcher.submit(InputKind.PIXELS, pixels(1), 1)
        # once a replacement is up, the next crash's requests wait for its replacement again
        third_try = threading.Event()
        r.farm.plan = [third_try]
        try:
            r.farm.made[1].fail = WorkerFailed("killed again")
            await refused(r.batcher.submit(InputKind.PIXELS, pixels(1), 1))
            await until(lambda: r.farm.starts == 3 + START_TRIES, "the next replacement is starting")
            waiting = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(3), 3))
            waited = not waiting.done()
        finally:
            third_try.set()
        return answers, meanwhile, later, waited, await waiting

    answers, meanwhile, later, waited, after_next_crash = run(scenario())
    for error in answers:
        assert isinstance(error, RequestError), error
        assert (error.status, error.reason, error.retry_after) == (503, "unavailable", 3)
        assert error.message == "no work process could be started; retry"
    assert (meanwhile.status, meanwhile.reason) == (503, "unavailable")
    assert "no work process is running" in meanwhile.message
    assert "restarting a work process failed (the model file is gone)" in caplog.text
    assert_answers(later, pixels(1))
    assert r.farm.batch_sizes() == [[1], [1], [1], [3]]  # the refused requests never ran
    assert waited
    assert_answers(after_next_crash, pixels(3))
    assert r.batcher.counters.restarts == 2 and len(r.farm.made) == 3 and r.batcher.ready


@pytest.mark.parametrize("processes", [1, 2])
def test_a_process_that_died_while_idle_gets_no_batch(rig, processes):
    r = rig(processes=processes)
    dead = r.farm.made[0]
    dead.proc.returncode = -9

    async def scenario():
        done = await r.batcher.submit(InputKind.PIXELS, pixels(2), 2)
        await until(lambda: len(r.batcher.processes) == processes, "the replacement started")
        return done

    assert_answers(run(scenario()), pixels(2))
    assert [seen.pid for seen in r.farm.batches] == [r.farm.made[1].proc.pid]  # never the dead one
    assert dead.closed == [True] and dead.proc.waited == [None] and dead not in r.batcher.processes
    assert r.batcher.counters.restarts == 1 and r.metrics.restarts.n == 1 and len(r.farm.made) == processes + 1


def test_a_request_that_waits_for_a_replacement_is_not_counted_at_once(rig):
    r = rig()
    r.farm.made[0].proc.returncode = -9
    run(r.batcher.submit(InputKind.PIXELS, pixels(1), 1))
    assert (r.batcher.counters.at_once, r.batcher.counters.queued) == (0, 1)


def test_submit_with_no_processes_is_a_503(rig):
    r = rig(retry_after_s=7)
    r.batcher.processes.clear()
    r.batcher.idle.clear()

    error = run(refused_at_once(r.batcher.submit(InputKind.PIXELS, pixels(1), 1)))

    assert (error.status, error.reason, error.retry_after) == (503, "unavailable", 7)
    assert r.farm.batches == [] and r.batcher.admitted == 0
    assert r.batcher.counters.at_once == 0 and r.batcher.counters.queued == 0


def test_a_replacement_that_fails_to_start_once_is_tried_again_while_requests_wait(rig):
    """A start that fails (here with OSError: out of file descriptors; or a replacement killed while it starts)
    is tried again at once, and the request that waited for it is answered by the next one."""
    r = rig()
    gate = threading.Event()

    async def scenario():
        r.farm.plan = [gate, OSError(24, "Too many open files")]
        r.farm.made[0].fail = WorkerFailed("killed")
        try:
            await refused(r.batcher.submit(InputKind.PIXELS, pixels(1), 1))
            waiting = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1), 1))  # for the replacement
        finally:
            gate.set()
        return await waiting, r.batcher.start_failed

    answer, start_failed = run(scenario())
    assert_answers(answer, pixels(1))
    assert not start_failed


def test_a_restart_that_finishes_after_close_is_closed(rig):
    r = rig()
    gate = threading.Event()

    async def scenario():
        r.farm.plan = [gate]
        try:
            r.farm.made[0].fail = WorkerFailed("killed")
            await refused(r.batcher.submit(InputKind.PIXELS, pixels(1), 1))
            await until(lambda: r.farm.starts == 2, "the restart is starting a process")
            r.batcher.close()
        finally:
            gate.set()
        await until(lambda: len(r.farm.made) == 2 and r.farm.made[1].closed, "the late process was closed")
        return await refused_at_once(r.batcher.submit(InputKind.PIXELS, pixels(1), 1))

    after = run(scenario())
    assert r.farm.made[1].closed == [False] and r.batcher.processes == [] and not r.batcher.ready
    assert after.status == 503 and "no work process is running" in after.message  # no restart left to wait for


# ---- clients that left ----------------------------------------------------------------------------------------
def test_a_request_cancelled_while_queued_is_dropped_unrun(rig):
    r = rig()

    async def scenario():
        hold = busy(r)
        first = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1), 1))
        left = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(4), 4))
        stays = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(2), 2))
        left.cancel()  # what the HTTP front does when the client disconnects
        await asyncio.sleep(0)
        admitted = r.batcher.admitted
        hold.set()
        await first
        await stays
        return left, admitted

    left, admitted = run(scenario())
    assert left.cancelled()
    assert admitted == 3  # its images left the bound as soon as it was cancelled
    assert r.farm.batch_sizes() == [[1], [2]]  # it never ran
    c = r.batcher.counters
    assert (c.abandoned, c.batches) == (1, 2) and r.metrics.abandoned.n == 1
    assert r.batcher.admitted == 0 and r.batcher.admitted_units == 0 and not r.batcher.queue


def test_a_queue_of_only_cancelled_requests_runs_nothing(rig):
    r = rig()

    async def scenario():
        hold = busy(r)
        first = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1), 1))
        gone = [await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1), 1)) for _ in range(3)]
        for task in gone:
            task.cancel()
        hold.set()
        await first
        await asyncio.sleep(0)
        return r.batcher.state()

    state = run(scenario())
    assert r.farm.batch_sizes() == [[1]]
    assert state["counters"]["abandoned"] == 3 and r.metrics.abandoned.n == 3
    assert state["busy_processes"] == 0 and state["queued_requests"] == 0


# ---- admission ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("second, admitted", [(1, True), (2, False), (10, False)])
def test_the_queue_is_bounded_in_images(rig, second, admitted):
    r = rig(max_queue_images=4, retry_after_s=3)

    async def scenario():
        hold = busy(r)
        first = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(3), 3))
        try:
            if admitted:
                later = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(second), second))
                hold.set()
                return await asyncio.gather(first, later)
            error = await refused_at_once(r.batcher.submit(InputKind.PIXELS, pixels(second), second))
            return error, r.batcher.admitted
        finally:
            hold.set()
            await first

    outcome = run(scenario())
    if admitted:
        assert [len(done.log_probs) for done in outcome] == [3, second] and r.batcher.counters.refused == 0
    else:
        error, held = outcome
        assert (error.status, error.reason, error.retry_after) == (503, "overloaded", 3)
        assert error.message == (
            "the server is overloaded: 3 images are queued on this worker and the limit is 4; retry later"
        )
        assert held == 3  # the refused request took nothing
        assert r.batcher.counters.refused == 1 and len(r.farm.batches) == 1
        assert r.batcher.counters.queued == 0 and r.batcher.counters.at_once == 1


@pytest.mark.parametrize(
    "processes, max_queue_s, retry_after",
    [(1, 10.0, 10), (1, 20.0, None), (2, 10.0, None), (2, 5.0, 5), (1, 1e-3, 1)],
)
def test_the_queue_is_bounded_in_seconds_of_work(rig, processes, max_queue_s, retry_after):
    """1e-4 s per unit: one array image is 66,320 units, 6.6 s; two queued are 13.3 s of work, over the
    processes."""
    r = rig(processes=processes, max_queue_s=max_queue_s, retry_after_s=1)
    r.batcher.seconds_per_unit = 1e-4
    wait_s = 2 * ONE_PIXEL_IMAGE * 1e-4 / processes

    async def scenario():
        hold = busy(r)
        first = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1), 1))
        try:
            if retry_after is None:
                second = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1), 1))
                hold.set()
                return await asyncio.gather(first, second)
            return await refused_at_once(r.batcher.submit(InputKind.PIXELS, pixels(1), 1))
        finally:
            hold.set()
            await first

    outcome = run(scenario())
    if retry_after is None:
        assert len(outcome) == 2 and r.batcher.counters.refused == 0
    else:
        assert (outcome.status, outcome.reason, outcome.retry_after) == (503, "overloaded", retry_after)
        assert f"about {wait_s:.1f} s of work queued and the limit is {max_queue_s:g} s" in outcome.message
        assert r.batcher.counters.refused == 1


def test_the_seconds_bound_uses_the_price_learned_from_a_batch(rig):
    r = rig(max_queue_s=1.0, retry_after_s=1)
    r.farm.seconds = ONE_PIXEL_IMAGE * 1e-5  # each batch takes 0.66 s on the fake clock

    async def scenario():
        await r.batcher.submit(InputKind.PIXELS, pixels(1), 1)
        learned = r.batcher.seconds_per_unit
        hold = busy(r)
        first = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1), 1))
        try:
            return learned, await refused_at_once(r.batcher.submit(InputKind.PIXELS, pixels(1), 1))
        finally:
            hold.set()
            await first

    learned, error = run(scenario())
    assert learned == pytest.approx(1e-5)
    assert error.reason == "overloaded" and "about 1.3 s of work queued and the limit is 1 s" in error.message
    assert error.retry_after == 1
    assert r.metrics.seconds == pytest.approx([ONE_PIXEL_IMAGE * 1e-5] * 2)


def test_before_any_price_is_learned_a_dear_prior_bounds_the_queue_in_seconds(rig):
    """A fresh server (a start, a rollout): 8 array images are 0.53 million units, 13 ms at the prior; with a bound
    of 20 ms the second request is refused. With no price at all, 80 requests of 60 images were all admitted and
    waited up to 138 s (an attack on this tree)."""
    r = rig(max_queue_s=0.02, retry_after_s=1)

    async def scenario():
        hold = busy(r)
        first = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(8), 8))
        second = await refused_at_once(r.batcher.submit(InputKind.PIXELS, pixels(8), 8))
        hold.set()
        await first
        return second

    assert run(scenario()).reason == "overloaded"
    assert r.batcher.counters.refused == 1 and r.batcher.learned


@pytest.mark.parametrize("images", [1, 64, 5000])
def test_an_idle_batcher_admits_anything(rig, images):
    r = rig(max_queue_images=1, max_queue_s=1e-9, max_batch_size=1)
    r.batcher.seconds_per_unit = 1e9

    done = run(r.batcher.submit(InputKind.PIXELS, pixels(images), images))

    assert len(done.log_probs) == images and r.batcher.counters.refused == 0


# ---- the price of work ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "batches, expected",
    [
        ([(1.0, 100)], 0.01),  # the first batch sets the price
        ([(1.0, 100), (2.0, 100)], 0.8 * 0.01 + 0.2 * 0.02),  # then a moving average
        ([(1.0, 100), (2.0, 100), (0.5, 100)], 0.8 * (0.8 * 0.01 + 0.2 * 0.02) + 0.2 * 0.005),
        ([(1.0, 0)], PRIOR_SECONDS_PER_UNIT),  # no units: nothing learned
        ([(1.0, 100), (5.0, 0)], 0.01),
    ],
)
def test_the_price_is_a_moving_average(rig, batches, expected):
    r = rig()
    for seconds, units in batches:
        r.batcher._learn_price(seconds, units)
    assert r.batcher.seconds_per_unit == pytest.approx(expected)


def test_served_batches_teach_the_price_and_refused_requests_do_not(rig):
    r = rig(max_queue_s=1e6)  # the 25 megapixels must be admitted, to be refused by the (fake) work process
    seconds = ONE_PIXEL_IMAGE * 1e-5
    r.farm.seconds = seconds

    async def scenario():
        prices = []
        await r.batcher.submit(InputKind.PIXELS, pixels(1), 1)
        prices.append(r.batcher.seconds_per_unit)
        r.farm.seconds = 2 * seconds
        await r.batcher.submit(InputKind.PIXELS, pixels(1), 1)
        prices.append(r.batcher.seconds_per_unit)
        # one served request beside one refused that declared 25 megapixels: priced on the served one only
        r.farm.seconds = seconds
        hold = busy(r)
        first = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1), 1))
        good = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1), 1))
        bad = await submitted(r.batcher.submit(InputKind.ENCODED, [b"\x89PNG truncated"], 1))  # 25 Mpx
        hold.set()
        await asyncio.gather(first, good, bad, return_exceptions=True)
        prices.append(r.batcher.seconds_per_unit)
        # a batch of only refused requests teaches nothing
        r.farm.seconds = 100.0
        await asyncio.gather(r.batcher.submit(InputKind.ENCODED, [b"junk"], 1), return_exceptions=True)
        prices.append(r.batcher.seconds_per_unit)
        return prices

    prices = run(scenario())
    first = 1e-5
    second = 0.8 * first + 0.2 * 2e-5
    third = 0.8 * second + 0.2 * 1e-5  # the batch [first] alone
    fourth = 0.8 * third + 0.2 * 1e-5  # then [good, bad], priced on good's units alone
    assert prices == pytest.approx([first, second, fourth, fourth])
    assert r.farm.batch_sizes() == [[1], [1], [1], [1, 1], [1]]


def test_a_crashed_batch_is_priced_at_least_as_dear_as_it_ran(rig):
    r = rig()
    r.farm.seconds = 3.0 * ONE_PIXEL_IMAGE

    async def scenario():
        r.farm.made[0].fail = WorkerFailed("killed")
        await refused(r.batcher.submit(InputKind.PIXELS, pixels(1), 1))
        return r.batcher.seconds_per_unit

    assert run(scenario()) == pytest.approx(3.0)


def test_an_instant_crash_does_not_talk_the_price_down(rig):
    r = rig()
    r.farm.seconds = ONE_PIXEL_IMAGE * 1e-5

    async def scenario():
        await r.batcher.submit(InputKind.PIXELS, pixels(1), 1)
        learned = r.batcher.seconds_per_unit
        r.farm.seconds = 0.0
        r.farm.made[0].fail = WorkerFailed("the work process 1000 exited (EOFError)")
        await refused(r.batcher.submit(InputKind.PIXELS, pixels(1), 1))
        return learned, r.batcher.seconds_per_unit

    learned, after = run(scenario())
    assert after >= learned


def avif(side: int) -> bytes:
    """A real AVIF file: a format whose header the batcher does not read, so it is priced as the largest image."""
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side), 200, dtype=np.uint8), mode="L").save(buf, format="AVIF")
    return buf.getvalue()


def test_the_price_cannot_be_talked_down_by_what_headers_declare(rig):
    """Tiny AVIF digits, each priced as 25 megapixels before it runs, and each costing what a tiny image costs:
    the price is learned from the pixels really decoded and the CPU time really spent, so it stays put."""
    r = rig(max_queue_s=1e9)
    r.farm.seconds = ONE_PIXEL_IMAGE * 1e-8  # an array image: 0.66 ms of CPU

    async def scenario():
        await r.batcher.submit(InputKind.PIXELS, pixels(1), 1)
        learned = r.batcher.seconds_per_unit
        tiny = avif(8)
        for _ in range(50):
            await r.batcher.submit(InputKind.ENCODED, [tiny], 1)
        return learned, r.batcher.seconds_per_unit

    learned, after = run(scenario())
    assert learned == pytest.approx(1e-8)
    assert r.farm.batches[-1].jobs[0].declared == (25_000_000,)  # priced as the largest image before it ran
    assert after == pytest.approx(1e-8 * ONE_PIXEL_IMAGE / work_units(InputKind.ENCODED, 64, 1))  # 8x8 pixels
    assert after > 0.9 * learned  # where the declared 25 megapixels would have made it 380 times cheaper


def test_the_price_is_cpu_time_not_the_time_a_batch_took(rig):
    """A batch that took 10 s on the clock (the cores busy with other things) but 1 ms of its process's CPU."""
    r = rig()
    r.farm.seconds = 1e-3

    async def scenario():
        async def slow_clock(batch, run=r.farm.made[0].run):
            r.farm.clock.now += 10.0
            return await run(batch)

        r.farm.made[0].run = slow_clock
        await r.batcher.submit(InputKind.PIXELS, pixels(1), 1)
        return r.batcher.seconds_per_unit

    assert run(scenario()) == pytest.approx(1e-3 / ONE_PIXEL_IMAGE)


LONG = 400  # array images: 26.5 million units, 0.27 s at 1e-8 s a unit, past EXPRESS_AFTER_S


@pytest.mark.parametrize("first, goes_express", [(LONG, True), (1, False)], ids=["behind a long batch", "short"])
def test_a_small_request_goes_to_the_express_process_only_behind_a_long_batch(rig, first, goes_express):
    r = rig(processes=1, express=1)
    r.batcher.seconds_per_unit = 1e-8

    async def scenario():
        hold = busy(r)
        long = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(first), first))
        small = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1), 1))
        await settled()
        seen = [(b.pid, len(b.jobs[0].payload)) for b in r.farm.batches]
        hold.set()
        await asyncio.gather(long, small)
        return seen

    seen = run(scenario())
    normal, express = (work.proc.pid for work in r.farm.made)
    if goes_express:
        assert seen == [(normal, first), (express, 1)] and r.batcher.counters.express == 1
    else:  # the small request waits for the normal process, as it would with no express process
        assert seen == [(normal, first)] and r.batcher.counters.express == 0
        assert [b.pid for b in r.farm.batches] == [normal, normal]


@pytest.mark.parametrize("cpu_share, goes_express", [(0.25, True), (1.0, False)], ids=["shared cores", "idle"])
def test_a_batch_is_long_by_the_wall_time_batches_take_over_their_cpu_time(rig, cpu_share, goes_express):
    """100 array images: 6.6 million units, 0.066 s of CPU at 1e-8 s a unit, short of EXPRESS_AFTER_S. Where
    batches have been taking 4x their CPU time in wall time (the cores shared), that is 0.27 s of waiting: long,
    and a small request goes to the express process."""
    r = rig(processes=1, express=1)
    r.farm.seconds, r.farm.cpu_share = 0.3, cpu_share

    async def scenario():
        await r.batcher.submit(InputKind.PIXELS, pixels(2), 2)  # teaches the batcher wall over CPU
        stretch = r.batcher.stretch()
        r.batcher.seconds_per_unit = 1e-8
        r.farm.batches.clear()
        hold = busy(r)
        long = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(100), 100))
        small = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1), 1))
        await settled()
        seen = [len(b.jobs[0].payload) for b in r.farm.batches]
        hold.set()
        await asyncio.gather(long, small)
        return stretch, seen

    stretch, seen = run(scenario())
    assert stretch == pytest.approx(1 / cpu_share)
    assert seen == ([100, 1] if goes_express else [100])
    assert r.batcher.counters.express == int(goes_express)


def test_the_express_process_takes_small_requests_only_and_from_anywhere_in_the_queue(rig):
    r = rig(processes=1, express=1, max_queue_s=1e9)
    r.batcher.seconds_per_unit = 1e-8

    async def scenario():
        hold = busy(r)
        tasks = [await submitted(r.batcher.submit(InputKind.PIXELS, pixels(LONG), LONG))]
        tasks.append(await submitted(r.batcher.submit(InputKind.PIXELS, pixels(LONG), LONG)))  # queues: large
        tasks.append(await submitted(r.batcher.submit(InputKind.PIXELS, pixels(2), 2)))  # behind it, small
        await settled()
        seen = [(b.pid, len(b.jobs)) for b in r.farm.batches]
        queued = [p.images for p in r.batcher.queue]
        hold.set()
        await asyncio.gather(*tasks)
        return seen, queued

    (seen, queued) = run(scenario())
    normal, express = (work.proc.pid for work in r.farm.made)
    assert seen == [(normal, 1), (express, 1)] and queued == [LONG]  # the large one kept its place
    assert r.farm.batch_sizes()[1] == [2]


def test_small_requests_are_admitted_past_the_bound_that_large_ones_meet(rig):
    r = rig(processes=1, express=1, max_queue_s=0.4, retry_after_s=1)
    r.batcher.seconds_per_unit = 1e-8

    async def scenario():
        hold = busy(r)
        long = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(LONG), LONG))
        large = await refused_at_once(r.batcher.submit(InputKind.PIXELS, pixels(LONG), LONG))  # 0.53 s > 0.4
        unread = r.batcher.refuses_unread(1000)
        small = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1), 1))
        hold.set()
        return large, unread, await asyncio.gather(long, small)

    large, unread, answers = run(scenario())
    assert large.reason == "overloaded" and unread is None and len(answers) == 2


@pytest.mark.parametrize("express", [0, 1])
def test_a_body_is_refused_unread_when_no_request_of_its_size_could_be_admitted(rig, express):
    r = rig(processes=1, express=express, max_queue_s=0.4, retry_after_s=1)
    r.batcher.seconds_per_unit = 1e-8

    async def scenario():
        assert r.batcher.refuses_unread(10**9) is None  # an idle worker admits anything
        hold = busy(r)
        first = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(LONG), LONG))
        # 26.5 million units are queued, 0.27 s: a body of 20 million bytes would bring any request past 0.4 s
        verdicts = [r.batcher.refuses_unread(n) for n in (1000, 20_000_000)]
        hold.set()
        await first
        return verdicts

    small, big = run(scenario())
    assert small is None
    assert big.reason == "overloaded" and big.retry_after >= 1  # not small: bounded by all the work queued
    assert r.batcher.counters.refused == 0  # asking is not refusing


def test_a_body_is_refused_unread_when_the_queue_is_full_of_images(rig):
    """Single-image requests fill the image bound: the cheapest request a body could hold is no smaller than
    them (no overdraft), so none could be admitted."""
    r = rig(max_queue_images=2, max_queue_s=1e9, retry_after_s=1)
    r.batcher.seconds_per_unit = 1e-8

    async def scenario():
        hold = busy(r)
        tasks = [await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1), 1)) for _ in range(2)]
        verdict = r.batcher.refuses_unread(100)
        hold.set()
        await asyncio.gather(*tasks)
        return verdict

    verdict = run(scenario())
    assert verdict.reason == "overloaded" and "2 images are queued" in verdict.message


def test_a_far_smaller_request_passes_a_full_image_bound_on_the_overdraft(rig):
    """The image bound filled by 64-image requests (256 clients of them resending at once shut a lone digit out:
    the image bound was checked before the overdraft): one image more comes in, within a fifth of the bound."""
    r = rig(max_queue_images=128, max_queue_s=1e9)
    r.batcher.seconds_per_unit = 1e-8

    async def scenario():
        hold = busy(r)
        bulk = [await submitted(r.batcher.submit(InputKind.PIXELS, pixels(64), 64)) for _ in range(2)]
        full = await refused_at_once(r.batcher.submit(InputKind.PIXELS, pixels(64), 64))
        lone = [await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1), 1)) for _ in range(3)]
        used = r.batcher.overdraft_images
        hold.set()
        return full, used, await asyncio.gather(*bulk, *lone)

    full, used, answers = run(scenario())
    assert "128 images are queued" in full.message and used == 3 and len(answers) == 5


def test_a_request_far_smaller_than_those_queued_may_pass_the_bound_by_a_share_of_it(rig):
    """1e-4 s a unit: an array image is 6.6 s. 14 images (93 s) run; the bound is 90 s. One image more is past it,
    but 8 times smaller than the average admitted request: admitted on the overdraft (at most 18 s, a fifth of
    the bound). Two images are not that much smaller; nor is a second lone image once the first is in."""
    r = rig(max_queue_s=90.0, retry_after_s=1)
    r.batcher.seconds_per_unit = 1e-4

    async def scenario():
        hold = busy(r)
        first = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(14), 14))
        two = await refused_at_once(r.batcher.submit(InputKind.PIXELS, pixels(2), 2))
        lone = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1), 1))
        overdraft = r.batcher.overdraft_units
        second = await refused_at_once(r.batcher.submit(InputKind.PIXELS, pixels(1), 1))  # mean now 7.5 images
        hold.set()
        await asyncio.gather(first, lone)
        return two, overdraft, second

    two, overdraft, second = run(scenario())
    assert two.reason == second.reason == "overloaded"
    assert overdraft == ONE_PIXEL_IMAGE and r.batcher.overdraft_units == 0 and r.batcher.requests == 0
    assert r.batcher.counters.refused == 2


@pytest.mark.parametrize("dies", ["running", "idle"])
def test_an_express_process_that_dies_is_replaced_by_an_express_process(rig, dies):
    r = rig(processes=1, express=1)
    r.batcher.seconds_per_unit = 1e-8
    normal, express = r.farm.made

    async def scenario():
        hold = busy(r)
        long = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(LONG), LONG))
        if dies == "running":
            express.fail = WorkerFailed("the work process 1001 exited (EOFError)")
        else:
            express.proc.returncode = -9  # found dead when it is next given work
        lost = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1), 1))
        hold.set()
        first = await asyncio.gather(long, lost, return_exceptions=True)
        await until(lambda: len(r.batcher.processes) == 2, "the replacement started")
        r.batcher.seconds_per_unit = 1e-8  # as before the fake batches (of no CPU time) taught it otherwise
        hold = busy(r)
        long = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(LONG), LONG))
        small = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1, seed=7), 1))
        await settled()
        seen = [b.pid for b in r.farm.batches[-2:]]
        hold.set()
        return first, seen, await asyncio.gather(long, small)

    first, seen, (_, small) = run(scenario())
    replacement = r.farm.made[2]
    assert r.batcher.express == {replacement} and express not in r.batcher.processes
    assert seen == [normal.proc.pid, replacement.proc.pid]  # the replacement takes small requests, as express
    assert_answers(small, pixels(1, seed=7))
    if dies == "running":
        assert isinstance(first[1], RequestError) and first[1].status == 503
    else:  # the request waited for the replacement, or the normal process took it after its long batch
        assert_answers(first[1], pixels(1))


def test_a_batch_that_did_nothing_in_full_may_raise_the_price_never_lower_it(rig):
    """Every request failed (files whose parsing is costly, then truncated): the work process reports no units, so
    its CPU time is priced at what the requests declared, and only ever raises the price."""
    r = rig(max_queue_s=1e9)
    r.batcher.seconds_per_unit, r.batcher.learned = 1e-8, True
    junk = b"junk that no header reader knows"  # declared as the largest image: 25 million pixels

    async def scenario():
        r.farm.seconds = 1e-3  # cheap failures: 1e-3 s over 25 million units is below the price, so no change
        await refused(r.batcher.submit(InputKind.ENCODED, [junk], 1))
        cheap = r.batcher.seconds_per_unit
        r.farm.seconds = 25.0  # a costly one: 1e-6 s a declared unit
        await refused(r.batcher.submit(InputKind.ENCODED, [junk], 1))
        return cheap, r.batcher.seconds_per_unit

    cheap, dear = run(scenario())
    declared = work_units(InputKind.ENCODED, 25_000_000, 1)
    assert cheap == 1e-8 and dear == pytest.approx(0.8 * 1e-8 + 0.2 * 25.0 / declared)


# ---- state and life cycle -------------------------------------------------------------------------------------
def test_state_while_busy(rig):
    r = rig()
    r.batcher.seconds_per_unit = 1e-6

    async def scenario():
        hold = busy(r)
        first = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(2), 2))
        second = await submitted(r.batcher.submit(InputKind.ENCODED, [png(20)], 1))
        state = r.batcher.state()
        hold.set()
        await asyncio.gather(first, second)
        return state

    state = run(scenario())
    units = 2 * ONE_PIXEL_IMAGE + 400 + IMAGE_UNITS
    assert state == {
        "processes": 1,
        "express_processes": 0,
        "busy_processes": 1,
        "queued_requests": 1,
        "admitted_images": 3,
        "admitted_units": units,
        "queued_seconds": round(units * 1e-6, 3),
        "seconds_per_unit": 1e-6,
        "wall_over_cpu": 1.0,
        "counters": {
            "batches": 1,
            "at_once": 1,
            "queued": 1,
            "refused": 0,
            "express": 0,
            "abandoned": 0,
            "restarts": 0,
        },
    }


def test_a_fresh_batcher(rig):
    r = rig(processes=3)
    assert r.batcher.state() == {
        "processes": 3,
        "express_processes": 0,
        "busy_processes": 0,
        "queued_requests": 0,
        "admitted_images": 0,
        "admitted_units": 0,
        "queued_seconds": 0.0,
        "seconds_per_unit": PRIOR_SECONDS_PER_UNIT,
        "wall_over_cpu": 1.0,
        "counters": {
            "batches": 0,
            "at_once": 0,
            "queued": 0,
            "refused": 0,
            "express": 0,
            "abandoned": 0,
            "restarts": 0,
        },
    }
    assert r.batcher.ready and r.batcher.info is INFO and len(r.farm.made) == 3


@pytest.mark.parametrize("wait_hangs", [False, True])
def test_close_lets_each_process_finish_then_kills_a_stuck_one(rig, wait_hangs):
    r = rig(processes=2, work_timeout_s=0.25)
    for work in r.farm.made:
        work.proc.wait_hangs = wait_hangs

    r.batcher.close()

    assert not r.batcher.ready
    for work in r.farm.made:
        assert work.closed == [False]  # closed without a kill: it finishes its batch
        assert work.proc.waited == [0.25]
        assert work.proc.killed is wait_hangs


def test_no_metrics_recorder_is_needed(clock):
    farm = Farm(clock)
    batcher = Batcher(farm, 1, ServiceConfig(), None)

    async def scenario():
        farm.hold = asyncio.Event()
        first = await submitted(batcher.submit(InputKind.PIXELS, pixels(1), 1))
        gone = await submitted(batcher.submit(InputKind.PIXELS, pixels(1), 1))
        gone.cancel()
        farm.hold.set()
        done = await first
        farm.made[0].fail = WorkerFailed("killed")
        error = await refused(batcher.submit(InputKind.PIXELS, pixels(1), 1))
        await until(lambda: batcher.processes, "the replacement started")
        return done, error

    done, error = run(scenario())
    assert done.log_probs.shape == (1, 10) and error.status == 503
    assert (batcher.counters.abandoned, batcher.counters.restarts) == (1, 1)


# ---- the golden-set checks ------------------------------------------------------------------------------------
CHECK_EVERY_S = 0.01  # asyncio's own clock (the fake clock only times batches)


def test_the_start_up_checks_are_counted(rig):
    r = rig(processes=2, express=1)
    assert r.metrics.golden == [None, None, None] and r.batcher.ready and r.batcher.problem is None


def test_idle_processes_are_checked_periodically(rig):
    async def scenario():
        r = rig(processes=2)
        r.batcher.start_checks(CHECK_EVERY_S)
        seen_idle = []

        def rounds():
            seen_idle.append(len(r.batcher.idle))
            return all(w.checks >= 2 for w in r.farm.made)

        await until(rounds, "two rounds of checks")
        assert min(seen_idle) >= 1  # one process at a time: the other stays in service
        await until(lambda: len(r.batcher.idle) == 2, "both back in service")
        assert r.batcher.ready
        assert (await r.batcher.submit(InputKind.PIXELS, pixels(1), 1)).log_probs.shape == (1, 10)
        r.batcher.closing = True

    run(scenario())


def test_a_busy_process_is_checked_after_its_batch_before_the_next(rig):
    async def scenario():
        r = rig(processes=1)
        hold = busy(r)
        first = await submitted(r.batcher.submit(InputKind.PIXELS, pixels(1), 1))
        await settled()
        r.batcher.start_checks(CHECK_EVERY_S)
        await until(lambda: r.farm.made[0] in r.batcher.check_due, "a check falls due while it runs")
        assert r.farm.made[0].checks == 0
        hold.set()
        await first
        await until(lambda: r.farm.made[0].checks == 1, "checked once its batch is done")
        r.batcher.closing = True

    run(scenario())


def test_a_failed_check_makes_the_worker_unready_with_its_line(rig):
    async def scenario():
        r = rig(processes=2)
        r.farm.made[1].check_answer = CheckResult("3-photo.jpg: answered 5, exported as 3", 0.4, 40)
        r.batcher.start_checks(CHECK_EVERY_S)
        await until(lambda: r.batcher.problem is not None, "the failure is seen")
        assert not r.batcher.ready
        assert r.batcher.problem == "the golden-set check failed: 3-photo.jpg: answered 5, exported as 3"
        assert "3-photo.jpg: answered 5, exported as 3" in r.metrics.golden
        r.batcher.closing = True

    run(scenario())


def test_a_non_finite_output_makes_the_worker_unready(rig):
    async def scenario():
        r = rig(processes=1)
        r.farm.made[0].problem = "the model's output is not finite for request 7"
        await r.batcher.submit(InputKind.PIXELS, pixels(1), 1)
        assert not r.batcher.ready and r.batcher.problem == "the model's output is not finite for request 7"

    run(scenario())
