"""ASGI pieces around BentoML's app: reject malformed requests early, and a request timeout that lets go of
each request once it is answered.

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
import re

from bentoml._internal.server.http import traffic

EXPECTED_MEDIA_TYPES = {"/predict": "multipart/form-data", "/predict_array": "application/json"}


class ContentTypeGuard:
    """Checks what BentoML would otherwise get wrong, before any parsing: a wrong media type is a 415; a body
    over the limit a 413, with or without a Content-Length; multipart without a boundary a 400 (BentoML
    answers 500); and an `images` part that is text rather than a file a 400 (BentoML would try to download
    it as a URL, and answer 500 when it is not one)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in EXPECTED_MEDIA_TYPES:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        expected = EXPECTED_MEDIA_TYPES[scope["path"]]
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        if not content_type.lower().startswith(expected):
            return await reject(send, 415, f"{scope['path']} expects {expected}, got {content_type or 'none'}")
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_bytes:
            return await reject(send, 413, f"request body is {int(length)} bytes; the limit is {self.max_bytes}")
        boundary = _BOUNDARY.search(content_type)
        if expected == "multipart/form-data" and boundary is None:
            return await reject(send, 400, "multipart/form-data without a boundary parameter")
        body = await _read_body(receive, self.max_bytes)
        if body is None:
            return await reject(send, 413, f"request body is over the limit of {self.max_bytes} bytes")
        if expected == "multipart/form-data":
            if (problem := _text_part(body, boundary.group(1).encode("latin-1"))) is not None:
                return await reject(send, 400, problem)
        return await self.app(scope, _replay(body, receive), send)


_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_IMAGES_FIELD = re.compile(rb'(?:^|[;\s])name="?images"?(?:;|\s|$)', re.IGNORECASE | re.MULTILINE)


async def _read_body(receive, max_bytes: int) -> bytes | None:
    """The whole request body, or None once it passes max_bytes (a chunked upload has no Content-Length)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > max_bytes:
            return None
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive):
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


def _text_part(body: bytes, boundary: bytes) -> str | None:
    """A problem with a multipart body's `images` parts, or None: each must be a file (have a filename)."""
    for i, part in enumerate(body.split(b"--" + boundary)[1:]):
        if part.startswith(b"--"):
            break
        head = part.split(b"\r\n\r\n", 1)[0]
        if _IMAGES_FIELD.search(head) and b"filename" not in head.lower():
            return f"multipart part {i} named 'images' is text, not a file; send each image as a file upload"
    return None


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
        except asyncio.TimeoutError:
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
