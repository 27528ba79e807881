"""Request ids and the access log: one structured line per request the service answers.

``X-Request-ID`` is taken from the client when it is a plain token (1-128 characters of letters, digits and
``-._:+=/@``), else one is made; the front echoes it in the response and in error bodies, and the work
process names it in its log lines. Each access-log line is one JSON object on the ``service.access`` logger.
In a worker of ``bentoml serve`` (``install``) the lines are written to standard output in batches, at most
``FLUSH_S`` late: a write per line, each relayed by ``bentoml serve``'s own process, cost a fifth of the
throughput at 64 clients (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time

log = logging.getLogger("service.access")
MAX_REQUEST_ID = 128
_ID_BYTES = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._:+=/@"
MAX_LOGGED_PATH = 200
FLUSH_S = 0.2
FLUSH_LINES = 256


def request_id(given: bytes | None) -> str:
    """The client's id when it is a plain token, else a new one (32 hex digits, like a W3C trace id)."""
    if given is not None and 0 < len(given) <= MAX_REQUEST_ID and not given.translate(None, _ID_BYTES):
        return given.decode("ascii")
    return os.urandom(16).hex()


def request_id_of(scope: dict) -> str:
    """``request_id`` for an ASGI scope's headers (the first X-Request-ID, as most servers take it)."""
    return request_id(next((v for k, v in scope["headers"] if k == b"x-request-id"), None))


def line(method: str, path: str, status: int, seconds: float, bytes_in: int, bytes_out: int, rid: str) -> str:
    """One request as a JSON object (the path cut to 200 characters; JSON escapes what a client put in it). The
    request id needs no escaping: it is a plain token (``request_id``)."""
    now = time.time()
    second = int(now)
    if second != _clock[0]:
        _clock[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return (
        f'{{"time": "{_clock[1]}.{int(now % 1 * 1000):03d}Z", "method": {json.dumps(method)}, '
        f'"path": {json.dumps(path[:MAX_LOGGED_PATH])}, "status": {status}, "duration_ms": {seconds * 1000:.3f}, '
        f'"bytes_in": {bytes_in}, "bytes_out": {bytes_out}, "request_id": "{rid}"}}'
    )


_clock: list = [-1, ""]  # the last second formatted, and its text


def record(method: str, path: str, status: int, seconds: float, bytes_in: int, bytes_out: int, rid: str) -> None:
    if _BATCHED is not None:  # a server worker: straight into the batch, without a log record per request
        _BATCHED.add(line(method, path, status, seconds, bytes_in, bytes_out, rid))
    elif log.isEnabledFor(logging.INFO):
        log.info(line(method, path, status, seconds, bytes_in, bytes_out, rid))


class BatchedLines(logging.Handler):
    """Lines gathered and written together: one write for many requests, at most FLUSH_S late."""

    def __init__(self, stream):
        super().__init__()
        self.stream, self.lines, self.timer = stream, [], None
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.add(self.format(record))

    def add(self, line: str) -> None:
        self.lines.append(line)
        if len(self.lines) >= FLUSH_LINES:
            self.flush()
        elif self.timer is None:
            try:
                self.timer = asyncio.get_running_loop().call_later(FLUSH_S, self.flush)
            except RuntimeError:  # no event loop here: write at once
                self.flush()

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.lines:
            lines, self.lines = self.lines, []
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # standard output closed: nothing to do about it
                pass


def install(stream=None) -> BatchedLines:
    """The access log of a server worker: to ``stream`` (standard output), batched, not through the root
    logger's handlers (BentoML's add a trace lookup and a timestamp per line)."""
    global _BATCHED
    handler = _BATCHED = BatchedLines(stream or sys.stdout)
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    return handler


_BATCHED: BatchedLines | None = None
