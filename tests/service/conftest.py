"""Service fixtures: the book's verified export in a temp model store, the service class, a real server."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

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


def big_png(side: int) -> bytes:
    """A large, cheap-to-send PNG of a 7: a few tens of KB, ``side`` x ``side`` pixels to decode."""
    img = Image.new("L", (side, side), 255)
    ImageDraw.Draw(img).line(
        [(side * 0.3, side * 0.2), (side * 0.7, side * 0.2), (side * 0.45, side * 0.85)], fill=0, width=side // 25
    )
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A real `bentoml serve` process from the project root on a free port (see ``serve``)."""

    def __init__(self, proc: subprocess.Popen, port: int, log_path):
        self.proc, self.port, self.log_path = proc, port, log_path
        self.url = f"http://127.0.0.1:{port}"

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        """Stop the server (SIGINT: at once; SIGTERM: after its drain) and return its exit code."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig) if sig != signal.SIGTERM else self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()


@contextlib.contextmanager
def serve(log_dir, **env):
    """`bentoml serve` with extra environment (MNIST_* settings), ready on a free port; stopped afterwards."""
    port = free_port()
    log_path = log_dir / f"serve-{port}.log"
    # Each server gets its own BENTOML_HOME over the session's model store: `bentoml serve` empties
    # $BENTOML_HOME/prometheus_multiproc_dir when it starts, which would wipe the metrics of a server already
    # running from the same home (and /metrics would sum the processes of every server sharing it).
    home = log_dir / f"bentoml-home-{port}"
    home.mkdir()
    (home / "models").symlink_to(Path(os.environ["BENTOML_HOME"]) / "models")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env={**os.environ, "BENTOML_HOME": str(home), **{k: str(v) for k, v in env.items()}},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    served = Served(proc, port, log_path)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"bentoml serve exited with {proc.returncode}:\n{served.log()[-3000:]}")
            try:
                if httpx.get(f"{served.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"bentoml serve not ready in 120 s:\n{served.log()[-3000:]}")
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="session")
def server(book_export, tmp_path_factory):
    """A real `bentoml serve` with two workers, shared by the session."""
    with serve(tmp_path_factory.mktemp("server"), MNIST_WORKERS=2) as served:
        yield served.url


@pytest.fixture(scope="session")
def small_server(book_export, tmp_path_factory):
    """One worker with short timeouts and small caps, so that limits can be reached quickly and every request
    lands on the same worker."""
    with serve(
        tmp_path_factory.mktemp("small_server"),
        MNIST_WORKERS=1,
        MNIST_BODY_TIMEOUT_S=2,
        MNIST_HEADER_TIMEOUT_S=2,
        MNIST_MAX_CONNECTIONS=8,
        MNIST_DRAIN_S=0,
    ) as served:
        yield served
