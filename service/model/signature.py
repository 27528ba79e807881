"""The model's signature, checked before a byte of the model is used: OpenSSF model signing (``model-signing``)
with an elliptic-curve public key, offline. It covers every file of the model's folder but the signature itself
and the model.yaml BentoML writes into each store entry; export/signing.py signs the same way.

Written against model-signing 1.1.1: its public ``verifying.Config`` does the checking; which failure it was is
told from its exception types and the start of its messages, which tests/service/model/test_signature.py pins
with real keys, so that an upgrade that changes them fails there first.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import stat
from pathlib import Path

from service.model.files import REEXPORT, ModelFileError

SIGNATURE = "model.sig"
UNSIGNED = (SIGNATURE, "model.yaml")
MAX_SIGNATURE_BYTES = 4 * 1024 * 1024  # a few hundred bytes per signed file
MAX_KEY_BYTES = 64 * 1024
ENV = "MNIST_MODEL_PUBLIC_KEY"
SIGN = "sign it (`python -m export sign DIR --key KEY`, then `python -m export register DIR`)"


def verify_signature(model_dir: str | os.PathLike, public_key_path: str | os.PathLike) -> None:
    """Raise ModelFileError unless ``model_dir`` holds exactly the files that ``model.sig`` signed, signed with
    the private key of ``public_key_path``."""
    model_dir, key = Path(model_dir), Path(public_key_path)
    config = _verifying_config(key)
    for name in UNSIGNED:  # left out by name: a folder of that name would hide whatever it holds
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISREG(os.lstat(model_dir / name).st_mode):
                raise ModelFileError(f"{model_dir / name} is not a regular file; {SIGN}")
    signature = model_dir / SIGNATURE
    raw = _read(
        signature,
        str(signature),
        MAX_SIGNATURE_BYTES,
        f"{model_dir} is not signed (no {SIGNATURE}) and {ENV} is set; {SIGN}",
    )
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a warning for signatures without a key hint
            config.verify(model_dir, signature)
    except Exception as exc:  # noqa: BLE001 - told apart below; every one is a refusal of one line
        raise ModelFileError(_refusal(model_dir, key, raw, exc)) from None
    try:
        ignored = set(_statement(raw)["predicate"]["serialization"].get("ignore_paths", ())) - set(UNSIGNED)
    except (ValueError, KeyError, TypeError, AttributeError):  # verified, so model-signing wrote it: not expected
        raise ModelFileError(f"{signature} carries no statement of what it signed; {SIGN}") from None
    if ignored:  # signed, but not the whole folder: files of these names would go unchecked
        raise ModelFileError(f"{signature} leaves {', '.join(sorted(ignored))} unsigned; {SIGN}")


def _verifying_config(key: Path):
    try:
        from model_signing import hashing, verifying
    except ImportError as exc:  # an image built before signing: it must refuse, not serve unchecked
        raise ModelFileError(f"{ENV} is set, but model-signing cannot be imported ({exc})") from None
    what = f"the public key {key} ({ENV})"
    _read(key, what, MAX_KEY_BYTES, f"{what} is missing")
    try:
        config = verifying.Config().use_elliptic_key_verifier(public_key=key)
    except (ValueError, TypeError, AttributeError) as exc:  # not PEM, another curve, RSA (no .curve)
        raise ModelFileError(
            f"{what} is not a PEM EC public key on P-256, P-384 or P-521 ({_first_line(exc)})"
        ) from None
    # .git, .gitignore and the like count too: the library leaves them out by default
    return config.set_hashing_config(hashing.Config().set_ignored_paths(paths=list(UNSIGNED), ignore_git_paths=False))


def _refusal(model_dir: Path, key: Path, raw: bytes, exc: Exception) -> str:
    from cryptography.exceptions import InvalidSignature

    message = _first_line(exc)
    if isinstance(exc, InvalidSignature) or message.startswith("Key mismatch"):
        return (
            f"{model_dir / SIGNATURE} was not made with the private key of {key} ({ENV}): the model was signed "
            "with another key, or its signature was altered"
        )
    if message.startswith("Signature mismatch"):  # the signature is genuine; the files are not what it signed
        changes = _changes(model_dir, raw) or message[:200]
        return f"{model_dir} changed after it was signed ({changes}); {REEXPORT} with --sign-key KEY"
    if message.startswith("Cannot use"):  # a symbolic link, a FIFO, a device: never part of a signed model
        return f"{model_dir} holds what a signed model may not: {message.split('. ')[0][:200]}"
    if isinstance(exc, OSError):
        return f"{model_dir} cannot be read whole ({exc.strerror or message[:200]})"
    return f"{model_dir / SIGNATURE} is not a signature that can be checked ({message[:160]}); {SIGN}"


def _changes(model_dir: Path, raw: bytes) -> str:
    """Which files differ from what the signature lists: changed, added, missing (at most a few named)."""
    try:
        signed = {r["name"]: r["digest"] for r in _statement(raw)["predicate"]["resources"]}
    except (ValueError, KeyError, TypeError):
        return ""
    actual = {
        str(p.relative_to(model_dir)): _sha256(p)
        for p in sorted(model_dir.rglob("*"))
        if p.is_file() and str(p.relative_to(model_dir)) not in UNSIGNED
    }
    parts = [
        *(f"{name} changed" for name in sorted(signed.keys() & actual.keys()) if signed[name] != actual[name]),
        *(f"{name} added" for name in sorted(actual.keys() - signed.keys())),
        *(f"{name} missing" for name in sorted(signed.keys() - actual.keys())),
    ]
    return ", ".join(parts[:5]) + (f" and {len(parts) - 5} more" if len(parts) > 5 else "")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _statement(raw: bytes) -> dict:
    """The in-toto statement a signature bundle carries (OpenSSF model signing's documented format)."""
    return json.loads(base64.b64decode(json.loads(raw)["dsseEnvelope"]["payload"]))


def _read(path: Path, what: str, limit: int, missing: str) -> bytes:
    """A small regular file's bytes (not a FIFO or a device, which could block or never end)."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ModelFileError(f"{what} is not a regular file")
        if info.st_size > limit:
            raise ModelFileError(f"{what} is larger than {limit} bytes, more than such a file ever holds")
        return path.read_bytes()
    except FileNotFoundError:
        raise ModelFileError(missing) from None
    except OSError as exc:
        raise ModelFileError(f"{what} cannot be read ({exc.strerror or exc})") from None


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
