"""Every uvicorn internal the service relies on, in one place: the parts of HTTP below the ASGI app. Written
against uvicorn 0.54.0 with httptools 0.9 (pinned in pyproject.toml); tests/service/test_glue.py fails within a
second when an upgrade removes what this overrides.

BentoML's worker runs uvicorn with its defaults and no hooks. ``install()`` registers a subclass of uvicorn's
httptools protocol as uvicorn's default (the worker builds its config after importing the service) that adds:

- a deadline for each request head (``MNIST_HEADER_TIMEOUT_S``): from the connection's start, or from the
  previous answer on a kept-alive connection, to the end of the head; past it, a 408 and the connection closes;
- a size bound on each request head (``MAX_HEAD_BYTES``: the URL and headers; httptools has none): past it, 431;
- a per-worker cap on requests in progress (``MNIST_MAX_CONNECTIONS``): past it, a request gets an immediate
  503 with Retry-After. Connections that wait (no request head yet, kept alive between requests, lingering) do
  not count; past twice the cap in sockets, a new connection sheds the one that has waited longest, so idle or
  slow sockets can never crowd out a client that sends whole requests;
- a lingering close (nginx's): an answer sent before the request's body was read is followed by a half-close
  and the rest of the body read and dropped (nginx's bounds: at most ``LINGER_S`` in all and ``LINGER_IDLE_S``
  between reads; and at most ``LINGER_BYTES``), so that a client that
  writes its whole request before reading gets the answer rather than a reset; and a client that half-closes
  after a complete request still gets its answer;
- the keep-alive timeout (``MNIST_KEEP_ALIVE_S``);
- on SIGTERM, the drain (``MNIST_DRAIN_S``): the worker's lifecycle says draining at once (so readiness fails),
  requests are still served for the drain period, then the listening socket closes without resetting anyone
  (``_end_drain``) and uvicorn's own shutdown finishes every request in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import resource
import signal
import socket
import tempfile

import uvicorn.config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import Server

from service import linux
from service.core import LIFECYCLE
from service.http.listener import BalancedListener, LoadTable, table_path
from service.observe import access

log = logging.getLogger("service.http")
WRITTEN_AGAINST = "0.54.0"


MAX_HEAD_BYTES = 64 * 1024  # URL and headers of one request (browsers send a few KB; Node.js allows 16 KB)


# A body costs a parser callback per piece (a chunk of a chunked body, or each read of a trickled one): past
# FREE_BODY_PIECES pieces, a body must average MIN_BODY_PIECE bytes a piece, so that 1-byte chunks cannot make
# a 32 MiB body cost millions of callbacks on the event loop.
FREE_BODY_PIECES = 1024
MIN_BODY_PIECE = 256
# Whatever arrives that is not body (request lines, headers, trailers, chunk-size lines and their extensions,
# pipelined heads) is bounded per connection: MAX_HEAD_BYTES per request begun, plus CHUNK_FRAMING per body
# piece. httptools buffers an unfinished line by appending to it, so an endless one costs quadratic time.
CHUNK_FRAMING = 32


LINGER_S = 30.0
LINGER_IDLE_S = 5.0
LINGER_BYTES = 1024 * 1024 * 1024
# TCP cannot tell a client that half-closed after its request (shutdown(SHUT_WR), `nc -N`) from one that closed
# and left: both send FIN. One whose FIN comes with its request, or within this, is answered; a FIN that comes
# later, while the request waits, means a client that gave up, and its queued work is dropped.
HALF_CLOSE_GRACE_S = 0.25


class HeadTooLarge(Exception):
    pass


class BodyInTinyPieces(Exception):
    pass


# This worker's connections without a whole request to answer, oldest first in each: the ones a newcomer may
# shed, in this order. They never count against the cap on requests in progress.
SILENT: dict[GuardedProtocol, None] = {}  # connected, not a byte sent yet
WAITING: dict[GuardedProtocol, None] = {}  # a head on its way, kept alive between requests, or lingering
SLOW_BODY: dict[GuardedProtocol, None] = {}  # a head complete, its body still arriving
SHED_ORDER = (SILENT, WAITING, SLOW_BODY)


class _Transport:
    """The socket as uvicorn sees it: closing it lingers when the client may still be sending; and an answer's head
    is held until its body's first write, so that the two leave in one send (uvicorn writes them apart: a second
    system call and TCP segment per answer). Whatever is held is written at the latest on the loop's next turn."""

    __slots__ = ("_transport", "_protocol", "_held", "_headed")

    def __init__(self, transport, protocol: GuardedProtocol):
        self._transport, self._protocol = transport, protocol
        self._held: bytes | None = None
        self._headed = None  # the request cycle whose head was written last

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        if self._held is not None:
            data, self._held = self._held + data, None
        else:
            cycle = self._protocol.cycle
            if (
                cycle is not None
                and cycle.response_started
                and not cycle.response_complete
                and cycle is not self._headed
            ):
                self._headed, self._held = cycle, data  # the head: uvicorn writes it as the response starts
                self._protocol.loop.call_soon(self.flush)
                return
        self._transport.write(data)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._protocol._close()

    def is_closing(self) -> bool:
        return self._protocol._lingering or self._transport.is_closing()


class GuardedProtocol(HttpToolsProtocol):
    settings = None  # the ServiceConfig, set by install()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.settings.keep_alive_s
        self._head_timer = None
        self._over_cap = False
        self._raw = None  # the transport itself (self.transport is the lingering view of it)
        self._message_done = True  # the current request's body has been read to its end (or there is none)
        self._lingering = False
        self._lingered = 0
        self._linger_until = self._last_lingered = 0.0
        self._peer_done = False  # the client half-closed after its request
        self._message_done_at = 0.0
        self._head_bytes = 0
        self._in_head = True  # between requests, or inside a request's head: its bytes count towards the bound
        self._raw_head_bytes = 0  # bytes received while in a head, counted by data_received
        self._head_too_large = False
        self._body_pieces = self._body_bytes = 0
        self._tiny_pieces = False
        self._wire = self._not_framing = 0  # bytes received on this connection; of them, body bytes
        self._framing_allowed = MAX_HEAD_BYTES  # grows with every request begun and every body piece

    def connection_made(self, transport) -> None:
        self._raw = transport
        super().connection_made(_Transport(transport, self))
        if len(self.connections) > 2 * self.settings.max_connections:  # keep the file descriptors for real clients
            sheddable = next((group for group in SHED_ORDER if group), None)
            if sheddable is None:
                transport.abort()  # every socket has a request in progress: this one waits its turn elsewhere
                self.connections.discard(self)
                _publish_load()
                return
            oldest = next(iter(sheddable))
            del sheddable[oldest]
            self.connections.discard(oldest)  # gone now, though uvicorn hears of it on the loop's next turn
            oldest._raw.abort()
        SILENT[self] = None
        self._arm_head_timer()
        _publish_load()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        for group in SHED_ORDER:
            group.pop(self, None)
        super().connection_lost(exc)
        _publish_load()

    def eof_received(self) -> bool:
        """The client half-closed. Right after a whole request it still gets the answer (then the connection
        closes); otherwise (nothing asked, a request that can now never be complete, or a client that gave up
        waiting: see HALF_CLOSE_GRACE_S) the connection closes now."""
        in_progress = self.cycle is not None and not self.cycle.response_complete
        just_sent = self._message_done and self.loop.time() - self._message_done_at <= HALF_CLOSE_GRACE_S
        if not self._lingering and in_progress and just_sent:
            self._peer_done = True
            return True
        return False

    def _close(self) -> None:
        """Close, or linger while the client may still be sending its request (see the module's docstring)."""
        raw = self._raw
        if self._lingering or raw.is_closing():
            return
        if self._message_done or self._peer_done or not raw.can_write_eof():
            raw.close()
            return
        self._lingering = True
        self._cancel_head_timer()
        if self.cycle is not None and not self.cycle.response_complete:  # the app still waits for the body: it
            self.cycle.disconnected = True  # gets a disconnect now, and uvicorn drops whatever it would still send
            self.cycle.message_event.set()
        SLOW_BODY.pop(self, None)
        WAITING[self] = None  # sheddable like any socket without a request in progress
        raw.write_eof()  # the answer, then our end of the stream: the client reads the answer to its end
        raw.resume_reading()
        self._linger_until = self.loop.time() + LINGER_S
        self._last_lingered = self.loop.time()
        self.loop.call_later(min(LINGER_IDLE_S, LINGER_S), self._linger_check)

    def _linger_check(self) -> None:
        now = self.loop.time()
        if self._raw.is_closing():
            return
        idle_until = self._last_lingered + LINGER_IDLE_S
        if now >= self._linger_until or now >= idle_until:
            self._raw.close()
        else:
            self.loop.call_later(min(idle_until, self._linger_until) - now, self._linger_check)

    def data_received(self, data: bytes) -> None:
        """httptools hands a header over only once it is complete, so a value that never ends would not be
        counted by ``on_header``: count what arrives while the head is incomplete, too."""
        if self._lingering:  # the rest of a body nobody will read: dropped, within bounds
            self._lingered += len(data)
            self._last_lingered = self.loop.time()
            if self._lingered > LINGER_BYTES:
                self._raw.close()
            return
        in_head = self._in_head
        if not self._wire and self in SILENT:  # its first bytes: a client, not a bare socket
            del SILENT[self]
            WAITING[self] = None
        self._wire += len(data)
        super().data_received(data)
        if self.transport.is_closing():
            return
        if in_head and self._in_head:
            self._raw_head_bytes += len(data)
            if self._raw_head_bytes > MAX_HEAD_BYTES:
                self._head_too_large = True
                self.send_400_response("")
                return
        if self._wire - self._not_framing > self._framing_allowed:  # trailers, chunk extensions, pipelined heads
            self._head_too_large = True
            cycle = self.cycle
            ours = cycle is None or cycle.response_complete or (cycle.more_body and not cycle.response_started)
            if ours:  # the excess is in the request that would get the answer: a 431 answers it
                self.send_400_response("")
            else:  # in a request pipelined behind one in progress: an answer now would be taken for that one's
                self._raw.abort()

    def on_message_begin(self) -> None:
        self._head_bytes = self._body_pieces = self._body_bytes = 0
        self._message_done = False
        self._framing_allowed += MAX_HEAD_BYTES
        super().on_message_begin()

    def on_message_complete(self) -> None:
        self._message_done, self._message_done_at = True, self.loop.time()
        SLOW_BODY.pop(self, None)  # a whole request: counted against the cap from now
        super().on_message_complete()

    def on_body(self, body: bytes) -> None:
        self._body_pieces += 1
        self._body_bytes += len(body)
        self._not_framing += len(body)
        self._framing_allowed += CHUNK_FRAMING
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
            self._answer_and_close(431, f"the request's URL, headers or trailers are over {MAX_HEAD_BYTES} bytes")
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
        WAITING.pop(self, None)
        SLOW_BODY[self] = None  # until its body is whole (at once for a request without one)
        in_progress = len(self.connections) - len(SILENT) - len(WAITING) - len(SLOW_BODY)
        self._over_cap = in_progress >= self.settings.max_connections
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        self._in_head, self._raw_head_bytes = True, 0
        # a head held with no body to follow (HEAD, 204, 304) leaves now: a shed, a half-close or an end of file
        # read next may close the socket below the glue's transport before the loop's next turn
        self.transport.flush()
        super().on_response_complete()
        if self._peer_done:
            self._raw.close()
        elif not self.transport.is_closing() and not self.pipeline:
            WAITING[self] = None
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
        """An answer written straight to the socket: for what goes wrong before there is a request to route.
        It has a request id of its own (the head may not have been read) and its access-log line."""
        rid = access.request_id(None)
        body = json.dumps({"error": message, "request_id": rid}).encode()
        self.transport.write(
            STATUS_LINE[status] + b"content-type: application/json\r\nconnection: close\r\n"
            b"x-request-id: %s\r\ncontent-length: %d\r\n\r\n%s" % (rid.encode(), len(body), body)
        )
        self.transport.close()
        if self.settings.access_log:
            access.record("-", "-", status, 0.0, self._wire, len(body), rid)


async def _over_capacity(scope, receive, send) -> None:
    """A request past the cap gets one answer and its connection is closed: 503, except liveness (the worker
    is alive: a probe must not restart it for being busy)."""
    settings = GuardedProtocol.settings
    rid = access.request_id_of(scope)
    message = f"the server is overloaded: this worker has {settings.max_connections} requests in progress; retry later"
    status, answer = 503, {"error": message, "request_id": rid}
    if scope["path"] in ("/livez", "/healthz", "/v2/health/live"):
        status, answer = 200, {"live": True}
    body = json.dumps(answer).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(settings.retry_after_s).encode()),
        (b"x-request-id", rid.encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    if settings.access_log:
        access.record(scope["method"], scope["path"], status, 0.0, 0, len(body), rid)


_uvicorn_handle_exit = Server.handle_exit
LAST_REQUESTS_S = 2.0  # after the listener closes: time for the connections accepted last to send their requests
# After the drain, requests in progress have this long to finish (uvicorn would wait for ever, for a client that
# never reads its answers, say); a container's grace period is 30 s by default, of which the drain takes 10.
FINISH_S = 15


def _handle_exit(server: Server, sig: int, frame) -> None:
    """SIGTERM starts the drain; uvicorn's own exit follows when it ends. Another SIGTERM during the drain
    changes nothing (a supervisor that signals every process, as systemd does, and ``bentoml serve`` passing its
    own on, send two); SIGINT exits without a drain, and a second one at once."""
    drain_s = GuardedProtocol.settings.drain_s if GuardedProtocol.settings else 0
    server.config.timeout_graceful_shutdown = FINISH_S
    if sig == signal.SIGTERM and LIFECYCLE.draining:
        log.info("SIGTERM again: the drain goes on")
        return None
    if sig != signal.SIGTERM or drain_s <= 0:
        return _uvicorn_handle_exit(server, sig, frame)
    LIFECYCLE.drain()
    log.info("SIGTERM: readiness now fails; serving for %g s more, then finishing requests in progress", drain_s)
    loop = asyncio.get_event_loop()  # a signal handler runs on the main thread, whose loop is running
    loop.call_soon_threadsafe(loop.call_later, drain_s, _end_drain, server, sig, frame)


def _end_drain(server: Server, sig: int, frame) -> None:
    """Close the listening sockets without resetting anyone. The kernel completes handshakes for a listening
    socket on its own, and closing it resets every connection still queued, whose client has already sent its
    request. So, in one go on the event loop: stop accepting, and accept what is queued. Then, if no other worker
    still listens, shut the socket for every process that shares it (the arbiter keeps a copy: closing ours
    alone would leave the kernel accepting for it), so that from then on a new client is refused, never
    half-served; if another worker does, it keeps the port (a worker stopped on its own must not close the port
    for the rest). Then let the last connections send their requests, and hand over to uvicorn's shutdown,
    which finishes every request in progress."""
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
            with _one_worker_at_a_time(sock) as lock_path:  # two workers draining at once cannot both leave it open
                if not _other_workers_listen_on(sock):
                    with contextlib.suppress(OSError):  # the last worker out: the lock file is no longer needed
                        os.unlink(lock_path)
                    # what queued while we looked, then the shutdown at once: it resets whatever is still queued
                    for conn in _accept_all(sock):
                        loop.create_task(loop.connect_accepted_socket(protocol, conn))
                    with contextlib.suppress(OSError):  # already shut
                        sock.shutdown(socket.SHUT_RDWR)
                sock.close()
    loop.call_later(LAST_REQUESTS_S, _uvicorn_handle_exit, server, sig, frame)


@contextlib.contextmanager
def _one_worker_at_a_time(sock: socket.socket):
    stat = os.fstat(sock.fileno())
    path = os.path.join(tempfile.gettempdir(), f"mnist-serving-listener-{stat.st_dev}-{stat.st_ino}.lock")
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield path


def _other_workers_listen_on(sock: socket.socket) -> bool:
    """Whether a process other than this one and its parent (``bentoml serve``) holds this socket."""
    target = f"socket:[{os.fstat(sock.fileno()).st_ino}]"
    ours = {os.getpid(), os.getppid()}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) in ours:
            continue
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == target for fd in os.listdir(f"/proc/{pid}/fd")):
                return True
        except OSError:  # gone, or not ours to read
            continue
    return False


def _accept_all(sock: socket.socket) -> list[socket.socket]:
    sock.setblocking(False)
    accepted = []
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:  # nothing more queued (or the socket is already shut)
            return accepted
        accepted.append(conn)


LISTENERS: list[BalancedListener] = []  # this worker's, when it accepts in turn with the others


def _publish_load() -> None:
    for listener in LISTENERS:
        listener.publish()


_uvicorn_startup = Server.startup


async def _startup(server: Server, sockets: list[socket.socket] | None = None) -> None:
    """uvicorn's start-up, but the sockets shared by ``bentoml serve``'s workers are accepted from in turn
    (``service/http/listener.py``) rather than by the event loop's own server, which takes every queued
    connection at once. Without shared sockets, with TLS, or where the load table cannot be made, uvicorn's
    own way."""
    if not sockets or server.config.ssl:
        return await _uvicorn_startup(server, sockets)
    await _uvicorn_startup(server, [])  # the lifespan and the rest, with no listener of the event loop's
    loop = asyncio.get_running_loop()

    def protocol():
        return server.config.http_protocol_class(
            config=server.config, server_state=server.server_state, app_state=server.lifespan.state, _loop=loop
        )

    try:  # only now: a worker in the table is one that accepts, not one still loading its model
        tables = [LoadTable(table_path(sock)) for sock in sockets]
    except OSError as exc:
        log.warning("connections are accepted without balancing between workers: %s", exc)
        for sock in sockets:
            server.servers.append(await loop.create_server(protocol, sock=sock, backlog=server.config.backlog))
        return
    for sock, table in zip(sockets, tables):
        listener = BalancedListener(sock, protocol, server.server_state.connections, table)
        server.servers.append(listener)
        LISTENERS.append(listener)


def install(settings) -> None:
    """Make uvicorn use GuardedProtocol and drain on SIGTERM; raise the open-files limit as far as allowed."""
    GuardedProtocol.settings = settings
    uvicorn.config.HTTP_PROTOCOLS["auto"] = uvicorn.config.HTTP_PROTOCOLS["httptools"] = (
        "service.http.uvicorn_glue:GuardedProtocol"
    )
    Server.handle_exit = _handle_exit
    Server.startup = _startup
    linux.fix_mmap_threshold()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
