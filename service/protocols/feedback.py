"""The feedback adapters: ``POST /feedback`` labels an answer by its request id; ``GET /feedback/stats`` reports
the online accuracy and the confusion matrix per model tag. Both parse and format; the store is the
recorder's (service/feedback/recorder.py)."""

from __future__ import annotations

import time
import urllib.parse

from service.errors import RequestError, bad_request, parsed_json
from service.feedback.recorder import StoreUnavailable
from service.feedback.store import LABELS, NOT_A_DIGIT, DuplicateFeedback, UnknownAnswer
from service.http.front import Request, Response
from service.observe.access import MAX_REQUEST_ID, request_id

MAX_FEEDBACK_BYTES = 4096  # {"request_id": 128 characters, "digit": ..., "index": ...} fits many times over
FIELDS = {"request_id", "digit", "index"}
MAX_STATS_WINDOW_S = 366 * 86400
DEFAULT_STATS_WINDOW_S = 86400


def _recorder(request: Request):
    recorder = request.core.recorder
    if recorder is None:
        raise RequestError(404, "not_found", "feedback is off on this server (MNIST_FEEDBACK=0)")
    return recorder


def parse_feedback(body: bytes, max_index: int) -> tuple[str, int, str]:
    """``{"request_id": ..., "digit": 0-9 or "not_a_digit", "index": 0..}``: the id, the image's index in its
    request (0 when left out) and the label, or a 400 that says what is wrong."""
    doc = parsed_json(body, "the feedback JSON nests too deep", "the body is not JSON")
    if not isinstance(doc, dict):
        raise bad_request('feedback is a JSON object: {"request_id": "...", "digit": 0-9 or "not_a_digit"}')
    if unknown := sorted(set(doc) - FIELDS):
        raise bad_request(f"unknown field {unknown[0][:40]!r}; feedback has request_id, digit and index")
    rid = doc.get("request_id")
    if not isinstance(rid, str) or not rid:
        raise bad_request("request_id is missing: it is the X-Request-ID header of the answer")
    if request_id(rid.encode("utf-8", "replace")) != rid:
        raise bad_request(f"request_id is not a request id: 1-{MAX_REQUEST_ID} letters, digits or -._:+=/@")
    if "digit" not in doc:
        raise bad_request('digit is missing: 0-9, or "not_a_digit"')
    digit = doc["digit"]
    if isinstance(digit, bool) or not (isinstance(digit, int) or digit == NOT_A_DIGIT):
        raise bad_request(f'digit must be a whole number 0-9 or "not_a_digit", got {str(digit)[:40]!r}')
    if digit != NOT_A_DIGIT and not 0 <= digit <= 9:
        raise bad_request(f"digit must be 0-9, got {digit}")
    index = doc.get("index", 0)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < max_index:
        raise bad_request(f"index must be a whole number 0-{max_index - 1}: the image's place in its request")
    return rid, index, str(digit)


async def feedback(request: Request) -> Response:
    core = request.core
    recorder = _recorder(request)
    if request.header(b"content-type").split(";")[0].strip().lower() != "application/json":
        raise RequestError(415, "unsupported", "/feedback expects application/json")
    declared = request.header(b"content-length")
    if declared.isdigit() and int(declared) > MAX_FEEDBACK_BYTES:
        raise RequestError(413, "too_large", f"a feedback body is at most {MAX_FEEDBACK_BYTES} bytes")
    body = await request.body()
    if len(body) > MAX_FEEDBACK_BYTES:
        raise RequestError(413, "too_large", f"a feedback body is at most {MAX_FEEDBACK_BYTES} bytes")
    rid, index, label = parse_feedback(body, core.config.max_images_per_request)
    try:
        stored = await recorder.feedback(rid, index, label)
    except UnknownAnswer:
        window = core.config.feedback_window_s
        raise RequestError(
            404, "not_found", f"no answer with request id {rid} (index {index}) in the last {window:g} s"
        ) from None
    except DuplicateFeedback:
        raise RequestError(409, "conflict", f"the answer {rid} (index {index}) has its feedback already") from None
    except StoreUnavailable as exc:
        raise RequestError(503, "unavailable", f"{exc}; retry later", core.config.retry_after_s) from None
    answer = stored.answer
    if core.metrics is not None:
        core.metrics.observe_feedback(answer.model_tag, label, answer.verdict, stored.correct)
    return Response.json(
        {
            "id": stored.id,
            "request_id": rid,
            "index": index,
            "model": answer.model_tag,
            "answered": answer.verdict,
            "label": label,
            "correct": stored.correct,
        },
        201,
    )


def _window(request: Request) -> float:
    query = urllib.parse.parse_qs(request.scope.get("query_string", b"").decode("latin-1"))
    raw = query.get("window_s", [str(DEFAULT_STATS_WINDOW_S)])[-1]
    try:
        window = float(raw)
    except ValueError:
        raise bad_request(f"window_s must be a number of seconds, got {raw[:40]!r}") from None
    if not 0 < window <= MAX_STATS_WINDOW_S:
        raise bad_request(f"window_s must be more than 0 and at most {MAX_STATS_WINDOW_S}")
    return window


async def stats(request: Request) -> Response:
    """Accuracy and the confusion matrix (rows: labels, columns: answers, in LABELS order) per model tag, over
    the labels of the last ``window_s`` seconds (default a day); ``?model=<tag>`` for one."""
    core = request.core
    recorder = _recorder(request)
    window = _window(request)
    query = urllib.parse.parse_qs(request.scope.get("query_string", b"").decode("latin-1"))
    model = query.get("model", [None])[-1]
    try:
        found = await recorder.stats(time.time() - window, model)
    except StoreUnavailable as exc:
        raise RequestError(503, "unavailable", f"{exc}; retry later", core.config.retry_after_s) from None
    models = {
        tag: {
            "labels": entry["labels"],
            "correct": entry["correct"],
            "accuracy": entry["correct"] / entry["labels"],
            "confusion": [
                [entry["confusion"].get(true, {}).get(answered, 0) for answered in LABELS] for true in LABELS
            ],
        }
        for tag, entry in sorted(found.items())
    }
    return Response.json({"window_s": window, "labels": list(LABELS), "served": core.tag, "models": models})
