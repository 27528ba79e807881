"""Service fixtures: the book's verified export in a temp model store, the service class, a real server."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO


@pytest.fixture(scope="session")
def service_module(book_export):
    """Imported only once the model is in the (temp) store: the module reads its manifest at import."""
    import service.service as module

    return module


@pytest.fixture(scope="session")
def classifier(service_module):
    """The service class instantiated directly, as `bentoml serve` does in each worker."""
    return service_module.MNISTClassifier()


@pytest.fixture(scope="session")
def http(service_module):
    """The service's ASGI app in process. One per session: each app registers BentoML's Prometheus metrics,
    and a second registration in the same process fails."""
    from starlette.testclient import TestClient

    with TestClient(service_module.MNISTClassifier.to_asgi()) as client:
        yield client


def png_bytes(image_u8: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image_u8, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(book_export, tmp_path_factory):
    """A real `bentoml serve` process from the project root on a free port, stopped after the session."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "serve.log"
    env = {**os.environ, "MNIST_WORKERS": "2", "MNIST_MAX_LATENCY_MS": "2000"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"bentoml serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"bentoml serve not ready in 120 s:\n{log_path.read_text()[-3000:]}")
    yield url
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
