"""The connection guards below the ASGI app (service/http/uvicorn_glue.py), driven with raw bytes through
uvicorn's real httptools protocol on a fake transport: no sockets, no server."""

from __future__ import annotations

import asyncio
import json

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from service.config import ServiceConfig
from service.http import uvicorn_glue
from service.http.uvicorn_glue import FREE_BODY_PIECES, MAX_HEAD_BYTES, GuardedProtocol


class Transport(asyncio.Transport):
    """Like asyncio's own: closing it tells the protocol, on the loop's next turn, that the connection is lost."""

    def __init__(self):
        super().__init__()
        self.written = bytearray()
        self.writes = 0
        self.closed = False
        self.eof_written = False
        self.protocol = None

    def can_write_eof(self):
        return True

    def write_eof(self):
        self.eof_written = True

    def write(self, data):
        if not self.closed:
            self.written += data
            self.writes += 1

    def close(self):
        if not self.closed and self.protocol is not None:
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)
        self.closed = True

    def abort(self):
        self.close()

    def is_closing(self):
        return self.closed

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 3000)}.get(name, default)

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def status(self) -> int:
        return int(self.written.split(b" ", 2)[1]) if self.written else 0

    def json(self) -> dict:
        return json.loads(self.written.partition(b"\r\n\r\n")[2])


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/early":  # answers before reading the body, and asks to close (as a 413 does)
        headers = [(b"content-length", b"5"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": b"early"})
        return
    if scope["path"] == "/hold":
        await asyncio.sleep(3600)
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    answer = b"ok %d" % len(body)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(answer))]})
    await send({"type": "http.response.body", "body": answer})
    if scope["path"] == "/then":  # right after the answer is complete, in the same turn of the loop
        AFTER_ANSWER[0]()


AFTER_ANSWER = [lambda: None]


@pytest.fixture
def settings(monkeypatch):
    previous = GuardedProtocol.settings
    GuardedProtocol.settings = ServiceConfig(header_timeout_s=0.05, max_connections=2, keep_alive_s=3)
    monkeypatch.setattr(uvicorn_glue, "LINGER_S", 0.1)
    monkeypatch.setattr(uvicorn_glue, "LINGER_IDLE_S", 0.05)
    for group in uvicorn_glue.SHED_ORDER:
        group.clear()
    yield GuardedProtocol.settings
    GuardedProtocol.settings = previous
    for group in uvicorn_glue.SHED_ORDER:
        group.clear()


async def _connect(connections: set | None = None) -> tuple[GuardedProtocol, Transport]:
    config = Config(app=app, http="httptools", lifespan="off", log_config=None)
    state = ServerState()
    if connections is not None:
        state.connections = connections
    protocol = GuardedProtocol(config=config, server_state=state, app_state={}, _loop=asyncio.get_running_loop())
    transport = Transport()
    transport.protocol = protocol
    protocol.connection_made(transport)
    return protocol, transport


def _exchange(*pieces: bytes, wait: float = 0.02, connections: set | None = None) -> Transport:
    async def scenario():
        protocol, transport = await _connect(connections)
        for piece in pieces:
            if transport.closed:
                break
            protocol.data_received(piece)
            await asyncio.sleep(0)
        await asyncio.sleep(wait)
        return protocol, transport

    protocol, transport = asyncio.run(scenario())
    assert protocol.timeout_keep_alive == 3
    return transport


def test_a_plain_request_goes_through(settings):
    transport = _exchange(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    assert transport.status() == 200 and transport.written.endswith(b"ok 5")
    assert transport.writes == 1  # the head and the body in one send: one system call and one TCP segment


def test_each_answer_on_a_kept_alive_connection_leaves_in_one_send(settings):
    request = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
    transport = _exchange(request, request, request)
    assert transport.written.count(b"HTTP/1.1 200") == 3 and transport.writes == 3


def test_an_early_answer_is_written_whole_before_the_connection_lingers(settings):
    transport = _exchange(b"POST /early HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nxx")
    assert transport.status() == 413 and transport.written.endswith(b"early") and transport.eof_written


def test_a_head_over_the_size_bound_is_431(settings):
    url = b"/" + b"x" * MAX_HEAD_BYTES
    transport = _exchange(b"GET " + url + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert transport.status() == 431 and transport.eof_written  # answered, then lingering


def test_a_header_value_that_never_ends_is_431(settings):
    pieces = [b"GET / HTTP/1.1\r\nX-Long: "] + [b"v" * 8192] * (MAX_HEAD_BYTES // 8192 + 2)
    transport = _exchange(*pieces)
    assert transport.status() == 431 and "URL, headers or trailers" in transport.json()["error"]


def test_a_head_that_does_not_complete_in_time_is_408(settings):
    transport = _exchange(b"GET / HTTP/1.1\r\nHost: a\r\n", wait=0.2)
    assert transport.status() == 408 and "within 0.05 s" in transport.json()["error"] and transport.closed
    rid = transport.json()["request_id"]  # an answer written below the app has an id too
    assert len(rid) == 32 and b"x-request-id: " + rid.encode() in transport.written


def test_an_idle_connection_is_answered_408_and_closed(settings):
    transport = _exchange(wait=0.2)
    assert transport.status() == 408 and transport.closed


def test_malformed_http_is_a_json_400(settings):
    transport = _exchange(b"NOT HTTP AT ALL\r\n\r\n")
    assert transport.status() == 400 and "malformed HTTP" in transport.json()["error"]


def test_a_body_in_tiny_chunks_is_refused(settings):
    head = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    transport = _exchange(head, b"1\r\nx\r\n" * (FREE_BODY_PIECES + 10))
    assert transport.status() == 400 and "pieces of 1 bytes on average" in transport.json()["error"]


def test_a_body_in_fair_chunks_is_not(settings):
    head = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"100\r\n" + b"x" * 256 + b"\r\n"
    transport = _exchange(head, chunk * (FREE_BODY_PIECES + 10) + b"0\r\n\r\n")
    assert transport.status() == 200 and transport.written.endswith(b"ok %d" % (256 * (FREE_BODY_PIECES + 10)))


def test_past_the_connection_cap_a_request_gets_503_but_liveness_stays_200(settings):
    crowd = {object(), object()}  # two connections open already: the cap
    busy = _exchange(b"GET /predict HTTP/1.1\r\nHost: a\r\n\r\n", connections=set(crowd))
    assert busy.status() == 503 and b"retry-after: 1" in busy.written.lower()
    live = _exchange(b"GET /livez HTTP/1.1\r\nHost: a\r\n\r\n", connections=set(crowd))
    assert live.status() == 200


def test_twice_past_the_cap_with_every_socket_busy_a_new_one_is_closed_unanswered(settings):
    transport = _exchange(connections={object() for _ in range(5)})
    assert transport.closed and transport.written == b""


def test_a_new_connection_sheds_the_socket_that_waited_longest(settings):
    GuardedProtocol.settings = ServiceConfig(header_timeout_s=10, max_connections=2)

    async def scenario():
        shared: set = set()
        idle = [await _connect(shared) for _ in range(4)]  # twice the cap, none has sent a byte
        newcomer, transport = await _connect(shared)
        newcomer.data_received(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.sleep(0.01)
        return [t.closed for _, t in idle], transport

    closed, transport = asyncio.run(scenario())
    assert closed == [True, False, False, False]  # the oldest went, the others stay
    assert transport.status() == 200


def test_only_requests_in_progress_count_against_the_cap(settings):
    GuardedProtocol.settings = ServiceConfig(header_timeout_s=10, max_connections=2)  # the idle ones stay

    async def scenario():
        shared: set = set()
        waiting = [await _connect(shared) for _ in range(3)]  # idle sockets: not counted
        answers = []
        for _ in range(3):  # two held requests fill the cap of 2; the third is refused
            protocol, transport = await _connect(shared)
            protocol.data_received(b"GET /hold HTTP/1.1\r\nHost: a\r\n\r\n")
            await asyncio.sleep(0.01)
            answers.append(transport)
        statuses = [t.status() for t in answers]
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()
        return waiting, statuses, bytes(answers[2].written)

    waiting, statuses, refused = asyncio.run(scenario())
    assert statuses == [0, 0, 503]
    assert b"requests in progress" in refused


def test_an_early_answer_lingers_so_that_the_client_reads_it(settings):
    async def scenario():
        protocol, transport = await _connect()
        protocol.data_received(b"POST /early HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        await asyncio.sleep(0.01)
        answered = bytes(transport.written)
        still_open, eof = not transport.closed, transport.eof_written
        protocol.data_received(b"y" * 50_000)  # the rest of the body: read and dropped, not parsed
        await asyncio.sleep(0.2)  # past LINGER_S
        return answered, still_open, eof, transport

    answered, still_open, eof, transport = asyncio.run(scenario())
    assert answered.startswith(b"HTTP/1.1 413") and answered.endswith(b"early")
    assert still_open and eof  # half-closed after the answer: the client reads it, its writes still land
    assert transport.written == answered and transport.closed  # nothing more answered; closed after lingering


def test_a_client_that_half_closes_after_its_request_gets_the_answer(settings):
    async def scenario():
        protocol, transport = await _connect()
        protocol.data_received(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
        keep_open = protocol.eof_received()  # nc -N, shutdown(SHUT_WR)
        await asyncio.sleep(0.02)
        return keep_open, transport

    keep_open, transport = asyncio.run(scenario())
    assert keep_open is True
    assert transport.status() == 200 and transport.written.endswith(b"ok 3") and transport.closed


@pytest.mark.parametrize("method", [b"HEAD", b"GET"])
def test_an_answer_without_a_body_is_written_before_an_end_of_file_closes_the_socket(settings, method):
    async def scenario():
        protocol, transport = await _connect()

        def end_of_file():  # nc -N: asyncio closes the socket itself, below the glue's transport, when
            if not protocol.eof_received():  # eof_received says so, before the loop's next turn
                transport.close()

        AFTER_ANSWER[0] = end_of_file
        protocol.data_received(method + b" /then HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.sleep(0.01)
        return transport

    try:
        transport = asyncio.run(scenario())
    finally:
        AFTER_ANSWER[0] = lambda: None
    assert transport.closed and transport.status() == 200 and b"content-length: 4" in transport.written.lower()
    assert transport.written.endswith(b"\r\n\r\n" if method == b"HEAD" else b"ok 0")  # HEAD: the head alone


def test_a_half_close_with_nothing_in_progress_closes(settings):
    async def scenario():
        protocol, _ = await _connect()
        return protocol.eof_received()

    assert not asyncio.run(scenario())


def test_websocket_upgrades_are_answered_as_plain_http(settings):
    transport = _exchange(
        b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    assert transport.status() == 200


def test_install_makes_uvicorn_use_the_guarded_protocol():
    import uvicorn.config
    from uvicorn.server import Server

    uvicorn_glue.install(ServiceConfig())
    assert uvicorn.config.HTTP_PROTOCOLS["auto"] == "service.http.uvicorn_glue:GuardedProtocol"
    assert Server.handle_exit is uvicorn_glue._handle_exit


def test_a_half_close_in_the_middle_of_a_body_closes(settings):
    async def scenario():
        protocol, _ = await _connect()
        protocol.data_received(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 30\r\n\r\nabc")
        return protocol.eof_received()  # the body can now never be whole: nothing to answer

    assert not asyncio.run(scenario())


@pytest.mark.parametrize(
    "start, endless",
    [
        (b"0\r\nX-Trailer: ", b"a"),  # trailers after the last chunk
        (b"1;ext=", b"e"),  # a chunk extension
    ],
    ids=["trailer", "chunk-extension"],
)
def test_bytes_that_are_not_body_are_bounded_after_the_head_too(settings, start, endless):
    head = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    pieces = [head, start] + [endless * 16384] * (3 * MAX_HEAD_BYTES // 16384)
    transport = _exchange(*pieces)
    assert transport.status() == 431 and "trailers" in transport.json()["error"]


def test_an_endless_pipelined_head_behind_a_request_in_progress_is_cut(settings):
    async def scenario():
        protocol, transport = await _connect()
        protocol.data_received(b"GET /hold HTTP/1.1\r\nHost: a\r\n\r\nGET /x HTTP/1.1\r\nX-Endless: ")
        for _ in range(3 * MAX_HEAD_BYTES // 16384):
            if transport.closed:
                break
            protocol.data_received(b"v" * 16384)
        closed = transport.closed
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()
        return closed, bytes(transport.written)

    closed, written = asyncio.run(scenario())
    assert closed and written == b""  # cut before it could grow; no answer that /hold's client would take for its own


def test_a_socket_that_never_spoke_is_shed_before_a_client_sending_its_head(settings):
    GuardedProtocol.settings = ServiceConfig(header_timeout_s=10, max_connections=2)

    async def scenario():
        shared: set = set()
        talking, talking_transport = await _connect(shared)
        talking.data_received(b"GET /x HTTP/1.1\r\nHost: a\r\n")  # oldest, but its head is on its way
        silent = [await _connect(shared) for _ in range(3)]
        await _connect(shared)  # the fifth socket: one must go
        return talking_transport.closed, [t.closed for _, t in silent]

    talking_closed, silent_closed = asyncio.run(scenario())
    assert not talking_closed and silent_closed == [True, False, False]


def test_requests_whose_bodies_are_still_arriving_do_not_count_against_the_cap(settings):
    GuardedProtocol.settings = ServiceConfig(header_timeout_s=10, max_connections=2)

    async def scenario():
        shared: set = set()
        for _ in range(3):  # more slow uploads than the cap: a byte of a 100,000-byte body each
            slow, _ = await _connect(shared)
            slow.data_received(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\nx")
        whole, transport = await _connect(shared)
        whole.data_received(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok")
        await asyncio.sleep(0.01)
        statuses = transport.status()
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()
        return statuses

    assert asyncio.run(scenario()) == 200


# ---- start-up: the shared socket accepted from in turn --------------------------------------------------------
async def _serve_once(sock) -> tuple[list, bytes]:
    """uvicorn's Server started by the glue on ``sock`` (as a worker of `bentoml serve` is), one request through
    it, then its listeners closed."""
    from uvicorn.server import Server

    server = Server(Config(app=app, http="httptools", lifespan="off", log_config=None))
    server.config.load()
    server.lifespan = server.config.lifespan_class(server.config)
    await uvicorn_glue._startup(server, [sock])
    reader, writer = await asyncio.open_connection(*sock.getsockname())
    writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    answer = await reader.read()
    writer.close()
    kinds = [type(s).__name__ for s in server.servers]
    for s in server.servers:
        s.close()
        await s.wait_closed()
    return kinds, answer


@pytest.fixture
def listening_socket(settings, monkeypatch, tmp_path):
    import socket

    monkeypatch.setattr(uvicorn_glue, "LISTENERS", [])
    monkeypatch.setattr(uvicorn_glue, "table_path", lambda sock: str(tmp_path / "listener.load"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock
    sock.close()


def test_a_workers_shared_socket_is_accepted_from_in_turn(listening_socket):
    kinds, answer = asyncio.run(_serve_once(listening_socket))
    assert kinds == ["BalancedListener"] and answer.endswith(b"ok 0")
    assert len(uvicorn_glue.LISTENERS) == 1


def test_without_a_load_table_the_event_loop_accepts_as_before(listening_socket, monkeypatch, caplog):
    def no_table(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(uvicorn_glue, "LoadTable", no_table)
    kinds, answer = asyncio.run(_serve_once(listening_socket))
    assert kinds == ["Server"] and answer.endswith(b"ok 0")
    assert "without balancing" in caplog.text
