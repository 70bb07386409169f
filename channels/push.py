"""Super-app push partner: HTTP JSON batch API (docs/partner-push-api.md).

Up to 500 messages a request, signed with HMAC-SHA256; each message carries our delivery id as
its idempotency key, so a replay after a crash is answered from the partner's memory, not sent again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, cast

from channels.base import Message, Receipt, Result, SignedChannelSettings, SignedHttpAdapter, partner_result
from gateway.errors import SchemaError
from gateway.models import Status

RECEIPT_STATUS = {"delivered": Status.DELIVERED, "read": Status.READ, "failed": Status.FAILED}


class PushSettings(SignedChannelSettings):
    base_url: str = "http://127.0.0.1:8700"


class PushAdapter(SignedHttpAdapter):
    name = "push"
    kind = "push"
    parts = ("title", "body")
    header_parts = ("title",)
    limits: ClassVar[Mapping[str, int]] = {"title": 120, "body": 1000}
    max_batch = 500
    settings_model = PushSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._url = cast(PushSettings, self.settings).base_url.rstrip("/") + "/v1/messages:batch"

    async def _send(self, batch: Sequence[Message]) -> list[Result]:
        payload = await self.post_json(
            self._url,
            {
                "messages": [
                    {
                        "idempotency_key": m.delivery_id,
                        "user_ref": m.address,
                        "title": m.parts["title"],
                        "body": m.parts["body"],
                        "language": m.language,
                        "priority": "high" if m.priority == 0 else "normal",
                        "advisory_id": m.advisory_id,
                        "advisory_version": m.version,
                        "expires_at": m.expires_at.isoformat(),
                    }
                    for m in batch
                ]
            },
        )
        return [
            partner_result(item, "idempotency_key", "accepted", "reason")
            for item in payload.get("results", [])
        ]

    def parse_receipts(self, body: bytes, headers: Mapping[str, str]) -> list[Receipt]:
        try:
            return [
                Receipt(str(r["idempotency_key"]), RECEIPT_STATUS[r["status"]], r.get("message_id"))
                for r in self.verified_json(body, headers, "receipts")
            ]
        except (KeyError, TypeError) as e:
            raise SchemaError(f"receipts: malformed receipt: {e}") from e
