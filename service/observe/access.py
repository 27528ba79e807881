"""Request ids and the access log: one structured line per request the service answers.

``X-Request-ID`` is taken from the client when it is a plain token (1-128 characters of letters, digits and
``-._:+=/@``), else one is made; the front echoes it in the response and in error bodies, and the work
process names it in its log lines. Each access-log line is one JSON object on the ``service.access`` logger.
"""

from __future__ import annotations

import json
import logging
import os
import time

log = logging.getLogger("service.access")
MAX_REQUEST_ID = 128
_ID_BYTES = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._:+=/@"
MAX_LOGGED_PATH = 200


def request_id(given: bytes | None) -> str:
    """The client's id when it is a plain token, else a new one (32 hex digits, like a W3C trace id)."""
    if given is not None and 0 < len(given) <= MAX_REQUEST_ID and not given.translate(None, _ID_BYTES):
        return given.decode("ascii")
    return os.urandom(16).hex()


def line(method: str, path: str, status: int, seconds: float, bytes_in: int, bytes_out: int, rid: str) -> str:
    """One request as a JSON object (the path cut to 200 characters; JSON escapes what a client put in it)."""
    now = time.time()
    return json.dumps(
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
            "method": method,
            "path": path[:MAX_LOGGED_PATH],
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "request_id": rid,
        }
    )


def record(method: str, path: str, status: int, seconds: float, bytes_in: int, bytes_out: int, rid: str) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info(line(method, path, status, seconds, bytes_in, bytes_out, rid))
