"""The HTTP front of the service: an ASGI app in front of BentoML's own.

The service's routes (service/protocols/) are answered here, before BentoML's per-request machinery, with our
own body limits, errors, request ids, access log and tracing; BentoML still serves its pages (``/docs.json``,
``/metrics``, the files of the API page) and runs the service's lifecycle. Paths that are neither get a 404
here, so that no client can grow BentoML's path-labelled metrics. Why in front: docs/performance.md.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import bentoml

from service import linux
from service.core import LIFECYCLE, Call, Core
from service.errors import RequestError, bad_request, overloaded, too_large
from service.observe import access
from service.observe.metrics import metrics

log = logging.getLogger("service.http")
JSON = b"application/json"
RELEASE_DELAY_S = 1.0
BODY_STALL_S = 5.0  # a body of which nothing arrives for this long is refused (408) and its memory let go
SMALL_BODY = 64 * 1024  # a body this large or smaller (declared or so far) may use the in-flight cap's reserve
SMALL_BODY_SHARE = 8  # the reserve: 1/8 of MNIST_MAX_INFLIGHT_BYTES (32 MiB of 256), for small bodies only
BENTOML_PATHS = frozenset({"/docs.json", "/schema.json", "/metrics"})  # what BentoML's app serves for us
BENTOML_PREFIXES = ("/static_content/",)  # ... and the files of the API page
BENTOML_METHODS = ("GET", "HEAD")


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: bytes = JSON
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    @classmethod
    def json(cls, value, status: int = 200) -> Response:
        # the standard library's encoder: the same bytes as the service answered before (BentoML used it)
        return cls(status, json.dumps(value).encode())


def error_response(exc: RequestError, request_id: str = "") -> Response:
    body = {"error": exc.message, "request_id": request_id} if request_id else {"error": exc.message}
    response = Response.json(body, exc.status)
    if exc.retry_after is not None:
        response.headers.append((b"retry-after", str(exc.retry_after).encode()))
    if exc.status == 401:
        response.headers.append((b"www-authenticate", b"Bearer"))
    if exc.allow:
        response.headers.append((b"allow", exc.allow.encode()))
    return response


class Request:
    """One request's scope and body, read under the service's limits."""

    def __init__(self, front: Frontend, scope, receive):
        self.front, self.scope, self._receive = front, scope, receive
        self.headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:  # repeated headers: the first wins, as most servers do
            self.headers.setdefault(name, value)
        self.call = Call(access.request_id(self.headers.get(b"x-request-id")))
        self.reserved = 0  # bytes of this request's body counted against the worker's in-flight cap
        self.size = 0  # the body's declared or received size, whether or not it was accepted
        # a body that was declared but not read to its end: answer, then close (rather than read it to discard)
        self.unread_body = b"content-length" in self.headers and self.headers[b"content-length"] != b"0"
        self.unread_body |= b"transfer-encoding" in self.headers
        self.gone = False  # the client closed its connection while its request waited: drop the work
        self._watcher: asyncio.Task | None = None

    def header(self, name: bytes) -> str:
        return self.headers.get(name, b"").decode("latin-1")

    @property
    def core(self) -> Core:
        """The core a route works with; a 503 while this worker is still starting."""
        if self.front.core is None:
            raise RequestError(503, "unavailable", "the service is starting; retry shortly", 1)
        return self.front.core

    def flag(self, name: str) -> bool:
        """A yes/no query parameter: ``?name=1`` (or true, yes)."""
        values = urllib.parse.parse_qs(self.scope.get("query_string", b"").decode("latin-1")).get(name, ["0"])
        return values[-1].lower() in ("1", "true", "yes")

    def require_token(self) -> None:
        """For routes that protect only some of their paths (the Open Inference Protocol's health is open)."""
        if not self.front._authorized(self.scope):
            raise _unauthorized()

    async def work_body(self) -> bytes:
        """The body of a request for the batcher; a 503 before any of it is read when the queue would refuse
        every request of its declared size (the connection then closes, lingering, as for any unread body)."""
        declared = self.headers.get(b"content-length", b"")
        size = int(declared) if declared.isdigit() else 0
        if size <= self.front.config.max_request_bytes and (refusal := self.core.refuses_unread(size)):
            raise refusal  # (a body over the limit gets its 413 from body(): retrying would never help)
        return await self.body()

    async def body(self) -> bytes:
        """The whole body. Memory is counted as it arrives (a declared length reserves nothing: a client that
        declares 32 MiB and sends nothing holds nothing); then the client's disconnect is watched for."""
        config = self.front.config
        if self.headers.get(b"content-encoding", b"identity").lower() not in (b"identity", b""):
            raise RequestError(415, "unsupported", "compressed request bodies are not supported; send it uncompressed")
        coding = self.headers.get(b"transfer-encoding", b"chunked").lower().replace(b" ", b"")
        if coding not in (b"chunked", b"identity", b"identity,chunked"):
            raise RequestError(415, "unsupported", "only chunked Transfer-Encoding is supported; send it uncompressed")
        declared = self.headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                raise bad_request("the Content-Length header is not a number")
            self.size = int(declared)
            if int(declared) > config.max_request_bytes:
                raise too_large(f"request body is {int(declared)} bytes; the limit is {config.max_request_bytes}")
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.body_timeout_s
        try:
            async with asyncio.timeout(None) as timer:
                while True:
                    timer.reschedule(min(deadline, loop.time() + BODY_STALL_S))  # each piece buys BODY_STALL_S
                    message = await self._receive()
                    if message["type"] == "http.disconnect":
                        raise ClientGone()
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    self.size = max(self.size, size)
                    if size > config.max_request_bytes:
                        raise too_large(f"request body is over the limit of {config.max_request_bytes} bytes")
                    self._reserve(len(chunk))
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            if loop.time() < deadline:
                message = f"the request body stalled: nothing of it arrived for {BODY_STALL_S:g} s"
            else:
                message = f"the request body did not arrive within {config.body_timeout_s:g} s"
            raise RequestError(408, "timeout", message) from None
        self.unread_body = False
        self._watcher = asyncio.get_running_loop().create_task(self._watch_disconnect(asyncio.current_task()))
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _watch_disconnect(self, handler: asyncio.Task) -> None:
        """Once the body is read, the next message is the disconnect: a client that gave up (a timeout, a
        burst tool stopping) takes its queued work with it."""
        if (await self._receive())["type"] == "http.disconnect" and not handler.done():
            self.gone = True
            handler.cancel()

    def done(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    def _reserve(self, n: int) -> None:
        """Count ``n`` more bytes of this body against the worker's in-flight cap. Large bodies may fill only
        part of it: the rest is kept for small ones, so that large uploads held open (stalled one byte short of
        their end, say) cannot lock out the ordinary requests."""
        front, cap = self.front, self.front.config.max_inflight_bytes
        limit = cap - cap // SMALL_BODY_SHARE if self.size > SMALL_BODY else cap
        if front.inflight_bytes + n > limit and front.inflight_bytes:
            raise overloaded(
                f"request bodies in memory on this worker would pass {limit} bytes", front.config.retry_after_s
            )
        front.inflight_bytes += n
        self.reserved += n


class ClientGone(Exception):
    """The client closed the connection before its request was read."""


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    endpoint: str  # the metric label
    methods: tuple[str, ...]
    handler: Handler
    protected: bool = True  # needs the API token, when one is set


class Frontend:
    """Routes the service's own paths to their handlers and BentoML's pages to BentoML's app."""

    def __init__(self, bentoml_app, routes: dict[str, Route], config):
        self.app, self.routes, self.config = bentoml_app, routes, config
        self.core: Core | None = None  # once BentoML's lifespan has created the service instance
        self.tracing = None
        self.inflight_bytes = 0
        self._release_scheduled = False

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, self._watch_startup(send))
        if scope["type"] != "http":  # the service speaks no WebSocket (the uvicorn glue refuses upgrades)
            return
        path = scope["path"]
        route = self.routes.get(path)
        if route is None and "/" in path[1:]:
            path = path[: path.find("/", 1)] + "/*"  # a family of paths one adapter parses (the v2 protocol)
            route = self.routes.get(path)
        if route is None:
            if path in BENTOML_PATHS or scope["path"].startswith(BENTOML_PREFIXES):
                return await self._bentoml(scope, receive, send)
            route, path = NOT_FOUND, "unknown"
        await self._serve(route, path, scope, receive, send)

    def _watch_startup(self, send):
        async def watched(message):
            if message["type"] == "lifespan.startup.complete":
                self.core = bentoml.get_current_service().core
                self.tracing = self.core.tracing
                self.core.start_checks()
            await send(message)

        return watched

    async def _serve(self, route: Route, template: str, scope, receive, send) -> None:
        """``template``: the route's path as the routing table names it (a trace span's name, never the client's
        own path)."""
        started = time.perf_counter()
        request = Request(self, scope, receive)
        call = request.call
        if self.tracing is not None:
            call.span = self.tracing.start(scope["method"], template, request.headers, call.request_id)
        reason, hold = None, False
        try:
            if scope["method"] not in route.methods and route is not NOT_FOUND:
                allow = ", ".join(route.methods)
                raise RequestError(405, "unsupported", f"{scope['path'][:200]} accepts {allow}", allow=allow)
            if route.protected and not self._authorized(scope):
                raise _unauthorized()
            response = await route.handler(request)
        except RequestError as exc:
            reason = exc.reason
            metrics(self.config.max_batch_size).observe_rejected(exc.reason)
            response = error_response(exc, call.request_id)
            hold = exc.reason == "overloaded" and not LIFECYCLE.draining
        except ClientGone:
            self._end_span(call, 499, "gone")
            return
        except asyncio.CancelledError:
            if not request.gone:
                raise
            asyncio.current_task().uncancel()
            self._end_span(call, 499, "gone")
            return  # nobody to answer
        except Exception:  # noqa: BLE001 - a bug: the client gets a 500 with no details, the log the traceback
            log.exception("%s %s failed (request %s)", scope["method"], scope["path"][:200], call.request_id)
            reason = "internal"
            response = error_response(RequestError(500, "internal", "internal server error"), call.request_id)
        finally:
            request.done()
            self.inflight_bytes -= request.reserved
            if request.size >= linux.LARGE:
                self._schedule_release()
        if hold and self.config.refusal_hold_s:  # the body was let go, or never read: only a socket waits
            await asyncio.sleep(self.config.refusal_hold_s)
        response.headers.append((b"x-request-id", call.request_id.encode()))
        await self._send(response, send, close=request.unread_body or LIFECYCLE.draining)
        seconds = time.perf_counter() - started
        metrics(self.config.max_batch_size).observe_request(route.endpoint, response.status, seconds)
        self._end_span(call, response.status, reason)
        if self.config.access_log:
            method, path = scope["method"], scope["path"]
            access.record(method, path, response.status, seconds, request.size, len(response.body), call.request_id)

    def _end_span(self, call: Call, status: int, reason: str | None) -> None:
        if call.span is not None:
            self.tracing.end(call.span, status, reason)

    async def _bentoml(self, scope, receive, send) -> None:
        """BentoML's pages: GET and HEAD only; /metrics behind the token unless it is public; kept-alive
        clients sent elsewhere during a drain; logged like the service's own routes."""
        if scope["method"] not in BENTOML_METHODS:
            return await self._serve(BENTOML_PAGE, "bentoml", scope, receive, send)
        if scope["path"] == "/metrics" and not self.config.metrics_public and not self._authorized(scope):
            return await self._serve(PROTECTED_PAGE, "/metrics", scope, receive, send)
        started, sent = time.perf_counter(), {"status": 0, "bytes": 0}
        rid = access.request_id_of(scope)

        async def answered(message):
            if message["type"] == "http.response.start":
                extra = [(b"x-request-id", rid.encode())] + ([(b"connection", b"close")] if LIFECYCLE.draining else [])
                message = {**message, "headers": [*message.get("headers", []), *extra]}
                sent["status"] = message["status"]
            else:
                sent["bytes"] += len(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, answered)
        if self.config.access_log:
            seconds = time.perf_counter() - started
            access.record(scope["method"], scope["path"], sent["status"], seconds, 0, sent["bytes"], rid)

    def _authorized(self, scope) -> bool:
        """With MNIST_API_TOKEN set: the request carries ``Authorization: Bearer <token>``, compared in constant
        time. Without it, everyone is."""
        token = self.config.api_token
        if not token:
            return True
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, credentials = given.strip().partition(b" ")
        ok = hmac.compare_digest(credentials.strip(), token.encode())  # compared even for a wrong scheme
        return ok and scheme.lower() == b"bearer"  # the scheme is case-insensitive (RFC 9110)

    def _schedule_release(self) -> None:
        """Give the memory of large bodies back a moment after they are gone (once for a burst of them)."""
        if not self._release_scheduled:
            self._release_scheduled = True
            asyncio.get_running_loop().call_later(RELEASE_DELAY_S, self._release)

    def _release(self) -> None:
        self._release_scheduled = False
        if self.inflight_bytes < linux.LARGE:
            linux.release()
        else:  # still busy with large bodies: try again later
            self._schedule_release()

    async def _send(self, response: Response, send, close: bool) -> None:
        headers = [
            (b"content-type", response.content_type),
            (b"content-length", str(len(response.body)).encode()),
            *response.headers,
        ]
        if close:  # a draining worker sends its clients elsewhere; an unread body is not worth reading to discard
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})


def _unauthorized() -> RequestError:
    return RequestError(401, "unauthorized", "this endpoint needs the header Authorization: Bearer <MNIST_API_TOKEN>")


async def _not_found(request: Request) -> Response:
    raise RequestError(404, "not_found", f"no such path: {request.scope['path'][:200]}; see / for the API")


NOT_FOUND = Route("unknown", (), _not_found, protected=False)
BENTOML_PAGE = Route("bentoml", BENTOML_METHODS, _not_found, protected=False)  # for the 405 on other methods
PROTECTED_PAGE = Route("bentoml", BENTOML_METHODS, _not_found, protected=True)  # /metrics behind the token


class FrontedService(bentoml.Service):
    """A BentoML service whose ASGI app is the Frontend around BentoML's own: named as ``service_class`` in
    ``@bentoml.service``. ``bentoml serve`` and the test client both get the app from ``to_asgi``. The routes
    and settings are the service class's ``routes`` and ``settings``."""

    def to_asgi(self, is_main: bool = True):
        return Frontend(super().to_asgi(is_main), self.inner.routes, self.inner.settings)
