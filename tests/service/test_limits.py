"""The request path's limits against a real `bentoml serve` (one worker, short timeouts, a small connection
cap): budgets, timeouts, caps, metrics, health while busy, and the drain on SIGTERM. No timing thresholds:
each test asserts what the server answered, or what it counted."""

import re
import secrets
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import BOOK_IMAGE
from tests.service.conftest import big_png, serve

pytestmark = pytest.mark.slow


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples (over workers and labels) in a Prometheus exposition."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if re.match(rf"{name}(\{{| )", line))


def raw_exchange(port: int, data: bytes, timeout: float = 30) -> bytes:
    """Send ``data`` on a fresh connection, then read one answer (to its Content-Length) or until the server
    closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            head, sep, body = answer.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            if sep and length and len(body) >= int(length.group(1)):
                break
    return answer


def test_health_answers_while_a_worker_processes_a_maximal_request(small_server):
    # 5000x5000 + 5000x5000 + 3700x3700: 63.7 of the 64 megapixels one request may decode
    files = [("images", (f"{i}.png", big_png(side), "image/png")) for i, side in enumerate((5000, 5000, 3700))]
    done = threading.Event()
    result = {}

    def send_big():
        result["response"] = httpx.post(small_server.url + "/predict", files=files, timeout=300)
        done.set()

    sender = threading.Thread(target=send_big)
    sender.start()
    answered_while_busy = []
    with httpx.Client(timeout=300) as client:
        while not done.is_set():
            statuses = [client.get(small_server.url + path).status_code for path in ("/livez", "/readyz")]
            if not done.is_set():
                answered_while_busy.append(statuses)
    sender.join()
    assert result["response"].status_code == 200, result["response"].text
    assert [r["digit"] for r in result["response"].json()] == [7, 7, 7]
    assert len(answered_while_busy) >= 3, "health checks waited for the big request: the event loop was blocked"
    assert all(statuses == [200, 200] for statuses in answered_while_busy)


def test_a_request_over_its_pixel_budget_is_refused_from_headers(small_server):
    files = [("images", (f"{i}.png", big_png(5000), "image/png")) for i in range(3)]  # 75 megapixels
    before = metric(httpx.get(small_server.url + "/metrics").text, "mnist_images_decoded_total")
    response = httpx.post(small_server.url + "/predict", files=files, timeout=120)
    assert response.status_code == 413
    assert "75000000 pixels" in response.text and "limit per request is 64000000" in response.text
    after = metric(httpx.get(small_server.url + "/metrics").text, "mnist_images_decoded_total")
    assert after == before  # no image of the request was decoded
    ok = httpx.post(small_server.url + "/predict", files=[("images", ("b.png", BOOK_IMAGE.read_bytes(), "image/png"))])
    assert ok.json()[0]["digit"] == 2
    assert metric(httpx.get(small_server.url + "/metrics").text, "mnist_images_decoded_total") == after + 1


def test_a_client_that_leaves_takes_its_queued_work_with_it(small_server):
    """A large request waiting behind others, whose client gives up: dropped unrun. (A small one would not wait:
    the express process takes it.)"""
    url = small_server.url
    pngs = [big_png(side) for side in (5000, 5000, 3700)]
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(pngs)]
    # one served first, so that the queue is priced at what such a request really costs: at the prior price (a
    # server that has run nothing yet), three of them already pass the bound in seconds and the fourth gets 503
    assert httpx.post(url + "/predict", files=files, timeout=300).status_code == 200
    before = metric(httpx.get(url + "/metrics").text, "mnist_requests_abandoned_total")
    pool = ThreadPoolExecutor(3)
    bigs = [pool.submit(httpx.post, url + "/predict", files=files, timeout=300) for _ in range(3)]  # one at a time
    deadline = time.monotonic() + 60
    while (state := httpx.get(url + "/model_info").json()["batcher"])["queued_requests"] < 2:
        # until one runs and the other two wait: the leaving request then queues last, behind all of them
        assert time.monotonic() < deadline and not any(big.done() for big in bigs), state
    body, content_type = multipart_body(*pngs)
    with socket.create_connection(("127.0.0.1", small_server.port)) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (content_type.encode(), len(body), body)
        )
        deadline = time.monotonic() + 60
        while (state := httpx.get(url + "/model_info").json()["batcher"])["queued_requests"] < 3:
            # until it waits in the queue behind the others; then the client goes away
            assert time.monotonic() < deadline, f"the leaving request never queued: {state}"
        time.sleep(0.3)  # a client that gave up waiting, not one that half-closed as it sent (HALF_CLOSE_GRACE_S)
        assert httpx.get(url + "/model_info").json()["batcher"]["queued_requests"] >= 2  # still waiting
    assert [big.result().status_code for big in bigs] == [200] * 3
    after = metric(httpx.get(url + "/metrics").text, "mnist_requests_abandoned_total")
    assert after == before + 1


def multipart_body(*files: bytes) -> tuple[bytes, str]:
    head = b'--zz\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n'
    body = b"".join(head + data + b"\r\n" for data in files) + b"--zz--\r\n"
    return body, "multipart/form-data; boundary=zz"


def test_a_stalled_body_gets_408(small_server):
    head = (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
        b"Content-Length: 100000\r\n\r\n--zz\r\n"
    )
    answer = raw_exchange(small_server.port, head)  # and then nothing more
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"did not arrive within 2 s" in answer and b"connection: close" in answer.lower()


@pytest.mark.parametrize("sent", [b"", b"GET /livez HTTP/1.1\r\nHost: x\r\n"], ids=["idle", "half a head"])
def test_a_connection_without_a_complete_request_head_gets_408(small_server, sent):
    answer = raw_exchange(small_server.port, sent)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"no complete request head within 2 s" in answer


@pytest.mark.parametrize("where", ["url", "header"])
def test_an_oversized_request_head_gets_431(small_server, where):
    big = "x" * 70_000
    head = (
        f"GET /livez?{big} HTTP/1.1\r\nHost: x\r\n\r\n"
        if where == "url"
        else f"GET /livez HTTP/1.1\r\nX-Big: {big}\r\n\r\n"
    )
    answer = raw_exchange(small_server.port, head.encode())
    assert answer.startswith(b"HTTP/1.1 431 ") and b"over 65536 bytes" in answer
    assert httpx.get(small_server.url + "/livez").status_code == 200


def test_a_header_value_that_never_ends_gets_431(small_server):
    with socket.create_connection(("127.0.0.1", small_server.port), timeout=30) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        answer = b""
        try:
            for _ in range(64):  # 4 MiB at most; the server must answer long before
                sock.sendall(b"a" * 65536)
        except OSError:
            pass  # it closed the connection after answering
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_declared_lengths_hold_no_memory(small_server):
    """Connections that declare 32 MiB bodies and send nothing reserve nothing: the worker still serves."""
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
    held = []
    for _ in range(6):
        held.append(socket.create_connection(("127.0.0.1", small_server.port)))
        held[-1].sendall(head + b"Content-Length: %d\r\n\r\n" % (32 * 2**20 - 1))
    try:
        ok = httpx.post(
            small_server.url + "/predict", files=[("images", ("b.png", BOOK_IMAGE.read_bytes(), "image/png"))]
        )
    finally:
        for sock in held:
            sock.close()
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    "request_bytes, status, fragment",
    [
        (b"GET /livez HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello", 400, b"malformed HTTP"),
        (b"GE T /livez HTTP/1.1\r\n\r\n", 400, b"malformed HTTP"),
        (b"DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 405, b"accepts GET, HEAD"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405, b"accepts GET, HEAD"),
        (
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
            b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            415,
            b"only chunked Transfer-Encoding",
        ),
        (
            b"GET /" + b"w" * 300 + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            404,
            b"no such path",
        ),
    ],
    ids=["two-lengths", "bad-method", "delete-metrics", "post-index", "gzip-chunked", "websocket"],
)
def test_every_refusal_below_the_routes_is_json_too(small_server, request_bytes, status, fragment):
    answer = raw_exchange(small_server.port, request_bytes, timeout=10)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    assert b"content-type: application/json" in head.lower() and fragment in body


def test_an_early_refusal_closes_instead_of_reading_the_body(small_server):
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 1000000\r\n\r\n"
    answer = raw_exchange(small_server.port, head)  # the body never comes: the server closes after answering
    assert answer.startswith(b"HTTP/1.1 415 ") and b"connection: close" in answer.lower()


def test_unknown_paths_add_no_metric_series(small_server):
    url = small_server.url
    httpx.get(f"{url}/no-such-page")  # the one "unknown" series, if it is not there yet
    upgrade = b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"

    def series() -> set[str]:
        return {line.rsplit(" ", 1)[0] for line in httpx.get(url + "/metrics").text.splitlines() if line[:1] != "#"}

    before = series()
    tokens = [secrets.token_hex(8) for _ in range(40)]
    for i, token in enumerate(tokens):
        response = (httpx.get if i % 2 else httpx.post)(f"{url}/{token}/x?{token}")
        assert response.status_code == 404 and response.json()["error"].startswith("no such path")
        raw_exchange(small_server.port, f"GET /{token}/ws HTTP/1.1\r\nHost: x\r\n".encode() + upgrade + b"\r\n")
    text = httpx.get(url + "/metrics").text
    assert not any(token in text for token in tokens)
    assert series() == before


def test_wrong_method_is_405_with_allow(small_server):
    response = httpx.get(small_server.url + "/predict")
    assert response.status_code == 405 and response.headers["allow"] == "POST"


def test_sigterm_drains_then_exits(book_export, tmp_path):
    """/readyz turns 503 at once; requests are still answered during the drain; in-flight ones finish; exit 0."""
    image = [("images", ("b.png", BOOK_IMAGE.read_bytes(), "image/png"))]
    with serve(tmp_path, MNIST_WORKERS=1, MNIST_DRAIN_S=3) as served:
        statuses, stop = [], threading.Event()

        def keep_sending():
            with httpx.Client(timeout=60) as client:
                while not stop.is_set():
                    try:
                        statuses.append(client.post(served.url + "/predict", files=image).status_code)
                    except (httpx.ConnectError, httpx.ConnectTimeout):  # never accepted: allowed after the drain
                        statuses.append("refused")
                    except httpx.TransportError as exc:  # accepted, then dropped: a lost request
                        statuses.append(type(exc).__name__)

        with ThreadPoolExecutor(4) as pool:
            senders = [pool.submit(keep_sending) for _ in range(4)]
            while len(statuses) < 20:
                time.sleep(0.05)
            served.proc.send_signal(signal.SIGTERM)
            while httpx.get(served.url + "/readyz").status_code != 503:  # the drain has begun
                assert served.proc.poll() is None, "the server exited instead of draining"
            answered_after_readyz = len(statuses)
            while len(statuses) < answered_after_readyz + 10 and served.proc.poll() is None:
                time.sleep(0.01)
            served_while_draining = statuses[answered_after_readyz : answered_after_readyz + 10]
            code = served.proc.wait(timeout=120)
            stop.set()
            for sender in senders:
                sender.result()
    assert code == 0
    assert served_while_draining == [200] * 10
    assert set(statuses) <= {200, "refused"}, [s for s in statuses if s != 200]
