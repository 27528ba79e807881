"""The HTTP front with the service's real routes, over a Core with a fake engine, driven by a fake ASGI
receive/send: routing, every refusal it makes, request ids, the access log, readiness and the pages."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from service.config import ServiceConfig
from service.core import LIFECYCLE
from service.http.front import Frontend
from service.protocols import ROUTES
from tests.service.fakes import call, make_core, run

BOUNDARY = "zzBoundary"


async def bentoml_app(scope, receive, send):
    """Stands in for BentoML's app behind the front: says which path reached it."""
    if scope["type"] != "http":
        return
    body = f"bentoml {scope['path']}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


def front(**settings) -> Frontend:
    config = ServiceConfig(**settings)
    app = Frontend(bentoml_app, ROUTES, config)
    app.core = make_core(config)
    return app


def png(side=28, value=255) -> bytes:
    image = Image.new("L", (side, side))
    image.paste(value, (side // 3, side // 6, side // 2, side - side // 6))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def multipart(*files: bytes, fields: dict[str, str] | None = None) -> bytes:
    out = b""
    for i, data in enumerate(files):
        out += (
            (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    for name, value in (fields or {}).items():
        out += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    return out + f"--{BOUNDARY}--\r\n".encode()


MULTIPART = ("content-type", f"multipart/form-data; boundary={BOUNDARY}")
JSON = ("content-type", "application/json")
JSON_H = (b"content-type", b"application/json")


@pytest.fixture(autouse=True)
def not_draining():
    yield
    LIFECYCLE.draining = False


# ---- the predict paths ------------------------------------------------------------------------------------
def test_predict_answers_each_image_in_order():
    app = front()
    answer = run(app, "POST", "/predict", multipart(png(), png(56), png(28, 128)), [MULTIPART])
    assert answer.status == 200, answer.body
    results = answer.json()
    assert len(results) == 3
    for r in results:
        assert set(r) == {"digit", "confidence", "probabilities", "looks_like_digit", "digit_score"}
        assert r["confidence"] == pytest.approx(max(r["probabilities"]), abs=1e-6)
        assert sum(r["probabilities"]) == pytest.approx(1, abs=1e-4)
    assert app.core.engine.calls[-1]["images"] == 3


@pytest.mark.parametrize("how", ["query", "field"])
def test_return_input_by_query_or_by_form_field(how):
    app = front()
    if how == "query":
        answer = run(app, "POST", "/predict", multipart(png()), [MULTIPART], query=b"return_input=1")
    else:
        answer = run(app, "POST", "/predict", multipart(png(), fields={"return_input": "true"}), [MULTIPART])
    assert answer.status == 200, answer.body
    image = np.array(answer.json()[0]["input"])
    assert image.shape == (28, 28) and 0 <= image.min() and image.max() <= 1


@pytest.mark.parametrize(
    "path, headers, body",
    [
        ("/predict", [MULTIPART], multipart(png(), png())),
        ("/predict_array", [JSON], json.dumps({"images": [[[0.0] * 28] * 28]}).encode()),
        ("/v2/models/mnist/infer", [JSON], b'{"inputs": []}'),
    ],
)
def test_a_full_queue_refuses_a_body_before_reading_it(path, headers, body):
    """The queue's state and the Content-Length decide it: 503 with Retry-After, and the connection closes
    (lingering: service/http/uvicorn_glue.py) instead of the body being read to be thrown away."""
    from service.errors import overloaded

    app = front()
    app.core.engine.refusal = overloaded("this worker has about 9.0 s of work queued and the limit is 5 s", 5)
    headers = [*headers, ("content-length", str(len(body)))]

    answer = run(app, "POST", path, [body[:10], body[10:]], headers)

    assert answer.status == 503 and answer.headers["retry-after"] == "5"
    assert answer.headers["connection"] == "close" and "9.0 s of work queued" in answer.json()["error"]
    assert answer.unread == 2 and app.core.engine.asked_unread == [len(body)]
    assert app.core.engine.calls == []
    app.core.engine.refusal = None
    assert run(app, "POST", path, body, headers).status in (200, 400)  # read and served once there is room


def test_a_body_over_the_limit_is_413_even_while_the_queue_refuses():
    """Retrying it would never help: a 503 with Retry-After would tell the client to."""
    from service.errors import overloaded

    app = front(max_request_bytes=1000)
    app.core.engine.refusal = overloaded("full", 1)
    answer = run(app, "POST", "/predict", b"x" * 10, [MULTIPART, ("content-length", "5000")])
    assert answer.status == 413 and app.core.engine.asked_unread == []


@pytest.mark.parametrize("refusal", ["overloaded", "not_an_image"])
def test_an_overload_refusal_is_held_before_it_is_sent_and_other_errors_are_not(refusal):
    """A client that resends at once gets one try per hold; any other error is answered at once."""
    from service.errors import RequestError, overloaded

    app = front(refusal_hold_s=30)
    error = overloaded("full", 1) if refusal == "overloaded" else RequestError(400, "not_an_image", "bad")
    app.core.engine.refusal = error
    body = multipart(png())
    headers = [MULTIPART, ("content-length", str(len(body)))]

    async def scenario():
        task = asyncio.ensure_future(call(app, "POST", "/predict", body, headers))
        for _ in range(50):
            await asyncio.sleep(0)
        answered = task.done()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return answered

    assert asyncio.run(scenario()) is (refusal != "overloaded")
    assert app.inflight_bytes == 0  # nothing of the request is held while its refusal waits


def test_predict_array_and_its_return_input_in_the_body():
    app = front()
    body = json.dumps({"images": [[[0.0] * 28] * 28], "return_input": True}).encode()
    answer = run(app, "POST", "/predict_array", body, [JSON])
    assert answer.status == 200 and len(answer.json()[0]["input"]) == 28
    assert (
        "input"
        not in run(app, "POST", "/predict_array", json.dumps({"images": [[[0.0] * 28] * 28]}).encode(), [JSON]).json()[
            0
        ]
    )


def test_model_info_from_the_core():
    info = run(front(), "GET", "/model_info").json()
    assert info["tag"] == "mnist-convnet:v1" and info["runtime"] == "onnx" and info["test_accuracy"] == 0.9871
    assert info["settings"]["MNIST_API_TOKEN"] == ""  # a secret is shown as set or not, never its value


# ---- refusals: each a JSON error with the request's id ----------------------------------------------------
@pytest.mark.parametrize(
    "method, path, body, headers, status, fragment",
    [
        ("GET", "/nowhere", b"", [], 404, "no such path: /nowhere"),
        ("GET", "/predict", b"", [], 405, "/predict accepts POST"),
        ("POST", "/predict", b"{}", [JSON], 415, "expects multipart/form-data"),
        ("POST", "/predict", b"", [("content-type", "multipart/form-data")], 400, "without a boundary"),
        ("POST", "/predict_array", b"x", [("content-type", "text/plain")], 415, "expects application/json"),
        ("POST", "/predict_array", b"{}", [JSON, ("content-encoding", "gzip")], 415, "compressed"),
        ("POST", "/predict_array", b"{}", [JSON, ("transfer-encoding", "gzip")], 415, "Transfer-Encoding"),
        ("POST", "/predict_array", b"{}", [JSON, ("content-length", "12x")], 400, "Content-Length"),
        ("POST", "/predict_array", b"{}", [JSON, ("content-length", str(64 * 2**20))], 413, "the limit is"),
        ("POST", "/predict_array", b"{broken", [JSON], 400, "not valid JSON"),
        ("POST", "/predict_array", b'{"images": []}', [JSON], 400, "no images"),
        ("POST", "/predict", multipart(b"not an image"), [MULTIPART], 400, "not an image"),
        ("POST", "/predict", multipart(png(), fields={"return_input": "maybe"}), [MULTIPART], 400, "true or false"),
        ("POST", "/predict", multipart(fields={"other": "1"}), [MULTIPART], 400, "unknown field 'other'"),
        ("PUT", "/docs.json", b"", [], 405, "accepts GET, HEAD"),
        ("GET", "/v2/models/nope", b"", [], 404, "no model 'nope'"),
        ("GET", "/v2/models/mnist/versions/v9", b"", [], 404, "has no version ['v9']"),
        ("POST", "/v2/models/mnist", b"", [], 405, "this path accepts GET"),
        ("GET", "/v2/models/mnist/infer", b"", [], 405, "this path accepts POST"),
        ("POST", "/v2/models/mnist/infer", b"{}", [("content-type", "text/csv")], 415, "inference requests are JSON"),
    ],
)
def test_every_refusal_is_a_json_error_with_the_request_id(method, path, body, headers, status, fragment):
    answer = run(front(), method, path, body, headers)
    assert answer.status == status, answer.body
    error = answer.json()
    assert fragment in error["error"]
    assert error["request_id"] == answer.headers["x-request-id"]
    if status == 405:
        assert answer.headers["allow"]


def test_a_body_over_the_limit_without_a_content_length_is_413():
    app = front(max_request_bytes=1000)
    answer = run(app, "POST", "/predict_array", [b"x" * 600, b"x" * 600], [JSON, ("transfer-encoding", "chunked")])
    assert answer.status == 413 and "over the limit of 1000 bytes" in answer.json()["error"]
    assert answer.headers["connection"] == "close"  # the rest of an unread body is not worth reading


@contextlib.asynccontextmanager
async def stalled_upload(app, sent: bytes, headers=()):
    """An upload that has sent ``sent`` of its body and stalls until the block ends (then its client leaves)."""
    release = asyncio.Event()
    parts = [{"type": "http.request", "body": sent, "more_body": True}]

    async def stalling():
        if parts:
            return parts.pop(0)
        await release.wait()
        return {"type": "http.disconnect"}

    async def ignore(message):
        pass

    scope = {"type": "http", "method": "POST", "path": "/predict_array", "query_string": b"", "headers": [JSON_H]}
    stalled = asyncio.ensure_future(app({**scope, "headers": [JSON_H, *headers]}, stalling, ignore))
    await asyncio.sleep(0.01)
    try:
        yield
    finally:
        release.set()
        await stalled


def test_bodies_held_in_memory_are_capped_per_worker():
    app = front(max_inflight_bytes=1000)

    async def scenario():
        async with stalled_upload(app, b"x" * 900):
            held = app.inflight_bytes
            second = await call(app, "POST", "/predict_array", b"y" * 200, [JSON])
        return held, second

    held, second = asyncio.run(scenario())
    assert held == 900
    assert second.status == 503 and "would pass 1000 bytes" in second.json()["error"]
    assert second.headers["retry-after"] == "1"
    assert app.inflight_bytes == 0  # both released


def test_large_bodies_held_open_leave_room_for_small_ones(monkeypatch):
    from service.http import front as front_module

    monkeypatch.setattr(front_module, "SMALL_BODY", 100)
    app = front(max_inflight_bytes=8000)  # large bodies may hold 7000 of it; the last 1000 are for small ones

    async def scenario():
        async with stalled_upload(app, b"x" * 6900, [(b"content-length", b"10000")]):
            large = await call(app, "POST", "/predict_array", b"y" * 200, [JSON, ("content-length", "200")])
            small = await call(app, "POST", "/predict_array", b'{"images": []}', [JSON])
        return large, small

    large, small = asyncio.run(scenario())
    assert large.status == 503 and "would pass 7000 bytes" in large.json()["error"]
    assert small.status == 400 and "no images" in small.json()["error"]  # through to the engine, not refused


async def _quiet_after(app, parts: list[dict]) -> list[dict]:
    """A POST /predict_array whose client sends ``parts`` (messages, a disconnect among them if it leaves) and
    then nothing more: what the front sent back."""
    sent = []

    async def receive():
        if parts:
            return parts.pop(0)
        await asyncio.sleep(10)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/predict_array", "query_string": b"", "headers": [JSON_H]}
    await app(scope, receive, send)
    return sent


def test_a_body_that_does_not_arrive_in_time_is_408():
    sent = asyncio.run(_quiet_after(front(body_timeout_s=0.05), []))
    assert sent[0]["status"] == 408 and b"did not arrive within 0.05 s" in sent[1]["body"]


def test_a_client_that_leaves_mid_body_gets_nothing_and_costs_nothing():
    app = front()
    parts = [{"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}]
    assert asyncio.run(_quiet_after(app, parts)) == []
    assert app.inflight_bytes == 0 and app.core.engine.calls == []


def test_a_bug_is_a_500_without_details():
    app = front()
    app.routes = {**ROUTES, "/model_info": ROUTES["/model_info"].__class__("model_info", ("GET",), _broken)}
    answer = run(app, "GET", "/model_info")
    assert answer.status == 500 and answer.json()["error"] == "internal server error"


async def _broken(request):
    raise RuntimeError("a bug")


# ---- the token ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "authorization, status",
    [(None, 401), ("Bearer wrong", 401), ("Basic s3cret", 401), ("Bearer s3cret", 200), ("bearer  s3cret ", 200)],
)
def test_the_token_guards_the_api(authorization, status):
    headers = [("authorization", authorization)] if authorization else []
    answer = run(front(api_token="s3cret"), "GET", "/model_info", headers=headers)
    assert answer.status == status
    if status == 401:
        assert answer.headers["www-authenticate"] == "Bearer"


def test_health_stays_open_and_metrics_close_on_request():
    app = front(api_token="s3cret", metrics_public=False)
    assert run(app, "GET", "/livez").status == 200 and run(app, "GET", "/readyz").status == 200
    assert run(app, "GET", "/v2/health/ready").status == 200
    assert run(app, "GET", "/v2/models/mnist").status == 401
    assert run(app, "GET", "/metrics").status == 401
    assert run(app, "GET", "/metrics", headers=[("authorization", "Bearer s3cret")]).body == b"bentoml /metrics"


# ---- readiness: one rule on every path -------------------------------------------------------------------
READINESS = ["/readyz", "/v2/health/ready", "/v2/models/mnist/ready", "/v2/models/mnist-convnet/ready"]


@pytest.mark.parametrize("path", READINESS)
def test_every_readiness_path_follows_the_one_rule(path):
    app = front()
    assert run(app, "GET", path).status == 200
    app.core.engine.ready = False  # no work process running
    assert run(app, "GET", path).status == 503
    app.core.engine.ready = True
    LIFECYCLE.drain()
    draining = run(app, "GET", path)
    assert draining.status == 503 and "draining" in draining.json()["error"]
    assert draining.headers["connection"] == "close"
    assert run(app, "GET", "/livez").status == 200  # alive all the while: a probe must not restart it


def test_a_worker_still_starting_is_alive_not_ready():
    app = front()
    app.core = None
    assert run(app, "GET", "/livez").status == 200
    assert run(app, "GET", "/readyz").status == 503
    starting = run(app, "POST", "/predict", multipart(png()), [MULTIPART])
    assert starting.status == 503 and "starting" in starting.json()["error"]


# ---- request ids and the access log ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "given, kept",
    [("abc-123", True), ("4bf92f3577b34da6a3ce929d0e0e4736", True), ("a b", False), ("x" * 129, False), ("é", False)],
)
def test_request_ids_are_taken_when_plain_and_made_otherwise(given, kept):
    answer = run(front(), "GET", "/livez", headers=[("x-request-id", given)])
    rid = answer.headers["x-request-id"]
    assert (rid == given) is kept
    if not kept:
        assert len(rid) == 32 and int(rid, 16) >= 0


def test_the_request_id_reaches_the_engine_and_bentomls_pages():
    app = front()
    run(app, "POST", "/predict", multipart(png()), [MULTIPART, ("x-request-id", "trace-me")])
    assert app.core.engine.calls[-1]["request_id"] == "trace-me"
    page = run(app, "GET", "/docs.json", headers=[("x-request-id", "doc-1")])
    assert page.body == b"bentoml /docs.json" and page.headers["x-request-id"] == "doc-1"


def test_one_access_log_line_per_request(caplog):
    app = front()
    body = multipart(png())
    with caplog.at_level(logging.INFO, logger="service.access"):
        run(app, "POST", "/predict", body, [MULTIPART, ("x-request-id", "log-me")])
        run(app, "GET", "/nowhere/" + "x" * 500)
    first, second = (json.loads(r.getMessage()) for r in caplog.records if r.name == "service.access")
    assert first["method"] == "POST" and first["path"] == "/predict" and first["status"] == 200
    assert first["request_id"] == "log-me" and first["bytes_in"] == len(body) and first["bytes_out"] > 0
    assert first["duration_ms"] >= 0 and first["time"].endswith("Z")
    assert second["status"] == 404 and len(second["path"]) == 200


def test_the_access_log_can_be_switched_off(caplog):
    with caplog.at_level(logging.INFO, logger="service.access"):
        run(front(access_log=False), "GET", "/livez")
    assert [r for r in caplog.records if r.name == "service.access"] == []


# ---- the pages ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/", "/ui"])
def test_pages_carry_a_content_security_policy(path):
    answer = run(front(), "GET", path)
    assert answer.status == 200 and answer.headers["content-type"].startswith("text/html")
    policy = answer.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "default-src 'none'" in policy
    assert answer.headers["x-content-type-options"] == "nosniff" and answer.headers["x-frame-options"] == "DENY"
    assert b"googletagmanager" not in answer.body and b"https://" not in answer.body.split(b"<body>")[0]
    # every inline script is allowed by its hash, and nothing else inline
    html = answer.body
    start = html.find(b"<script>")
    if start >= 0:
        inline = html[start + 8 : html.index(b"</script>", start)]
        assert f"'sha256-{base64.b64encode(hashlib.sha256(inline).digest()).decode()}'" in policy
    assert "'unsafe-inline'" not in policy.split("script-src")[1].split(";")[0]


def test_the_api_page_loads_bentomls_swagger_files_through_the_front():
    app = front()
    assert b"./static_content/swagger-ui-bundle.js" in run(app, "GET", "/").body
    assert (
        run(app, "GET", "/static_content/swagger-ui-bundle.js").body == b"bentoml /static_content/swagger-ui-bundle.js"
    )


def test_a_body_that_stalls_is_408_before_the_whole_body_deadline(monkeypatch):
    from service.http import front as front_module

    monkeypatch.setattr(front_module, "BODY_STALL_S", 0.05)
    app = front(body_timeout_s=30)
    sent = asyncio.run(_quiet_after(app, [{"type": "http.request", "body": b'{"images": ', "more_body": True}]))
    held = app.inflight_bytes
    assert sent[0]["status"] == 408 and b"stalled: nothing of it arrived for 0.05 s" in sent[1]["body"]
    assert held == 0
