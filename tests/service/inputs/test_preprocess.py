"""The one preprocessing pipeline, on real MNIST digits and on the book's own sample image."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from bench import workloads
from export.samples import realistic
from service.inputs.preprocess import (
    MAX_PIXELS,
    ImageError,
    ImageTooLarge,
    decode,
    image_to_mnist,
    mnist_style,
    normalize,
)
from tests.conftest import BOOK_IMAGE
from tests.service.conftest import png_bytes

SAMPLES_PER_KIND = 60


@pytest.fixture(scope="module")
def onnx_predict(book_export):
    from export.formats import load_runner

    run, _ = load_runner("onnx", book_export.out / "convnet.onnx")
    return lambda batch: run(normalize(np.stack(batch), 0.1302, 0.3069)).argmax(axis=1)


def test_output_is_mnist_shaped_white_on_black_and_centred(mnist_test):
    images, _ = mnist_test
    out = image_to_mnist(png_bytes(255 - images[0].numpy()))  # dark on light: must be inverted back
    assert out.shape == (28, 28) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert out[:2].max() == 0 and out[-2:].max() == 0  # MNIST's empty margin
    ys, xs = np.nonzero(out)
    assert max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 <= 21  # longer side scaled to 20 px
    cy, cx = (np.indices(out.shape) * out).sum(axis=(1, 2)) / out.sum()
    assert abs(cy - 13.5) <= 1 and abs(cx - 13.5) <= 1  # centre of mass at the centre


def test_real_mnist_images_keep_their_accuracy(mnist_test, onnx_predict):
    images, labels = mnist_test
    n = 1000
    batch = [mnist_style(img.numpy() / 255.0) for img in images[:n]]
    accuracy = (onnx_predict(batch) == labels[:n].numpy()).mean()
    assert accuracy >= 0.97


def test_the_books_sample_image_is_a_two(onnx_predict):
    data = BOOK_IMAGE.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"  # a PNG under a .jpg name: decoded by content
    assert onnx_predict([image_to_mnist(data)])[0] == 2


@pytest.mark.parametrize("kind", realistic.KINDS)
def test_real_world_images_come_out_right(kind, mnist_test, onnx_predict):
    images, labels = mnist_test
    files = [realistic.make(kind, images[i].numpy(), seed=i) for i in range(SAMPLES_PER_KIND)]
    expected = labels[:SAMPLES_PER_KIND].numpy()
    ours = (onnx_predict([image_to_mnist(f) for f in files]) == expected).mean()
    plain = (onnx_predict([realistic.plain_resize(f) for f in files]) == expected).mean()
    assert ours >= 0.9, f"{kind}: {ours:.2f} right"
    assert plain <= 0.5, f"{kind}: a plain resize got {plain:.2f} right; the test images are too easy"


@pytest.mark.parametrize("kind", workloads.KINDS)
def test_what_people_send_comes_out_right(kind, mnist_test, onnx_predict):
    """The benchmark's inputs (bench/workloads.py): the page's canvas, screenshots whose window frame lies a
    pixel inside the edge, phone photos up to 12 megapixels (decoded at 1/8 scale, straight to grayscale)."""
    images, labels = mnist_test
    n = 8 if kind == "photo_12mp" else SAMPLES_PER_KIND
    files = [workloads.make(kind, images[i].numpy(), seed=i) for i in range(n)]
    right = (onnx_predict([image_to_mnist(f) for f in files]) == labels[:n].numpy()).mean()
    assert right >= 0.9, f"{kind}: {right:.2f} right"


def test_blank_image_gives_a_blank_input():
    assert not image_to_mnist(png_bytes(np.full((40, 40), 255, np.uint8))).any()


@pytest.mark.parametrize(
    "data, message",
    [(b"", "empty"), (b"hello, not an image", "not an image"), (None, "truncated")],
)
def test_bad_files_are_rejected(data, message, mnist_test):
    if data is None:
        data = png_bytes(mnist_test[0][0].numpy())[:60]
    with pytest.raises(ImageError, match=message):
        decode(data)


def test_decompression_bomb_is_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buf, format="PNG")  # about 50 KB on disk, 400 megapixels
    assert len(buf.getvalue()) < 200_000
    with pytest.raises(ImageTooLarge, match=str(MAX_PIXELS)):
        decode(buf.getvalue())


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P", "I;16"])
def test_pillow_modes(mode, mnist_test):
    digit = Image.fromarray(255 - mnist_test[0][0].numpy(), mode="L").resize((112, 112))
    img = digit.convert(mode) if mode != "I;16" else digit.convert("I")
    buf = io.BytesIO()
    img.save(buf, format="PNG" if mode != "I;16" else "TIFF")
    out = image_to_mnist(buf.getvalue())
    assert out.sum() > 10


def test_normalize_matches_training(mnist_test):
    from training.data import Normalization, to_model_input

    images, _ = mnist_test
    ours = normalize(images[:8].numpy() / np.float32(255.0), 0.1302, 0.3069)
    np.testing.assert_allclose(ours, to_model_input(images[:8], Normalization()).numpy(), atol=1e-6)
    assert torch.is_tensor(torch.from_numpy(ours))


def test_fast_helpers_match_the_library_calls_they_replace():
    """The hand-rolled percentiles and dilations give exactly what np.percentile and two
    cross dilations give, on sizes from a 1x1 image up to the 512 px working size."""
    from scipy import ndimage

    from service.inputs.preprocess import _DIAMOND_2, _grown, _quantiles

    rng = np.random.default_rng(0)
    for shape in [(1, 1), (2, 3), (28, 28), (31, 17), (300, 400), (512, 384)]:
        values = rng.random(shape, dtype=np.float32)
        values[rng.random(shape) < 0.3] = 0.0  # ties, as in a mostly black image
        assert np.array_equal(_quantiles(values), np.percentile(values, (0.5, 50, 99.5)))
        mask = rng.random(shape) < 0.1
        assert np.array_equal(
            ndimage.binary_dilation(mask, structure=_DIAMOND_2), ndimage.binary_dilation(mask, iterations=2)
        )
        assert np.array_equal(_grown(mask), ndimage.binary_dilation(mask, structure=np.ones((3, 3), dtype=bool)))
