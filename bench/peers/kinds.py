"""Our service and the peers on the images people send (bench/workloads.py): a row per kind, one image per
request, and a row for the page's mix (``workloads.MIX``), whose prebuilt bodies every wrk thread sends in turn.

Each server is first checked on these very files against in-process ONNX Runtime behind the project's own
preprocessing (bench/peers/work.py). During our server's windows, the cores its processes used, per HTTP worker.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import httpx
import numpy as np
from tqdm import tqdm

from bench import http, workloads
from bench.peers.check import differences
from bench.peers.cpu import OtherLoad, watchers
from bench.peers.work import Pipeline

log = logging.getLogger(__name__)
KINDS = ("canvas", "screenshot_300", "photo_1mp", "photo_12mp")
MIX = "mix"
BOUNDARY = "mnist-bench-kinds-7f3c9a1e"  # one boundary for every body of the mix: wrk sends them under one type
MIX_FIRST_DIGIT = 16  # the mix's images show the MNIST test digits from here on, the kinds' the first ones


@dataclass(frozen=True)
class KindsConfig:
    """What the realistic-input rows send: fewer and shorter windows than the 28x28 PNG's (a 12-megapixel photo
    keeps a server busy for a while, and five rows of five servers add up)."""

    kinds: tuple[str, ...] = KINDS
    mix: bool = True
    clients: int = 8
    rounds: int = 2
    window_s: int = 3  # wrk takes whole seconds
    mix_cycles: int = 2  # the mix's bodies: this many cycles of workloads.MIX, each image its own digit


QUICK = KindsConfig(kinds=("canvas",), rounds=1, window_s=2, mix_cycles=1)  # `make bench-quick`: about a minute


@dataclass(frozen=True)
class Workload:
    """One row's requests: the image files it sends, one per request, in turn."""

    name: str
    files: tuple[bytes, ...]

    def request(self) -> tuple[bytes | list[bytes], str]:
        """The body (several, for wrk to send in turn) and their one content type."""
        bodies = [single_file(data, i, BOUNDARY)[0] for i, data in enumerate(self.files)]
        return (bodies[0] if len(bodies) == 1 else bodies), f"multipart/form-data; boundary={BOUNDARY}"

    @property
    def mean_bytes(self) -> float:
        return sum(map(len, self.files)) / len(self.files)


def single_file(data: bytes, index: int, boundary: str | None = None) -> tuple[bytes, str]:
    """A multipart body with one file in ``images``, named and typed by its content (JPEG or PNG)."""
    jpeg = data[:3] == b"\xff\xd8\xff"
    name, ctype = (f"{index}.jpg", "image/jpeg") if jpeg else (f"{index}.png", "image/png")
    return http.multipart([("images", name, data, ctype)], boundary)


def mix_order(mix: dict[str, int]) -> list[str]:
    """One cycle of ``mix`` (kind -> requests per cycle), each kind spread out over it rather than in a run
    (smooth weighted round robin: nginx's upstream weighting)."""
    total, current, out = sum(mix.values()), dict.fromkeys(mix, 0), []
    for _ in range(total):
        for kind, weight in mix.items():
            current[kind] += weight
        pick = max(current, key=current.get)
        current[pick] -= total
        out.append(pick)
    return out


def workloads_for(cfg: KindsConfig, digits: np.ndarray) -> list[Workload]:
    """A Workload per kind of ``cfg.kinds`` (one file, the kind's own digit) and the mix's, from MNIST digits."""
    out = [Workload(kind, (workloads.make(kind, digits[i], seed=i),)) for i, kind in enumerate(cfg.kinds)]
    if cfg.mix:
        order = mix_order(workloads.MIX) * cfg.mix_cycles
        shown = [digits[(MIX_FIRST_DIGIT + j) % len(digits)] for j in range(len(order))]
        files = tuple(workloads.make(kind, digit, seed=j) for j, (kind, digit) in enumerate(zip(order, shown)))
        out.append(Workload(MIX, files))
    return out


def check(url: str, loads: list[Workload], want: dict[bytes, dict]) -> str:
    """Every distinct file of ``loads`` alone in a request to ``url``: the same answer as in-process (``want``)?
    A note for the report, which names the first differences instead of stopping the benchmark."""
    files = list(dict.fromkeys(data for w in loads for data in w.files))
    problems = []
    for i, data in enumerate(files):
        body, ctype = single_file(data, i)
        try:
            response = httpx.post(url, content=body, headers={"content-type": ctype}, timeout=60)
            response.raise_for_status()
            problems += differences(f"file {i}", response.json(), [want[data]])
        except (httpx.HTTPError, ValueError) as exc:
            problems.append(f"file {i} ({len(data):,} bytes): {str(exc)[:120]}")
    if problems:
        return f"**differs** on {len(problems)} of {len(files)} files: " + "; ".join(problems[:3])
    return f"{len(files)} files ({', '.join(w.name for w in loads)}): same answers as in-process ONNX Runtime"


def measure(
    live: dict[str, http.Server],
    paths: dict[str, str],
    cfg: KindsConfig,
    digits: np.ndarray,
    export_dir,
    alone: bool = True,
    ours: str = "bento",
) -> dict:
    """Check, then interleaved wrk windows of the servers in ``paths`` (name -> predict path) on each workload,
    the rest of ``live`` frozen with ``alone``. Returns the config, the rows, the checks, the inputs' sizes and
    the seconds it all took."""
    started = time.perf_counter()
    inputs = workloads_for(cfg, digits)
    reference = Pipeline(export_dir)
    want = {data: reference([data])[0] for w in inputs for data in w.files}
    checks = {name: check(live[name].url + path, inputs, want) for name, path in paths.items()}
    for name, note in checks.items():
        (log.warning if note.startswith("**") else log.info)("%s on realistic inputs: %s", name, note)
    watch = watchers({name: live[name] for name in paths}, ours)
    rows = []
    for w in tqdm(inputs, desc="inputs", unit="input", disable=None):
        body, ctype = w.request()
        loads = {name: (path, body, ctype, cfg.window_s) for name, path in paths.items()}
        with OtherLoad(live) as other:
            windows = http.interleaved(live, loads, cfg.clients, cfg.rounds, alone, watch)
        for name, ws in windows.items():
            row = {"server": name, "scenario": w.name, "concurrency": cfg.clients, **http.median_of(ws)}
            row |= {"images_per_s": row["requests_per_s"], "other_cpu_share": other.share}
            if name == ours:
                row["cores"] = [x["cores"] for x in ws]
                row["worker_requests"] = [x["worker_requests"] for x in ws]
            rows.append(row)
    return {
        "config": asdict(cfg),
        "mix": dict(workloads.MIX),
        "body_bytes": {w.name: w.mean_bytes for w in inputs},
        "rows": rows,
        "checks": checks,
        "seconds": time.perf_counter() - started,
    }
