"""The worker's side of the store, in process over a real SQLite file: answers remembered in batches, feedback
committed before it returns, a store that fails costing feedback its 503 and never a prediction."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from service.config import ServiceConfig
from service.feedback import recorder as recorder_module
from service.feedback.recorder import Recorder, StoreUnavailable
from service.feedback.store import DuplicateFeedback, UnknownAnswer, open_store

TAG = "mnist-convnet:test"


class Gauges:
    """What the recorder reports to the metrics (the Prometheus side is tested on a real server)."""

    def __init__(self):
        self.accuracy = {}

    def set_online_accuracy(self, model, correct, labels):
        self.accuracy[model] = (correct, labels)


def make(tmp_path, **settings) -> Recorder:
    config = dataclasses.replace(ServiceConfig(), **settings)
    return Recorder(str(tmp_path / "f.sqlite3"), TAG, config, Gauges())


def test_an_answer_takes_feedback_at_once_and_only_once(tmp_path):
    rec = make(tmp_path)

    async def scenario():
        rec.remember("req-1", [4, 9], [0.8, 0.6], [True, True], None)
        stored = await rec.feedback("req-1", 1, "4")  # no wait: the answer is flushed before the lookup
        with pytest.raises(DuplicateFeedback):
            await rec.feedback("req-1", 1, "4")
        with pytest.raises(UnknownAnswer):
            await rec.feedback("req-2", 0, "4")
        return stored

    stored = asyncio.run(scenario())
    assert (stored.answer.digit, stored.correct, stored.answer.image) == (9, False, None)
    rec.close()
    assert open_store(str(tmp_path / "f.sqlite3")).counts() == {"answers": 2, "feedback": 1}


def test_images_are_kept_only_when_asked_as_the_28x28_the_model_saw(tmp_path):
    seen = np.zeros((1, 28, 28), np.float32)
    seen[0, 3, 4] = 1.0
    seen[0, 5, 6] = 0.5
    for keep in (False, True):
        rec = make(tmp_path / str(keep), feedback_images=keep)

        async def scenario(rec=rec):
            rec.remember("r", [1], [0.9], [True], seen)
            return await rec.feedback("r", 0, "1")

        stored = asyncio.run(scenario())
        rec.close()
        if not keep:
            assert stored.answer.image is None
        else:
            pixels = np.frombuffer(stored.answer.image, np.uint8).reshape(28, 28)
            assert (pixels[3, 4], pixels[5, 6], int(pixels.sum())) == (255, 128, 383)


def test_an_answer_given_by_another_worker_is_found_after_its_flush(tmp_path):
    first, second = make(tmp_path), make(tmp_path)  # two workers, one SQLite file

    async def scenario():
        first.remember("elsewhere", [2], [0.7], [True], None)
        return await second.feedback("elsewhere", 0, "2")

    assert asyncio.run(scenario()).correct
    first.close()
    second.close()


def test_accuracy_gauges_come_from_the_store(tmp_path, monkeypatch):
    monkeypatch.setattr(recorder_module, "ACCURACY_S", 0.0)
    rec = make(tmp_path, accuracy_window=3)

    async def scenario():
        for i, label in enumerate(["1", "1", "2", "1"]):
            rec.remember(f"r{i}", [1], [0.9], [True], None)
            await rec.feedback(f"r{i}", 0, label)
        await asyncio.sleep(4 * recorder_module.FLUSH_S)

    asyncio.run(scenario())
    rec.close()
    assert rec.metrics.accuracy[TAG] == (2, 3)  # the last three labels: 1 right, 2 wrong, 1 right


def test_a_failing_store_gives_503s_then_recovers(tmp_path, monkeypatch):
    monkeypatch.setattr(recorder_module, "RETRY_S", 0.5)
    rec = make(tmp_path)
    path = tmp_path / "f.sqlite3"

    async def scenario():
        rec.remember("before", [3], [0.9], [True], None)
        await asyncio.sleep(3 * recorder_module.FLUSH_S)
        rec.store.close()  # as if the connection broke
        rec.store.conn = None
        rec.remember("during", [3], [0.9], [True], None)  # a prediction never fails for the store
        with pytest.raises(StoreUnavailable):
            await rec.feedback("before", 0, "3")
        await asyncio.sleep(0.6)  # past RETRY_S: the next try reconnects, and the answer that waited is written
        return await rec.feedback("before", 0, "3"), await rec.feedback("during", 0, "3")

    first, second = asyncio.run(scenario())
    assert first.correct and second.correct
    rec.close()
    assert open_store(str(path)).counts()["feedback"] == 2


def test_a_store_that_cannot_be_opened_at_start_costs_feedback_a_503_not_the_worker(tmp_path):
    (tmp_path / "file").write_text("")
    rec = Recorder(str(tmp_path / "file" / "f.sqlite3"), TAG, ServiceConfig())

    async def scenario():
        rec.remember("r", [1], [0.9], [True], None)
        with pytest.raises(StoreUnavailable, match="cannot be opened"):
            await rec.feedback("r", 0, "1")

    asyncio.run(scenario())
    rec.close()


def test_answers_past_the_pending_bound_are_dropped_not_queued(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(recorder_module, "MAX_PENDING", 2)
    rec = make(tmp_path)

    async def scenario():
        rec.remember("big", [1, 2, 3], [0.9] * 3, [True] * 3, None)  # more than the store may have waiting
        rec.remember("small", [1], [0.9], [True], None)
        with pytest.raises(UnknownAnswer):
            await rec.feedback("big", 0, "1")
        return await rec.feedback("small", 0, "1")

    assert asyncio.run(scenario()).correct
    rec.close()
    assert "3 answers were not remembered for feedback" in caplog.text
