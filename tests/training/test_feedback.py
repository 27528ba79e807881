"""The feedback side of training: the shifted style, the store's labelled images as extra training images, their
weighting, and the provenance a checkpoint keeps of them."""

import io
import time

import numpy as np
import pytest
import torch
from PIL import Image

from export.samples import shifted
from service.feedback.store import AnswerRow, open_store
from training.__main__ import main
from training.checkpoint import load_checkpoint
from training.feedback import FeedbackError, feedback_set, load_feedback, oversampled, with_feedback
from training.train import TrainConfig, train


def digit(seed: int = 0) -> np.ndarray:
    """A blocky 28x28 digit-like stroke, enough for the style's geometry."""
    img = np.zeros((28, 28), np.uint8)
    img[6:22, 12 + seed % 3 : 16 + seed % 3] = 255
    img[6:9, 9:19] = 255
    return img


def make_store(path, labels, images=True):
    """A real SQLite feedback store holding one answer and its label per entry of ``labels``."""
    store = open_store(str(path))
    now = time.time()
    rows = [
        AnswerRow(f"req-{i}", 0, "mnist-convnet:old", 0, True, 0.9, now, digit(i).tobytes() if images else None)
        for i in range(len(labels))
    ]
    store.record_answers(rows)
    for i, label in enumerate(labels):
        store.add_feedback(f"req-{i}", 0, label, since=now - 60)
    store.close()
    return path


def test_the_shifted_style_is_a_pure_function_of_digit_and_seed():
    first, again, other = shifted.make(digit(), 5), shifted.make(digit(), 5), shifted.make(digit(), 6)
    assert first == again and first != other
    img = Image.open(io.BytesIO(first))
    assert img.format == "JPEG" and img.mode == "RGB" and img.size == (shifted.SIDE[1], shifted.SIDE[0])
    # coloured paper: the channels differ where there is no ink
    corner = np.asarray(img)[:20, :20].reshape(-1, 3).mean(axis=0)
    assert corner.max() - corner.min() > 20


def test_the_shifted_data_set_keeps_each_file_with_its_label():
    images = np.stack([digit(i) for i in range(20)])
    labels = np.arange(20) % 10
    files, picked = shifted.dataset(images, labels, 8, seed=1)
    again, picked_again = shifted.dataset(images, labels, 8, seed=1)
    assert files == again and picked.tolist() == picked_again.tolist()
    assert len(files) == 8 and picked.dtype == np.int64
    assert shifted.dataset(images, labels, 8, seed=2)[0] != files


@pytest.mark.parametrize(("weight", "copies"), [(1, 10), (3, 30), (2.5, 25), (0.3, 3)])
def test_oversampling_repeats_each_image_weight_times(weight, copies):
    idx = oversampled(10, weight, torch.Generator().manual_seed(0))
    assert len(idx) == copies
    counts = torch.bincount(idx, minlength=10)
    assert counts.min() >= int(weight) and counts.max() <= int(weight) + 1
    assert torch.equal(idx, oversampled(10, weight, torch.Generator().manual_seed(0)))  # seeded


def test_oversampling_refuses_a_weight_that_is_not_positive():
    with pytest.raises(ValueError, match="positive"):
        oversampled(10, 0, torch.Generator())


def test_labelled_images_become_training_images_with_their_provenance(tmp_path):
    store = make_store(tmp_path / "feedback.sqlite3", ["3", "not_a_digit", "7", "1"])
    fb = load_feedback(str(store), weight=2)
    assert fb.labels.tolist() == [3, 7, 1]  # not-a-digit labels are no training digits
    assert fb.images.dtype == torch.uint8 and fb.images.shape == (3, 28, 28)
    assert torch.equal(fb.images[1], torch.from_numpy(digit(2)))
    p = fb.provenance
    assert p["store"] == str(store) and p["rows"] == 3 and p["weight"] == 2 and p["copies_per_epoch"] == 6
    assert p["first_id"] < p["last_id"] and len(p["sha256"]) == 64

    x, y = torch.zeros(5, 28, 28, dtype=torch.uint8), torch.zeros(5, dtype=torch.int64)
    x2, y2 = with_feedback(x, y, fb, torch.Generator().manual_seed(0))
    assert len(x2) == 5 + 6 and y2[5:].tolist() == [3, 7, 1, 3, 7, 1]


def test_the_hash_changes_with_the_rows(tmp_path):
    a = load_feedback(str(make_store(tmp_path / "a.sqlite3", ["3", "7"])), 1).provenance["sha256"]
    b = load_feedback(str(make_store(tmp_path / "b.sqlite3", ["3", "8"])), 1).provenance["sha256"]
    assert a != b


@pytest.mark.parametrize(
    ("labels", "images", "message"),
    [
        ([], True, "no digit-labelled images"),
        (["not_a_digit"], True, "no digit-labelled images"),
        (["4"], False, "MNIST_FEEDBACK_IMAGES=1"),
    ],
)
def test_a_store_without_labelled_images_is_an_error(tmp_path, labels, images, message):
    store = make_store(tmp_path / "feedback.sqlite3", labels, images)
    with pytest.raises(FeedbackError, match=message):
        load_feedback(str(store), 1)


def test_a_missing_store_is_an_error_and_is_not_created(tmp_path):
    with pytest.raises(FeedbackError, match="not found"):
        load_feedback(str(tmp_path / "nope.sqlite3"), 1)
    assert not (tmp_path / "nope.sqlite3").exists()


def test_a_file_that_is_not_a_store_is_an_error(tmp_path):
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(FeedbackError, match="cannot be opened"):
        load_feedback(str(junk), 1)


def test_the_provenance_never_holds_a_password():
    class Labelled:
        ids, images, labels, sha256 = [4], np.zeros((1, 28, 28), np.uint8), np.array([2]), "0" * 64

    from training.feedback import store_name

    fb = feedback_set(Labelled, store_name("postgresql://trainer:s3cret@db.internal:5432/mnist"), 1)
    assert fb.provenance["store"] == "postgresql://trainer@db.internal:5432/mnist"
    assert "s3cret" not in repr(fb.provenance)


def test_the_cli_says_in_one_line_that_the_store_is_missing(tmp_path, capsys):
    missing = tmp_path / "feedback.sqlite3"
    code = main(["--feedback", str(missing), "--out", str(tmp_path), "-q"])  # before any data is read
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: feedback store not found: {missing}\n"


def test_the_config_refuses_a_weight_that_is_not_positive():
    with pytest.raises(ValueError, match="feedback_weight"):
        TrainConfig(feedback_weight=0)


@pytest.mark.slow
def test_training_with_feedback_records_the_rows_in_the_checkpoint(tmp_path, data_dir):
    store = make_store(tmp_path / "feedback.sqlite3", ["1", "7", "4"])
    cfg = TrainConfig(
        epochs=1,
        limit=256,
        data_dir=str(data_dir),
        out=str(tmp_path / "run"),
        device="cpu",
        feedback=str(store),
        feedback_weight=4,
    )
    result = train(cfg)
    ckpt = load_checkpoint(result.checkpoint_path)
    assert result.metrics["train_samples"] == 256 + 12
    fb = ckpt.provenance["feedback"]
    assert fb == load_feedback(str(store), 4).provenance
    assert ckpt.train_config["feedback"] == str(store) and ckpt.train_config["feedback_weight"] == 4
