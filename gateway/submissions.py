"""The press office's door: submit, read, list, approve, reject, return, cancel and export advisories
over HTTP (described in docs/openapi.yaml, served at ``/openapi.yaml``).

A submission (``application/json``: the advisory record of DESIGN.md; or ``application/cap+xml``: a
CAP 1.2 document) is judged by **the same checks as intake** (``Intake.validate``: limits, schema,
signature, expiry, channels, the render check in every language and channel) before it reaches the
advisories topic, plus what only the store can tell: that the version is new, and that what a
cancel or update names exists and may be withdrawn by this sender. The answer to a valid submission
is 202 with its id, version and a link to its status; intake then stores it (``pending_approval``
where the approval policy says so) as it stores any record.

Signatures: a press token is authorized to speak for the senders whose Ed25519 signing keys the
gateway holds (``api.signing_keys``, a secret). A submission that carries its own signature (JSON
``signature``, or an XML-DSig ``<Signature>`` in CAP) is verified as it is; one that carries none is
signed by the gateway after the token is authorized. Intake verifies every record either way.

Every write is in the audit log with the token that made it (``advisory.submitted`` here; approvals,
rejections, returns and cancels in the same transaction as the move, gateway/store/advisories.py). Every error
is RFC 9457 problem+json naming the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from aiohttp import web
from aiokafka import AIOKafkaProducer

from gateway import approval, audit
from gateway.api import problem
from gateway.auth import PRINCIPAL_KEY, Principal
from gateway.cap import is_cap, parse_cap
from gateway.errors import DecisionError, DecodeError, InputError, NotFoundError
from gateway.feed import CAP_TYPE, Feed
from gateway.intake import SUBMITTED_BY_HEADER, Intake, Stage, decode
from gateway.lifecycle import (
    AdvisoryState,
    Reference,
    partition_key,
    withdrawal_by,
)
from gateway.models import Advisory, aware
from gateway.receipts import read_limited
from gateway.settings import PROJECT_ROOT
from gateway.signing import SIGNATURE_HEADER, sign, sign_document
from gateway.store import Store, Version
from gateway.xmldsig import has_signature

OPENAPI = PROJECT_ROOT / "docs" / "openapi.yaml"
READERS = frozenset({"press", "approver", "operator", "admin"})

# route ("METHOD path" or "path") -> the roles that may call it (gateway/auth.py)
ROLES: dict[str, frozenset[str]] = {
    "POST /advisories": frozenset({"press"}),
    "/advisories": READERS,
    "/advisories/{advisory_id}": READERS,
    "/advisories/{advisory_id}/cap": READERS,
    "/advisories/{advisory_id}/approve": frozenset({"approver"}),
    "/advisories/{advisory_id}/reject": frozenset({"approver"}),
    "/advisories/{advisory_id}/return": frozenset({"approver"}),
    "/advisories/{advisory_id}/cancel": frozenset({"operator", "admin"}),
    "/audit": frozenset({"admin"}),
}
_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]-]*):")
_STATES = frozenset(s.value for s in AdvisoryState)
# route verb -> the state an approver's decision moves the waiting version to (lifecycle.DECISIONS)
DECISION_ROUTES = {
    "approve": AdvisoryState.ACTIVE,
    "reject": AdvisoryState.REJECTED,
    "return": AdvisoryState.RETURNED,
}


def field_of(message: str, default: str = "body") -> str:
    """The field an error message names first (``expires_at: …`` → ``expires_at``)."""
    m = _FIELD.match(message)
    return m.group(1) if m else default


def invalid(e: InputError) -> web.Response:
    return problem(422, f"Not accepted ({e.kind})", str(e), field=field_of(str(e)))


def _version_json(v: Version) -> dict[str, Any]:
    return {
        "version": v.version,
        "msg_type": v.msg_type,
        "sender": v.sender,
        "state": v.state.value,
        "training": v.training,
        "submitted_by": v.submitted_by,
        "received_at": v.received_at.isoformat(),
        "expires_at": v.expires_at.isoformat(),
    }


def _entry_json(row: sa.RowMapping) -> dict[str, Any]:
    at: datetime = row["at"]
    return {
        "seq": row["seq"],
        "at": aware(at).isoformat(),
        "actor": row["actor"],
        "action": row["action"],
        "subject": row["subject"],
        "detail": row["detail"],
    }


class Submissions:
    def __init__(
        self,
        store: Store,
        intake: Intake,
        producer: AIOKafkaProducer,
        topic: str,
        signing_keys: Mapping[str, str],
        feed: Feed,
        max_body_bytes: int,
    ) -> None:
        self.store = store
        self.intake = intake
        self.producer = producer
        self.topic = topic
        self.signing_keys = dict(signing_keys)
        self.feed = feed
        self.max_body_bytes = max_body_bytes
        self.openapi_yaml = OPENAPI.read_bytes()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/openapi.yaml", self.openapi),
            web.post("/advisories", self.submit),
            web.get("/advisories", self.list),
            web.get("/advisories/{advisory_id}", self.get),
            web.get("/advisories/{advisory_id}/cap", self.export),
            *(web.post(f"/advisories/{{advisory_id}}/{verb}", self.decide) for verb in DECISION_ROUTES),
            web.post("/advisories/{advisory_id}/cancel", self.cancel),
            web.get("/audit", self.audit),
        ]

    async def openapi(self, _: web.Request) -> web.Response:
        return web.Response(body=self.openapi_yaml, content_type="application/yaml")

    # -- submit -------------------------------------------------------------------------------

    async def submit(self, request: web.Request) -> web.Response:
        body = await read_limited(request, self.max_body_bytes)
        if body is None:
            limit = f"a submission is limited to {self.max_body_bytes} bytes"
            return problem(413, "Too large", limit, field="body")
        return await self.take(request[PRINCIPAL_KEY], body, request.content_type)

    async def take(self, who: Principal, body: bytes, kind: str) -> web.Response:
        """One submission by ``who`` (the API's, and the console's press desk): 202 or a problem."""
        try:
            if kind in {CAP_TYPE, "application/xml", "text/xml"}:
                raw, headers = self._cap(body)
            elif kind == "application/json":
                raw, headers = self._json(body)
            else:
                what = f"send application/json (an advisory) or {CAP_TYPE} (CAP 1.2), not {kind!r}"
                return problem(415, "Unsupported media type", what, field="Content-Type")
            adv, _ = self.intake.validate(raw, headers)
            await self._check_against_store(adv)
        except NotFoundError as e:
            return problem(404, "Unknown advisory", str(e), field=field_of(str(e), "references"))
        except InputError as e:
            if e.kind == "decode":
                return problem(400, "Malformed", str(e), field="body")
            return invalid(e)
        why = await approval.required(adv, self.intake.approval.rules, self.intake.audience_size)
        # logged before the send (so it precedes what intake logs); a send that fails is logged too
        async with self.store.begin_write() as conn:
            detail = {"msg_type": adv.msg_type, "format": "cap" if is_cap(raw) else "json"}
            await conn.run_sync(audit.append, who.actor, "advisory.submitted", adv.key, detail)
        kafka_headers = [(SUBMITTED_BY_HEADER, who.actor.encode()), *headers.items()]
        record_key = partition_key(adv.id, adv.msg_type, adv.references)
        try:
            await self.producer.send_and_wait(self.topic, raw, key=record_key, headers=kafka_headers)
        except Exception as e:
            async with self.store.begin_write() as conn:
                failed = {"error": f"{type(e).__name__}: {e}"[:300]}
                await conn.run_sync(audit.append, who.actor, "advisory.submission_failed", adv.key, failed)
            what = "the advisories topic did not take it; nothing was sent; submit it again"
            return problem(503, "Not submitted", what, field="body")
        status_url = f"/advisories/{adv.id}"
        answer = {
            "id": adv.id,
            "version": adv.version,
            "msg_type": adv.msg_type,
            "training": adv.training,
            "needs_approval": why,
            "status_url": status_url,
        }
        return web.json_response(answer, status=202, headers={"Location": status_url})

    def _key_for(self, sender: str) -> str:
        private = self.signing_keys.get(sender)
        if private is None:
            raise InputError(
                f"signature: missing, and this gateway holds no signing key for sender {sender!r} "
                "(sign the advisory, or configure api.signing_keys)"
            )
        return private

    def _json(self, body: bytes) -> tuple[bytes, dict[str, bytes]]:
        with Stage(DecodeError, "decode"):
            record = decode(body, self.intake.settings.limits)
        if "sender" not in record and len(self.signing_keys) == 1:
            record["sender"] = next(iter(self.signing_keys))
        if not record.get("signature") and isinstance(record.get("sender"), str):
            record = sign(record, self._key_for(record["sender"]))
        return json.dumps(record, ensure_ascii=False).encode(), {}

    def _cap(self, body: bytes) -> tuple[bytes, dict[str, bytes]]:
        settings = self.intake.settings
        with Stage(DecodeError, "decode"):
            sender = str(parse_cap(body, settings.limits, settings.cap_channels).get("sender"))
            signed = self.intake.xmldsig.applies(sender) and has_signature(body)
        if signed:
            return body, {}
        return body, {SIGNATURE_HEADER: sign_document(body, self._key_for(sender)).encode()}

    async def _check_against_store(self, adv: Advisory) -> None:
        """What only the store knows: the version is new; what it withdraws exists; and the sender
        may withdraw it (the store's own authority check, as intake will run it)."""
        stored = await self.store.versions(adv.id)
        if any(v.version == adv.version for v in stored):
            newest = max(v.version for v in stored)
            raise InputError(f"version: {adv.key} is stored already; submit version {newest + 1}")
        if withdrawal_by(adv.msg_type) is not None:
            for ref in map(Reference.parse, adv.references):
                if ref.advisory_id != adv.id and not await self.store.versions(ref.advisory_id):
                    raise NotFoundError(f"references: no advisory {ref.advisory_id!r} is stored")
        await self.store.check_authority(adv, self.intake.settings.authorities)

    # -- read ----------------------------------------------------------------------------------

    async def get(self, request: web.Request) -> web.Response:
        advisory_id = request.match_info["advisory_id"]
        versions = await self.store.versions(advisory_id)
        history = await audit.read(self.store.engine, subject_prefix=f"{advisory_id}@v")
        if not versions and not history:
            return problem(404, "Unknown advisory", f"no advisory {advisory_id!r}", field="advisory_id")
        newest = versions[-1] if versions else None
        return web.json_response(
            {
                "id": advisory_id,
                # submitted: accepted by the API, not stored by intake yet
                "state": newest.state.value if newest else "submitted",
                "version": newest.version if newest else None,
                "versions": [_version_json(v) for v in versions],
                "deliveries": await self.store.counts(advisory_id),
                # partner-side segments: one request per language, the partner's aggregate counts
                "segments": [s.as_dict() for s in await self.store.segments(advisory_id)],
                "history": [_entry_json(e) for e in history],
            }
        )

    async def list(self, request: web.Request) -> web.Response:
        q = request.query
        states = [s for s in q.get("state", "").split(",") if s]
        bad = [s for s in states if s not in _STATES]
        if bad:
            detail = f"unknown state {bad[0]!r}; one of {', '.join(sorted(_STATES))}"
            return problem(400, "Bad filter", detail, field="state")
        try:
            limit = int(q.get("limit", "100"))
            if not 1 <= limit <= 500:
                raise ValueError
        except ValueError:
            return problem(400, "Bad filter", "limit: a whole number from 1 to 500", field="limit")
        training = {"true": True, "false": False}.get(q.get("training", ""))
        if "training" in q and training is None:
            return problem(400, "Bad filter", "training: true or false", field="training")
        before = None
        if "before" in q:
            try:
                before = datetime.fromisoformat(q["before"])
                if before.tzinfo is None:
                    raise ValueError
            except ValueError:
                detail = "before: a date-time with its zone (received_at of the last item seen)"
                return problem(400, "Bad filter", detail, field="before")
        found = await self.store.newest_versions(states, q.get("sender"), training, before, limit)
        return web.json_response({"advisories": [{"id": v.advisory_id, **_version_json(v)} for v in found]})

    async def export(self, request: web.Request) -> web.Response:
        advisory_id = request.match_info["advisory_id"]
        versions = await self.store.versions(advisory_id)
        wanted = request.query.get("version")
        chosen = [v for v in versions if wanted is None or str(v.version) == wanted]
        if not chosen:
            detail = f"no advisory {advisory_id!r}" + (f" version {wanted}" if wanted else "")
            return problem(404, "Unknown advisory", detail, field="version" if versions else "advisory_id")
        adv = await self.store.advisory(advisory_id, chosen[-1].version)
        assert adv is not None
        return web.Response(body=await self.feed.document(adv), content_type=CAP_TYPE, charset="utf-8")

    async def audit(self, request: web.Request) -> web.Response:
        try:
            after = int(request.query.get("after", "0"))
            if not 0 <= after < 2**62:
                raise ValueError
        except ValueError:
            return problem(400, "Bad filter", "after: a sequence number (0 or more)", field="after")
        rows = await audit.read(self.store.engine, request.query.get("subject"), 1000, after=after)
        return web.json_response({"entries": [_entry_json(r) for r in rows]})

    # -- decide ----------------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict[str, Any]:
        """An optional small JSON object body ({"reason": …, "version": …})."""
        raw = await read_limited(request, 16 * 1024)
        if raw is None:
            raise InputError("body: at most 16 KiB")
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise InputError(f"body: not JSON: {e}") from e
        if not isinstance(body, dict):
            raise InputError("body: a JSON object")
        reason = body.get("reason")
        if reason is not None and (not isinstance(reason, str) or len(reason) > 1000):
            raise InputError("reason: a text of at most 1000 characters")
        version = body.get("version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise InputError("version: a whole number")
        return body

    async def decide(self, request: web.Request) -> web.Response:
        who: Principal = request[PRINCIPAL_KEY]
        advisory_id = request.match_info["advisory_id"]
        decision = DECISION_ROUTES[request.path.rsplit("/", 1)[1]]
        try:
            body = await self._body(request)
            reason = body.get("reason")
            if decision is not AdvisoryState.ACTIVE and not (reason or "").strip():
                raise InputError("reason: say why (the submitter reads it)")
            done = await self.store.decide(advisory_id, body.get("version"), decision, who.actor, reason)
        except NotFoundError as e:
            return problem(404, "Unknown advisory", str(e), field=field_of(str(e), "advisory_id"))
        except InputError as e:
            return problem(400, "Bad request", str(e), field=field_of(str(e)))
        except DecisionError as e:
            return problem(e.status, "Not allowed", e.reason, field="advisory_id")
        return web.json_response(
            {"id": advisory_id, "version": done.version, "state": done.state.value, "by": who.actor}
        )

    async def cancel(self, request: web.Request) -> web.Response:
        who: Principal = request[PRINCIPAL_KEY]
        advisory_id = request.match_info["advisory_id"]
        try:
            body = await self._body(request)
            reason = str(body.get("reason") or "cancelled by an operator")
            withdrawn = await self.store.cancel(advisory_id, who.actor, reason)
        except NotFoundError as e:
            return problem(404, "Unknown advisory", str(e), field="advisory_id")
        except InputError as e:
            return problem(400, "Bad request", str(e), field=field_of(str(e)))
        except DecisionError as e:
            return problem(e.status, "Not allowed", e.reason, field="advisory_id")
        return web.json_response(
            {"id": advisory_id, "state": AdvisoryState.CANCELLED.value, "withdrawn_pending": withdrawn}
        )
