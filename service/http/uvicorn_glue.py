"""Every uvicorn internal the service relies on, in one place: the parts of HTTP below the ASGI app. Written
against uvicorn 0.54.0 with httptools 0.9 (pinned in pyproject.toml); tests/service/test_glue.py fails within a
second when an upgrade removes what this overrides.

BentoML's worker runs uvicorn with its defaults and no hooks. ``install()`` registers a subclass of uvicorn's
httptools protocol as uvicorn's default (the worker builds its config after importing the service) that adds:

- a deadline for each request head (``MNIST_HEADER_TIMEOUT_S``): from the connection's start, or from the
  previous answer on a kept-alive connection, to the end of the head; past it, a 408 and the connection closes;
- a size bound on each request head (``MAX_HEAD_BYTES``: the URL and headers; httptools has none): past it, 431;
- a per-worker connection cap (``MNIST_MAX_CONNECTIONS``): past it, a new connection's request gets an
  immediate 503 with Retry-After and the connection closes (twice the cap, it is closed unanswered);
- the keep-alive timeout (``MNIST_KEEP_ALIVE_S``);
- on SIGTERM, the drain (``MNIST_DRAIN_S``): the worker's lifecycle says draining at once (so readiness fails),
  requests are still served for the drain period, then the listening socket closes without resetting anyone
  (``_end_drain``) and uvicorn's own shutdown finishes every request in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import socket

import uvicorn.config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import Server

from service import memory
from service.core import LIFECYCLE

log = logging.getLogger("service.http")
WRITTEN_AGAINST = "0.54.0"


MAX_HEAD_BYTES = 64 * 1024  # URL and headers of one request (browsers send a few KB; Node.js allows 16 KB)


# A body costs a parser callback per piece (a chunk of a chunked body, or each read of a trickled one): past
# FREE_BODY_PIECES pieces, a body must average MIN_BODY_PIECE bytes a piece, so that 1-byte chunks cannot make
# a 32 MiB body cost millions of callbacks on the event loop.
FREE_BODY_PIECES = 1024
MIN_BODY_PIECE = 256


class HeadTooLarge(Exception):
    pass


class BodyInTinyPieces(Exception):
    pass


class GuardedProtocol(HttpToolsProtocol):
    settings = None  # the ServiceConfig, set by install()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.settings.keep_alive_s
        self._head_timer = None
        self._over_cap = False
        self._head_bytes = 0
        self._in_head = True  # between requests, or inside a request's head: its bytes count towards the bound
        self._raw_head_bytes = 0  # bytes received while in a head, counted by data_received
        self._head_too_large = False
        self._body_pieces = self._body_bytes = 0
        self._tiny_pieces = False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        cap = self.settings.max_connections
        if len(self.connections) > 2 * cap:  # keep the worker's file descriptors for the clients it serves
            transport.abort()
            return
        self._over_cap = len(self.connections) > cap
        self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """httptools hands a header over only once it is complete, so a value that never ends would not be
        counted by ``on_header``: count what arrives while the head is incomplete, too."""
        in_head = self._in_head
        super().data_received(data)
        if in_head and self._in_head and not self.transport.is_closing():
            self._raw_head_bytes += len(data)
            if self._raw_head_bytes > MAX_HEAD_BYTES:
                self._head_too_large = True
                self.send_400_response("")

    def on_message_begin(self) -> None:
        self._head_bytes = self._body_pieces = self._body_bytes = 0
        super().on_message_begin()

    def on_body(self, body: bytes) -> None:
        self._body_pieces += 1
        self._body_bytes += len(body)
        if self._body_pieces > FREE_BODY_PIECES and self._body_pieces * MIN_BODY_PIECE > self._body_bytes:
            self._tiny_pieces = True
            raise BodyInTinyPieces()  # the parser stops; uvicorn answers a parser error with send_400_response
        super().on_body(body)

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_head(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > MAX_HEAD_BYTES:
            self._head_too_large = True
            raise HeadTooLarge()  # the parser stops; uvicorn answers a parser error with send_400_response

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to what httptools cannot parse, as JSON like every other refusal."""
        if self._head_too_large:
            self._answer_and_close(431, f"the request's URL and headers are over {MAX_HEAD_BYTES} bytes")
        elif self._tiny_pieces:
            average = self._body_bytes // self._body_pieces
            self._answer_and_close(
                400, f"the request body arrives in pieces of {average} bytes on average; send it in larger chunks"
            )
        else:
            self._answer_and_close(400, "malformed HTTP: the request line or headers do not parse as HTTP/1.1")

    def _should_upgrade_to_ws(self) -> bool:
        return False  # the service speaks no WebSocket: an upgrade request is answered as plain HTTP

    def _unsupported_upgrade_warning(self) -> None:
        pass  # not worth a log line per client that asks

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        self._in_head, self._raw_head_bytes = True, 0
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self._arm_head_timer()

    def _start_asgi_task(self, cycle, app) -> None:
        super()._start_asgi_task(cycle, _over_capacity if self._over_cap else app)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.settings.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        self._answer_and_close(408, f"no complete request head within {self.settings.header_timeout_s:g} s")

    def _answer_and_close(self, status: int, message: str) -> None:
        """An answer written straight to the socket: for what goes wrong before there is a request to route."""
        body = json.dumps({"error": message}).encode()
        self.transport.write(
            STATUS_LINE[status] + b"content-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.transport.close()


async def _over_capacity(scope, receive, send) -> None:
    """A connection past the cap gets one answer and is closed: 503, except liveness (the worker is alive:
    a probe must not restart it for being busy)."""
    settings = GuardedProtocol.settings
    status, body = (
        503,
        b'{"error": "the server is overloaded: this worker has %d connections open; retry later"}'
        % (settings.max_connections),
    )
    if scope["path"] in ("/livez", "/healthz", "/v2/health/live"):
        status, body = 200, b'{"live": true}'
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(settings.retry_after_s).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_uvicorn_handle_exit = Server.handle_exit
LAST_REQUESTS_S = 1.0  # after the listener closes: time for the connections accepted last to send their requests


def _handle_exit(server: Server, sig: int, frame) -> None:
    """SIGTERM starts the drain; uvicorn's own exit follows when it ends. A second signal exits at once."""
    drain_s = GuardedProtocol.settings.drain_s if GuardedProtocol.settings else 0
    if sig != signal.SIGTERM or LIFECYCLE.draining or drain_s <= 0:
        return _uvicorn_handle_exit(server, sig, frame)
    LIFECYCLE.drain()
    log.info("SIGTERM: readiness now fails; serving for %g s more, then finishing requests in progress", drain_s)
    loop = asyncio.get_event_loop()  # a signal handler runs on the main thread, whose loop is running
    loop.call_soon_threadsafe(loop.call_later, drain_s, _end_drain, server, sig, frame)


def _end_drain(server: Server, sig: int, frame) -> None:
    """Close the listening sockets without resetting anyone. The kernel completes handshakes for a listening
    socket on its own, and closing it resets every connection still queued, whose client has already sent its
    request. So, in one go on the event loop: stop accepting, accept what is queued, and shut the socket for
    every process that shares it (the arbiter keeps a copy: closing ours alone would leave the kernel accepting
    for it); from then on a new client is refused, never half-served. Then let the last connections send their
    requests, and hand over to uvicorn's shutdown, which finishes every request in progress."""
    loop = asyncio.get_running_loop()

    def protocol():
        state = server.server_state
        return server.config.http_protocol_class(
            config=server.config, server_state=state, app_state=server.lifespan.state, _loop=loop
        )

    for listener in server.servers:
        socks = [socket.socket(fileno=os.dup(s.fileno())) for s in listener.sockets]
        listener.close()
        for sock in socks:
            for conn in _accept_all(sock):
                loop.create_task(loop.connect_accepted_socket(protocol, conn))
            with contextlib.suppress(OSError):  # another worker shut it first
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
    loop.call_later(LAST_REQUESTS_S, _uvicorn_handle_exit, server, sig, frame)


def _accept_all(sock: socket.socket) -> list[socket.socket]:
    sock.setblocking(False)
    accepted = []
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:  # nothing more queued (or the socket is already shut)
            return accepted
        accepted.append(conn)


def install(settings) -> None:
    """Make uvicorn use GuardedProtocol and drain on SIGTERM; raise the open-files limit as far as allowed."""
    GuardedProtocol.settings = settings
    uvicorn.config.HTTP_PROTOCOLS["auto"] = uvicorn.config.HTTP_PROTOCOLS["httptools"] = (
        "service.http.uvicorn_glue:GuardedProtocol"
    )
    Server.handle_exit = _handle_exit
    memory.fix_mmap_threshold()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
