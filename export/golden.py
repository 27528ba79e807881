"""Recording the golden set (service/model/golden.py): the first MNIST test digit of each class as the files users
send (the MNIST PNG, a JPEG of it, a photo of it on paper, a screenshot), and a non-digit of each kind, each run
through the service's own preprocessing and then the verified eager model and detector; their outputs, and the
answers made from them at the manifest's temperature and threshold, are what every work process must reproduce
before it serves."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from export.samples import nondigits, realistic
from service.model.calibration import probabilities
from service.model.golden import DIGIT_FORMS, FILE, NAMES, NON_DIGITS, Golden, GoldenInput

SEED = 3_000_000  # the photos', screenshots' and non-digits' randomness: apart from the detector's sets
NON_DIGIT_TRIES = 20
NON_DIGIT_FAMILIES = dict(zip(NON_DIGITS, ("letters", "symbols", "scribbles", "textures"), strict=True))


def _encoded(form: str, digit_u8: np.ndarray, seed: int) -> bytes:
    if form == "photo.jpg":
        return realistic.make("paper_photo", digit_u8, seed)
    if form == "screenshot.png":
        return realistic.make("screenshot", digit_u8, seed)
    buf = io.BytesIO()
    fmt = "PNG" if form.endswith(".png") else "JPEG"
    Image.fromarray(digit_u8, "L").save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def files(test_u8: np.ndarray, test_labels: np.ndarray, flagged=lambda data: True) -> list[bytes]:
    """The golden set's files, in the order of ``NAMES``: for each non-digit kind the first of its seeds that
    ``flagged`` (the detector at its threshold) calls not a digit, so that a lowered threshold shows."""
    picks = [int(np.flatnonzero(test_labels == d)[0]) for d in range(10)]
    out = [_encoded(form, test_u8[i], SEED + i) for i in picks for form in DIGIT_FORMS]
    for name in NON_DIGITS:
        tries = [nondigits.make(NON_DIGIT_FAMILIES[name], SEED + k) for k in range(NON_DIGIT_TRIES)]
        out.append(next((data for data in tries if flagged(data)), tries[0]))
    return out


def record(
    test_u8: np.ndarray,
    test_labels: np.ndarray,
    model: torch.nn.Module,
    detector: torch.nn.Module,
    norm,
    temperature: float | None,
    threshold: float,
    out: Path,
) -> dict:
    """Write golden.json into ``out``; return its summary for the manifest."""
    from service.config import ServiceConfig
    from service.engine.messages import InputKind
    from service.engine.work import model_input

    def prepared(data: bytes) -> np.ndarray:
        return model_input(InputKind.ENCODED, [data], ServiceConfig(), norm.mean, norm.std)[0]

    def flagged(data: bytes) -> bool:
        with torch.no_grad():
            return float(detector.eval()(torch.from_numpy(prepared(data)))[0]) < threshold

    data = files(test_u8, test_labels, flagged)
    x = np.concatenate([prepared(f) for f in data])
    with torch.no_grad():
        log_probs = model.eval()(torch.from_numpy(x)).double().numpy()
        scores = detector.eval()(torch.from_numpy(x)).double().numpy()
    confidences = probabilities(log_probs, temperature).max(axis=1)
    inputs = tuple(
        GoldenInput(name, f, int(lp.argmax()), lp, float(s), float(c), bool(s >= threshold))
        for name, f, lp, s, c in zip(NAMES, data, log_probs, scores, confidences, strict=True)
    )
    (out / FILE).write_text(Golden(inputs).to_json())
    digits = inputs[: 10 * len(DIGIT_FORMS)]
    return {
        "inputs": len(inputs),
        "forms": list(DIGIT_FORMS),
        "non_digits": list(NON_DIGITS),
        "misclassified": [g.name for g in digits if g.digit != int(g.name[0])],
        "flagged": [g.name for g in inputs if not g.looks_like_digit],
    }
