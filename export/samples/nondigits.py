"""Things people send that are not digits, as the files they would send: letters, symbols and pictographs in the
machine's fonts, scribbles, noise, and textures (checkerboards, stripes, gradients). (Two digits side by side,
made from MNIST, are the detector's own: export/detector.py.)

``make(family, seed)`` draws one as an encoded PNG. The export trains the not-a-digit detector on one range of
seeds and measures it on another (export/detector.py); the two never overlap.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FAMILIES = ("letters", "symbols", "pictographs", "scribbles", "noise", "textures")
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "/Library/Fonts", "C:/Windows/Fonts")
# Letters that a person could draw as a digit are left out: O o Q D (0), I l i j (1), Z z (2), S s (5), b G (6),
# T (7), B (8), g q (9); what remains has no digit in its shape.
LETTERS = "ACEFHKLMNPRUVWXYacdefhkmnprtuvwxy"
SYMBOLS = "?!@#$%&*+=<>{}[]~^\\€£¥§©®±÷×∑∞≈≠√"
# pictographs and dingbats the fonts draw (DejaVu has them all): what a person pastes or doodles for fun
# (nothing round or ring-like: drawn by hand with a thick pen, a ring is a 0, and so is a face or a diamond)
PICTOGRAPHS = "♥♣♠♪♫✔✘✓✗⚡☁☂☃★☆✈☎♻⚠⚓✂✉✏✿❀❄❤➔←→↑↓↔⇒▲△☾♀♂"
PICTOGRAPH_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf")  # the faces that draw every one of them


@functools.cache
def fonts() -> tuple[Path, ...]:
    found = sorted(p for d in FONT_DIRS if Path(d).is_dir() for p in Path(d).rglob("*.ttf"))
    return tuple(p for p in found if "Math" not in p.name)  # a math font draws letters as symbols of its own


def _glyph(chars: str, rng, only: tuple[str, ...] = ()) -> np.ndarray:
    """One character in a random font (of ``only``, where given and present), size and angle; ink 1 on 0."""
    available = tuple(p for p in fonts() if p.name in only) or fonts() if only else fonts()
    side = int(rng.integers(48, 129))
    size = int(side * rng.uniform(0.55, 0.85))
    if available:
        font = ImageFont.truetype(str(available[rng.integers(len(available))]), size)
    else:  # Pillow's own scalable font: one typeface, but letters all the same
        font = ImageFont.load_default(size)
    img = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(img)
    char = chars[rng.integers(len(chars))]
    left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
    draw.text(((side - right - left) / 2, (side - bottom - top) / 2), char, fill=255, font=font)
    img = img.rotate(float(rng.uniform(-20, 20)), resample=Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def _scribble(rng) -> np.ndarray:
    """A dense tangle of strokes, as a person scrawls on a canvas: many turns, a thick pen."""
    side = int(rng.integers(64, 200))
    img = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        points = rng.uniform(0.1, 0.9, (int(rng.integers(8, 30)), 2)) * side
        draw.line(
            [tuple(p) for p in points], fill=255, width=max(2, int(side * rng.uniform(0.03, 0.09))), joint="curve"
        )
    return np.asarray(img.filter(ImageFilter.GaussianBlur(side / 150)), dtype=np.float32) / 255.0


def _noise(rng) -> np.ndarray:
    side = int(rng.integers(28, 160))
    kind = rng.integers(3)
    if kind == 0:
        return rng.uniform(0, 1, (side, side)).astype(np.float32)
    if kind == 1:
        return (rng.uniform(0, 1, (side, side)) < rng.uniform(0.05, 0.5)).astype(np.float32)  # salt and pepper
    blur = float(rng.uniform(1, 4))  # blotches
    noise = Image.fromarray((rng.uniform(0, 255, (side, side))).astype(np.uint8)).filter(ImageFilter.GaussianBlur(blur))
    values = np.asarray(noise, dtype=np.float32)
    return ((values - values.min()) / max(1.0, float(np.ptp(values)))).astype(np.float32)


def _texture(rng) -> np.ndarray:
    side = int(rng.integers(28, 160))
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:
        cell = int(rng.integers(2, max(3, side // 3)))
        return (((ys // cell) + (xs // cell)) % 2).astype(np.float32)  # checkerboard
    angle = rng.uniform(0, np.pi)
    along = xs * np.cos(angle) + ys * np.sin(angle)
    if kind == 1:
        period = rng.uniform(3, side / 2)
        return (np.sin(2 * np.pi * along / period) > 0).astype(np.float32)  # stripes
    return ((along - along.min()) / max(1.0, float(np.ptp(along)))).astype(np.float32)  # a gradient


def picture(family: str, seed: int) -> np.ndarray:
    """One non-digit as grayscale 0..1, white on black or (half the time) dark on light."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")
    rng = np.random.default_rng([seed, FAMILIES.index(family)])
    if family == "letters":
        gray = _glyph(LETTERS, rng)
    elif family == "symbols":
        gray = _glyph(SYMBOLS, rng)
    elif family == "pictographs":
        gray = _glyph(PICTOGRAPHS, rng, PICTOGRAPH_FONTS)
    elif family == "scribbles":
        gray = _scribble(rng)
    elif family == "noise":
        gray = _noise(rng)
    else:
        gray = _texture(rng)
    return 1.0 - gray if rng.uniform() < 0.5 else gray


def make(family: str, seed: int) -> bytes:
    """One non-digit, encoded as the PNG a client would upload."""
    buf = io.BytesIO()
    Image.fromarray((picture(family, seed) * 255).round().astype(np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()
