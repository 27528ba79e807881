"""export/calibration.py on synthetic predictions whose calibration is known by construction, and the section
the real exports write into their manifests."""

from __future__ import annotations

import json

import numpy as np
import pytest

from export.build import MANIFEST
from export.calibration import (
    BINS,
    DIAGRAM,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    probabilities,
    reliability_diagram,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def sampled(n: int, seed: int, sharpen: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(logits), so log_softmax(logits) is calibrated by construction; the
    log-probabilities returned are those of ``sharpen * logits`` (overconfident above 1), whose best
    temperature is ``sharpen``."""
    rng = np.random.default_rng(seed)
    logits = 2.5 * rng.normal(size=(n, 10))
    cumulative = np.cumsum(np.exp(log_softmax(logits)), axis=1)
    labels = np.minimum((rng.random((n, 1)) > cumulative).sum(axis=1), 9)
    return log_softmax(sharpen * logits), labels


def test_a_perfect_predictor_has_no_calibration_error():
    labels = np.arange(200) % 10
    log_probs = np.full((200, 10), -40.0)
    log_probs[np.arange(200), labels] = 0.0
    assert expected_calibration_error(log_probs, labels) == pytest.approx(0, abs=1e-12)


def test_the_error_by_hand():
    # two images at confidence 0.9, one right and one wrong: one bin, accuracy 0.5, a gap of 0.4; and two at
    # 0.6, both right: another bin, a gap of 0.4; weighted equally: 0.4
    log_probs = np.log([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    assert expected_calibration_error(log_probs, np.array([0, 1, 0, 1])) == pytest.approx(0.4)
    # in one bin, all four right at a mean confidence of 0.75
    assert expected_calibration_error(log_probs, np.array([0, 0, 0, 1]), bins=1) == pytest.approx(0.25)


def test_an_overconfident_model_gets_a_temperature_above_one_and_a_lower_error():
    log_probs, labels = sampled(20_000, seed=0, sharpen=2.0)
    t = fit_temperature(log_probs, labels)
    assert t == pytest.approx(2.0, rel=0.05)
    before, after = (expected_calibration_error(log_probs, labels, temperature=v) for v in (1.0, t))
    assert before > 0.05 and after < before / 4


def test_a_calibrated_model_keeps_a_temperature_near_one():
    log_probs, labels = sampled(20_000, seed=1)
    assert fit_temperature(log_probs, labels) == pytest.approx(1.0, abs=0.05)
    assert expected_calibration_error(log_probs, labels) < 0.02


def test_the_temperature_divides_the_log_probabilities_and_keeps_the_argmax():
    log_probs, _ = sampled(50, seed=2)
    scaled = probabilities(log_probs, 1.7)
    expected = np.exp(log_probs / 1.7) / np.exp(log_probs / 1.7).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(scaled, expected, rtol=1e-12)
    assert (scaled.argmax(axis=1) == log_probs.argmax(axis=1)).all()


@pytest.mark.parametrize("temperature", [None, 1.5])
def test_the_diagram_is_a_png(tmp_path, temperature):
    log_probs, labels = sampled(500, seed=3, sharpen=1.5)
    path = reliability_diagram(log_probs, labels, tmp_path / DIAGRAM, temperature)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_a_temperature_that_lowers_the_test_error_is_applied(tmp_path):
    heldout, test = sampled(5_000, seed=4, sharpen=2.0), sampled(10_000, seed=5, sharpen=2.0)
    section = calibrate(*test, *heldout, tmp_path)
    assert section["temperature"] == section["fitted_temperature"] == pytest.approx(2.0, rel=0.1)
    assert section["ece_at_temperature"] < section["ece"] and section["heldout_images"] == 5_000
    assert section["heldout_ece_at_temperature"] < section["heldout_ece"]
    assert section["bins"] == BINS and "lowers the test ECE" in section["reason"]
    assert (tmp_path / section["diagram"]).read_bytes()[:8] == PNG_MAGIC
    json.dumps(section, allow_nan=False)  # the manifest is strict JSON


def test_a_temperature_that_raises_the_test_error_is_not_applied(tmp_path):
    # overconfident on the held-out images, calibrated on the test set: the fitted T would make it underconfident
    heldout, test = sampled(5_000, seed=6, sharpen=2.0), sampled(10_000, seed=7)
    section = calibrate(*test, *heldout, tmp_path)
    assert section["temperature"] is None and section["fitted_temperature"] == pytest.approx(2.0, rel=0.1)
    assert section["ece_at_temperature"] > section["ece"] and "does not lower the test ECE" in section["reason"]


def test_the_temperature_is_fitted_on_the_held_out_images_only(tmp_path):
    heldout, (test_log_probs, test_labels) = sampled(5_000, seed=8, sharpen=1.5), sampled(3_000, seed=9)
    fitted = calibrate(test_log_probs, test_labels, *heldout, tmp_path)["fitted_temperature"]
    shuffled = np.random.default_rng(0).permutation(test_labels)
    assert calibrate(test_log_probs[::-1], shuffled, *heldout, tmp_path)["fitted_temperature"] == fitted


def test_without_held_out_images_no_temperature_and_the_reason(tmp_path):
    section = calibrate(*sampled(1_000, seed=10), None, None, tmp_path, missing="no held-out split here")
    assert section["temperature"] is None and section["fitted_temperature"] is None
    assert section["reason"] == "no held-out split here" and section["heldout_images"] == 0
    assert (tmp_path / DIAGRAM).is_file() and 0 < section["ece"] < 1


@pytest.mark.slow
def test_the_books_export_reports_its_error_and_fits_no_temperature(book_export):
    section = json.loads((book_export.out / MANIFEST).read_text())["calibration"]
    assert section["temperature"] is None and "records no held-out split" in section["reason"]
    assert 0 < section["ece"] < 0.05 and section["bins"] == BINS
    assert (book_export.out / section["diagram"]).read_bytes()[:8] == PNG_MAGIC
