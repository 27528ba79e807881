"""The one verification function: every exported format computes the eager model's function.

Used by ``python -m export build`` (before anything is registered), by ``python -m export verify`` and by
the tests. Checks, in order, per format and batch size: output names, output shapes, values; then argmax
agreement with the eager model on the whole test set. All failures are gathered before raising.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from export.formats import OUTPUT_NAME, Runner

log = logging.getLogger(__name__)

# Float formats must agree with eager PyTorch to float32 round-off: |a - b| <= ATOL + RTOL * |b|, elementwise
# on the log-probabilities. Measured differences are around 1e-6 (ONNX Runtime's kernels sum in another order).
ATOL = 1e-5
RTOL = 1e-4
# The service batches adaptively, so one size is not enough: 1, small odd, and the largest batch it forms.
BATCH_SIZES = (1, 2, 7, 64, 512)
# Quantized models are judged by accuracy, not allclose: at most this many points below the float model.
INT8_MAX_ACCURACY_DROP = 0.3
FULL_PASS_BATCH = 500


class VerificationError(Exception):
    """One or more formats differ from the eager model; ``failures`` lists each, ``report`` the numbers."""

    def __init__(self, failures: list[str], report: dict):
        self.failures = failures
        self.report = report
        super().__init__("verification failed: " + "; ".join(failures))


@dataclass
class FormatResult:
    max_abs_diff: float = 0.0
    worst_batch: int | None = None
    per_batch: dict[int, float] = field(default_factory=dict)
    argmax_agreement: float | None = None
    test_accuracy: float | None = None

    def to_dict(self) -> dict:
        return {
            "max_abs_diff": self.max_abs_diff,
            "worst_batch": self.worst_batch,
            "per_batch_max_abs_diff": {str(k): v for k, v in self.per_batch.items()},
            "argmax_agreement": self.argmax_agreement,
            "test_accuracy": self.test_accuracy,
        }


def _predict(run, x: np.ndarray) -> np.ndarray:
    return np.concatenate([run(x[i : i + FULL_PASS_BATCH]) for i in range(0, len(x), FULL_PASS_BATCH)])


def check_batch(
    run: Runner, names: list[str], x: np.ndarray, expected: np.ndarray, exact: bool
) -> tuple[float, str | None]:
    """Names, then shape, then values for one batch. Returns (max abs diff, failure or None)."""
    if names != [OUTPUT_NAME]:
        return float("nan"), f"outputs are named {names}, expected [{OUTPUT_NAME!r}]"
    out = run(x)
    if out.shape != expected.shape:
        return float("nan"), f"output shape {out.shape}, expected {expected.shape}"
    diff = float(np.max(np.abs(out.astype(np.float64) - expected)))
    if exact and not np.allclose(out, expected, rtol=RTOL, atol=ATOL):
        return diff, f"max abs diff {diff:.3g} exceeds atol {ATOL:g} + rtol {RTOL:g}"
    return diff, None


def verify(
    model: torch.nn.Module,
    runners: dict[str, tuple[Runner, list[str]]],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
) -> dict:
    """Check each runner against ``model`` on normalized inputs ``x`` (labels ``y``); raise if any differ.

    Formats whose name ends in ``-int8`` are checked on names, shapes and accuracy (at most
    ``INT8_MAX_ACCURACY_DROP`` points below eager) instead of allclose.
    """
    model = model.eval()
    xs = x.cpu().numpy().astype(np.float32)
    labels = y.cpu().numpy()
    with torch.no_grad():
        expected = _predict(lambda a: model(torch.from_numpy(a)).numpy(), xs).astype(np.float64)
    eager_pred = expected.argmax(axis=1)
    eager_accuracy = float((eager_pred == labels).mean())
    failures: list[str] = []
    results: dict[str, FormatResult] = {}
    for fmt, (run, names) in tqdm(runners.items(), desc="verifying", unit="format", leave=False, disable=None):
        exact = not fmt.endswith("-int8")
        result = results[fmt] = FormatResult()
        for b in batch_sizes:
            diff, failure = check_batch(run, names, xs[:b], expected[:b], exact)
            result.per_batch[b] = diff
            if not diff <= result.max_abs_diff:  # also catches a NaN difference
                result.max_abs_diff, result.worst_batch = diff, b
            if failure:
                failures.append(f"{fmt} at batch size {b}: {failure}")
        if any(f.startswith(f"{fmt} ") for f in failures):
            continue
        pred = _predict(run, xs).argmax(axis=1)
        result.argmax_agreement = float((pred == eager_pred).mean())
        result.test_accuracy = float((pred == labels).mean())
        if exact and result.argmax_agreement < 1.0:
            disagree = int((pred != eager_pred).sum())
            failures.append(f"{fmt}: argmax differs from eager on {disagree} of {len(xs)} test images")
        if not exact and 100 * (eager_accuracy - result.test_accuracy) > INT8_MAX_ACCURACY_DROP:
            failures.append(
                f"{fmt}: test accuracy {100 * result.test_accuracy:.2f}% is more than "
                f"{INT8_MAX_ACCURACY_DROP} points below eager {100 * eager_accuracy:.2f}%"
            )
        log.info(
            "%s: max abs diff %.3g (batch %s), argmax agreement %.4f, test accuracy %.2f%%",
            fmt,
            result.max_abs_diff,
            result.worst_batch,
            result.argmax_agreement,
            100 * result.test_accuracy,
        )
    report = {
        "passed": not failures,
        "atol": ATOL,
        "rtol": RTOL,
        "int8_max_accuracy_drop_points": INT8_MAX_ACCURACY_DROP,
        "batch_sizes": list(batch_sizes),
        "test_images": len(xs),
        "eager_test_accuracy": eager_accuracy,
        "formats": {fmt: r.to_dict() for fmt, r in results.items()},
    }
    if failures:
        raise VerificationError(failures, report)
    return report
