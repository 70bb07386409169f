"""A sandbox SMS aggregator speaking docs/partner-sms-http-api.md over real HTTP, sending DLRs."""

from __future__ import annotations

from typing import Any

import phonenumbers
from aiohttp import web

from channels.sms import is_gsm7, layout
from gateway.sandbox.partner import SandboxPartner

MAX_BATCH = 100


class SmsAggregator(SandboxPartner):
    channel = "sms-http"
    receipt_status = "DELIVRD"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parts_sent = 0
        self.encodings: dict[str, int] = {}

    def routes(self) -> list[web.RouteDef]:
        return [self.batch_route("/sms/v1/messages", MAX_BATCH, self._take_all), *super().routes()]

    def stats(self, since: float | None = None) -> dict[str, Any]:
        return {
            **super().stats(since),
            "parts": self.parts_sent,
            "encodings": dict(sorted(self.encodings.items())),
        }

    def receipt(self, key: str, message_id: str, status: str) -> dict[str, Any]:
        return {"reference": key, "message_id": message_id, "status": status}

    def receipt_body(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        return {"dlrs": batch}

    def _take_all(self, messages: list[Any]) -> list[dict[str, Any]]:
        return [self._take(m) for m in messages]

    def _take(self, m: dict[str, Any]) -> dict[str, Any]:
        ref = str(m.get("reference") or "")
        error = self._invalid(m)
        if error:
            self.rejected += 1
            return {"reference": ref, "status": "rejected", "error": error}
        advisory = f"{m.get('advisory_id')}@v{m.get('advisory_version')}"
        message_id, first = self.accept(ref, str(m["to"]), advisory, str(m.get("language")))
        if first:
            self.parts_sent += len(layout(m["text"]).parts)
            self.encodings[m["encoding"]] = self.encodings.get(m["encoding"], 0) + 1
        return {"reference": ref, "status": "queued", "message_id": message_id}

    @staticmethod
    def _invalid(m: dict[str, Any]) -> str | None:
        """Why the aggregator refuses a message, as a real one would; None if it takes it."""
        if not m.get("reference") or not m.get("text"):
            return "reference and text are required"
        try:
            number = phonenumbers.parse(str(m.get("to")), None)
        except phonenumbers.NumberParseException:
            return "to: not an international number"
        if not phonenumbers.is_valid_number(number):
            return "to: not a valid number"
        if m.get("encoding") not in ("gsm7", "ucs2"):
            return "encoding: gsm7 or ucs2"
        if m["encoding"] == "gsm7" and not is_gsm7(m["text"]):
            return "text: not representable in GSM-7; send it as ucs2"
        return None
