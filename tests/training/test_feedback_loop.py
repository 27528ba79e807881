"""The loop closed for real (issue 20, "Back into training"): serve the book's model, send it 300 digits of a shifted
style (export/samples/shifted.py), label each through ``POST /feedback``, retrain from the store with
``python -m training --feedback``, export, serve the new model, and compare the two servers on held-out digits of
that style and the new one on the MNIST test set."""

import contextlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from export.samples import shifted
from service.feedback.store import open_store
from tests.conftest import REPO
from tests.service.conftest import serve
from training.data import Normalization, load_mnist, to_model_input

pytestmark = pytest.mark.slow

FEEDBACK_IMAGES = 300
HELD_OUT_IMAGES = 1000
FEEDBACK_SEED, HELD_OUT_SEED = 20_000, 20_001  # apart from the golden set's and the detector's seeds
TRAIN_IMAGES = 55_000  # the digits the models train on (the rest of the training set is held out for calibration)
TARGET_GAIN = 0.03  # the issue's: at least 3 points better on the held-out style
MNIST_TARGET = 0.983  # and at least 98.3% on the MNIST test set
CLIENTS = 8


def predict(url: str, files: list[bytes]) -> list[tuple[int, str]]:
    """Each file in its own ``/predict`` request, as users send them: (digit, the answer's X-Request-ID)."""

    def one(data: bytes) -> tuple[int, str]:
        resp = httpx.post(url + "/predict", files=[("images", ("digit.jpg", data, "image/jpeg"))], timeout=60)
        assert resp.status_code == 200, resp.text
        return resp.json()[0]["digit"], resp.headers["x-request-id"]

    with ThreadPoolExecutor(CLIENTS) as pool:
        return list(pool.map(one, files))


def accuracy(url: str, files: list[bytes], labels: np.ndarray) -> float:
    return float(np.mean([digit for digit, _ in predict(url, files)] == labels))


def mnist_test_accuracy(url: str, images, labels) -> float:
    """The served network (v2 ``mnist-convnet``: the model file itself, on normalized inputs) on all 10,000 digits."""
    x = to_model_input(images, Normalization()).numpy()
    batches = [x[i : i + 64] for i in range(0, len(x), 64)]

    def infer(batch: np.ndarray) -> np.ndarray:
        body = {
            "inputs": [
                {"name": "images", "datatype": "FP32", "shape": list(batch.shape), "data": batch.ravel().tolist()}
            ]
        }
        resp = httpx.post(url + "/v2/models/mnist-convnet/infer", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        (out,) = resp.json()["outputs"]
        return np.asarray(out["data"]).reshape(out["shape"]).argmax(axis=1)

    with ThreadPoolExecutor(CLIENTS) as pool:
        predicted = np.concatenate(list(pool.map(infer, batches)))
    return float(np.mean(predicted == labels.numpy()))


def run(args: list[str], **env) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, f"{' '.join(args[:2])} exited with {proc.returncode}:\n{proc.stderr[-3000:]}"


def test_labelled_feedback_makes_a_better_model(book_export, data_dir, tmp_path):
    train_u8, train_labels = load_mnist(data_dir, train=True)
    test_u8, test_labels = load_mnist(data_dir, train=False)
    # the 300 users' digits are training-set writers in the new style; the held-out ones are test-set digits no
    # model has seen in any style
    sent, sent_labels = shifted.dataset(
        train_u8[:TRAIN_IMAGES].numpy(), train_labels[:TRAIN_IMAGES].numpy(), FEEDBACK_IMAGES, FEEDBACK_SEED
    )
    held_out, held_out_labels = shifted.dataset(test_u8.numpy(), test_labels.numpy(), HELD_OUT_IMAGES, HELD_OUT_SEED)
    db = tmp_path / "feedback.sqlite3"

    with serve(tmp_path, MNIST_WORKERS=1, MNIST_FEEDBACK_IMAGES=1, MNIST_FEEDBACK_DB=db) as old:
        answers = predict(old.url, sent)
        for (_, request_id), label in zip(answers, sent_labels, strict=True):
            resp = httpx.post(old.url + "/feedback", json={"request_id": request_id, "digit": int(label)}, timeout=30)
            assert resp.status_code in (200, 201), resp.text
        old_accuracy = accuracy(old.url, held_out, held_out_labels)
        old_on_sent = float(np.mean([d for d, _ in answers] == sent_labels))

    with contextlib.closing(open_store(str(db))) as store:
        stored = store.labelled_images()
    assert len(stored.ids) == FEEDBACK_IMAGES and stored.labels.tolist() == sent_labels.tolist()

    # the new model goes to a model store of its own: the session's keeps the book's model as its latest
    home = tmp_path / "new-home"
    run(["training", "--feedback", str(db), "--out", str(tmp_path / "run"), "--device", "cpu", "-q"])
    run(
        [
            "export",
            "-q",
            "build",
            "--checkpoint",
            str(tmp_path / "run" / "convnet.pt"),
            "--out",
            str(tmp_path / "export"),
            "--no-int8",
        ],
        BENTOML_HOME=str(home),
    )
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["feedback"] == {
        "store": str(db),
        **stored.describe(),
        "weight": manifest["feedback"]["weight"],
        "copies_per_epoch": manifest["feedback"]["copies_per_epoch"],
    }

    with serve(tmp_path, MNIST_WORKERS=1, BENTOML_HOME=home) as new:
        new_accuracy = accuracy(new.url, held_out, held_out_labels)
        new_mnist = mnist_test_accuracy(new.url, test_u8, test_labels)
        assert httpx.get(new.url + "/model_info").json()["test_accuracy"] == pytest.approx(new_mnist, abs=1e-4)

    summary = (
        f"held-out style: old {old_accuracy:.1%}, new {new_accuracy:.1%}; the 300 sent, as answered: "
        f"{old_on_sent:.1%}; new model on the MNIST test set {new_mnist:.2%}"
    )
    print(summary)  # shown with pytest -rP
    assert new_accuracy >= old_accuracy + TARGET_GAIN, summary
    assert new_mnist >= MNIST_TARGET, summary
