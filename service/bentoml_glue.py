"""Every use of BentoML's private modules, in one place. Written against bentoml 1.4.40 (pinned >=1.4,<1.5 in
pyproject.toml); tests/service/test_glue.py fails within a second when an upgrade removes what this relies on.

- the model store's home (``BentoMLContainer.bentoml_home``), for the one-line error when a model is missing;
- whether this process is one of ``bentoml serve``'s workers, and which (``server_context.worker_index``);
- BentoML's Prometheus client (``BentoMLContainer.metrics_client``), so that the service's metrics are summed
  across workers on BentoML's ``/metrics``;
- a request timeout for BentoML's own pages that lets go of each request once it is answered: BentoML's
  ``TimeoutMiddleware`` schedules ``loop.call_later(timeout, ...)`` per request and never cancels it, keeping
  each request's context alive for the whole timeout (docs/performance.md). The service's own routes are
  answered in front of BentoML's app and never reach it; its pages (``/docs.json``, ``/metrics``, the files of
  the API page) do.
"""

from __future__ import annotations

import asyncio
import json

from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.context import server_context
from bentoml._internal.server.http import traffic

WRITTEN_AGAINST = "1.4.40"


def bentoml_home() -> str:
    return str(BentoMLContainer.bentoml_home.get())


def in_worker() -> bool:
    """Running as a worker of ``bentoml serve`` (not imported by the arbiter, a build, or a test)."""
    return server_context.worker_index is not None


def worker_index() -> int:
    """This worker's number, 1..workers (0 outside ``bentoml serve``)."""
    return server_context.worker_index or 0


def metrics_client():
    return BentoMLContainer.metrics_client.get()


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
