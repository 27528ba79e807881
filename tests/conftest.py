"""Shared, session-scoped fixtures: real MNIST, one tiny model trained in seconds, built once."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from training.data import Normalization, load_mnist, resolve_data_dir, to_model_input
from training.train import TrainConfig, TrainResult, train

REPO = Path(__file__).resolve().parent.parent


def _book_dir() -> Path:
    """The book's checkpoint and sample image: $MNIST_BOOK_DIR; else ../shared/book beside the checkout; else
    the book/ folder beside $MNIST_DATA_DIR (the shared copy's layout: shared/data and shared/book)."""
    if os.environ.get("MNIST_BOOK_DIR"):
        return Path(os.environ["MNIST_BOOK_DIR"])
    beside = REPO.parent / "shared" / "book"
    data_dir = os.environ.get("MNIST_DATA_DIR")
    if not beside.is_dir() and data_dir and (Path(data_dir).parent / "book").is_dir():
        return Path(data_dir).parent / "book"
    return beside


BOOK_DIR = _book_dir()
BOOK_CHECKPOINT = BOOK_DIR / "convnet.pth"
BOOK_IMAGE = BOOK_DIR / "digit_image.jpg"
TINY_TRAIN_IMAGES = 1024


def pytest_configure(config):
    # Every BentoML model store this suite touches lives in a temp dir, set before bentoml is imported.
    if "MNIST_TEST_BENTOML_HOME" not in os.environ:
        os.environ["MNIST_TEST_BENTOML_HOME"] = os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="bentoml-home-")


def pytest_unconfigure(config):
    home = os.environ.pop("MNIST_TEST_BENTOML_HOME", None)
    if home:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Real MNIST: $MNIST_DATA_DIR, else ./data (downloaded by torchvision if the internet is reachable)."""
    root = resolve_data_dir()
    load_mnist(root, train=False)  # fail the session loudly, with the loader's own message, if data is missing
    return root


@pytest.fixture(scope="session")
def mnist_test(data_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """The 10,000 test images (uint8) and labels."""
    return load_mnist(data_dir, train=False)


@pytest.fixture(scope="session")
def test_inputs(mnist_test) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = mnist_test
    return to_model_input(images, Normalization()), labels


@pytest.fixture(scope="session")
def tiny_run(data_dir, tmp_path_factory) -> TrainResult:
    """Two epochs on 1,024 real training images: a real checkpoint in a few seconds."""
    out = tmp_path_factory.mktemp("tiny_run")
    return train(TrainConfig(epochs=2, limit=TINY_TRAIN_IMAGES, data_dir=str(data_dir), out=str(out), device="cpu"))


@pytest.fixture(scope="session")
def book_checkpoint() -> Path:
    if not BOOK_CHECKPOINT.is_file():
        pytest.skip(f"the book's checkpoint is not at {BOOK_CHECKPOINT}")
    return BOOK_CHECKPOINT


@pytest.fixture(scope="session")
def book_export(book_checkpoint, data_dir, tmp_path_factory):
    """The book's weights exported to every format, verified, and registered in the test model store."""
    from export.build import ExportConfig, build

    out = tmp_path_factory.mktemp("book_export")
    return build(ExportConfig(checkpoint=str(book_checkpoint), out=str(out), data_dir=str(data_dir)))


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (tests/postgres.py)."""
    from tests.postgres import Postgres

    server = Postgres()
    yield server
    server.remove()
