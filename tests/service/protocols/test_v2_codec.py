"""The Open Inference Protocol's HTTP codec (service/protocols/v2_codec.py), in process: JSON and binary tensors
in, the response out, and every limit at its value and one past it. No server, no model."""

from __future__ import annotations

import json
import struct
import sys

import numpy as np
import pytest

from service.errors import RequestError
from service.protocols.v2_codec import (
    DTYPES,
    MAX_BYTES_ELEMENTS,
    MAX_DIGITS,
    MAX_ELEMENTS,
    MAX_HEADER_LENGTH_DIGITS,
    MAX_JSON_BYTES,
    MAX_JSON_CONTAINERS,
    MAX_JSON_VALUES,
    MAX_NAME,
    MAX_RANK,
    InferRequest,
    encode,
    parse,
)

NUMERIC = list(DTYPES)  # FP32, FP64, UINT8, INT64
_ABSENT = object()
REASONS = {400: "bad_request", 413: "too_large"}


# --- helpers -------------------------------------------------------------------------------------------------------


def tensor(name="x", datatype="FP32", shape=(1,), data=_ABSENT, **parameters) -> dict:
    """One entry of a request's ``inputs``."""
    spec = {"name": name, "datatype": datatype, "shape": list(shape) if isinstance(shape, tuple) else shape}
    if data is not _ABSENT:
        spec["data"] = data
    if parameters:
        spec["parameters"] = parameters
    return spec


def body(*inputs, **fields) -> bytes:
    """A JSON-only request."""
    return json.dumps({"inputs": list(inputs), **fields}).encode()


def numeric_input(name: str, datatype: str, array: np.ndarray) -> tuple[dict, bytes]:
    raw = np.ascontiguousarray(array, dtype=DTYPES[datatype]).tobytes()
    return tensor(name, datatype, array.shape, binary_data_size=len(raw)), raw


def bytes_raw(elements) -> bytes:
    """A BYTES tensor's binary form: each element a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def bytes_input(name: str, shape, elements) -> tuple[dict, bytes]:
    raw = bytes_raw(elements)
    return tensor(name, "BYTES", shape, binary_data_size=len(raw)), raw


def binary_request(*pairs, **fields) -> tuple[bytes, bytes]:
    """(body, Inference-Header-Content-Length) of a request: the JSON header, then the inputs' raw bytes in order.
    A pair's raw part may be b"" for an input sent as JSON ``data``."""
    head = json.dumps({"inputs": [spec for spec, _ in pairs], **fields}).encode()
    return head + b"".join(raw for _, raw in pairs), str(len(head)).encode()


def refused(status: int, fragment: str, data: bytes, header_length: bytes | None = None, reason=None) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse(data, header_length)
    err = info.value
    assert (err.status, err.reason) == (status, reason or REASONS[status]), err.message
    assert fragment in err.message, err.message
    return err


def leaves(data) -> int:
    return sum(leaves(d) for d in data) if isinstance(data, list) else 1


def containers(data: bytes) -> int:
    return data.count(b"[") + data.count(b"{")


def only(parsed: InferRequest):
    assert len(parsed.inputs) == 1
    return parsed.inputs[0]


# --- JSON tensors --------------------------------------------------------------------------------------------------

JSON_VALUES = {  # six values per type, each type's extremes among them; integers are numbers for the float types
    "FP32": [0.0, -1.5, 0.1, float(np.finfo(np.float32).max), -1e-45, 7],
    "FP64": [-0.0, 2.5, 0.1, 1.7976931348623157e308, 5e-324, -7],
    "UINT8": [0, 1, 127, 128, 254, 255],
    "INT64": [0, -1, 2**63 - 1, -(2**63), 2**53 + 1, 42],
}


@pytest.mark.parametrize("layout", ["flat", "nested"])
@pytest.mark.parametrize("shape", [(6,), (2, 3), (3, 2), (1, 2, 3), (3, 1, 2, 1)], ids=str)
@pytest.mark.parametrize("datatype", NUMERIC)
def test_json_tensor_round_trip(datatype, shape, layout):
    values = JSON_VALUES[datatype]
    data = values if layout == "flat" else np.array(values, dtype=object).reshape(shape).tolist()
    parsed = parse(body(tensor("t", datatype, shape, data)), None)
    t = only(parsed)
    assert (t.name, t.datatype, t.shape) == ("t", datatype, list(shape))
    assert t.value.dtype == DTYPES[datatype] and t.value.shape == shape
    expected = np.array(values, dtype=DTYPES[datatype]).reshape(shape)
    assert t.value.tobytes() == expected.tobytes()  # bit for bit: -0.0 and subnormals included
    assert (parsed.id, parsed.outputs, parsed.binary) == (None, None, {"*": False})


def test_nested_data_is_read_row_major():
    t = only(parse(body(tensor(datatype="INT64", shape=(2, 2, 2), data=[[[1, 2], [3, 4]], [[5, 6], [7, 8]]])), None))
    assert t.value.tolist() == [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]
    assert t.value.ravel().tolist() == list(range(1, 9))


@pytest.mark.parametrize("shape, data", [((0,), []), ((2, 0), [[], []]), ((0, 3), []), ((3, 0, 2), [])], ids=str)
@pytest.mark.parametrize("datatype", NUMERIC)
def test_empty_json_tensors(datatype, shape, data):
    t = only(parse(body(tensor(datatype=datatype, shape=shape, data=data)), None))
    assert t.value.shape == shape and t.value.dtype == DTYPES[datatype] and t.value.size == 0


@pytest.mark.parametrize(
    "shape, data, fragment",
    [
        ([3], [1, 2], "shape [3] holds 3 values; data holds 2"),
        ([2], [1, 2, 3], "shape [2] holds 2 values; data holds 3"),
        ([2, 2], [[1, 2], [3]], "shape [2, 2] holds 4 values; data holds 3"),
        ([2], [], "data holds 0"),
        ([0], [1], "shape [0] holds 0 values; data holds 1"),
        ([1, 1], [[[1, 2]]], "shape [1, 1] holds 1 values; data holds 2"),
        ([2, 3], [[1, 2, 3]], "holds 6 values; data holds 3"),
    ],
)
@pytest.mark.parametrize("datatype", NUMERIC)
def test_json_data_must_match_the_shape(datatype, shape, data, fragment):
    err = refused(400, fragment, body(tensor(datatype=datatype, shape=shape, data=data)))
    assert err.message.startswith("input 'x': ")


REFUSED_VALUES = [
    *[(dt, [1, True], "found 'True' (bool)") for dt in NUMERIC],
    *[(dt, [[0], [False]], "found 'False' (bool)") for dt in NUMERIC],
    ("FP32", ["1.0"], "data must be numbers; found '1.0' (str)"),
    ("FP64", [1.0, "nan"], "data must be numbers; found 'nan' (str)"),
    ("INT64", ["1"], "data must be integers; found '1' (str)"),
    ("UINT8", [None], "found 'None' (NoneType)"),
    ("FP64", [{"v": 1}], "(dict)"),
    ("UINT8", [1.5], "data must be integers; found '1.5' (float)"),
    ("INT64", [[1], [2.5]], "data must be integers; found '2.5' (float)"),
    ("INT64", [-0.5], "found '-0.5' (float)"),
    ("UINT8", [0, 256], "UINT8 values must be in 0..255"),
    ("UINT8", [-1, 0], "UINT8 values must be in 0..255"),
    ("UINT8", [2**63], "a value is too large for UINT8"),
    ("INT64", [2**63], "a value is too large for INT64"),
    ("INT64", [-(2**63) - 1], "a value is too large for INT64"),
    ("INT64", [10**30, 1], "a value is too large for INT64"),
    ("FP32", [10**400], "a value is too large for FP32"),
    ("FP64", [1.0, -(10**400)], "a value is too large for FP64"),
    *[(dt, bad, "data must be a list of numbers") for dt in NUMERIC for bad in (5, "abc", {"v": [1]}, None, True)],
]


@pytest.mark.parametrize("datatype, data, fragment", REFUSED_VALUES)
def test_json_values_are_checked(datatype, data, fragment):
    shape = [leaves(data)] if isinstance(data, list) else [1]
    err = refused(400, fragment, body(tensor(datatype=datatype, shape=shape, data=data)))
    assert err.message.startswith("input 'x': ")


@pytest.mark.parametrize("value", [1e39, -3.5e38])
def test_fp32_values_out_of_range_are_refused(value):
    refused(400, "FP32", body(tensor(shape=[2], data=[0.0, value])))


def test_bytes_tensors_are_not_taken_as_json():
    refused(400, "send BYTES tensors (image files) with the binary", body(tensor(datatype="BYTES", data=["aGk="])))


def test_a_tensor_needs_data_or_binary_data_size():
    refused(400, "input 'x' has neither data nor parameters.binary_data_size", body(tensor()))
    refused(400, "has neither data", body(tensor(binary_data_size=None)))  # null: as if absent


@pytest.mark.parametrize("datatype", ["FP16", "fp32", "BOOL", "INT32", "UINT16", "", "BYTES "])
@pytest.mark.parametrize("how", ["json", "binary"])
def test_unsupported_datatypes(datatype, how):
    if how == "json":
        data, header_length = body(tensor(datatype=datatype, data=[1])), None
    else:
        data, header_length = binary_request((tensor(datatype=datatype, binary_data_size=4), b"\0" * 4))
    refused(400, f"input 'x': unsupported datatype {datatype!r}", data, header_length, reason="bad_shape")


# --- binary tensors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6,), (2, 3), (3, 1, 2)], ids=str)
@pytest.mark.parametrize("datatype", NUMERIC)
def test_binary_tensor_round_trip(datatype, shape):
    array = np.array(JSON_VALUES[datatype], dtype=DTYPES[datatype]).reshape(shape)
    data, header_length = binary_request(numeric_input("t", datatype, array))
    t = only(parse(data, header_length))
    assert (t.name, t.datatype, t.shape) == ("t", datatype, list(shape))
    assert t.value.dtype == DTYPES[datatype] and t.value.shape == shape
    assert t.value.tobytes() == array.tobytes()


@pytest.mark.parametrize(
    "datatype, fmt, values",
    [
        ("FP32", "<3f", (1.5, -2.0, 0.25)),
        ("FP64", "<2d", (-1.0e-300, 3.0)),
        ("UINT8", "<4B", (0, 1, 128, 255)),
        ("INT64", "<2q", (-2, 2**62)),
    ],
)
def test_binary_tensors_are_little_endian(datatype, fmt, values):
    raw = struct.pack(fmt, *values)
    data, header_length = binary_request(
        (tensor(datatype=datatype, shape=[len(values)], binary_data_size=len(raw)), raw)
    )
    assert only(parse(data, header_length)).value.tolist() == list(values)


def test_binary_non_finite_floats_pass_bit_for_bit():
    array = np.array([np.nan, np.inf, -np.inf, -0.0], dtype=np.float32)
    data, header_length = binary_request(numeric_input("x", "FP32", array))
    assert only(parse(data, header_length)).value.tobytes() == array.tobytes()


def test_inputs_take_their_binary_data_in_order_and_json_inputs_take_none():
    a = np.arange(4, dtype=np.float32).reshape(2, 2) / 3
    b = np.array([9, 8, 7, 6, 5], dtype=np.uint8)
    images = [b"\x89PNG...", b"", b"GIF89a"]
    data, header_length = binary_request(
        numeric_input("a", "FP32", a),
        (tensor("j", "INT64", (3,), [1, -2, 3]), b""),
        numeric_input("b", "UINT8", b),
        bytes_input("s", [3], images),
        (tensor("k", "FP64", (1,), [0.5]), b""),
        id="req-1",
    )
    parsed = parse(data, header_length)
    assert [t.name for t in parsed.inputs] == ["a", "j", "b", "s", "k"]
    by_name = {t.name: t.value for t in parsed.inputs}
    assert by_name["a"].tobytes() == a.tobytes() and by_name["b"].tobytes() == b.tobytes()
    assert by_name["j"].tolist() == [1, -2, 3] and by_name["k"].tolist() == [0.5]
    assert by_name["s"] == images and parsed.id == "req-1"


def test_the_binary_part_does_not_count_against_the_json_limits():
    array = np.zeros(MAX_JSON_BYTES + 1, dtype=np.uint8)
    data, header_length = binary_request(numeric_input("x", "UINT8", array))
    assert len(data) > MAX_JSON_BYTES
    assert only(parse(data, header_length)).value.size == MAX_JSON_BYTES + 1


@pytest.mark.parametrize(
    "elements, shape",
    [
        ([b"png"], [1]),
        ([b"", b"abc", b"\x00" * 5, b""], [4]),
        ([b""] * 3, [3]),
        ([b"a", b"bb", b"ccc", b"dddd"], [2, 2]),
        ([bytes(range(256)) * 4], [1, 1]),
        ([], [0]),
        ([], [2, 0]),
    ],
    ids=["one", "with-empty-elements", "all-empty", "2x2", "1k-element", "none", "2x0"],
)
def test_bytes_tensor_round_trip(elements, shape):
    data, header_length = binary_request(bytes_input("img", shape, elements))
    t = only(parse(data, header_length))
    assert (t.datatype, t.shape, t.value) == ("BYTES", shape, elements)
    assert all(type(e) is bytes for e in t.value)


@pytest.mark.parametrize(
    "raw, shape, fragment",
    [
        (struct.pack("<I", 10) + b"abc", [1], "a BYTES element's length runs past the data"),
        (struct.pack("<I", 0xFFFFFFFF) + b"x", [1], "a BYTES element's length runs past the data"),
        (b"\x01\x00", [1], "a BYTES element's length runs past the data"),  # a cut length
        (bytes_raw([b"ok"]) + b"\x00\x00\x00", [2], "a BYTES element's length runs past the data"),
        (bytes_raw([b"ok"]) + struct.pack("<I", 5) + b"1234", [2], "a BYTES element's length runs past the data"),
        (bytes_raw([b"a", b"b", b"c"]), [2], "shape [2] holds 2 elements; the data holds more"),
        (bytes_raw([b"", b""]), [1], "shape [1] holds 1 elements; the data holds more"),
        (bytes_raw([b""]), [0], "shape [0] holds 0 elements; the data holds more"),
        (bytes_raw([b"a"]), [3], "shape [3] holds 3 elements; the data holds 1"),
        (bytes_raw([b"a", b""]), [2, 2], "shape [2, 2] holds 4 elements; the data holds 2"),
        (b"", [2], "shape [2] holds 2 elements; the data holds 0"),
    ],
    ids=[
        "length-past-end",
        "length-2**32-1",
        "cut-length",
        "second-length-cut",
        "second-past-end",
        "more-elements",
        "more-empty-elements",
        "elements-for-zero",
        "fewer",
        "fewer-2d",
        "no-elements",
    ],
)
def test_bytes_tensor_errors(raw, shape, fragment):
    data, header_length = binary_request((tensor("img", "BYTES", shape, binary_data_size=len(raw)), raw))
    refused(400, f"input 'img': {fragment}", data, header_length)


@pytest.mark.parametrize(
    "datatype, shape, size, fragment",
    [
        ("FP32", [2], 7, "FP32 of shape [2] is 8 bytes; binary_data_size is 7"),
        ("FP32", [2], 9, "FP32 of shape [2] is 8 bytes; binary_data_size is 9"),
        ("FP64", [1, 1], 4, "FP64 of shape [1, 1] is 8 bytes; binary_data_size is 4"),
        ("UINT8", [3], 2, "UINT8 of shape [3] is 3 bytes; binary_data_size is 2"),
        ("INT64", [0], 8, "INT64 of shape [0] is 0 bytes; binary_data_size is 8"),
    ],
)
def test_fixed_size_binary_tensors_must_match_their_shape(datatype, shape, size, fragment):
    data, header_length = binary_request((tensor(datatype=datatype, shape=shape, binary_data_size=size), b"\0" * size))
    refused(400, f"input 'x': {fragment}", data, header_length)


@pytest.mark.parametrize("size", [5, 1 << 40, -1, 1.5, 4.0, "4", True, [4], {"n": 4}], ids=repr)
def test_binary_data_size_must_be_an_int_that_fits(size):
    data, header_length = binary_request((tensor(datatype="UINT8", shape=[4], binary_data_size=size), b"\0" * 4))
    refused(400, f"input 'x': binary_data_size {size!r} does not fit the 4 bytes that follow", data, header_length)


def test_binary_data_size_counts_only_the_bytes_after_earlier_inputs():
    first = numeric_input("a", "UINT8", np.zeros(5, np.uint8))
    data, header_length = binary_request(first, (tensor("b", "UINT8", [4], binary_data_size=4), b"\0" * 3))
    refused(400, "input 'b': binary_data_size 4 does not fit the 3 bytes that follow", data, header_length)


def test_binary_data_size_without_a_binary_part():
    refused(400, "binary_data_size 4 does not fit the 0 bytes that follow", body(tensor(binary_data_size=4)))
    empty = only(parse(body(tensor(shape=[0], binary_data_size=0)), None))
    assert empty.value.shape == (0,)


def test_trailing_bytes_no_input_declares_are_refused():
    data, header_length = binary_request(numeric_input("x", "FP32", np.ones(1, np.float32)))
    refused(400, "the request carries 6 bytes of binary data; its inputs declare 4", data + b"\0\0", header_length)
    data, header_length = binary_request((tensor(data=[1.0]), b"abc"))
    refused(400, "the request carries 3 bytes of binary data; its inputs declare 0", data, header_length)


# --- Inference-Header-Content-Length -------------------------------------------------------------------------------

HEAD = body(tensor(data=[1.0]))
N = str(len(HEAD))


@pytest.mark.parametrize(
    "header_length",
    [N, f" {N} ", f"\t{N}\r\n", f"0{N}", N.zfill(MAX_HEADER_LENGTH_DIGITS)],
    ids=["plain", "spaces", "tab-crlf", "leading-zero", "max-digits"],
)
def test_header_length_accepted_forms(header_length):
    assert only(parse(HEAD, header_length.encode())).value.tolist() == [1.0]


@pytest.mark.parametrize(
    "header_length",
    [
        b"",
        b"  ",
        b"abc",
        b"-5",
        b"+5",
        b"5.0",
        b"0x1f",
        b"1e2",
        b"1 2",
        "\u0663".encode(),  # ARABIC-INDIC DIGIT THREE: a digit to str.isdigit, not to bytes.isdigit
        "\uff15".encode(),  # FULLWIDTH DIGIT FIVE
        b"\xb2",  # superscript two in Latin-1
        N.zfill(MAX_HEADER_LENGTH_DIGITS + 1).encode(),  # the same length, one digit too many
        b"9" * 100,
        str(len(HEAD) + 1).encode(),  # larger than the body
        str(10**MAX_HEADER_LENGTH_DIGITS - 1).encode(),
    ],
    ids=repr,
)
def test_header_length_refused_forms(header_length):
    err = refused(400, "Inference-Header-Content-Length is ", HEAD, header_length)
    assert f"the body is {len(HEAD)} bytes" in err.message
    assert repr(header_length.strip()[:20].decode("latin-1")) in err.message
    assert len(err.message) < 120  # the value is shown cut to 20 characters


def test_header_length_equal_to_the_body_means_no_binary_part_and_zero_means_no_json():
    assert only(parse(HEAD, str(len(HEAD)).encode())).value.tolist() == [1.0]
    refused(400, "the request's JSON header is not valid JSON", HEAD, b"0")


# --- the limits ----------------------------------------------------------------------------------------------------


def padded(size: int, head: bytes = HEAD) -> bytes:
    """A JSON header of exactly ``size`` bytes: trailing whitespace is JSON."""
    return head + b" " * (size - len(head))


@pytest.mark.parametrize("binary_part", [False, True], ids=["json-only", "header-then-binary"])
def test_max_json_bytes(binary_part):
    def request(size: int) -> tuple[bytes, bytes | None]:
        if not binary_part:
            return padded(size), None
        head = padded(size, body(tensor(datatype="UINT8", shape=[4], binary_data_size=4)))
        return head + b"\1\2\3\4", str(size).encode()  # the limit is on the JSON header, whatever follows it

    assert len(request(MAX_JSON_BYTES)[0]) == MAX_JSON_BYTES + 4 * binary_part
    assert only(parse(*request(MAX_JSON_BYTES))).value.size == 1 + 3 * binary_part
    refused(413, f"is {MAX_JSON_BYTES + 1} bytes; the limit is {MAX_JSON_BYTES}", *request(MAX_JSON_BYTES + 1))


def rows(n: int) -> bytes:  # n arrays: [[0], [0], ...]
    return body(tensor(datatype="UINT8", shape=[n, 1], data=[[0]] * n))


def output_objects(n: int) -> bytes:  # n objects: {"name": "o0"}, ...
    return body(tensor(data=[1.0]), outputs=[{"name": f"o{i}"} for i in range(n)])


@pytest.mark.parametrize("build", [rows, output_objects])
def test_max_json_containers(build):
    n = MAX_JSON_CONTAINERS - containers(build(0))
    at_limit = build(n)
    assert containers(at_limit) == MAX_JSON_CONTAINERS
    parse(at_limit, None)
    refused(400, f"holds more than {MAX_JSON_CONTAINERS} arrays and objects", build(n + 1))


def test_max_json_values():
    def flat(n: int) -> bytes:
        return body(tensor(datatype="UINT8", shape=[n], data=[0] * n))

    n = MAX_JSON_VALUES - flat(1).count(b",") + 1
    assert flat(n).count(b",") == MAX_JSON_VALUES
    assert only(parse(flat(n), None)).value.size == n
    refused(413, f"holds more than {MAX_JSON_VALUES} values", flat(n + 1))


@pytest.mark.parametrize(
    "parts",
    [
        [("UINT8", MAX_ELEMENTS)],
        [("UINT8", MAX_ELEMENTS // 2)] * 2,
        [("UINT8", MAX_ELEMENTS // 4)] * 4,
        [("UINT8", MAX_ELEMENTS - 3), ("FP32", 1), ("FP64", 1), ("INT64", 1)],
    ],
    ids=["one", "two-halves", "four-quarters", "mixed-types"],
)
def test_max_elements_is_a_budget_for_all_numeric_tensors_of_a_request(parts):
    pairs = [numeric_input(f"x{i}", dt, np.zeros(n, DTYPES[dt])) for i, (dt, n) in enumerate(parts)]
    parsed = parse(*binary_request(*pairs))
    assert sum(t.value.size for t in parsed.inputs) == MAX_ELEMENTS
    extra = (tensor("extra", "FP32", (1,), [0.5]), b"")
    err = refused(413, f"the FP32 tensors of a request may hold {MAX_ELEMENTS} in all", *binary_request(*pairs, extra))
    assert err.message.startswith("input 'extra': shape [1] holds 1 elements")


@pytest.mark.parametrize(
    "shape",
    [
        [MAX_ELEMENTS + 1],
        [1, MAX_ELEMENTS + 1],
        [2, MAX_ELEMENTS // 2 + 1],
        [0, MAX_ELEMENTS + 1],  # no elements, but a dimension past the limit
        [MAX_ELEMENTS + 1, 0],
        [*[1] * (MAX_RANK - 1), MAX_ELEMENTS + 1],
        [2**62, 2**62],
        [10**100],
    ],
    ids=["flat", "1xN", "2xN/2", "0xN", "Nx0", "max-rank", "2**62-squared", "googol"],
)
@pytest.mark.parametrize("datatype", ["FP32", "UINT8"])
def test_shapes_over_max_elements(datatype, shape):
    err = refused(
        413,
        f"the {datatype} tensors of a request may hold {MAX_ELEMENTS} in all",
        body(tensor("big", datatype, shape, [])),
    )
    assert err.message.startswith("input 'big': shape ")


@pytest.mark.parametrize("shape", [[0, MAX_ELEMENTS], [MAX_ELEMENTS, 0], [0] * MAX_RANK])
def test_zero_elements_next_to_a_dimension_at_the_limit(shape):
    assert only(parse(body(tensor(shape=shape, data=[])), None)).value.shape == tuple(shape)


@pytest.mark.parametrize(
    "parts, extra",
    [
        ([MAX_BYTES_ELEMENTS], 1),
        ([MAX_BYTES_ELEMENTS // 2] * 2, 1),
        ([3000], 3000),
        ([1000] * 4, 1000),
        ([1] * 16, MAX_BYTES_ELEMENTS - 15),
    ],
    ids=["one-at-limit", "two-halves", "two-of-3000", "five-of-1000", "sixteen-small-then-one-large"],
)
def test_max_bytes_elements_is_a_budget_for_all_bytes_tensors_of_a_request(parts, extra):
    pairs = [bytes_input(f"b{i}", [n], [b""] * n) for i, n in enumerate(parts)]
    parsed = parse(*binary_request(*pairs))
    assert [len(t.value) for t in parsed.inputs] == parts
    last = bytes_input("extra", [extra], [b""] * extra)
    err = refused(
        413, f"the BYTES tensors of a request may hold {MAX_BYTES_ELEMENTS} in all", *binary_request(*pairs, last)
    )
    assert err.message.startswith(f"input 'extra': shape [{extra}] holds {extra} elements")


@pytest.mark.parametrize("shape", [[MAX_BYTES_ELEMENTS + 1], [0, MAX_BYTES_ELEMENTS + 1], [2, MAX_BYTES_ELEMENTS]])
def test_bytes_shapes_over_max_bytes_elements(shape):
    data, header_length = binary_request((tensor("img", "BYTES", shape, binary_data_size=0), b""))
    refused(413, f"the BYTES tensors of a request may hold {MAX_BYTES_ELEMENTS} in all", data, header_length)


def test_bytes_and_numeric_tensors_have_separate_budgets():
    data, header_length = binary_request(
        bytes_input("img", [MAX_BYTES_ELEMENTS], [b""] * MAX_BYTES_ELEMENTS),
        numeric_input("px", "UINT8", np.zeros(MAX_ELEMENTS, np.uint8)),
    )
    parsed = parse(data, header_length)
    assert len(parsed.inputs[0].value) == MAX_BYTES_ELEMENTS and parsed.inputs[1].value.size == MAX_ELEMENTS


def test_a_shape_whose_product_is_astronomical_is_a_413():
    refused(413, "may hold", body(tensor(shape=[10**600, 10**600], data=[])))


def test_a_huge_dimension_is_shown_cut_in_the_message():
    err = refused(413, "may hold", body(tensor(shape=[0, 10**600], data=[])))
    assert len(err.message) < 300


@pytest.mark.parametrize("digits", [MAX_DIGITS + 1, 4000])
def test_numbers_of_too_many_digits_are_refused_before_parsing(digits):
    refused(400, f"a number of more than {MAX_DIGITS} digits", body(tensor(shape=[1], data=[int("9" * digits)])))
    refused(400, f"a number of more than {MAX_DIGITS} digits", b"1" * digits)


def test_a_number_of_the_most_digits_allowed_is_parsed():
    refused(400, "a value is too large for FP32", body(tensor(shape=[1], data=[int("9" * MAX_DIGITS)])))


def test_max_rank():
    t = only(parse(body(tensor(shape=[1] * MAX_RANK, data=[0.5])), None))
    assert t.value.ndim == MAX_RANK
    for rank in (MAX_RANK + 1, 1000):
        fragment = f"input 'x': shape has {rank} dimensions; a tensor may have at most {MAX_RANK}"
        refused(400, fragment, body(tensor(shape=[1] * rank, data=[0.5])))


@pytest.mark.parametrize(
    "shape, shown",
    [
        (_ABSENT, "NoneType"),
        (None, "NoneType"),
        ("3", "str"),
        (3, "int"),
        ({"0": 1}, "dict"),
        ([], "[]"),
        ([-1], "[-1]"),
        ([2, -3], "[2, -3]"),
        ([1.0], "[1.0]"),
        ([True], "[True]"),
        (["2"], "['2']"),
        ([None], "[None]"),
        ([[2]], "[[2]]"),
    ],
    ids=repr,
)
def test_shape_must_be_a_list_of_non_negative_ints(shape, shown):
    spec = tensor(data=[1.0])
    if shape is _ABSENT:
        del spec["shape"]
    else:
        spec["shape"] = shape
    refused(400, f"input 'x': shape must be a list of non-negative integers, got {shown}", body(spec))


LONG = "n" * MAX_NAME + "Z" * 40


@pytest.mark.parametrize(
    "data",
    [
        body(tensor(LONG, shape="x", data=[1.0])),
        body(tensor(LONG, shape=[1] * (MAX_RANK + 1), data=[1.0])),
        body(tensor(LONG, shape=[MAX_ELEMENTS + 1], data=[])),
        body(tensor(LONG, shape=[2], data=[1.0])),
        body(tensor(LONG, datatype="UINT8", data=[300])),
        body(tensor(LONG, data=["a"])),
        body(tensor(LONG)),
        body({**tensor(LONG, data=[1.0]), "parameters": []}),
        body(tensor(LONG, binary_data_size=3)),
        body(tensor(LONG, datatype="BYTES", data=[])),
        body(tensor(LONG, datatype="FP16", data=[1.0])),
        body(tensor(LONG, datatype=None)),
        body(tensor(data=[1.0]), outputs=[{"name": LONG, "parameters": []}]),
        body(tensor(data=[1.0]), outputs=[{"name": LONG, "parameters": {"binary_data": "yes"}}]),
        body(tensor(data=[1.0]), outputs=[{"name": LONG}, {"name": LONG}]),
    ],
    ids=[
        "shape",
        "rank",
        "elements",
        "count",
        "range",
        "type",
        "no-data",
        "input-parameters",
        "binary-size",
        "bytes-as-json",
        "datatype",
        "no-datatype",
        "output-parameters",
        "output-flag",
        "duplicate-output",
    ],
)
def test_names_are_shown_cut_to_max_name(data):
    with pytest.raises(RequestError) as info:
        parse(data, None)
    assert info.value.status in (400, 413)
    message = info.value.message
    assert repr("n" * MAX_NAME) in message and "Z" not in message, message  # quoted: exactly MAX_NAME characters


def test_a_long_datatype_is_shown_cut_in_the_elements_message():
    err = refused(413, "may hold", body(tensor(datatype="Q" * 1000, shape=[MAX_ELEMENTS + 1], data=[])))
    assert "Q" * 20 in err.message and "Q" * 21 not in err.message


def test_an_unsupported_long_datatype_is_shown_cut():
    err = refused(400, "unsupported datatype", body(tensor(datatype="Q" * 10_000, data=[1.0])), reason="bad_shape")
    assert len(err.message) < 300


# --- the request's structure ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"[]", b'"inputs"', b"1", b"null", b"true", b'[{"inputs": []}]'], ids=repr)
def test_a_request_is_a_json_object(data):
    refused(400, 'an inference request is a JSON object: {"inputs": [...]}', data)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"   ",
        b"{",
        b'{"inputs": [}',
        b"{'inputs': []}",
        b'{"inputs": [1,]}',
        b'{"id": "\xff"}',
        b"\xff\xfe\x00",
    ],
    ids=[
        "empty",
        "blank",
        "open",
        "unbalanced",
        "single-quotes",
        "trailing-comma",
        "bad-utf8",
        "bom-junk",
    ],
)
def test_invalid_json(data):
    err = refused(400, "the request's JSON header is not valid JSON (", data)
    assert len(err.message) < 250


@pytest.mark.parametrize(
    "build",
    [
        lambda d: b"[" * d + b"]" * d,
        lambda d: b'{"a": ' * d + b"1" + b"}" * d,
        lambda d: body(tensor(data=[])).replace(b"[]", b"[" * d + b"]" * d),
    ],
    ids=["arrays", "objects", "in-data"],
)
def test_deeply_nested_json(build):
    depth = MAX_JSON_CONTAINERS - 8  # under the containers' limit, over the parser's recursion limit
    if sys.getrecursionlimit() >= depth:
        pytest.skip("the recursion limit is above the depth the containers' limit allows")
    data = build(depth)
    assert containers(data) <= MAX_JSON_CONTAINERS
    refused(400, "the request's JSON is nested too deeply", data)


@pytest.mark.parametrize("inputs", [_ABSENT, None, [], {}, "x", 1, {"name": "x"}], ids=repr)
def test_inputs_must_be_a_non_empty_list(inputs):
    doc = {} if inputs is _ABSENT else {"inputs": inputs}
    refused(400, '"inputs" must be a non-empty list', json.dumps(doc).encode())


@pytest.mark.parametrize("outputs", [None, [], {}, "o", 1, {"name": "o"}], ids=repr)
def test_outputs_if_present_must_be_a_non_empty_list(outputs):
    refused(400, '"outputs" must be a non-empty list', body(tensor(data=[1.0]), outputs=outputs))


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("spec", [1, "x", None, [], ["x", "FP32"]], ids=repr)
def test_each_input_is_an_object(spec, index):
    inputs = [tensor(data=[1.0]), spec] if index else [spec]
    refused(400, f"inputs[{index}] must be an object with name, shape, datatype and data", body(*inputs))


@pytest.mark.parametrize(
    "change, where",
    [
        ({"name": _ABSENT}, "inputs[0]"),
        ({"name": None}, "inputs[0]"),
        ({"name": 7}, "inputs[0]"),
        ({"name": ["x"]}, "inputs[0]"),
        ({"datatype": _ABSENT}, "input 'x'"),
        ({"datatype": 5}, "input 'x'"),
        ({"datatype": ["FP32"]}, "input 'x'"),
    ],
    ids=repr,
)
def test_inputs_need_a_name_and_a_datatype(change, where):
    spec = tensor(data=[1.0])
    for key, value in change.items():
        if value is _ABSENT:
            del spec[key]
        else:
            spec[key] = value
    refused(400, f"{where} needs a name and a datatype", body(spec))


@pytest.mark.parametrize("params", [[], "x", 1, True, [{"binary_data_size": 4}]], ids=repr)
def test_parameters_must_be_objects(params):
    refused(400, "input 'x': parameters must be a JSON object", body({**tensor(data=[1.0]), "parameters": params}))
    refused(400, "the request: parameters must be a JSON object", body(tensor(data=[1.0]), parameters=params))
    outputs = [{"name": "o", "parameters": params}]
    refused(400, "output 'o': parameters must be a JSON object", body(tensor(data=[1.0]), outputs=outputs))


@pytest.mark.parametrize("flag", ["true", 1, 0, None, [True], {}], ids=repr)
def test_binary_flags_must_be_true_or_false(flag):
    fragment = "the request: parameters.binary_data_output must be true or false"
    refused(400, fragment, body(tensor(data=[1.0]), parameters={"binary_data_output": flag}))
    outputs = [{"name": "o", "parameters": {"binary_data": flag}}]
    refused(400, "output 'o': parameters.binary_data must be true or false", body(tensor(data=[1.0]), outputs=outputs))


@pytest.mark.parametrize(
    "outputs, index",
    [
        ([{}], 0),
        ([{"name": None}], 0),
        ([{"name": 3}], 0),
        (["o"], 0),
        ([["o"]], 0),
        ([{"parameters": {"binary_data": True}}], 0),
        ([{"name": "a"}, {"Name": "b"}], 1),
    ],
    ids=repr,
)
def test_outputs_need_names(outputs, index):
    refused(400, f"outputs[{index}] needs a name", body(tensor(data=[1.0]), outputs=outputs))


def test_an_output_asked_for_twice_is_refused():
    outputs = [{"name": "a"}, {"name": "b"}, {"name": "a", "parameters": {"binary_data": True}}]
    refused(400, "output 'a' is asked for twice", body(tensor(data=[1.0]), outputs=outputs))


@pytest.mark.parametrize(
    "fields, outputs, binary",
    [
        ({}, None, {"*": False}),
        ({"parameters": None}, None, {"*": False}),
        ({"parameters": {"binary_data_output": True}}, None, {"*": True}),
        ({"parameters": {"binary_data_output": False, "other": [1]}}, None, {"*": False}),
        ({"outputs": [{"name": "b"}, {"name": "a"}]}, ["b", "a"], {"*": False}),
        ({"outputs": [{"name": "a", "parameters": None}]}, ["a"], {"*": False}),
        ({"outputs": [{"name": "a", "parameters": {"other": 1}}]}, ["a"], {"*": False}),
        (
            {
                "parameters": {"binary_data_output": True},
                "outputs": [
                    {"name": "a", "parameters": {"binary_data": False}},
                    {"name": "b", "parameters": {"binary_data": True}},
                    {"name": "c"},
                ],
            },
            ["a", "b", "c"],
            {"*": True, "a": False, "b": True},
        ),
    ],
    ids=[
        "none",
        "null-parameters",
        "all-binary",
        "unknown-parameter",
        "order-kept",
        "null-output-parameters",
        "other-output-parameter",
        "per-output",
    ],
)
def test_outputs_and_binary_flags(fields, outputs, binary):
    parsed = parse(body(tensor(data=[1.0]), **fields), None)
    assert (parsed.outputs, parsed.binary) == (outputs, binary)


@pytest.mark.parametrize("request_id, expected", [("r-1", "r-1"), ("", ""), (None, None), (_ABSENT, None)], ids=repr)
def test_request_id(request_id, expected):
    fields = {} if request_id is _ABSENT else {"id": request_id}
    assert parse(body(tensor(data=[1.0]), **fields), None).id == expected


@pytest.mark.parametrize("request_id", [1, 1.5, True, [], {"id": "x"}], ids=repr)
def test_request_id_must_be_a_string(request_id):
    refused(400, "the request's id must be a string", body(tensor(data=[1.0]), id=request_id))


FUZZ_VALUES = [None, True, 0, -1, 2, 1.5, "", "x", "FP32", "BYTES", [], {}, [1], [[1]], [-1], [True], {"a": 1}, 10**30]
FUZZ_PATHS = [
    ("id",),
    ("parameters",),
    ("parameters", "binary_data_output"),
    ("inputs",),
    ("inputs", 0),
    ("inputs", 0, "name"),
    ("inputs", 0, "datatype"),
    ("inputs", 0, "shape"),
    ("inputs", 0, "data"),
    ("inputs", 0, "parameters"),
    ("inputs", 1, "datatype"),
    ("inputs", 1, "shape"),
    ("inputs", 1, "parameters"),
    ("inputs", 1, "parameters", "binary_data_size"),
    ("outputs",),
    ("outputs", 0),
    ("outputs", 0, "name"),
    ("outputs", 0, "parameters"),
    ("outputs", 0, "parameters", "binary_data"),
]


@pytest.mark.parametrize("path", FUZZ_PATHS, ids=lambda p: "/".join(map(str, p)))
def test_any_json_value_anywhere_is_parsed_or_a_request_error(path):
    """Each field replaced by values of every JSON type: the codec answers a RequestError, never another exception."""
    outcomes = set()
    for value in FUZZ_VALUES:
        doc = {
            "id": "r",
            "parameters": {"binary_data_output": False},
            "inputs": [tensor("x", "FP32", (2,), [1, 2]), tensor("b", "UINT8", (1,), binary_data_size=1)],
            "outputs": [{"name": "o", "parameters": {"binary_data": True}}],
        }
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = value
        head = json.dumps(doc).encode()
        try:
            parse(head + b"\x07", str(len(head)).encode())
            outcomes.add("parsed")
        except RequestError as err:
            assert err.status in (400, 413), err.message
            outcomes.add("refused")
    assert "refused" in outcomes  # some values must be wrong in every field


# --- encode --------------------------------------------------------------------------------------------------------

OUTPUTS = [
    ("log_probs", "FP32", np.array([[-0.1, -2.5, -30.0], [-1e-7, -3.4e38, 0.0]], np.float32)),
    ("digit", "INT64", np.array([7, -(2**63), 2**63 - 1], np.int64)),
    ("pixels", "UINT8", np.arange(24, dtype=np.uint8).reshape(2, 3, 4)),
    ("precise", "FP64", np.array([0.1, 5e-324, 1.7976931348623157e308, -0.0])),
    ("empty", "FP32", np.zeros((0, 10), np.float32)),
]
HEADER = {"model_name": "mnist", "model_version": "v1", "id": "req-7"}


def decode(body_: bytes, json_length: int | None) -> tuple[dict, dict[str, np.ndarray], set[str]]:
    """A response as a client reads it: the JSON header, then each binary output's bytes, in order."""
    head, rest = (body_, b"") if json_length is None else (body_[:json_length], memoryview(body_)[json_length:])
    doc = json.loads(head)
    arrays, binary, offset = {}, set(), 0
    for out in doc["outputs"]:
        dtype = DTYPES[out["datatype"]]
        if "data" in out:
            assert "parameters" not in out and not any(isinstance(v, list) for v in out["data"])  # flat
            arrays[out["name"]] = np.array(out["data"], dtype=dtype).reshape(out["shape"])
        else:
            size = out["parameters"]["binary_data_size"]
            arrays[out["name"]] = np.frombuffer(rest[offset : offset + size], dtype=dtype).reshape(out["shape"])
            binary.add(out["name"])
            offset += size
    assert offset == len(rest)  # nothing after the last binary output
    return doc, arrays, binary


def assert_exact(arrays: dict[str, np.ndarray], outputs=OUTPUTS):
    assert list(arrays) == [name for name, _, _ in outputs]
    for name, datatype, array in outputs:
        assert arrays[name].dtype == DTYPES[datatype] and arrays[name].shape == array.shape
        assert arrays[name].tobytes() == np.ascontiguousarray(array, DTYPES[datatype]).tobytes(), name


def test_encode_json():
    body_, json_length = encode(HEADER, OUTPUTS, {"*": False})
    assert json_length is None
    doc, arrays, binary = decode(body_, None)
    assert {k: doc[k] for k in HEADER} == HEADER and binary == set()
    for out, (name, datatype, array) in zip(doc["outputs"], OUTPUTS):
        assert out == {"name": name, "datatype": datatype, "shape": list(array.shape), "data": out["data"]}
    assert_exact(arrays)


def test_encode_binary():
    body_, json_length = encode(HEADER, OUTPUTS, {"*": True})
    assert isinstance(json_length, int) and json.loads(body_[:json_length])["id"] == "req-7"
    assert len(body_) == json_length + sum(a.nbytes for _, _, a in OUTPUTS)
    doc, arrays, binary = decode(body_, json_length)
    assert binary == {name for name, _, _ in OUTPUTS}
    for out, (name, datatype, array) in zip(doc["outputs"], OUTPUTS):
        assert out == {
            "name": name,
            "datatype": datatype,
            "shape": list(array.shape),
            "parameters": {"binary_data_size": array.nbytes},
        }
    assert_exact(arrays)


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"*": False, "digit": True}, {"digit"}),
        ({"*": False, "digit": True, "pixels": True}, {"digit", "pixels"}),
        ({"*": True, "log_probs": False, "empty": False}, {"digit", "pixels", "precise"}),
        ({"*": True, "digit": True}, {"log_probs", "digit", "pixels", "precise", "empty"}),
        ({"*": False, "not-an-output": True}, set()),
    ],
)
def test_encode_per_output_binary_flags(flags, expected):
    body_, json_length = encode(HEADER, OUTPUTS, flags)
    assert (json_length is None) == (not expected)
    _, arrays, binary = decode(body_, json_length)
    assert binary == expected
    assert_exact(arrays)


def test_encode_writes_little_endian_row_major_in_the_declared_datatype():
    outputs = [
        ("big_endian", "FP32", np.array([1.0, -2.0], ">f4")),
        ("from_fp64", "FP32", np.array([0.5, 1 / 3])),
        ("transposed", "INT64", np.arange(6, dtype=np.int64).reshape(2, 3).T),
        ("from_int32", "UINT8", np.array([[0, 255]], np.int32)),
    ]
    body_, json_length = encode({}, outputs, {"*": True})
    raw = body_[json_length:]
    assert raw[:8] == struct.pack("<2f", 1.0, -2.0)
    assert raw[8:16] == struct.pack("<2f", 0.5, np.float32(1 / 3))
    assert raw[16:64] == struct.pack("<6q", 0, 3, 1, 4, 2, 5)
    assert raw[64:] == b"\x00\xff"
    _, arrays, _ = decode(body_, json_length)
    assert_exact(arrays, outputs)
    json_body, _ = encode({}, outputs, {"*": False})
    _, json_arrays, _ = decode(json_body, None)
    assert_exact(json_arrays, outputs)


def test_encode_never_writes_nan_as_json_but_carries_it_as_binary():
    outputs = [("x", "FP32", np.array([np.nan, np.inf], np.float32))]
    with pytest.raises(ValueError):
        encode({}, outputs, {"*": False})
    body_, json_length = encode({}, outputs, {"*": True})
    assert body_[json_length:] == outputs[0][2].tobytes()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_what_encode_writes_parse_reads_back(binary):
    """encode's outputs, sent back as a request's inputs: the same tensors, bit for bit."""
    body_, json_length = encode(HEADER, OUTPUTS, {"*": binary})
    head, rest = (body_, b"") if json_length is None else (body_[:json_length], body_[json_length:])
    request_head = json.dumps({"inputs": json.loads(head)["outputs"]}).encode()
    parsed = parse(request_head + rest, str(len(request_head)).encode() if binary else None)
    assert_exact({t.name: t.value for t in parsed.inputs})
