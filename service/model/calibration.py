"""The served probabilities: ``softmax(log_probs / T)`` at the manifest's calibration temperature (fitted at
export, export/calibration.py), and the range a temperature may take: one definition for the answers, the golden
set and the export."""

from __future__ import annotations

import numpy as np

# The export fits T in this range; a manifest's T outside it is refused (at 1e-9 every probability underflows to
# 0/0, at 1e308 every answer is 10% each)
TEMPERATURE_BOUNDS = (0.05, 20.0)


def probabilities(log_probs: np.ndarray, temperature: float | None = None) -> np.ndarray:
    """softmax(log_probs / T) in float64, T = 1 when None; rows of [N, classes]."""
    z = np.asarray(log_probs, dtype=np.float64)
    if temperature:
        z = z / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
