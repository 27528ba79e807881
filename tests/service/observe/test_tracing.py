"""Tracing: the settings it reads, the spans one request makes (in process, the SDK's in-memory exporter), and
the same spans at a real OTLP/HTTP receiver from a real `bentoml serve` (decoded with opentelemetry-proto)."""

from __future__ import annotations

import http.server
import threading

import httpx
import pytest

from service.config import ConfigError
from service.core import LIFECYCLE
from service.http.front import Frontend
from service.observe.tracing import Tracing, exporters_named
from service.protocols import ROUTES
from tests.service.fakes import make_core, run

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    "environ, names",
    [
        ({}, []),
        ({"OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, ["otlp", "console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, ["otlp"]),
    ],
)
def test_tracing_is_off_unless_an_exporter_is_named(environ, names):
    assert exporters_named(environ) == names
    assert (Tracing.from_env(environ) is None) is (not names)


@pytest.mark.parametrize(
    "environ, fragment",
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "'zipkin' is not an exporter"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTLP over HTTP"),
    ],
)
def test_settings_it_cannot_honour_stop_start_up(environ, fragment):
    with pytest.raises(ConfigError, match=fragment):
        exporters_named(environ)


@pytest.fixture
def traced():
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    core = make_core(tracing=Tracing(provider))
    app = Frontend(None, ROUTES, core.config)
    app.core, app.tracing = core, core.tracing
    yield app, exporter
    LIFECYCLE.draining = False


def test_a_request_continues_the_clients_trace_with_its_work_as_children(traced):
    app, exporter = traced
    body = b'{"images": [' + b"[" + b",".join([b"[" + b",".join([b"0"] * 28) + b"]"] * 28) + b"]]}"
    headers = [("content-type", "application/json"), ("traceparent", TRACEPARENT), ("x-request-id", "t-1")]
    assert run(app, "POST", "/predict_array", body, headers).status == 200
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"POST /predict_array", "queue", "prepare", "model"}
    server = spans["POST /predict_array"]
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert format(server.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert server.attributes["mnist.request_id"] == "t-1" and server.attributes["http.response.status_code"] == 200
    for name in ("queue", "prepare", "model"):
        assert spans[name].parent.span_id == server.context.span_id
        assert spans[name].start_time <= spans[name].end_time
    assert spans["model"].attributes["mnist.batch_images"] == 1


def test_refusals_are_traced_with_their_reason(traced):
    app, exporter = traced
    run(app, "POST", "/predict_array", b"{broken", [("content-type", "application/json")])
    run(app, "GET", "/nowhere/at/all")
    refused, unknown = exporter.get_finished_spans()
    assert (
        refused.attributes["http.response.status_code"] == 400 and refused.attributes["mnist.refused"] == "bad_request"
    )
    assert unknown.name == "GET unknown"  # named by the route, never by the client's own path


# ---- a real server and a real OTLP/HTTP receiver ------------------------------------------------------------
class Receiver(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver: POST /v1/traces with an ExportTraceServiceRequest in protobuf."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _ReceiverHandler)
        self.spans = []
        self.lock = threading.Lock()


class _ReceiverHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        body = self.rfile.read(int(self.headers["content-length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        with self.server.lock:
            for resource_spans in request.resource_spans:
                service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
                for scope_spans in resource_spans.scope_spans:
                    self.server.spans += [(service, s) for s in scope_spans.spans]
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200 if self.path == "/v1/traces" else 404)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_a_served_request_reaches_a_real_otlp_receiver(book_export, tmp_path):
    import time

    from tests.service.conftest import serve

    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        with serve(
            tmp_path,
            MNIST_WORKERS=1,
            OTEL_TRACES_EXPORTER="otlp",
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.server_address[1]}",
            OTEL_SERVICE_NAME="mnist-under-test",
            OTEL_BSP_SCHEDULE_DELAY="100",
        ) as served:
            from tests.conftest import BOOK_IMAGE

            response = httpx.post(
                served.url + "/predict",
                files=[("images", ("book.png", BOOK_IMAGE.read_bytes(), "image/png"))],
                headers={"traceparent": TRACEPARENT, "x-request-id": "otlp-test-1"},
                timeout=60,
            )
            assert response.status_code == 200 and response.json()[0]["digit"] == 2
            assert response.headers["x-request-id"] == "otlp-test-1"
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with receiver.lock:
                    ours = [(svc, s) for svc, s in receiver.spans if s.trace_id.hex() == TRACE_ID]
                if len(ours) >= 4:
                    break
                time.sleep(0.2)
            log = served.log()
    finally:
        receiver.shutdown()
        receiver.server_close()
    names = {s.name: s for _, s in ours}
    assert {"POST /predict", "queue", "prepare", "model"} <= set(names), sorted(names)
    assert {svc for svc, _ in ours} == {"mnist-under-test"}
    server = names["POST /predict"]
    assert server.parent_span_id.hex() == "00f067aa0ba902b7"
    for child in ("queue", "prepare", "model"):
        assert names[child].parent_span_id == server.span_id
    access = [line for line in log.splitlines() if '"request_id": "otlp-test-1"' in line]
    assert len(access) == 1 and '"path": "/predict"' in access[0] and '"status": 200' in access[0]
