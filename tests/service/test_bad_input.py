"""Bad input and odd input, over HTTP: malformed multipart (in process and against a real server), a seeded
fuzz of image files, URLs that must never be fetched, images of more than 8 bits, and MNIST itself, which must
get exactly the model's own answers."""

import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
from PIL import Image

from service.inputs.image_size import declared_pixels
from tests.conftest import BOOK_IMAGE
from tests.service.conftest import png_bytes

pytestmark = pytest.mark.slow

CT = "multipart/form-data; boundary=zz"


def part(name="images", filename="a.png", data=b"DATA", extra=b"") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    return b"--zz\r\nContent-Disposition: " + disposition.encode() + b"\r\n" + extra + b"\r\n" + data + b"\r\n"


BOOK = BOOK_IMAGE.read_bytes()
MALFORMED = [  # (content type, body, status, fragment of the message)
    ("multipart/form-data; boundary=other", part(data=BOOK) + b"--zz--\r\n", 400, "does not contain the multipart"),
    (CT, b"--zz\r\nContent-Type: image/png\r\n\r\nx\r\n--zz--\r\n", 400, "no Content-Disposition"),
    (CT, b'--zz\r\nContent-Disposition: form-data; filename="a.png"\r\n\r\nx\r\n--zz--\r\n', 400, "not a named"),
    (CT, part(data=BOOK) * 65 + b"--zz--\r\n", 413, "more than 64 parts"),
    (CT, part(name="meta", filename=None, data=b"x" * 2_000_000) + b"--zz--\r\n", 400, "unknown field 'meta'"),
    (CT, part(extra=b"X-Pad: " + b"p" * 9000 + b"\r\n") + b"--zz--\r\n", 413, "over 8192 bytes"),
    (CT, part(filename="f" * 9000, data=BOOK) + b"--zz--\r\n", 413, "over 8192 bytes"),
    ("multipart/form-data; boundary=" + "b" * 257, b"--" + b"b" * 257 + b"--\r\n", 400, "the limit is 200"),
    (CT, part(name="image", data=BOOK) + b"--zz--\r\n", 400, "unknown field 'image'; send each file in the field"),
    (CT, part(data=BOOK) + part(name="note", filename=None) + b"--zz--\r\n", 400, "unknown field 'note'"),
    (CT, part(data=BOOK), 400, "no closing boundary"),
    (CT, part(filename=None, data=b"https://example.com/seven.png") + b"--zz--\r\n", 400, "text, not a file"),
    (CT, part(filename=None, extra=b"X-Comment: filename\r\n") + b"--zz--\r\n", 400, "text, not a file"),
    ("multipart/form-data; boundary=zz; boundary=yy", part(data=BOOK) + b"--zz--\r\n", 400, "'boundary' twice"),
    ("Multipart/Form-Data; Boundary=zz", part(data=BOOK) + b"--zz--\r\n", 200, '"digit": 2'),
    ("application/json", b'{"images": []}', 415, "expects multipart/form-data"),
]


def _post(client, url, content_type, body, **headers):
    return client.post(url, content=body, headers={"content-type": content_type, **headers})


@pytest.mark.parametrize("content_type, body, status, fragment", MALFORMED)
def test_malformed_multipart_in_process(http, content_type, body, status, fragment):
    response = _post(http, "/predict", content_type, body)
    assert response.status_code == status, response.text
    assert fragment in response.text


def test_malformed_multipart_against_a_real_server(server):
    with httpx.Client(base_url=server, timeout=60) as client:
        for content_type, body, status, fragment in MALFORMED:
            response = _post(client, "/predict", content_type, body)
            assert (response.status_code, fragment in response.text) == (status, True), (fragment, response.text)
        assert _post(client, "/model_info", CT, part() + b"junk").status_code == 200  # a body it does not read
        gzipped = _post(client, "/predict", CT, part(data=BOOK) + b"--zz--", **{"content-encoding": "gzip"})
        assert gzipped.status_code == 415 and "compressed" in gzipped.text


class _Recorder(BaseHTTPRequestHandler):
    hits: list = []

    def do_GET(self):  # noqa: N802 - the standard library's name
        _Recorder.hits.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(BOOK)

    def log_message(self, *args):
        pass


def test_no_url_in_any_part_is_ever_fetched(http):
    recorder = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=recorder.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{recorder.server_port}/seven.png".encode()
    try:
        attempts = [
            part(filename=None, data=url),
            part(filename=None, data=url, extra=b"Content-Type: text/uri-list\r\n"),
            part(filename=None, data=url, extra=b"X-Note: filename=x.png\r\n"),
            part(filename=None, data=url).replace(b'name="images"', b"name=\"images\"; filename*=UTF-8''x.png"),
            part(data=url),
        ]
        for body in attempts:
            response = _post(http, "/predict", CT, body + b"--zz--\r\n")
            assert response.status_code == 400, response.text
    finally:
        recorder.shutdown()
        recorder.server_close()
    assert _Recorder.hits == []


# ---- images ------------------------------------------------------------------------------------------------
def _encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


@pytest.fixture(scope="module")
def seven(mnist_test) -> np.ndarray:
    images, labels = mnist_test
    return images[int(np.flatnonzero(labels.numpy() == 7)[0])].numpy()


@pytest.mark.parametrize(
    "make",
    [
        lambda d: _encode(Image.fromarray(d.astype(np.uint16) * 257), "PNG"),  # 16-bit grayscale PNG
        lambda d: _encode(Image.fromarray((d.astype(np.int64) * 8_421_504).astype(np.int32)), "TIFF"),  # int32 range
        lambda d: _encode(Image.fromarray(d.astype(np.int32)), "TIFF"),  # 32-bit integer holding 0..255
        lambda d: _encode(Image.fromarray(d.astype(np.float32) / 255), "TIFF"),  # float 0..1
        lambda d: _encode(Image.fromarray(d.astype(np.float32) * 1000 - 7), "TIFF"),  # float, its own range
        lambda d: _encode(Image.fromarray(255 - d).resize((280, 280)), "PNG"),  # 8-bit, dark on light, large
    ],
    ids=["png16", "tiff-int32-full", "tiff-int32-8bit", "tiff-float01", "tiff-float-any", "png8-inverted"],
)
def test_high_bit_depth_images_are_scaled_not_clipped(http, seven, make):
    response = http.post("/predict", files=[("images", ("seven", make(seven), "application/octet-stream"))])
    assert response.status_code == 200, response.text
    assert response.json()[0]["digit"] == 7 and response.json()[0]["confidence"] > 0.9


def _fuzz_seeds(digit: np.ndarray) -> list[tuple[str, bytes]]:
    gray = Image.fromarray(255 - digit).resize((112, 112))
    rgb = gray.convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated
    return [
        ("png", _encode(gray, "PNG")),
        ("png-rgba", _encode(gray.convert("RGBA"), "PNG")),
        ("png16", _encode(Image.fromarray(digit.astype(np.uint16) * 257), "PNG")),
        ("png-exif", _encode(rgb, "PNG", exif=exif)),
        ("jpeg", _encode(rgb, "JPEG")),
        ("jpeg-progressive", _encode(rgb, "JPEG", progressive=True)),
        ("jpeg-exif", _encode(rgb, "JPEG", exif=exif)),
        ("gif", _encode(gray.convert("P"), "GIF")),
        ("webp", _encode(rgb, "WEBP")),
        ("webp-lossless-exif", _encode(rgb, "WEBP", lossless=True, exif=exif)),
        ("tiff", _encode(gray, "TIFF", compression="tiff_deflate")),
        ("tiff-float", _encode(Image.fromarray(digit.astype(np.float32)), "TIFF")),
        ("bmp", _encode(rgb, "BMP")),
        ("ico", _encode(rgb, "ICO")),
        ("avif", _encode(rgb, "AVIF")),
    ]


def _mutants(data: bytes, rng: np.random.Generator, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        b = bytearray(data)
        kind = rng.integers(4)
        if kind == 0:  # flip bytes anywhere, the header included
            for pos in rng.integers(0, len(b), rng.integers(1, 16)):
                b[pos] = int(rng.integers(256))
        elif kind == 1:  # truncate
            b = b[: int(rng.integers(1, len(b)))]
        elif kind == 2:  # overwrite a run in the first 64 bytes (sizes, counts, offsets)
            pos = int(rng.integers(0, min(64, len(b) - 4)))
            b[pos : pos + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        else:  # duplicate a slice (repeated chunks and segments)
            start = int(rng.integers(0, len(b)))
            b[start:start] = b[start : start + int(rng.integers(1, 512))]
        out.append(bytes(b))
    return out


def test_fuzzed_image_files_get_200_or_4xx(http, seven):
    """A seeded fuzz of 15 kinds of image file, 20 mutants each: every answer is 200 or a 4xx, never a 5xx."""
    rng = np.random.default_rng(1234)
    statuses = {}
    for kind, data in _fuzz_seeds(seven):
        for i, mutant in enumerate(_mutants(data, rng, 20)):
            response = http.post("/predict", files=[("images", (f"{kind}-{i}", mutant, "application/octet-stream"))])
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code == 200 or 400 <= response.status_code < 500, (kind, i, response.text)
            assert "error" in response.json() if response.status_code != 200 else response.json()[0]["digit"] >= 0
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0  # the fuzz reached both outcomes


def _gif_whose_frame_overflows_its_screen() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (5000, 5000), 255).save(buf, format="GIF")
    data = bytearray(buf.getvalue())
    data[6:10] = b"\x01\x00\x01\x00"  # the logical screen: 1x1; the frame still 5000x5000
    return bytes(data)


def _jpeg_with_a_small_first_frame_marker() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (3000, 3000), 255).save(buf, format="JPEG")
    data = buf.getvalue()
    sof = data.index(b"\xff\xc0")
    length = int.from_bytes(data[sof + 2 : sof + 4], "big")
    small = bytearray(data[sof : sof + 2 + length])
    small[5:9] = b"\x00\x01\x00\x01"  # 1x1, then the real 3000x3000 marker
    return data[:sof] + bytes(small) + data[sof:]


def _pgm_with_a_comment_inside_a_number() -> bytes:
    return b"P5 1#c\n000 3000 255\n" + bytes(1000 * 3000)


@pytest.mark.parametrize(
    "make",
    [_gif_whose_frame_overflows_its_screen, _jpeg_with_a_small_first_frame_marker, _pgm_with_a_comment_inside_a_number],
)
def test_a_file_that_opens_larger_than_its_header_declares_is_refused_undecoded(http, make):
    """The batcher prices a request by the sizes its files' headers declare (service/inputs/image_size.py); a file that
    Pillow opens larger would cost more than it was priced, and is refused before any pixel is decoded."""
    data = make()
    assert declared_pixels(data, 25_000_000) < 100
    response = http.post("/predict", files=[("images", ("odd", data, "application/octet-stream"))])
    assert response.status_code == 400 and "is inconsistent: its header declares" in response.json()["error"]


@pytest.mark.parametrize("mode", ["L", "I;16", "F", "1"])
def test_tiffs_are_priced_at_their_size(mode):
    for size in [(28, 28), (300, 233), (7000, 3)]:
        buf = io.BytesIO()
        Image.new(mode, size).save(buf, format="TIFF")
        assert declared_pixels(buf.getvalue(), 25_000_000) == size[0] * size[1]


# ---- MNIST itself ------------------------------------------------------------------------------------------
def test_mnist_digits_get_the_models_own_answers(server, mnist_test, book_export, test_inputs):
    """All 10,000 test digits, as JSON arrays and as 28x28 PNGs: exactly the predictions of the exported model
    run in process on MNIST's own tensors (no re-cropping, no re-centring)."""
    from export.formats import load_runner

    run, _ = load_runner("onnx", book_export.out / "convnet.onnx")
    expected = np.concatenate([run(x.numpy()).argmax(axis=1) for x in test_inputs[0].split(500)])
    images = mnist_test[0].numpy()
    got_json, got_png = [], []
    with httpx.Client(base_url=server, timeout=120) as client:
        for start in range(0, len(images), 64):
            chunk = images[start : start + 64]
            answer = client.post("/predict_array", json={"images": (chunk / 255.0).tolist()})
            got_json += [r["digit"] for r in answer.json()]
            files = [("images", (f"{start + i}.png", png_bytes(img), "image/png")) for i, img in enumerate(chunk)]
            got_png += [r["digit"] for r in client.post("/predict", files=files).json()]
    assert np.array_equal(got_json, expected) and np.array_equal(got_png, expected)
    labels = mnist_test[1].numpy()
    assert (expected == labels).mean() == pytest.approx(book_export.manifest["verification"]["eager_test_accuracy"])


def _many_scans(digit: np.ndarray, repeats: int) -> bytes:
    """A progressive JPEG whose last scan is repeated: each repeat makes libjpeg read the image again."""
    data = _encode(Image.fromarray(digit).resize((256, 256)), "JPEG", progressive=True)
    last = data.rindex(b"\xff\xda")
    return data[:last] + data[last:-2] * repeats + b"\xff\xd9"


def test_a_jpeg_of_too_many_scans_is_refused_before_decoding(http, seven):
    ok = http.post("/predict", files=[("images", ("ok.jpg", _many_scans(seven, 2), "image/jpeg"))])
    assert ok.status_code == 200, ok.text
    refused = http.post("/predict", files=[("images", ("many.jpg", _many_scans(seven, 40), "image/jpeg"))])
    assert refused.status_code == 413 and "scans; the limit is 32" in refused.text


@pytest.mark.parametrize("fmt", ["ICO", "BLP", "JPEG2000", "PCX", "TGA"])
def test_formats_outside_the_list_are_refused_unread(http, seven, fmt):
    data = _encode(Image.fromarray(seven).convert("P" if fmt == "BLP" else "RGB"), fmt)
    response = http.post("/predict", files=[("images", (f"x.{fmt.lower()}", data, "application/octet-stream"))])
    assert response.status_code == 400 and "not an image in a format the service reads (PNG, JPEG" in response.text
