"""HTTP serving under load with wrk (Debian's package): our BentoML service, batched and unbatched, against
the book's Flask server and a BentoML endpoint that does nothing."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
# WRK_BODY: one file path per line. One file: wrk's static request, as always. Several: a request() that sends
# them in turn, each wrk thread from its own starting point (wrk runs request() per thread, not per connection).
WRK_SCRIPT = """
local paths = {}
for path in (os.getenv("WRK_BODY") or ""):gmatch("[^\\n]+") do paths[#paths + 1] = path end
local function slurp(path) local f = io.open(path, "rb"); local data = f:read("*all"); f:close(); return data end
wrk.method = "POST"
wrk.body = slurp(paths[1])
wrk.headers["Content-Type"] = os.getenv("WRK_CTYPE")
for name, value in (os.getenv("WRK_HEADERS") or ""):gmatch("([^:\\n]+):%s*([^\\n]*)") do wrk.headers[name] = value end
if #paths > 1 then
  local requests, turn, threads = {}, 0, 0
  setup = function(thread)
    thread:set("first", threads * math.floor(#paths / (tonumber(os.getenv("WRK_THREADS")) or 1)))
    threads = threads + 1
  end
  init = function(args)
    for i, path in ipairs(paths) do requests[i] = wrk.format(nil, nil, nil, slurp(path)) end
    turn = first or 0
  end
  request = function()
    turn = turn % #requests + 1
    return requests[turn]
  end
end
done = function(s, latency, requests)
  io.write(string.format('WRKJSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, '
    .. '"status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d}\\n', s.requests, s.duration,
    s.errors.connect, s.errors.read, s.errors.write, s.errors.status, s.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(files: list[tuple[str, str, bytes, str]], boundary: str | None = None) -> tuple[bytes, str]:
    """(field, filename, data, type) parts -> body and content type; bodies given one ``boundary`` share one type."""
    boundary = boundary or uuid.uuid4().hex
    out = io.BytesIO()
    for name, filename, data, ctype in files:
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n".encode()
        )
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def png(image_u8: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image_u8, mode="L").save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Server:
    name: str
    argv: list[str]
    ready_path: str
    env: dict = field(default_factory=dict)
    cwd: Path = REPO  # where `bentoml serve` finds bentofile.yaml and the service
    proc: subprocess.Popen | None = None
    port: int = 0

    def __enter__(self) -> Server:
        self.port = free_port()
        argv = [a.replace("{port}", str(self.port)) for a in self.argv]
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            argv,
            cwd=self.cwd,
            env={**os.environ, **self.env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}{self.ready_path}", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready in 120 s")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def processes(self) -> list[psutil.Process]:
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def rss_mb(self) -> float:
        return sum(p.memory_info().rss for p in self.processes() if p.is_running()) / 2**20

    def suspend(self) -> None:
        """Freeze every process of the server (SIGSTOP): it takes no CPU until ``resume``."""
        self._signal_all(psutil.Process.suspend)

    def resume(self) -> None:
        self._signal_all(psutil.Process.resume)

    def _signal_all(self, send) -> None:
        for p in self.processes():
            try:
                send(p)
            except psutil.NoSuchProcess:
                pass  # a short-lived child (TorchServe's metrics collector, say) ended since the listing

    def __exit__(self, *exc) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def wrk(
    url: str,
    body: bytes | Sequence[bytes],
    ctype: str,
    connections: int,
    seconds: float,
    headers: dict | None = None,
) -> dict:
    """wrk's summary of ``seconds`` of POSTs from ``connections`` clients. ``body`` is one body, or several that
    each wrk thread sends in turn (all under the one ``ctype``: multipart bodies share a boundary for this)."""
    bodies = [body] if isinstance(body, bytes | bytearray) else list(body)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"body{i}" for i in range(len(bodies))]
        for path, data in zip(paths, bodies):
            path.write_bytes(data)
        (Path(tmp) / "s.lua").write_text(WRK_SCRIPT)
        threads = min(2, connections)
        proc = subprocess.run(
            [
                "wrk",
                "-t",
                str(threads),
                "-c",
                str(connections),
                "-d",
                f"{seconds}s",
                "--timeout",
                "10s",
                "-s",
                str(Path(tmp) / "s.lua"),
                url,
            ],
            capture_output=True,
            text=True,
            env={
                **os.environ,
                "WRK_BODY": "\n".join(map(str, paths)),
                "WRK_CTYPE": ctype,
                "WRK_THREADS": str(threads),
                "WRK_HEADERS": "\n".join(f"{k}: {v}" for k, v in (headers or {}).items()),
            },
            timeout=seconds + 60,
        )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result: {proc.stdout[-500:]} {proc.stderr[-500:]}")
    r = json.loads(line[len("WRKJSON ") :])
    errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    return {
        "requests_per_s": r["requests"] / (r["duration_us"] / 1e6),
        "requests": r["requests"],
        "errors": errors,
        "p50_ms": r["p50_us"] / 1000,
        "p90_ms": r["p90_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
    }


def settle(url: str, quiet_ms: float = 20, limit_s: float = 30) -> None:
    """Wait until the server answers a trivial request quickly: wrk abandons requests still in flight when
    a window ends, and the server finishing them must not eat into the next window."""
    parts = urllib.parse.urlsplit(url)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=limit_s)
        try:  # the standard library's client: httpx builds an SSL context per call, which is slower than quiet_ms
            conn.request("GET", parts.path)
            conn.getresponse().read()
        except OSError:
            pass
        finally:
            conn.close()
        if (time.perf_counter() - t0) * 1000 < quiet_ms:
            time.sleep(0.3)
            return
        time.sleep(0.2)


def median_of(windows: list[dict]) -> dict:
    keys = ("requests_per_s", "p50_ms", "p90_ms", "p99_ms")
    out = {k: statistics.median(w[k] for w in windows) for k in keys}
    out["errors"] = sum(w["errors"] for w in windows)
    out["windows"] = len(windows)
    watched = [w for w in windows if "cores" in w and w.get("requests")]
    if watched:  # windows watched by bench.peers.cpu.cores_used: the server's CPU per answered request
        out["cpu_ms"] = statistics.median(1000 * w["cores"]["cpu_s"] / w["requests"] for w in watched)
        out["cores_used"] = statistics.median(w["cores"]["total"] for w in watched)
    return out


def bento_server(name: str, bentoml_home: str, env: dict | None = None, cwd: Path = REPO, target: str = "") -> Server:
    """`bentoml serve` from ``cwd`` (our service, unless ``target`` names another), with extra environment.

    Each server gets a home of its own under ``bentoml_home`` that shares its model store: BentoML keeps its
    multiprocess metrics in the home and clears them when a server starts, so that servers sharing one home
    lost each other's (our /metrics showed none of its own once the do-nothing server had started)."""
    argv = [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", "{port}"]
    home = Path(bentoml_home) / "servers" / name
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "models").is_symlink():
        (home / "models").symlink_to(Path(bentoml_home).resolve() / "models", target_is_directory=True)
    env = {"BENTOML_HOME": str(home), "MNIST_DRAIN_S": "0", **(env or {})}  # a benchmark stops it at once
    return Server(name, argv + ([target] if target else []), "/readyz", env, cwd)


def servers(book_checkpoint: str, bentoml_home: str) -> dict[str, Server]:
    return {
        "bento": bento_server("bento", bentoml_home),
        "bento-unbatched": bento_server("bento-unbatched", bentoml_home, {"MNIST_BATCHING": "0"}),
        "book-flask": Server(
            "book-flask",
            [sys.executable, "-m", "bench.book_server", "--checkpoint", book_checkpoint, "--port", "{port}"],
            "/health",
        ),
        "bento-noop": bento_server("bento-noop", bentoml_home, target="bench.noop_service:Noop"),
    }


def png_request(images_u8: np.ndarray, count: int) -> tuple[bytes, str]:
    """A multipart body for our /predict: the first ``count`` images as PNGs, and its content type."""
    return multipart([("images", f"{i}.png", png(images_u8[i]), "image/png") for i in range(count)])


def book_request(x_norm_image: np.ndarray) -> tuple[bytes, str]:
    """A body for the book's /test: one normalized image as raw float32 bytes plus JSON dims."""
    return multipart(
        [
            ("data", "blob", x_norm_image.astype(np.float32).tobytes(), "application/octet-stream"),
            ("metadata", "metadata.json", json.dumps({"dims": [1, 28, 28]}).encode(), "application/json"),
        ]
    )


NOOP_REQUEST = (b"{}", "application/json")


@contextlib.contextmanager
def only(live: dict[str, Server], name: str, alone: bool):
    """With ``alone``, every server but ``name`` frozen for the block (see ``interleaved``)."""
    others = [server for other, server in live.items() if other != name] if alone else []
    try:
        for server in others:
            server.suspend()
        yield
    finally:
        for server in others:
            server.resume()


def interleaved(
    live: dict[str, Server],
    loads: dict[str, tuple[str, bytes | Sequence[bytes], str, float]],
    clients: int,
    rounds: int,
    alone: bool = False,
    watch: dict[str, Callable[[], contextlib.AbstractContextManager[dict]]] | None = None,
) -> dict[str, list[dict]]:
    """wrk windows from each server in turn, ``rounds`` times, after a short warm-up of each; ``loads`` maps
    a server's name to (path, body or bodies, content type, window seconds). This machine's CPU share drifts over
    minutes: windows that alternate keep the comparisons (ratios) fair even when absolute numbers move.
    ``alone`` freezes the other servers during each one's warm-up and windows: some poll while idle (LitServe's
    workers and Ray's cluster each took about a tenth of this machine doing nothing) and would otherwise take
    that from the server being measured. ``watch`` maps a server's name to a context manager around each of its
    windows (not the warm-up) whose dict, filled when it exits, joins that window's result."""
    for name, (path, body, ctype, _, *headers) in loads.items():
        with only(live, name, alone):
            wrk(live[name].url + path, body, ctype, min(clients, 8), 1, *headers)
            settle(live[name].url + live[name].ready_path)
    windows: dict[str, list[dict]] = {name: [] for name in loads}
    for _ in range(rounds):
        for name, (path, body, ctype, seconds, *headers) in loads.items():
            with only(live, name, alone):
                with (watch or {}).get(name, _nothing)() as extra:
                    result = wrk(live[name].url + path, body, ctype, clients, seconds, *headers)
                windows[name].append({**result, **extra})
                settle(live[name].url + live[name].ready_path)
    return windows


@contextlib.contextmanager
def _nothing():
    yield {}


def v2_binary_request(name: str, datatype: str, array: np.ndarray) -> tuple[bytes, str, dict]:
    """An Open Inference Protocol request with one binary input and binary outputs: (body, content type,
    headers), as tritonclient sends it."""
    raw = np.ascontiguousarray(array).tobytes()
    tensor = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    tensor["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    return header + raw, "application/octet-stream", {"Inference-Header-Content-Length": str(len(header))}
