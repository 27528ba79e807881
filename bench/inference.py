"""In-process inference: eager PyTorch, TorchScript, torch.export, ONNX Runtime (float and INT8)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from export.formats import FILES, load_runner
from training.checkpoint import build_model, load_checkpoint

BATCH_SIZES = (1, 8, 32, 64, 128, 512)


def _windows(run, x: np.ndarray, windows: int, window_s: float) -> list[float]:
    """Images per second in each of ``windows`` timed windows of about ``window_s`` seconds."""
    run(x)  # warm-up
    rates = []
    for _ in range(windows):
        n, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < window_s:
            run(x)
            n += len(x)
        rates.append(n / elapsed)
    return rates


def onnx_one_thread(export_dir: Path, x: np.ndarray, windows: int = 5, window_s: float = 0.5) -> float:
    """Images/s of ONNX Runtime in process with one intra-op thread, the setting of each work process."""
    from export.formats import onnx_session

    session = onnx_session(export_dir / FILES["onnx"], threads=1)
    name = session.get_inputs()[0].name
    return statistics.median(_windows(lambda b: session.run(None, {name: b})[0], x, windows, window_s))


def measure(export_dir: Path, x_all: np.ndarray, windows: int = 5, window_s: float = 0.5) -> list[dict]:
    model = build_model(load_checkpoint(export_dir / "checkpoint.pt"))

    def eager(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    runners = {"eager": eager}
    for fmt in ("torchscript", "pt2", "onnx", "onnx-int8"):
        if (export_dir / FILES[fmt]).is_file():
            runners[fmt] = load_runner(fmt, export_dir / FILES[fmt])[0]
    rows = []
    for fmt, run in runners.items():
        for b in BATCH_SIZES:
            rates = _windows(run, x_all[:b], windows, window_s)
            median = statistics.median(rates)
            rows.append(
                {
                    "format": fmt,
                    "batch": b,
                    "images_per_s": median,
                    "latency_ms": 1000 * b / median,
                    "windows": len(rates),
                }
            )
    return rows


def work_per_image_ms(export_dir: Path, files: list[bytes], rounds: int = 5, calls: int = 1000) -> float:
    """The CPU milliseconds one request of one image costs in process, on one core: the project's preprocessing,
    ONNX Runtime with one thread at batch 1, and the answer's format (bench/peers/work.py, what every peer runs per
    request). The lowest of ``rounds`` (CPU time, over ``calls`` calls each, through ``files`` in turn): the
    least this machine needs for the work itself, against which a server's CPU per request is compared."""
    from bench.peers.work import Pipeline

    pipeline = Pipeline(export_dir)
    for data in files:
        pipeline([data])
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for i in range(calls):
            pipeline([files[i % len(files)]])
        best = min(best, (time.process_time() - start) / calls * 1000)
    return best
