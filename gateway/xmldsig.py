"""Enveloped XML-DSig signatures on CAP documents (signxml), verified against certificates
configured per sender (``intake.xmldsig``), so alerts relayed by a national aggregator can be taken
as they come, signed by their issuer.

A document whose ``<sender>`` has certificates configured here:

- carries a ``<Signature>``: it must verify against one of them (X.509; the certificate is pinned,
  not looked up in a CA store), and the advisory is read **from what the signature covers**, so a
  signature over one alert cannot vouch for another wrapped around it;
- carries none: refused if the sender's policy is ``required``; with ``optional``, the detached
  Ed25519 signature in the record header (gateway/signing.py) is checked instead.

A sender with no certificates here is checked by the Ed25519 header only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lxml import etree
from signxml import InvalidInput, InvalidSignature, XMLVerifier  # type: ignore[attr-defined]

from gateway.errors import ConfigError, SignatureError
from gateway.settings import XmlDsigSender

DS = "http://www.w3.org/2000/09/xmldsig#"


def _pem(value: str, sender: str) -> str:
    if "-----BEGIN CERTIFICATE-----" in value:
        return value
    try:
        return Path(value).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"intake.xmldsig.{sender}.certificates: cannot read {value!r}: {e}") from e


def has_signature(raw: bytes) -> bool:
    """Whether a CAP document carries an XML-DSig ``<Signature>`` as a child of its root."""
    root = etree.fromstring(
        raw, etree.XMLParser(resolve_entities=False, load_dtd=False, no_network=True, huge_tree=False)
    )
    return root.find(f"{{{DS}}}Signature") is not None


class XmlDsig:
    def __init__(self, senders: Mapping[str, XmlDsigSender]) -> None:
        self.policies = {sender: s.policy for sender, s in senders.items()}
        self.certificates = {
            sender: [_pem(c, sender) for c in s.certificates] for sender, s in senders.items()
        }

    def applies(self, sender: str) -> bool:
        return sender in self.certificates

    def verify(self, sender: str, raw: bytes) -> bytes:
        """The bytes of what the signature covers (the alert without its ``<Signature>``), or
        SignatureError naming why not."""
        errors = []
        for cert in self.certificates[sender]:
            try:
                result = XMLVerifier().verify(raw, x509_cert=cert)
            except (InvalidSignature, InvalidInput) as e:
                errors.append(str(e)[:200])
                continue
            signed = result[0] if isinstance(result, list) else result
            return bytes(etree.tostring(signed.signed_xml))
        raise SignatureError(
            f"Signature: the XML-DSig signature does not verify against {sender!r}'s certificates "
            f"({'; '.join(dict.fromkeys(errors))})"
        )
