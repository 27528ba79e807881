"""The multipart parser on its own: what it accepts, and a clear 400 or 413 for each malformation."""

import pytest

from service.errors import RequestError
from service.http import multipart

CT = "multipart/form-data; boundary=zz"


def part(name="images", filename="a.png", data=b"DATA", extra=b"") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    return b"--zz\r\nContent-Disposition: " + disposition.encode() + b"\r\n" + extra + b"\r\n" + data + b"\r\n"


def parse(body: bytes, content_type: str = CT, max_parts: int = 64):
    return multipart.parse(body, content_type, "images", max_parts)


def test_files_come_back_in_order_with_their_bytes():
    body = part(data=b"\r\n--z binary \x00\xff") + part(filename="b.png", data=b"") + b"--zz--\r\n"
    parts = parse(body)
    assert [(p.filename, p.data) for p in parts] == [("a.png", b"\r\n--z binary \x00\xff"), ("b.png", b"")]


@pytest.mark.parametrize(
    "content_type",
    ['multipart/form-data; boundary="zz"', "Multipart/Form-Data; BOUNDARY=zz", "multipart/form-data;boundary=zz ;x=1"],
)
def test_media_type_spellings(content_type):
    assert len(parse(part() + b"--zz--", content_type)) == 1


def test_a_preamble_and_filename_star_are_accepted():
    body = b"preamble\r\n" + part(filename=None, extra=b"").replace(
        b'name="images"', b"name=\"images\"; filename*=UTF-8''%C3%A9.png"
    )
    assert parse(body + b"--zz--")[0].filename == "UTF-8''%C3%A9.png"


@pytest.mark.parametrize(
    "body, content_type, status, fragment",
    [
        (part() + b"--zz--", "multipart/form-data", 400, "without a boundary"),
        (part() + b"--zz--", "multipart/form-data; boundary=zz; boundary=yy", 400, "parameter 'boundary' twice"),
        (part() + b"--zz--", "multipart/form-data; boundary=" + "b" * 201, 400, "the limit is 200"),
        (b"no boundary anywhere", CT, 400, "does not contain the multipart boundary"),
        (part(), CT, 400, "no closing boundary"),
        (part()[:-3], CT, 400, "no closing boundary"),
        (b"--zz\r\nContent-Disposition: form-data; name=images", CT, 400, "headers never end"),
        (part(name="image") + b"--zz--", CT, 400, "unknown field 'image'; send each file in the field 'images'"),
        (part(filename=None, data=b"http://example.com/x.png") + b"--zz--", CT, 400, "is text, not a file"),
        (part(filename=None, extra=b"X-Note: filename\r\n") + b"--zz--", CT, 400, "is text, not a file"),
        (b"--zz\r\nContent-Type: image/png\r\n\r\nDATA\r\n--zz--", CT, 400, "no Content-Disposition"),
        (b"--zz\r\nContent-Disposition: form-data\r\n\r\nDATA\r\n--zz--", CT, 400, "not a named form-data field"),
        (b"--zz\r\nContent-Disposition: attachment; name=images\r\n\r\nx\r\n--zz--", CT, 400, "not a named"),
        (b"--zz\r\nno colon here\r\n\r\nDATA\r\n--zz--", CT, 400, "malformed header line"),
        (part(extra=b"Content-Transfer-Encoding: base64\r\n") + b"--zz--", CT, 400, "base64"),
        (part(extra=b"Content-Transfer-Encoding: \xff\xfe\r\n") + b"--zz--", CT, 400, "Transfer-Encoding"),
        (part(extra=b"Content-Disposition: form-data; name=\xff\r\n") + b"--zz--", CT, 400, "unknown field"),
        (b"--zzjunk\r\n" + part()[6:] + b"--zz--", CT, 400, "must end with a line break"),
        (part(extra=b"X-Pad: " + b"p" * 9000 + b"\r\n") + b"--zz--", CT, 413, "headers are over 8192 bytes"),
        (part() * 3 + b"--zz--", CT, 413, "more than 2 parts"),
    ],
)
def test_malformed_bodies_are_refused_clearly(body, content_type, status, fragment):
    with pytest.raises(RequestError) as refused:
        parse(body, content_type, max_parts=2)
    assert refused.value.status == status
    assert fragment in refused.value.message
