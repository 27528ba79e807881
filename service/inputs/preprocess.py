"""Real-world images -> MNIST-style 28x28 inputs, the way MNIST itself was made. numpy and Pillow only.

One pipeline for both endpoints: grayscale (alpha composited onto the background), inverted when the digit
is dark on light, stray regions touching the border dropped, contrast stretched, cropped to the digit, the
longer side scaled to 20 px keeping the aspect ratio, then placed in 28x28 with its centre of mass at the
centre. A plain resize to 28x28 (the book's server) gets most photos and screenshots wrong.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

from service.config import ServiceConfig

MNIST_SIDE = 28
DIGIT_BOX = 20  # MNIST fits each digit in a 20x20 box, then centres its mass in 28x28
MIN_DIGIT_AREA = 0.001  # an inner blob this share of the picture is a digit, enough to drop the border blobs
MIN_BLOB_FRACTION = 0.05  # blobs under 5% of the largest one are specks, not strokes
MNIST_CENTRE_TOLERANCE = 0.6  # px; MNIST's centres of mass lie within 0.52 px of (14, 14), train set included
WORK_SIDE = 512  # larger images are box-averaged towards this in Pillow as they are decoded
JPEG_DRAFT_SIDE = 256  # a large JPEG is decoded at the smallest DCT scale that keeps both sides at least this
COARSE_SIDE = 128  # the blob analysis (which strokes are the digit) runs on the image shrunk to at most this
FINE_SIDE = 4 * 20  # the digit's own pixels are worked on at up to 4x the 20 px they end up as
BORDER_BAND = 0.02  # a blob this close to the border (a share of the side, at least 1 px) is a frame, not a digit
DEFAULT_LIMITS = ServiceConfig()  # the limits below (bytes, pixels, JPEG scans) are settings of the service
MAX_PIXELS = DEFAULT_LIMITS.max_image_pixels
MAX_BYTES = DEFAULT_LIMITS.max_image_bytes
# What digits arrive in. Pillow reads some thirty more formats; each is attack surface with no use here (some
# decode on open, before any budget, or hide a JPEG the scan limit would not see).
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "AVIF", "PPM")  # Pillow's JPEG reader also opens MPO
FORMAT_NAMES = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WebP", "AVIF", "PGM/PPM")
_SOS = b"\xff\xda"  # JPEG start-of-scan marker (entropy-coded data stuffs 0xFF, so only markers match)


class ImageError(ValueError):
    """The input cannot be read as a digit image; the message says what was expected."""


class ImageTooLarge(ImageError):
    pass


class OverBudget(ImageTooLarge):
    """Decoding would cost more than the request may spend (pixels, JPEG scans), known from headers alone."""


def open_image(data: bytes, name: str = "image", limits=DEFAULT_LIMITS) -> Image.Image:
    """Bytes -> a Pillow image whose header has been read and checked, no pixel decoded yet. Decoded by
    content, not file name or declared type."""
    if not data:
        raise ImageError(f"{name} is empty; expected a PNG, JPEG or other image file")
    if len(data) > limits.max_image_bytes:
        raise ImageTooLarge(f"{name} is {len(data)} bytes; the limit is {limits.max_image_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageTooLarge(f"{name} has enormous dimensions; the limit is {limits.max_image_pixels} pixels") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image in a format the service reads ({', '.join(FORMAT_NAMES)})") from None
    except Exception as exc:  # noqa: BLE001 - a hostile header can trip any plugin's parser: all mean "corrupt"
        raise ImageError(f"{name} could not be decoded ({str(exc)[:120]}); is the file truncated?") from None
    if img.width < 1 or img.height < 1:
        raise ImageError(f"{name} has no pixels")
    if img.width * img.height > limits.max_image_pixels:
        raise ImageTooLarge(
            f"{name} is {img.width}x{img.height} pixels; the limit is {limits.max_image_pixels} pixels in all"
        )
    if (pieces := _jpeg_pieces(img)) and (scans := data.count(_SOS)) > limits.max_jpeg_scans * pieces:
        raise OverBudget(
            f"{name} holds JPEG data of {scans} scans; the limit is {limits.max_jpeg_scans}"
            + (f" per strip or tile ({pieces})" if pieces > 1 else "")
        )
    return img


def _jpeg_pieces(img: Image.Image) -> int:
    """How many JPEG streams libjpeg will decode, once per scan each: one for a JPEG or an MPO (the first
    picture is the one loaded), one per strip or tile of a JPEG-compressed TIFF; 0 when there is no JPEG."""
    if img.format in ("JPEG", "MPO"):
        return 1
    if img.format == "TIFF" and img.tag_v2.get(259) in (6, 7):
        return max(1, len(img.tag_v2.get(273, ()) or img.tag_v2.get(324, ())))
    return 0


def load_image(img: Image.Image, name: str = "image") -> Image.Image:
    """Decode the pixels of an image from ``open_image``, upright (phones store their rotation in EXIF). A
    JPEG much larger than the digit needs is decoded at a reduced scale (libjpeg's DCT scaling: 1/2 to 1/8) and,
    when its colours would be thrown away anyway, straight to grayscale. Every failure of a decoder, EXIF
    included, is the client's bad file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if img.format in ("JPEG", "MPO") and max(img.size) > 2 * JPEG_DRAFT_SIDE:
                img.draft("L" if img.mode in ("L", "RGB") else None, (JPEG_DRAFT_SIDE, JPEG_DRAFT_SIDE))
            img.load()
            if max(img.size) > 2 * WORK_SIDE:
                img = _reduced(img)
            img = ImageOps.exif_transpose(img, in_place=False) if _rotated(img) else img
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageTooLarge(f"{name} has enormous dimensions") from None
    except Exception as exc:  # noqa: BLE001 - hostile bytes can trip any decoder in any way
        raise ImageError(f"{name} could not be decoded ({str(exc)[:120]}); is the file truncated?") from None
    return img


def _rotated(img: Image.Image) -> bool:
    """Whether EXIF says to rotate or flip (exif_transpose copies the image even when it does not)."""
    return img.getexif().get(0x0112, 1) not in (0, 1)


def _reduced(img: Image.Image) -> Image.Image:
    """A large image box-averaged by a whole factor towards the working size, in Pillow's C code, before any
    per-pixel work in numpy (which costs several times the decode on 25 megapixels)."""
    if img.mode == "1":
        img = img.convert("L")
    elif img.mode == "P":
        img = img.convert("RGBA")  # its transparency, if any, becomes alpha
    elif img.mode.startswith("I;16"):
        img = img.convert("I")
    return img.reduce(max(img.size) // WORK_SIDE)


def decode(data: bytes, name: str = "image", limits=DEFAULT_LIMITS) -> Image.Image:
    """Bytes -> a fully loaded Pillow image (header checks, then pixels)."""
    return load_image(open_image(data, name, limits), name)


def to_gray(img: Image.Image) -> np.ndarray:
    """Grayscale in 0..1. Transparent pixels show the background a viewer would show: white, unless the
    opaque strokes are themselves light (a light digit on a transparent sheet), then black. Images of more than
    8 bits a channel are scaled to 0..1, not clipped to 8 bits (Pillow's conversion to "L" clips them)."""
    if img.mode == "F" or img.mode.startswith("I"):
        return _scaled(img)
    if img.mode in ("P", "PA") or (img.mode in ("L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa") and img.getchannel("A").getextrema()[0] == 255:
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0  # opaque (a canvas drawing): no alpha to use
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        luma = np.asarray(rgba.convert("L"), dtype=np.float32) / 255.0
        opaque = alpha > 0.5
        background = 0.0 if opaque.any() and luma[opaque].mean() > 0.5 else 1.0
        return luma * alpha + background * (1.0 - alpha)
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def _scaled(img: Image.Image) -> np.ndarray:
    """16- and 32-bit integer and float images -> 0..1: by the range of the format where its values fit one
    (0..255, 0..65535, 0..1 for floats; a 16-bit PNG uses the full 16 bits), else by their own range."""
    values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if img.mode.startswith("I;16"):
        scale = 65535.0
    elif low >= 0 and img.mode == "F" and high <= 1:
        scale = 1.0
    elif low >= 0 and high <= 255:
        scale = 255.0
    elif low >= 0 and high <= 65535:
        scale = 65535.0
    else:
        values, scale = values - low, max(high - low, 1e-12)
    return (values / scale).astype(np.float32)


def _shrunk(gray: np.ndarray, side: int) -> tuple[np.ndarray, float, float]:
    """``gray`` box-averaged so that its longer side is at most ``side``, and the source pixels per pixel of
    the result along y and x (1 when it was small enough already)."""
    h, w = gray.shape
    if max(h, w) <= side:
        return gray, 1.0, 1.0
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(gray, mode="F").resize(size, Image.Resampling.BOX), dtype=np.float32)
    return small, h / size[1], w / size[0]


_OTSU_BINS = 64
_OTSU_CENTERS = (np.arange(_OTSU_BINS) + 0.5) / _OTSU_BINS
# two dilations by the 4-connected cross are one dilation by the diamond of radius 2
_DIAMOND_2 = ndimage.iterate_structure(ndimage.generate_binary_structure(2, 1), 2)
_QUANTILES = np.array([0.005, 0.5, 0.995])


def _quantiles(values: np.ndarray) -> np.ndarray:
    """The 0.5th, 50th and 99.5th percentiles, as np.percentile computes them (linear interpolation), with
    one partial sort: np.percentile's own bookkeeping costs more than the sort on a small image."""
    flat = values.ravel()
    position = _QUANTILES * (flat.size - 1)
    below = np.floor(position).astype(np.intp)
    above = np.minimum(below + 1, flat.size - 1)
    ordered = np.partition(flat, np.union1d(below, above))
    low, high = ordered[below].astype(np.float64), ordered[above].astype(np.float64)
    t = position - below
    # numpy's lerp: from the nearer end, so that t = 0 and t = 1 give the end values exactly
    return np.where(t >= 0.5, high - (high - low) * (1 - t), low + (high - low) * t)


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of values in 0..1 (64 bins; bincount is several times faster than np.histogram)."""
    hist = np.bincount(np.minimum((values * _OTSU_BINS).astype(np.int32), _OTSU_BINS - 1).ravel(), minlength=_OTSU_BINS)
    centers = _OTSU_CENTERS
    weight0 = np.cumsum(hist)
    weight1 = weight0[-1] - weight0
    mean0 = np.cumsum(hist * centers) / np.maximum(weight0, 1)
    mean1 = ((hist * centers).sum() - np.cumsum(hist * centers)) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(centers[np.argmax(between)])


def _digit_mask(ink: np.ndarray) -> np.ndarray:
    """Keep the strokes of the digit: drop blobs that reach the border (frames, paper edges, plot margins)
    unless they are all there is (a digit cropped tight), then specks far smaller than the largest blob
    (noise, the holes in a plot's tick labels)."""
    labels, count = ndimage.label(ink)
    if count == 0:
        return ink
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    inner = sizes.copy()
    band = max(1, round(BORDER_BAND * max(ink.shape)))  # a window's frame drawn a pixel or two inside the edge
    for edge in (labels[:band], labels[-band:], labels[:, :band], labels[:, -band:]):
        inner[edge.ravel()] = 0
    if inner.max() >= MIN_DIGIT_AREA * ink.size:
        sizes = inner
    keep = sizes >= max(MIN_BLOB_FRACTION * sizes.max(), 1)
    return keep[labels]


def is_mnist_format(gray: np.ndarray) -> bool:
    """Already what MNIST's own preprocessing produces: 28x28, background exactly 0, the digit fitted in the
    20x20 box (its longer side 19 or 20 px) and its centre of mass near (14, 14). True of
    every one of MNIST's 70,000 digits, whose answers must be the model's own."""
    if gray.shape != (MNIST_SIDE, MNIST_SIDE):
        return False
    ink = gray > 0
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if rows.size == 0 or max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 not in (DIGIT_BOX - 1, DIGIT_BOX):
        return False
    mass = gray.sum(dtype=np.float64)
    cy = gray.sum(axis=1, dtype=np.float64) @ np.arange(MNIST_SIDE) / mass
    cx = gray.sum(axis=0, dtype=np.float64) @ np.arange(MNIST_SIDE) / mass
    return abs(cy - 14.0) <= MNIST_CENTRE_TOLERANCE and abs(cx - 14.0) <= MNIST_CENTRE_TOLERANCE


@dataclass(frozen=True)
class _Look:
    """What the blob analysis found on the coarse image: how to turn its gray levels into ink (0..1) and which
    coarse pixels are the digit's strokes."""

    inverted: bool
    background: float
    peak: float
    threshold: float
    mask: np.ndarray

    def ink(self, gray: np.ndarray) -> np.ndarray:
        return _ink(gray, self.inverted, self.background, self.peak)


def _ink(gray: np.ndarray, inverted: bool, background: float, peak: float) -> np.ndarray:
    gray = 1.0 - gray if inverted else gray
    return ((gray - background) / (peak - background)).clip(0.0, 1.0)


def _look(gray: np.ndarray) -> tuple[_Look, np.ndarray] | None:
    """Light or dark ink, the contrast, the threshold and the digit's strokes, and the image as ink; None when
    nothing is drawn."""
    low, median, high = _quantiles(gray)
    inverted = bool(median > 0.5)  # most of the picture is light: dark ink on paper or a white canvas
    if inverted:
        low, median, high = 1.0 - high, 1.0 - median, 1.0 - low
    background, peak = float(median), float(high)
    if peak - background < 0.05:
        return None
    ink = _ink(gray, inverted, background, peak)
    threshold = max(_otsu(ink), 0.2)
    return _Look(inverted, background, peak, threshold, _digit_mask(ink > threshold)), ink


def mnist_style(gray: np.ndarray) -> np.ndarray:
    """A grayscale image (0..1, any size) -> 28x28 float32 in 0..1, white digit on black, MNIST-centred. An
    image already in MNIST's format passes through unchanged.

    Two passes, so that the cost does not follow the image's size: the blob analysis on the image shrunk to
    ``COARSE_SIDE``, then the strokes themselves on the digit's own box cut from the full image, shrunk to
    ``FINE_SIDE``."""
    gray = np.asarray(gray, dtype=np.float32)
    if not np.isfinite(gray).all():
        gray = np.nan_to_num(gray)
    gray = gray.clip(0.0, 1.0)
    if is_mnist_format(gray):
        return gray
    coarse, step_y, step_x = _shrunk(gray, COARSE_SIDE)
    found = _look(coarse)
    if found is None:
        return np.zeros((MNIST_SIDE, MNIST_SIDE), dtype=np.float32)  # nothing drawn: a blank answer, not an error
    look, ink = found
    if step_y == step_x == 1.0:
        mask = look.mask
    else:
        ink, mask = _fine(gray, look, step_y, step_x)
    # the digit's anti-aliased edges: faint pixels next to the kept strokes, nothing else (MNIST's background is 0)
    near = ndimage.binary_dilation(mask, structure=_DIAMOND_2)
    ink = np.where(near & (ink >= 0.5 * look.threshold), ink, 0.0).astype(np.float32)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return np.zeros((MNIST_SIDE, MNIST_SIDE), dtype=np.float32)
    return _centre(ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])


def _grown(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one pixel in all eight directions (a 3x3 dilation, by shifts: several times faster
    than scipy's on a small image)."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    wide = grown.copy()
    wide[:, 1:] |= grown[:, :-1]
    wide[:, :-1] |= grown[:, 1:]
    return wide


def _fine(gray: np.ndarray, look: _Look, step_y: float, step_x: float) -> tuple[np.ndarray, np.ndarray]:
    """The digit's box (one coarse pixel of margin) cut from the full image and shrunk to ``FINE_SIDE``: its
    ink, and its strokes: ink over the threshold where the coarse analysis found the digit's (or next to it)."""
    rows, cols = np.flatnonzero(look.mask.any(axis=1)), np.flatnonzero(look.mask.any(axis=0))
    h, w = gray.shape
    top, bottom = max(0, int((rows[0] - 1) * step_y)), min(h, int(np.ceil((rows[-1] + 2) * step_y)))
    left, right = max(0, int((cols[0] - 1) * step_x)), min(w, int(np.ceil((cols[-1] + 2) * step_x)))
    fine, fine_y, fine_x = _shrunk(np.ascontiguousarray(gray[top:bottom, left:right]), FINE_SIDE)
    ink = look.ink(fine)
    # each fine pixel's centre, in coarse pixels: the coarse mask (grown by one pixel) says where strokes may be
    gate = _grown(look.mask)
    ys = ((top + (np.arange(fine.shape[0]) + 0.5) * fine_y) / step_y).astype(np.intp).clip(0, gate.shape[0] - 1)
    xs = ((left + (np.arange(fine.shape[1]) + 0.5) * fine_x) / step_x).astype(np.intp).clip(0, gate.shape[1] - 1)
    return ink, (ink > look.threshold) & gate[np.ix_(ys, xs)]


def _centre(crop: np.ndarray) -> np.ndarray:
    h, w = crop.shape
    scale = DIGIT_BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    digit = np.asarray(Image.fromarray(crop, mode="F").resize(size, Image.Resampling.LANCZOS), dtype=np.float32)
    digit = digit.clip(0.0, 1.0)
    out = np.zeros((MNIST_SIDE, MNIST_SIDE), dtype=np.float32)
    dh, dw = digit.shape
    mass = digit.sum()
    if mass > 0:
        cy = digit.sum(axis=1) @ np.arange(dh, dtype=np.float32) / mass
        cx = digit.sum(axis=0) @ np.arange(dw, dtype=np.float32) / mass
    else:
        cy, cx = (dh - 1) / 2, (dw - 1) / 2
    top = int(round((MNIST_SIDE - 1) / 2 - cy))
    left = int(round((MNIST_SIDE - 1) / 2 - cx))
    top, left = min(max(top, 0), MNIST_SIDE - dh), min(max(left, 0), MNIST_SIDE - dw)
    out[top : top + dh, left : left + dw] = digit
    return out


def image_to_mnist(data: bytes, name: str = "image") -> np.ndarray:
    """Encoded image bytes -> 28x28 float32 in 0..1, white digit on black."""
    return mnist_style(to_gray(decode(data, name)))


def normalize(batch: np.ndarray, mean: float, std: float) -> np.ndarray:
    """[N, 28, 28] in 0..1 -> the model's [N, 1, 28, 28] input, with the training normalization."""
    return ((batch.astype(np.float32) - mean) / std)[:, None, :, :]
