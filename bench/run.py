"""``python -m bench.run [--quick]``: training, in-process inference and HTTP serving, measured in one run.

Writes bench/results/latest.{json,md}, http.png and inference.png, and docs/benchmarks.md. Figures are
medians over repeated windows; comparisons are ratios measured in the same run on the same machine.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bench import http, inference, train_speed
from training.data import Normalization, load_mnist, resolve_data_dir, to_model_input

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DOC = REPO / "docs" / "benchmarks.md"
BOOK = REPO.parent / "shared" / "book" / "convnet.pth"


def machine() -> str:
    cpu = (
        next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    return (
        f"{cpu}, {os.cpu_count()} cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, "
        f"torch {torch.__version__}, CUDA {'yes' if torch.cuda.is_available() else 'no'}"
    )


def measure_memory(server: http.Server, body: bytes, ctype: str, seconds: int) -> dict:
    """RSS of all the server's processes before, every 5 s during, and after a sustained run at 64 clients."""
    import threading

    before = server.rss_mb()
    load = threading.Thread(target=http.wrk, args=(server.url + "/predict", body, ctype, 64, seconds))
    load.start()
    samples = []
    while load.is_alive():
        load.join(timeout=5)
        samples.append(round(server.rss_mb(), 1))
    return {"rss_mb_before": before, "rss_mb_after": server.rss_mb(), "rss_mb_samples": samples, "seconds": seconds}


def run_http(cfg: dict, checkpoint: str, home: str, images: np.ndarray, x_norm: np.ndarray) -> dict:
    one_png, ctype1 = http.png_request(images, 1)
    many, ctype64 = http.png_request(images, 64)
    plan = {  # server -> [(scenario, path, body, content type, images per request)]
        "bento-batched": [("png1", "/predict", one_png, ctype1, 1), ("png64", "/predict", many, ctype64, 64)],
        "bento-unbatched": [("png1", "/predict", one_png, ctype1, 1), ("png64", "/predict", many, ctype64, 64)],
        "book-flask": [("png1", "/test", *http.book_request(x_norm[0]), 1)],
        "bento-noop": [("png1", "/noop", *http.NOOP_REQUEST, 1)],
    }
    rows, memory = [], {}
    steps = sum(len(s) for s in plan.values()) * len(cfg["concurrency"])
    bar = tqdm(total=steps, desc="http", unit="point", disable=None)
    # All servers run at once and each window visits them in turn (http.interleaved).
    with contextlib.ExitStack() as stack:
        live = {name: stack.enter_context(server) for name, server in http.servers(checkpoint, home).items()}
        for scenario in ("png1", "png64"):
            # 64-image requests take tens of ms each: longer windows, so that a window holds many of them
            targets = {name: step[1:] for name, steps_ in plan.items() for step in steps_ if step[0] == scenario}
            loads = {
                name: (path, body, ctype, cfg["window_s"] * (2 if per_request > 1 else 1))
                for name, (path, body, ctype, per_request) in targets.items()
            }
            for c in cfg["concurrency"]:
                windows = http.interleaved(live, loads, c, cfg["windows"])
                for name, (*_, per_request) in targets.items():
                    row = {"server": name, "scenario": scenario, "concurrency": c, **http.median_of(windows[name])}
                    row["images_per_s"] = row["requests_per_s"] * per_request
                    rows.append(row)
                    bar.update()
        memory = measure_memory(live["bento-batched"], one_png, ctype1, cfg["memory_s"])
    bar.close()
    return {"rows": rows, "memory": memory}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short windows and fewer points (about 3 minutes)")
    p.add_argument("--checkpoint", default=None, help="default: artifacts/convnet.pt, else the book's weights")
    p.add_argument("--skip-training", action="store_true")
    args = p.parse_args(argv)
    # a SIGTERM (timeout, Ctrl-C in make) unwinds the servers' context managers instead of orphaning them
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    cfg = (
        {
            "concurrency": [1, 64],
            "window_s": 3,
            "windows": 1,
            "memory_s": 10,
            "train_limit": 10_000,
            "train_rounds": 2,
            "inf_windows": 3,
            "inf_window_s": 0.2,
        }
        if args.quick
        else {
            "concurrency": [1, 8, 32, 64],
            "window_s": 5,
            "windows": 3,
            "memory_s": 60,
            "train_limit": None,
            "train_rounds": 3,
            "inf_windows": 5,
            "inf_window_s": 0.5,
        }
    )
    checkpoint = args.checkpoint or str(
        REPO / "artifacts" / "convnet.pt" if (REPO / "artifacts" / "convnet.pt").is_file() else BOOK
    )
    started = time.perf_counter()
    result = {
        "machine": machine(),
        "quick": args.quick,
        "checkpoint": checkpoint,
        "config": cfg,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }

    if not args.skip_training:
        result["training"] = train_speed.measure(epochs=1, limit=cfg["train_limit"], rounds=cfg["train_rounds"])

    images, _ = load_mnist(resolve_data_dir(), train=False)
    x_norm = to_model_input(images[:512], Normalization()).numpy()
    with tempfile.TemporaryDirectory() as home:
        os.environ["BENTOML_HOME"] = home
        from export.build import ExportConfig, build

        export_dir = Path(home) / "export"
        build(ExportConfig(checkpoint=checkpoint, out=str(export_dir), int8=not args.quick))
        result["inference"] = inference.measure(export_dir, x_norm, cfg["inf_windows"], cfg["inf_window_s"])
        result["http"] = run_http(cfg, checkpoint, home, images[:64].numpy(), x_norm)
    result["seconds"] = time.perf_counter() - started

    from bench.report import write_all

    write_all(result, RESULTS, DOC)
    print(f"wrote {RESULTS}/latest.json, latest.md, http.png, inference.png and {DOC} in {result['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
