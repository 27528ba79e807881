"""Connections, below the ASGI app: the parts of HTTP that only the server sees.

BentoML's worker runs uvicorn with its defaults and no hooks, and those defaults let a client hold a socket
for ever: a connection that sends nothing, or half a request head, stays open (45,000 of them ran the workers
out of file descriptors), and nothing caps how many connections a worker keeps. ``install()`` registers a
subclass of uvicorn's httptools protocol as uvicorn's default (the worker builds its config after importing
the service) that adds:

- a deadline for each request head (``MNIST_HEADER_TIMEOUT_S``): from the connection's start, or from the
  previous answer on a kept-alive connection, to the end of the head; past it, a 408 and the connection closes;
- a size bound on each request head (``MAX_HEAD_BYTES``: the URL and headers; httptools has none): past it, 431;
- a per-worker connection cap (``MNIST_MAX_CONNECTIONS``): past it, a new connection's request gets an
  immediate 503 with Retry-After and the connection closes (twice the cap, it is closed unanswered);
- the keep-alive timeout (``MNIST_KEEP_ALIVE_S``);
- a graceful drain on SIGTERM (``MNIST_DRAIN_S``): ``/readyz`` answers 503 at once so that load balancers
  stop sending, requests are still served for the drain period (with ``Connection: close``, to move kept-alive
  clients elsewhere), then uvicorn's own shutdown stops accepting and finishes every request in progress.
"""

from __future__ import annotations

import ctypes
import json
import logging
import resource
import signal
import socket
import struct
import threading
import time

import uvicorn.config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import Server

from service import memory

log = logging.getLogger("service.connections")


class DrainState:
    draining = False
    started = 0.0


DRAIN = DrainState()


MAX_HEAD_BYTES = 64 * 1024  # URL and headers of one request (browsers send a few KB; Node.js allows 16 KB)


class HeadTooLarge(Exception):
    pass


class GuardedProtocol(HttpToolsProtocol):
    settings = None  # the ServiceConfig, set by install()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.settings.keep_alive_s
        self._head_timer = None
        self._over_cap = False
        self._head_bytes = 0
        self._head_too_large = False

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

    def on_message_begin(self) -> None:
        self._head_bytes = 0
        super().on_message_begin()

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
        if not self._head_too_large:
            return super().send_400_response(msg)
        self._answer_and_close(431, f"the request's URL and headers are over {MAX_HEAD_BYTES} bytes")

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
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
    settings = GuardedProtocol.settings
    body = b'{"error": "the server is overloaded: this worker has %d connections open; retry later"}' % (
        settings.max_connections
    )
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(settings.retry_after_s).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_uvicorn_handle_exit = Server.handle_exit
ACCEPT_QUEUE_S = 0.3  # after new connections stop, time to accept and answer those already queued
_SO_ATTACH_FILTER = 26
_DROP_ALL = struct.pack("HBBI", 0x06, 0, 0, 0)  # one classic BPF instruction: "ret #0", keep nothing


def _handle_exit(server: Server, sig: int, frame) -> None:
    """SIGTERM starts the drain; uvicorn's own exit follows when it ends. A second signal exits at once."""
    drain_s = GuardedProtocol.settings.drain_s if GuardedProtocol.settings else 0
    if sig != signal.SIGTERM or DRAIN.draining or drain_s <= 0:
        return _uvicorn_handle_exit(server, sig, frame)
    DRAIN.draining, DRAIN.started = True, time.monotonic()
    log.info("SIGTERM: /readyz now answers 503; serving for %g s more, then finishing requests in progress", drain_s)
    _later(drain_s, _end_drain, server, sig, frame)


def _end_drain(server: Server, sig: int, frame) -> None:
    """Closing a listening socket resets the connections still in its accept queue, whose clients have
    already sent their requests. So first drop new connection attempts (their clients retry the SYN and then
    find the port closed: refused, never half-served), accept and answer what is queued, then exit."""
    for listener in server.servers:
        for sock in listener.sockets:
            _drop_new_connections(sock)
    _later(ACCEPT_QUEUE_S, _uvicorn_handle_exit, server, sig, frame)


def _drop_new_connections(sock) -> None:
    insn = ctypes.create_string_buffer(_DROP_ALL)
    program = struct.pack("HL", 1, ctypes.addressof(insn))  # struct sock_fprog {len; filter*}
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, program)
    except OSError as exc:  # not Linux: the listener closes as uvicorn closes it
        log.info("cannot hold new connections off while draining (%s)", exc)


def _later(seconds: float, fn, *args) -> None:
    timer = threading.Timer(seconds, fn, args)
    timer.daemon = True
    timer.start()


def install(settings) -> None:
    """Make uvicorn use GuardedProtocol and drain on SIGTERM; raise the open-files limit as far as allowed."""
    GuardedProtocol.settings = settings
    uvicorn.config.HTTP_PROTOCOLS["auto"] = uvicorn.config.HTTP_PROTOCOLS["httptools"] = (
        "service.connections:GuardedProtocol"
    )
    Server.handle_exit = _handle_exit
    memory.fix_mmap_threshold()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
