"""How `make container-test`'s drain clients classify what happens to a request, against real sockets."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections import Counter

import pytest

from deploy.check import DrainCounts, _client, multipart

UPLOAD = multipart("images", "digit.png", b"\x89PNG not really")


class _Answer(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(self.status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"[]")

    def log_message(self, *args):
        pass


def _http_server(status: int):
    handler = type("Handler", (_Answer,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address


def _closing_server():
    """Accepts each connection and closes it without an answer, as a server going away does."""
    listener = socket.create_server(("127.0.0.1", 0))

    def run():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.close()

    threading.Thread(target=run, daemon=True).start()
    return listener, listener.getsockname()


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()


def _drive(address, seconds: float = 0.3) -> DrainCounts:
    counts, stop = DrainCounts(), threading.Event()
    thread = threading.Thread(target=_client, args=(address, UPLOAD, stop, counts, threading.Lock(), 5.0))
    thread.start()
    time.sleep(seconds)
    stop.set()
    thread.join()
    return counts


@pytest.mark.parametrize("status", [200, 503])
def test_answered_requests_count_as_ok_or_by_status(status):
    server, address = _http_server(status)
    try:
        counts = _drive(address)
    finally:
        server.shutdown()
        server.server_close()
    assert counts.refused == 0 and not counts.lost
    if status == 200:
        assert counts.ok > 0 and not counts.errors and counts.accepted_failed == 0
    else:
        assert counts.ok == 0 and counts.errors[503] > 0 and counts.accepted_failed == counts.errors[503]


def test_a_connection_closed_without_an_answer_is_lost():
    listener, address = _closing_server()
    try:
        counts = _drive(address)
    finally:
        listener.close()
    assert counts.ok == 0 and counts.refused == 0 and not counts.errors
    assert sum(counts.lost.values()) > 0 and counts.accepted_failed == sum(counts.lost.values())
    assert set(counts.lost) <= {"RemoteDisconnected", "ConnectionResetError", "BrokenPipeError"}


def test_a_refused_connection_is_not_an_accepted_request():
    counts = _drive(_closed_port())
    assert counts.refused > 0
    assert counts.ok == 0 and counts.lost == Counter() and counts.accepted_failed == 0
