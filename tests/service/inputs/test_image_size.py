"""service/inputs/image_size.py: the header sizes the batcher prices requests by, read on the HTTP worker's event loop.

Two things are checked: each format's size is the one Pillow reads, and the work each reader does is bounded
whatever a client sends. Work is counted, not timed: the Python lines the readers execute (a tracer), over
adversarial inputs from a few bytes to 10 MB, must stay under one constant.
"""

from __future__ import annotations

import io
import random
import sys

import pytest
from PIL import Image

from service.inputs import image_size
from service.inputs.image_size import declared_pixels

LARGEST = 25_000_000
MAX_LINES = 10_000  # any input: the readers' loops are bounded by constants (segments, entries, a prefix)


def _encoded(fmt: str, size=(37, 23), mode="L", **kw) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "fmt, mode, kw",
    [
        ("PNG", "L", {}),
        ("PNG", "RGBA", {}),
        ("GIF", "L", {}),
        ("BMP", "RGB", {}),
        ("JPEG", "L", {}),
        ("JPEG", "RGB", {"progressive": True}),
        ("JPEG", "RGB", {"exif": Image.Exif().tobytes() + b"\0" * 40_000}),  # the frame marker after a large APP1
        ("WEBP", "RGB", {"lossless": True}),  # VP8L
        ("WEBP", "RGB", {"quality": 80}),  # VP8
        ("WEBP", "RGBA", {"quality": 80}),  # VP8X
        ("TIFF", "L", {}),
        ("TIFF", "RGB", {"compression": "tiff_lzw"}),
        ("PPM", "L", {}),  # PGM
        ("PPM", "RGB", {}),
        ("PPM", "1", {}),  # PBM
    ],
)
@pytest.mark.parametrize("size", [(1, 1), (37, 23), (1000, 3)])
def test_each_format_declares_what_pillow_reads(fmt, mode, kw, size):
    data = _encoded(fmt, size, mode, **kw)
    with Image.open(io.BytesIO(data)) as img:
        assert img.size == size
    assert declared_pixels(data, LARGEST) == size[0] * size[1]


@pytest.mark.parametrize(
    "header, size",
    [
        (b"P5\n# a comment\n28 28\n255\n", (28, 28)),
        (b"P2 # comment right after the magic\n 3\t\r\n4 255 ", (3, 4)),
        (b"P5 1#c\n000 3000 255\n", (1, 0)),  # a comment inside a number ends it (Pillow reads 1000: refused later)
    ],
)
def test_pnm_headers_with_comments(header, size):
    assert declared_pixels(header, LARGEST) == max(1, size[0] * size[1])


@pytest.mark.parametrize(
    "data",
    [
        b"P5",
        b"P528 28",  # no separator after the magic
        b"P5 1234567890 2",  # a width of ten digits
        b"P5 28",
        b"P5 # a comment that never ends" + b" " * 1000 + b"28 28",
        b"P5" + b" " * 600 + b"28 28",  # past the prefix
        b"\xff\xd8" + b"\xff" * 5000 + b"\xc0\x00\x11\x08\x00\x1c\x00\x1c",  # more fill bytes than allowed
        b"\xff\xd8\x00",
        b"GIF89a",
        b"not an image",
        b"",
    ],
)
def test_unreadable_headers_count_as_the_largest_image(data):
    assert declared_pixels(data, LARGEST) == LARGEST


def test_jpeg_fill_bytes_before_a_marker_are_skipped():
    data = _encoded("JPEG", (40, 30))
    sof = data.index(b"\xff\xc0")
    padded = data[:sof] + b"\xff" * 100 + data[sof:]
    assert declared_pixels(padded, LARGEST) == 1200


class LineCounter:
    """Counts the Python lines executed inside service/inputs/image_size.py while it is active."""

    def __init__(self):
        self.lines = 0
        self.file = image_size.__file__

    def _global(self, frame, event, arg):
        return self._local if frame.f_code.co_filename == self.file else None

    def _local(self, frame, event, arg):
        if event == "line":
            self.lines += 1
        return self._local

    def __enter__(self):
        self._previous = sys.gettrace()
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc):
        sys.settrace(self._previous)


def _adversarial() -> dict[str, bytes]:
    """Inputs built to make a reader walk: runs of what a loop skips, repeated until the input is 10 MB."""
    big = 10 * 1024 * 1024
    jpeg = _encoded("JPEG", (28, 28))
    app = b"\xff\xe1\x00\x04\x00\x00"  # an empty APP1 segment: 6 bytes to jump over
    entry = b"\x0e\x01\x02\x00\x01\x00\x00\x00\0\0\0\0"  # tag 270 (a description): not a size
    tiff_entries = b"II*\0\x08\0\0\0" + (1024).to_bytes(2, "little") + entry * 1024
    cases = {}
    for n in (28, 40, 64, 400, big):  # the PNM pattern that backtracked exponentially: P5, spaces, one more byte
        cases[f"pnm-spaces-{n}"] = b"P5" + b" " * n + b"x"
        cases[f"pnm-comments-{n}"] = b"P5" + b"#\n" * (n // 2) + b"x"
        cases[f"pnm-space-comment-{n}"] = b"P5" + b" #" * (n // 2)
        cases[f"pnm-digits-{n}"] = b"P5 1 " + b"9" * n
        cases[f"jpeg-fill-{n}"] = b"\xff\xd8" + b"\xff" * n + b"\xc0" + jpeg[2:]
        cases[f"jpeg-segments-{n}"] = b"\xff\xd8" + app * (n // 6 + 1) + jpeg[2:]
        cases[f"tiff-{n}"] = tiff_entries + b"\0" * n
    return cases


def test_every_reader_does_bounded_work_on_adversarial_input():
    """The class of the critical finding: work on the event loop that grows with what the client sends. Each
    input here, up to 10 MB, must be read within MAX_LINES Python lines (the old PNM pattern took 18 s of
    regex backtracking on 31 bytes; the old JPEG loop one line per fill byte)."""
    worst = {}
    for name, data in _adversarial().items():
        with LineCounter() as counter:
            declared_pixels(data, LARGEST)
        worst[name] = counter.lines
    assert max(worst.values()) <= MAX_LINES, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    # and it is the same bound at every size: what grows with the input is only C code over bounded slices
    assert worst["jpeg-fill-64"] == worst["jpeg-fill-400"]


def test_fuzzed_headers_do_bounded_work():
    """Real headers of every format with random bytes changed, cut or repeated: each read stays in bounds."""
    rng = random.Random(16)
    seeds = [
        _encoded(f, (300, 200), m)
        for f, m in [("PNG", "L"), ("GIF", "L"), ("BMP", "RGB"), ("JPEG", "RGB"), ("WEBP", "RGB"), ("TIFF", "L")]
    ]
    seeds += [b"P5\n# c\n300 200\n255\n" + bytes(100), b"P6 300 200 255\n" + bytes(100)]
    for _ in range(3000):
        data = bytearray(rng.choice(seeds)[:4096])
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            op = rng.random()
            if op < 0.5:
                data[i] = rng.choice([0x00, 0xFF, 0x20, 0x23, 0x0A, rng.randrange(256)])
            elif op < 0.8:
                data[i:i] = bytes([data[i]]) * rng.randint(1, 5000)
            else:
                del data[i:]
                break
        with LineCounter() as counter:
            pixels = declared_pixels(bytes(data), LARGEST)
        assert 1 <= pixels <= LARGEST
        assert counter.lines <= MAX_LINES


def test_the_request_readers_use_no_regular_expressions():
    """A backtracking pattern is the easiest way back into this class; the modules that read request bytes on
    the event loop use none (str/bytes methods and counted loops instead)."""
    import service.http.front
    import service.http.multipart
    import service.protocols.rest
    import service.protocols.v2
    import service.protocols.v2_codec

    readers = [
        image_size,
        service.http.front,
        service.http.multipart,
        service.protocols.rest,
        service.protocols.v2,
        service.protocols.v2_codec,
    ]
    assert [m.__name__ for m in readers if "re" in vars(m)] == []
