"""How many pixels an encoded image declares, read from its first bytes without a decoder: the batcher's
estimate of what a request will cost, on the event loop, before the request is queued.

It reads the fixed headers of PNG, GIF, BMP, JPEG (its frame marker), WebP, TIFF (its first directory) and
PGM/PPM. Every reader does a bounded amount of work whatever the file: counted loops over fixed offsets or a
bounded prefix, no regular expression (a backtracking pattern turns a few bytes into hours of event loop); any
other file, or one it cannot read within its bounds, counts as the largest image allowed. The work process
reads the real header with Pillow, enforces the budgets, and refuses a file that opens larger than it was priced
here (service/inputs.py): a file whose header understates its size gets a 400, never more work than the queue
accounted for.
"""

from __future__ import annotations

import struct

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # JPEG frame markers
MAX_JPEG_SEGMENTS = 256
MAX_JPEG_FILL = 1024  # 0xFF fill bytes before the frame marker, in all (encoders write none or a few)
PNM_PREFIX = 512  # a PGM/PPM's width and height, with their whitespace and comments, within this prefix
_PNM_SPACE = frozenset(b" \t\n\r\f\v")
_DIGITS = frozenset(b"0123456789")
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
    if d[:1] == b"P" and d[1:2] in (b"1", b"2", b"3", b"4", b"5", b"6"):
        return _pnm(d[:PNM_PREFIX])
    return None


def _jpeg(d: bytes) -> tuple[int, int] | None:
    pos, fill_left = 2, MAX_JPEG_FILL
    for _ in range(MAX_JPEG_SEGMENTS):
        window = d[pos : pos + fill_left + 2]
        fill = len(window) - len(window.lstrip(b"\xff"))  # a marker is 0xFF after any number of 0xFF fill bytes
        if fill == 0 or fill == len(window):
            return None
        fill_left -= fill - 1
        pos += fill - 1
        marker = d[pos + 1]
        if marker in _SOF:
            height, width = struct.unpack(">HH", d[pos + 5 : pos + 9])
            return width, height
        pos += 2 + struct.unpack(">H", d[pos + 2 : pos + 4])[0]
    return None


def _pnm(head: bytes) -> tuple[int, int] | None:
    """Width and height of a PGM/PPM/PBM: after the magic, each is a number of 1-9 digits preceded by
    whitespace or comments (``#`` to the end of the line). One pass over at most ``PNM_PREFIX`` bytes."""
    pos, end, size = 2, len(head), []
    for _ in range(2):
        start = pos
        while pos < end and (head[pos] in _PNM_SPACE or head[pos] == 0x23):  # 0x23: '#'
            if head[pos] == 0x23:
                pos = head.find(b"\n", pos)
                if pos < 0:
                    return None
            pos += 1
        first = pos
        while pos < end and pos - first < 10 and head[pos] in _DIGITS:
            pos += 1
        if first == start or not 0 < pos - first <= 9:  # no separator, no digits, or too many
            return None
        size.append(int(head[first:pos]))
    return size[0], size[1]


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
