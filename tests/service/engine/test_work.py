"""service/engine/work.py without a model: ``Work.run`` with a tiny fake runtime, and ``serve`` over a socket pair
in a thread. The decoding and preprocessing are the real ones."""

import io
import json
import socket
import threading

import numpy as np
import pytest
from PIL import Image

from service.config import ServiceConfig
from service.engine import work as work_module
from service.engine.messages import (
    Batch,
    BatchDone,
    BatchStats,
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
from service.engine.work import Work, serve
from service.errors import RequestError
from service.inputs.preprocess import DIGIT_BOX, MNIST_SIDE
from service.model.files import ModelFileError
from tests.service.conftest import big_png
from tests.service.fakes import fake_digit_scores
from training.data import Normalization

NORM = Normalization()
SIDE = MNIST_SIDE
PIXELS = SIDE * SIDE
CLASSES = 10
WEIGHTS = np.linspace(-3.0, 3.0, CLASSES, dtype=np.float32)


class FakeRuntime:
    """Deterministic log-softmax of (each image's mean x fixed weights); counts its calls."""

    name, device, file, sha256 = "fake", "cpu", "fake.onnx", "0f" * 32

    def __init__(self, fail: bool = False):
        self.calls: list[np.ndarray] = []
        self.fail = fail

    def log_probs(self, x: np.ndarray) -> np.ndarray:
        self.calls.append(x.copy())
        if self.fail:
            raise RuntimeError("the device fell over")
        logits = x.reshape(len(x), -1).mean(axis=1, keepdims=True) * WEIGHTS
        shifted = logits - logits.max(axis=1, keepdims=True)
        return (shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))).astype(np.float32)


class FakeDetector:
    threshold = 0.5

    def scores(self, x: np.ndarray) -> np.ndarray:
        return fake_digit_scores(x)


def make_work(limits: ServiceConfig | None = None, runtime: FakeRuntime | None = None) -> Work:
    w = Work.__new__(Work)
    w.limits = limits or ServiceConfig()
    w.mean, w.std = NORM.mean, NORM.std
    w.runtime = runtime or FakeRuntime()
    w.detector = FakeDetector()
    return w


def digit_u8() -> np.ndarray:
    a = np.zeros((SIDE, SIDE), np.uint8)
    top = (SIDE - DIGIT_BOX) // 2
    a[top : top + DIGIT_BOX, SIDE // 2 - 1 : SIDE // 2 + 2] = 255
    return a


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a, mode="L").save(buf, format="PNG")
    return buf.getvalue()


DIGIT = digit_u8().astype(np.float32) / 255
PNG = png(digit_u8())


def encoded_job(id, n=1, want=False, declared=None):
    return Job(id, InputKind.ENCODED, [PNG] * n, want, declared or (PIXELS,) * n, f"req-{id}")


def json_job(id, n=1, return_input=False):
    return Job(
        id,
        InputKind.JSON,
        json.dumps({"images": [DIGIT.tolist()] * n, "return_input": return_input}).encode(),
        False,
        None,
    )


def pixels_job(id, n=1, want=False):
    return Job(id, InputKind.PIXELS, np.stack([DIGIT] * n), want, None)


def normalized_job(id, n=1):
    return Job(id, InputKind.NORMALIZED, np.full((n, 1, SIDE, SIDE), 0.5, np.float32), False, None)


def bad_job(id):
    return Job(id, InputKind.JSON, b"{not json", True, None, f"req-{id}")


def expected_log_probs(x: np.ndarray) -> np.ndarray:
    return FakeRuntime().log_probs(x)


# ---- Work.run -----------------------------------------------------------------------------------------------
def test_the_fake_runtime_gives_log_probabilities_that_depend_on_the_image():
    out = FakeRuntime().log_probs(np.stack([np.zeros((1, SIDE, SIDE)), np.ones((1, SIDE, SIDE))]).astype(np.float32))
    assert out.shape == (2, CLASSES) and out.dtype == np.float32
    np.testing.assert_allclose(np.exp(out).sum(axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(out[0], out[1])


def test_answers_are_keyed_by_job_id_from_one_model_call():
    w = make_work()
    jobs = [encoded_job(11, 2), json_job(12, 1), pixels_job(13, 3), normalized_job(14, 1)]
    done = w.run(Batch(5, jobs))
    assert isinstance(done, BatchDone) and done.id == 5
    assert sorted(done.answers) == [11, 12, 13, 14]
    assert len(w.runtime.calls) == 1 and w.runtime.calls[0].shape == (7, 1, SIDE, SIDE)
    offset = 0
    for job in jobs:
        answer = done.answers[job.id]
        n = 2 if job.id == 11 else 3 if job.id == 13 else 1
        assert isinstance(answer, Done) and answer.log_probs.shape == (n, CLASSES)
        np.testing.assert_array_equal(answer.log_probs, expected_log_probs(w.runtime.calls[0][offset : offset + n]))
        assert answer.batch_images == 7
        offset += n
    assert done.stats.model_images == 7


def test_each_answer_is_its_own_copy():
    done = make_work().run(Batch(1, [pixels_job(1), pixels_job(2)]))
    a, b = done.answers[1].log_probs, done.answers[2].log_probs
    assert a.base is None and b.base is None and not np.shares_memory(a, b)


def test_the_model_sees_normalized_images():
    w = make_work()
    w.run(Batch(1, [pixels_job(1)]))
    np.testing.assert_allclose(w.runtime.calls[0][0, 0], (DIGIT - NORM.mean) / NORM.std, rtol=1e-6)


@pytest.mark.parametrize(
    "bad",
    [
        bad_job(2),
        Job(2, InputKind.ENCODED, [b"not an image"], False, (PIXELS,)),
        Job(2, InputKind.PIXELS, [], False, None),
        Job(2, InputKind.PIXELS, np.full((1, SIDE, SIDE), 2.0, np.float32), False, None),
        Job(2, InputKind.ENCODED, [PNG], False, (PIXELS - 1,)),
    ],
    ids=["invalid json", "not an image", "no images", "out of range", "inconsistent header"],
)
def test_a_bad_job_fails_alone_with_a_fresh_request_error(bad):
    w = make_work()
    done = w.run(Batch(3, [encoded_job(1), bad, pixels_job(3)]))
    error = done.answers[2]
    assert isinstance(error, RequestError) and 400 <= error.status < 500
    assert error.__traceback__ is None and error.__context__ is None and error.__cause__ is None
    assert isinstance(done.answers[1], Done) and isinstance(done.answers[3], Done)
    assert len(w.runtime.calls) == 1 and w.runtime.calls[0].shape[0] == 2  # the bad job is not in the model call
    assert done.stats.model_images == 2 and done.answers[1].batch_images == 2


def test_a_bad_job_keeps_its_status_reason_and_message():
    done = make_work(ServiceConfig(max_request_pixels=PIXELS)).run(Batch(1, [encoded_job(1, 2)]))
    error = done.answers[1]
    assert (error.status, error.reason) == (413, "over_budget") and f"limit per request is {PIXELS}" in error.message


def test_a_bug_while_preparing_is_a_500():
    w = make_work()
    done = w.run(Batch(1, [Job(1, "no such kind", b"", False, None), pixels_job(2)]))
    error = done.answers[1]
    assert isinstance(error, RequestError) and (error.status, error.reason) == (500, "internal")
    assert error.__traceback__ is None and error.__context__ is None
    assert isinstance(done.answers[2], Done)


def test_only_bad_jobs_means_no_model_call():
    w = make_work()
    done = w.run(Batch(4, [bad_job(1), bad_job(2)]))
    assert w.runtime.calls == []
    assert all(isinstance(done.answers[i], RequestError) for i in (1, 2))
    # a body refused at its first bytes did no parsing work: its bytes count for nothing (invalid JSON sent to
    # talk the price down once made the price fall 150-340x)
    assert done.stats == BatchStats(0, 0, 0, done.stats.cpu_ns, 0)


def test_a_batch_reports_the_work_it_really_did_and_its_cpu_time():
    """What the batcher learns its price from: the pixels Pillow found (not what the batcher was told a header
    declared: an AVIF, which the batcher cannot read, is priced as the largest image), per image a fixed cost,
    a JSON body's bytes, and the CPU time of the whole batch."""
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(buf, format="AVIF")
    avif = Job(1, InputKind.ENCODED, [buf.getvalue()], False, (25_000_000,))
    body = json_job(3, 2).payload
    done = make_work().run(Batch(1, [avif, encoded_job(2, 2), json_job(3, 2), pixels_job(4, 3)]))
    assert all(isinstance(done.answers[i], Done) for i in (1, 2, 3, 4))
    expected = (
        work_units(InputKind.ENCODED, 64, 1)
        + work_units(InputKind.ENCODED, 2 * PIXELS, 2)
        + work_units(InputKind.JSON, 2 * PIXELS, 2, len(body))
        + work_units(InputKind.PIXELS, 3 * PIXELS, 3)
    )
    assert done.stats.units == expected and done.stats.cpu_ns > 0


@pytest.mark.parametrize("kind", ["jpeg comments", "png chunks"])
def test_a_file_costly_to_parse_for_its_size_is_stopped_at_its_cpu_budget(monkeypatch, kind):
    """A 28x28 digit padded with 4-byte JPEG comments after its frame header, or empty PNG chunks before its
    pixels: Pillow parses them one by one in Python (10 MiB of them took 2.5-2.9 s, the request priced as one
    28x28 image). The work process's profiling timer stops it at its budget; the next request is served."""
    import struct
    import zlib

    monkeypatch.setattr(work_module, "DECODE_BUDGET_S", 0.02)
    if kind == "jpeg comments":
        buf = io.BytesIO()
        Image.fromarray(digit_u8()).save(buf, format="JPEG")
        jpg = buf.getvalue()
        sos = jpg.index(b"\xff\xda")
        bomb = jpg[:sos] + b"\xff\xfe\x00\x02" * 500_000 + jpg[sos:]
    else:
        empty = struct.pack(">I", 0) + b"zzZz" + struct.pack(">I", zlib.crc32(b"zzZz") & 0xFFFFFFFF)
        at = PNG.index(b"IDAT") - 4
        bomb = PNG[:at] + empty * 200_000 + PNG[at:]
    w = make_work()
    work_module._CpuBudget.install()  # as Work() does (make_work skips its model loading)
    done = w.run(Batch(1, [Job(1, InputKind.ENCODED, [bomb], False, (PIXELS,)), encoded_job(2)]))
    error = done.answers[1]
    assert (error.status, error.reason) == (413, "over_budget") and "s of CPU" in error.message
    assert isinstance(done.answers[2], Done)  # the other request of the batch is served
    assert isinstance(w.run(Batch(2, [encoded_job(3)])).answers[3], Done)  # and the next batch


def test_a_file_that_fails_to_decode_did_no_work():
    """A truncated PNG whose header says 25 megapixels: Pillow opens it at that size, then finds no pixel data.
    Counting its header's pixels as work done would teach the batcher that 25 megapixels cost nothing."""
    truncated = big_png(5000)[:64]
    done = make_work().run(Batch(1, [Job(1, InputKind.ENCODED, [truncated], False, (25_000_000,))]))
    assert done.answers[1].status == 400
    assert done.stats.units == 0 and done.stats.decoded_pixels == 25_000_000  # tried, not done


def test_an_empty_batch():
    w = make_work()
    done = w.run(Batch(9, []))
    assert (done.id, done.answers, done.stats.model_images, w.runtime.calls) == (9, {}, 0, [])


@pytest.mark.parametrize(
    "job, seen",
    [
        (encoded_job(1, 2, want=True), np.stack([DIGIT] * 2)),
        (pixels_job(1, 3, want=True), np.stack([DIGIT] * 3)),
        (json_job(1, 1, return_input=True), DIGIT[None]),
        (encoded_job(1, 2, want=False), None),
        (pixels_job(1, 1, want=False), None),
        (json_job(1, 1, return_input=False), None),
        (normalized_job(1), None),
    ],
    ids=[
        "encoded",
        "pixels",
        "json return_input",
        "encoded not asked",
        "pixels not asked",
        "json not asked",
        "normalized",
    ],
)
def test_want_inputs_returns_the_28x28_images(job, seen):
    answer = make_work().run(Batch(1, [job])).answers[1]
    if seen is None:
        assert answer.inputs is None
    else:
        assert answer.inputs.shape == seen.shape and answer.inputs.dtype == np.float32
        np.testing.assert_array_equal(answer.inputs, seen)


def test_timings_are_ordered():
    done = make_work().run(Batch(1, [encoded_job(1), pixels_job(2), json_job(3)]))
    answers = [done.answers[i] for i in (1, 2, 3)]
    for a in answers:
        assert 0 < a.prepare_start_ns <= a.prepare_end_ns <= a.model_start_ns <= a.model_end_ns
        assert a.prepare_s >= 0
        assert (a.model_start_ns, a.model_end_ns) == (answers[0].model_start_ns, answers[0].model_end_ns)  # one call
    assert answers[0].prepare_end_ns <= answers[1].prepare_start_ns <= answers[1].prepare_end_ns
    assert answers[1].prepare_end_ns <= answers[2].prepare_start_ns


@pytest.mark.parametrize(
    "jobs, decoded_images, model_images",
    [
        ([encoded_job(1, 2), encoded_job(2, 3)], 5, 5),
        ([encoded_job(1, 2), pixels_job(2, 4)], 2, 6),
        ([pixels_job(1, 2), json_job(2, 1), normalized_job(3, 2)], 0, 5),
        ([encoded_job(1, 1), Job(2, InputKind.ENCODED, [PNG, PNG[:60]], False, (PIXELS, PIXELS))], 3, 1),
        ([bad_job(1)], 0, 0),
    ],
    ids=["encoded", "mixed", "no files", "a truncated file is decoded, then fails", "all bad"],
)
def test_batch_stats_counts(jobs, decoded_images, model_images):
    done = make_work().run(Batch(1, jobs))
    assert done.stats.decoded_images == decoded_images and done.stats.model_images == model_images
    assert done.stats.decoded_pixels == decoded_images * PIXELS


def test_a_file_over_budget_is_not_decoded():
    done = make_work(ServiceConfig(max_request_pixels=PIXELS)).run(Batch(1, [encoded_job(1, 2), encoded_job(2, 1)]))
    assert isinstance(done.answers[1], RequestError) and isinstance(done.answers[2], Done)
    assert (done.stats.decoded_images, done.stats.decoded_pixels) == (1, PIXELS)


def test_a_failing_runtime_gives_every_prepared_job_a_500():
    w = make_work(runtime=FakeRuntime(fail=True))
    done = w.run(Batch(2, [encoded_job(1), bad_job(2), pixels_job(3, 2)]))
    assert len(w.runtime.calls) == 1
    assert done.answers[2].status == 400  # failed before the model, keeps its own answer
    for i in (1, 3):
        error = done.answers[i]
        assert isinstance(error, RequestError) and (error.status, error.reason) == (500, "internal")
        assert "model failed" in error.message
    assert done.stats.model_images == 0 and done.stats.decoded_images == 1


def test_info_is_the_runtimes():
    assert make_work().info == RuntimeInfo("fake", "cpu", "fake.onnx", "0f" * 32)


# ---- serve --------------------------------------------------------------------------------------------------
def init_message(**limits) -> Init:
    settings = {**ServiceConfig().work_settings(), **limits}
    return Init("/nowhere", {"normalization": NORM.to_dict()}, "onnx", settings)


class Conversation:
    """``serve`` on one end of a socket pair in a thread, which closes its end when ``serve`` returns (as
    ``main`` does); the test is the HTTP worker on the other end, with a timeout so that a hang fails."""

    def __init__(self):
        self.ours, theirs = socket.socketpair()
        self.ours.settimeout(10)
        self.result = {}

        def run():
            with theirs:
                self.result["rc"] = serve(theirs)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def finish(self) -> int:
        self.ours.close()
        self.thread.join(10)
        assert not self.thread.is_alive()
        return self.result["rc"]


@pytest.fixture
def fake_work(monkeypatch):
    made = []

    class FakeWork(Work):
        def __init__(self, init: Init):
            self.limits = ServiceConfig(**init.limits)
            self.mean, self.std = init.manifest["normalization"]["mean"], init.manifest["normalization"]["std"]
            self.runtime = FakeRuntime()
            self.detector = FakeDetector()
            self.checked = None
            made.append(self)

    monkeypatch.setattr(work_module, "Work", FakeWork)
    return made


def test_serve_answers_ready_then_batches_then_exits_on_close(fake_work):
    talk = Conversation()
    send(talk.ours, init_message(max_images_per_request=3))
    ready = receive(talk.ours)
    assert isinstance(ready, Ready) and ready.info == RuntimeInfo("fake", "cpu", "fake.onnx", "0f" * 32)
    send(talk.ours, Batch(1, [encoded_job(1, 2, want=True), bad_job(2)]))
    first = receive(talk.ours)
    send(talk.ours, Batch(2, [pixels_job(3, 4)]))  # over the limit the Init carried
    second = receive(talk.ours)
    assert talk.finish() == 0
    assert isinstance(first, BatchDone) and first.id == 1 and sorted(first.answers) == [1, 2]
    assert isinstance(first.answers[1], Done) and first.answers[1].inputs.shape == (2, SIDE, SIDE)
    assert isinstance(first.answers[2], RequestError) and first.answers[2].status == 400
    assert first.stats.model_images == 2
    assert second.id == 2 and second.answers[3].status == 413
    (work,) = fake_work
    assert (work.mean, work.std, work.limits.max_images_per_request) == (NORM.mean, NORM.std, 3)
    assert len(work.runtime.calls) == 1


def test_serve_returns_at_once_when_closed_before_init(fake_work):
    talk = Conversation()
    assert talk.finish() == 0 and fake_work == []


@pytest.mark.parametrize(
    "error, reason",
    [
        (ModelFileError("/m/manifest.json is missing; re-export the model"), "/m/manifest.json is missing; re-export"),
        (RuntimeError("  CUDA out of memory\n"), "RuntimeError: CUDA out of memory"),
    ],
    ids=["model file", "runtime"],
)
def test_an_init_that_fails_sends_failed(monkeypatch, error, reason):
    class BrokenWork(Work):
        def __init__(self, init):
            raise error

    monkeypatch.setattr(work_module, "Work", BrokenWork)
    talk = Conversation()
    send(talk.ours, init_message())
    failed = receive(talk.ours)
    assert isinstance(failed, Failed) and failed.reason.startswith(reason)
    assert receive(talk.ours) is None  # it stops after saying so
    assert talk.finish() == 1


class NaNRuntime(FakeRuntime):
    """A broken model: NaN for every image."""

    def log_probs(self, x: np.ndarray) -> np.ndarray:
        return np.full((len(x), CLASSES), np.nan, np.float32)


def test_a_non_finite_output_is_never_an_answer_and_reports_the_process_unfit():
    w = make_work(runtime=NaNRuntime())
    done = w.run(Batch(9, [pixels_job(1), encoded_job(2), normalized_job(3)]))
    for job_id in (1, 2):  # images in 0..1: the model is broken, a 503 and the process unfit
        assert isinstance(done.answers[job_id], RequestError) and done.answers[job_id].status == 503
    assert done.problem == "the model's output is not finite for request 1"
    # the network's own input: the client's values; its adapter answers a 400 (service/protocols/v2.py)
    assert isinstance(done.answers[3], Done) and np.isnan(done.answers[3].log_probs).all()


def test_answers_carry_the_detectors_scores():
    w = make_work()
    blank = Job(4, InputKind.PIXELS, np.zeros((1, SIDE, SIDE), np.float32), False, None)
    done = w.run(Batch(1, [pixels_job(1, 2), blank]))
    assert done.problem is None
    assert done.answers[1].digit_scores.tolist() == pytest.approx([0.9, 0.9])
    assert done.answers[4].digit_scores.tolist() == pytest.approx([0.1])
