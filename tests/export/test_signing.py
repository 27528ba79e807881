"""export/signing.py with real EC keys on a small folder: what it signs, the keys it refuses (one line each), the
CLI's exit codes, and the model store holding exactly the signed folder."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from export import signing, store
from export.__main__ import main
from export.build import ExportConfig, build
from export.signing import SIGNATURE, UNSIGNED, SigningError, check_private_key, sign_folder
from service.model import signature as service_signature
from service.model.signature import verify_signature
from tests.keys import key_pair, rsa_key_pair

MANIFEST = {  # what store.register reads of a manifest
    "source": {"kind": "checkpoint", "sha256": "0" * 64},
    "verification": {"eager_test_accuracy": 0.99},
    "artifacts": {"onnx": {"file": "convnet.onnx", "sha256": "1" * 64}},
    "opset": 18,
    "normalization": {"mean": 0.1302, "std": 0.3069},
}


@pytest.fixture
def keys(tmp_path):
    return key_pair(tmp_path / "keys", "model")


@pytest.fixture
def folder(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "convnet.onnx").write_bytes(bytes(range(256)) * 64)
    (out / "manifest.json").write_text('{"artifacts": {}}\n')
    (out / "checkpoint.pt").write_bytes(b"weights" * 100)
    return out


def test_the_export_and_the_service_leave_the_same_files_unsigned():
    assert signing.UNSIGNED == service_signature.UNSIGNED == ("model.sig", "model.yaml")
    assert signing.SIGNATURE == service_signature.SIGNATURE


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1()], ids=lambda c: c.name)
def test_a_signed_folder_verifies_with_its_public_key(folder, tmp_path, curve):
    key, pub = key_pair(tmp_path / "keys", "k", curve)
    assert sign_folder(folder, key) == folder / SIGNATURE
    verify_signature(folder, pub)


def test_signing_again_replaces_the_signature(folder, keys, tmp_path):
    other_key, other_pub = key_pair(tmp_path / "keys", "other")
    sign_folder(folder, other_key)
    (folder / "convnet.onnx").write_bytes(b"re-exported")
    sign_folder(folder, keys[0])
    verify_signature(folder, keys[1])
    with pytest.raises(service_signature.ModelFileError, match="not made with the private key"):
        verify_signature(folder, other_pub)


def test_the_signature_covers_git_files_too(folder, keys):
    (folder / ".gitattributes").write_text("* binary\n")  # model-signing leaves these out unless told
    sign_folder(folder, keys[0])
    (folder / ".gitattributes").write_text("*.onnx filter=lfs\n")
    with pytest.raises(service_signature.ModelFileError, match=r"\.gitattributes changed"):
        verify_signature(folder, keys[1])


def _password_key(tmp_path):
    from cryptography.hazmat.primitives import serialization

    private = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "locked.key"
    path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return path


def _file(path, data: bytes):
    path.write_bytes(data)
    return path


BAD_KEYS = {  # name -> (make the key file, what the one line says)
    "missing": (lambda d: d / "nope.key", "is missing"),
    "a folder": (lambda d: d, "is not a file"),
    "the public key": (lambda d: key_pair(d, "k")[1], "is not an unencrypted EC key"),
    "RSA": (lambda d: rsa_key_pair(d, "rsa")[0], "is not an unencrypted EC key"),
    "P-192": (lambda d: key_pair(d, "small", ec.SECP192R1())[0], "is not an unencrypted EC key"),
    "password": (_password_key, "is not an unencrypted EC key"),
    "garbage": (lambda d: _file(d / "g.key", b"\x00" * 99), "is not an unencrypted EC key"),
    "huge": (lambda d: _file(d / "h.key", b"-" * 100_000), "larger than"),
}


@pytest.mark.parametrize("bad", list(BAD_KEYS))
def test_a_key_that_cannot_sign_is_one_line(folder, tmp_path, bad):
    make, expected = BAD_KEYS[bad]
    key = make(tmp_path)
    with pytest.raises(SigningError) as caught:
        sign_folder(folder, key)
    assert expected in str(caught.value) and "\n" not in str(caught.value)
    assert not (folder / SIGNATURE).exists()


def test_a_symlink_in_the_folder_is_not_signed(folder, keys):
    (folder / "extra.onnx").symlink_to(folder / "convnet.onnx")
    with pytest.raises(SigningError, match="symlink"):
        sign_folder(folder, keys[0])
    assert not (folder / SIGNATURE).exists()


def test_build_checks_the_key_before_any_work(tmp_path):
    # the checkpoint does not exist either: the key is the first thing build looks at
    with pytest.raises(SigningError, match="is missing"):
        build(ExportConfig(checkpoint=str(tmp_path / "none.pt"), out=str(tmp_path / "out"), sign_key="none.key"))
    assert not (tmp_path / "out").exists()


def test_cli_bad_key_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["-q", "build", "--checkpoint", "x.pt", "--out", str(tmp_path), "--sign-key", str(tmp_path / "k")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: the private key ") and "is missing" in err


def test_cli_sign_refuses_a_folder_without_manifest(folder, keys, capsys):
    (folder / "manifest.json").unlink()
    assert main(["-q", "sign", str(folder), "--key", str(keys[0])]) == 1
    assert "no manifest.json" in capsys.readouterr().err
    assert not (folder / SIGNATURE).exists()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl on this machine")
def test_the_readmes_openssl_commands_make_keys_that_work(folder, tmp_path):
    key, pub = tmp_path / "model.key", tmp_path / "model.pub"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key], check=True)
    subprocess.run(["openssl", "ec", "-in", key, "-pubout", "-out", pub], check=True, capture_output=True)
    check_private_key(key)
    sign_folder(folder, key)
    verify_signature(folder, pub)


def test_the_store_holds_exactly_the_signed_folder(folder, keys):
    """Every file of the folder, the signature included, and BentoML's model.yaml beside them: it verifies."""
    import bentoml

    (folder / "model.yaml").write_text("not ours\n")  # BentoML writes its own: an export's is neither signed nor copied
    tag = store.register(folder, MANIFEST, name="signing-test")
    unsigned_tag, added = store.ensure_registered(folder, MANIFEST, name="signing-test")
    assert (unsigned_tag, added) == (tag, False)
    sign_folder(folder, keys[0])
    signed_tag, added = store.ensure_registered(folder, MANIFEST, name="signing-test")  # same artifacts, now signed
    assert added and signed_tag != tag
    entry = bentoml.models.get(signed_tag)
    names = {p.name for p in Path(entry.path).iterdir()}
    assert names == {"convnet.onnx", "manifest.json", "checkpoint.pt", *UNSIGNED}
    assert Path(entry.path_of("model.yaml")).read_text() != "not ours\n"
    verify_signature(entry.path, keys[1])
    assert store.ensure_registered(folder, MANIFEST, name="signing-test") == (signed_tag, False)
