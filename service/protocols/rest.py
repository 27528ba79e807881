"""The REST adapters: ``/predict`` (multipart image files), ``/predict_array`` (JSON arrays), ``/model_info``,
health, and the two pages. Each parses, validates and formats; the work goes to the core.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from pathlib import Path

from service.core import InputKind, not_ready
from service.errors import RequestError, bad_request
from service.http import multipart
from service.http.front import Request, Response

MIN_JSON_BYTES_PER_IMAGE = 28 * 28 * 2  # a digit and a comma per pixel: N images need at least N times this
FLAGS = ("return_input",)  # multipart text fields, as BentoML's client sends the API method's other arguments
UI_DIR = Path(__file__).resolve().parent.parent / "ui"


def _require_media_type(request: Request, expected: str) -> str:
    content_type = request.header(b"content-type")
    kind, _ = multipart.media_type(content_type)
    if kind != expected:
        raise RequestError(
            415, "unsupported", f"{request.scope['path']} expects {expected}, got {content_type or 'no Content-Type'}"
        )
    return content_type


def _flag_value(part: multipart.Part) -> bool:
    value = part.data.strip().lower()
    if value not in (b"true", b"false", b"1", b"0"):
        raise bad_request(f"the field {part.name!r} must be true or false, got {value[:20].decode('latin-1')!r}")
    return value in (b"true", b"1")


async def predict(request: Request) -> Response:
    core = request.core
    content_type = _require_media_type(request, "multipart/form-data")
    multipart.boundary_of(content_type)  # a missing boundary is a 400 before the body is read
    limit = core.config.max_images_per_request
    parts = multipart.parse(await request.work_body(), content_type, "images", limit, FLAGS)
    files = [part.data for part in parts if part.filename is not None]
    return_input = request.flag("return_input") or any(_flag_value(p) for p in parts if p.filename is None)
    answer = await core.classify(InputKind.ENCODED, files, len(files), return_input, request.call)
    return Response.json(answer.predictions())


async def predict_array(request: Request) -> Response:
    core = request.core
    _require_media_type(request, "application/json")
    body = await request.work_body()
    # The body is parsed in a work process; for the queue and batch bounds, count the most images it can hold.
    bound = min(len(body) // MIN_JSON_BYTES_PER_IMAGE, core.config.max_images_per_request)
    answer = await core.classify(InputKind.JSON, body, bound, request.flag("return_input"), request.call)
    return Response.json(answer.predictions())


async def model_info(request: Request) -> Response:
    return Response.json(request.core.model_info())


async def livez(request: Request) -> Response:
    return Response(200, b"\n", b"text/plain; charset=utf-8")


async def readyz(request: Request) -> Response:
    if reason := not_ready(request.front.core):
        raise RequestError(503, "unavailable", f"not ready: {reason}")
    return Response(200, b"\n", b"text/plain; charset=utf-8")


# ---- pages ---------------------------------------------------------------------------------------------------
# Every HTML page carries a Content-Security-Policy: scripts only from this origin (the API page's, which are
# BentoML's Swagger UI files) or inline ones by their hash (the draw-a-digit page's), no framing. /ui keeps the
# API token in localStorage: no third-party script may run on this origin.
PAGE_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"), (b"cache-control", b"no-cache")]


@functools.cache
def _page(name: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    html = (UI_DIR / name).read_bytes()
    scripts = " ".join(["'self'", *_inline_hashes(html, b"script")])
    styles = " ".join(["'self'", *(_inline_hashes(html, b"style") or ["'unsafe-inline'"])])  # Swagger UI's own
    policy = (
        f"default-src 'none'; script-src {scripts}; style-src {styles}; img-src 'self' data: blob:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return html, [(b"content-security-policy", policy.encode()), *PAGE_HEADERS]


def _inline_hashes(html: bytes, tag: bytes) -> list[str]:
    """CSP sources for each inline ``<tag>...</tag>`` block of a page we ship (not client input)."""
    hashes, pos = [], 0
    while (start := html.find(b"<" + tag + b">", pos)) >= 0:
        end = html.index(b"</" + tag + b">", start)
        body = html[start + len(tag) + 2 : end]
        hashes.append(f"'sha256-{base64.b64encode(hashlib.sha256(body).digest()).decode()}'")
        pos = end
    return hashes


async def ui(request: Request) -> Response:
    """The draw-a-digit page: one file of HTML, CSS and JavaScript, no outside resources."""
    html, headers = _page("index.html")
    return Response(200, html, b"text/html; charset=utf-8", list(headers))


async def api_page(request: Request) -> Response:
    """The API's own page: BentoML's Swagger UI files over /docs.json, with a link to the draw-a-digit page."""
    html, headers = _page("api.html")
    return Response(200, html, b"text/html; charset=utf-8", list(headers))
