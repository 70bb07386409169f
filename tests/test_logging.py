"""Logs never carry a phone number or an e-mail address unmasked."""

from __future__ import annotations

import io
import json

import structlog

from gateway.logging import configure, mask_email, mask_phone


def test_phone_numbers_are_masked_but_ids_are_not() -> None:
    assert mask_phone("call +77011234567 now") == "call +770*****567 now"
    assert (
        mask_phone("delivery 0e5aff89f34f54e011f8785de5dfe613") == "delivery 0e5aff89f34f54e011f8785de5dfe613"
    )


def test_email_addresses_are_masked() -> None:
    assert mask_email("to aigerim.n@example.kz") == "to a***@example.kz"


def test_log_lines_are_json_with_pii_masked(capsys: object) -> None:
    configure("info", "json")
    buf = io.StringIO()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=buf))
    structlog.get_logger("t").info("recipient.imported", phone="+77011234567", email="bob@mail.kz", count=3)
    line = json.loads(buf.getvalue())
    assert line["event"] == "recipient.imported"
    assert "1234567" not in buf.getvalue()
    assert line["email"] == "b***@mail.kz"
    assert line["count"] == 3
