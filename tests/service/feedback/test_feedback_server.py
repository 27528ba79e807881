"""POST /feedback and GET /feedback/stats on a real `bentoml serve` (two workers), and the store's promise:
kill -9 the server in the middle of a feedback burst, and every feedback that got its 201 is in the store, on
SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import threading
import time

import httpx
import pytest

from service.feedback.store import open_store
from tests.service.conftest import png_bytes, serve

pytestmark = pytest.mark.slow
WINDOW_S = 8


@pytest.fixture(scope="module")
def served(book_export, tmp_path_factory):
    root = tmp_path_factory.mktemp("feedback")
    db = root / "feedback.sqlite3"
    with serve(
        root,
        MNIST_WORKERS=2,
        MNIST_FEEDBACK_DB=db,
        MNIST_FEEDBACK_IMAGES=1,
        MNIST_FEEDBACK_WINDOW_S=WINDOW_S,
        MNIST_ACCURACY_WINDOW=4,
    ) as s:
        yield s, db


def predict(url: str, images, **headers) -> httpx.Response:
    files = [("images", (f"{i}.png", png_bytes(img), "image/png")) for i, img in enumerate(images)]
    response = httpx.post(url + "/predict", files=files, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return response


def feedback(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/feedback", json=body, timeout=30)


def test_an_answer_is_labelled_once_by_its_request_id(served, mnist_images):
    (s, _), (images, labels) = served, mnist_images
    answer = predict(s.url, images[:1])
    rid, digit = answer.headers["x-request-id"], answer.json()[0]["digit"]
    first = feedback(s.url, request_id=rid, digit=int(labels[0]))
    assert first.status_code == 201, first.text
    body = first.json()
    assert (body["request_id"], body["index"], body["answered"]) == (rid, 0, str(digit))
    assert body["correct"] == (digit == labels[0]) and body["model"].startswith("mnist-convnet:")
    again = feedback(s.url, request_id=rid, digit=int(labels[0]))
    assert again.status_code == 409 and "has its feedback already" in again.json()["error"]
    unknown = feedback(s.url, request_id="0" * 32, digit=1)
    assert unknown.status_code == 404 and "no answer with request id" in unknown.json()["error"]


def test_each_image_of_a_request_by_its_index_and_the_clients_own_id(served, mnist_images):
    (s, db), (images, labels) = served, mnist_images
    predict(s.url, images[1:4], **{"x-request-id": "client-chosen.42"})
    for index in (2, 0):
        got = feedback(s.url, request_id="client-chosen.42", digit=int(labels[1 + index]), index=index)
        assert got.status_code == 201 and got.json()["index"] == index, got.text
    assert feedback(s.url, request_id="client-chosen.42", digit=1, index=3).status_code == 404
    kept = open_store(str(db)).labelled_images()  # MNIST_FEEDBACK_IMAGES=1: the 28x28 the model saw
    assert kept.images.shape[1:] == (28, 28) and int(labels[3]) in kept.labels.tolist()


def test_not_a_digit_and_stats(served, mnist_images):
    (s, _), (images, _) = served, mnist_images
    rid = predict(s.url, images[5:6]).headers["x-request-id"]
    got = feedback(s.url, request_id=rid, digit="not_a_digit")
    assert got.status_code == 201 and got.json()["correct"] is False
    stats = httpx.get(s.url + "/feedback/stats", timeout=30).json()
    assert stats["labels"][-1] == "not_a_digit" and stats["served"] in stats["models"]
    mine = stats["models"][stats["served"]]
    assert mine["labels"] >= 4 and 0 <= mine["accuracy"] <= 1
    assert sum(map(sum, mine["confusion"])) == mine["labels"] and sum(mine["confusion"][10]) >= 1
    for query, status in (("?window_s=abc", 400), ("?window_s=0", 400), ("?window_s=1e99", 400), ("", 200)):
        assert httpx.get(s.url + "/feedback/stats" + query, timeout=30).status_code == status
    assert httpx.get(s.url + "/feedback/stats?model=nothing:here", timeout=30).json()["models"] == {}


def test_bad_feedback_is_a_clear_4xx(served):
    s, _ = served
    for kwargs, status in (
        ({"content": b"{}", "headers": {"content-type": "text/plain"}}, 415),
        ({"content": b"x" * 5000, "headers": {"content-type": "application/json"}}, 413),
        ({"content": b"{nope", "headers": {"content-type": "application/json"}}, 400),
        ({"json": {"request_id": "abc", "digit": 11}}, 400),
    ):
        response = httpx.post(s.url + "/feedback", timeout=30, **kwargs)
        assert response.status_code == status and "error" in response.json(), response.text
    assert httpx.get(s.url + "/feedback", timeout=30).status_code == 405


def test_metrics_count_labels_and_the_online_accuracy(served, mnist_images):
    (s, _), (images, labels) = served, mnist_images
    for i in range(6, 10):
        rid = predict(s.url, images[i : i + 1]).headers["x-request-id"]
        assert feedback(s.url, request_id=rid, digit=int(labels[i])).status_code == 201
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the gauges are refreshed from the store every few seconds
        text = httpx.get(s.url + "/metrics", timeout=30).text
        if re.search(r'mnist_online_accuracy_labels\{model="[^"]+"\} 4\.0', text):
            break
        time.sleep(1)
    assert re.search(r'mnist_online_accuracy_labels\{model="[^"]+"\} 4\.0', text), text[-3000:]
    assert re.search(r'mnist_feedback_total\{answered="\d",model="[^"]+",result="right",true_digit="\d"\}', text)
    assert "mnist_online_accuracy_window 4.0" in text and "mnist_online_accuracy_threshold 0.9" in text
    assert re.search(r'mnist_online_accuracy\{model="[^"]+"\} (1\.0|0\.75|0\.5)', text)


def test_an_answer_past_the_window_is_unknown(served, mnist_images):
    (s, _), (images, _) = served, mnist_images
    rid = predict(s.url, images[10:11]).headers["x-request-id"]
    time.sleep(WINDOW_S + 1)
    late = feedback(s.url, request_id=rid, digit=1)
    assert late.status_code == 404 and f"in the last {WINDOW_S} s" in late.json()["error"]


# ---- no acknowledged feedback is lost -------------------------------------------------------------------
ANSWERS = 400
CLIENTS = 12


def _burst_then_kill(url: str, rids: list[str], kill) -> set[str]:
    """Label every answer from CLIENTS threads; once a third are acknowledged, ``kill`` the server mid-burst.
    The request ids whose feedback got a 201."""
    acked, lock, killed = set(), threading.Lock(), threading.Event()
    todo = iter(rids)

    def client():
        with httpx.Client(timeout=10) as http:
            while not killed.is_set():
                with lock:
                    rid = next(todo, None)
                if rid is None:
                    return
                try:
                    response = http.post(url + "/feedback", json={"request_id": rid, "digit": 3})
                except httpx.HTTPError:
                    continue
                if response.status_code == 201:
                    with lock:
                        acked.add(rid)
                        if len(acked) >= len(rids) // 3 and not killed.is_set():
                            killed.set()
                            kill()

    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        for future in [pool.submit(client) for _ in range(CLIENTS)]:
            future.result()
    assert killed.is_set(), "the burst ended before the kill"
    return acked


def _answers(url: str, images) -> list[str]:
    def one(i):
        return predict(url, images[i % len(images) : i % len(images) + 1]).headers["x-request-id"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(ANSWERS)))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_kill_9_mid_burst_loses_no_acknowledged_feedback(backend, book_export, tmp_path, mnist_images, request):
    images, _ = mnist_images
    if backend == "sqlite":
        where = str(tmp_path / "feedback.sqlite3")
        env = {"MNIST_FEEDBACK_DB": where}
    else:
        postgres = request.getfixturevalue("postgres")
        where = postgres.url
        env = {"MNIST_FEEDBACK_URL": where}
    with serve(tmp_path, MNIST_WORKERS=2, **env) as s:
        rids = _answers(s.url, images)
        time.sleep(0.5)  # the answers are in the store (written at most 0.1 s late)

        def kill():
            os.killpg(s.proc.pid, signal.SIGKILL)
            if backend == "postgresql":
                postgres.stop("immediate")  # and the database crashes too: no shutdown checkpoint

        acked = _burst_then_kill(s.url, rids, kill)
        s.proc.wait(30)
    if backend == "postgresql":
        postgres.start()  # replays its WAL
    store = open_store(where)
    with store._transaction(durable=False) as cur:
        cur.execute("SELECT request_id FROM feedback")
        stored = {rid for (rid,) in cur.fetchall()}
    store.close()
    assert len(acked) >= ANSWERS // 3 and acked <= stored, f"lost: {sorted(acked - stored)[:5]}"
    (tmp_path / "again").mkdir()
    with serve(tmp_path / "again", MNIST_WORKERS=1, **env) as again:  # and the restarted server agrees
        for rid in sorted(acked)[:20]:
            assert feedback(again.url, request_id=rid, digit=3).status_code == 409


@pytest.fixture(scope="module")
def mnist_images(mnist_test):
    """The first 200 test digits as uint8 arrays, and their labels."""
    images, labels = mnist_test
    return [img.numpy() for img in images[:200]], labels[:200].numpy()


def test_a_postgres_restart_costs_feedback_a_503_and_never_a_prediction(book_export, tmp_path, postgres, mnist_images):
    images, labels = mnist_images
    with serve(tmp_path, MNIST_WORKERS=1, MNIST_FEEDBACK_URL=postgres.url) as s:
        postgres.stop("fast")  # the database goes away under a running server
        try:
            rid = predict(s.url, images[:1]).headers["x-request-id"]  # predictions go on
            down = feedback(s.url, request_id=rid, digit=int(labels[0]))
            assert down.status_code == 503 and "feedback store" in down.json()["error"], down.text
            assert "retry-after" in down.headers
        finally:
            postgres.start()
        deadline, got = time.monotonic() + 30, None
        while time.monotonic() < deadline:  # reconnected on a later try; the waiting answer was written then
            got = feedback(s.url, request_id=rid, digit=int(labels[0]))
            if got.status_code == 201:
                break
            time.sleep(0.5)
        assert got.status_code == 201, got.text
        assert httpx.get(s.url + "/readyz", timeout=10).status_code == 200
