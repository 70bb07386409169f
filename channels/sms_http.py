"""SMS through an aggregator's HTTP JSON API (docs/partner-sms-http-api.md), with its DLR webhook.

The text goes with its encoding (GSM-7 or UCS-2, chosen per message, never a character replaced);
the aggregator splits long messages into concatenated parts. Each message carries our delivery id as
its ``reference``, which the aggregator uses as an idempotency key and returns in its DLRs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from channels.base import Message, Receipt, Result, SignedHttpAdapter, expiry_times, partner_result
from channels.sms import DLR_STATUS, SmsAdapter, SmsSettings, layout
from gateway.errors import SchemaError


class SmsHttpSettings(SmsSettings):
    base_url: str = "http://127.0.0.1:8700"


class SmsHttpAdapter(SmsAdapter, SignedHttpAdapter):
    name = "sms-http"
    max_batch = 100
    settings_model = SmsHttpSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._url = cast(SmsHttpSettings, self.settings).base_url.rstrip("/") + "/sms/v1/messages"

    async def _send(self, batch: Sequence[Message]) -> list[Result]:
        messages = []
        valid_until = expiry_times(batch)
        for m in batch:
            sms = layout(m.parts["body"])
            messages.append(
                {
                    "reference": m.delivery_id,
                    "to": m.address,
                    "from": self.sms_settings.sender,
                    "text": m.parts["body"],
                    "encoding": sms.encoding,
                    "parts": len(sms.parts),
                    "advisory_id": m.advisory_id,
                    "advisory_version": m.version,
                    "language": m.language,
                    "validity_until": valid_until[m.expires_at],
                }
            )
        payload = await self.post_json(self._url, {"messages": messages})
        return [partner_result(item, "reference", "queued", "error") for item in payload.get("results", [])]

    def parse_receipts(self, body: bytes, headers: Mapping[str, str]) -> list[Receipt]:
        receipts = []
        for dlr in self.verified_json(body, headers, "dlrs"):
            try:
                stat = str(dlr["status"]).upper()
                ref = str(dlr["reference"])
            except (KeyError, TypeError) as e:
                raise SchemaError(f"dlrs: malformed DLR: {e}") from e
            if stat not in DLR_STATUS:
                raise SchemaError(f"dlrs: unknown status {stat!r}")
            status = DLR_STATUS[stat]
            if status is not None:  # ENROUTE, ACCEPTD, UNKNOWN: not final, nothing to record
                receipts.append(Receipt(ref, status, dlr.get("message_id")))
        return receipts
