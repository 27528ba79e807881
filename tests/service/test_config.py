"""The one place every setting lives: parsing, one-line errors, and the README's table made from it."""

import dataclasses
import os
import subprocess
import sys

import pytest

from service.config import ConfigError, ServiceConfig, markdown_table
from tests.conftest import REPO


def test_defaults_and_overrides():
    config = ServiceConfig.from_env({"MNIST_MAX_IMAGES": "8", "MNIST_BODY_TIMEOUT_S": "2.5", "MNIST_BATCHING": "0"})
    assert config.max_images_per_request == 8 and config.body_timeout_s == 2.5 and config.batching is False
    assert config.runtime == "onnx" and config.max_request_bytes == 32 * 1024 * 1024
    assert ServiceConfig.from_env({"MNIST_RUNTIME": "TorchScript"}).runtime == "torchscript"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"MNIST_WORKERS": "two"}, "MNIST_WORKERS must be a whole number, got 'two'"),
        ({"MNIST_WORKERS": "0"}, "MNIST_WORKERS must be at least 1, got 0"),
        ({"MNIST_BODY_TIMEOUT_S": "soon"}, "MNIST_BODY_TIMEOUT_S must be a number, got 'soon'"),
        ({"MNIST_RUNTIME": "tensorrt"}, "MNIST_RUNTIME must be one of onnx, torchscript, got 'tensorrt'"),
        ({"MNIST_DRAIN_S": "-1"}, "MNIST_DRAIN_S must be at least 0, got -1"),
    ],
)
def test_bad_values_are_named(env, message):
    with pytest.raises(ConfigError) as caught:
        ServiceConfig.from_env(env)
    assert str(caught.value) == message


def test_every_setting_says_why_and_limits_say_their_status():
    for f in dataclasses.fields(ServiceConfig):
        assert f.metadata["env"].startswith("MNIST_") and len(f.metadata["why"]) > 10, f.name
        if f.name.startswith("max_") and f.name != "max_batch_size":
            assert f.metadata["status"] in (408, 413, 503), f.name


def test_the_readme_table_is_the_config():
    readme = (REPO / "README.md").read_text()
    assert markdown_table() in readme, "README's settings table differs: paste `python -m service.config` into it"


@pytest.mark.slow
def test_a_bad_setting_stops_the_service_with_one_line(book_export):
    proc = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", "--port", "0"],
        env={**os.environ, "MNIST_MAX_IMAGES": "lots"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: MNIST_MAX_IMAGES must be a whole number, got 'lots'"


@pytest.mark.slow
def test_a_feedback_store_that_cannot_work_stops_the_service_with_one_line(book_export, tmp_path):
    (tmp_path / "a-file").write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", "--port", "0"],
        env={**os.environ, "MNIST_FEEDBACK_DB": str(tmp_path / "a-file" / "feedback.sqlite3")},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the SQLite feedback store at ") and "MNIST_FEEDBACK=0" in last, last
