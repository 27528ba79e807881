"""Real key pairs for the signing tests, made with `cryptography` (the README's openssl commands make the same PEM
files; tests/export/test_signing.py checks that where openssl is installed)."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa


def key_pair(folder: Path, name: str, curve: ec.EllipticCurve | None = None) -> tuple[Path, Path]:
    """``folder/name.key`` (PEM PKCS#8, unencrypted) and ``folder/name.pub``; an EC key on P-256 by default."""
    private = ec.generate_private_key(curve or ec.SECP256R1())
    return _write(folder, name, private)


def rsa_key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    return _write(folder, name, rsa.generate_private_key(public_exponent=65537, key_size=2048))


def _write(folder: Path, name: str, private) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    key, pub = folder / f"{name}.key", folder / f"{name}.pub"
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    pub.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return key, pub
