"""Tensors of the Open Inference Protocol (KServe v2) over HTTP: JSON ``data`` and the binary tensor extension.

A request is a JSON header, optionally followed by raw tensors: the header's length is in the
``Inference-Header-Content-Length`` header, and each binary input says how many bytes it takes in its
``parameters.binary_data_size``. Binary tensors are little-endian, row-major; a BYTES tensor is a sequence of
elements, each a 4-byte little-endian length and then its bytes. Nothing here is model-specific.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import numpy as np

from service.errors import RequestError, bad_request, parsed_json, too_large

DTYPES = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"), "UINT8": np.dtype("u1"), "INT64": np.dtype("<i8")}
OUTPUT_DTYPES = {**DTYPES, "BOOL": np.dtype("?")}  # answers only (looks_like_digit): one byte an element, binary
# The JSON part is parsed on the worker's event loop, so its cost is bounded before parsing, with C-speed
# counts: its size (a 64-image FP32 request in flat JSON is about 1 MB), its arrays and objects (tiny nested
# lists parse slowly), its values and the digits of its numbers. Binary tensors are for bulk.
MAX_JSON_BYTES = 1536 * 1024
MAX_JSON_CONTAINERS = 4096
MAX_JSON_VALUES = 65_536  # commas, a bound on JSON values (a 64-image FP32 request as JSON has 50,175)
# Of all the request's tensors together: a request may carry many inputs, and each is parsed before the model's
# own limits (one input, 64 images) are checked.
MAX_ELEMENTS = 1 << 24  # the model's limits are far smaller and are checked next
MAX_BYTES_ELEMENTS = 4096  # of BYTES tensors: each element is walked in Python, on the event loop
MAX_NAME = 80  # characters of a client's name shown back in a message
# Converting a decimal integer costs time that grows with the square of its digits (Python allows 4,300): no
# value of this protocol needs more than 640, so longer runs of digits are refused before the parser sees them.
MAX_DIGITS = 640
_DIGITS_AS_9 = bytes(0x39 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))  # every digit a 9, the rest spaces
_TOO_MANY_DIGITS = b"9" * (MAX_DIGITS + 1)
MAX_RANK = 8  # numpy allows 64 dimensions; the models take 1 to 4
_LENGTH = struct.Struct("<I")
MAX_HEADER_LENGTH_DIGITS = 12


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    value: np.ndarray | list[bytes]  # an array of ``shape``, or the elements of a BYTES tensor


@dataclass
class InferRequest:
    id: str | None
    inputs: list[Tensor]
    outputs: list[str] | None  # the outputs asked for, by name; None: all of them
    binary: dict[str, bool]  # output name -> answer it as binary; "*": the request's default


def parse(body: bytes, header_length: bytes | None) -> InferRequest:
    """An inference request, its tensors checked against their declared shapes and byte counts."""
    if header_length is not None:
        length = header_length.strip()
        digits_ok = length.isdigit() and len(length) <= MAX_HEADER_LENGTH_DIGITS  # bytes.isdigit: ASCII only
        if not digits_ok or int(length) > len(body):
            shown = length[:20].decode("latin-1")
            raise bad_request(f"Inference-Header-Content-Length is {shown!r}; the body is {len(body)} bytes")
        json_part, binary = body[: int(length)], memoryview(body)[int(length) :]
    else:
        json_part, binary = body, memoryview(b"")
    if len(json_part) > MAX_JSON_BYTES:
        raise too_large(
            f"the JSON part of the request is {len(json_part)} bytes; the limit is {MAX_JSON_BYTES}: send large "
            "tensors with the binary tensor data extension"
        )
    if json_part.count(b"[") + json_part.count(b"{") > MAX_JSON_CONTAINERS:
        raise bad_request(
            f"the request's JSON holds more than {MAX_JSON_CONTAINERS} arrays and objects: send each tensor's data "
            "as one flat list (or as binary)"
        )
    if json_part.count(b",") > MAX_JSON_VALUES:
        raise too_large(
            f"the request's JSON holds more than {MAX_JSON_VALUES} values: send large tensors with the binary tensor "
            "data extension"
        )
    if _TOO_MANY_DIGITS in json_part.translate(_DIGITS_AS_9):  # a substring search in C: linear
        raise bad_request(f"the request's JSON holds a number of more than {MAX_DIGITS} digits")
    doc = _object(json_part)
    inputs, offset, budget = [], 0, {"BYTES": MAX_BYTES_ELEMENTS, "*": MAX_ELEMENTS}
    for i, spec in enumerate(_list(doc, "inputs")):
        tensor, used = _tensor(spec, i, binary[offset:], budget)
        inputs.append(tensor)
        offset += used
    if offset != len(binary):
        raise bad_request(f"the request carries {len(binary)} bytes of binary data; its inputs declare {offset}")
    params = _parameters(doc, "the request")
    binary_flags = {"*": _flag(params, "binary_data_output", "the request")}
    outputs = None
    if "outputs" in doc:
        outputs, seen = [], set()
        for j, out in enumerate(_list(doc, "outputs")):
            name = out.get("name") if isinstance(out, dict) else None
            if not isinstance(name, str):
                raise bad_request(f"outputs[{j}] needs a name")
            if name in seen:
                raise bad_request(f"output {name[:MAX_NAME]!r} is asked for twice")
            seen.add(name)
            outputs.append(name)
            out_params = _parameters(out, f"output {name[:MAX_NAME]!r}")
            if "binary_data" in out_params:
                binary_flags[name] = _flag(out_params, "binary_data", f"output {name[:MAX_NAME]!r}")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad_request("the request's id must be a string")
    return InferRequest(request_id, inputs, outputs, binary_flags)


def _parameters(owner: dict, where: str) -> dict:
    params = owner.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise bad_request(f"{where}: parameters must be a JSON object")
    return params


def _flag(params: dict, name: str, where: str) -> bool:
    value = params.get(name, False)
    if not isinstance(value, bool):
        raise bad_request(f"{where}: parameters.{name} must be true or false")
    return value


def _object(data: bytes) -> dict:
    doc = parsed_json(data, "the request's JSON is nested too deeply", "the request's JSON header is not valid JSON")
    if not isinstance(doc, dict):
        raise bad_request('an inference request is a JSON object: {"inputs": [...]}')
    return doc


def _list(doc: dict, key: str) -> list:
    value = doc.get(key)
    if not isinstance(value, list) or not value:
        raise bad_request(f'"{key}" must be a non-empty list')
    return value


def _tensor(spec, i: int, binary: memoryview, budget: dict[str, int]) -> tuple[Tensor, int]:
    """inputs[i] -> (tensor, binary bytes it used); its elements are taken from the request's ``budget``."""
    if not isinstance(spec, dict):
        raise bad_request(f"inputs[{i}] must be an object with name, shape, datatype and data")
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    where = f"input {name[:MAX_NAME]!r}" if isinstance(name, str) else f"inputs[{i}]"
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise bad_request(f"{where} needs a name and a datatype")
    if isinstance(shape, list) and len(shape) > MAX_RANK:
        raise bad_request(f"{where}: shape has {len(shape)} dimensions; a tensor may have at most {MAX_RANK}")
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d >= 0 for d in shape):
        raise bad_request(f"{where}: shape must be a list of non-negative integers, got {_shown_shape(shape)}")
    # every dimension bounded too, not only their product: a zero elsewhere makes any product 0
    count, largest = math.prod(shape), max(shape)  # Python integers: no overflow whatever the dimensions
    kind = "BYTES" if datatype == "BYTES" else "*"
    if count > budget[kind] or largest > budget[kind]:
        limit = MAX_BYTES_ELEMENTS if kind == "BYTES" else MAX_ELEMENTS
        raise too_large(
            f"{where}: shape {_shown_shape(shape)} holds {_shown_int(max(count, largest))} elements; the "
            f"{datatype[:20]} tensors of a request may hold {limit} in all"
        )
    budget[kind] -= count
    size = _parameters(spec, where).get("binary_data_size")
    if size is not None:
        if type(size) is not int or size < 0 or size > len(binary):
            raise bad_request(f"{where}: binary_data_size {size!r} does not fit the {len(binary)} bytes that follow")
        return Tensor(name, datatype, shape, _from_binary(binary[:size], datatype, shape, count, where)), size
    if "data" not in spec:
        raise bad_request(f"{where} has neither data nor parameters.binary_data_size")
    return Tensor(name, datatype, shape, _from_json(spec["data"], datatype, shape, count, where)), 0


def _from_binary(raw: memoryview, datatype: str, shape: list[int], count: int, where: str):
    if datatype == "BYTES":
        elements, pos = [], 0
        while pos < len(raw):
            if len(elements) == count:  # more than the shape holds: no need to read the rest
                raise bad_request(f"{where}: shape {shape} holds {count} elements; the data holds more")
            if pos + 4 > len(raw) or pos + 4 + (n := _LENGTH.unpack_from(raw, pos)[0]) > len(raw):
                raise bad_request(f"{where}: a BYTES element's length runs past the data")
            elements.append(bytes(raw[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        if len(elements) != count:
            raise bad_request(f"{where}: shape {shape} holds {count} elements; the data holds {len(elements)}")
        return elements
    dtype = _dtype(datatype, where)
    if len(raw) != count * dtype.itemsize:
        raise bad_request(
            f"{where}: {datatype} of shape {shape} is {count * dtype.itemsize} bytes; binary_data_size is {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _from_json(data, datatype: str, shape: list[int], count: int, where: str) -> np.ndarray:
    if datatype == "BYTES":
        raise bad_request(f"{where}: send BYTES tensors (image files) with the binary tensor data extension")
    dtype = _dtype(datatype, where)
    flat = _flat_numbers(data, where, integers=dtype.kind != "f")
    if len(flat) != count:
        raise bad_request(f"{where}: shape {shape} holds {count} values; data holds {len(flat)}")
    try:
        values = np.asarray(flat, dtype=np.float64 if dtype.kind == "f" else np.int64)
    except OverflowError:
        raise bad_request(f"{where}: a value is too large for {datatype}") from None
    if dtype.kind in "iu" and values.size:
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise bad_request(f"{where}: {datatype} values must be in {info.min}..{info.max}")
    if dtype.kind == "f" and values.size:
        if not np.isfinite(values).all():
            raise bad_request(f"{where}: {datatype} values must be finite numbers (no NaN or Infinity)")
        if np.abs(values).max() > np.finfo(dtype).max:
            raise bad_request(f"{where}: a value is too large for {datatype}")
    return values.astype(dtype).reshape(shape)


def _flat_numbers(data, where: str, integers: bool) -> list:
    """The values of a flat or nested list; JSON true, strings and (for integer types) fractions refused."""
    flat = data if isinstance(data, list) and not any(isinstance(v, list) for v in data) else None
    if flat is None:
        if not isinstance(data, list):
            raise bad_request(f"{where}: data must be a list of numbers")
        flat = []
        stack = [data]
        while stack:
            item = stack.pop()
            if isinstance(item, list):
                stack.extend(reversed(item))
            else:
                flat.append(item)
    allowed = (int,) if integers else (int, float)
    if not all(type(v) in allowed for v in flat):
        bad = next(v for v in flat if type(v) not in allowed)
        kind = "integers" if integers else "numbers"
        raise bad_request(f"{where}: data must be {kind}; found {str(bad)[:20]!r} ({type(bad).__name__})")
    return flat


def _dtype(datatype: str, where: str) -> np.dtype:
    if datatype not in DTYPES:
        raise RequestError(400, "bad_shape", f"{where}: unsupported datatype {datatype[:20]!r}")
    return DTYPES[datatype]


def _shown_int(n: int) -> str:
    return str(n) if abs(n) < 10**18 else "a huge number"  # no 4,000-digit numbers in messages


def _shown_shape(value, depth: int = 0) -> str:
    """A client's shape for a message, in bounded work: at most MAX_RANK items of at most two levels of lists,
    numbers shortened, strings cut."""
    if depth == 0 and not isinstance(value, list):
        return type(value).__name__
    if type(value) is int:
        return _shown_int(value)
    if isinstance(value, (bool, float)) or value is None:
        return repr(value)
    if isinstance(value, str):
        return repr(value[:20])
    if isinstance(value, list):
        if depth == 2:
            return "[...]" if value else "[]"
        items = ", ".join(_shown_shape(v, depth + 1) for v in value[:MAX_RANK])
        return "[" + items + (", ...]" if len(value) > MAX_RANK else "]")
    return type(value).__name__


def encode(
    header: dict, outputs: list[tuple[str, str, np.ndarray]], binary: dict[str, bool]
) -> tuple[bytes, int | None]:
    """The response body: ``header`` plus each (name, datatype, array) output, in JSON or binary as asked.
    Returns (body, the JSON header's length when binary data follows it, else None)."""
    chunks, described = [], []
    for name, datatype, array in outputs:
        entry = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary.get(name, binary["*"]):
            raw = np.ascontiguousarray(array, dtype=OUTPUT_DTYPES[datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.ravel().tolist()
        described.append(entry)
    head = json.dumps({**header, "outputs": described}, allow_nan=False).encode()
    return (head + b"".join(chunks), len(head)) if chunks else (head, None)
