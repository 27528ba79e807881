"""The golden set's file and its comparison (service/model/golden.py): fast, no model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from export import verify
from service.model.calibration import probabilities
from service.model.golden import ATOL, NAMES, RTOL, Golden, GoldenError, GoldenInput, compare

THRESHOLD, TEMPERATURE = 0.5, 1.2


def golden() -> Golden:
    rng = np.random.default_rng(0)
    inputs = []
    for i, name in enumerate(NAMES):
        logits = rng.normal(size=10) * 3
        lp = logits - np.log(np.exp(logits).sum())
        score = 0.1 if name.startswith("x-") else 0.9
        confidence = float(probabilities(lp[None], TEMPERATURE).max())
        inputs.append(GoldenInput(name, bytes([i]) * 5, int(lp.argmax()), lp, score, confidence, score >= THRESHOLD))
    return Golden(tuple(inputs))


def outputs(g: Golden) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([x.log_probs for x in g.inputs]), np.array([x.digit_score for x in g.inputs])


def check(g: Golden, lp, s, temperature=TEMPERATURE, threshold=THRESHOLD):
    return compare(g, lp, s, temperature, threshold)


def test_the_tolerances_are_the_verifications():
    assert (ATOL, RTOL) == (verify.ATOL, verify.RTOL)


def test_round_trip_through_json():
    g = golden()
    back = Golden.parse(g.to_json().encode())
    assert back == Golden(back.inputs) and [x.name for x in back.inputs] == list(NAMES)
    assert [x.data for x in back.inputs] == [x.data for x in g.inputs]
    np.testing.assert_array_equal(outputs(back)[0], outputs(g)[0])  # floats survive JSON exactly
    assert [x.looks_like_digit for x in back.inputs] == [x.looks_like_digit for x in g.inputs]


def test_the_same_outputs_pass_and_float32_round_off_too():
    g = golden()
    result = check(g, *outputs(g))
    assert result.problem is None and result.max_diff == 0 and result.inputs == len(NAMES)
    lp, s = outputs(g)
    assert check(g, lp.astype(np.float32), s.astype(np.float32)).problem is None


def test_a_changed_log_probability_names_the_input_and_the_difference():
    g = golden()
    lp, s = outputs(g)
    lp[1, 4] += 1e-3
    problem = check(g, lp, s).problem
    assert problem.startswith(f"{NAMES[1]}: log-probability of 4") and "difference 0.001" in problem
    assert "\n" not in problem


def test_a_changed_digit_is_named_first():
    g = golden()
    lp, s = outputs(g)
    lp[2] = lp[2][::-1].copy()
    assert check(g, lp, s).problem.startswith(f"{NAMES[2]}: answered")


def test_a_changed_score_is_caught():
    g = golden()
    lp, s = outputs(g)
    s[0] -= 0.01
    assert check(g, lp, s).problem.startswith(f"{NAMES[0]}: digit score 0.89")


@pytest.mark.parametrize("temperature", [None, 1.0, 2.0, 1e308, 1e-9])
def test_another_temperature_changes_the_confidence_and_is_caught(temperature):
    g = golden()
    problem = check(g, *outputs(g), temperature=temperature).problem
    assert problem is not None and ("confidence" in problem or "not finite" in problem), problem


@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.95, 1.0])
def test_a_threshold_that_moves_any_verdict_is_caught(threshold):
    g = golden()
    problem = check(g, *outputs(g), threshold=threshold).problem
    assert "looks_like_digit" in problem and "threshold" in problem


def test_a_non_finite_output_is_a_problem():
    g = golden()
    lp, s = outputs(g)
    lp[3, 0] = np.nan
    result = check(g, lp, s)
    assert result.problem == f"{NAMES[3]}: the model's output is not finite" and math.isinf(result.max_diff)


@pytest.mark.parametrize(
    "raw",
    [b"", b"[]", b'{"version": 9}', b'{"version": 2, "inputs": []}', b"not json", b'{"version": 2}'],
    ids=["empty", "a list", "another version", "no inputs", "not json", "no fields"],
)
def test_a_damaged_file_is_a_golden_error(raw):
    with pytest.raises(GoldenError):
        Golden.parse(raw)


def test_a_golden_set_cut_down_or_reordered_is_refused():
    doc = json.loads(golden().to_json())
    for inputs in (doc["inputs"][:1], doc["inputs"][::-1], doc["inputs"][:-1]):
        with pytest.raises(GoldenError, match="not the 44 the export records"):
            Golden.parse(json.dumps({**doc, "inputs": inputs}).encode())


def test_tolerances_in_the_file_are_not_used():
    doc = json.loads(golden().to_json())
    loose = Golden.parse(json.dumps({**doc, "atol": 1e9, "rtol": 1e9, "score_atol": 1e9}).encode())
    lp, s = outputs(loose)
    lp[0, 1] += 1e-3
    assert check(loose, lp, s).problem is not None


def test_bad_base64_is_refused():
    doc = golden().to_json().replace('"data": "', '"data": "!!', 1)
    with pytest.raises(GoldenError):
        Golden.parse(doc.encode())
