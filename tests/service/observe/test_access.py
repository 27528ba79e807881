"""Request ids and the access log's lines: valid JSON whatever a client puts in its path, and batched writes."""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from service.observe import access


@pytest.mark.parametrize(
    "path", ["/predict", '/a"b\\c', "/\x00\x1b[31mred\n{fake}", "/é/𝟘", "/" + "x" * 5000, "/%22%0a"], ids=repr
)
def test_a_line_is_one_json_object_whatever_the_path(path):
    line = access.line("POST", path, 413, 0.0123456, 10, 20, "rid-1")
    assert "\n" not in line
    fields = json.loads(line)
    assert fields["path"] == path[: access.MAX_LOGGED_PATH] and fields["status"] == 413
    assert fields["duration_ms"] == 12.346 and fields["request_id"] == "rid-1"
    assert fields["time"].endswith("Z") and len(fields["time"]) == len("2026-12-02T08:27:51.464Z")


def test_lines_are_written_in_batches_at_most_flush_s_late(monkeypatch):
    monkeypatch.setattr(access, "FLUSH_S", 0.01)
    stream = io.StringIO()
    handler = access.BatchedLines(stream)

    async def scenario():
        for i in range(3):
            handler.add(f'{{"n": {i}}}')
        written_at_once = stream.getvalue()
        await asyncio.sleep(0.05)
        return written_at_once

    assert asyncio.run(scenario()) == ""  # nothing per line
    assert [json.loads(line)["n"] for line in stream.getvalue().splitlines()] == [0, 1, 2]


def test_a_full_batch_is_written_at_once():
    stream = io.StringIO()
    handler = access.BatchedLines(stream)

    async def scenario():
        for i in range(access.FLUSH_LINES):
            handler.add(str(i))
        return stream.getvalue().count("\n")

    assert asyncio.run(scenario()) == access.FLUSH_LINES


def test_without_an_event_loop_a_line_is_written_at_once():
    stream = io.StringIO()
    access.BatchedLines(stream).add("alone")
    assert stream.getvalue() == "alone\n"


def test_install_takes_the_lines_off_the_root_loggers_handlers():
    import logging

    stream = io.StringIO()
    try:
        handler = access.install(stream)
        access.record("GET", "/livez", 200, 0.001, 0, 1, "r")
        handler.flush()
        assert json.loads(stream.getvalue())["path"] == "/livez" and access.log.propagate is False
    finally:
        access._BATCHED = None
        access.log.handlers[:] = []
        access.log.propagate = True
        access.log.setLevel(logging.NOTSET)
