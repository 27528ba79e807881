"""The core over a fake engine: the readiness rule, the models it describes, the answer's format, and what it
hands the engine."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.core import CONVNET, LIFECYCLE, PIPELINE, Answer, Call, InputKind, model_specs, not_ready
from service.errors import RequestError
from tests.service.fakes import MANIFEST, fake_log_probs, make_core


@pytest.fixture(autouse=True)
def not_draining():
    yield
    LIFECYCLE.draining = False


def test_the_readiness_rule():
    core = make_core()
    assert not_ready(core) is None and core.ready
    assert "starting" in not_ready(None)
    core.engine.ready = False
    assert "no work process" in not_ready(core) and not core.ready
    core.engine.ready = True
    LIFECYCLE.drain()
    assert "draining" in not_ready(core) and "draining" in not_ready(None)  # draining wins, whatever else


def test_models_are_described_from_the_manifest():
    specs = model_specs(MANIFEST, "onnx")
    convnet, pipeline = specs[CONVNET], specs[PIPELINE]
    assert convnet.platform == "onnxruntime_onnx" and model_specs(MANIFEST, "torchscript")[CONVNET].platform != "onnx"
    assert convnet.inputs[0].shape == (-1, 1, 28, 28) and convnet.outputs[0].shape == (-1, 10)  # "batch" -> -1
    assert pipeline.inputs[0].dtype == "bytes" and pipeline.also_accepts[0].shape == (-1, 28, 28)
    assert [o.name for o in pipeline.outputs] == ["digit", "probabilities", "looks_like_digit", "digit_score"]


def test_the_answers_format():
    log_probs = np.log(np.array([[0.1, 0.7, 0.2] + [0.0] * 7, [0.5, 0.25, 0.25] + [0.0] * 7]) + 1e-12)
    inputs = np.full((2, 28, 28), 0.12345, dtype=np.float32)
    scores = np.array([0.9, 0.2], dtype=np.float32)
    plain = Answer(log_probs, None, digit_scores=scores, threshold=0.5).predictions()
    with_inputs = Answer(log_probs, inputs, digit_scores=scores, threshold=0.5).predictions()
    assert [p["digit"] for p in plain] == [1, 0]
    assert [p["looks_like_digit"] for p in plain] == [True, False]  # the score against the export's threshold
    assert plain[0]["digit_score"] == pytest.approx(0.9) and plain[1]["digit_score"] == pytest.approx(0.2)
    assert plain[0]["confidence"] == pytest.approx(0.7) and plain[0]["probabilities"][:3] == [0.1, 0.7, 0.2]
    assert "input" not in plain[0] and with_inputs[1]["input"][0][0] == 0.123  # 3 decimals


def test_classify_hands_the_engine_one_request_with_its_id():
    core = make_core()
    answer = asyncio.run(core.classify(InputKind.PIXELS, [[[0.0] * 28] * 28], 1, True, Call("rid-1")))
    assert answer.inputs.shape == (1, 28, 28) and answer.log_probs.shape == (1, 10)
    call = core.engine.calls[-1]
    assert call == {"kind": InputKind.PIXELS, "images": 1, "want_inputs": True, "request_id": "rid-1"}
    body = ('{"images": [' + str([[0] * 28] * 28) + "]}").encode()
    asyncio.run(core.classify(InputKind.JSON, body, 0))  # a bound of 0 images (a small body) is still one
    assert core.engine.calls[-1]["images"] == 1


def test_the_engines_refusal_reaches_the_caller():
    core = make_core()
    with pytest.raises(RequestError) as refused:
        asyncio.run(core.classify(InputKind.ENCODED, [b"not an image"], 1))
    assert refused.value.status == 400 and refused.value.reason == "not_an_image"


def test_the_network_path_returns_log_probabilities():
    core = make_core()
    log_probs = asyncio.run(core.network(np.zeros((3, 1, 28, 28), dtype=np.float32)))
    assert log_probs.shape == (3, 10) and np.allclose(np.exp(log_probs).sum(axis=1), 1, atol=1e-5)


def test_model_info_and_close():
    core = make_core()
    info = core.model_info()
    assert info["served"] == {"file": "convnet.onnx", "sha256": "ab" * 32, "matches_manifest": True}
    assert info["batcher"] == {"processes": 1, "fake": True} and core.version == "v1"
    core.close()
    assert core.engine.closed


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


CALIBRATED = {**MANIFEST, "calibration": {"bins": 15, "ece": 0.0048, "temperature": 1.5, "ece_at_temperature": 0.0036}}


def test_served_probabilities_are_the_log_probabilities_over_the_temperature():
    pixels = np.random.default_rng(2).random((3, 28, 28), dtype=np.float32)
    raw, calibrated = (
        asyncio.run(make_core(manifest=m).classify(InputKind.PIXELS, pixels, 3)) for m in (MANIFEST, CALIBRATED)
    )
    np.testing.assert_array_equal(calibrated.log_probs, raw.log_probs)  # the network's output is untouched
    expected = softmax(raw.log_probs.astype(np.float64) / 1.5)
    np.testing.assert_allclose(calibrated.probabilities(), expected, rtol=1e-12)
    assert not np.allclose(raw.probabilities(), expected, rtol=1e-3)  # the temperature changes the answer
    digits, confidences = calibrated.digits_and_confidences()
    assert digits == raw.digits_and_confidences()[0]  # one scalar: the argmax never moves
    for p, e in zip(calibrated.predictions(), expected):  # what /predict and /predict_array return
        assert p["confidence"] == pytest.approx(e.max(), rel=1e-12) and p["probabilities"] == pytest.approx(e, abs=1e-6)
    assert confidences == [p["confidence"] for p in calibrated.predictions()]


def test_the_network_path_ignores_the_temperature_and_model_info_reports_it():
    core = make_core(manifest=CALIBRATED)
    x = np.random.default_rng(3).normal(size=(2, 1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(asyncio.run(core.network(x)), fake_log_probs(x))
    info = core.model_info()["calibration"]
    assert info["temperature"] == 1.5 and info["ece"] == 0.0048 and info["ece_at_temperature"] == 0.0036
    assert make_core().model_info()["calibration"]["temperature"] is None  # a manifest without the section
