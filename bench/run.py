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
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bench import http, inference, overload, stress, train_speed
from bench.peers import kinds
from bench.peers.cpu import watchers
from bench.peers.kinds import KindsConfig
from training.data import DataError, Normalization, load_mnist, resolve_data_dir, to_model_input

REPO = Path(__file__).resolve().parent.parent
PER_REQUEST = {"png1": 1, "png16": 16, "png64": 64}  # images per request of each scenario
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


def default_checkpoint() -> str:
    """artifacts/convnet.pt (make train), else the book's weights."""
    ours = REPO / "artifacts" / "convnet.pt"
    return str(ours if ours.is_file() else BOOK)


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


def run_http(cfg: dict, checkpoint: str, home: str, export_dir: Path, images: np.ndarray, x_norm: np.ndarray) -> dict:
    """Every server up at once, each measured alone in turn (the others frozen: bench.http.interleaved)."""
    from bench.peers import peer_servers

    one_png, ctype1 = http.png_request(images, 1)
    many, ctype64 = http.png_request(images, 64)
    peers = peer_servers(export_dir)
    known = {**http.servers(checkpoint, home), **peers}
    names = ["bento", "book-flask", "bento-noop", *peers]
    # server -> (path, one-PNG body, content type); the book's server takes its own format, the no-op nothing
    one = {name: (getattr(known[name], "predict_path", "/predict"), one_png, ctype1) for name in names}
    one["book-flask"] = ("/test", *http.book_request(x_norm[0]))
    one["bento-noop"] = ("/noop", *http.NOOP_REQUEST)
    multi = [n for n in ["bento", *peers] if getattr(known[n], "multi_image", True)]
    sixteen, ctype16 = http.png_request(images, 16)
    rows, extra = [], {}
    steps = len(cfg["concurrency"]) * 2 + 5
    bar = tqdm(total=steps, desc="http", unit="step", disable=None)
    extra["work_ms"] = inference.work_per_image_ms(export_dir, [http.png(image) for image in images[:16]])

    def measure(scenario: str, loads: dict, clients: int) -> None:
        watch = watchers(live, "bento")  # each window's CPU, and our requests per HTTP worker
        for name, ws in http.interleaved(live, loads, clients, cfg["windows"], alone=True, watch=watch).items():
            row = {"server": name, "scenario": scenario, "concurrency": clients, **http.median_of(ws)}
            if name == "bento":
                row["worker_requests"] = [w["worker_requests"] for w in ws]
            rows.append(row)

    with contextlib.ExitStack() as stack:
        live = {name: stack.enter_context(known[name]) for name in names}
        for c in cfg["concurrency"]:
            measure("png1", {name: (*one[name], cfg["window_s"]) for name in names}, c)
            bar.update()
            measure("png64", {name: (one[name][0], many, ctype64, 2 * cfg["window_s"]) for name in multi}, c)
            bar.update()
        measure("png16", {name: (one[name][0], sixteen, ctype16, cfg["window_s"]) for name in multi}, 8)
        bar.update()
        for row in rows:
            row["images_per_s"] = row["requests_per_s"] * PER_REQUEST[row["scenario"]]
        paths = {name: one[name][0] for name in ["bento", *peers]}  # the realistic inputs: ours and the peers
        extra["kinds"] = kinds.measure(live, paths, KindsConfig(**cfg["kinds"]), images, export_dir)
        bar.update()
        with http.only(live, "bento", alone=True):
            extra["v2"] = run_v2(live["bento"], cfg, images, x_norm)
            bar.update()
            url = live["bento"].url + "/predict"
            extra["burst"] = stress.burst_recovery(url, one_png, ctype1, seconds=cfg["burst_s"])
            extra["overload"] = stress.overload(url, one_png, ctype1, seconds=cfg["overload_s"])
            bar.update()
            extra.update(overload.run_all(live["bento"].url, cfg["goodput_fairness_s"]))  # goodput and fairness
            extra["memory"] = measure_memory(live["bento"], one_png, ctype1, cfg["memory_s"])
            bar.update()
    bar.close()
    return {"rows": rows, **extra}


def run_v2(server: http.Server, cfg: dict, images: np.ndarray, x_norm: np.ndarray) -> list[dict]:
    """The Open Inference Protocol with 64 images per request, binary both ways: the network on normalized
    FP32 tensors, and the classifier on MNIST-format UINT8 pixels."""
    loads = {
        "mnist-convnet FP32": (
            "/v2/models/mnist-convnet/infer",
            *http.v2_binary_request("images", "FP32", x_norm[:64]),
        ),
        "mnist UINT8": ("/v2/models/mnist/infer", *http.v2_binary_request("images", "UINT8", images[:64])),
    }
    same = {name: server for name in loads}  # one server, two kinds of request, alternating
    rows = []
    for c in (1, 8):
        windows = http.interleaved(
            same,
            {n: (path, body, ct, cfg["window_s"], hdr) for n, (path, body, ct, hdr) in loads.items()},
            c,
            cfg["windows"],
        )
        for name, ws in windows.items():
            m = http.median_of(ws)
            rows.append({"request": name, "concurrency": c, **m, "images_per_s": 64 * m["requests_per_s"]})
    return rows


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
            "concurrency": [8, 64],
            "window_s": 3,
            "windows": 1,
            "memory_s": 10,
            "burst_s": 5,
            "overload_s": 5,
            "goodput_fairness_s": 4,
            "train_limit": 10_000,
            "train_rounds": 2,
            "inf_windows": 3,
            "inf_window_s": 0.2,
            "kinds": asdict(kinds.QUICK),
        }
        if args.quick
        else {
            "concurrency": [8, 64],
            "window_s": 5,
            "windows": 3,
            "memory_s": 60,
            "burst_s": 15,
            "overload_s": 10,
            "goodput_fairness_s": 15,
            "train_limit": None,
            "train_rounds": 3,
            "inf_windows": 5,
            "inf_window_s": 0.5,
            "kinds": asdict(KindsConfig()),  # the realistic inputs (bench/peers/kinds.py): about 5 minutes
        }
    )
    checkpoint = args.checkpoint or default_checkpoint()
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
        result["onnx_one_thread_batch64"] = inference.onnx_one_thread(
            export_dir, x_norm[:64], cfg["inf_windows"], cfg["inf_window_s"]
        )
        result["http"] = run_http(cfg, checkpoint, home, export_dir, images[:64].numpy(), x_norm)
    result["seconds"] = time.perf_counter() - started

    from bench.report import write_all

    write_all(result, RESULTS, DOC)
    print(f"wrote {RESULTS}/latest.json, latest.md, http.png, inference.png and {DOC} in {result['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except DataError as exc:  # no MNIST: one line that says where to put it, not a traceback
        raise SystemExit(f"error: {exc}") from None
