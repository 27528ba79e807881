"""The Open Inference Protocol adapter (service/protocols/v2.py) through the front, over a Core with a fake
engine: metadata, both models' inference in JSON and binary, and what each refusal says. The same protocol
against a real server, with NVIDIA's and KServe's clients, is tests/service/protocols/test_v2.py."""

from __future__ import annotations

import asyncio
import io
import json
import struct

import numpy as np
import pytest
from PIL import Image

from service.config import ServiceConfig
from service.core import InputKind
from service.http.front import Frontend
from service.protocols import ROUTES
from tests.service.fakes import MANIFEST, fake_log_probs, make_core, run

JSON = ("content-type", "application/json")


@pytest.fixture
def app() -> Frontend:
    config = ServiceConfig()
    front = Frontend(None, ROUTES, config)
    front.core = make_core(config)
    return front


def infer(app, model: str, request: dict, binary: bytes = b"", path_tail: str = ""):
    header = json.dumps(request).encode()
    headers = [JSON] + ([("inference-header-content-length", str(len(header)))] if binary else [])
    return run(app, "POST", f"/v2/models/{model}{path_tail}/infer", header + binary, headers)


def png() -> bytes:
    image = Image.new("L", (40, 40))
    image.paste(255, (15, 5, 22, 35))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_server_metadata_and_health(app):
    server = run(app, "GET", "/v2").json()
    assert server["name"] == "mnist-serving" and server["extensions"] == ["binary_tensor_data"]
    assert run(app, "GET", "/v2/health/live").json() == {"live": True}
    assert run(app, "GET", "/v2/health/ready").json() == {"ready": True}


def test_model_metadata_from_the_core(app):
    convnet = run(app, "GET", "/v2/models/mnist-convnet").json()
    assert convnet == {
        "name": "mnist-convnet",
        "versions": ["v1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
        "outputs": [{"name": "log_probs", "datatype": "FP32", "shape": [-1, 10]}],
    }
    pipeline = run(app, "GET", "/v2/models/mnist/versions/v1").json()
    assert pipeline["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": [-1]}]
    assert [o["datatype"] for o in pipeline["outputs"]] == ["INT64", "FP32", "BOOL", "FP32"]
    assert run(app, "GET", "/v2/models/mnist/ready").json() == {"name": "mnist", "ready": True}


def test_the_network_answers_its_own_input_as_json(app):
    x = np.random.default_rng(1).normal(size=(3, 1, 28, 28)).astype(np.float32)
    request = {
        "id": "r1",
        "inputs": [{"name": "images", "datatype": "FP32", "shape": [3, 1, 28, 28], "data": x.ravel().tolist()}],
    }
    answer = infer(app, "mnist-convnet", request)
    assert answer.status == 200, answer.body
    body = answer.json()
    assert body["id"] == "r1" and body["model_name"] == "mnist-convnet" and body["model_version"] == "v1"
    (out,) = body["outputs"]
    assert out["name"] == "log_probs" and out["shape"] == [3, 10]
    np.testing.assert_allclose(np.array(out["data"]).reshape(3, 10), fake_log_probs(x), rtol=1e-6)


def test_binary_in_and_out(app):
    x = np.zeros((2, 1, 28, 28), dtype=np.float32)
    request = {
        "inputs": [
            {
                "name": "images",
                "datatype": "FP32",
                "shape": [2, 1, 28, 28],
                "parameters": {"binary_data_size": x.nbytes},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
    answer = infer(app, "mnist-convnet", request, x.tobytes())
    length = int(answer.headers["inference-header-content-length"])
    assert answer.headers["content-type"] == "application/octet-stream"
    header = json.loads(answer.body[:length])
    size = header["outputs"][0]["parameters"]["binary_data_size"]
    got = np.frombuffer(answer.body[length : length + size], dtype="<f4").reshape(2, 10)
    np.testing.assert_allclose(got, fake_log_probs(x), rtol=1e-6)


def test_the_classifier_takes_image_files_as_bytes(app):
    files = [png(), png()]
    raw = b"".join(struct.pack("<I", len(f)) + f for f in files)
    request = {
        "inputs": [{"name": "images", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "digit"}, {"name": "probabilities", "parameters": {"binary_data": False}}],
    }
    answer = infer(app, "mnist", request, raw)
    assert answer.status == 200, answer.body
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    assert outputs["digit"]["datatype"] == "INT64" and len(outputs["digit"]["data"]) == 2
    probs = np.array(outputs["probabilities"]["data"]).reshape(2, 10)
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert outputs["digit"]["data"] == probs.argmax(axis=1).tolist()


def test_the_classifier_takes_mnist_pixels_as_uint8(app):
    pixels = np.zeros((1, 28, 28), dtype=np.uint8)
    pixels[0, 5:23, 12:16] = 255
    request = {
        "inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 28, 28], "data": pixels.ravel().tolist()}],
        "outputs": [{"name": "digit"}],
    }
    answer = infer(app, "mnist", request)
    assert answer.status == 200, answer.body
    assert [o["name"] for o in answer.json()["outputs"]] == ["digit"]


def test_the_classifier_answers_at_the_manifests_temperature_the_network_does_not():
    config = ServiceConfig()
    front = Frontend(None, ROUTES, config)
    front.core = make_core(config, manifest={**MANIFEST, "calibration": {"temperature": 2.0}})
    x = np.zeros((1, 1, 28, 28), dtype=np.float32)
    network = {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0] * 784}]}
    (out,) = infer(front, "mnist-convnet", network).json()["outputs"]
    np.testing.assert_allclose(np.array(out["data"]).reshape(1, 10), fake_log_probs(x), rtol=1e-6)  # raw
    image = np.zeros((1, 28, 28), dtype=np.uint8)
    image[0, 5:23, 12:16] = 255
    pixels = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 28, 28], "data": image.ravel().tolist()}]}
    outputs = {o["name"]: o for o in infer(front, "mnist", pixels).json()["outputs"]}
    raw = asyncio.run(front.core.classify(InputKind.PIXELS, image / 255.0, 1)).log_probs.astype(np.float64)
    expected = np.exp(raw / 2.0) / np.exp(raw / 2.0).sum()
    np.testing.assert_allclose(np.array(outputs["probabilities"]["data"]), expected.ravel(), rtol=1e-6)
    assert not np.allclose(expected, np.exp(raw), rtol=1e-3)


FP32_ONE = {"name": "images", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0] * 784}


@pytest.mark.parametrize(
    "model, request_, status, fragment",
    [
        ("mnist-convnet", {"inputs": [{**FP32_ONE, "name": "x"}]}, 400, "takes one input, 'images'"),
        ("mnist-convnet", {"inputs": [FP32_ONE, FP32_ONE]}, 400, "takes one input"),
        ("mnist-convnet", {"inputs": [FP32_ONE], "outputs": [{"name": "nope"}]}, 400, "has no output 'nope'"),
        ("mnist-convnet", {"inputs": [{**FP32_ONE, "datatype": "UINT8", "data": [0] * 784}]}, 400, "must be FP32"),
        ("mnist-convnet", {"inputs": [{**FP32_ONE, "shape": [1, 784], "data": [0.0] * 784}]}, 400, "must have shape"),
        ("mnist-convnet", {"inputs": [{**FP32_ONE, "shape": [0, 1, 28, 28], "data": []}]}, 400, "holds no images"),
        (
            "mnist-convnet",
            {"inputs": [{**FP32_ONE, "shape": [65, 1, 28, 28], "data": [0.0] * 65 * 784}]},
            413,
            "the limit is 64",
        ),
        ("mnist-convnet", {"inputs": [{**FP32_ONE, "data": [3e38] * 784}]}, 400, "not finite"),
        ("mnist", {"inputs": [FP32_ONE]}, 400, "must be UINT8"),
        (
            "mnist",
            {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 28], "data": [0] * 28}]},
            400,
            "shape",
        ),
    ],
)
def test_refusals_name_what_the_model_takes(app, model, request_, status, fragment):
    answer = infer(app, model, request_)
    assert answer.status == status, answer.body
    assert fragment in answer.json()["error"]


@pytest.mark.parametrize(
    "method, path, allow",
    [
        ("PUT", "/v2/models/mnist/infer", "POST"),
        ("GET", "/v2/models/mnist/infer", "POST"),
        ("DELETE", "/v2/models/mnist", "GET"),
        ("POST", "/v2/models/mnist-convnet/ready", "GET"),
        ("PATCH", "/v2/health/live", "GET"),
        ("POST", "/v2", "GET"),
    ],
)
def test_a_405_allows_what_its_own_path_takes(app, method, path, allow):
    answer = run(app, method, path)
    assert answer.status == 405 and answer.headers["allow"] == allow
