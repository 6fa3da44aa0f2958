"""Asymmetric key pairs for RS256/ES256 token tests, generated with ``cryptography`` (PEM text)."""

from __future__ import annotations

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes


@attrs.frozen
class KeyPair:
    private_pem: str
    public_pem: str


def _pair(key: PrivateKeyTypes) -> KeyPair:
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return KeyPair(private_pem=private, public_pem=public)


def rsa_pair() -> KeyPair:
    return _pair(rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ec_pair() -> KeyPair:
    """P-256, for ES256."""
    return _pair(ec.generate_private_key(ec.SECP256R1()))


def ed25519_pair() -> KeyPair:
    """A key type the relay does not verify (no EdDSA in JWT_ALGORITHMS)."""
    return _pair(ed25519.Ed25519PrivateKey.generate())
