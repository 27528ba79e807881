"""What each kind of input becomes: N MNIST-style images, [N, 28, 28] float32 in 0..1, white on black.

Runs in the work processes (service/engine/work.py), never on a worker's event loop. Every refusal is a
RequestError with its status.
"""

from __future__ import annotations

import json

import numpy as np

from service.errors import RequestError, bad_request, parsed_json, too_large
from service.inputs.preprocess import (
    MNIST_SIDE,
    ImageError,
    ImageTooLarge,
    OverBudget,
    load_image,
    mnist_style,
    open_image,
    to_gray,
)


class Counts:
    """What this process has decoded: reported with each batch, so that a test and an operator can see that a
    request over its budget was refused from headers alone."""

    decoded_images = 0
    decoded_pixels = 0
    # what was decoded in full: the work a request really did (a truncated file declaring 25 megapixels did none)
    loaded_images = 0
    loaded_pixels = 0


def checked_network_input(payload: np.ndarray, limits) -> np.ndarray:
    """The network's own input [N, 1, 28, 28] (the Open Inference Protocol's raw network): checked, not changed."""
    check_count(len(payload), limits)
    if not np.isfinite(payload).all():
        i = int(np.argwhere(~np.isfinite(payload))[0][0])
        raise _bad(f"images[{i}] holds NaN or infinite values; the network's input must be finite")
    return payload


def check_count(n: int, limits) -> None:
    if n == 0:
        raise bad_request("no images: send one or more images (multipart field 'images', or JSON 'images': [...])")
    if n > limits.max_images_per_request:
        raise too_large(f"{n} images in one request; the limit is {limits.max_images_per_request}")


def encoded_to_mnist(files: list[bytes], limits, declared: tuple[int, ...] | None = None) -> np.ndarray:
    """Every header is read and checked against the request's budget before any image is decoded.

    ``declared``: the pixels the batcher priced each file at (service/inputs/image_size.py reads its header
    without a decoder). A file that Pillow opens larger than that says two different sizes (a GIF whose frame overflows
    its screen, a JPEG with two frame markers, ...): refused, so that no request costs more than it was priced.
    """
    check_count(len(files), limits)
    with _image_errors():
        images = [open_image(data, f"images[{i}]", limits) for i, data in enumerate(files)]
        for i, img in enumerate(images):
            if declared is not None and img.width * img.height > declared[i]:
                raise ImageError(
                    f"images[{i}] is inconsistent: its header declares {declared[i]} pixels but the image is "
                    f"{img.width}x{img.height}; re-save it with an image editor or library"
                )
        pixels = sum(img.width * img.height for img in images)
        if pixels > limits.max_request_pixels:
            raise OverBudget(
                f"the {len(images)} images have {pixels} pixels in all; the limit per request is "
                f"{limits.max_request_pixels}: send smaller images or fewer per request"
            )
        return np.stack([_image_to_mnist(img, f"images[{i}]") for i, img in enumerate(images)])


def _image_to_mnist(img, name: str) -> np.ndarray:
    pixels = img.width * img.height
    Counts.decoded_images += 1
    Counts.decoded_pixels += pixels
    img = load_image(img, name)
    Counts.loaded_images += 1
    Counts.loaded_pixels += pixels
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


def json_images(body: bytes) -> tuple[list, bool]:
    """The ``images`` list of a JSON body, and its ``return_input`` (false when absent: BentoML's client sends
    the API method's arguments as the body's fields)."""
    too_deep = 'the JSON body is nested too deeply; expected {"images": [28x28 arrays]}'
    doc = parsed_json(body, too_deep, "the body is not valid JSON")
    if not isinstance(doc, dict) or "images" not in doc:
        raise bad_request('expected a JSON object {"images": [...]}: N images, each 28 rows of 28 numbers in 0..1')
    if not isinstance(doc["images"], list):
        raise bad_request(f'"images" must be a list of 28x28 arrays, got {type(doc["images"]).__name__}')
    asked = doc.get("return_input", False)
    if not isinstance(asked, bool):
        raise bad_request(f'"return_input" must be true or false, got {json.dumps(asked)[:40]}')
    return doc["images"], asked


def pixels_to_mnist(images, limits) -> np.ndarray:
    """N x 28 x 28 intensities in 0..1, white digit on black -> the model's MNIST-style input. A list (parsed
    JSON) is checked value by value, so that a refusal names the first bad value's position."""
    check_count(len(images), limits)
    batch = _checked_lists(images) if isinstance(images, list) else np.asarray(images)
    if batch.ndim != 3 or batch.shape[1:] != (MNIST_SIDE, MNIST_SIDE) or batch.dtype.kind not in "biuf":
        raise _bad(f"images must be numbers of shape [N, 28, 28], got {batch.dtype} of shape {list(batch.shape)}")
    batch = batch.astype(np.float64)
    for bound, where in (("finite numbers in 0..1", ~np.isfinite(batch)), ("in 0..1", (batch < 0) | (batch > 1))):
        if where.any():
            i, r, c = np.argwhere(where)[0]
            value = images[i][r][c] if isinstance(images, list) else batch[i, r, c]
            raise _bad(f"images[{i}][{r}][{c}] is {_shown(value)}; pixel intensities must be {bound}")
    return np.stack([mnist_style(img) for img in batch.astype(np.float32)])


def _checked_lists(images: list) -> np.ndarray:
    for i, image in enumerate(images):
        if not isinstance(image, list) or len(image) != MNIST_SIDE:
            raise _bad(f"images[{i}] is {_described(image)}; each image must be 28 rows of 28 numbers (shape [28, 28])")
        for r, row in enumerate(image):
            if not isinstance(row, list) or len(row) != MNIST_SIDE:
                raise _bad(f"images[{i}][{r}] is {_described(row)}; each row of an image has 28 numbers")
            if not all(type(v) is float or type(v) is int for v in row):  # `type is`: JSON true is not a number
                c, v = next((c, v) for c, v in enumerate(row) if type(v) is not float and type(v) is not int)
                raise _bad(f"images[{i}][{r}][{c}] is {_described(v)}; expected a number in 0..1")
    try:
        return np.array(images, dtype=np.float64)
    except OverflowError:  # an integer past float64's range
        for i, image in enumerate(images):
            for r, row in enumerate(image):
                for c, v in enumerate(row):
                    if type(v) is int and abs(v) > 1e300:
                        digits = len(str(abs(v)))
                        raise _bad(f"images[{i}][{r}][{c}] is an integer of {digits} digits; expected 0..1") from None
        raise


def _described(value) -> str:
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, str):
        return f"the string {value[:20]!r}"
    if type(value) in (int, float):
        return f"the number {value!r}"
    return {bool: "a boolean", type(None): "null", dict: "an object"}.get(type(value), type(value).__name__)


def _shown(value) -> str:
    value = value if type(value) in (int, float) else float(value)  # numpy scalars too (np.float64 is a float)
    return "NaN" if value != value else repr(value)


def _bad(message: str) -> RequestError:
    return RequestError(400, "bad_shape", message)
