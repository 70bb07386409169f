"""Advisory signatures: only the sender's key over the exact content verifies."""

from __future__ import annotations

import pytest

from gateway.errors import ConfigError, SignatureError
from gateway.signing import Verifier, new_key, sign


def _record() -> dict[str, object]:
    return {"id": "a1", "sender": "mfa.kz", "data": {"hotline": "+7 7172 00 00 00"}, "channels": ["push"]}


def test_a_signed_record_verifies_whatever_its_key_order() -> None:
    private, public = new_key()
    signed = sign(_record(), private)
    reordered = dict(reversed(list(signed.items())))
    Verifier({"mfa.kz": public}).verify(reordered)


def test_changing_one_word_breaks_the_signature() -> None:
    private, public = new_key()
    signed = sign(_record(), private)
    signed["data"] = {"hotline": "+7 000 forged"}
    with pytest.raises(SignatureError, match="does not verify"):
        Verifier({"mfa.kz": public}).verify(signed)


def test_another_senders_key_does_not_verify() -> None:
    private, _ = new_key()
    _, other_public = new_key()
    with pytest.raises(SignatureError):
        Verifier({"mfa.kz": other_public}).verify(sign(_record(), private))


def test_unknown_sender_and_missing_signature_are_named() -> None:
    private, public = new_key()
    with pytest.raises(SignatureError, match="has no trusted key"):
        Verifier({"someone.else": public}).verify(sign(_record(), private))
    with pytest.raises(SignatureError, match="missing"):
        Verifier({"mfa.kz": public}).verify(_record())


def test_a_malformed_trusted_key_stops_start_up_naming_the_sender() -> None:
    with pytest.raises(ConfigError, match=r"intake\.trusted_keys\.mfa\.kz"):
        Verifier({"mfa.kz": "not base64!"})
