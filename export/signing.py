"""Signs an export folder, manifest and every other file in it, with OpenSSF model signing (``model-signing``) and
an elliptic-curve private key: offline, no Sigstore. The service checks it with ``service/model/signature.py``.

Keys (PEM, P-256): ``openssl ecparam -name prime256v1 -genkey -noout -out model.key`` and
``openssl ec -in model.key -pubout -out model.pub``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from export.store import BENTOML_INFO

log = logging.getLogger(__name__)

SIGNATURE = "model.sig"  # inside the folder it signs, so the store entry carries it
# Not signed: the signature itself, and the file BentoML writes into every model-store entry (the service
# ignores exactly these two, so a file added anywhere else fails its check)
UNSIGNED = (SIGNATURE, BENTOML_INFO)
MAX_KEY_BYTES = 64 * 1024


class SigningError(Exception):
    """The private key or the folder cannot be used for signing; the message says which, on one line."""


def _signing_config(private_key_path: str | os.PathLike):
    from model_signing import hashing, signing

    path = Path(private_key_path)
    try:
        if not path.is_file():
            raise SigningError(f"the private key {path} is {'not a file' if path.exists() else 'missing'}")
        if path.stat().st_size > MAX_KEY_BYTES:
            raise SigningError(f"the private key {path} is not a PEM key (larger than {MAX_KEY_BYTES} bytes)")
        config = signing.Config().use_elliptic_key_signer(private_key=path)
    except OSError as exc:
        raise SigningError(f"the private key {path} cannot be read ({exc.strerror or exc})") from None
    except (ValueError, TypeError, AttributeError) as exc:  # not PEM, a password, another curve, RSA (no .curve)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SigningError(
            f"the private key {path} is not an unencrypted EC key on P-256, P-384 or P-521 ({reason[:120]})"
        ) from None
    # .git, .gitignore and the like are signed too: the library leaves them out by default
    hashing_config = hashing.Config().set_ignored_paths(paths=list(UNSIGNED), ignore_git_paths=False)
    return config.set_hashing_config(hashing_config)


def check_private_key(private_key_path: str | os.PathLike) -> None:
    """Raise SigningError unless the key can sign: called before a long export, so that it fails at once."""
    _signing_config(private_key_path)


def sign_folder(folder: str | os.PathLike, private_key_path: str | os.PathLike) -> Path:
    """Sign every file under ``folder`` (but ``UNSIGNED``) into ``folder/model.sig``; return its path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SigningError(f"{folder} is not a folder")
    config = _signing_config(private_key_path)
    signature = folder / SIGNATURE
    # Written in place (it is one of UNSIGNED): a temp file of another name inside the folder would have to be
    # left out of the signature, and verification would then leave out a file of that name too.
    signature.unlink(missing_ok=True)
    try:
        config.sign(folder, signature)
    except ValueError as exc:  # a symlink or a special file in the folder
        signature.unlink(missing_ok=True)
        raise SigningError(f"{folder} cannot be signed: {str(exc).splitlines()[0]}") from None
    log.info("signed %s: %s", folder, signature)
    return signature
