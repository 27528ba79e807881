"""Recording the drift reference (service/observe/drift.py): the MNIST test set through the service's own
preprocessing, then the verified eager model and the detector, at the manifest's temperature and threshold; each
quantity's histogram on bins fixed here, and per window size a threshold per quantity, bootstrapped from random
windows of the test set. The manifest's ``drift`` section."""

from __future__ import annotations

import logging

import numpy as np
import torch

from service.inputs.stats import input_stats
from service.model.calibration import probabilities
from service.observe.drift import METHOD, QUANTITIES, js_divergence

log = logging.getLogger(__name__)

WINDOWS = (100, 200, 400)  # the window sizes thresholds are bootstrapped for: MNIST_DRIFT_WINDOW is one of them
BOOTSTRAP_WINDOWS = 10_000  # random windows per size
QUANTILE = 1.0  # of the test set's own window scores: the highest (a served window slides over many windows) ...
MARGIN = 1.25  # ... times this is the threshold: a window of test digits passes it about never
MIN_THRESHOLD = 1e-3  # bits: a floor, for a quantity the test set never varies in (every window scores 0)
SEED = 4_000_000  # apart from the golden set's and the detector's randomness
# Confidence (at the manifest's temperature) on fixed bins: a well-trained model is above 0.99 on most test digits,
# so the bins are fine near 1, where a shift first shows.
CONFIDENCE_EDGES = (0.5, 0.7, 0.9, 0.97, 0.99, 0.997, 0.999)
DECILES = tuple(np.linspace(0.1, 0.9, 9))  # the input statistics: bins of a tenth of the test set each
CHUNK = 64  # images per call of the service's preprocessing: its request limit


def reference_values(test_u8: np.ndarray, model, detector, norm, temperature: float | None, threshold: float):
    """Each test image's value of every quantity, [N, len(QUANTITIES)], as the service computes them."""
    from service.config import ServiceConfig
    from service.engine.messages import InputKind
    from service.engine.work import model_input

    limits = ServiceConfig()
    xs, seen = [], []
    for i in range(0, len(test_u8), CHUNK):
        x, images, _ = model_input(
            InputKind.PIXELS, test_u8[i : i + CHUNK].astype(np.float32) / 255, limits, norm.mean, norm.std
        )
        xs.append(x)
        seen.append(images)
    x = torch.from_numpy(np.concatenate(xs))
    with torch.no_grad():
        log_probs = torch.cat([model.eval()(b) for b in x.split(1000)]).double().numpy()
        scores = torch.cat([detector.eval()(b) for b in x.split(1000)]).double().numpy()
    probs = probabilities(log_probs, temperature)
    digits = probs.argmax(axis=1)
    confidence = probs[np.arange(len(probs)), digits]
    not_a_digit = (scores < threshold).astype(np.float64)
    stats = input_stats(np.concatenate(seen)).astype(np.float64)
    return np.column_stack([digits, confidence, not_a_digit, stats])


def bin_edges(name: str, column: np.ndarray) -> list[float]:
    """The fixed bins of a quantity: bin i holds edges[i-1] <= value < edges[i] (service/observe/drift.py)."""
    if name == "digit":
        return [d + 0.5 for d in range(9)]
    if name == "not_a_digit":
        return [0.5]
    if name == "confidence":
        return list(CONFIDENCE_EDGES)
    return sorted({round(float(v), 4) for v in np.quantile(column, DECILES)})


def bootstrap(bins: np.ndarray, sizes: list[int], references: list[np.ndarray], window: int, rng) -> np.ndarray:
    """The score of every quantity for ``BOOTSTRAP_WINDOWS`` windows of ``window`` test images drawn with
    replacement (traffic as independent draws from the test set): [windows, quantities]."""
    picks = rng.integers(0, len(bins), size=(BOOTSTRAP_WINDOWS, window))
    rows = np.arange(BOOTSTRAP_WINDOWS)[:, None]
    out = np.empty((BOOTSTRAP_WINDOWS, len(sizes)))
    for k, (size, q) in enumerate(zip(sizes, references, strict=True)):
        flat = (rows * size + bins[picks, k]).ravel()
        counts = np.bincount(flat, minlength=BOOTSTRAP_WINDOWS * size).reshape(BOOTSTRAP_WINDOWS, size)
        out[:, k] = js_divergence(counts, q)
    return out


def record(test_u8: np.ndarray, model, detector, norm, temperature: float | None, threshold: float) -> dict:
    """The manifest's drift section."""
    values = reference_values(test_u8, model, detector, norm, temperature, threshold)
    quantities, bins, sizes, refs = {}, [], [], []
    for k, name in enumerate(QUANTITIES):
        edges = bin_edges(name, values[:, k])
        b = np.searchsorted(edges, values[:, k], side="right")  # as bisect_right in the service
        q = np.bincount(b, minlength=len(edges) + 1) / len(b)
        quantities[name] = {"edges": edges, "reference": [round(float(v), 6) for v in q]}
        bins.append(b)
        sizes.append(len(edges) + 1)
        refs.append(np.asarray(quantities[name]["reference"]))  # the rounded shares the service will use
    bins = np.stack(bins, axis=1)
    rng = np.random.default_rng(SEED)
    thresholds, null = {}, {}
    for window in WINDOWS:
        scores = bootstrap(bins, sizes, refs, window, rng)
        high = np.quantile(scores, QUANTILE, axis=0)  # the service's window slides: its score is tried again
        # with every image, so the threshold sits above the worst of many windows, not a percentile of one
        null[str(window)] = {n: round(float(v), 6) for n, v in zip(QUANTITIES, high, strict=True)}
        thresholds[str(window)] = {
            n: round(max(MIN_THRESHOLD, float(MARGIN * v)), 6) for n, v in zip(QUANTITIES, high, strict=True)
        }
    log.info("drift: reference on %d test images; thresholds for windows of %s", len(values), ", ".join(thresholds))
    return {
        "method": METHOD,
        "units": "bits",
        "reason": "Jensen-Shannon: bounded (0..1 bit) and symmetric, and a bin empty on either side adds a finite "
        "amount, so no made-up epsilon decides a score (PSI's ln(p/q) is infinite for an empty bin)",
        "reference": f"the MNIST test set ({len(values)} images) through the service's preprocessing, the eager "
        "model at the manifest's temperature and the detector at its threshold",
        "quantities": quantities,
        "thresholds": thresholds,
        "bootstrap": {
            "windows": BOOTSTRAP_WINDOWS,
            "sampling": "windows of test images drawn with replacement",
            "quantile": QUANTILE,
            "margin": MARGIN,
            "floor": MIN_THRESHOLD,
            "seed": SEED,
            "quantile_scores": null,
        },
    }
