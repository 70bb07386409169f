"""Detached Ed25519 signatures on advisories: a forged or altered word is never sent.

The signed bytes are the advisory's JSON object without its ``signature`` field, canonicalised:
keys sorted, no insignificant white space, UTF-8 (``canonical_bytes``). The signature is base64.
A CAP XML document is signed over its exact bytes, the signature in the Kafka record header
``signature`` (``sign_document``); an enveloped XML-DSig inside it is gateway/xmldsig.py's.
Each sender has one trusted public key (``intake.trusted_keys``).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from gateway.errors import ConfigError, SignatureError


def canonical_bytes(record: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in record.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def new_key() -> tuple[str, str]:
    """A fresh (private, public) key pair, both base64 of the raw 32 bytes."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(private).decode(), base64.b64encode(public).decode()


def sign(record: Mapping[str, Any], private_key_b64: str) -> dict[str, Any]:
    """A copy of ``record`` with its ``signature`` set."""
    try:
        key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(private_key_b64, validate=True))
    except (ValueError, binascii.Error) as e:
        raise ConfigError("signing key: not a base64 Ed25519 private key") from e
    signature = key.sign(canonical_bytes(record))
    return {**record, "signature": base64.b64encode(signature).decode()}


SIGNATURE_HEADER = "signature"  # the Kafka record header of a CAP document's detached signature


def sign_document(raw: bytes, private_key_b64: str) -> str:
    """A detached Ed25519 signature (base64) over a document's exact bytes (CAP XML)."""
    try:
        key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(private_key_b64, validate=True))
    except (ValueError, binascii.Error) as e:
        raise ConfigError("signing key: not a base64 Ed25519 private key") from e
    return base64.b64encode(key.sign(raw)).decode()


class Verifier:
    def __init__(self, trusted_keys: Mapping[str, str]) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        for sender, b64 in trusted_keys.items():
            try:
                self._keys[sender] = Ed25519PublicKey.from_public_bytes(base64.b64decode(b64, validate=True))
            except (ValueError, binascii.Error) as e:
                raise ConfigError(f"intake.trusted_keys.{sender}: not a base64 Ed25519 public key") from e

    def verify_document(self, sender: str, signature: str, raw: bytes) -> None:
        """A document signed over its bytes (CAP XML): the signature comes beside it, not in it."""
        if not signature:
            raise SignatureError(
                f"signature: missing; a CAP document is signed in the record header {SIGNATURE_HEADER!r}"
            )
        self._check(sender, signature, raw)

    def verify(self, record: Mapping[str, Any]) -> None:
        sender = record.get("sender")
        signature = record.get("signature")
        if not signature:
            raise SignatureError("signature: missing; advisories must be signed by their sender")
        self._check(str(sender), str(signature), canonical_bytes(record))

    def _check(self, sender: str, signature: str, signed: bytes) -> None:
        key = self._keys.get(sender)
        if key is None:
            raise SignatureError(f"sender: {sender!r} has no trusted key")
        try:
            key.verify(base64.b64decode(signature, validate=True), signed)
        except (InvalidSignature, ValueError, binascii.Error) as e:
            raise SignatureError(f"signature: does not verify for sender {sender!r}") from e
