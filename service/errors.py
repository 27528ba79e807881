"""The one error type a request can end in: an HTTP status, a fixed reason (a metric label) and a message
that says what was wrong and what the endpoint expects. Raised anywhere in the pipeline, including inside the
work processes, and turned into ``{"error": message}`` by the HTTP front."""

from __future__ import annotations

import json
from http import HTTPStatus

from bentoml.exceptions import BentoMLException

# The reasons a request is refused: a small fixed set, so that they can label a metric.
REASONS = (
    "bad_request",  # malformed HTTP, multipart or JSON; wrong field
    "not_an_image",  # a file no decoder reads, or a corrupt one
    "bad_shape",  # arrays of the wrong shape, type or range
    "too_large",  # a body, file or image over its limit
    "over_budget",  # decoding work over the request's budget (pixels, JPEG scans)
    "unsupported",  # wrong media type or method
    "unauthorized",  # no or a wrong API token
    "not_found",
    "conflict",  # feedback for an answer that has its feedback already
    "timeout",  # the client was too slow to send its request
    "overloaded",  # the server's queue or memory is full: retry later
    "unavailable",  # starting, draining, or a work process failed
    "internal",  # a bug: logged with its traceback
)


class RequestError(BentoMLException):
    """A request the service refuses. A BentoML exception, so in-process callers of the service's API methods
    get the same status BentoML would report."""

    def __init__(
        self, status: int, reason: str, message: str, retry_after: int | None = None, allow: str | None = None
    ):
        if reason not in REASONS:
            raise ValueError(f"unknown reason {reason!r}")
        super().__init__(message)
        self.error_code = HTTPStatus(status)
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after
        self.allow = allow  # a 405's Allow header

    def __reduce__(self):  # raised in a work process, re-raised in the worker: must pickle with its fields
        return RequestError, (self.status, self.reason, self.message, self.retry_after, self.allow)


def bad_request(message: str) -> RequestError:
    return RequestError(400, "bad_request", message)


def too_large(message: str) -> RequestError:
    return RequestError(413, "too_large", message)


def overloaded(message: str, retry_after: int) -> RequestError:
    return RequestError(503, "overloaded", f"the server is overloaded: {message}; retry later", retry_after)


def parsed_json(data: bytes, too_deep: str, invalid: str):
    """A request's JSON, or a 400: ``too_deep`` when it nests past the parser's recursion limit, ``invalid``
    (followed by the parser's message) when it is not JSON."""
    try:
        return json.loads(data)
    except RecursionError:
        raise bad_request(too_deep) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"{invalid} ({str(exc)[:120]})") from None
