"""The request timeout that lets go of finished requests (BentoML's own keeps each one alive for 30 s)."""

import asyncio
import gc
import io

import numpy as np
import pytest
from PIL import Image

from service.bentoml_glue import ReleasingTimeoutMiddleware

pytestmark = pytest.mark.slow


def _live_request_timers() -> list:
    gc.collect()
    # type(), not isinstance(): isinstance reads __class__, which some of torch's deprecated aliases warn on
    return [
        h
        for h in gc.get_objects()
        if type(h) is asyncio.TimerHandle
        and not h.cancelled()
        and getattr(h._callback, "__name__", "") == "_set_timer_out"
    ]


def test_served_requests_leave_no_timers_behind(http):
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)).save(buf, format="PNG")
    for _ in range(50):
        resp = http.post("/predict", files=[("images", ("a.png", buf.getvalue(), "image/png"))])
        assert resp.status_code == 200
    assert _live_request_timers() == []


async def _asgi_call(app, path="/"):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app({"type": "http", "method": "GET", "path": path, "headers": []}, receive, send)
    return sent


async def _answer(send, status=200):
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_timeout_answers_504_and_cancels_the_handler():
    cancelled = asyncio.Event()

    async def slow(scope, receive, send):
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        await _answer(send)

    async def run():
        sent = await _asgi_call(ReleasingTimeoutMiddleware(slow, timeout=0.05))
        await asyncio.sleep(0)
        return sent

    sent = asyncio.run(run())
    assert sent[0]["status"] == 504 and b"0.05 seconds" in sent[1]["body"]
    assert cancelled.is_set()


def test_fast_requests_pass_through_and_cancel_their_timer():
    async def fast(scope, receive, send):
        await _answer(send, 201)

    async def run():
        sent = await _asgi_call(ReleasingTimeoutMiddleware(fast, timeout=30))
        return sent, _live_request_timers()

    sent, timers = asyncio.run(run())
    assert sent[0]["status"] == 201
    assert timers == []


def test_handler_errors_propagate_without_waiting_for_the_timeout():
    async def broken(scope, receive, send):
        raise RuntimeError("boom")

    async def run():
        return await asyncio.wait_for(_asgi_call(ReleasingTimeoutMiddleware(broken, timeout=30)), 5)

    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(run())
