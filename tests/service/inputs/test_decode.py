"""service/inputs/decode.py in process: what each kind of input becomes, and every refusal with its status,
reason and message. Small images are made here with Pillow; no model, no server."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from service.config import ServiceConfig
from service.engine.messages import InputKind
from service.engine.work import model_input
from service.errors import RequestError
from service.inputs.decode import Counts, check_count, encoded_to_mnist, json_images, pixels_to_mnist
from service.inputs.preprocess import DIGIT_BOX, MNIST_SIDE, is_mnist_format
from training.data import Normalization

LIMITS = ServiceConfig()
MAX_IMAGES = LIMITS.max_images_per_request
NORM = Normalization()
SIDE = MNIST_SIDE
PIXELS = SIDE * SIDE
TOP = (SIDE - DIGIT_BOX) // 2


def digit_u8() -> np.ndarray:
    """A '1' already in MNIST's format: background 0, DIGIT_BOX rows tall, its mass at the centre."""
    a = np.zeros((SIDE, SIDE), np.uint8)
    a[TOP : TOP + DIGIT_BOX, SIDE // 2 - 1 : SIDE // 2 + 2] = 255
    a[TOP : TOP + DIGIT_BOX, SIDE // 2 - 2] = 128
    return a


def digit_gray() -> np.ndarray:
    """The same digit as intensities exactly representable in float32 and JSON."""
    g = (digit_u8() == 255).astype(np.float32)
    g[digit_u8() == 128] = 0.5
    return g


def encoded(a: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a, mode="L").save(buf, format=fmt)
    return buf.getvalue()


def blank() -> list:
    return [[0.0] * SIDE for _ in range(SIDE)]


def with_value(value, image=1, row=3, col=7, images=2) -> list:
    """``images`` blank images as nested lists, one value replaced."""
    out = [blank() for _ in range(images)]
    out[image][row][col] = value
    return out


def body(images, **extra) -> bytes:
    return json.dumps({"images": images, **extra}).encode()


PNG = encoded(digit_u8())
DECLARED = (PIXELS, PIXELS)


def test_the_test_digit_is_in_mnist_format():
    assert is_mnist_format(digit_gray()) and is_mnist_format(digit_u8().astype(np.float32) / 255)


# ---- what each kind becomes ---------------------------------------------------------------------------------
PAYLOADS = {
    "encoded": (InputKind.ENCODED, lambda: [PNG, PNG], DECLARED),
    "encoded, no declared sizes": (InputKind.ENCODED, lambda: [PNG, PNG], None),
    "json": (InputKind.JSON, lambda: body([digit_gray().tolist()] * 2), None),
    "pixels as lists": (InputKind.PIXELS, lambda: [digit_gray().tolist()] * 2, None),
    "pixels as an array": (InputKind.PIXELS, lambda: np.stack([digit_gray()] * 2), None),
    "pixels as uint8 0/1": (InputKind.PIXELS, lambda: np.stack([digit_gray() == 1] * 2).astype(np.uint8), None),
}


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_each_kind_gives_the_model_input_and_the_images_it_was_made_from(name):
    kind, payload, declared = PAYLOADS[name]
    x, images, asked = model_input(kind, payload(), LIMITS, NORM.mean, NORM.std, declared)
    assert x.shape == (2, 1, SIDE, SIDE) and x.dtype == np.float32
    assert images.shape == (2, SIDE, SIDE) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.max() > 0
    np.testing.assert_allclose(x[:, 0] * NORM.std + NORM.mean, images, atol=1e-6)
    assert asked is False


def test_normalized_input_is_checked_not_changed():
    payload = np.random.default_rng(0).normal(size=(3, 1, SIDE, SIDE)).astype(np.float32)
    x, images, asked = model_input(InputKind.NORMALIZED, payload, LIMITS, NORM.mean, NORM.std)
    assert x is payload and images is None and asked is False


def test_an_unknown_kind_is_a_bug_not_a_request_error():
    with pytest.raises(ValueError, match="unknown input kind"):
        model_input("png", [PNG], LIMITS, NORM.mean, NORM.std)


@pytest.mark.parametrize(
    "kind, payload, expected",
    [
        (InputKind.ENCODED, [PNG], digit_u8().astype(np.float32) / 255),
        (InputKind.JSON, body([digit_gray().tolist()]), digit_gray()),
        (InputKind.PIXELS, [digit_gray().tolist()], digit_gray()),
        (InputKind.PIXELS, digit_gray()[None], digit_gray()),
    ],
    ids=["png", "json", "lists", "array"],
)
def test_an_mnist_format_image_passes_through_unchanged(kind, payload, expected):
    _, images, _ = model_input(kind, payload, LIMITS, NORM.mean, NORM.std, (PIXELS,))
    np.testing.assert_array_equal(images[0], expected)


def test_an_image_not_in_mnist_format_is_restyled():
    """The pass-through above is not the only path: an off-centre digit is moved to MNIST's centre."""
    corner = np.zeros((SIDE, SIDE), np.float32)
    corner[1:9, 1:3] = 1.0
    out = pixels_to_mnist([corner.tolist()], LIMITS)[0]
    assert not np.array_equal(out, corner)
    ys, xs = np.nonzero(out)
    assert out[ys.min() : ys.max() + 1].shape[0] in (DIGIT_BOX - 1, DIGIT_BOX)
    assert abs(np.average(ys, weights=out[ys, xs]) - SIDE / 2) < 1.5


# ---- a JSON body's fields -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, expected", [({}, False), ({"return_input": True}, True), ({"return_input": False}, False)]
)
def test_return_input_of_a_json_body(extra, expected):
    images, asked = json_images(body([blank()], **extra))
    assert images == [blank()] and asked is expected
    _, _, asked = model_input(InputKind.JSON, body([blank()], **extra), LIMITS, NORM.mean, NORM.std)
    assert asked is expected


@pytest.mark.parametrize("value", ["yes", 1, 0, None, [], {}, "x" * 100])
def test_a_non_boolean_return_input_is_refused(value):
    with pytest.raises(RequestError) as caught:
        json_images(body([blank()], return_input=value))
    e = caught.value
    assert (e.status, e.reason) == (400, "bad_request")
    assert e.message.startswith('"return_input" must be true or false, got ' + json.dumps(value)[:40])


# ---- check_count --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n, status, fragment",
    [
        (0, 400, "no images"),
        (1, None, None),
        (MAX_IMAGES, None, None),
        (MAX_IMAGES + 1, 413, f"{MAX_IMAGES + 1} images in one request; the limit is {MAX_IMAGES}"),
    ],
)
def test_check_count(n, status, fragment):
    if status is None:
        assert check_count(n, LIMITS) is None
        return
    with pytest.raises(RequestError) as caught:
        check_count(n, LIMITS)
    assert caught.value.status == status and fragment in caught.value.message


@pytest.mark.parametrize("n", [1, MAX_IMAGES])
def test_up_to_the_image_limit_is_accepted(n):
    assert pixels_to_mnist(np.zeros((n, SIDE, SIDE), np.float32), LIMITS).shape == (n, SIDE, SIDE)


# ---- refusals -----------------------------------------------------------------------------------------------
def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def over_max(kind):
    return {
        InputKind.ENCODED: [PNG] * (MAX_IMAGES + 1),
        InputKind.JSON: body([blank()] * (MAX_IMAGES + 1)),
        InputKind.PIXELS: [blank()] * (MAX_IMAGES + 1),
        InputKind.NORMALIZED: np.zeros((MAX_IMAGES + 1, 1, SIDE, SIDE), np.float32),
    }[kind]


def normalized_with(value, image=1):
    x = np.zeros((2, 1, SIDE, SIDE), np.float32)
    x[image, 0, 3, 7] = value
    return x


def array_with(value, dtype=np.float32):
    a = np.zeros((2, SIDE, SIDE), dtype)
    a[1, 3, 7] = value
    return a


ONE_PIXEL = ServiceConfig(max_image_pixels=PIXELS - 1)
BUDGET = ServiceConfig(max_request_pixels=2 * PIXELS - 1)
BYTES = ServiceConfig(max_image_bytes=len(PNG) - 1)
J, P, E, N = InputKind.JSON, InputKind.PIXELS, InputKind.ENCODED, InputKind.NORMALIZED
TOO_MANY = f"{MAX_IMAGES + 1} images in one request; the limit is {MAX_IMAGES}"
NOT_OBJECT = 'expected a JSON object {"images": [...]}'
SHAPE = "images must be numbers of shape [N, 28, 28], got"

# name -> (kind, payload, limits, declared, status, reason, message fragment)
REFUSALS = {
    # how many
    "json, no images": (J, body([]), LIMITS, None, 400, "bad_request", "no images"),
    "pixels, no images": (P, [], LIMITS, None, 400, "bad_request", "no images"),
    "encoded, no images": (E, [], LIMITS, None, 400, "bad_request", "no images"),
    "normalized, no images": (
        N,
        np.zeros((0, 1, SIDE, SIDE), np.float32),
        LIMITS,
        None,
        400,
        "bad_request",
        "no images",
    ),
    **{f"{k.value}, too many": (k, over_max(k), LIMITS, None, 413, "too_large", TOO_MANY) for k in (J, P, E, N)},
    # shapes
    "an image a number": (P, [blank(), 5], LIMITS, None, 400, "bad_shape", "images[1] is the number 5; each image"),
    "an image null": (J, body([None]), LIMITS, None, 400, "bad_shape", "images[0] is null; each image must be 28 rows"),
    "an image an object": (J, body([{}]), LIMITS, None, 400, "bad_shape", "images[0] is an object"),
    "27 rows": (P, [blank()[:-1]], LIMITS, None, 400, "bad_shape", "images[0] is a list of 27; each image"),
    "a row of 29": (
        P,
        [blank(), [*blank()[:3], [0.0] * (SIDE + 1), *blank()[4:]]],
        LIMITS,
        None,
        400,
        "bad_shape",
        "images[1][3] is a list of 29; each row of an image has 28 numbers",
    ),
    "a row a string": (
        J,
        body([[*blank()[:2], "x" * 30, *blank()[3:]]]),
        LIMITS,
        None,
        400,
        "bad_shape",
        "images[0][2] is the string '" + "x" * 20 + "'; each row",
    ),
    "a value a list": (P, with_value([]), LIMITS, None, 400, "bad_shape", "images[1][3][7] is a list of 0; expected"),
    "array of [28, 27]": (
        P,
        np.zeros((2, SIDE, SIDE - 1)),
        LIMITS,
        None,
        400,
        "bad_shape",
        f"{SHAPE} float64 of shape [2, 28, 27]",
    ),
    "array of [28, 28]": (
        P,
        np.zeros((SIDE, SIDE)),
        LIMITS,
        None,
        400,
        "bad_shape",
        f"{SHAPE} float64 of shape [28, 28]",
    ),
    "array of [1, 1, 28, 28]": (
        P,
        np.zeros((1, 1, SIDE, SIDE), np.float32),
        LIMITS,
        None,
        400,
        "bad_shape",
        f"{SHAPE} float32 of shape [1, 1, 28, 28]",
    ),
    "array of strings": (P, np.full((1, SIDE, SIDE), "a"), LIMITS, None, 400, "bad_shape", f"{SHAPE} <U1 of shape"),
    "array of objects": (P, np.empty((1, SIDE, SIDE), object), LIMITS, None, 400, "bad_shape", f"{SHAPE} object"),
    # values
    "NaN": (
        P,
        with_value(float("nan")),
        LIMITS,
        None,
        400,
        "bad_shape",
        "images[1][3][7] is NaN; pixel intensities must be finite",
    ),
    "inf": (
        P,
        with_value(float("inf")),
        LIMITS,
        None,
        400,
        "bad_shape",
        "images[1][3][7] is inf; pixel intensities must be finite",
    ),
    "-inf": (P, with_value(float("-inf")), LIMITS, None, 400, "bad_shape", "images[1][3][7] is -inf"),
    "json NaN": (J, body(with_value(float("nan"))), LIMITS, None, 400, "bad_shape", "images[1][3][7] is NaN"),
    "json 1e400": (
        J,
        body([blank()]).replace(b"0.0", b"1e400", 1),
        LIMITS,
        None,
        400,
        "bad_shape",
        "images[0][0][0] is inf",
    ),
    "array NaN": (P, array_with(np.nan), LIMITS, None, 400, "bad_shape", "images[1][3][7] is NaN"),
    "normalized inf": (N, normalized_with(np.inf), LIMITS, None, 400, "bad_shape", "images[1] holds NaN or infinite"),
    "normalized NaN": (
        N,
        normalized_with(np.nan, 0),
        LIMITS,
        None,
        400,
        "bad_shape",
        "images[0] holds NaN or infinite",
    ),
    "2.0": (
        P,
        with_value(2.0),
        LIMITS,
        None,
        400,
        "bad_shape",
        "images[1][3][7] is 2.0; pixel intensities must be in 0..1",
    ),
    "json 2.0": (J, body(with_value(2.0)), LIMITS, None, 400, "bad_shape", "images[1][3][7] is 2.0; pixel intensities"),
    "-0.5": (P, with_value(-0.5), LIMITS, None, 400, "bad_shape", "images[1][3][7] is -0.5; pixel intensities"),
    "int 3": (J, body(with_value(3)), LIMITS, None, 400, "bad_shape", "images[1][3][7] is 3; pixel intensities"),
    "1e20 as an int": (P, with_value(10**20), LIMITS, None, 400, "bad_shape", f"images[1][3][7] is {10**20};"),
    "uint8 255": (P, array_with(255, np.uint8), LIMITS, None, 400, "bad_shape", "images[1][3][7] is"),
    # types
    "a string": (
        J,
        body(with_value("a")),
        LIMITS,
        None,
        400,
        "bad_shape",
        "images[1][3][7] is the string 'a'; expected a number",
    ),
    "a boolean": (
        J,
        body(with_value(True)),
        LIMITS,
        None,
        400,
        "bad_shape",
        "images[1][3][7] is a boolean; expected a number",
    ),
    "false": (P, with_value(False), LIMITS, None, 400, "bad_shape", "images[1][3][7] is a boolean"),
    "null": (J, body(with_value(None)), LIMITS, None, 400, "bad_shape", "images[1][3][7] is null"),
    "an object": (J, body(with_value({})), LIMITS, None, 400, "bad_shape", "images[1][3][7] is an object"),
    "a huge integer": (
        P,
        with_value(10**400),
        LIMITS,
        None,
        400,
        "bad_shape",
        "images[1][3][7] is an integer of 401 digits",
    ),
    "a huge negative integer": (
        P,
        with_value(-(10**400)),
        LIMITS,
        None,
        400,
        "bad_shape",
        "is an integer of 401 digits",
    ),
    "json huge integer": (
        J,
        body(with_value(10**400)),
        LIMITS,
        None,
        400,
        "bad_shape",
        "images[1][3][7] is an integer of 401",
    ),
    "json 5000 digits": (
        J,
        b'{"images": [[[' + b"9" * 5000 + b"]]]}",
        LIMITS,
        None,
        400,
        "bad_request",
        "not valid JSON",
    ),
    # the JSON itself
    "not JSON": (J, b"{not json", LIMITS, None, 400, "bad_request", "the body is not valid JSON ("),
    "empty body": (J, b"", LIMITS, None, 400, "bad_request", "the body is not valid JSON ("),
    "not UTF-8": (J, b'{"images": "\xff"}', LIMITS, None, 400, "bad_request", "the body is not valid JSON ("),
    "nested too deeply": (J, b"[" * 100_000, LIMITS, None, 400, "bad_request", "nested too deeply"),
    "images nested too deeply": (
        J,
        b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        LIMITS,
        None,
        400,
        "bad_request",
        "nested too deeply",
    ),
    "a list": (J, b"[[1, 2]]", LIMITS, None, 400, "bad_request", NOT_OBJECT),
    "a string body": (J, b'"images"', LIMITS, None, 400, "bad_request", NOT_OBJECT),
    "a number body": (J, b"3", LIMITS, None, 400, "bad_request", NOT_OBJECT),
    "no images field": (J, b'{"image": []}', LIMITS, None, 400, "bad_request", NOT_OBJECT),
    "images an object": (
        J,
        b'{"images": {"a": 1}}',
        LIMITS,
        None,
        400,
        "bad_request",
        '"images" must be a list of 28x28 arrays, got dict',
    ),
    "images null": (J, b'{"images": null}', LIMITS, None, 400, "bad_request", "got NoneType"),
    # encoded files
    "not an image": (
        E,
        [PNG, b"hello, world"],
        LIMITS,
        None,
        400,
        "not_an_image",
        "images[1] is not an image in a format",
    ),
    "an empty file": (E, [b""], LIMITS, None, 400, "not_an_image", "images[0] is empty"),
    "truncated": (E, [PNG, truncated(PNG)], LIMITS, None, 400, "not_an_image", "images[1] could not be decoded"),
    "only the signature": (E, [PNG[:20]], LIMITS, None, 400, "not_an_image", "images[0] could not be decoded"),
    "a truncated JPEG": (
        E,
        [truncated(encoded(digit_u8(), "JPEG"))],
        LIMITS,
        None,
        400,
        "not_an_image",
        "could not be decoded",
    ),
    "declared smaller": (
        E,
        [PNG, PNG],
        LIMITS,
        (PIXELS, PIXELS - 1),
        400,
        "not_an_image",
        f"images[1] is inconsistent: its header declares {PIXELS - 1} pixels but the image is 28x28",
    ),
    "over the request's pixel budget": (
        E,
        [PNG, PNG],
        BUDGET,
        None,
        413,
        "over_budget",
        f"the 2 images have {2 * PIXELS} pixels in all; the limit per request is {BUDGET.max_request_pixels}",
    ),
    "over max_image_bytes": (
        E,
        [PNG],
        BYTES,
        None,
        413,
        "too_large",
        f"images[0] is {len(PNG)} bytes; the limit is {BYTES.max_image_bytes} bytes",
    ),
    "over max_image_pixels": (
        E,
        [PNG],
        ONE_PIXEL,
        None,
        413,
        "too_large",
        f"images[0] is 28x28 pixels; the limit is {ONE_PIXEL.max_image_pixels} pixels",
    ),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusals(name):
    kind, payload, limits, declared, status, reason, fragment = REFUSALS[name]
    with pytest.raises(RequestError) as caught:
        model_input(kind, payload, limits, NORM.mean, NORM.std, declared)
    e = caught.value
    assert (e.status, e.reason) == (status, reason), e.message
    assert fragment in e.message, e.message
    assert "\n" not in e.message and len(e.message) < 400


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_an_array_value_out_of_range_is_shown_as_a_plain_number(dtype):
    with pytest.raises(RequestError) as caught:
        pixels_to_mnist(array_with(2.0, dtype), LIMITS)
    assert "images[1][3][7] is 2.0; pixel intensities must be in 0..1" in caught.value.message


@pytest.mark.parametrize(
    "limits",
    [ServiceConfig(max_request_pixels=2 * PIXELS), ServiceConfig(max_image_bytes=len(PNG))],
    ids=["pixel budget", "image bytes"],
)
def test_exactly_at_a_limit_is_accepted(limits):
    assert encoded_to_mnist([PNG, PNG], limits, DECLARED).shape == (2, SIDE, SIDE)


def test_a_file_declared_larger_than_it_is_is_accepted():
    assert encoded_to_mnist([PNG], LIMITS, (PIXELS + 1,)).shape == (1, SIDE, SIDE)


@pytest.mark.parametrize(
    "files, limits, declared",
    [([PNG, PNG], BUDGET, None), ([PNG, PNG], LIMITS, (PIXELS, PIXELS - 1)), ([PNG, b"junk"], LIMITS, None)],
    ids=["over budget", "inconsistent", "a bad second file"],
)
def test_a_refused_request_decodes_no_pixels(files, limits, declared):
    """Every header is read and checked before any image is decoded."""
    before = Counts.decoded_images, Counts.decoded_pixels
    with pytest.raises(RequestError):
        encoded_to_mnist(files, limits, declared)
    assert (Counts.decoded_images, Counts.decoded_pixels) == before


def test_decoding_is_counted():
    before = Counts.decoded_images, Counts.decoded_pixels
    encoded_to_mnist([PNG, PNG], LIMITS, DECLARED)
    assert (Counts.decoded_images - before[0], Counts.decoded_pixels - before[1]) == (2, 2 * PIXELS)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM"])
def test_each_format_gives_one_mnist_image(fmt):
    big = np.full((60, 40), 255, np.uint8)
    big[10:50, 18:23] = 0  # a dark stroke on white: inverted, cropped, centred
    out = encoded_to_mnist([encoded(big, fmt)], LIMITS)
    assert out.shape == (1, SIDE, SIDE) and out.dtype == np.float32
    assert out.min() == 0.0 and 0.5 < out.max() <= 1.0
    assert out[0, :2].max() == 0 and out[0, -2:].max() == 0
