"""``python -m training``: parse flags into a TrainConfig and call train(); user errors are one line, exit 2."""

from __future__ import annotations

import argparse
import logging
import sys

from training.checkpoint import CheckpointError
from training.data import DataError
from training.feedback import FeedbackError
from training.logs import configure_logging
from training.train import TrainConfig, train


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of at least 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m training",
        description="Train the Mastering PyTorch chapter 1 ConvNet on MNIST and write a self-describing checkpoint.",
    )
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help=f"default {d.epochs}")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument(
        "--test-batch-size", type=positive_int, default=d.test_batch_size, help=f"default {d.test_batch_size}"
    )
    p.add_argument("--lr", type=positive_float, default=d.lr, help=f"Adadelta learning rate, default {d.lr}")
    p.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder holding MNIST/raw (default: $MNIST_DATA_DIR, then ./data; downloaded if missing)",
    )
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading missing data")
    p.add_argument("--out", default=d.out, help=f"output folder, default {d.out}/")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default=d.device)
    p.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        metavar="N",
        help="train on the first N training images not held out (quick runs); the test set stays whole",
    )
    p.add_argument(
        "--holdout",
        type=non_negative_int,
        default=d.holdout,
        metavar="N",
        help=f"never train on the last N training images: the export fits its temperature on them "
        f"(default {d.holdout}; 0 trains on all, as the book does)",
    )
    p.add_argument(
        "--feedback",
        default=None,
        metavar="STORE",
        help="also train on the labelled feedback images of this store (the service's MNIST_FEEDBACK_DB file, "
        "or a postgresql:// URL)",
    )
    p.add_argument(
        "--feedback-weight",
        type=positive_float,
        default=d.feedback_weight,
        metavar="W",
        help=f"how many times each feedback image is seen per epoch (default {d.feedback_weight:g})",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.quiet)
    try:
        cfg = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            test_batch_size=args.test_batch_size,
            lr=args.lr,
            seed=args.seed,
            data_dir=args.data_dir,
            out=args.out,
            device=args.device,
            limit=args.limit,
            holdout=args.holdout,
            download=not args.no_download,
            feedback=args.feedback,
            feedback_weight=args.feedback_weight,
        )
        result = train(cfg)
    except (DataError, CheckpointError, FeedbackError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    m = result.metrics
    logging.getLogger("training").info(
        "wrote %s: test accuracy %.2f%% after %d epochs on %d images (%.1fs)",
        result.checkpoint_path,
        100 * m["test_accuracy"],
        m["epochs"],
        m["train_samples"],
        m["train_seconds"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
