"""The HTTP adapters: each way in parses, validates and formats; the work goes to the one batcher.

``POST /predict`` (multipart image files) and ``POST /predict_array`` (JSON arrays) hand the batcher one
request of N images each; health and model information are answered from the worker's own state, on the event
loop, so that they answer while the work processes are busy.
"""

from __future__ import annotations

import functools
from pathlib import Path

from service import multipart, v2
from service.connections import DRAIN
from service.errors import RequestError
from service.frontend import Request, Response, Route, started
from service.runtime import predictions

MIN_JSON_BYTES_PER_IMAGE = 28 * 28 * 2  # a digit and a comma per pixel: N images need at least N times this


def _require_media_type(request: Request, expected: str) -> str:
    content_type = request.header(b"content-type")
    kind, _ = multipart.media_type(content_type)
    if kind != expected:
        raise RequestError(
            415, "unsupported", f"{request.scope['path']} expects {expected}, got {content_type or 'no Content-Type'}"
        )
    return content_type


async def predict(service, request: Request) -> Response:
    service = started(service)
    content_type = _require_media_type(request, "multipart/form-data")
    multipart.boundary_of(content_type)  # a missing boundary is a 400 before the body is read
    limit = service.settings.max_images_per_request
    parts = multipart.parse(await request.body(), content_type, "images", max_parts=limit)
    files = [part.data for part in parts]
    done = await service.batcher.submit("encoded", files, max(1, len(files)), request.flag("return_input"))
    return Response.json(predictions(done.log_probs, done.inputs))


async def predict_array(service, request: Request) -> Response:
    service = started(service)
    _require_media_type(request, "application/json")
    body = await request.body()
    # The body is parsed in a work process; for the queue and batch bounds, count the most images it can hold.
    bound = min(len(body) // MIN_JSON_BYTES_PER_IMAGE, service.settings.max_images_per_request)
    done = await service.batcher.submit("json", body, max(1, bound), request.flag("return_input"))
    return Response.json(predictions(done.log_probs, done.inputs))


async def model_info(service, request: Request) -> Response:
    return Response.json(started(service).info())


UI_PAGE = Path(__file__).parent / "ui" / "index.html"


async def ui(service, request: Request) -> Response:
    """The draw-a-digit page: one file of HTML, CSS and JavaScript, no outside resources."""
    return Response(200, _page(UI_PAGE), b"text/html; charset=utf-8", [(b"cache-control", b"no-cache")])


async def index(service, request: Request) -> Response:
    """BentoML's OpenAPI page, with a link to the draw-a-digit page."""
    return Response(200, _page(_bentoml_index(), link=True), b"text/html; charset=utf-8")


@functools.cache
def _page(path: Path, link: bool = False) -> bytes:
    html = path.read_bytes()
    if link:
        banner = (
            b'<a href="/ui" style="display:block;padding:.6rem 1rem;background:#1f6feb;color:#fff;'
            b'font:16px system-ui,sans-serif;text-decoration:none">Draw a digit and see what the model answers: /ui</a>'
        )
        html = html.replace(b"<body>", b"<body>" + banner, 1)
    return html


def _bentoml_index() -> Path:
    from _bentoml_impl.server import app
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(app.__file__).parent / ("main-ui.html" if BentoMLContainer.new_index else "main-openapi.html")


async def livez(service, request: Request) -> Response:
    return Response(200, b"\n", b"text/plain; charset=utf-8")


async def readyz(service, request: Request) -> Response:
    if DRAIN.draining:
        raise RequestError(503, "unavailable", "draining: this worker is shutting down")
    if service is None or not service.batcher.ready:
        raise RequestError(503, "unavailable", "not ready: no work process is running yet")
    return Response(200, b"\n", b"text/plain; charset=utf-8")


ROUTES = {
    "/predict": Route("predict", ("POST",), predict),
    "/predict_array": Route("predict_array", ("POST",), predict_array),
    "/model_info": Route("model_info", ("GET", "POST"), model_info),
    "/livez": Route("health", ("GET", "HEAD"), livez, protected=False),
    "/healthz": Route("health", ("GET", "HEAD"), livez, protected=False),
    "/readyz": Route("health", ("GET", "HEAD"), readyz, protected=False),
    "/ui": Route("ui", ("GET", "HEAD"), ui, protected=False),
    "/": Route("bentoml", ("GET", "HEAD"), index, protected=False),
    "/v2": v2.ROUTE,
    "/v2/*": v2.ROUTE,  # every path under /v2: the adapter parses them
}
