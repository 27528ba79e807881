import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, TINY_TRAIN_IMAGES
from training.checkpoint import FORMAT, build_model, load_checkpoint
from training.train import CURVES_NAME, METRICS_NAME, TrainConfig, evaluate, train

pytestmark = pytest.mark.slow


def test_tiny_run_learns(tiny_run):
    # 1,024 images, two epochs: far above the 10% of chance on the whole real test set
    assert tiny_run.metrics["test_accuracy"] > 0.7
    assert tiny_run.metrics["train_samples"] == TINY_TRAIN_IMAGES
    assert tiny_run.metrics["test_samples"] == 10_000
    # the last 5,000 training images are held out, whatever the limit: the export calibrates on them
    assert load_checkpoint(tiny_run.checkpoint_path).provenance["holdout"] == {
        "split": "train",
        "start": 55_000,
        "stop": 60_000,
    }


def test_checkpoint_round_trip_with_weights_only(tiny_run, test_inputs):
    raw = torch.load(tiny_run.checkpoint_path, weights_only=True)
    assert raw["format"] == FORMAT
    assert set(raw) >= {"model_state", "model_config", "normalization", "train_config", "metrics", "provenance"}
    assert raw["normalization"] == {"mean": 0.1302, "std": 0.3069}
    assert raw["train_config"]["lr"] == 0.5 and raw["train_config"]["batch_size"] == 32
    assert len(raw["provenance"]["data_sha256"]) == 64
    assert raw["provenance"]["torch"] == torch.__version__

    ckpt = load_checkpoint(tiny_run.checkpoint_path)
    model = build_model(ckpt)
    x, y = test_inputs
    _, acc = evaluate(model, x, y)
    assert acc == pytest.approx(tiny_run.metrics["test_accuracy"], abs=1e-12)


def test_metrics_json_and_curves(tiny_run):
    out = tiny_run.checkpoint_path.parent
    metrics = json.loads((out / METRICS_NAME).read_text())
    for key in ("test_accuracy", "test_loss", "epochs", "train_samples", "train_seconds", "history"):
        assert key in metrics
    assert 0 <= metrics["test_accuracy"] <= 1
    assert len(metrics["history"]) == metrics["epochs"] == 2
    assert (out / CURVES_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_gives_identical_weights(data_dir, tmp_path):
    def run(out):
        cfg = TrainConfig(epochs=1, limit=256, seed=3, data_dir=str(data_dir), out=str(tmp_path / out), device="cpu")
        return load_checkpoint(train(cfg).checkpoint_path).model_state

    first, second = run("a"), run("b")
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize(
    "value",
    [dict(epochs=0), dict(batch_size=0), dict(lr=-1.0), dict(limit=0), dict(holdout=-1), dict(device="tpu")],
)
def test_config_rejects_bad_values(value):
    with pytest.raises(ValueError):
        TrainConfig(**value)


def cli(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "training", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=120
    )


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in last, proc.stderr


def test_cli_missing_data_folder(tmp_path):
    proc = cli("--data-dir", str(tmp_path / "none"), "--no-download", "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, "error:", str(tmp_path / "none"), "--data-dir")


def test_cli_reads_data_dir_from_environment(tmp_path):
    proc = cli("--no-download", "--out", str(tmp_path / "out"), env_extra={"MNIST_DATA_DIR": str(tmp_path / "env")})
    assert_one_line_error(proc, str(tmp_path / "env"))


def test_cli_corrupt_idx_file(data_dir, tmp_path):
    from tests.training.test_data import copy_raw
    from training.data import raw_folder

    root = copy_raw(data_dir, tmp_path)
    (raw_folder(root) / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 100)
    proc = cli("--data-dir", str(root), "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, "corrupt or truncated")
    assert not (tmp_path / "out" / "convnet.pt").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--epochs", "0"], "--epochs"),
        (["--lr", "-0.5"], "--lr"),
        (["--limit", "abc"], "--limit"),
        (["--device", "tpu"], "--device"),
        (["--batch-size", "1.5"], "--batch-size"),
        (["--holdout", "-1"], "--holdout"),
    ],
)
def test_cli_rejects_bad_flags(args, fragment):
    proc = cli(*args)
    assert_one_line_error(proc, fragment)


def test_a_holdout_of_the_whole_training_set_is_refused(data_dir, tmp_path):
    with pytest.raises(ValueError, match="leaves none of the 60000 training images"):
        train(TrainConfig(holdout=60_000, data_dir=str(data_dir), out=str(tmp_path), device="cpu"))


def test_cli_trains_and_writes_artifacts(data_dir, tmp_path):
    proc = cli("--data-dir", str(data_dir), "--limit", "128", "--epochs", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stderr
    assert {p.name for p in tmp_path.iterdir()} >= {"convnet.pt", METRICS_NAME, CURVES_NAME}
