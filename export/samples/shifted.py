"""A shifted style for the feedback loop (issue 20): MNIST digits written with a thick pen, rotated, and photographed
on coloured paper, as a user would upload them (JPEG bytes).

The style is what a deployment might meet after launch: a marker instead of a pencil, a sheet held at an angle.
Each file is a pure function of the digit and a seed, so that the end-to-end test and the README's numbers can be
reproduced; ``dataset`` picks the digits and the seeds together.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

# Paper colours (RGB, 0..1): yellow, pink, light blue, green, orange sticky notes; the pen is blue-black.
PAPERS = ((0.98, 0.93, 0.55), (0.98, 0.75, 0.82), (0.68, 0.85, 0.97), (0.72, 0.93, 0.66), (0.99, 0.78, 0.50))
PEN = (0.10, 0.12, 0.30)
MAX_ANGLE = 30  # degrees, either way
MIN_ANGLE = 5
PEN_RADIUS = (1.0, 1.6)  # the pen's radius in MNIST pixels, added to the digit's own strokes
SIDE = (240, 320)  # the photo's height and width


def _thick(digit: np.ndarray, scale: float, radius: float) -> np.ndarray:
    """The 28x28 digit (0..1) upscaled by ``scale`` with its strokes widened by a disc of ``radius`` MNIST px."""
    side = int(28 * scale)
    big = np.asarray(Image.fromarray((digit * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)) / 255.0
    r = radius * scale
    n = int(np.ceil(r))
    yy, xx = np.mgrid[-n : n + 1, -n : n + 1]
    return ndimage.grey_dilation(big, footprint=(xx**2 + yy**2) <= r * r)


def make(digit_u8: np.ndarray, seed: int) -> bytes:
    """One 28x28 uint8 MNIST digit -> a JPEG of it in the shifted style."""
    rng = np.random.default_rng(seed)
    digit = digit_u8.astype(np.float32) / 255.0
    h, w = SIDE
    scale = rng.uniform(4.5, 6.5)
    ink = _thick(digit, scale, rng.uniform(*PEN_RADIUS))
    angle = rng.uniform(MIN_ANGLE, MAX_ANGLE) * rng.choice((-1, 1))
    ink = np.asarray(
        Image.fromarray((ink * 255).astype(np.uint8)).rotate(angle, resample=Image.BICUBIC, expand=True)
    ).astype(np.float32)
    ink = ink[: h - 8, : w - 8] / 255.0
    top = rng.integers(4, h - ink.shape[0] - 3) if ink.shape[0] < h - 8 else 4
    left = rng.integers(4, w - ink.shape[1] - 3) if ink.shape[1] < w - 8 else 4
    canvas = np.zeros((h, w), dtype=np.float32)
    canvas[top : top + ink.shape[0], left : left + ink.shape[1]] = ink

    ys, xs = np.mgrid[0:h, 0:w]
    tilt = rng.uniform(-0.15, 0.15, 2)
    light = 0.9 + tilt[0] * (xs / w - 0.5) + tilt[1] * (ys / h - 0.5)  # a lamp off to one side
    paper = np.asarray(PAPERS[rng.integers(len(PAPERS))], dtype=np.float32)
    alpha = (0.92 * canvas)[..., None]
    rgb = (paper * (1 - alpha) + np.asarray(PEN, dtype=np.float32) * alpha) * light[..., None]
    rgb += rng.normal(0, 0.025, (h, w, 1))  # sensor noise, the same in each channel
    pil = Image.fromarray((rgb.clip(0, 1) * 255).astype(np.uint8), "RGB").filter(ImageFilter.GaussianBlur(1.0))
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=int(rng.integers(75, 92)))
    return buf.getvalue()


def dataset(images_u8: np.ndarray, labels: np.ndarray, count: int, seed: int) -> tuple[list[bytes], np.ndarray]:
    """``count`` digits picked from ``images_u8`` with ``seed`` (without replacement), each made with its own seed
    derived from ``seed``: (files, labels)."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(images_u8), size=count, replace=False)
    seeds = rng.integers(0, 2**31, size=count)
    files = [make(images_u8[i], int(s)) for i, s in zip(picks, seeds, strict=True)]
    return files, np.asarray(labels)[picks].astype(np.int64)
