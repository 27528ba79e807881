"""Load beyond the steady benchmark: recovery after a burst, and overload by many connections.

``burst_recovery``: a lone client's latency before a burst, right after it and 5 s after it (BentoML's cork
dispatcher once left it 10-40x slower for minutes). ``overload``: 1,000 connections at once with ``hey``
(Debian's package), which reports every status code and every connection error it saw.
"""

from __future__ import annotations

import http.client as httpclient
import re
import statistics
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

from bench import http

LONE_REQUESTS = 20


def lone_latencies_ms(url: str, body: bytes, ctype: str, count: int = LONE_REQUESTS) -> list[float]:
    """``count`` requests one after another on one kept-alive connection, each timed."""
    parts = urllib.parse.urlsplit(url)
    conn = httpclient.HTTPConnection(parts.hostname, parts.port, timeout=60)
    out = []
    try:
        for _ in range(count):
            start = time.perf_counter()
            conn.request("POST", parts.path, body=body, headers={"Content-Type": ctype})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"lone request got {response.status}")
            out.append((time.perf_counter() - start) * 1000)
    finally:
        conn.close()
    return out


def burst_recovery(url: str, body: bytes, ctype: str, clients: int = 400, seconds: int = 15) -> dict:
    """Lone-client median latency before, right after (the first requests) and 5 s after a burst."""
    before = statistics.median(lone_latencies_ms(url, body, ctype, 50))
    burst = http.wrk(url, body, ctype, clients, seconds)
    ended = time.monotonic()
    right_after = statistics.median(lone_latencies_ms(url, body, ctype, 5))
    time.sleep(max(0.0, ended + 5 - time.monotonic()))
    after_5s = statistics.median(lone_latencies_ms(url, body, ctype))
    return {
        "clients": clients,
        "seconds": seconds,
        "burst_requests_per_s": burst["requests_per_s"],
        "burst_errors": burst["errors"],
        "lone_before_ms": before,
        "lone_right_after_ms": right_after,
        "lone_after_5s_ms": after_5s,
        "recovered": after_5s <= 1.5 * before,  # back to its pre-burst level (within noise) 5 s later
    }


def overload(url: str, body: bytes, ctype: str, connections: int = 1000, seconds: int = 10) -> dict:
    """``connections`` concurrent connections for ``seconds`` with hey: status counts, errors and p99; then a
    lone client's latency 5 s after the load stops."""
    before = statistics.median(lone_latencies_ms(url, body, ctype, 50))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "body").write_bytes(body)
        proc = subprocess.run(
            ["hey", "-c", str(connections), "-z", f"{seconds}s", "-t", "60", "-m", "POST"]
            + ["-D", str(Path(tmp) / "body"), "-T", ctype, url],
            capture_output=True,
            text=True,
            timeout=seconds + 120,
        )
    ended = time.monotonic()
    time.sleep(max(0.0, ended + 5 - time.monotonic()))
    after_5s = statistics.median(lone_latencies_ms(url, body, ctype))
    report = parse_hey(proc.stdout)
    return {**report, "connections": connections, "lone_before_ms": before, "lone_after_5s_ms": after_5s}


def parse_hey(text: str) -> dict:
    """hey's summary, as bench/overload.py reads it (the one hey parser: Debian's hey quotes the URL in its error
    lines, which an earlier pattern here missed, so connection errors went uncounted), in this row's units."""
    from bench.overload import parse_hey as parsed_hey

    parsed = parsed_hey(text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    return {
        "statuses": {int(code): n for code, n in parsed["statuses"].items()},
        "errors": parsed["errors"],
        "p99_ms": parsed["p99_s"] * 1000 if parsed["p99_s"] is not None else None,
        "requests_per_s": float(rps.group(1)) if rps else None,
    }
