"""service/model/files.py on a synthetic model folder: a manifest the validator accepts and a fake model file it
vouches for; then every way to break either, each a ModelFileError of one line that names the file."""

import copy
import hashlib
import json
import os

import pytest

from service.model.files import (
    DTYPES,
    MAX_MANIFEST_BYTES,
    REEXPORT,
    ModelFileError,
    read_manifest,
    read_verified,
)
from training.data import Normalization

FMT = "onnx"
MODEL_FILE = "convnet.onnx"
MODEL_BYTES = bytes(range(256)) * 16 + b"the weights"


def good_manifest(data: bytes = MODEL_BYTES) -> dict:
    return {
        "manifest_version": 1,
        "model": "mnist-convnet",
        "artifacts": {FMT: {"file": MODEL_FILE, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}},
        "input": {"name": "image", "shape": ["batch", 1, 28, 28], "dtype": DTYPES[0]},
        "output": {"name": "log_probs", "shape": ["batch", 10], "dtype": DTYPES[0]},
        "normalization": Normalization().to_dict(),
        "model_config": {"image_size": 28, "in_channels": 1, "num_classes": 10},
        "opset": 17,
        "verification": {"passed": True, "eager_test_accuracy": 0.99},
        "calibration": {"bins": 15, "ece": 0.0048, "temperature": 1.2066, "ece_at_temperature": 0.0036},
        "detector": {"file": "detector.onnx", "sha256": "cd" * 32, "bytes": 10, "threshold": 0.62},
        "golden": {"file": "golden.json", "sha256": "ef" * 32, "bytes": 10},
    }


def write(folder, manifest=None, model: bytes = MODEL_BYTES):
    (folder / "manifest.json").write_text(json.dumps(good_manifest() if manifest is None else manifest))
    (folder / MODEL_FILE).write_bytes(model)
    return folder


@pytest.fixture
def folder(tmp_path):
    return write(tmp_path)


def refused(call, *args) -> ModelFileError:
    with pytest.raises(ModelFileError) as caught:
        call(*args)
    message = str(caught.value)
    assert "\n" not in message and message.endswith(REEXPORT), message
    return caught.value


def replace_with_directory(path):
    path.unlink()
    path.mkdir()


def replace_with_link(target):
    def change(path):
        path.unlink()
        path.symlink_to(target)

    return change


# ---- the good folder ----------------------------------------------------------------------------------------
def test_a_good_folder_reads_and_verifies(folder):
    manifest = read_manifest(folder)
    assert manifest == good_manifest()
    name, data, digest = read_verified(folder, manifest, FMT)
    assert (name, data, digest) == (MODEL_FILE, MODEL_BYTES, hashlib.sha256(MODEL_BYTES).hexdigest())


def test_read_manifest_takes_a_string_path(folder):
    assert read_manifest(str(folder)) == good_manifest()


def test_an_empty_model_file_recorded_as_empty_verifies(tmp_path):
    write(tmp_path, good_manifest(b""), b"")
    assert read_verified(tmp_path, read_manifest(tmp_path), FMT)[1] == b""


def test_extra_fields_and_formats_are_allowed(tmp_path):
    manifest = good_manifest()
    manifest["artifacts"]["torchscript"] = {"file": "convnet.ts", "sha256": "0" * 64, "bytes": 3}
    manifest["created"] = "today"
    write(tmp_path, manifest)
    assert read_manifest(tmp_path)["artifacts"].keys() == {FMT, "torchscript"}


# ---- the manifest -------------------------------------------------------------------------------------------
def test_a_missing_manifest(tmp_path):
    (tmp_path / MODEL_FILE).write_bytes(MODEL_BYTES)
    error = refused(read_manifest, tmp_path)
    assert f"{tmp_path / 'manifest.json'} is missing" in str(error)


def test_a_missing_folder(tmp_path):
    error = refused(read_manifest, tmp_path / "gone")
    assert "manifest.json is missing" in str(error)


@pytest.mark.parametrize(
    "text, fragment",
    [
        (b"{not json", "cannot be read (Expecting property name"),
        (b"", "cannot be read (Expecting value"),
        (b'{"\xff": 1}', "cannot be read ('utf-8' codec can't decode"),
        (b"[" * 200_000, "cannot be read (maximum recursion depth"),
        (b"[1, 2]", "is not a valid export manifest (not a JSON object)"),
        (b'"manifest"', "(not a JSON object)"),
        (b"null", "(not a JSON object)"),
        (b"{}", "is not a valid export manifest (artifacts)"),
    ],
    ids=["not json", "empty", "not utf-8", "nested too deeply", "a list", "a string", "null", "empty object"],
)
def test_a_manifest_that_is_not_a_manifest(tmp_path, text, fragment):
    (tmp_path / "manifest.json").write_bytes(text)
    error = refused(read_manifest, tmp_path)
    assert str(error).startswith(str(tmp_path / "manifest.json")) and fragment in str(error), str(error)


@pytest.mark.parametrize(
    "change, fragment",
    [
        (replace_with_directory, "manifest.json is not a regular file"),
        (replace_with_link("/dev/zero"), "manifest.json is not a regular file"),
        (replace_with_link("/nonexistent/manifest.json"), "manifest.json is missing"),
    ],
    ids=["a directory", "a link to a device", "a dangling link"],
)
def test_a_manifest_that_is_not_a_regular_file(folder, change, fragment):
    change(folder / "manifest.json")
    assert str(refused(read_manifest, folder)).startswith(f"{folder / fragment}")


def test_a_manifest_with_a_huge_integer(tmp_path):
    (tmp_path / "manifest.json").write_text('{"opset": ' + "9" * 5000 + "}")
    assert "manifest.json cannot be read" in str(refused(read_manifest, tmp_path))


def test_a_manifest_over_the_size_limit(tmp_path):
    manifest = good_manifest()
    manifest["padding"] = "x" * MAX_MANIFEST_BYTES
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    error = refused(read_manifest, tmp_path)
    assert f"manifest.json is larger than the export ever writes ({MAX_MANIFEST_BYTES} bytes)" in str(error)


def test_a_manifest_at_the_size_limit_is_read(tmp_path):
    text = json.dumps(good_manifest())
    text = text[:-1] + ', "padding": "' + "x" * (MAX_MANIFEST_BYTES - len(text) - 15) + '"}'
    assert len(text) == MAX_MANIFEST_BYTES
    (tmp_path / "manifest.json").write_text(text)
    assert read_manifest(tmp_path)["opset"] == good_manifest()["opset"]


def _set(path: str, value):
    """A change to the good manifest: ``path`` (dotted) set to ``value``, or removed when value is DELETE."""

    def change(m):
        *parents, last = path.split(".")
        for key in parents:
            m = m[key]
        if value is DELETE:
            del m[last]
        else:
            m[last] = value

    return change


DELETE = object()
A = f"artifacts.{FMT}"
SHA = "ab" * 32

# (the field, its bad value, the problem the message names): every check of _manifest_problem
BAD_FIELDS = [
    ("artifacts", DELETE, "(artifacts)"),
    ("artifacts", {}, "(artifacts)"),
    ("artifacts", [MODEL_FILE], "(artifacts)"),
    (A, DELETE, "(artifacts)"),  # its only format gone: an empty dict
    (A, MODEL_FILE, f"({A})"),
    (A, None, f"({A})"),
    (f"{A}.file", DELETE, f"({A}.file: a plain file name"),
    (f"{A}.file", 3, f"({A}.file: a plain file name"),
    (f"{A}.file", "", f"({A}.file: a plain file name"),
    (f"{A}.file", "../../etc/passwd", f"({A}.file: a plain file name"),
    (f"{A}.file", "sub/convnet.onnx", f"({A}.file: a plain file name"),
    (f"{A}.file", ".hidden", f"({A}.file: a plain file name"),
    (f"{A}.file", "x" * 129, f"({A}.file: a plain file name"),
    (f"{A}.sha256", DELETE, f"({A}.sha256)"),
    (f"{A}.sha256", SHA.upper(), f"({A}.sha256)"),
    (f"{A}.sha256", SHA[:-1], f"({A}.sha256)"),
    (f"{A}.sha256", 123, f"({A}.sha256)"),
    (f"{A}.bytes", DELETE, f"({A}.bytes)"),
    (f"{A}.bytes", "4107", f"({A}.bytes)"),
    (f"{A}.bytes", 4107.0, f"({A}.bytes)"),
    (f"{A}.bytes", -1, f"({A}.bytes)"),
    (f"{A}.bytes", True, f"({A}.bytes)"),
    ("normalization", DELETE, "(normalization: mean and a positive std)"),
    ("normalization", [0.1, 0.3], "(normalization: mean and a positive std)"),
    ("normalization.mean", DELETE, "(normalization: mean and a positive std)"),
    ("normalization.mean", "0.13", "(normalization: mean and a positive std)"),
    ("normalization.mean", True, "(normalization: mean and a positive std)"),
    ("normalization.std", DELETE, "(normalization: mean and a positive std)"),
    ("normalization.std", 0, "(normalization: mean and a positive std)"),
    ("normalization.std", -0.3, "(normalization: mean and a positive std)"),
    ("normalization.std", None, "(normalization: mean and a positive std)"),
    *[
        case
        for key in ("input", "output")
        for case in [
            (key, DELETE, f"({key}: name and dtype)"),
            (key, "image", f"({key}: name and dtype)"),
            (f"{key}.name", DELETE, f"({key}: name and dtype)"),
            (f"{key}.name", 0, f"({key}: name and dtype)"),
            (f"{key}.dtype", DELETE, f"({key}: name and dtype)"),
            (f"{key}.dtype", "float16", f"({key}: name and dtype)"),
            (f"{key}.shape", DELETE, f"({key}.shape)"),
            (f"{key}.shape", "batch,1,28,28", f"({key}.shape)"),
            (f"{key}.shape", ["batch", 1.5], f"({key}.shape)"),
            (f"{key}.shape", [None], f"({key}.shape)"),
        ]
    ],
    ("output.shape", [], "(output.shape: the number of classes last)"),
    ("output.shape", [10, "classes"], "(output.shape: the number of classes last)"),
    ("output.shape", ["batch", True], "(output.shape: the number of classes last)"),
    ("model_config", DELETE, "(model_config.image_size)"),
    ("model_config", 28, "(model_config.image_size)"),
    ("model_config.image_size", DELETE, "(model_config.image_size)"),
    ("model_config.image_size", 28.0, "(model_config.image_size)"),
    ("model_config.image_size", "28", "(model_config.image_size)"),
    ("verification", DELETE, "(verification.passed:"),
    ("verification", True, "(verification.passed:"),
    ("verification.passed", DELETE, "(verification.passed:"),
    ("verification.passed", "yes", "(verification.passed:"),
    ("verification.passed", 1, "(verification.passed:"),
    ("verification.passed", False, "(verification.passed: the export's verification must have passed)"),
    ("detector", DELETE, "(detector)"),
    ("detector.file", "../convnet.onnx", "(detector.file: a plain file name"),
    ("detector.sha256", "0" * 63, "(detector.sha256)"),
    ("detector.threshold", DELETE, "(detector.threshold: a number in 0..1)"),
    ("detector.threshold", 1.5, "(detector.threshold: a number in 0..1)"),
    ("detector.threshold", float("nan"), "(detector.threshold: a number in 0..1)"),
    ("golden", DELETE, "(golden)"),
    ("golden.bytes", -1, "(golden.bytes)"),
    ("verification.eager_test_accuracy", DELETE, "(verification.eager_test_accuracy)"),
    ("verification.eager_test_accuracy", "0.99", "(verification.eager_test_accuracy)"),
    ("verification.eager_test_accuracy", None, "(verification.eager_test_accuracy)"),
    ("opset", DELETE, "(opset)"),
    ("opset", "17", "(opset)"),
    ("opset", 17.0, "(opset)"),
    ("opset", False, "(opset)"),
    ("calibration", [1.2], "(calibration)"),
    *[
        ("calibration.temperature", bad, "(calibration.temperature: a number in 0.05..20")
        for bad in (0, -1.2, "1.2", True, [1.2], 1e-9, 0.049, 20.5, 1e308)
    ],
    ("input.shape", ["batch", 1, 28, 28, 1], "(input.shape: [batch, channels, side, side]"),
    ("input.shape", ["batch", 1, 28, 27], "(input.shape: [batch, channels, side, side]"),
    ("model_config.image_size", 27, "(input.shape: [batch, channels, side, side]"),
    ("output.shape", ["batch", 10, 1], "(output.shape: [batch, classes])"),
]


def _id(case) -> str:
    path, value, _ = case
    return f"{path}={'deleted' if value is DELETE else json.dumps(value)[:20]}"


@pytest.mark.parametrize("path, value, problem", BAD_FIELDS, ids=[_id(c) for c in BAD_FIELDS])
def test_each_bad_field_is_named(tmp_path, path, value, problem):
    manifest = copy.deepcopy(good_manifest())
    _set(path, value)(manifest)
    write(tmp_path, manifest)
    error = refused(read_manifest, tmp_path)
    assert str(error).startswith(f"{tmp_path / 'manifest.json'} is not a valid export manifest {problem}"), str(error)


@pytest.mark.parametrize(
    "path, value",
    [
        ("normalization.std", 1e-9),
        ("normalization.mean", -1),
        ("normalization.std", 3),
        (f"{A}.bytes", 0),
        ("calibration.temperature", None),  # the export fitted none, or none lowered the ECE
        ("calibration.temperature", 2),
        ("calibration", DELETE),  # exports made before calibration
    ],
)
def test_edge_values_that_are_valid(tmp_path, path, value):
    manifest = good_manifest()
    _set(path, value)(manifest)
    write(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest


@pytest.mark.parametrize("field, value", [("std", "NaN"), ("std", "Infinity"), ("mean", "NaN"), ("mean", "-Infinity")])
def test_a_non_finite_normalization_is_refused(tmp_path, field, value):
    text = json.dumps(good_manifest()).replace(f'"{field}": {getattr(Normalization(), field)}', f'"{field}": {value}')
    assert value in text
    (tmp_path / "manifest.json").write_text(text)
    assert "(normalization: mean and a positive std)" in str(refused(read_manifest, tmp_path))


@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_a_non_finite_temperature_is_refused(tmp_path, value):
    text = json.dumps(good_manifest()).replace('"temperature": 1.2066', f'"temperature": {value}')
    assert value in text
    (tmp_path / "manifest.json").write_text(text)
    assert "(calibration.temperature: a number in 0.05..20" in str(refused(read_manifest, tmp_path))


# ---- the model file -----------------------------------------------------------------------------------------
def flip_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


BREAKAGES = {
    # name -> (how to break the model file, what the message says after the file's path)
    "one byte changed": (flip_one_byte, " does not match its manifest (sha256 "),
    "one byte longer": (lambda p: p.write_bytes(MODEL_BYTES + b"!"), " does not match its manifest"),
    "much longer": (
        lambda p: p.write_bytes(MODEL_BYTES * 3),
        f" is larger than the export ever writes ({len(MODEL_BYTES) + 1} bytes)",
    ),
    "truncated": (lambda p: p.write_bytes(MODEL_BYTES[:100]), " does not match its manifest"),
    "emptied": (
        lambda p: p.write_bytes(b""),
        f" does not match its manifest (sha256 {hashlib.sha256(b'').hexdigest()[:12]}..., 0 bytes; exported as",
    ),
    "missing": (lambda p: p.unlink(), " is missing"),
    "a directory": (replace_with_directory, " is not a regular file"),
    "a link to a device": (replace_with_link("/dev/zero"), " is not a regular file"),
    "a link to a directory": (replace_with_link("/"), " is not a regular file"),
    "a dangling link": (replace_with_link("/nonexistent/convnet.onnx"), " is missing"),
    "a fifo": (lambda p: (p.unlink(), os.mkfifo(p)), " is not a regular file"),
}


@pytest.mark.parametrize("name", list(BREAKAGES))
def test_a_broken_model_file(folder, name):
    manifest = read_manifest(folder)
    change, fragment = BREAKAGES[name]
    change(folder / MODEL_FILE)
    error = refused(read_verified, folder, manifest, FMT)
    assert str(error).startswith(f"{folder / MODEL_FILE}{fragment}"), str(error)


def test_a_link_to_a_regular_file_with_other_bytes_does_not_match(folder, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere") / "other.onnx"
    other.write_bytes(b"something else")
    manifest = read_manifest(folder)
    replace_with_link(other)(folder / MODEL_FILE)
    assert "does not match its manifest" in str(refused(read_verified, folder, manifest, FMT))


def test_the_message_shows_both_hashes_and_sizes(folder):
    manifest = read_manifest(folder)
    (folder / MODEL_FILE).write_bytes(b"tiny")
    message = str(refused(read_verified, folder, manifest, FMT))
    assert f"sha256 {hashlib.sha256(b'tiny').hexdigest()[:12]}..., 4 bytes" in message
    assert f"exported as {hashlib.sha256(MODEL_BYTES).hexdigest()[:12]}..., {len(MODEL_BYTES)} bytes" in message


def test_a_format_the_manifest_does_not_list(folder):
    error = refused(read_verified, folder, read_manifest(folder), "torchscript")
    assert str(error).startswith(f"the manifest in {folder} lists no torchscript file")


def test_a_manifest_folder_that_is_a_file(tmp_path):
    (tmp_path / "not-a-folder").write_text("x")
    error = refused(read_manifest, tmp_path / "not-a-folder")
    assert str(error).startswith(f"{tmp_path / 'not-a-folder' / 'manifest.json'} cannot be read (")


# ---- the drift section (export/drift.py): optional, checked when present ----
def drift_section() -> dict:
    from service.observe.drift import QUANTITIES

    edges = {"digit": [d + 0.5 for d in range(9)], "not_a_digit": [0.5], "confidence": [0.5, 0.9]}
    quantities = {}
    for name in QUANTITIES:
        e = edges.get(name, [1.0, 2.0, 3.0])
        quantities[name] = {"edges": e, "reference": [1 / (len(e) + 1)] * (len(e) + 1)}
    return {
        "method": "jensen-shannon",
        "quantities": quantities,
        "thresholds": {"200": dict.fromkeys(QUANTITIES, 0.03)},
    }


def test_a_drift_section_is_read(tmp_path):
    manifest = {**good_manifest(), "drift": drift_section()}
    write(tmp_path, manifest)
    assert read_manifest(tmp_path)["drift"] == manifest["drift"]


DRIFT_BREAKS = [
    (lambda d: d.update(method="psi"), "drift.method"),
    (lambda d: d["quantities"].pop("ink"), "drift.quantities: exactly"),
    (lambda d: d["quantities"]["ink"].update(edges=[2.0, 1.0, 3.0]), "drift.quantities.ink.edges"),
    (lambda d: d["quantities"]["ink"].update(edges="1,2"), "drift.quantities.ink.edges"),
    (lambda d: d["quantities"]["digit"]["reference"].pop(), "drift.quantities.digit.reference: a share per bin"),
    (lambda d: d["quantities"]["ink"].update(reference=[0.5, 0.5, 0.5, -0.5]), "drift.quantities.ink.reference"),
    (lambda d: d["quantities"]["ink"].update(reference=[0.5, 0.5, 0.5, 0.5]), "shares that sum to 1"),
    (lambda d: d.update(thresholds={}), "drift.thresholds: thresholds per window size"),
    (lambda d: d["thresholds"].update({"0": d["thresholds"]["200"]}), "drift.thresholds.0: a window size"),
    (lambda d: d["thresholds"]["200"].pop("digit"), "drift.thresholds.200: a threshold for each"),
    (lambda d: d["thresholds"]["200"].update(digit=0), "drift.thresholds.200: numbers in (0, 1]"),
    (lambda d: d["thresholds"]["200"].update(digit="0.1"), "drift.thresholds.200: numbers in (0, 1]"),
]


@pytest.mark.parametrize("brk, problem", DRIFT_BREAKS, ids=[p for _, p in DRIFT_BREAKS])
def test_each_bad_drift_field_is_named(tmp_path, brk, problem):
    section = drift_section()
    brk(section)
    write(tmp_path, {**good_manifest(), "drift": section})
    assert problem in str(refused(read_manifest, tmp_path))
