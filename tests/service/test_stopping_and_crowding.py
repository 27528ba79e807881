"""Against a real `bentoml serve`: idle and slow sockets never crowd out whole requests, refusals reach clients
that write their whole request first, and the server stops cleanly whichever way the signal comes (attack
round 4). No timing thresholds: each test asserts what clients got, or which processes are left."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from tests.conftest import BOOK_IMAGE
from tests.service.conftest import big_png, serve
from tests.service.test_limits import raw_exchange

pytestmark = pytest.mark.slow
IMAGE = [("images", ("b.png", BOOK_IMAGE.read_bytes(), "image/png"))]


def _workers(served) -> list[psutil.Process]:
    """The HTTP workers of a `bentoml serve` (its children that run BentoML's worker)."""
    children = psutil.Process(served.proc.pid).children(recursive=True)
    return [p for p in children if "_bentoml_impl.worker" in " ".join(p.cmdline())]


def _wait_gone(processes: list[psutil.Process], timeout: float = 60) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return alive


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


# ---- crowding ----------------------------------------------------------------------------------------------
def test_idle_sockets_do_not_crowd_out_whole_requests(small_server):
    """Three times the cap in sockets that send nothing, reopened as they are closed: requests still answered."""
    stop = threading.Event()

    def hold_idle():
        held = []
        while not stop.is_set():
            held = [s for s in held if s.fileno() != -1]
            try:
                while len(held) < 8 * 3:
                    held.append(socket.create_connection(("127.0.0.1", small_server.port), timeout=5))
            except OSError:
                pass
            time.sleep(0.01)
        for s in held:
            s.close()

    holder = threading.Thread(target=hold_idle)
    holder.start()
    try:
        time.sleep(0.5)
        answers = [httpx.get(small_server.url + "/readyz", timeout=10).status_code for _ in range(10)]
        predicted = httpx.post(small_server.url + "/predict", files=IMAGE, timeout=30)
    finally:
        stop.set()
        holder.join()
    assert answers == [200] * 10
    assert predicted.status_code == 200 and predicted.json()[0]["digit"] == 2


def test_requests_in_progress_past_the_cap_get_503_and_liveness_stays_200(book_export, tmp_path):
    """Whole requests of maximal images (seconds of work, all admitted to the queue) fill the cap of 8."""
    files = [("images", (f"{i}.png", big_png(side), "image/png")) for i, side in enumerate((5000, 5000, 3700))]
    readyz = livez = b""
    with serve(tmp_path, MNIST_WORKERS=1, MNIST_MAX_CONNECTIONS=8, MNIST_MAX_QUEUE_S=600) as served:
        with ThreadPoolExecutor(16) as pool:
            held = [pool.submit(httpx.post, served.url + "/predict", files=files, timeout=300) for _ in range(16)]
            for _ in range(200):  # while they are in progress
                readyz = raw_exchange(served.port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
                if readyz.startswith(b"HTTP/1.1 503 "):
                    livez = raw_exchange(served.port, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
                    break
                time.sleep(0.02)
            statuses = [h.result().status_code for h in held]
    assert readyz.startswith(b"HTTP/1.1 503 ") and b"requests in progress" in readyz, readyz[:300]
    assert b"retry-after: 1" in readyz.lower()
    assert livez.startswith(b"HTTP/1.1 200 ")
    assert set(statuses) <= {200, 503}  # those past the cap are refused at once; none is lost


def test_half_sent_bodies_do_not_count_against_the_cap(small_server):
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
    held = []
    try:
        for _ in range(16):  # twice the cap, each a byte into a 1000-byte body
            sock = socket.create_connection(("127.0.0.1", small_server.port))
            sock.sendall(head + b"Content-Length: 1000\r\n\r\n-")
            held.append(sock)
        time.sleep(0.2)
        predicted = httpx.post(small_server.url + "/predict", files=IMAGE, timeout=30)
    finally:
        for sock in held:
            sock.close()
    assert predicted.status_code == 200 and predicted.json()[0]["digit"] == 2


# ---- refusals the client can read ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path, headers, status",
    [
        ("/predict", {"Content-Type": "multipart/form-data; boundary=zz"}, 413),  # by its Content-Length
        ("/predict", {"Content-Type": "text/plain"}, 415),
        ("/nowhere", {}, 404),
    ],
)
def test_a_client_that_writes_its_whole_body_first_reads_the_early_refusal(small_server, path, headers, status):
    """http.client sends the whole body before reading: the server answers early, then reads and drops the rest
    (a lingering close) instead of resetting the connection under the answer."""
    body = b"x" * (40 * 1024 * 1024 if status == 413 else 4 * 1024 * 1024)
    connection = http.client.HTTPConnection("127.0.0.1", small_server.port, timeout=60)
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        assert response.status == status, response.read()[:300]
        assert b'"error"' in response.read()
    finally:
        connection.close()


def test_a_client_that_half_closes_after_its_request_gets_the_answer(small_server):
    data = BOOK_IMAGE.read_bytes()
    body = b'--zz\r\nContent-Disposition: form-data; name="images"; filename="b.png"\r\n\r\n' + data + b"\r\n--zz--\r\n"
    head = (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    with socket.create_connection(("127.0.0.1", small_server.port), timeout=30) as sock:
        sock.sendall(head + body)
        sock.shutdown(socket.SHUT_WR)  # what `nc -N` does
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"digit": 2' in answer


# ---- stopping ------------------------------------------------------------------------------------------------
def _keep_sending(url: str, statuses: list, stop: threading.Event) -> None:
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            try:
                statuses.append(client.post(url + "/predict", files=IMAGE).status_code)
            except (httpx.ConnectError, httpx.ConnectTimeout):  # never accepted: allowed once the drain ends
                statuses.append("refused")
            except httpx.TransportError as exc:  # accepted, then dropped: a lost request
                statuses.append(type(exc).__name__)


def test_sigterm_to_every_process_at_once_still_drains(book_export, tmp_path):
    """As systemd's KillMode=control-group stops a service: every process gets SIGTERM, and the arbiter passes
    its own on, so each worker gets two. The drain still runs: readiness fails, no accepted request is lost."""
    with serve(tmp_path, MNIST_WORKERS=2, MNIST_DRAIN_S=2) as served:
        statuses, stop = [], threading.Event()
        with ThreadPoolExecutor(4) as pool:
            senders = [pool.submit(_keep_sending, served.url, statuses, stop) for _ in range(4)]
            while len(statuses) < 20:
                time.sleep(0.05)
            everyone = [psutil.Process(served.proc.pid), *psutil.Process(served.proc.pid).children(recursive=True)]
            for process in everyone:
                process.send_signal(signal.SIGTERM)
            readiness = httpx.get(served.url + "/readyz", timeout=10).status_code
            code = served.proc.wait(timeout=120)
            stop.set()
            for sender in senders:
                sender.result()
    assert readiness == 503
    assert code == 0
    assert set(statuses) <= {200, "refused"}, [s for s in statuses if s not in (200, "refused")]


def test_sigterm_to_one_worker_leaves_the_port_to_the_others(book_export, tmp_path):
    with serve(tmp_path, MNIST_WORKERS=2, MNIST_DRAIN_S=1) as served:
        workers = _workers(served)
        assert len(workers) == 2
        workers[0].send_signal(signal.SIGTERM)
        assert _wait_gone(workers[:1]) == []
        answers = []
        for _ in range(20):
            try:
                answers.append(httpx.post(served.url + "/predict", files=IMAGE, timeout=30).status_code)
            except httpx.TransportError as exc:
                answers.append(type(exc).__name__)
        assert workers[1].is_running()
    assert answers == [200] * 20


def test_kill_9_of_bentoml_serve_leaves_no_worker_serving(book_export, tmp_path):
    with serve(tmp_path, MNIST_WORKERS=2, MNIST_DRAIN_S=1) as served:
        workers = _workers(served)
        work_processes = [c for w in workers for c in w.children(recursive=True)]
        os.kill(served.proc.pid, signal.SIGKILL)
        served.proc.wait()
        left = _wait_gone(workers + work_processes)
        refused = _refused(served.port)
    assert left == []  # the workers drained and exited, and took their work processes with them
    assert refused
