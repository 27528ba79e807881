"""service/model/signature.py with real EC keys and real tampering: each way a signed folder can be wrong is a
ModelFileError of one line that says which; and a real `bentoml serve` refused with the wrong public key."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from export.signing import sign_folder
from service.config import ConfigError, ServiceConfig
from service.model.files import ModelFileError
from service.model.signature import MAX_SIGNATURE_BYTES, SIGNATURE, verify_signature
from tests.conftest import REPO
from tests.keys import key_pair, rsa_key_pair


@pytest.fixture
def keys(tmp_path):
    return key_pair(tmp_path / "keys", "model")


@pytest.fixture
def signed(tmp_path, keys):
    """A signed folder laid out as a store entry: model, manifest, checkpoint, BentoML's model.yaml."""
    out = tmp_path / "entry"
    out.mkdir()
    (out / "convnet.onnx").write_bytes(bytes(range(256)) * 64)
    (out / "manifest.json").write_text(json.dumps({"opset": 18, "artifacts": {"onnx": {"file": "convnet.onnx"}}}))
    (out / "checkpoint.pt").write_bytes(b"weights" * 100)
    sign_folder(out, keys[0])
    (out / "model.yaml").write_text("name: mnist-convnet\n")  # written by BentoML after the copy: not signed
    return out


def refusal(folder: Path, public_key: Path) -> str:
    with pytest.raises(ModelFileError) as caught:
        verify_signature(folder, public_key)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_a_signed_folder_verifies(signed, keys):
    verify_signature(signed, keys[1])


def test_bentomls_model_yaml_may_change(signed, keys):
    (signed / "model.yaml").write_text("labels: {anything: goes}\n")  # BentoML's own, rewritten on every save
    verify_signature(signed, keys[1])


def _flip_byte(path: Path, at: int = 1000):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(folder: Path):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["opset"] = 17
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _subfolder_file(folder: Path):
    (folder / "extra").mkdir()
    (folder / "extra" / "model.yaml").write_text("only the top-level model.yaml is BentoML's\n")


TAMPERING = {  # name -> (what is done to the signed folder, what the one line must say)
    "a model byte flipped": (lambda d: _flip_byte(d / "convnet.onnx"), "(convnet.onnx changed)"),
    "a manifest field changed": (_edit_manifest, "(manifest.json changed)"),
    "a file added": (lambda d: (d / "detector.onnx").write_bytes(b"\x08\x07"), "(detector.onnx added)"),
    "a file removed": (lambda d: (d / "checkpoint.pt").unlink(), "(checkpoint.pt missing)"),
    "a git file added": (lambda d: (d / ".gitignore").write_text("*\n"), "(.gitignore added)"),
    "a model.yaml further down": (_subfolder_file, "(extra/model.yaml added)"),
    "a model swapped for another": (
        lambda d: (d / "convnet.onnx").write_bytes((d / "checkpoint.pt").read_bytes()),
        "(convnet.onnx changed)",
    ),
}


@pytest.mark.parametrize("tampering", list(TAMPERING))
def test_a_change_after_signing_is_named(signed, keys, tampering):
    tamper, expected = TAMPERING[tampering]
    tamper(signed)
    message = refusal(signed, keys[1])
    assert "changed after it was signed" in message and expected in message, message
    assert "re-export the model" in message and "--sign-key" in message


def test_several_changes_are_all_named(signed, keys):
    _flip_byte(signed / "convnet.onnx")
    (signed / "checkpoint.pt").unlink()
    (signed / "notes.txt").write_text("hi")
    assert "(convnet.onnx changed, notes.txt added, checkpoint.pt missing)" in refusal(signed, keys[1])


def test_unsigned_is_refused(signed, keys):
    (signed / SIGNATURE).unlink()
    message = refusal(signed, keys[1])
    assert "is not signed (no model.sig) and MNIST_MODEL_PUBLIC_KEY is set" in message
    assert "python -m export sign" in message


def test_another_key_is_refused(signed, tmp_path):
    _, other_pub = key_pair(tmp_path / "keys", "other")
    assert "was not made with the private key of" in refusal(signed, other_pub)


def test_another_key_is_refused_without_the_key_hint(signed, tmp_path, capsys):
    """The bundle's key hint is not signed: stripped, the signature itself still fails with the wrong key (and the
    library's printed warning does not reach the output)."""
    bundle = json.loads((signed / SIGNATURE).read_text())
    bundle["verificationMaterial"]["publicKey"]["hint"] = ""
    (signed / SIGNATURE).write_text(json.dumps(bundle))
    _, other_pub = key_pair(tmp_path / "keys", "other")
    assert "was not made with the private key of" in refusal(signed, other_pub)
    assert capsys.readouterr().out == ""


def test_an_altered_statement_is_refused(signed, keys):
    """Rewriting what the signature lists (to match a changed model) breaks the signature itself."""
    _flip_byte(signed / "convnet.onnx")
    bundle = json.loads((signed / SIGNATURE).read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    statement["predicate"]["resources"] = [
        r for r in statement["predicate"]["resources"] if r["name"] != "convnet.onnx"
    ]
    statement["predicate"]["serialization"]["ignore_paths"].append("convnet.onnx")
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    (signed / SIGNATURE).write_text(json.dumps(bundle))
    assert "was not made with the private key of" in refusal(signed, keys[1])


def test_the_signature_of_another_folder_is_refused(signed, keys, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "convnet.onnx").write_bytes(b"another model")
    sign_folder(other, keys[0])  # the same key: a genuine signature, of other files
    shutil.copy(other / SIGNATURE, signed / SIGNATURE)
    message = refusal(signed, keys[1])
    assert "changed after it was signed" in message and "convnet.onnx changed" in message
    assert "manifest.json added" in message


def test_a_signature_that_leaves_files_out_is_refused(signed, keys):
    """Signed with the right key, but with model-signing's own ignore list widened: not the whole folder."""
    from model_signing import hashing, signing

    (signed / "model.yaml").unlink()
    config = hashing.Config().set_ignored_paths(paths=[SIGNATURE, "model.yaml", "extras"], ignore_git_paths=False)
    signing.Config().set_hashing_config(config).use_elliptic_key_signer(private_key=keys[0]).sign(
        signed, signed / SIGNATURE
    )
    assert "leaves extras unsigned" in refusal(signed, keys[1])


def _replace_with_link(path: Path, target: Path):
    path.unlink()
    path.symlink_to(target)


BAD_SIGNATURES = {  # name -> (what model.sig becomes, what the one line must say)
    "empty": (lambda d: (d / SIGNATURE).write_bytes(b""), "is not a signature that can be checked"),
    "garbage": (lambda d: (d / SIGNATURE).write_bytes(b"\xff\xfe not json"), "is not a signature that can be checked"),
    "truncated": (
        lambda d: (d / SIGNATURE).write_text((d / SIGNATURE).read_text()[:300]),
        "is not a signature that can be checked",
    ),
    "JSON of something else": (
        lambda d: (d / SIGNATURE).write_text("[1, 2]"),
        "is not a signature that can be checked",
    ),
    "no signatures": (
        lambda d: (d / SIGNATURE).write_text(
            json.dumps({**json.loads((d / SIGNATURE).read_text()), "dsseEnvelope": {"payload": "", "signatures": []}})
        ),
        "is not a signature that can be checked",
    ),
    "huge": (
        lambda d: (d / SIGNATURE).write_bytes(b" " * (MAX_SIGNATURE_BYTES + 1)),
        f"larger than {MAX_SIGNATURE_BYTES} bytes",
    ),
    "a folder": (lambda d: ((d / SIGNATURE).unlink(), (d / SIGNATURE).mkdir()), "model.sig is not a regular file"),
    "a device": (lambda d: _replace_with_link(d / SIGNATURE, Path("/dev/zero")), "model.sig is not a regular file"),
}


@pytest.mark.parametrize("bad", list(BAD_SIGNATURES))
def test_a_broken_signature_is_one_line(signed, keys, bad):
    damage, expected = BAD_SIGNATURES[bad]
    damage(signed)
    assert expected in refusal(signed, keys[1])


def test_a_symlink_swapped_in_is_refused(signed, keys, tmp_path):
    """Even one pointing at the very bytes that were signed."""
    copy = tmp_path / "elsewhere.onnx"
    shutil.copy(signed / "convnet.onnx", copy)
    _replace_with_link(signed / "convnet.onnx", copy)
    message = refusal(signed, keys[1])
    assert "holds what a signed model may not" in message and "symlink" in message


def test_a_symlinked_signature_is_refused(signed, keys, tmp_path):
    shutil.copy(signed / SIGNATURE, tmp_path / "genuine.sig")
    _replace_with_link(signed / SIGNATURE, tmp_path / "genuine.sig")
    assert "model.sig is not a regular file" in refusal(signed, keys[1])


def _model_yaml_folder(folder: Path):
    (folder / "model.yaml").unlink()
    (folder / "model.yaml").mkdir()
    (folder / "model.yaml" / "convnet.onnx").write_bytes(b"hidden")


@pytest.mark.parametrize(
    "unsigned_name",
    [
        pytest.param(_model_yaml_folder, id="a folder named model.yaml"),
        pytest.param(lambda d: _replace_with_link(d / "model.yaml", d / "convnet.onnx"), id="model.yaml a symlink"),
    ],
)
def test_the_unsigned_names_hide_nothing(signed, keys, unsigned_name):
    unsigned_name(signed)
    assert "model.yaml is not a regular file" in refusal(signed, keys[1])


def test_a_signature_file_further_down_is_a_file_added(signed, keys):
    (signed / "extra").mkdir()
    shutil.copy(signed / SIGNATURE, signed / "extra" / SIGNATURE)
    assert "(extra/model.sig added)" in refusal(signed, keys[1])


def test_a_fifo_is_refused(signed, keys):
    os.mkfifo(signed / "stream.onnx")
    assert "holds what a signed model may not" in refusal(signed, keys[1])


BAD_PUBLIC_KEYS = {  # name -> (make the key file, what the one line must say)
    "missing": (lambda d, k: d / "none.pub", "is missing"),
    "a folder": (lambda d, k: d, "is not a regular file"),
    "the private key": (lambda d, k: k[0], "is not a PEM EC public key"),
    "garbage": (lambda d, k: _write(d / "g.pub", b"-----BEGIN PUBLIC KEY-----\nAAAA\n"), "is not a PEM EC public key"),
    "RSA": (lambda d, k: rsa_key_pair(d, "rsa")[1], "is not a PEM EC public key"),
    "P-192": (lambda d, k: key_pair(d, "small", ec.SECP192R1())[1], "is not a PEM EC public key"),
    "huge": (lambda d, k: _write(d / "h.pub", b"A" * 100_000), "larger than"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("bad", list(BAD_PUBLIC_KEYS))
def test_an_unusable_public_key_is_one_line(signed, keys, tmp_path, bad):
    make, expected = BAD_PUBLIC_KEYS[bad]
    message = refusal(signed, make(tmp_path, keys))
    assert message.startswith("the public key ") and "(MNIST_MODEL_PUBLIC_KEY)" in message
    assert expected in message, message


def test_the_setting_is_off_by_default_and_refuses_blanks():
    assert ServiceConfig.from_env({}).public_key == ""
    assert ServiceConfig.from_env({"MNIST_MODEL_PUBLIC_KEY": "/keys/model.pub"}).public_key == "/keys/model.pub"
    with pytest.raises(ConfigError, match="MNIST_MODEL_PUBLIC_KEY is set but blank"):
        ServiceConfig.from_env({"MNIST_MODEL_PUBLIC_KEY": "  "})  # unset would turn the check off: never by accident


# ---- a real `bentoml serve` ----


def _run(cmd, **env):
    return subprocess.run(
        cmd, env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True, timeout=240, check=False
    )


@pytest.mark.slow
def test_bentoml_serve_refuses_the_wrong_key_and_starts_with_the_right_one(book_export, tmp_path, monkeypatch):
    from tests.service.conftest import serve

    key, pub = key_pair(tmp_path / "keys", "model")
    _, other_pub = key_pair(tmp_path / "keys", "other")
    folder = tmp_path / "export"
    shutil.copytree(book_export.out, folder)
    signed = _run([sys.executable, "-m", "export", "sign", str(folder), "--key", str(key)])
    assert signed.returncode == 0, signed.stderr
    home = tmp_path / "home"  # a model store of its own, holding only the signed copy
    registered = _run([sys.executable, "-m", "export", "register", str(folder)], BENTOML_HOME=str(home))
    assert registered.returncode == 0 and "registered mnist-convnet:" in registered.stderr, registered.stderr

    serve_cmd = [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", "0"]
    refused = _run(serve_cmd, BENTOML_HOME=str(home), MNIST_MODEL_PUBLIC_KEY=str(other_pub))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr + refused.stdout
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model mnist-convnet:latest: ") and "was not made with the private key of" in last
    assert str(other_pub) in last

    monkeypatch.setenv("BENTOML_HOME", str(home))  # serve() gives the server a home over this store
    with serve(tmp_path, MNIST_WORKERS=1, MNIST_MODEL_PUBLIC_KEY=str(pub)) as served:  # ready, or it fails
        assert httpx.get(f"{served.url}/readyz", timeout=5).status_code == 200
