"""Not a digit, through a real `bentoml serve` of the book's export: the detector's verdict in every way in, and the
metric that counts it (the detector itself: tests/export/test_detector.py)."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from export.detector import EVAL_SEED_BASE
from export.samples import nondigits, realistic
from tests.conftest import BOOK_IMAGE

pytestmark = pytest.mark.slow
SEED = EVAL_SEED_BASE + 500_000  # neither the detector's training nor its report drew these


def predict(server: str, files: list[bytes]) -> list[dict]:
    answer = httpx.post(server + "/predict", files=[("images", (f"{i}.png", f)) for i, f in enumerate(files)])
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_digits_look_like_digits_and_non_digits_do_not(server, mnist_test):
    images, labels = mnist_test
    digits = [realistic.make(kind, images[i].numpy(), SEED + i) for i in range(10) for kind in realistic.KINDS]
    digits.append(BOOK_IMAGE.read_bytes())
    others = [nondigits.make(family, SEED + i) for i in range(8) for family in nondigits.FAMILIES]
    said_digit = [a["looks_like_digit"] for a in predict(server, digits[:40]) + predict(server, digits[40:])]
    said_other = [not a["looks_like_digit"] for a in predict(server, others)]
    assert sum(said_digit) >= 39, said_digit  # 41 digits; the export's rate on photo-style digits is about 2%
    assert sum(said_other) >= 36, said_other  # 40 non-digits; the export's rate is about 97%
    answer = predict(server, [BOOK_IMAGE.read_bytes()])[0]
    assert answer["digit"] == 2 and answer["looks_like_digit"] is True and 0 <= answer["digit_score"] <= 1


def test_predict_array_and_v2_carry_the_verdict(server, mnist_test):
    digit = mnist_test[0][0].numpy()
    board = (np.indices((28, 28)).sum(axis=0) % 2 * 255).astype(np.uint8)  # a checkerboard
    both = np.stack([digit, board])
    answers = httpx.post(server + "/predict_array", json={"images": (both / 255.0).tolist()}).json()
    assert [a["looks_like_digit"] for a in answers] == [True, False]
    body = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [2, 28, 28], "data": both.ravel().tolist()}]}
    outputs = {o["name"]: o for o in httpx.post(server + "/v2/models/mnist/infer", json=body).json()["outputs"]}
    assert outputs["looks_like_digit"]["datatype"] == "BOOL" and outputs["looks_like_digit"]["data"] == [True, False]
    scores = outputs["digit_score"]["data"]
    assert [round(s, 6) for s in scores] == [a["digit_score"] for a in answers]  # one detector, both ways in


def test_the_not_a_digit_counter_counts(server):
    def count() -> float:
        lines = httpx.get(server + "/metrics").text.splitlines()
        return sum(float(line.split()[-1]) for line in lines if line.startswith("mnist_not_a_digit_total"))

    before = count()
    buf = io.BytesIO()
    Image.new("L", (64, 64), 255).save(buf, format="PNG")  # a blank white page
    answers = predict(server, [nondigits.make("textures", SEED), nondigits.make("noise", SEED), buf.getvalue()])
    flagged = sum(not a["looks_like_digit"] for a in answers)
    assert flagged >= 2 and count() - before == flagged
