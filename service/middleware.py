"""A request timeout for BentoML's own routes (its pages and /metrics) that lets go of each request once it is
answered. The service's routes are answered in front of BentoML's app (service/frontend.py) and never reach it.

BentoML 1.4's ``TimeoutMiddleware`` schedules ``loop.call_later(timeout, ...)`` for every request and never
cancels it. The timer keeps the request's context (its tracing span and more, about 20 objects) alive for
the whole timeout, 30 s here: at 1,000 requests/s over two workers that is some 300,000 live objects per
worker, so the RSS climbs for the first ``timeout`` seconds under load and every full garbage collection
walks them all (67-114 ms pauses about once a second, measured; they were most of the p99 latency).
``install_timeout_fix()`` swaps in a subclass with the same behaviour that cancels its timer when the
request finishes.
"""

from __future__ import annotations

import asyncio
import json

from bentoml._internal.server.http import traffic


async def reject(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class ReleasingTimeoutMiddleware(traffic.TimeoutMiddleware):
    """BentoML's timeout semantics (a 504 if no response has started within ``timeout`` seconds; the
    handler is cancelled), with the timer cancelled as soon as the request is done."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def _send(message) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, _send))
        # the handler can also finish without sending anything (it raised, or the client went away)
        task.add_done_callback(lambda _: waiter.done() or waiter.set_result(None))
        try:
            await waiter
        except TimeoutError:
            if task.cancel():
                await reject(send, 504, f"Not able to process the request in {self.timeout} seconds")
            return
        finally:
            timer.cancel()
        await task


def install_timeout_fix() -> None:
    """Make BentoML build its apps with ``ReleasingTimeoutMiddleware``. It looks the class up in
    ``bentoml._internal.server.http.traffic`` when it builds an app, so this must run before that."""
    traffic.TimeoutMiddleware = ReleasingTimeoutMiddleware
