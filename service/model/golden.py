"""The golden set: a few dozen test digits as encoded files (PNG and JPEG), with the outputs the verified model gave
them at export through the service's own preprocessing (``golden.json`` in the export folder).

A work process runs it through its whole serving path (decoding, preprocessing, normalization, the runtime, the
detector) before it reports ready and again whenever its HTTP worker asks (``MNIST_GOLDEN_CHECK_S``): a changed
Pillow, NumPy or runtime, an edited normalization or model file, shows up here as one line naming the input and the
difference, and the process is not served.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass

import numpy as np

from service.model.calibration import probabilities

FILE = "golden.json"
VERSION = 2  # 2: each input's served confidence and detector verdict, and the non-digits
# What a golden set holds, all of it: the first test digit of each class in each form, and non-digits of each kind
# (these hold the detector's threshold in place from below)
DIGIT_FORMS = ("mnist.png", "mnist.jpg", "photo.jpg", "screenshot.png")
NON_DIGITS = ("letter.png", "symbol.png", "scribble.png", "texture.png")
NAMES = tuple(f"{d}-{form}" for d in range(10) for form in DIGIT_FORMS) + tuple(f"x-{n}" for n in NON_DIGITS)
# The export's tolerances, in code, not in the file: the verification's on the log-probabilities
# (export/verify.py; a test holds the two equal), and the same absolute one on the score and the probabilities
ATOL, RTOL = 1e-5, 1e-4
SCORE_ATOL = PROBABILITY_ATOL = 1e-5


class GoldenError(Exception):
    """golden.json cannot be read as the export writes it."""


@dataclass(frozen=True)
class GoldenInput:
    name: str  # e.g. "7-photo.jpg": the digit, how it was made, the encoding
    data: bytes
    digit: int
    log_probs: np.ndarray  # [10] float64
    digit_score: float
    confidence: float  # the answer's confidence: at the manifest's temperature
    looks_like_digit: bool  # the answer's verdict: at the manifest's threshold


@dataclass(frozen=True)
class Golden:
    inputs: tuple[GoldenInput, ...]

    @classmethod
    def parse(cls, raw: bytes) -> Golden:
        try:
            doc = json.loads(raw)
            if doc["version"] != VERSION:
                raise GoldenError(f"version {doc['version']!r}, expected {VERSION}")
            inputs = tuple(
                GoldenInput(
                    str(e["name"]),
                    base64.b64decode(e["data"], validate=True),
                    int(e["digit"]),
                    np.asarray(e["log_probs"], dtype=np.float64).reshape(-1),
                    float(e["digit_score"]),
                    float(e["confidence"]),
                    bool(e["looks_like_digit"]),
                )
                for e in doc["inputs"]
            )
        except GoldenError:
            raise
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise GoldenError(f"not a golden set ({type(exc).__name__}: {str(exc)[:100]})") from None
        if tuple(g.name for g in inputs) != NAMES:
            raise GoldenError(f"its inputs are not the {len(NAMES)} the export records ({', '.join(NAMES[:3])}, ...)")
        return cls(inputs)

    def to_json(self) -> str:
        entries = [
            {
                "name": g.name,
                "digit": g.digit,
                "log_probs": [float(v) for v in g.log_probs],
                "digit_score": float(g.digit_score),
                "confidence": float(g.confidence),
                "looks_like_digit": bool(g.looks_like_digit),
                "data": base64.b64encode(g.data).decode(),
            }
            for g in self.inputs
        ]
        doc = {"version": VERSION, "atol": ATOL, "rtol": RTOL, "score_atol": SCORE_ATOL}  # the tolerances: for the
        # reader; the check uses its own
        return json.dumps({**doc, "inputs": entries}, indent=1) + "\n"


@dataclass(frozen=True)
class CheckResult:
    problem: str | None  # one line naming the input and the difference; None when every output matched
    max_diff: float  # the largest |difference| of a log-probability over the set
    inputs: int
    seconds: float = 0.0


def compare(
    golden: Golden, log_probs: np.ndarray, scores: np.ndarray, temperature: float | None, threshold: float
) -> CheckResult:
    """The outputs of the serving path for ``golden.inputs``, in order, against the recorded ones; the answers'
    confidence and verdict are made with the manifest's ``temperature`` and ``threshold``, as the core makes them."""
    worst, problem = 0.0, None
    log_probs, scores = log_probs.astype(np.float64), scores.astype(np.float64)
    if not np.isfinite(log_probs).all() or not np.isfinite(scores).all():
        i = int(np.argwhere(~np.isfinite(log_probs).all(axis=1) | ~np.isfinite(scores))[0][0])
        return CheckResult(f"{golden.inputs[i].name}: the model's output is not finite", math.inf, len(golden.inputs))
    probs = probabilities(log_probs, temperature)
    for g, got, score, row in zip(golden.inputs, log_probs, scores, probs):
        diff = np.abs(got - g.log_probs)
        worst = max(worst, float(diff.max()))
        if problem is None:
            problem = _difference(g, got, diff, float(score), float(row.max()), bool(score >= threshold))
    return CheckResult(problem, worst, len(golden.inputs))


def _difference(g: GoldenInput, got: np.ndarray, diff: np.ndarray, score: float, confidence: float, looks: bool):
    digit = int(got.argmax())
    if digit != g.digit:
        return f"{g.name}: answered {digit}, exported as {g.digit}"
    if (diff > ATOL + RTOL * np.abs(g.log_probs)).any():
        i = int(diff.argmax())
        return (
            f"{g.name}: log-probability of {i} is {got[i]:.6g}, exported as {g.log_probs[i]:.6g} "
            f"(difference {diff[i]:.3g}, tolerance {ATOL:g} + {RTOL:g} x |value|)"
        )
    if abs(score - g.digit_score) > SCORE_ATOL:
        return (
            f"{g.name}: digit score {score:.6g}, exported as {g.digit_score:.6g} "
            f"(difference {abs(score - g.digit_score):.3g}, tolerance {SCORE_ATOL:g})"
        )
    if abs(confidence - g.confidence) > PROBABILITY_ATOL:
        return f"{g.name}: confidence {confidence:.6g}, exported as {g.confidence:.6g} (the calibration temperature?)"
    if looks != g.looks_like_digit:
        return f"{g.name}: looks_like_digit {looks}, exported as {g.looks_like_digit} (the detector's threshold?)"
    return None
