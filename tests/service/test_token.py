"""The optional API token, against a real server started with MNIST_API_TOKEN (and /metrics behind it)."""

import subprocess
import sys

import httpx
import pytest

from tests.conftest import BOOK_IMAGE, REPO
from tests.service.conftest import serve

pytestmark = pytest.mark.slow
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def guarded(book_export, tmp_path_factory):
    with serve(tmp_path_factory.mktemp("guarded"), MNIST_WORKERS=1, MNIST_API_TOKEN=TOKEN, MNIST_METRICS_PUBLIC=0) as s:
        yield s.url


IMAGE = [("images", ("b.png", BOOK_IMAGE.read_bytes(), "image/png"))]


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}])
def test_without_the_token_the_protected_endpoints_are_401(guarded, headers):
    for method, path, kwargs in (
        ("POST", "/predict", {"files": IMAGE}),
        ("POST", "/predict_array", {"json": {"images": [[[0.0] * 28] * 28]}}),
        ("GET", "/model_info", {}),
        ("POST", "/feedback", {"json": {"request_id": "abc", "digit": 1}}),
        ("GET", "/feedback/stats", {}),
        ("GET", "/metrics", {}),
    ):
        response = httpx.request(method, guarded + path, headers=headers, **kwargs)
        assert response.status_code == 401, (path, response.text)
        assert response.headers["www-authenticate"] == "Bearer" and "Authorization: Bearer" in response.json()["error"]


def test_with_the_token_everything_works_and_health_stays_open(guarded):
    auth = {"authorization": f"Bearer {TOKEN}"}
    assert httpx.post(guarded + "/predict", files=IMAGE, headers=auth).json()[0]["digit"] == 2
    assert httpx.get(guarded + "/model_info", headers=auth).json()["settings"]["MNIST_API_TOKEN"] == "set"
    assert "mnist_http_requests_total" in httpx.get(guarded + "/metrics", headers=auth).text
    for path in ("/livez", "/readyz"):
        assert httpx.get(guarded + path).status_code == 200


def test_the_python_client_takes_the_token(guarded):
    def client(*extra):
        return subprocess.run(
            [sys.executable, "-m", "service.client", str(BOOK_IMAGE), "--url", guarded, *extra],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )

    refused, accepted = client(), client("--token", TOKEN)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr and "401" in refused.stderr, refused.stderr
    assert accepted.returncode == 0 and ": 2 (" in accepted.stdout, accepted.stderr
