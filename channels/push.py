"""Super-app push partner: HTTP JSON batch API (docs/partner-push-api.md).

Up to 500 messages a request, signed with HMAC-SHA256; each message carries our delivery id as
its idempotency key, so a replay after a crash is answered from the partner's memory, not sent again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, cast

import aiohttp

from channels.base import (
    Adapter,
    Message,
    Receipt,
    Result,
    SignedChannelSettings,
    hmac_headers,
    verify_hmac,
)
from gateway.errors import ConfigError, PermanentError, RetryableError, SchemaError
from gateway.models import Status
from gateway.settings import read_secret

RECEIPT_STATUS = {"delivered": Status.DELIVERED, "read": Status.READ, "failed": Status.FAILED}


class PushSettings(SignedChannelSettings):
    base_url: str = "http://127.0.0.1:8700"


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class PushAdapter(Adapter):
    name = "push"
    kind = "push"
    parts = ("title", "body")
    limits: ClassVar[Mapping[str, int]] = {"title": 120, "body": 1000}
    max_batch = 500
    settings_model = PushSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.push_settings = cast(PushSettings, self.settings)
        raw = self.push_settings.secret.get_secret_value() if self.push_settings.secret else None
        secret = read_secret(f"channels.{self.channel}", raw, self.push_settings.secret_file)
        if not secret:
            raise ConfigError(
                f"channels.{self.channel}.secret: not set; set "
                f"GATEWAY__CHANNELS__{self.channel.upper()}__SECRET or channels.{self.channel}.secret_file"
            )
        self._secret = secret
        self._url = self.push_settings.base_url.rstrip("/") + "/v1/messages:batch"

    async def _send(self, batch: Sequence[Message]) -> list[Result]:
        body = json.dumps(
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
            ensure_ascii=False,
        ).encode()
        headers = {"Content-Type": "application/json", **hmac_headers(self._secret, body)}
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_s)
        try:
            async with self.session.post(self._url, data=body, headers=headers, timeout=timeout) as resp:
                if resp.status == 429 or resp.status >= 500:
                    raise RetryableError(
                        f"partner answered {resp.status}", _retry_after(resp.headers.get("Retry-After"))
                    )
                if resp.status != 200:
                    text = (await resp.text())[:200]
                    raise PermanentError(f"partner answered {resp.status}: {text}")
                payload = await resp.json()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise RetryableError(f"partner unreachable: {type(e).__name__}: {e}") from e
        return [self._result(item) for item in payload.get("results", [])]

    @staticmethod
    def _result(item: Mapping[str, Any]) -> Result:
        key = str(item.get("idempotency_key"))
        status = item.get("status")
        if status == "accepted":
            return Result(key, "accepted", partner_id=str(item.get("message_id")))
        if status == "rejected":
            return Result(key, "rejected", reason=str(item.get("reason", "rejected by partner")))
        return Result(
            key,
            "retry",
            reason=str(item.get("reason", "partner asked to retry")),
            retry_after=_retry_after(item.get("retry_after_s")),
        )

    def parse_receipts(self, body: bytes, headers: Mapping[str, str]) -> list[Receipt]:
        verify_hmac(self._secret, body, headers)
        try:
            payload = json.loads(body)
            items = payload["receipts"]
            return [
                Receipt(str(r["idempotency_key"]), RECEIPT_STATUS[r["status"]], r.get("message_id"))
                for r in items
            ]
        except (ValueError, KeyError, TypeError) as e:
            raise SchemaError(f"receipts: malformed body: {e}") from e
