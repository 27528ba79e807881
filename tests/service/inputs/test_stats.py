"""service/inputs/stats.py: ink, stroke width and centre of mass, on images whose answers are known, batch or not."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from service.inputs.stats import NAMES, input_stats, stroke_width

SIDE = 28
INK, WIDTH, CX, CY = range(4)


def blank(n: int = 1) -> np.ndarray:
    return np.zeros((n, SIDE, SIDE), np.float32)


def drawn_seven(width: int) -> np.ndarray:
    img = Image.new("L", (SIDE, SIDE))
    ImageDraw.Draw(img).line([(7, 6), (20, 6), (11, 22)], fill=255, width=width)
    return np.asarray(img, np.float32)[None] / 255


def test_the_columns_and_their_type():
    out = input_stats(np.random.default_rng(0).random((3, SIDE, SIDE)))
    assert NAMES == ("ink", "stroke_width", "centre_x", "centre_y")
    assert out.shape == (3, len(NAMES)) and out.dtype == np.float32


def test_an_empty_image_has_no_ink_no_stroke_and_the_centre():
    ((ink, width, cx, cy),) = input_stats(blank())
    assert (ink, width) == (0, 0)
    assert cx == cy == (SIDE - 1) / 2


def test_ink_is_the_mean_intensity():
    images = np.random.default_rng(1).random((4, SIDE, SIDE)).astype(np.float32)
    np.testing.assert_allclose(input_stats(images)[:, INK], images.mean(axis=(1, 2)), rtol=1e-5)


def test_the_centre_of_mass_is_in_pixels_x_across_y_down():
    images = blank()
    images[0, 3, 20] = 1.0
    assert tuple(input_stats(images)[0, [CX, CY]]) == (20.0, 3.0)
    images[0, 9, 2] = 1.0  # a second pixel of the same weight: half-way
    np.testing.assert_allclose(input_stats(images)[0, [CX, CY]], [11.0, 6.0])
    images[0, 9, 2] = 3.0  # intensity weighs: 3/4 of the way
    np.testing.assert_allclose(input_stats(images)[0, [CX, CY]], [6.5, 7.5])


@pytest.mark.parametrize("w", [1, 2, 3, 5])
def test_a_bar_of_width_w_reads_about_w(w):
    images = blank()
    images[0, 4:24, 10 : 10 + w] = 1.0  # 20 long
    expected = 2 * (20 * w) / (2 * 20 + 2 * w)
    assert input_stats(images)[0, WIDTH] == pytest.approx(expected)
    assert abs(input_stats(images)[0, WIDTH] - w) <= 0.2 * w


def test_the_border_counts_as_perimeter():
    full = np.ones((1, SIDE, SIDE), bool)
    assert stroke_width(full)[0] == pytest.approx(2 * SIDE * SIDE / (4 * SIDE))


def test_faint_pixels_are_not_stroke():
    images = blank()
    images[0, 4:24, 10:14] = 0.5  # at the level, not above it
    assert input_stats(images)[0, WIDTH] == 0 and input_stats(images)[0, INK] > 0


def test_thicker_pens_read_wider_and_inkier():
    rows = np.concatenate([input_stats(drawn_seven(w)) for w in (1, 2, 3, 4, 6)])
    assert (np.diff(rows[:, WIDTH]) > 0).all(), rows[:, WIDTH]
    assert (np.diff(rows[:, INK]) > 0).all()


def test_a_batch_is_each_image_alone(mnist_test):
    images = mnist_test[0][:50].numpy().astype(np.float32) / 255
    batch = input_stats(images)
    alone = np.concatenate([input_stats(images[i : i + 1]) for i in range(len(images))])
    np.testing.assert_array_equal(batch, alone)
    assert 1.0 < np.median(batch[:, WIDTH]) < 4.0  # MNIST's pen: two to three pixels
    assert (np.abs(batch[:, [CX, CY]] - 14) < 1).all()  # MNIST centres its digits' mass at (14, 14)
