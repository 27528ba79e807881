"""Training speed: the book's loop against ``training.train``, same machine, same run.

    python -m bench.train_speed --epochs 1 [--limit N] [--json PATH]

Runs the book's loop first, then ours, on the same data and seed, and prints seconds per epoch, test
accuracy and the ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile

import torch

from bench.book_train import run_book_training
from training.data import resolve_data_dir
from training.train import TrainConfig, train


def measure(epochs: int, limit: int | None, device: str = "cpu", data_dir: str | None = None, rounds: int = 1) -> dict:
    """``rounds`` alternations of the book's loop and ours: this machine's CPU share drifts, and alternating
    keeps the ratio fair. Seconds are per epoch, medians over every epoch of every round."""
    root = str(resolve_data_dir(data_dir))
    book_epochs, ours_epochs, ratios = [], [], []
    for _ in range(rounds):
        book = run_book_training(root, epochs=epochs, limit=limit, device=device)
        with tempfile.TemporaryDirectory() as out:
            # holdout=0: the same images as the book's loop, so the epochs compare
            cfg = TrainConfig(epochs=epochs, limit=limit, holdout=0, data_dir=root, out=out, device=device)
            ours = train(cfg).metrics
        book_epochs += book["epoch_seconds"]
        ours_epochs += [h["epoch_seconds"] for h in ours["history"]]
        ratios.append(statistics.median(book["epoch_seconds"]) / statistics.median(ours_epochs[-epochs:]))
    book_median, ours_median = statistics.median(book_epochs), statistics.median(ours_epochs)
    return {
        "device": device,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": str(torch.__version__),
        "epochs": epochs,
        "train_samples": ours["train_samples"],
        "book": {"epoch_seconds": book_epochs, "test_accuracy": book["test_accuracy"]},
        "ours": {"epoch_seconds": ours_epochs, "test_accuracy": ours["test_accuracy"]},
        "speedup": book_median / ours_median,
        "round_speedups": ratios,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_speed", description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--rounds", type=int, default=1, help="alternate the two loops this many times")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    result = measure(args.epochs, args.limit, args.device, args.data_dir, args.rounds)
    b, o = result["book"], result["ours"]
    print(
        f"{result['train_samples']} images/epoch on {result['device']}: "
        f"book {statistics.median(b['epoch_seconds']):.1f}s/epoch ({100 * b['test_accuracy']:.2f}%), "
        f"ours {statistics.median(o['epoch_seconds']):.1f}s/epoch ({100 * o['test_accuracy']:.2f}%), "
        f"speed-up {result['speedup']:.2f}x"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
