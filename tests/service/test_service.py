"""Level 1: the service class called directly. Level 2: HTTP through Service.to_asgi()."""

import asyncio
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import BOOK_IMAGE, REPO
from tests.service.conftest import png_bytes

pytestmark = pytest.mark.slow


# ---- level 1: the class ----------------------------------------------------------------------------------
def test_direct_call_predicts_real_digits(classifier, mnist_test):
    images, labels = mnist_test
    files = [png_bytes(img.numpy()) for img in images[:32]]
    results = asyncio.run(classifier.predict(files))  # the handler is async, as BentoML calls it
    assert len(results) == 32
    assert sum(r["digit"] == int(y) for r, y in zip(results, labels[:32])) >= 31
    arrays = asyncio.run(classifier.predict_array((images[:32].numpy() / 255.0).tolist()))  # a second event loop
    assert sum(r["digit"] == int(y) for r, y in zip(arrays, labels[:32])) >= 31
    for r in results:
        assert len(r["probabilities"]) == 10
        assert abs(sum(r["probabilities"]) - 1) < 1e-4
        assert r["confidence"] == pytest.approx(max(r["probabilities"]), abs=1e-6)


def test_model_info_comes_from_the_manifest(classifier, book_export):
    info = classifier.model_info()
    assert info["tag"] == book_export.tag
    assert info["runtime"] == "onnx" and info["device"] == "cpu"
    assert info["test_accuracy"] == pytest.approx(0.9871)
    assert info["formats"]["onnx"]["sha256"] == book_export.manifest["artifacts"]["onnx"]["sha256"]
    assert classifier.__is_ready__()


def test_inputs_are_refused_with_their_status(service_module):
    from service.errors import RequestError
    from service.inputs.decode import pixels_to_mnist

    config = service_module.CONFIG
    with pytest.raises(RequestError, match=r"images\[0\]\[0\] is the number 0.0; each row") as caught:
        pixels_to_mnist([[0.0] * 28] * 28, config)  # one image, missing its outer list
    assert caught.value.status == 400 and caught.value.reason == "bad_shape"
    with pytest.raises(RequestError, match=r"images\[0\]\[0\]\[0\] is NaN"):
        pixels_to_mnist(np.full((1, 28, 28), np.nan).tolist(), config)
    with pytest.raises(RequestError, match=r"shape \[2, 28, 27\]"):
        pixels_to_mnist(np.zeros((2, 28, 27), dtype=np.float32), config)  # an in-process caller's array
    with pytest.raises(RequestError, match="limit is") as caught:
        pixels_to_mnist(np.zeros((config.max_images_per_request + 1, 28, 28)).tolist(), config)
    assert caught.value.status == 413


# ---- level 2: HTTP through to_asgi() ----------------------------------------------------------------------
def test_http_predict_multipart(http, mnist_test):
    images, labels = mnist_test
    files = [("images", (f"d{i}.png", png_bytes(images[i].numpy()), "image/png")) for i in range(5)]
    files.append(("images", ("book.jpg", BOOK_IMAGE.read_bytes(), "image/jpeg")))  # a PNG declared as JPEG
    resp = http.post("/predict", files=files)
    assert resp.status_code == 200, resp.text
    digits = [r["digit"] for r in resp.json()]
    assert digits == [*labels[:5].tolist(), 2]


def test_http_predict_array(http, mnist_test):
    images, labels = mnist_test
    resp = http.post("/predict_array", json={"images": (images[:4].numpy() / 255.0).tolist()})
    assert resp.status_code == 200, resp.text
    assert [r["digit"] for r in resp.json()] == labels[:4].tolist()


def test_http_health_and_docs(http):
    assert http.get("/readyz").status_code == 200
    assert http.get("/livez").status_code == 200
    assert "/predict" in http.get("/docs.json").json()["paths"]
    assert http.post("/model_info").json()["runtime"] == "onnx"


BIG = 2 * 28 * 28
_ROWS = ["[" + ",".join(["9" * 401] + ["0"] * 27) + "]"] + ["[" + ",".join(["0"] * 28) + "]"] * 27
HUGE_INTEGER_IMAGE = ('{"images": [[' + ",".join(_ROWS) + "]]}").encode()  # a 401-digit integer at [0][0][0]


@pytest.mark.parametrize(
    "path, kwargs, status, fragment",
    [
        ("/predict", dict(files=[("images", ("x.png", b"not an image", "image/png"))]), 400, "not an image"),
        ("/predict", dict(files=[("images", ("x.png", b"", "image/png"))]), 400, "empty"),
        ("/predict", dict(files=[("other", ("x.png", b"abc", "image/png"))]), 400, "images"),
        ("/predict", dict(json={"images": []}), 415, "multipart/form-data"),
        (  # BentoML would fetch a text part as a URL (and answer 500 when it is not one)
            "/predict",
            dict(files=[("images", ("a.png", b"abc", "image/png"))], data={"images": "http://127.0.0.1:9/x.png"}),
            400,
            "text, not a file",
        ),
        ("/predict", dict(content=b"--zz\r\n", headers={"content-type": "multipart/form-data"}), 400, "boundary"),
        ("/predict_array", dict(json={"images": [[[0.5] * 27] * 28]}), 400, "images[0][0] is a list of 27"),
        ("/predict_array", dict(json={"images": []}), 400, "no images"),
        (
            "/predict_array",
            dict(json={"images": [[[0.0] * 28] * 28, [[0.0] * 28] * 3 + [[0.0] * 7 + [2.0] + [0.0] * 20] * 25]}),
            400,
            "images[1][3][7] is 2.0; pixel intensities must be in 0..1",
        ),
        ("/predict_array", dict(json={"images": [[[-0.5] * 28] * 28]}), 400, "0..1"),
        ("/predict_array", dict(json={"images": [[[1.0000001] * 28] * 28]}), 400, "is 1.0000001; pixel intensities"),
        ("/predict_array", dict(json={"images": [[["a"] * 28] * 28]}), 400, "the string 'a'; expected a number"),
        ("/predict_array", dict(json={"images": [[[True] * 28] * 28]}), 400, "[0][0][0] is a boolean"),
        (
            "/predict_array",
            dict(json={"images": [[[0.1] * 28] * 27 + [[0.1] * 5]]}),
            400,
            "images[0][27] is a list of 5",
        ),
        (
            "/predict_array",
            dict(content=b'{"images": [[[' + b"9" * 401 + b"]]]}", headers={"content-type": "application/json"}),
            400,
            "images[0] is a list of 1",
        ),
        (
            "/predict_array",
            dict(content=HUGE_INTEGER_IMAGE, headers={"content-type": "application/json"}),
            400,
            "images[0][0][0] is an integer of 401 digits",
        ),
        (
            "/predict_array",
            dict(content=b'{"images": [[[NaN]]]}', headers={"content-type": "application/json"}),
            400,
            "shape",
        ),
        ("/predict_array", dict(content=b"{broken", headers={"content-type": "application/json"}), 400, "JSON"),
        ("/predict_array", dict(data={"images": "x"}), 415, "application/json"),
        ("/predict_array", dict(json={"images": np.zeros((65, 28, 28)).tolist()}), 413, "limit is 64"),
    ],
)
def test_http_bad_input_is_a_clear_4xx(http, path, kwargs, status, fragment):
    resp = http.post(path, **kwargs)
    assert resp.status_code == status, resp.text
    assert fragment in resp.text


def test_http_nan_values_are_rejected(http):
    body = '{"images": [[' + ",".join(["[" + ",".join(["NaN"] * 28) + "]"] * 28) + "]]}"
    resp = http.post("/predict_array", content=body.encode(), headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "NaN" in resp.text


def test_http_decompression_bomb_is_413(http):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buf, format="PNG")
    resp = http.post("/predict", files=[("images", ("bomb.png", buf.getvalue(), "image/png"))])
    assert resp.status_code == 413 and "limit" in resp.text


def test_http_chunked_body_over_the_limit_is_413(http, service_module):
    """No Content-Length to check up front: the guard counts the bytes as they arrive."""
    limit = service_module.CONFIG.max_request_bytes

    def chunks():
        yield b'--zz\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n'
        for _ in range(limit // 2**20 + 1):
            yield b"x" * 2**20
        yield b"\r\n--zz--\r\n"

    resp = http.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=zz"})
    assert resp.status_code == 413 and f"limit of {limit} bytes" in resp.text


def test_http_too_many_files_is_413(http, mnist_test):
    data = png_bytes(mnist_test[0][0].numpy())
    resp = http.post("/predict", files=[("images", (f"{i}.png", data, "image/png")) for i in range(65)])
    assert resp.status_code == 413


def test_http_upload_spooled_to_disk_is_read(http, mnist_test):
    """Starlette keeps uploads over 1 MB in a temp file rather than memory; those are read from there."""
    import io

    from PIL import Image, PngImagePlugin

    images, labels = mnist_test
    meta = PngImagePlugin.PngInfo()
    meta.add_text("padding", "x" * 1_500_000)
    buf = io.BytesIO()
    Image.fromarray(images[7].numpy(), mode="L").save(buf, format="PNG", pnginfo=meta)
    assert len(buf.getvalue()) > 1_400_000
    resp = http.post("/predict", files=[("images", ("big.png", buf.getvalue(), "image/png"))])
    assert resp.status_code == 200, resp.text
    assert resp.json()[0]["digit"] == int(labels[7])


def test_openapi_still_describes_file_uploads(http):
    """The in-memory upload path keeps BentoML's schema: a multipart list of binary files, JSON results."""
    spec = http.get("/docs.json").json()["paths"]["/predict"]["post"]
    schema = spec["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert "application/json" in spec["responses"]["200"]["content"]
    assert "images" in str(schema) and "binary" in str(http.get("/docs.json").text)


def test_batching_switch(service_module):
    """MNIST_BATCHING=0 reaches the service's config (the batcher's own tests show what it does with it)."""
    probe = "import service.service as s; print(s.MNISTClassifier.inner.settings.batching)"
    for value, expected in (("0", "False"), ("1", "True")):
        out = subprocess.run(
            [sys.executable, "-c", probe],
            env={**os.environ, "MNIST_BATCHING": value},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == expected


# ---- runtimes ---------------------------------------------------------------------------------------------
def _runtime_outputs(kind, book_export, batch):
    from service.model.runtime import load_runtime

    runtime = load_runtime(kind, book_export.out, book_export.manifest, threads=1)
    return runtime, runtime.log_probs(batch)


def test_torchscript_runtime_agrees_with_onnx(book_export, test_inputs):
    batch = test_inputs[0][:64].numpy()
    _, onnx_out = _runtime_outputs("onnx", book_export, batch)
    runtime, ts_out = _runtime_outputs("torchscript", book_export, batch)
    assert runtime.device in ("cpu", "cuda")
    np.testing.assert_allclose(ts_out, onnx_out, atol=1e-4)
    assert (ts_out.argmax(1) == onnx_out.argmax(1)).all()


@pytest.mark.gpu
def test_torchscript_runtime_on_cuda(book_export, test_inputs):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    batch = test_inputs[0][:512].numpy()
    runtime, out = _runtime_outputs("torchscript", book_export, batch)
    assert runtime.device == "cuda"
    _, cpu_out = _runtime_outputs("onnx", book_export, batch)
    assert (out.argmax(1) == cpu_out.argmax(1)).mean() >= 0.999


def test_predict_input_accepts_paths_and_bytes_as_well(classifier, mnist_test, tmp_path):
    """In-process callers can hand the API paths, bytes or open files; all reach the same batcher."""
    data = png_bytes(mnist_test[0][0].numpy())
    (tmp_path / "d.png").write_bytes(data)
    with open(tmp_path / "d.png", "rb") as opened:
        answers = asyncio.run(classifier.predict([tmp_path / "d.png", data, opened]))
    assert answers[0] == answers[1] == answers[2]
    assert answers[0]["digit"] == int(mnist_test[1][0])
