"""Drift: how far a worker's recent traffic is from the export's reference (export/drift.py), per quantity, as the
Jensen-Shannon divergence (in bits) between the histogram of the last W images answered and the histogram the
export recorded on the MNIST test set, against a threshold the export bootstrapped for that W.

Jensen-Shannon rather than PSI: it is bounded (0..1 bit) and symmetric, and a bin empty on either side adds a finite
amount, so no made-up epsilon decides the score of a bin a window has not seen (PSI's ln(p/q) is infinite there, and
a window of 200 leaves bins empty all the time). The window holds each image's bin per quantity; an answered image
moves one count in and, once the window is full, one out, and a score is a sum over the bins of a table made at
start-up: no logarithm, no pass over the window, per request.
"""

from __future__ import annotations

import bisect
import collections
import math
from dataclasses import dataclass

import numpy as np

from service.inputs.stats import NAMES as INPUT_STATS

METHOD = "jensen-shannon"
QUANTITIES = ("digit", "confidence", "not_a_digit", *INPUT_STATS)  # the per-image values, in this order
PUBLISH_EVERY = 8  # images between two updates of the score gauges (each set is a write to a shared file)


class DriftError(ValueError):
    """The drift section cannot be used with the configured window; one line, naming the fix."""


def js_divergence(counts: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Counts [..., K] (a window's histograms) against reference probabilities [K]: the Jensen-Shannon divergence
    in bits, over the last axis."""
    counts = np.asarray(counts, dtype=np.float64)
    p = counts / np.maximum(counts.sum(axis=-1, keepdims=True), 1)
    return _terms(p, np.asarray(reference, dtype=np.float64)).sum(axis=-1)


def _terms(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Each bin's share of the divergence: (p log2(p/m) + q log2(q/m)) / 2, m = (p + q) / 2, 0 log 0 = 0."""
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(p > 0, p * np.log2(p / m), 0.0)
        b = np.where(q > 0, q * np.log2(q / m), 0.0)
    return (a + b) / 2


def bin_of(edges, value: float) -> int:
    """The bin of ``value`` among K = len(edges) + 1: bin i holds edges[i-1] <= value < edges[i]."""
    return bisect.bisect_right(edges, value)


@dataclass(frozen=True)
class Reference:
    """One quantity as the export recorded it: bin edges, the test set's share in each bin, the alert threshold."""

    name: str
    edges: tuple[float, ...]
    probabilities: tuple[float, ...]
    threshold: float


def window_problem(manifest: dict, window: int) -> str | None:
    """Why the drift window cannot be ``window`` for this model, or None: a threshold holds for the window size it
    was bootstrapped at, so the window must be one of the sizes the export recorded (0 turns drift off)."""
    section = manifest.get("drift")
    if section is None or window == 0 or str(window) in section["thresholds"]:
        return None
    sizes = ", ".join(sorted(section["thresholds"], key=int))
    return (
        f"MNIST_DRIFT_WINDOW is {window}, but the model's drift thresholds were bootstrapped for windows of {sizes} "
        "images only; set one of those (or 0: no drift monitoring)"
    )


def references(section: dict, window: int) -> list[Reference]:
    """The manifest's quantities in the order of ``QUANTITIES`` (the order ``observe_values`` takes them in), with
    their thresholds for ``window``."""
    thresholds, quantities = section["thresholds"][str(window)], section["quantities"]
    return [
        Reference(name, tuple(quantities[name]["edges"]), tuple(quantities[name]["reference"]), float(thresholds[name]))
        for name in QUANTITIES
    ]


class DriftMonitor:
    """One worker's sliding window of the last ``window`` images answered, and its drift scores."""

    def __init__(self, refs: list[Reference], window: int, metrics=None):
        self.refs, self.window, self.metrics = refs, window, metrics
        self._edges = [list(r.edges) for r in refs]
        self._counts = [[0] * len(r.probabilities) for r in refs]
        # _table[k][b][c]: bin b of quantity k's share of the divergence when c of the window's images are in it
        shares = np.arange(window + 1, dtype=np.float64)[:, None] / window
        self._table = [_terms(shares, np.asarray(r.probabilities, dtype=np.float64)).T.tolist() for r in refs]
        self._bins: collections.deque[tuple[int, ...]] = collections.deque()
        self._since_publish = 0
        if metrics is not None:
            metrics.observe_drift_thresholds({r.name: r.threshold for r in refs})

    @classmethod
    def from_manifest(cls, manifest: dict, window: int, metrics=None) -> DriftMonitor | None:
        """The monitor for the manifest's drift section; None for an export without one, or with ``window`` 0."""
        if (problem := window_problem(manifest, window)) is not None:
            raise DriftError(problem)
        if manifest.get("drift") is None or window == 0:
            return None
        return cls(references(manifest["drift"], window), window, metrics)

    @property
    def full(self) -> bool:
        return len(self._bins) == self.window

    def observe(self, answer, stats: np.ndarray | None) -> None:
        """One request's answer (service/core.py ``Answer``) and the statistics of its images (service/inputs/
        stats.py, [N, 4]); a request without statistics (no images: the network's own input) is not counted."""
        if stats is None:
            return
        digits, confidences = answer.digits_and_confidences()
        looks = answer.looks_like_digit()
        for digit, confidence, looks_like, row in zip(digits, confidences, looks, stats.tolist(), strict=False):
            self.observe_values((digit, confidence, 0.0 if looks_like else 1.0, *row))

    def observe_values(self, values) -> None:
        """One image's values, in the order of ``QUANTITIES``."""
        bins = tuple(bisect.bisect_right(edges, v) for edges, v in zip(self._edges, values))
        self._bins.append(bins)
        for counts, b in zip(self._counts, bins):
            counts[b] += 1
        if len(self._bins) > self.window:
            for counts, b in zip(self._counts, self._bins.popleft()):
                counts[b] -= 1
        self._since_publish += 1
        if self.metrics is not None and self.full and self._since_publish >= PUBLISH_EVERY:
            self.publish()

    def publish(self) -> None:
        """Set the score gauges now (observe does it every ``PUBLISH_EVERY`` images)."""
        self._since_publish = 0
        scores = self.scores()
        if scores is not None and self.metrics is not None:
            self.metrics.observe_drift(scores)

    def scores(self) -> dict[str, float] | None:
        """Each quantity's divergence from its reference, in bits; None until the window is full."""
        if not self.full:
            return None
        return {
            r.name: max(0.0, math.fsum(row[c] for row, c in zip(table, counts)))
            for r, table, counts in zip(self.refs, self._table, self._counts)
        }

    def over(self) -> list[str]:
        """The quantities whose score is above its threshold now."""
        scores = self.scores() or {}
        return [r.name for r in self.refs if scores.get(r.name, 0.0) > r.threshold]
