"""Super-app push partner: HTTP JSON batch API (docs/partner-push-api.md).

Up to 500 messages a request, signed with HMAC-SHA256; each message carries our delivery id as
its idempotency key, so a replay after a crash is answered from the partner's memory, not sent again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, cast

from channels.base import (
    Message,
    Receipt,
    Result,
    SegmentAccepted,
    SegmentMessage,
    SignedChannelSettings,
    SignedHttpAdapter,
    expiry_times,
    partner_result,
)
from gateway.errors import PermanentError, SchemaError
from gateway.models import SEGMENT_COUNTS, SegmentReceipt, Status

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
    segments = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._base = cast(PushSettings, self.settings).base_url.rstrip("/")
        self._url = self._base + "/v1/messages:batch"

    async def send_segment(self, m: SegmentMessage) -> SegmentAccepted:
        answer = await self.post_json(
            self._base + "/v1/segments:send",
            {
                "idempotency_key": m.key,
                "segment": m.segment,
                "language": m.language,
                "languages": list(m.languages),
                "default": m.is_default,
                "title": m.parts["title"],
                "body": m.parts["body"],
                "priority": "high" if m.priority == 0 else "normal",
                "advisory_id": m.advisory_id,
                "advisory_version": m.version,
                "expires_at": m.expires_at.isoformat(),
                "replaces": m.replaces,
            },
        )
        if not isinstance(answer, dict) or answer.get("status") != "accepted" or not answer.get("message_id"):
            reason = answer.get("reason") if isinstance(answer, dict) else None
            raise PermanentError(f"segment request refused: {reason or answer!r:.200}")
        return SegmentAccepted(str(answer["message_id"]), int(answer.get("targeted") or 0))

    async def cancel_segment(self, partner_id: str, key: str) -> int:
        answer = await self.post_json(
            f"{self._base}/v1/segments/{partner_id}:cancel", {"idempotency_key": key}
        )
        return int(answer.get("cancelled") or 0) if isinstance(answer, dict) else 0

    def parse_segment_receipts(self, body: bytes, headers: Mapping[str, str]) -> list[SegmentReceipt]:
        try:
            return [
                SegmentReceipt(
                    str(r["idempotency_key"]),
                    {k: _count(r.get(k, 0)) for k in SEGMENT_COUNTS},
                    bool(r.get("final", False)),
                )
                for r in self.verified_json(body, headers, "segment_receipts")
            ]
        except (KeyError, TypeError, ValueError) as e:
            raise SchemaError(f"segment_receipts: malformed receipt: {e}") from e

    async def _send(self, batch: Sequence[Message]) -> list[Result]:
        expires = expiry_times(batch)
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
                        "expires_at": expires[m.expires_at],
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


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"a count must be a whole number >= 0, not {value!r}")
    return value
