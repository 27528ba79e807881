"""multipart/form-data (RFC 7578), parsed from a body already read in full, with explicit limits.

One parser for every upload, so that every malformation gets the same clear 400 (413 for a limit) instead of
whatever the framework underneath does with it. It never follows a URL: a part is either a file or an error.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.errors import bad_request, too_large

MAX_BOUNDARY = 200  # RFC 2046 allows 70; some clients are generous, none needs more than this
MAX_PART_HEADERS = 8 * 1024  # bytes of headers per part
CRLF = b"\r\n"


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None
    data: bytes


def media_type(value: str, header: str = "Content-Type") -> tuple[str, dict[str, str]]:
    """``type/subtype; a=b; c="d"`` -> ("type/subtype", {"a": "b", "c": "d"}); a repeated parameter is an error."""
    head, *rest = _split_params(value)
    params: dict[str, str] = {}
    for item in rest:
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or not key:
            continue
        if key in params:
            raise bad_request(f"the {header} header has the parameter {key!r} twice")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1].replace('\\"', '"')
        params[key] = value
    return head.strip().lower(), params


def _split_params(value: str) -> list[str]:
    """Split on semicolons outside double quotes."""
    if '"' not in value:
        return value.split(";")
    out, current, quoted = [], [], False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        if ch == ";" and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
    out.append("".join(current))
    return out


def boundary_of(content_type: str) -> bytes:
    kind, params = media_type(content_type)
    boundary = params.get("boundary", "")
    if not boundary:
        raise bad_request("multipart/form-data without a boundary parameter in its Content-Type")
    if len(boundary) > MAX_BOUNDARY:
        raise bad_request(f"the multipart boundary is {len(boundary)} characters; the limit is {MAX_BOUNDARY}")
    try:
        return boundary.encode("ascii")
    except UnicodeEncodeError:
        raise bad_request("the multipart boundary must be ASCII") from None


def parse(
    body: bytes, content_type: str, file_field: str, max_files: int, text_fields: tuple[str, ...] = ()
) -> list[Part]:
    """Every part of the body, in order: at most ``max_files`` of ``file_field``, only as file uploads, and each
    of ``text_fields`` at most once, only as text (``filename`` None); any other field is refused."""
    boundary = boundary_of(content_type)
    delimiter = b"--" + boundary
    if body.startswith(delimiter):
        pos = len(delimiter)
    else:  # a preamble: the first delimiter then follows a line break
        found = body.find(CRLF + delimiter)
        if found < 0:
            raise bad_request(
                f"the body does not contain the multipart boundary {boundary.decode()!r} named in its Content-Type"
            )
        pos = found + 2 + len(delimiter)
    parts: list[Part] = []
    files, texts = 0, set()
    separator = CRLF + delimiter
    while True:
        if body.startswith(b"--", pos):  # the closing delimiter
            return parts
        line_end = body.find(CRLF, pos)
        if line_end < 0 or body[pos:line_end].strip(b" \t"):
            raise bad_request("malformed multipart body: a boundary line must end with a line break")
        if len(parts) == max_files + len(text_fields):
            raise too_large(f"more than {max_files} parts in the multipart body; send at most {max_files} images")
        head_end = body.find(CRLF + CRLF, line_end, line_end + MAX_PART_HEADERS + 4)
        if head_end < 0:
            if body.find(CRLF + CRLF, line_end) < 0:
                raise bad_request("multipart body is truncated: a part's headers never end")
            raise too_large(f"a multipart part's headers are over {MAX_PART_HEADERS} bytes")
        end = body.find(separator, head_end + 4)
        if end < 0:
            raise bad_request(f"multipart body is truncated: no closing boundary {delimiter.decode()}--")
        head, data = body[line_end + 2 : head_end], body[head_end + 4 : end]
        part = _part(head, data, len(parts), file_field, text_fields)
        if part.filename is None:
            if part.name in texts:
                raise bad_request(f"the field {part.name!r} is sent twice")
            texts.add(part.name)
        elif (files := files + 1) > max_files:
            raise too_large(f"more than {max_files} parts in the multipart body; send at most {max_files} images")
        parts.append(part)
        pos = end + len(separator)


def _part(head: bytes, data: bytes, index: int, file_field: str, text_fields: tuple[str, ...]) -> Part:
    disposition = None
    for line in head.split(CRLF):
        name, sep, value = line.partition(b":")
        if not sep:
            raise bad_request(f"multipart part {index} has a malformed header line")
        name = name.strip().lower()
        if name == b"content-disposition":
            disposition = value.decode("utf-8", "replace")
        elif name == b"content-transfer-encoding" and value.strip().lower() not in (b"binary", b"8bit", b"7bit"):
            encoding = value.strip().decode("latin-1")[:40]
            raise bad_request(f"multipart part {index} uses Content-Transfer-Encoding {encoding!r}; send raw bytes")
    if disposition is None:
        raise bad_request(f"multipart part {index} has no Content-Disposition header; expected form-data with a name")
    kind, params = media_type(disposition, "Content-Disposition")
    field_name = params.get("name")
    if kind != "form-data" or not field_name:
        raise bad_request(f"multipart part {index} is not a named form-data field")
    filename = params.get("filename", params.get("filename*"))
    if field_name in text_fields:
        if filename is not None:
            raise bad_request(f"multipart part {index} named {field_name!r} is a file; send it as a text field")
        return Part(field_name, None, data)
    if field_name != file_field:
        raise bad_request(f"unknown field {field_name!r}; send each file in the field {file_field!r}")
    if filename is None:
        raise bad_request(
            f"multipart part {index} named {file_field!r} is text, not a file; send each image as a file upload"
        )
    return Part(field_name, filename, data)
