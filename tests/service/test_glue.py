"""The framework glue's contract: what service/bentoml_glue.py and service/http/uvicorn_glue.py rely on in
BentoML's and uvicorn's internals is still there. Fast: an upgrade that removes any of it fails here within a
second, not in a live-server test. Then the timeout middleware the BentoML glue installs, on its own."""

from __future__ import annotations

import asyncio
import gc
import inspect
import re
from importlib import metadata
from pathlib import Path

import pytest

import service.bentoml_glue as bentoml_glue
from service.bentoml_glue import ReleasingTimeoutMiddleware
from service.http import uvicorn_glue

UI = Path(__file__).resolve().parents[2] / "service" / "ui"


def _pin(requirement_name: str) -> str:
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    return re.search(rf'"{requirement_name}([=<>][^"]*)"', pyproject).group(1)


# ---- versions --------------------------------------------------------------------------------------------
def test_uvicorn_is_the_pinned_release_the_glue_was_written_against():
    assert _pin("uvicorn") == f"=={uvicorn_glue.WRITTEN_AGAINST}"
    assert metadata.version("uvicorn") == uvicorn_glue.WRITTEN_AGAINST


def test_bentoml_is_within_the_pinned_minor_release():
    assert _pin("bentoml") == ">=1.4,<1.5"
    assert metadata.version("bentoml").startswith("1.4.") and bentoml_glue.WRITTEN_AGAINST.startswith("1.4.")


# ---- BentoML -----------------------------------------------------------------------------------------------
def test_bentomls_container_still_provides_the_home_and_the_metrics_client():
    assert bentoml_glue.bentoml_home()
    assert hasattr(bentoml_glue.metrics_client(), "Counter")
    assert bentoml_glue.in_worker() is False  # a test process is not a worker of bentoml serve


def test_bentoml_still_looks_its_timeout_middleware_up_when_it_builds_an_app():
    from bentoml._internal.server import base_app
    from bentoml._internal.server.http import traffic

    assert "from .http.traffic import TimeoutMiddleware" in inspect.getsource(base_app)
    assert list(inspect.signature(traffic.TimeoutMiddleware.__init__).parameters)[1:3] == ["app", "timeout"]
    assert callable(traffic.TimeoutMiddleware._set_timer_out)


def test_the_public_apis_the_service_uses_are_there():
    import bentoml

    assert "service_class" in inspect.signature(bentoml.service).parameters
    assert "is_main" in inspect.signature(bentoml.Service.to_asgi).parameters
    assert callable(bentoml.on_deployment) and callable(bentoml.get_current_service)


def test_bentoml_still_serves_the_files_the_api_page_names():
    from bentoml._internal import server

    static = Path(server.__file__).parent / "static_content"
    named = re.findall(r'"\./static_content/([^"]+)"', (UI / "api.html").read_text())
    assert named and all((static / name).is_file() for name in named)


# ---- uvicorn -------------------------------------------------------------------------------------------------
OVERRIDDEN = [
    "__init__",
    "connection_made",
    "connection_lost",
    "data_received",
    "on_message_begin",
    "on_url",
    "on_header",
    "on_headers_complete",
    "on_body",
    "on_response_complete",
    "send_400_response",
    "_should_upgrade_to_ws",
    "_unsupported_upgrade_warning",
    "_start_asgi_task",
]


@pytest.mark.parametrize("name", OVERRIDDEN)
def test_every_method_the_guarded_protocol_overrides_exists_with_its_signature(name):
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    theirs = inspect.signature(getattr(HttpToolsProtocol, name))
    ours = inspect.signature(getattr(uvicorn_glue.GuardedProtocol, name))
    if name != "__init__":  # ours passes *args, **kwargs through
        assert list(ours.parameters) == list(theirs.parameters)


def test_uvicorn_still_routes_parser_errors_and_bodies_the_way_the_guards_expect():
    from uvicorn.protocols.http import httptools_impl

    source = inspect.getsource(httptools_impl.HttpToolsProtocol)
    assert "except httptools.HttpParserError" in source and "self.send_400_response(" in source
    assert "self.cycle.body += body" in source  # on_body appends what the guard counted
    assert set(httptools_impl.STATUS_LINE) >= {400, 408, 431, 503}
    assert list(inspect.signature(httptools_impl.HttpToolsProtocol.__init__).parameters)[1:5] == [
        "config",
        "server_state",
        "app_state",
        "_loop",
    ]


def test_uvicorn_still_has_the_server_internals_the_drain_uses():
    import uvicorn.config
    from uvicorn.server import Server

    assert {"auto", "httptools"} <= set(uvicorn.config.HTTP_PROTOCOLS)
    original = uvicorn_glue._uvicorn_handle_exit  # install() replaces Server.handle_exit; this is uvicorn's own
    assert (
        list(inspect.signature(original).parameters) == ["self", "sig", "frame"]
        and original.__module__ == "uvicorn.server"
    )
    source = inspect.getsource(Server)
    for used in ("self.servers", "self.server_state", "self.lifespan", "config.http_protocol_class"):
        assert used in source
    assert "self.config.timeout_graceful_shutdown" in source  # what bounds the end of a drain


def test_uvicorn_still_starts_and_stops_listeners_the_way_balanced_accepts_expect():
    from uvicorn.server import Server

    original = uvicorn_glue._uvicorn_startup  # install() replaces Server.startup; this is uvicorn's own
    assert list(inspect.signature(original).parameters) == ["self", "sockets"]
    startup, shutdown = inspect.getsource(original), inspect.getsource(Server.shutdown)
    # started with no sockets of its own, uvicorn keeps a list of servers that the glue appends its listeners to
    assert "self.servers: list[asyncio.base_events.Server] = []" in startup and "self.started = True" in startup
    assert "server.close()" in shutdown  # and stops them with the event loop's own server's two methods
    assert "await server.wait_closed()" in inspect.getsource(Server._wait_tasks_to_complete)


# ---- the timeout middleware for BentoML's own pages -----------------------------------------------------------
def _live_request_timers() -> list:
    gc.collect()
    # type(), not isinstance(): isinstance reads __class__, which some of torch's deprecated aliases warn on
    return [
        h
        for h in gc.get_objects()
        if type(h) is asyncio.TimerHandle
        and not h.cancelled()
        and getattr(h._callback, "__name__", "") == "_set_timer_out"
    ]


@pytest.mark.slow
def test_bentomls_pages_leave_no_timers_behind(http):
    for _ in range(50):
        assert http.get("/docs.json").status_code == 200
    assert _live_request_timers() == []


async def _asgi_call(app, path="/"):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app({"type": "http", "method": "GET", "path": path, "headers": []}, receive, send)
    return sent


async def _answer(send, status=200):
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_timeout_answers_504_and_cancels_the_handler():
    cancelled = asyncio.Event()

    async def slow(scope, receive, send):
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        await _answer(send)

    async def run():
        sent = await _asgi_call(ReleasingTimeoutMiddleware(slow, timeout=0.05))
        await asyncio.sleep(0)
        return sent

    sent = asyncio.run(run())
    assert sent[0]["status"] == 504 and b"0.05 seconds" in sent[1]["body"]
    assert cancelled.is_set()


def test_fast_requests_pass_through_and_cancel_their_timer():
    async def fast(scope, receive, send):
        await _answer(send, 201)

    async def run():
        sent = await _asgi_call(ReleasingTimeoutMiddleware(fast, timeout=30))
        return sent, _live_request_timers()

    sent, timers = asyncio.run(run())
    assert sent[0]["status"] == 201
    assert timers == []


def test_handler_errors_propagate_without_waiting_for_the_timeout():
    async def broken(scope, receive, send):
        raise RuntimeError("boom")

    async def run():
        return await asyncio.wait_for(_asgi_call(ReleasingTimeoutMiddleware(broken, timeout=30)), 5)

    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(run())
