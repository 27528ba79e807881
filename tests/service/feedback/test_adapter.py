"""/feedback and /feedback/stats through the HTTP front, over a Core with a fake engine and a real recorder on a
SQLite file: the routes, the token, and what each refusal says."""

from __future__ import annotations

import json

import pytest

from service.config import ServiceConfig
from service.feedback.recorder import Recorder
from service.http.front import Frontend
from service.protocols import ROUTES
from tests.service.fakes import make_core, run
from tests.service.http.test_front import JSON, MULTIPART, bentoml_app, multipart, png


@pytest.fixture
def app(tmp_path):
    def make(feedback=True, **settings) -> Frontend:
        config = ServiceConfig(**settings)
        front = Frontend(bentoml_app, ROUTES, config)
        front.core = make_core(config)
        if feedback:
            front.core.recorder = Recorder(str(tmp_path / "f.sqlite3"), front.core.tag, config)
            made.append(front.core.recorder)
        return front

    made: list[Recorder] = []
    yield make
    for recorder in made:
        recorder.close()


def label(front, body, headers=(JSON,)):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return run(front, "POST", "/feedback", data, headers=list(headers))


def test_an_answer_then_its_label_then_the_stats(app):
    front = app()
    answer = run(front, "POST", "/predict", multipart(png(), png(value=128)), headers=[MULTIPART])
    rid, digits = answer.headers["x-request-id"], [a["digit"] for a in answer.json()]
    stored = label(front, {"request_id": rid, "digit": digits[1], "index": 1})
    assert stored.status == 201, stored.body
    assert stored.json()["correct"] and stored.json()["model"] == "mnist-convnet:v1"
    assert label(front, {"request_id": rid, "digit": digits[1], "index": 1}).status == 409
    wrong = (digits[0] + 1) % 10
    assert label(front, {"request_id": rid, "digit": wrong}).json()["correct"] is False
    stats = run(front, "GET", "/feedback/stats", query=b"window_s=60")
    assert stats.status == 200
    model = stats.json()["models"]["mnist-convnet:v1"]
    assert (model["labels"], model["correct"], model["accuracy"]) == (2, 1, 0.5)
    assert model["confusion"][wrong][digits[0]] == 1


@pytest.mark.parametrize(
    "body, headers, status, fragment",
    [
        ({"request_id": "nobody", "digit": 1}, (JSON,), 404, "no answer with request id nobody (index 0)"),
        ({"request_id": "x", "digit": 12}, (JSON,), 400, "0-9, got 12"),
        (b'{"request_id": "x", "digit": 1}', (("content-type", "text/plain"),), 415, "expects application/json"),
        (b"{" * 5000, (JSON,), 413, "at most 4096 bytes"),
        (b"[" * 4000, (JSON,), 400, "nests too deep"),
    ],
)
def test_bad_feedback_is_a_4xx_that_says_why(app, body, headers, status, fragment):
    got = label(app(), body, headers)
    assert got.status == status and fragment in got.json()["error"], got.body


def test_a_chunked_body_over_the_limit_is_413(app):
    got = run(app(), "POST", "/feedback", [b"{" * 3000, b" " * 3000], headers=[JSON])
    assert got.status == 413


def test_the_token_guards_feedback_like_the_predict_endpoints(app):
    front = app(api_token="s3cret")
    assert label(front, {"request_id": "x", "digit": 1}).status == 401
    assert run(front, "GET", "/feedback/stats").status == 401
    auth = ("authorization", "Bearer s3cret")
    assert label(front, {"request_id": "x", "digit": 1}, (JSON, auth)).status == 404  # past the token
    assert run(front, "GET", "/feedback/stats", headers=[auth]).status == 200


def test_with_feedback_off_the_routes_say_so(app):
    front = app(feedback=False)
    for method, path in (("POST", "/feedback"), ("GET", "/feedback/stats")):
        got = run(front, method, path, b'{"request_id": "x", "digit": 1}', headers=[JSON])
        assert got.status == 404 and "MNIST_FEEDBACK=0" in got.json()["error"]


@pytest.mark.parametrize("query", [b"window_s=nope", b"window_s=-1", b"window_s=inf", b"window_s=nan"])
def test_stats_window_must_be_a_sane_number_of_seconds(app, query):
    got = run(app(), "GET", "/feedback/stats", query=query)
    assert got.status == 400 and "window_s" in got.json()["error"]


def test_images_kept_for_the_store_are_not_sent_back_unasked(app):
    front = app(feedback_images=True)
    plain = run(front, "POST", "/predict", multipart(png()), headers=[MULTIPART])
    assert "input" not in plain.json()[0]  # the recorder asked the engine for them, the client did not
    body = json.dumps({"images": [[[0.0] * 28] * 28], "return_input": True}).encode()
    asked = run(front, "POST", "/predict_array", body, headers=[JSON])
    assert len(asked.json()[0]["input"]) == 28
    rid = plain.headers["x-request-id"]
    stored = label(front, {"request_id": rid, "digit": plain.json()[0]["digit"]})
    assert stored.status == 201 and front.core.engine.calls[0]["want_inputs"] is True
