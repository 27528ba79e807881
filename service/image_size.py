"""How many pixels an encoded image declares, read from its first bytes without a decoder: the batcher's
estimate of what a request will cost, on the event loop, before the request is queued.

It reads the fixed headers of PNG, GIF, BMP, JPEG (its frame marker), WebP, TIFF (its first directory) and
PGM/PPM with bounded loops and no allocation; any other file, or one it cannot read, counts as the largest image
allowed. The work process reads the real header with Pillow, enforces the budgets, and refuses a file that opens
larger than it was priced here (service/inputs.py): a file whose header understates its size gets a 400, never
more work than the queue accounted for.
"""

from __future__ import annotations

import re
import struct

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # JPEG frame markers
_PNM = re.compile(rb"P[1-6](?:\s+|#[^\n]*\n)+(\d{1,9})(?:\s+|#[^\n]*\n)+(\d{1,9})")
MAX_JPEG_SEGMENTS = 256
MAX_TIFF_ENTRIES = 1024


def declared_pixels(data: bytes, largest: int) -> int:
    """Width x height from the header, at most ``largest`` (which is also the answer for an unknown file)."""
    try:
        size = _size(data)
    except (struct.error, IndexError, ValueError):
        size = None
    if size is None:
        return largest
    return min(max(1, size[0] * size[1]), largest)


def _size(d: bytes) -> tuple[int, int] | None:
    if d[:8] == b"\x89PNG\r\n\x1a\n" and d[12:16] == b"IHDR":
        return struct.unpack(">II", d[16:24])
    if d[:6] in (b"GIF87a", b"GIF89a"):
        return struct.unpack("<HH", d[6:10])
    if d[:2] == b"BM":
        width, height = struct.unpack("<ii", d[18:26])
        return abs(width), abs(height)
    if d[:2] == b"\xff\xd8":
        return _jpeg(d)
    if d[:4] == b"RIFF" and d[8:12] == b"WEBP":
        return _webp(d)
    if d[:4] in (b"II*\0", b"MM\0*"):
        return _tiff(d)
    if d[:1] == b"P" and (m := _PNM.match(d[:512])):
        return int(m.group(1)), int(m.group(2))
    return None


def _jpeg(d: bytes) -> tuple[int, int] | None:
    pos = 2
    for _ in range(MAX_JPEG_SEGMENTS):
        while d[pos] == 0xFF and d[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        if d[pos] != 0xFF:
            return None
        marker = d[pos + 1]
        if marker in _SOF:
            height, width = struct.unpack(">HH", d[pos + 5 : pos + 9])
            return width, height
        pos += 2 + struct.unpack(">H", d[pos + 2 : pos + 4])[0]
    return None


def _webp(d: bytes) -> tuple[int, int] | None:
    chunk = d[12:16]
    if chunk == b"VP8X":
        return 1 + int.from_bytes(d[24:27], "little"), 1 + int.from_bytes(d[27:30], "little")
    if chunk == b"VP8L":
        bits = int.from_bytes(d[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", d[26:30])
        return width & 0x3FFF, height & 0x3FFF
    return None


def _tiff(d: bytes) -> tuple[int, int] | None:
    """ImageWidth (256) and ImageLength (257) of the first directory: the page the service decodes."""
    order = "<" if d[:2] == b"II" else ">"
    ifd = struct.unpack(order + "I", d[4:8])[0]
    entries = struct.unpack(order + "H", d[ifd : ifd + 2])[0]
    if entries > MAX_TIFF_ENTRIES:
        return None
    found = {}
    for i in range(entries):
        tag, kind, count = struct.unpack(order + "HHI", d[ifd + 2 + 12 * i : ifd + 10 + 12 * i])
        if tag in (256, 257):
            if count != 1 or kind not in (3, 4):  # SHORT or LONG, one value
                return None
            fmt = order + ("H" if kind == 3 else "I")
            found[tag] = struct.unpack(fmt, d[ifd + 10 + 12 * i : ifd + 10 + 12 * i + struct.calcsize(fmt)])[0]
    if 256 in found and 257 in found:
        return found[256], found[257]
    return None
