"""Overload goodput and fairness under saturation: clients that resend at once when refused (``hey``,
Debian's package, so that the load generator's own CPU stays small), with a lone client and a ``/livez`` probe
on Python threads beside them.

``overload_goodput``: images answered with 200 per second at saturation and at 16x that many clients, per body
kind. ``fairness``: what a lone small client gets while hog clients send the costliest requests.
``python -m bench.overload [--url URL]`` prints both as Markdown; without ``--url`` it starts our service.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from bench import http as bench_http
from bench import workloads

log = logging.getLogger("bench.overload")
MiB = 1024 * 1024
IMAGES = 64  # images per bulk request: the service's MNIST_MAX_IMAGES
BULK = {"bulk28": "mnist_png", "bulk300": "screenshot_300"}  # body kind -> bench.workloads kind of its images
SATURATION_COUNTS = (1, 2, 4, 8, 16)
RISE = 1.05  # saturated: within 5% of the best goodput of the sweep
OVERLOAD_FACTOR = 16
LIVEZ_EVERY_S, LIVEZ_TIMEOUT_S = 0.5, 5.0
LONE_EVERY_S, LONE_TIMEOUT_S = 0.3, 10.0
HEY_TIMEOUT_S = 20  # hey's own default: a request still unanswered after it counts as an error
# Targets, each stated as met or not in docs/benchmarks.md
GOODPUT_RATIO = 0.9
LIVEZ_MAX_S = 1.0
LONE_SHARE = 0.95
LONE_P99_S = 1.0
# The costliest legal PNG request: 3 images of 5,320 x 3,990 (21.2 MP each, 63.7 MP in all) under the 25 MP per
# image and 64 MP per request limits (service/config.py); a lit sheet of paper compresses to about 0.5 MiB each.
HOG_PNG_SIZE = (5320, 3990)
HOG_PNG_IMAGES = 3
HOG_JSON_BYTES = 31 * MiB  # under MNIST_MAX_REQUEST_BYTES, 32 MiB


# ---- bodies --------------------------------------------------------------------------------------------------
def bulk_body(kind: str, seed: int = 0) -> tuple[bytes, str]:
    """One multipart request of 64 images (field ``images``) of the body ``kind`` (``BULK``), real digits."""
    digits, _ = workloads.mnist_digits(IMAGES)
    files = [workloads.make(BULK[kind], digit, seed + i) for i, digit in enumerate(digits)]
    return bench_http.multipart([("images", f"{i}.png", data, "image/png") for i, data in enumerate(files)])


def paper_png(digit_u8: np.ndarray, size: tuple[int, int], seed: int = 0) -> bytes:
    """An opaque RGBA PNG of ``size``: a sheet of paper lit from one side with a large dark digit on it, drawn
    at a tenth of the size and scaled up (smooth, so it compresses well without being one flat colour)."""
    rng = np.random.default_rng(seed)
    w, h = max(size[0] // 10, 40), max(size[1] // 10, 40)
    side = int(rng.uniform(0.5, 0.8) * h)
    top, left = int(rng.integers(4, h - side - 3)), int(rng.integers(4, w - side - 3))
    ink = np.zeros((h, w), dtype=np.float32)
    digit = Image.fromarray(digit_u8.astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC)
    ink[top : top + side, left : left + side] = np.asarray(digit, dtype=np.float32) / 255
    ys, xs = np.mgrid[0:h, 0:w]
    gray = (0.78 + 0.15 * xs / w - 0.08 * ys / h) * (1 - 0.85 * ink)
    rgba = np.stack([gray, gray * 0.97, gray * 0.92, np.ones_like(gray)], axis=-1)
    small = Image.fromarray((rgba.clip(0, 1) * 255).astype(np.uint8), "RGBA")
    buf = io.BytesIO()
    small.resize(size, Image.Resampling.BILINEAR).save(buf, format="PNG")
    return buf.getvalue()


def hog_png_body(size: tuple[int, int] = HOG_PNG_SIZE, count: int = HOG_PNG_IMAGES) -> tuple[bytes, str]:
    digits, _ = workloads.mnist_digits(count)
    files = [("images", f"page{i}.png", paper_png(d, size, seed=i), "image/png") for i, d in enumerate(digits)]
    return bench_http.multipart(files)


def _json_images(count: int) -> list[bytes]:
    digits, _ = workloads.mnist_digits(count)
    return [json.dumps((d / 255.0).tolist(), separators=(",", ":")).encode() for d in digits]


def hog_json_many(size: int = HOG_JSON_BYTES) -> tuple[bytes, str]:
    """``{"images": [...]}`` with as many 28x28 arrays (real digits, in turn) as fit in ``size`` bytes: far
    more than the 64 images a request may hold (a 413, after however much parsing the server does first)."""
    encoded = _json_images(IMAGES)
    head, tail, parts, used = b'{"images":[', b"]}", [], 0
    while used + len(encoded[len(parts) % IMAGES]) + 1 + len(head) + len(tail) <= size:
        parts.append(encoded[len(parts) % IMAGES])
        used += len(parts[-1]) + 1
    return head + b",".join(parts) + tail, "application/json"


def hog_json_padded(size: int = HOG_JSON_BYTES) -> tuple[bytes, str]:
    """A legal ``{"images": [...]}`` of ``size`` bytes at most: 64 real digits, each value written out with
    trailing zeros (the same number) so that the body fills ``size``."""
    digits, _ = workloads.mnist_digits(IMAGES)
    values = [repr(float(v)) for v in (digits / 255.0).ravel()]
    skeleton = len(json.dumps({"images": (digits / 255.0).tolist()}, separators=(",", ":")))
    zeros = "0" * ((size - skeleton) // len(values))
    rows = [",".join(v + zeros for v in values[i : i + 28]) for i in range(0, len(values), 28)]
    images = ["[" + "],[".join(rows[i : i + 28]) + "]" for i in range(0, len(rows), 28)]
    return ('{"images":[[' + "],[".join(images) + "]]}").encode(), "application/json"


def lone_request(path: str) -> tuple[bytes, str]:
    """The lone client's request: one 28x28 digit, as a PNG for ``/predict`` or a JSON array otherwise."""
    if path != "/predict":
        return b'{"images":[' + _json_images(1)[0] + b"]}", "application/json"
    digits, _ = workloads.mnist_digits(1)
    return bench_http.multipart([("images", "digit.png", workloads.make("mnist_png", digits[0]), "image/png")])


# The hogs: name -> (clients, path, body builder, what the body is)
_W, _H = HOG_PNG_SIZE
HOGS = {
    "png64mp": (
        16,
        "/predict",
        hog_png_body,
        f"{HOG_PNG_IMAGES} RGBA PNGs of {_W:,} x {_H:,} ({_W * _H * HOG_PNG_IMAGES / 1e6:.1f} MP in all)",
    ),
    "json31": (6, "/predict_array", hog_json_many, "31 MiB of JSON: as many 28x28 arrays as fit"),
    "json31x64": (6, "/predict_array", hog_json_padded, "31 MiB of JSON: 64 arrays, numbers zero-padded"),
}


# ---- hey -----------------------------------------------------------------------------------------------------
def hey(url: str, body: bytes, ctype: str, clients: int, seconds: float) -> dict:
    """``clients`` hey workers posting ``body`` for ``seconds``, each resending as soon as it has an answer."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "body").write_bytes(body)
        argv = ["hey", "-z", f"{seconds:g}s", "-c", str(clients), "-t", str(HEY_TIMEOUT_S), "-m", "POST"]
        argv += ["-T", ctype, "-D", str(Path(tmp) / "body"), url]
        log.info("hey: %d clients, %g s, %s bytes to %s", clients, seconds, f"{len(body):,}", url)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + HEY_TIMEOUT_S + 60)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0 or "Summary:" not in proc.stdout:
        raise RuntimeError(f"hey failed ({proc.returncode}): {proc.stderr[-500:] or proc.stdout[-500:]}")
    parsed = parse_hey(proc.stdout)
    if not parsed["statuses"] and set(parsed["errors"]) == {"connection refused"}:
        raise RuntimeError(f"nothing listens at {url}: the server is down")  # not a measurement of zero
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime  # hey's own, to show it is small
    return {"clients": clients, **parsed, "cpu_s": cpu_s}


def parse_hey(text: str) -> dict:
    """hey's summary -> its duration, the count of each status code and of each kind of connection error (the
    message's last part: ``connection reset by peer``, ``EOF``; without the ports, which differ per socket), and
    its latency's p99 and slowest."""
    total = re.search(r"Total:\s+([\d.]+) secs", text)
    slowest = re.search(r"Slowest:\s+([\d.]+) secs", text)
    p99 = re.search(r"99% in ([\d.]+) secs", text)
    statuses = Counter()
    for code, n in re.findall(r"^\s*\[(\d{3})\]\s+(\d+) responses", text, re.MULTILINE):
        statuses[code] += int(n)
    errors = Counter()
    for n, message in re.findall(r"^\s*\[(\d+)\]\s+\w+ \"?[^\s\"]+\"?: (.+)$", text, re.MULTILINE):
        errors[message.rsplit(": ", 1)[-1].strip()] += int(n)
    slowest_s = float(slowest.group(1)) if slowest else None
    return {
        "seconds": float(total.group(1)) if total else None,
        "statuses": dict(statuses),
        "errors": dict(errors),
        # over every answer, refusals included; hey prints no 99th percentile under 100 answers: the slowest then
        "p99_s": float(p99.group(1)) if p99 else slowest_s,
        "slowest_s": slowest_s,
    }


def images_per_s(load: dict, images: int) -> float:
    """Goodput: images answered with 200 per second of the run (hey's total, which includes the last answers)."""
    return load["statuses"].get("200", 0) * images / load["seconds"]


def saturation_point(points: list[tuple[int, float]], rise: float = RISE) -> int:
    """Where goodput stops rising, from a sweep of (clients, goodput): the fewest clients whose goodput is within
    ``rise`` of the sweep's best. Not the first doubling that adds nothing: with 2 clients both connections may
    land on one HTTP worker (the kernel spreads them by their ports), a dip that the next doubling climbs out of."""
    best = max(goodput for _, goodput in points)
    return min(clients for clients, goodput in points if goodput * rise >= best)


# ---- the lone client and the /livez probe ----------------------------------------------------------------------
def timed_request(url: str, body: bytes | None, ctype: str, timeout: float) -> tuple[float, str]:
    """One request on a fresh connection: (seconds, status code or the error's type name)."""
    parts = urllib.parse.urlsplit(url)
    start = time.perf_counter()
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        headers = {"Content-Type": ctype} if body is not None else {}
        conn.request("POST" if body is not None else "GET", parts.path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        outcome = str(response.status)
    except (OSError, http.client.HTTPException) as exc:  # a timeout, a reset, a closed connection
        outcome = type(exc).__name__
    finally:
        conn.close()
    return time.perf_counter() - start, outcome


class Periodic(threading.Thread):
    """One request every ``every`` seconds (right after the previous one when that took longer) until ``halt``:
    GET without a body, else POST. ``samples`` holds (seconds, outcome) per request."""

    def __init__(self, url: str, body: bytes | None, ctype: str, every: float, timeout: float):
        super().__init__(daemon=True)
        self.url, self.body, self.ctype, self.every, self.timeout = url, body, ctype, every, timeout
        self.samples: list[tuple[float, str]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        due = time.monotonic()
        while not self.halt.is_set():
            self.samples.append(timed_request(self.url, self.body, self.ctype, self.timeout))
            due = max(due + self.every, time.monotonic())
            self.halt.wait(due - time.monotonic())


@contextlib.contextmanager
def watched(url: str, lone_path: str):
    """A /livez probe and a lone client (one small request to ``lone_path`` every 0.3 s) for the block."""
    body, ctype = lone_request(lone_path)
    threads = (
        Periodic(url + "/livez", None, "", LIVEZ_EVERY_S, LIVEZ_TIMEOUT_S),
        Periodic(url + lone_path, body, ctype, LONE_EVERY_S, LONE_TIMEOUT_S),
    )
    for thread in threads:
        thread.start()
    try:
        yield threads
    finally:
        for thread in threads:
            thread.halt.set()
        for thread in threads:
            thread.join()


def summarize(samples: list[tuple[float, str]]) -> dict:
    """Requests, the share answered 200, each outcome's count, and latency over all of them (a failure at the
    time it took: a timeout counts as its full timeout)."""
    seconds = [s for s, _ in samples] or [float("nan")]
    outcomes = Counter(outcome for _, outcome in samples)
    return {
        "requests": len(samples),
        "ok_share": outcomes["200"] / len(samples) if samples else 0.0,
        "outcomes": dict(outcomes),
        "p50_s": float(np.percentile(seconds, 50)),
        "p99_s": float(np.percentile(seconds, 99)),
        "max_s": max(seconds),
    }


# ---- the two measurements --------------------------------------------------------------------------------------
def overload_goodput(url: str, kind: str, seconds: float = 15, counts=SATURATION_COUNTS) -> dict:
    """Goodput of ``kind`` bodies (``BULK``) at each of ``counts`` clients, then at 16x the saturation count
    (``saturation_point``), with the /livez probe and a lone client watching that window. The whole sweep is
    measured, and the overload compared with its best."""
    body, ctype = bulk_body(kind)
    sweep: list[dict] = []
    for clients in counts:
        sweep.append(hey(url + "/predict", body, ctype, clients, seconds))
        bench_http.settle(url + "/readyz")
    saturated = saturation_point([(run["clients"], images_per_s(run, IMAGES)) for run in sweep])
    with watched(url, "/predict") as (livez, lone):
        overload = hey(url + "/predict", body, ctype, saturated * OVERLOAD_FACTOR, seconds)
    bench_http.settle(url + "/readyz")
    for run in (*sweep, overload):
        run["images_per_s"] = images_per_s(run, IMAGES)
    best = max(run["images_per_s"] for run in sweep)
    return {
        "kind": kind,
        "body_bytes": len(body),
        "seconds": seconds,
        "sweep": sweep,
        "saturation_clients": saturated,
        "saturation_images_per_s": best,
        "overload": overload,
        "ratio": overload["images_per_s"] / best if best else 0.0,
        "livez": summarize(livez.samples),
        "lone": summarize(lone.samples),
    }


def fairness(url: str, hog: str, seconds: float = 15, clients: int | None = None) -> dict:
    """A lone client's answers (one small request every 0.3 s, to the hogs' path) while ``clients`` hogs
    (``HOGS``) send their body and resend at once; the /livez probe alongside."""
    default_clients, path, build, what = HOGS[hog]
    body, ctype = build()
    clients = clients or default_clients
    with watched(url, path) as (livez, lone):
        load = hey(url + path, body, ctype, clients, seconds)
    bench_http.settle(url + "/readyz")
    return {
        "hog": hog,
        "what": what,
        "path": path,
        "body_bytes": len(body),
        "seconds": seconds,
        "hogs": load,
        "lone": summarize(lone.samples),
        "livez": summarize(livez.samples),
    }


def run_all(url: str, seconds: float, kinds=tuple(BULK), hogs=tuple(HOGS), only: str | None = None) -> dict:
    """Both measurements (or ``only`` one) against the server at ``url``: what bench.run stores under http."""
    out = {}
    if only in (None, "goodput"):
        out["overload_goodput"] = [overload_goodput(url, kind, seconds) for kind in kinds]
    if only in (None, "fairness"):
        out["fairness"] = [fairness(url, hog, seconds) for hog in hogs]
    return out


@contextlib.contextmanager
def own_server(checkpoint: str):
    """Our service on a free port, as bench.run starts it: the model exported from ``checkpoint`` into a
    temporary BentoML home (set before bentoml is imported, so that the export registers it there)."""
    with tempfile.TemporaryDirectory() as home:
        os.environ["BENTOML_HOME"] = home
        from export.build import ExportConfig, build

        build(ExportConfig(checkpoint=checkpoint, out=str(Path(home) / "export"), int8=False))
        with bench_http.bento_server("bento", home) as server:
            yield server.url


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server (default: start our service on a free port)")
    p.add_argument("--seconds", type=float, default=15, help="each load window, default 15")
    p.add_argument("--only", choices=("goodput", "fairness"))
    p.add_argument("--kinds", nargs="+", choices=tuple(BULK), default=list(BULK))
    p.add_argument("--hogs", nargs="+", choices=tuple(HOGS), default=list(HOGS))
    p.add_argument("--checkpoint", help="without --url: default artifacts/convnet.pt, else the book's weights")
    p.add_argument("--json", metavar="FILE", help="also write the measurements to FILE")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if shutil.which("hey") is None:
        raise SystemExit("error: hey is not installed (Debian's package: apt-get install hey)")
    with contextlib.ExitStack() as stack:
        if args.url:
            url = args.url.rstrip("/")
        else:
            from bench.run import default_checkpoint

            url = stack.enter_context(own_server(args.checkpoint or default_checkpoint()))
        if (outcome := timed_request(url + "/livez", None, "", LIVEZ_TIMEOUT_S)[1]) != "200":
            raise SystemExit(f"error: {url}/livez answered {outcome}, not 200: is the server up?")
        result = run_all(url, args.seconds, args.kinds, args.hogs, args.only)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    from bench.report import overload_sections

    print("\n".join(overload_sections(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
