"""Honest probabilities: the expected calibration error, its reliability diagram, and temperature scaling.

Pure functions over log-probabilities [N, classes] and labels [N]; ``calibrate`` gives the manifest's
``calibration`` section. A temperature T divides the log-probabilities before the softmax.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from service.model.calibration import TEMPERATURE_BOUNDS, probabilities  # the served function, and its range

BINS = 15  # Guo et al.'s choice (2017), so the numbers compare with the literature
TEMPERATURE_DECIMALS = 4  # the manifest's T, and every number reported for it, are this rounded value
DIAGRAM = "reliability.png"


def reliability(log_probs: np.ndarray, labels: np.ndarray, bins: int = BINS, temperature: float = 1.0) -> dict:
    """Per confidence bin ((k/bins, (k+1)/bins]): how many images, their mean confidence and their accuracy."""
    probs = probabilities(log_probs, temperature)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == np.asarray(labels)
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    shown = np.maximum(counts, 1)  # empty bins report 0, and weigh nothing in the ECE
    return {
        "counts": counts,
        "confidence": np.bincount(which, weights=confidence, minlength=bins) / shown,
        "accuracy": np.bincount(which, weights=correct, minlength=bins) / shown,
    }


def expected_calibration_error(
    log_probs: np.ndarray, labels: np.ndarray, bins: int = BINS, temperature: float = 1.0
) -> float:
    """The gap between confidence and accuracy, averaged over the bins, each weighted by its share of images."""
    r = reliability(log_probs, labels, bins, temperature)
    return float(np.sum(r["counts"] * np.abs(r["accuracy"] - r["confidence"])) / r["counts"].sum())


def nll(log_probs: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    z = np.asarray(log_probs, dtype=np.float64) / temperature
    return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(z)), np.asarray(labels)]))


def fit_temperature(log_probs: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 that minimizes the mean negative log-likelihood of ``labels`` (Guo et al.'s temperature
    scaling: one scalar, so the argmax, and the accuracy, never change)."""
    result = minimize_scalar(
        lambda t: nll(log_probs, labels, t), bounds=TEMPERATURE_BOUNDS, method="bounded", options={"xatol": 1e-5}
    )
    return round(float(result.x), TEMPERATURE_DECIMALS)


def reliability_diagram(
    log_probs: np.ndarray, labels: np.ndarray, path: Path, temperature: float | None = None, bins: int = BINS
) -> Path:
    """Accuracy against confidence per bin (the diagonal is perfect calibration), before and after the
    temperature when there is one, over the number of images per bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [("raw", 1.0)] + ([(f"T = {temperature:g}", temperature)] if temperature else [])
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    width = 1 / (bins * (len(curves) + 1))  # the bars of each curve side by side within a bin
    for i, (name, t) in enumerate(curves):
        r, ece = reliability(log_probs, labels, bins, t), expected_calibration_error(log_probs, labels, bins, t)
        seen = r["counts"] > 0
        ax.plot(r["confidence"][seen], r["accuracy"][seen], "o-", color=f"C{i}", label=f"{name}: ECE {ece:.2%}")
        left = np.arange(bins)[seen] / bins + (i + 0.5) * width
        ax_n.bar(left, r["counts"][seen], width=width, align="edge", color=f"C{i}")
    ax.set(ylabel="accuracy", title=f"reliability on {len(labels):,} images, {bins} bins", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    ax_n.set(xlabel="confidence (the predicted digit's probability)", ylabel="images", yscale="log")
    for a in (ax, ax_n):
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def calibrate(
    test_log_probs: np.ndarray,
    test_labels: np.ndarray,
    heldout_log_probs: np.ndarray | None,
    heldout_labels: np.ndarray | None,
    out: Path,
    missing: str = "the checkpoint records no held-out split",
) -> dict:
    """The manifest's ``calibration`` section, with the diagram written into ``out``.

    The temperature is fitted on the held-out training images only, and applied when it lowers the ECE on
    the test set, the ECE this section reports (the issue's rule). The test set is a gate, as in
    verification: it can refuse the fitted value, never choose or tune it. The held-out ECEs are reported
    beside, not gated on: those images share their writers with the training images, the test set's do not.
    ``missing`` is the reason when there are no held-out images."""
    ece = expected_calibration_error(test_log_probs, test_labels)
    section = {
        "bins": BINS,
        "ece": ece,  # on the test set, as every ECE here but the heldout_ ones
        "temperature": None,  # the one the service applies
        "fitted_temperature": None,
        "ece_at_temperature": None,  # at the fitted temperature, applied or not
        "heldout_images": 0,
        "heldout_ece": None,
        "heldout_ece_at_temperature": None,
        "diagram": DIAGRAM,
        "reason": missing,
    }
    applied = None
    if heldout_log_probs is not None and len(heldout_log_probs):
        t = fit_temperature(heldout_log_probs, heldout_labels)
        held, held_t = (expected_calibration_error(heldout_log_probs, heldout_labels, temperature=v) for v in (1, t))
        ece_t = expected_calibration_error(test_log_probs, test_labels, temperature=t)
        section |= {"fitted_temperature": t, "ece_at_temperature": ece_t, "heldout_images": len(heldout_labels)}
        section |= {"heldout_ece": held, "heldout_ece_at_temperature": held_t}
        fitted = f"T = {t:g}, fitted on {len(heldout_labels):,} held-out training images,"
        changes = f"{ece:.2%} -> {ece_t:.2%}; held-out ECE {held:.2%} -> {held_t:.2%}"
        if ece_t < ece:
            applied = t
            section |= {"temperature": t, "reason": f"{fitted} lowers the test ECE ({changes})"}
        else:
            section["reason"] = f"{fitted} does not lower the test ECE ({changes}): not applied"
    reliability_diagram(test_log_probs, test_labels, Path(out) / DIAGRAM, applied)
    return section
