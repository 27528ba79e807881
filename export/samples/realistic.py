"""Real-world-looking images made from real MNIST test digits: photos of paper, screenshots, transparent PNGs.

Each kind puts the digit where a person would, not where MNIST does: large, off-centre, dark on light, on
textured or unevenly lit paper, with a frame, then encodes it as a file (JPEG for photos, PNG otherwise).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

KINDS = ("paper_photo", "screenshot", "dark_screenshot", "transparent_png")


def _place(digit: np.ndarray, canvas_hw: tuple[int, int], scale: float, rng) -> np.ndarray:
    """The 28x28 digit (0..1) scaled by ``scale`` and pasted off-centre on a zero canvas."""
    side = int(28 * scale)
    big = np.asarray(Image.fromarray((digit * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)) / 255.0
    h, w = canvas_hw
    top = rng.integers(0, h - side)
    left = rng.integers(0, w - side)
    canvas = np.zeros((h, w), dtype=np.float32)
    canvas[top : top + side, left : left + side] = big
    return canvas


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make(kind: str, digit_u8: np.ndarray, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    digit = digit_u8.astype(np.float32) / 255.0
    if kind == "paper_photo":
        h, w = 300, 400
        ink = _place(digit, (h, w), rng.uniform(5, 9), rng)
        ys, xs = np.mgrid[0:h, 0:w]
        light = 0.78 + 0.15 * (xs / w) - 0.08 * (ys / h)  # uneven lighting across the sheet
        paper = light + rng.normal(0, 0.03, (h, w))
        img = paper * (1 - 0.8 * ink)
        rgb = np.stack([img * 1.0, img * 0.97, img * 0.9], axis=-1).clip(0, 1)
        pil = Image.fromarray((rgb * 255).astype(np.uint8), "RGB").filter(ImageFilter.GaussianBlur(1.2))
        return _encode(pil, "JPEG")
    if kind == "screenshot":
        h, w = 360, 480
        ink = _place(digit, (h, w), rng.uniform(4, 10), rng)
        img = 1.0 - ink
        return _encode(Image.fromarray((img * 255).astype(np.uint8), "L").convert("RGB"), "PNG")
    if kind == "dark_screenshot":
        h, w = 320, 320
        img = _place(digit, (h - 40, w - 40), rng.uniform(4, 8), rng)
        framed = np.full((h, w), 0.85, dtype=np.float32)  # a light window frame around a black canvas
        framed[20:-20, 20:-20] = img
        return _encode(Image.fromarray((framed * 255).astype(np.uint8), "L"), "PNG")
    if kind == "transparent_png":
        h, w = 256, 256
        alpha = _place(digit, (h, w), rng.uniform(4, 7), rng)
        rgba = np.zeros((h, w, 4), dtype=np.uint8)
        rgba[..., 3] = (alpha * 255).astype(np.uint8)  # black strokes, transparent elsewhere
        return _encode(Image.fromarray(rgba, "RGBA"), "PNG")
    raise ValueError(kind)


def plain_resize(data: bytes) -> np.ndarray:
    """The book's server: grayscale, resize to 28x28, nothing else."""
    img = Image.open(io.BytesIO(data)).convert("L").resize((28, 28))
    return np.asarray(img, dtype=np.float32) / 255.0
