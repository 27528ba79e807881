"""The one batcher and its work processes, in process: real work processes, real ONNX Runtime, real images.

Every assertion is on what the batcher counted or answered, never on a stopwatch."""

import asyncio
import dataclasses
import os
import signal

import numpy as np
import pytest

from service.config import ServiceConfig
from service.engine.batcher import start_batcher
from service.engine.messages import Batch, Init, InputKind, Job, work_units
from service.errors import RequestError
from tests.service.conftest import big_png, png_bytes

pytestmark = pytest.mark.slow


class Recorder:
    """Takes the batcher's metric calls: the images of every model call, in order."""

    def __init__(self):
        self.model_images = []

    def observe_batch(self, stats, seconds):
        self.model_images.append(stats.model_images)

    def observe_answer(self, digits, confidences, prepare_s=None, not_digits=0):
        pass

    def observe_golden(self, result):
        pass


@pytest.fixture(scope="module")
def make_batcher(book_export):
    made = []

    def make(recorder=None, **settings):
        batcher = start_batcher(book_export.out, book_export.manifest, ServiceConfig(**settings), recorder)
        made.append(batcher)
        return batcher

    yield make
    for batcher in made:
        batcher.close()


@pytest.fixture(scope="module")
def digits(mnist_test):
    images, labels = mnist_test
    return [png_bytes(images[i].numpy()) for i in range(64)], labels[:64].tolist()


def test_a_lone_request_after_a_burst_is_dispatched_at_once(make_batcher, digits):
    batcher = make_batcher()
    files, labels = digits

    async def scenario():
        burst = await asyncio.gather(*(batcher.submit(InputKind.ENCODED, [files[i]], 1) for i in range(64)))
        after_burst = dataclasses.replace(batcher.counters)
        lone = await batcher.submit(InputKind.ENCODED, [files[0]], 1)
        return burst, after_burst, lone

    burst, after_burst, lone = asyncio.run(scenario())
    assert sum(int(d.log_probs.argmax()) == y for d, y in zip(burst, labels)) >= 62
    assert after_burst.queued > 0, "the burst never queued: it was not a burst"
    assert after_burst.batches < 64, "the burst was not batched"
    assert batcher.counters.at_once == after_burst.at_once + 1  # the lone request waited for nothing
    assert batcher.counters.last_batch == [1]  # and ran alone
    assert int(lone.log_probs.argmax()) == labels[0]


def test_answers_go_to_their_own_requests(make_batcher, digits, mnist_test):
    batcher = make_batcher()
    files, labels = digits
    bad = b"not an image"

    async def scenario():
        jobs = [batcher.submit(InputKind.ENCODED, [files[i], files[i + 1]], 2) for i in range(0, 40, 2)]
        jobs.insert(7, batcher.submit(InputKind.ENCODED, [bad], 1))
        return await asyncio.gather(*jobs, return_exceptions=True)

    answers = asyncio.run(scenario())
    failed = answers.pop(7)
    assert isinstance(failed, RequestError) and failed.status == 400 and "not an image" in failed.message
    digits_seen = [int(d) for answer in answers for d in answer.log_probs.argmax(axis=1)]
    assert sum(a == b for a, b in zip(digits_seen, labels[:40])) >= 39


def test_a_full_queue_refuses_at_once_with_retry_after(make_batcher, digits):
    batcher = make_batcher(max_queue_images=4, retry_after_s=3)
    files, _ = digits

    async def scenario():
        first = asyncio.ensure_future(batcher.submit(InputKind.ENCODED, files[:4], 4))
        await asyncio.sleep(0)  # the first request is admitted and holds the whole queue
        with pytest.raises(RequestError) as refused:
            await batcher.submit(InputKind.ENCODED, files[:1], 1)
        return await first, refused.value

    first, refused = asyncio.run(scenario())
    assert refused.status == 503 and refused.reason == "overloaded" and refused.retry_after == 3
    assert "limit is 4" in refused.message
    assert len(first.log_probs) == 4
    assert batcher.counters.refused == 1


def test_batches_are_bounded_in_images(make_batcher, digits):
    recorder = Recorder()
    batcher = make_batcher(recorder, max_batch_size=8)
    files, _ = digits

    async def scenario():  # 12 requests of 3 images, all queued while the first runs
        return await asyncio.gather(*(batcher.submit(InputKind.ENCODED, files[:3], 3) for _ in range(12)))

    asyncio.run(scenario())
    assert recorder.model_images == [3, 6, 6, 6, 6, 6, 3]  # the first alone, then two by two: 9 would pass 8


def test_batching_off_runs_each_request_alone(make_batcher, digits):
    batcher = make_batcher(batching=False)
    files, _ = digits

    async def scenario():
        return await asyncio.gather(*(batcher.submit(InputKind.ENCODED, [files[i]], 1) for i in range(16)))

    asyncio.run(scenario())
    assert batcher.counters.batches == 16 and batcher.counters.queued > 0


def test_a_process_that_died_idle_is_replaced_and_the_next_request_waits_for_it(make_batcher, digits):
    batcher = make_batcher()
    files, labels = digits
    victim = batcher.processes[0].proc

    async def scenario():
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        # no 503: the express process answers it (every other process is being replaced), or the replacement does
        answer = await batcher.submit(InputKind.ENCODED, [files[1]], 1)
        while batcher.restarting:  # the replacement is started in a thread: let it finish on this loop
            await asyncio.sleep(0.05)
        return answer

    answer = asyncio.run(scenario())
    assert int(answer.log_probs.argmax()) == labels[1]
    pids = [process.proc.pid for process in batcher.processes]
    assert batcher.counters.restarts == 1 and victim.pid not in pids and len(pids) == 2  # replaced


def test_a_crash_costs_only_its_batch(make_batcher, digits):
    """The requests that queue behind a batch whose process dies are answered by the replacement."""
    batcher = make_batcher()
    files, labels = digits
    victim = batcher.processes[0].proc

    async def scenario():
        doomed = asyncio.ensure_future(batcher.submit(InputKind.ENCODED, [big_png(5000)] * 2, 2))
        while batcher.state()["busy_processes"] == 0:
            await asyncio.sleep(0.01)
        behind = [asyncio.ensure_future(batcher.submit(InputKind.ENCODED, [files[i]], 1)) for i in range(4)]
        await asyncio.sleep(0.05)
        os.kill(victim.pid, signal.SIGKILL)
        after = await asyncio.gather(*behind, batcher.submit(InputKind.ENCODED, [files[4]], 1))
        with pytest.raises(RequestError) as failed:
            await doomed
        return failed.value, after

    failed, after = asyncio.run(scenario())
    assert failed.status == 503 and "restarted" in failed.message
    assert [int(a.log_probs.argmax()) for a in after] == labels[:5]
    assert batcher.counters.restarts == 1


def test_pixel_arrays_and_json_take_the_same_path(make_batcher, mnist_test):
    batcher = make_batcher()
    images, labels = mnist_test
    pixels = (images[:8].numpy() / 255.0).astype(np.float32)
    body = ('{"images": ' + str(pixels.tolist()) + "}").encode()

    async def scenario():
        return await asyncio.gather(
            batcher.submit(InputKind.PIXELS, pixels, 8), batcher.submit(InputKind.JSON, body, 8)
        )

    from_pixels, from_json = asyncio.run(scenario())
    np.testing.assert_array_equal(from_pixels.log_probs, from_json.log_probs)
    assert from_pixels.log_probs.argmax(axis=1).tolist() == labels[:8].tolist()


def test_the_queue_is_bounded_in_seconds_of_work_too(make_batcher, digits):
    batcher = make_batcher(max_queue_s=1e-6, retry_after_s=1)
    files, _ = digits

    async def scenario():
        await batcher.submit(InputKind.ENCODED, files[:2], 2)  # one batch measured: the time per image is known
        running = asyncio.ensure_future(batcher.submit(InputKind.ENCODED, files[:1], 1))
        await asyncio.sleep(0)
        with pytest.raises(RequestError) as refused:
            await batcher.submit(InputKind.ENCODED, files[:1], 1)
        await running
        return refused.value

    refused = asyncio.run(scenario())
    assert refused.status == 503 and "s of work queued and the limit is 1e-06 s" in refused.message
    assert refused.retry_after >= 1


def test_the_queue_prices_requests_by_the_pixels_they_declare(make_batcher, digits):
    """Small requests teach the batcher a price per unit of work; behind a running request, one that declares
    many pixels is priced at many times a small one with as many images: refused past the queue's bound in
    seconds, where the small one is let in. (A price per image let twenty 25-megapixel requests in; a price per
    pixel alone, learned on 28x28 images, refused every large one.)"""
    batcher = make_batcher()
    files, _ = digits

    async def scenario():
        for _ in range(20):  # the price is a moving average: enough batches to forget the prior
            await batcher.submit(InputKind.ENCODED, files[:8], 8)  # 8 x 784 pixels each
        # a bound of 50 small images' work at the price learned (CPU time: it follows the machine's speed)
        bound = 50 * work_units(InputKind.ENCODED, 784, 1) * batcher.seconds_per_unit
        batcher.config = dataclasses.replace(batcher.config, max_queue_s=bound)
        running = asyncio.ensure_future(batcher.submit(InputKind.ENCODED, files[:1], 1))
        await asyncio.sleep(0)
        small = asyncio.ensure_future(batcher.submit(InputKind.ENCODED, files[:2], 2))
        await asyncio.sleep(0)
        with pytest.raises(RequestError) as refused:
            await batcher.submit(InputKind.ENCODED, [big_png(5000), big_png(5000)], 2)  # 50 megapixels declared
        await asyncio.gather(running, small)
        return bound, refused.value, small.result()

    bound, refused, small = asyncio.run(scenario())
    assert refused.status == 503 and f"s of work queued and the limit is {bound:g} s" in refused.message
    assert len(small.log_probs) == 2


def test_a_fresh_batcher_takes_a_burst_after_its_first_request(make_batcher, digits):
    """The work process imports and runs the preprocessing before it reports ready: a first request that paid
    for the imports (0.25 s here) taught the batcher a price that refused the first burst after start-up."""
    batcher = make_batcher()
    files, _ = digits

    async def scenario():
        await batcher.submit(InputKind.ENCODED, [files[0]], 1)
        return await asyncio.gather(*(batcher.submit(InputKind.ENCODED, [files[i]], 1) for i in range(48)))

    answers = asyncio.run(scenario())
    assert len(answers) == 48 and batcher.counters.refused == 0


def test_refused_requests_do_not_talk_the_price_down(make_batcher, digits):
    """A truncated PNG that declares 25 megapixels is refused at once: a batch of them must not teach the batcher
    that 25 megapixels cost nothing (else a burst of real large images behind them would be priced at ~0)."""
    batcher = make_batcher()
    files, _ = digits
    truncated = big_png(5000)[:64]  # its header, no pixel data

    async def scenario():
        for _ in range(10):
            await batcher.submit(InputKind.ENCODED, files[:8], 8)
        learned = batcher.seconds_per_unit
        for _ in range(20):
            with pytest.raises(RequestError) as refused:
                await batcher.submit(InputKind.ENCODED, [truncated], 1)
            assert refused.value.status == 400
        return learned, batcher.seconds_per_unit

    learned, after = asyncio.run(scenario())
    assert learned > 0 and after == learned


def test_a_batch_holds_at_most_one_requests_pixel_budget(make_batcher, digits):
    recorder = Recorder()
    batcher = make_batcher(recorder, max_request_pixels=1_000)
    files, _ = digits

    async def scenario():  # each request declares 784 pixels: two would pass the 1,000 of a batch
        return await asyncio.gather(*(batcher.submit(InputKind.ENCODED, files[:1], 1) for _ in range(6)))

    asyncio.run(scenario())
    assert recorder.model_images == [1] * 6


def test_a_refused_request_keeps_nothing_alive_in_the_work_process(book_export, digits):
    """The answer for a failed request is a fresh error: the raised one's traceback would hold every image the
    request had decoded (the work process has no reason to collect garbage soon)."""
    from service.engine.work import Work

    config = ServiceConfig()
    work = Work(Init(str(book_export.out), book_export.manifest, "onnx", config.work_settings()))
    files, _ = digits
    truncated = files[2][: len(files[2]) // 2]  # its header reads; its pixels do not
    done = work.run(Batch(7, [Job(1, InputKind.ENCODED, [files[0], files[1], truncated], False, None)]))
    failed, stats = done.answers[1], done.stats
    assert isinstance(failed, RequestError) and failed.status == 400 and "images[2]" in failed.message
    assert failed.__traceback__ is None and failed.__context__ is None and failed.__cause__ is None
    assert stats.decoded_images == 3 and stats.model_images == 0


def test_requests_whose_clients_left_are_dropped_unrun(make_batcher, digits):
    batcher = make_batcher()
    files, _ = digits

    async def scenario():
        first = asyncio.ensure_future(batcher.submit(InputKind.ENCODED, files[:1], 1))
        await asyncio.sleep(0)  # dispatched: the process is busy
        left = asyncio.ensure_future(batcher.submit(InputKind.ENCODED, files[:1], 1))
        await asyncio.sleep(0)  # queued behind it
        left.cancel()  # what the HTTP front does when the client disconnects
        await first
        await batcher.submit(InputKind.ENCODED, files[:1], 1)
        return left

    left = asyncio.run(scenario())
    assert left.cancelled()
    assert batcher.counters.abandoned == 1 and batcher.counters.batches == 2  # the abandoned one never ran
    assert batcher.admitted == 0


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
@pytest.mark.parametrize("batch_policy", [True, False])
def test_work_processes_run_under_sched_batch_unless_turned_off(make_batcher, digits, batch_policy):
    batcher = make_batcher(work_procs=1, express_procs=1, work_batch_scheduling=batch_policy)
    want = os.SCHED_BATCH if batch_policy else os.SCHED_OTHER
    for process in batcher.processes:  # the express process too; and every thread it started
        threads = os.listdir(f"/proc/{process.proc.pid}/task")
        assert {os.sched_getscheduler(int(t)) for t in threads} == {want}
    answer = asyncio.run(batcher.submit(InputKind.ENCODED, [digits[0][0]], 1))
    assert int(answer.log_probs.argmax()) == digits[1][0]
