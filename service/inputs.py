"""What each kind of input becomes: N MNIST-style images, [N, 28, 28] float32 in 0..1, white on black.

Runs in the work processes (service/worker.py), never on a worker's event loop: decoding images and parsing
JSON arrays are the CPU-heavy part of a request. Every refusal is a RequestError with its status.
"""

from __future__ import annotations

import json

import numpy as np

from service.errors import RequestError, bad_request, too_large
from service.preprocess import (
    MNIST_SIDE,
    ImageError,
    ImageTooLarge,
    OverBudget,
    load_image,
    mnist_style,
    open_image,
    to_gray,
)

KINDS = ("encoded", "json", "pixels")


class Counts:
    """What this process has decoded: reported with each batch, so that a test and an operator can see that a
    request over its budget was refused from headers alone."""

    decoded_images = 0


def to_mnist(kind: str, payload, limits) -> np.ndarray:
    """One request's payload -> [N, 28, 28]: ``encoded`` image files (list of bytes), a ``json`` body
    ``{"images": [...]}`` (bytes), or ``pixels`` already in arrays (N x 28 x 28 in 0..1)."""
    if kind == "encoded":
        return encoded_to_mnist(payload, limits)
    if kind == "json":
        return pixels_to_mnist(json_images(payload), limits)
    if kind == "pixels":
        return pixels_to_mnist(payload, limits)
    raise ValueError(f"unknown input kind {kind!r}")


def check_count(n: int, limits) -> None:
    if n == 0:
        raise bad_request("no images: send one or more images (multipart field 'images', or JSON 'images': [...])")
    if n > limits.max_images_per_request:
        raise too_large(f"{n} images in one request; the limit is {limits.max_images_per_request}")


def encoded_to_mnist(files: list[bytes], limits) -> np.ndarray:
    """Every header is read and checked against the request's budget before any image is decoded."""
    check_count(len(files), limits)
    with _image_errors():
        images = [open_image(data, f"images[{i}]", limits) for i, data in enumerate(files)]
        pixels = sum(img.width * img.height for img in images)
        if pixels > limits.max_request_pixels:
            raise OverBudget(
                f"the {len(images)} images have {pixels} pixels in all; the limit per request is "
                f"{limits.max_request_pixels}: send smaller images or fewer per request"
            )
        return np.stack([_image_to_mnist(img, f"images[{i}]") for i, img in enumerate(images)])


def _image_to_mnist(img, name: str) -> np.ndarray:
    Counts.decoded_images += 1
    img = load_image(img, name)
    try:
        gray = to_gray(img)
    except Exception as exc:  # noqa: BLE001 - a mode conversion of a hostile file: still the file's fault
        raise ImageError(f"{name} could not be converted to grayscale ({str(exc)[:120]})") from None
    return mnist_style(gray)


class _image_errors:
    """ImageError and its kinds -> the RequestError a client gets."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, OverBudget):
            raise RequestError(413, "over_budget", str(exc)) from None
        if isinstance(exc, ImageTooLarge):
            raise RequestError(413, "too_large", str(exc)) from None
        if isinstance(exc, ImageError):
            raise RequestError(400, "not_an_image", str(exc)) from None
        return False


def json_images(body: bytes) -> list:
    """The ``images`` list of a JSON body."""
    try:
        doc = json.loads(body)
    except RecursionError:
        raise bad_request('the JSON body is nested too deeply; expected {"images": [28x28 arrays]}') from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the body is not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(doc, dict) or "images" not in doc:
        raise bad_request('expected a JSON object {"images": [...]}: N images, each 28 rows of 28 numbers in 0..1')
    if not isinstance(doc["images"], list):
        raise bad_request(f'"images" must be a list of 28x28 arrays, got {type(doc["images"]).__name__}')
    return doc["images"]


def pixels_to_mnist(images, limits) -> np.ndarray:
    """N x 28 x 28 intensities in 0..1, white digit on black -> the model's MNIST-style input."""
    check_count(len(images), limits)
    try:
        batch = np.asarray(images, dtype=np.float32)
    except (ValueError, TypeError, OverflowError):
        raise RequestError(
            400, "bad_shape", "images must be a list of 28x28 arrays of numbers (ragged or non-numeric input)"
        ) from None
    if batch.ndim != 3 or batch.shape[1:] != (MNIST_SIDE, MNIST_SIDE):
        raise RequestError(400, "bad_shape", f"images must have shape [N, 28, 28], got {list(batch.shape)}")
    if not np.isfinite(batch).all():
        raise RequestError(400, "bad_shape", "images contain NaN or infinite values; expected intensities in 0..1")
    if batch.min() < 0.0 or batch.max() > 1.0:
        raise RequestError(400, "bad_shape", f"pixel intensities must be in 0..1, got {batch.min():g}..{batch.max():g}")
    return np.stack([mnist_style(img) for img in batch])
