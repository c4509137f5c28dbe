"""Ed25519 release keys: generate, load, sign a manifest, verify against pinned public keys.

Public keys are pinned on devices as files holding one line ``ed25519:<base64 raw key>`` (or a
PEM ``PUBLIC KEY``); several may be pinned at once so a release key can be rotated. A signature
file is JSON ``{"alg": "ed25519", "key_id": ..., "signature": <base64>}``; ``key_id`` is the first
16 hex digits of the SHA-256 of the raw public key.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

if TYPE_CHECKING:
    from shared.messages import Desired

_PREFIX = "ed25519:"


class SignatureError(ValueError):
    """A signature that is malformed, made by an unknown key, or does not match.

    ``reason`` is a stable code: ``unsigned``, ``malformed_signature``, ``unknown_key`` (made by a
    key that is not pinned) or ``bad_signature`` (does not match the signed bytes).
    """

    def __init__(self, message: str, reason: str = "bad_signature") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PublicKey:
    """A pinned public key and its id."""

    key: Ed25519PublicKey
    key_id: str

    @classmethod
    def from_raw(cls, raw: bytes) -> PublicKey:
        """From the 32 raw key bytes."""
        return cls(Ed25519PublicKey.from_public_bytes(raw), key_id_of(raw))

    def to_text(self) -> str:
        """The one-line ``ed25519:<base64>`` form."""
        return _PREFIX + base64.b64encode(raw_public(self.key)).decode()


def raw_public(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of a public key."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_of(raw: bytes) -> str:
    """The id of a raw public key."""
    return hashlib.sha256(raw).hexdigest()[:16]


def parse_public_key(text: str) -> PublicKey:
    """Parse ``ed25519:<base64>`` or a PEM public key."""
    text = text.strip()
    try:
        if text.startswith(_PREFIX):
            return PublicKey.from_raw(base64.b64decode(text[len(_PREFIX) :], validate=True))
        loaded = serialization.load_pem_public_key(text.encode())
    except ValueError as exc:
        raise SignatureError(f"not an Ed25519 public key: {exc}") from None
    if not isinstance(loaded, Ed25519PublicKey):
        raise SignatureError("PEM key is not Ed25519")
    return PublicKey(loaded, key_id_of(raw_public(loaded)))


def load_public_keys(paths: list[Path]) -> list[PublicKey]:
    """Load every pinned key file (each may hold several lines of ``ed25519:`` keys)."""
    keys: list[PublicKey] = []
    for path in paths:
        text = Path(path).read_text()
        if "BEGIN PUBLIC KEY" in text:
            keys.append(parse_public_key(text))
            continue
        keys.extend(parse_public_key(line) for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return keys


def generate_private_key(path: Path) -> PublicKey:
    """Write a new private key (PEM, mode 0600) to ``path`` and its public line to ``path.pub``."""
    key = Ed25519PrivateKey.generate()
    path = Path(path)
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)
    public = PublicKey.from_raw(raw_public(key.public_key()))
    path.with_suffix(path.suffix + ".pub").write_text(public.to_text() + "\n")
    return public


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load a PEM Ed25519 private key."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key")
    return key


def sign(data: bytes, key: Ed25519PrivateKey) -> bytes:
    """The signature file content for ``data``."""
    doc = {
        "alg": "ed25519",
        "key_id": key_id_of(raw_public(key.public_key())),
        "signature": base64.b64encode(key.sign(data)).decode(),
    }
    return json.dumps(doc, sort_keys=True).encode()


def verify(data: bytes, signature_file: bytes, trusted: list[PublicKey]) -> str:
    """Check ``signature_file`` over ``data`` against the pinned keys; return the signer's key id."""
    try:
        doc = json.loads(signature_file)
        alg, key_id, sig = doc["alg"], doc["key_id"], base64.b64decode(doc["signature"], validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"signature file is malformed: {exc}", "malformed_signature") from None
    if alg != "ed25519":
        raise SignatureError(f"signature algorithm {alg!r} is not ed25519", "malformed_signature")
    candidates = [k for k in trusted if k.key_id == key_id]
    if not candidates:
        raise SignatureError(
            f"signed by key {key_id}, which is not among the {len(trusted)} pinned keys", "unknown_key"
        )
    for candidate in candidates:
        try:
            candidate.key.verify(sig, data)
            return candidate.key_id
        except InvalidSignature:
            continue
    raise SignatureError(f"signature by key {key_id} does not match the manifest")


def sign_desired(desired: Desired, key: Ed25519PrivateKey) -> Desired:
    """``desired`` with its ``signature`` set by ``key`` (over :meth:`Desired.signed_bytes`)."""
    return desired.model_copy(update={"signature": sign(desired.signed_bytes(), key).decode()})


def verify_desired(desired: Desired, trusted: list[PublicKey]) -> str:
    """Check a ``desired`` message's signature against the pinned keys; return the signer's key id."""
    if desired.signature is None:
        raise SignatureError("the desired state is not signed", "unsigned")
    return verify(desired.signed_bytes(), desired.signature.encode(), trusted)
