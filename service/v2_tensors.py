"""Tensors of the Open Inference Protocol (KServe v2) over HTTP: JSON ``data`` and the binary tensor extension.

A request is a JSON header, optionally followed by raw tensors: the header's length is in the
``Inference-Header-Content-Length`` header, and each binary input says how many bytes it takes in its
``parameters.binary_data_size``. Binary tensors are little-endian, row-major; a BYTES tensor is a sequence of
elements, each a 4-byte little-endian length and then its bytes. Nothing here is model-specific.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

from service.errors import RequestError, bad_request, too_large

DTYPES = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"), "UINT8": np.dtype("u1"), "INT64": np.dtype("<i8")}
MAX_JSON_BYTES = 4 * 1024 * 1024  # parsed on the worker's event loop: about 40 ms at most; binary is for bulk
_LENGTH = struct.Struct("<I")


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


def parse(body: bytes, header_length: str | None) -> InferRequest:
    """An inference request, its tensors checked against their declared shapes and byte counts."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise bad_request(f"Inference-Header-Content-Length is {header_length!r}; the body is {len(body)} bytes")
        json_part, binary = body[: int(header_length)], memoryview(body)[int(header_length) :]
    else:
        json_part, binary = body, memoryview(b"")
    if len(json_part) > MAX_JSON_BYTES:
        raise too_large(
            f"the JSON part of the request is {len(json_part)} bytes; the limit is {MAX_JSON_BYTES}: send large "
            "tensors with the binary tensor data extension"
        )
    doc = _object(json_part)
    inputs, offset = [], 0
    for i, spec in enumerate(_list(doc, "inputs")):
        tensor, used = _tensor(spec, i, binary[offset:])
        inputs.append(tensor)
        offset += used
    if offset != len(binary):
        raise bad_request(f"the request carries {len(binary)} bytes of binary data; its inputs declare {offset}")
    params = doc.get("parameters") or {}
    binary_flags = {"*": bool(params.get("binary_data_output", False))}
    outputs = None
    if "outputs" in doc:
        outputs = []
        for j, out in enumerate(_list(doc, "outputs")):
            name = out.get("name") if isinstance(out, dict) else None
            if not isinstance(name, str):
                raise bad_request(f"outputs[{j}] needs a name")
            outputs.append(name)
            if "binary_data" in (out.get("parameters") or {}):
                binary_flags[name] = bool(out["parameters"]["binary_data"])
    request_id = doc.get("id")
    return InferRequest(None if request_id is None else str(request_id), inputs, outputs, binary_flags)


def _object(data: bytes) -> dict:
    try:
        doc = json.loads(data)
    except RecursionError:
        raise bad_request("the request's JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request's JSON header is not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(doc, dict):
        raise bad_request('an inference request is a JSON object: {"inputs": [...]}')
    return doc


def _list(doc: dict, key: str) -> list:
    value = doc.get(key)
    if not isinstance(value, list) or not value:
        raise bad_request(f'"{key}" must be a non-empty list')
    return value


def _tensor(spec, i: int, binary: memoryview) -> tuple[Tensor, int]:
    """inputs[i] -> (tensor, binary bytes it used)."""
    if not isinstance(spec, dict):
        raise bad_request(f"inputs[{i}] must be an object with name, shape, datatype and data")
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    where = f"input {name!r}" if isinstance(name, str) else f"inputs[{i}]"
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise bad_request(f"{where} needs a name and a datatype")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad_request(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    size = (spec.get("parameters") or {}).get("binary_data_size")
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
    try:
        values = np.asarray(data, dtype=np.float64 if dtype.kind == "f" else np.int64).ravel()
    except (ValueError, TypeError, OverflowError):
        raise bad_request(f"{where}: data must be numbers (a flat or nested list)") from None
    if values.size != count:
        raise bad_request(f"{where}: shape {shape} holds {count} values; data holds {values.size}")
    if dtype.kind == "u" and values.size and (values.min() < 0 or values.max() > np.iinfo(dtype).max):
        raise bad_request(f"{where}: {datatype} values must be in 0..{np.iinfo(dtype).max}")
    return values.astype(dtype).reshape(shape)


def _dtype(datatype: str, where: str) -> np.dtype:
    if datatype not in DTYPES:
        raise RequestError(400, "bad_shape", f"{where}: unsupported datatype {datatype!r}")
    return DTYPES[datatype]


def encode(
    header: dict, outputs: list[tuple[str, str, np.ndarray]], binary: dict[str, bool]
) -> tuple[bytes, int | None]:
    """The response body: ``header`` plus each (name, datatype, array) output, in JSON or binary as asked.
    Returns (body, the JSON header's length when binary data follows it, else None)."""
    chunks, described = [], []
    for name, datatype, array in outputs:
        entry = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary.get(name, binary["*"]):
            raw = np.ascontiguousarray(array, dtype=DTYPES[datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.ravel().tolist()
        described.append(entry)
    head = json.dumps({**header, "outputs": described}).encode()
    return (head + b"".join(chunks), len(head)) if chunks else (head, None)
