"""OpenTelemetry tracing of the service's own requests, configured by OpenTelemetry's standard environment
variables and off unless ``OTEL_TRACES_EXPORTER`` names an exporter.

Each request gets a server span that continues the client's W3C ``traceparent``, with child spans for its wait
in the queue, its preparation in a work process (decoding and preprocessing) and the model call of its batch.
The work process's times travel back with its answers (service/engine/messages.py ``Done``), so its spans are
made here, after the fact, with their own start and end times. With tracing off nothing here runs.

Settings read (OpenTelemetry's own): ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``, ``none``; a comma list),
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_EXPORTER_OTLP_HEADERS``,
``OTEL_EXPORTER_OTLP_PROTOCOL`` (``http/protobuf``), ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER`` and its argument, ``OTEL_BSP_*``, ``OTEL_SDK_DISABLED``.
"""

from __future__ import annotations

import logging
import os
import threading

from service.config import ConfigError

DEFAULT_SERVICE_NAME = "mnist-classifier"
SHUTDOWN_S = 2.0  # what the exporter may take at the worker's exit to send what is buffered
HTTP_PROTOCOLS = ("http/protobuf", "")


def exporters_named(environ) -> list[str]:
    """The exporters OTEL_TRACES_EXPORTER asks for ([] when tracing is off: unset, ``none`` or disabled)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    names = [n for n in names if n != "none"]
    for name in names:
        if name not in ("otlp", "console"):
            raise ConfigError(f"OTEL_TRACES_EXPORTER: {name!r} is not an exporter this service has (otlp, console)")
    if "otlp" in names:
        protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", ""))
        if protocol.strip().lower() not in HTTP_PROTOCOLS:
            raise ConfigError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL is {protocol!r}; this service exports OTLP over HTTP (http/protobuf)"
            )
    return names


class Tracing:
    def __init__(self, provider):
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer = provider.get_tracer("mnist-serving")
        # a client's malformed tracestate is ignored; OpenTelemetry would log it, client text and all, each time
        logging.getLogger("opentelemetry.trace.span").setLevel(logging.ERROR)
        self.propagator = TraceContextTextMapPropagator()
        self._trace = trace

    @classmethod
    def from_env(cls, environ=None) -> Tracing | None:
        """Tracing as the environment asks for it; None when it is off. A setting this service cannot honour
        raises ConfigError, so that start-up stops with one line."""
        environ = os.environ if environ is None else environ
        names = exporters_named(environ)
        if not names:
            return None
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        resource = Resource.create()
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
        provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER (parent-based by default)
        for name in names:
            if name == "otlp":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                exporter = OTLPSpanExporter()  # endpoint, headers, timeout and compression from OTEL_EXPORTER_OTLP_*
            else:
                exporter = ConsoleSpanExporter()
            provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider)

    def start(self, method: str, route: str, headers: dict[bytes, bytes], request_id: str):
        """The request's server span, a child of the client's ``traceparent`` when it sent one; named by the
        route (``POST /predict``, ``POST /v2/*``), not by the client's own path."""
        carrier = {}
        for name in (b"traceparent", b"tracestate"):
            if name in headers:
                carrier[name.decode()] = headers[name].decode("latin-1")
        context = self.propagator.extract(carrier) if carrier else None
        return self.tracer.start_span(
            f"{method} {route}",
            context=context,
            kind=self._trace.SpanKind.SERVER,
            attributes={"http.request.method": method, "http.route": route, "mnist.request_id": request_id},
        )

    def end(self, span, status: int, reason: str | None = None) -> None:
        span.set_attribute("http.response.status_code", status)
        if reason is not None:
            span.set_attribute("mnist.refused", reason)
        if status >= 500:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR))
        span.end()

    def record_work(self, span, timeline, done) -> None:
        """The queue wait, the preparation and the model call of one answered request, as children of its span."""
        context = self._trace.set_span_in_context(span)
        for name, start, end, attributes in (
            ("queue", timeline.queued_ns, timeline.dispatched_ns, {}),
            ("prepare", done.prepare_start_ns, done.prepare_end_ns, {"mnist.images": len(done.log_probs)}),
            ("model", done.model_start_ns, done.model_end_ns, {"mnist.batch_images": done.batch_images}),
        ):
            if start and end >= start:
                child = self.tracer.start_span(name, context=context, start_time=start, attributes=attributes)
                child.end(end_time=end)

    def shutdown(self) -> None:
        """Send what is still buffered, at the worker's exit: for at most SHUTDOWN_S, so that a collector that is
        down or hangs cannot hold the worker past its grace period."""
        sender = threading.Thread(target=self.provider.shutdown, name="otel-shutdown", daemon=True)
        sender.start()
        sender.join(SHUTDOWN_S)
