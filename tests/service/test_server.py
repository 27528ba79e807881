"""Level 3: a real `bentoml serve` process, concurrent clients, the Python client and curl."""

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from service.inputs.preprocess import image_to_mnist, normalize
from tests.conftest import BOOK_IMAGE, REPO
from tests.service.conftest import png_bytes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def expected_for(book_export):
    """What the served model must answer for a file: the same pipeline and ONNX model, in process."""
    from export.formats import load_runner

    run, _ = load_runner("onnx", book_export.out / "convnet.onnx")

    def expected(data: bytes) -> np.ndarray:
        log_probs = run(normalize(image_to_mnist(data)[None], 0.1302, 0.3069))[0]
        return np.exp(log_probs) / np.exp(log_probs).sum()

    return expected


def test_health_endpoints(server):
    for path in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(server + path).status_code == 200
    assert httpx.post(server + "/model_info").json()["runtime"] == "onnx"


def test_concurrent_clients_each_get_their_own_answer(server, mnist_test, expected_for):
    images, labels = mnist_test
    files = [png_bytes(images[i].numpy()) for i in range(96)]

    def send(i):
        with httpx.Client(timeout=60) as client:
            resp = client.post(server + "/predict", files=[("images", (f"{i}.png", files[i], "image/png"))])
        return i, resp

    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(send, range(len(files))))
    for i, resp in answers:
        assert resp.status_code == 200, resp.text
        (result,) = resp.json()
        np.testing.assert_allclose(result["probabilities"], expected_for(files[i]), atol=2e-6)
    right = sum(resp.json()[0]["digit"] == int(labels[i]) for i, resp in answers)
    assert right >= 90  # about 97% through the MNIST-style pipeline


def test_a_burst_of_connections_is_split_between_the_workers(server):
    """16 clients connect at once, then each sends a request: the two workers hold about half each (left to the
    event loop, the first worker to wake took most of them, and its work process did all the work)."""
    import socket
    from urllib.parse import urlsplit

    import psutil

    port = urlsplit(server).port
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(16)]
    try:
        for c in clients:
            c.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        for c in clients:
            assert c.recv(4096).startswith(b"HTTP/1.1 200")
        ours = {c.getsockname()[1] for c in clients}
        held: dict[int, int] = {}
        for conn in psutil.net_connections(kind="tcp"):
            if conn.pid and conn.laddr and conn.laddr.port == port and conn.raddr and conn.raddr.port in ours:
                held[conn.pid] = held.get(conn.pid, 0) + 1
    finally:
        for c in clients:
            c.close()
    assert sum(held.values()) == 16 and len(held) == 2, held
    assert all(6 <= n <= 10 for n in held.values()), held
    # and /metrics says how the requests were shared
    per_worker = re.findall(
        r'mnist_http_requests_total\{endpoint="health",status="200",worker="(\d)"\} (\S+)',
        httpx.get(server + "/metrics").text,
    )
    assert sorted(w for w, _ in per_worker) == ["1", "2"] and all(float(n) >= 6 for _, n in per_worker), per_worker


def test_metrics_show_batches_larger_than_one(server, mnist_test):
    images, _ = mnist_test
    data = png_bytes(images[0].numpy())
    with ThreadPoolExecutor(max_workers=32) as pool:
        list(
            pool.map(
                lambda _: httpx.post(server + "/predict", files=[("images", ("x.png", data, "image/png"))], timeout=60),
                range(64),
            )
        )
    text = httpx.get(server + "/metrics").text
    ones = counts = 0.0
    for line in text.splitlines():
        if line.startswith("mnist_model_batch_images_bucket") and 'le="1.0"' in line:
            ones += float(line.rsplit(" ", 1)[1])
        elif line.startswith("mnist_model_batch_images_count"):
            counts += float(line.rsplit(" ", 1)[1])
    assert counts > 0, "no batch-size metrics at all"
    assert counts > ones, "every model call held a single image"


def test_bad_input_does_not_take_the_server_down(server):
    bad = [
        dict(files=[("images", ("x.png", b"\x89PNG\r\n\x1a\n broken", "image/png"))]),
        dict(files=[("images", ("x.png", b"", "image/png"))]),
        dict(json={"images": []}),
    ]
    for kwargs in bad:
        assert 400 <= httpx.post(server + "/predict", **kwargs).status_code < 500
    resp = httpx.post(server + "/predict", files=[("images", ("b.png", BOOK_IMAGE.read_bytes(), "image/png"))])
    assert resp.status_code == 200 and resp.json()[0]["digit"] == 2


def test_python_client_cli(server, mnist_test, tmp_path):
    images, labels = mnist_test
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"digit{i}.png")
        paths[-1].write_bytes(png_bytes(images[i].numpy()))
    proc = subprocess.run(
        [sys.executable, "-m", "service.client", *map(str, paths), str(BOOK_IMAGE), "--url", server],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    digits = [int(re.search(r": (\d) \(", line).group(1)) for line in proc.stdout.splitlines()]
    assert digits == [*labels[:3].tolist(), 2]


def test_python_client_errors_are_one_line(server, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for args in ([str(tmp_path / "missing.png")], [str(tmp_path / "bad.png")]):
        proc = subprocess.run(
            [sys.executable, "-m", "service.client", *args, "--url", server],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        assert proc.returncode == 1
        assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_curl_command(server):
    proc = subprocess.run(
        ["curl", "-s", "-F", f"images=@{BOOK_IMAGE}", f"{server}/predict"], capture_output=True, text=True, timeout=60
    )
    assert '"digit":2' in proc.stdout.replace(" ", "")


def test_missing_model_is_one_line(tmp_path):
    env = {**os.environ, "MNIST_MODEL_TAG": "mnist-convnet:doesnotexist"}
    proc = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", "--port", "0"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "run `make export`" in proc.stderr.strip().splitlines()[-1]
