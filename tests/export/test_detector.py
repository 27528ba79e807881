"""The not-a-digit detector as the export fits it (export/detector.py), its non-digits (export/samples/), and the
golden set it records (export/golden.py)."""

from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from export import detector
from export.samples import nondigits
from service.model.calibration import probabilities
from service.model.golden import NAMES, NON_DIGITS, Golden


def test_every_family_draws_a_decodable_png_that_depends_on_its_seed():
    for family in nondigits.FAMILIES:
        a, b = nondigits.make(family, 1), nondigits.make(family, 2)
        assert a == nondigits.make(family, 1)  # deterministic
        assert a != b
        assert Image.open(io.BytesIO(a)).format == "PNG"
    with pytest.raises(ValueError, match="unknown family"):
        nondigits.make("faces", 0)


def test_no_letter_or_shape_that_people_write_as_a_digit_is_a_non_digit():
    assert not set("OoQDIlijZzSsbGTBgq") & set(nondigits.LETTERS)
    assert not set("○●◯□■◐⊙") & set(nondigits.PICTOGRAPHS)


def test_auroc_is_the_rank_statistic():
    assert detector.auroc(np.array([0.9, 0.8]), np.array([0.1, 0.2])) == 1.0
    assert detector.auroc(np.array([0.1, 0.2]), np.array([0.9, 0.8])) == 0.0
    assert detector.auroc(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 0.5
    assert detector.auroc(np.array([0.9, 0.3]), np.array([0.5])) == 0.5


@pytest.mark.slow
def test_the_books_export_meets_the_detector_targets(book_export):
    section = book_export.manifest["detector"]
    assert section["targets_met"] is True, {k: section[k] for k in ("mnist_test_flagged", "photo_digits_flagged")}
    assert section["mnist_test_flagged"] <= detector.TARGET_DIGITS_FLAGGED
    assert section["photo_digits_flagged"] <= detector.TARGET_PHOTO_DIGITS_FLAGGED
    assert section["nondigits_flagged"] >= detector.TARGET_NONDIGITS_FLAGGED
    assert section["auroc"] > 0.99
    assert section["test_accuracy_accepted"] >= section["test_accuracy"]
    assert section["sizes"]["digits/mnist_test"] == 10_000
    assert 0 < section["threshold"] < 1


@pytest.mark.slow
def test_the_exported_detector_runs_alone_and_flags_what_the_report_says(book_export, mnist_test):
    section = book_export.manifest["detector"]
    session = ort.InferenceSession(str(book_export.out / section["file"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["digit_score"]
    norm = book_export.manifest["normalization"]
    images = mnist_test[0].numpy()[:2000].astype(np.float32) / 255.0
    scores = session.run(None, {"images": ((images - norm["mean"]) / norm["std"])[:, None]})[0]
    assert scores.shape == (2000,) and ((scores >= 0) & (scores <= 1)).all()
    assert (scores < section["threshold"]).mean() <= 0.02  # the first 2,000 of the 10,000 the report counts


@pytest.mark.slow
def test_the_golden_set_covers_every_digit_and_form(book_export):
    section = book_export.manifest["golden"]
    golden = Golden.parse((book_export.out / section["file"]).read_bytes())
    assert len(golden.inputs) == section["inputs"] == len(NAMES) == 44
    assert {Image.open(io.BytesIO(g.data)).format for g in golden.inputs} == {"PNG", "JPEG"}
    assert all(np.isfinite(g.log_probs).all() and g.log_probs.shape == (10,) for g in golden.inputs)
    verdicts = {g.name: g.looks_like_digit for g in golden.inputs}
    assert not any(verdicts[f"x-{n}"] for n in NON_DIGITS)  # the non-digits hold the threshold from below
    assert sum(verdicts[n] for n in NAMES[:40]) >= 38
    temperature = (book_export.manifest["calibration"] or {}).get("temperature")
    lp = np.stack([g.log_probs for g in golden.inputs])
    assert [g.confidence for g in golden.inputs] == pytest.approx(probabilities(lp, temperature).max(axis=1).tolist())
