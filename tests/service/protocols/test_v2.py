"""The Open Inference Protocol against a real `bentoml serve`, through clients this project did not write:
NVIDIA's tritonclient and KServe's InferenceRESTClient; plus the protocol's errors, by hand."""

import asyncio
import json
import socket

import httpx
import numpy as np
import pytest

from tests.service.conftest import png_bytes

pytestmark = pytest.mark.slow
tritonclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the dev extra")
kserve = pytest.importorskip("kserve", reason="kserve is in the dev extra")


@pytest.fixture(scope="module")
def triton(server):
    client = tritonclient.InferenceServerClient(server.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def normalized(test_inputs):
    return test_inputs[0][:16].numpy(), test_inputs[1][:16].numpy()


@pytest.fixture(scope="module")
def in_process(book_export):
    from export.formats import load_runner

    run, _ = load_runner("onnx", book_export.out / "convnet.onnx")
    return run


def test_triton_health_and_metadata(triton, book_export):
    version = book_export.tag.split(":")[1]
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("mnist-convnet") and triton.is_model_ready("mnist", model_version=version)
    assert "binary_tensor_data" in triton.get_server_metadata()["extensions"]
    convnet = triton.get_model_metadata("mnist-convnet", model_version=version)
    manifest = book_export.manifest
    assert convnet["versions"] == [version]
    assert convnet["inputs"] == [{"name": manifest["input"]["name"], "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert convnet["outputs"] == [{"name": manifest["output"]["name"], "datatype": "FP32", "shape": [-1, 10]}]
    mnist = triton.get_model_metadata("mnist")
    assert [(t["name"], t["datatype"]) for t in mnist["outputs"]] == [
        ("digit", "INT64"),
        ("probabilities", "FP32"),
        ("looks_like_digit", "BOOL"),
        ("digit_score", "FP32"),
    ]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_triton_infer_on_the_network_equals_onnx_runtime_in_process(triton, normalized, in_process, binary):
    x, labels = normalized
    tensor = tritonclient.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    result = triton.infer(
        "mnist-convnet", [tensor], outputs=[tritonclient.InferRequestedOutput("log_probs", binary_data=binary)]
    )
    log_probs = result.as_numpy("log_probs")
    assert log_probs.shape == (16, 10) and log_probs.dtype == np.float32
    assert np.abs(log_probs - in_process(x)).max() <= 1e-5
    assert result.get_response()["model_name"] == "mnist-convnet"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_triton_infer_on_the_classifier(triton, server, mnist_test, binary):
    images, labels = mnist_test
    pixels = images[:8].numpy()
    tensor = tritonclient.InferInput("images", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    outputs = [tritonclient.InferRequestedOutput(n, binary_data=binary) for n in ("digit", "probabilities")]
    from_pixels = triton.infer("mnist", [tensor], outputs=outputs)
    assert from_pixels.as_numpy("digit").tolist() == labels[:8].tolist()
    if binary:  # image files go as BYTES, which JSON cannot carry
        files = np.array([png_bytes(img) for img in pixels], dtype=object)
        tensor = tritonclient.InferInput("images", [8], "BYTES")
        tensor.set_data_from_numpy(files, binary_data=True)
        from_files = triton.infer("mnist", [tensor])
        predicted = httpx.post(
            server + "/predict", files=[("images", (f"{i}.png", f, "image/png")) for i, f in enumerate(files)]
        ).json()
        assert from_files.as_numpy("digit").tolist() == [p["digit"] for p in predicted]
        np.testing.assert_allclose(
            from_files.as_numpy("probabilities"), [p["probabilities"] for p in predicted], atol=1e-6
        )


def test_kserve_client(server, normalized, in_process, mnist_test):
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    x, _ = normalized
    pixels = mnist_test[0][:4].numpy()

    async def scenario():
        client = InferenceRESTClient(RESTConfig(protocol="v2"))
        try:
            health = [
                await client.is_server_live(server),
                await client.is_server_ready(server),
                await client.is_model_ready(server, "mnist-convnet"),
            ]
            answers = []
            for binary in (True, False):
                tensor = InferInput("images", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x, binary_data=binary)
                request = InferRequest(model_name="mnist-convnet", infer_inputs=[tensor])
                answers.append(await client.infer(server, request, model_name="mnist-convnet"))
            tensor = InferInput("images", list(pixels.shape), "UINT8")
            tensor.set_data_from_numpy(pixels, binary_data=False)
            request = InferRequest(model_name="mnist", infer_inputs=[tensor])
            answers.append(await client.infer(server, request, model_name="mnist"))
            return health, answers
        finally:
            await client.close()

    health, (binary, as_json, classified) = asyncio.run(scenario())
    assert health == [True, True, True]
    for answer in (binary, as_json):
        assert np.abs(answer.outputs[0].as_numpy() - in_process(x)).max() <= 1e-5
    assert classified.outputs[0].as_numpy().tolist() == mnist_test[1][:4].tolist()


def _infer(server, model, payload, headers=None, path=None):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return httpx.post(f"{server}{path or f'/v2/models/{model}/infer'}", content=body, headers=headers or {})


FP32_ONE = {"name": "images", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0] * 784}


@pytest.mark.parametrize(
    "path, payload, headers, status, fragment",
    [
        ("/v2/models/lenet/infer", {"inputs": [FP32_ONE]}, None, 404, "no model 'lenet'"),
        ("/v2/models/mnist-convnet/versions/7/infer", {"inputs": [FP32_ONE]}, None, 404, "has no version ['7']"),
        ("/v2/models/mnist-convnet/infer", {"inputs": [{**FP32_ONE, "datatype": "FP64"}]}, None, 400, "must be FP32"),
        ("/v2/models/mnist-convnet/infer", {"inputs": [{**FP32_ONE, "shape": [1, 28, 28]}]}, None, 400, "shape"),
        ("/v2/models/mnist-convnet/infer", {"inputs": [{**FP32_ONE, "data": [0.0] * 783}]}, None, 400, "holds 784"),
        ("/v2/models/mnist-convnet/infer", {"inputs": [{**FP32_ONE, "name": "x"}]}, None, 400, "takes one input"),
        ("/v2/models/mnist-convnet/infer", {"inputs": [FP32_ONE], "outputs": [{"name": "y"}]}, None, 400, "no output"),
        (
            "/v2/models/mnist-convnet/infer",
            {"inputs": [{**FP32_ONE, "shape": [65, 1, 28, 28], "data": [0.0] * 784 * 65}]},
            None,
            413,
            "the limit is 64",
        ),
        ("/v2/models/mnist-convnet/infer", b"{oops", None, 400, "not valid JSON"),
        ("/v2/models/mnist-convnet/infer", {"inputs": [FP32_ONE]}, {"content-type": "text/csv"}, 415, "JSON"),
        (
            "/v2/models/mnist-convnet/infer",
            json.dumps({"inputs": [{**FP32_ONE, "data": None, "parameters": {"binary_data_size": 3136}}]}).encode()
            + b"\0" * 3000,
            {"inference-header-content-length": "x"},
            400,
            "Inference-Header-Content-Length",
        ),
        ("/v2/models/mnist/infer", {"inputs": [FP32_ONE]}, None, 400, "must be UINT8, got FP32"),
        ("/v2/models/mnist-convnet/infer", {"inputs": [{**FP32_ONE, "shape": [2**32, 2**32]}]}, None, 413, "may hold"),
        ("/v2/models/mnist-convnet/infer", {"inputs": [{**FP32_ONE, "shape": [2**64]}]}, None, 413, "may hold"),
        ("/v2/models/mnist-convnet/infer", {"inputs": [FP32_ONE], "parameters": "yes"}, None, 400, "JSON object"),
        ("/v2/models/mnist-convnet/infer", {"inputs": [{**FP32_ONE, "parameters": "x"}]}, None, 400, "JSON object"),
        (
            "/v2/models/mnist-convnet/infer",
            {"inputs": [FP32_ONE], "outputs": [{"name": "log_probs", "parameters": "binary"}]},
            None,
            400,
            "JSON object",
        ),
        (
            "/v2/models/mnist-convnet/infer",
            {"inputs": [FP32_ONE], "parameters": {"binary_data_output": "yes"}},
            None,
            400,
            "true or false",
        ),
        (
            "/v2/models/mnist-convnet/infer",
            {"inputs": [FP32_ONE], "outputs": [{"name": "log_probs"}] * 3},
            None,
            400,
            "asked for twice",
        ),
        ("/v2/models/mnist-convnet/infer", {"inputs": [{**FP32_ONE, "data": [3e38] * 784}]}, None, 400, "not finite"),
        ("/v2/models/mnist-convnet/infer", {"inputs": [{**FP32_ONE, "data": [True] * 784}]}, None, 400, "numbers"),
        ("/v2/models/mnist-convnet/infer", {"inputs": [{**FP32_ONE, "data": ["1"] * 784}]}, None, 400, "numbers"),
        (
            "/v2/models/mnist/infer",
            {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 28, 28], "data": [1.5] * 784}]},
            None,
            400,
            "integers",
        ),
        (
            "/v2/models/mnist-convnet/infer",
            {"inputs": [{**FP32_ONE, "data": [[0.0]] * 784}], "pad": [[0]] * 5000},
            None,
            400,
            "more than 4096 arrays",
        ),
        (
            "/v2/models/mnist-convnet/infer",
            {"inputs": [FP32_ONE]},
            {"inference-header-content-length": b"\xb2"},
            400,
            "Inference-Header",
        ),
        ("/v2/models/mnist/infer", {"inputs": [{**FP32_ONE, "datatype": "BYTES"}]}, None, 400, "binary tensor"),
    ],
)
def test_protocol_errors_are_clear_4xx(server, path, payload, headers, status, fragment):
    response = _infer(server, None, payload, headers, path)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]


def test_bytes_elements_past_the_shape_are_refused_at_once(server):
    raw = b"\0\0\0\0" * 1_000_000  # a million empty elements for a shape of one
    tensor = {"name": "images", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(raw)}}
    header = json.dumps({"inputs": [tensor]}).encode()
    response = _infer(server, "mnist", header + raw, {"inference-header-content-length": str(len(header))})
    assert response.status_code == 400 and "holds 1 elements; the data holds more" in response.text


@pytest.mark.parametrize("model", ["mnist-convnet", "mnist"])
@pytest.mark.parametrize("shape", [[0, 2**63], [2**62, 0, 2], [0] * 65, [0, 1 << 25]])
def test_empty_tensors_of_impossible_shapes_are_4xx(server, model, shape):
    """Zero elements, so the element count passes; numpy still cannot build the array (a 500 before)."""
    datatype = "FP32" if model == "mnist-convnet" else "UINT8"
    for tensor in (
        {"name": "images", "datatype": datatype, "shape": shape, "data": []},
        {"name": "images", "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": 0}},
    ):
        header = json.dumps({"inputs": [tensor]}).encode()
        response = _infer(server, model, header, {"inference-header-content-length": str(len(header))})
        assert response.status_code in (400, 413), (shape, response.status_code, response.text)
        assert "error" in response.json()


def test_a_bytes_tensor_of_millions_of_empty_elements_is_refused_from_its_shape(server):
    raw = b"\0\0\0\0" * 2_000_000
    tensor = {"name": "images", "datatype": "BYTES", "shape": [2_000_000], "parameters": {"binary_data_size": len(raw)}}
    header = json.dumps({"inputs": [tensor]}).encode()
    response = _infer(server, "mnist", header + raw, {"inference-header-content-length": str(len(header))})
    assert response.status_code == 413 and "the BYTES tensors of a request may hold 4096 in all" in response.text


def test_header_length_with_whitespace_and_405_with_allow(server):
    header = json.dumps({"inputs": [{**FP32_ONE, "data": None, "parameters": {"binary_data_size": 3136}}]}).encode()
    body = header + bytes(3136)
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:  # httpx will not send the spaces
        sock.sendall(
            b"POST /v2/models/mnist-convnet/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Inference-Header-Content-Length: %d \r\nContent-Length: %d\r\n\r\n%s" % (len(header), len(body), body)
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 200 ")
    wrong = httpx.post(server + "/v2/health/live")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET"


def test_binary_byte_counts_are_checked(server):
    header = json.dumps({"inputs": [{**FP32_ONE, "data": None, "parameters": {"binary_data_size": 3136}}]}).encode()
    headers = {"inference-header-content-length": str(len(header))}
    short = _infer(server, "mnist-convnet", header + b"\0" * 3000, headers)
    assert short.status_code == 400 and "binary_data_size 3136 does not fit the 3000 bytes" in short.text
    extra = _infer(server, "mnist-convnet", header + b"\0" * 3200, headers)
    assert extra.status_code == 400 and "carries 3200 bytes of binary data; its inputs declare 3136" in extra.text
    exact = _infer(server, "mnist-convnet", header + np.zeros(784, "<f4").tobytes(), headers)
    assert exact.status_code == 200 and exact.json()["model_version"] and exact.json()["outputs"][0]["shape"] == [1, 10]


def test_health_paths_answer_kserve_style(server):
    assert httpx.get(server + "/v2/health/live").json() == {"live": True}
    assert httpx.get(server + "/v2/health/ready").json() == {"ready": True}
    assert httpx.get(server + "/v2/models/mnist/ready").json() == {"name": "mnist", "ready": True}
    assert httpx.post(server + "/v2/health/live").status_code == 405
    assert httpx.get(server + "/v2/nothing").status_code == 404
