"""service/observe/drift.py: the Jensen-Shannon divergence, the sliding window's scores against a brute-force
recount, the window size the export bootstrapped, and the monitor inside the core (over the fake engine)."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from service.config import ServiceConfig
from service.core import Core
from service.engine.messages import InputKind
from service.observe.drift import (
    QUANTITIES,
    DriftError,
    DriftMonitor,
    Reference,
    js_divergence,
    window_problem,
)
from tests.service.fakes import MANIFEST, FakeEngine

UNIFORM4 = np.full(4, 0.25)


def section(window: int = 20) -> dict:
    """A drift section as export/drift.py writes it, with a few bins per quantity."""
    quantities = {
        "digit": {"edges": [d + 0.5 for d in range(9)], "reference": [0.1] * 10},
        "confidence": {"edges": [0.5, 0.9], "reference": [0.1, 0.2, 0.7]},
        "not_a_digit": {"edges": [0.5], "reference": [0.99, 0.01]},
        "ink": {"edges": [0.1, 0.15], "reference": [0.3, 0.4, 0.3]},
        "stroke_width": {"edges": [1.5, 2.0, 2.5], "reference": [0.25] * 4},
        "centre_x": {"edges": [13.9, 14.1], "reference": [0.3, 0.4, 0.3]},
        "centre_y": {"edges": [13.9, 14.1], "reference": [0.3, 0.4, 0.3]},
    }
    return {
        "method": "jensen-shannon",
        "quantities": quantities,
        "thresholds": {str(window): {q: 0.1 for q in QUANTITIES}, "400": {q: 0.05 for q in QUANTITIES}},
    }


class GaugeRecorder:
    def __init__(self):
        self.scores, self.thresholds = [], None

    def observe_drift(self, scores):
        self.scores.append(dict(scores))

    def observe_drift_thresholds(self, thresholds):
        self.thresholds = dict(thresholds)


def test_js_is_zero_for_the_reference_one_bit_for_disjoint_and_symmetric():
    assert js_divergence([25, 25, 25, 25], UNIFORM4) == pytest.approx(0)
    assert js_divergence([0, 0, 5, 5], [0.5, 0.5, 0, 0]) == pytest.approx(1.0)
    p, q = np.array([0.7, 0.1, 0.1, 0.1]), np.array([0.1, 0.2, 0.3, 0.4])
    assert js_divergence(p * 100, q) == pytest.approx(js_divergence(q * 100, p))


def test_an_empty_bin_on_either_side_is_finite():
    assert math.isfinite(js_divergence([10, 0, 0, 0], UNIFORM4))
    assert math.isfinite(js_divergence([5, 5, 5, 5], [1.0, 0.0, 0.0, 0.0]))
    assert 0 < js_divergence([10, 0, 0, 0], UNIFORM4) < 1


def test_many_windows_at_once():
    counts = np.array([[25, 25, 25, 25], [100, 0, 0, 0]])
    out = js_divergence(counts, UNIFORM4)
    assert (
        out.shape == (2,) and out[0] == pytest.approx(0) and out[1] == pytest.approx(js_divergence(counts[1], UNIFORM4))
    )


def monitor(window: int = 20, metrics=None) -> DriftMonitor:
    return DriftMonitor.from_manifest({"drift": section(window)}, window, metrics)


def random_values(rng, n: int) -> list[tuple]:
    return [
        (
            int(rng.integers(10)),
            rng.random(),
            float(rng.random() < 0.05),
            rng.uniform(0.05, 0.2),
            rng.uniform(1, 3),
            rng.normal(14, 0.2),
            rng.normal(14, 0.2),
        )
        for _ in range(n)
    ]


def test_no_scores_until_the_window_is_full():
    m = monitor(20)
    for values in random_values(np.random.default_rng(0), 19):
        m.observe_values(values)
    assert m.scores() is None and not m.full and m.over() == []


def test_the_scores_are_those_of_the_last_window_recounted():
    m, rng = monitor(20), np.random.default_rng(1)
    stream = random_values(rng, 57)
    for values in stream:
        m.observe_values(values)
    scores = m.scores()
    assert set(scores) == set(QUANTITIES)
    for k, ref in enumerate(m.refs):
        bins = np.searchsorted(ref.edges, [v[k] for v in stream[-20:]], side="right")
        counts = np.bincount(bins, minlength=len(ref.probabilities))
        assert scores[ref.name] == pytest.approx(js_divergence(counts, ref.probabilities), abs=1e-12), ref.name


def test_one_digit_everywhere_is_over_the_digit_threshold_only_for_digit():
    m = monitor(20)
    for _ in range(20):
        m.observe_values((3, 0.95, 0.0, 0.12, 2.2, 14.0, 14.0))
    assert "digit" in m.over()
    assert m.scores()["digit"] == pytest.approx(js_divergence([0, 0, 0, 20, 0, 0, 0, 0, 0, 0], [0.1] * 10))


def test_the_gauges_get_thresholds_at_once_and_scores_once_full():
    gauges = GaugeRecorder()
    m = monitor(20, gauges)
    assert gauges.thresholds == {q: 0.1 for q in QUANTITIES}
    values = random_values(np.random.default_rng(2), 60)
    for v in values[:19]:
        m.observe_values(v)
    assert gauges.scores == []
    m.observe_values(values[19])
    assert len(gauges.scores) == 1 and gauges.scores[0] == m.scores()
    for v in values[20:]:
        m.observe_values(v)
    assert 1 < len(gauges.scores) <= 1 + 40  # refreshed as the window slides, not necessarily on every image


def test_the_window_must_be_one_the_export_bootstrapped():
    manifest = {"drift": section(20)}
    assert window_problem(manifest, 20) is None and window_problem(manifest, 400) is None
    assert window_problem(manifest, 0) is None  # off
    assert window_problem({}, 123) is None  # an older export: nothing to check
    problem = window_problem(manifest, 100)
    assert "MNIST_DRIFT_WINDOW is 100" in problem and "20, 400" in problem
    with pytest.raises(DriftError, match="bootstrapped"):
        DriftMonitor.from_manifest(manifest, 100)
    assert DriftMonitor.from_manifest({}, 200) is None
    assert DriftMonitor.from_manifest(manifest, 0) is None


def test_the_thresholds_follow_the_window():
    assert {r.threshold for r in monitor(400).refs} == {0.05}
    assert [r.name for r in monitor(20).refs] == list(QUANTITIES)
    assert isinstance(monitor(20).refs[0], Reference)


def test_the_core_feeds_every_answered_image_to_the_monitor():
    config = ServiceConfig(drift_window=20)
    core = Core(config, {**MANIFEST, "drift": section(20)}, "mnist-convnet:x", FakeEngine(config))
    assert core.drift is not None and core.drift.window == 20
    images = np.zeros((5, 28, 28))
    images[:, 6:22, 12:15] = 1.0  # a thick 1
    for _ in range(4):
        asyncio.run(core.classify(InputKind.PIXELS, images, 5))
    assert core.drift.full
    scores = core.drift.scores()
    assert scores["ink"] > 0.3  # every image in the same bin, the reference spread over three
    assert core.drift.scores()["not_a_digit"] < 0.1


def test_a_core_without_a_drift_section_has_no_monitor():
    config = ServiceConfig()
    assert Core(config, MANIFEST, "mnist-convnet:x", FakeEngine(config)).drift is None
