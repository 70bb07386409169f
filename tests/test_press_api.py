"""The press office's API over real HTTP, against one running gateway, the broker and the sandbox
partners: CAP submitted by a press token, approved by a second token, delivered, updated, cancelled;
bad submissions refused with problem+json and nothing sent; training reaching only the gateway's own
sandbox; XML-DSig per sender; and schemathesis against docs/openapi.yaml.

One gateway serves the module (its start-up costs seconds): every test uses its own advisory ids."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import rsa
from lxml import etree
from signxml import XMLSigner

from gateway.app import Gateway
from gateway.directory import import_file
from gateway.sandbox.process import SandboxProcess
from gateway.signing import sign
from tests.conftest import (
    PRIVATE_KEY,
    PUBLIC_KEY,
    SENDER,
    advisory,
    bearer,
    eventually,
    make_settings,
    running_gateway,
    self_signed,
)

# one gateway for the module, and later tests read what earlier ones did: one worker runs them all
# (make test: --dist loadgroup)
pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.xdist_group("press_api")]

FIXTURES = Path(__file__).parent / "fixtures" / "cap"
AGGREGATOR = "aggregator.test"  # relays CAP signed with XML-DSig (policy: required)
ROOT = Path(__file__).resolve().parent.parent


def _certificate() -> tuple[bytes, bytes]:
    return self_signed(AGGREGATOR, rsa.generate_private_key(public_exponent=65537, key_size=2048))


AGG_KEY, AGG_CERT = _certificate()
OTHER_KEY, OTHER_CERT = _certificate()


class Api:
    """The running gateway, its sandbox partners, and a token per role."""

    def __init__(self, gw: Gateway, sandbox: SandboxProcess, http: aiohttp.ClientSession) -> None:
        self.gw, self.sandbox, self.http = gw, sandbox, http
        self.url = gw.public_url
        self.tokens: dict[str, dict[str, str]] = {}

    async def call(
        self, method: str, path: str, role: str | None, body: bytes | dict[str, Any] | None = None, **kw: Any
    ) -> tuple[int, Any]:
        headers = dict(self.tokens[role]) if role else {}
        headers.update(kw.pop("headers", {}))
        data = None
        if isinstance(body, dict):
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        elif body is not None:
            data = body
            headers.setdefault("Content-Type", "application/cap+xml")
        async with self.http.request(method, self.url + path, data=data, headers=headers, **kw) as resp:
            text = await resp.read()
            kind = resp.content_type
            return resp.status, json.loads(text) if kind.endswith("json") else text

    async def state(self, advisory_id: str) -> str:
        status, body = await self.call("GET", f"/advisories/{advisory_id}", "operator")
        return str(body["state"]) if status == 200 else f"HTTP {status}"

    async def waits_for(self, advisory_id: str, state: str) -> None:
        async def there() -> bool:
            return await self.state(advisory_id) == state

        await eventually(there, what=f"{advisory_id} {state}")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str) -> AsyncIterator[Api]:
    tmp = tmp_path_factory.mktemp("press-api")
    async with SandboxProcess(uuid.uuid4().hex, receipt_delay_s=0.05) as sandbox:
        settings = make_settings(
            tmp,
            kafka_bootstrap,
            sandbox,
            GATEWAY__APPROVAL__RULES="[{}]",  # the production profile: every alert and update
            GATEWAY__API__SIGNING_KEYS=json.dumps({SENDER: PRIVATE_KEY, AGGREGATOR: PRIVATE_KEY}),
            GATEWAY__INTAKE__TRUSTED_KEYS=json.dumps({SENDER: PUBLIC_KEY, AGGREGATOR: PUBLIC_KEY}),
            GATEWAY__INTAKE__XMLDSIG=json.dumps(
                {AGGREGATOR: {"policy": "required", "certificates": [AGG_CERT.decode()]}}
            ),
            GATEWAY__CHANNELS__PUSH__CIRCUIT__FAILURES_TO_OPEN="2",
            GATEWAY__CHANNELS__PUSH__CIRCUIT__OPEN_S="0.2",
            GATEWAY__PLANNER__POLL_S="0.2",
        )
        async with running_gateway(settings, sandbox) as gw, aiohttp.ClientSession() as http:
            api = Api(gw, sandbox, http)
            for role in ("press", "approver", "operator", "admin"):
                api.tokens[role] = await bearer(gw, role)
            api.tokens["press2"] = await bearer(gw, "press", "approver")  # may approve others' only
            yield api


async def _people(api: Api, tmp: Path, prefix: str) -> dict[str, int]:
    """Recipients in XA reachable by push only, SMS only and e-mail only."""
    rows = ["id,languages,app_user,phone,email,country"]
    rows += [f"{prefix}p{i},kk|ru,{prefix}-app-{i},,,XA" for i in range(12)]
    rows += [f"{prefix}s{i},ru,,+7701{i:07d},,XA" for i in range(8)]
    rows += [f"{prefix}e{i},en,,,{prefix}{i}@mail.example,XA" for i in range(6)]
    path = tmp / f"{prefix}.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    assert api.gw.store is not None
    assert (await import_file(api.gw.store, path)).failed == 0
    return {"push": 12, "sms-http": 8, "email": 6}


def _cap(name: str, **swap: str) -> bytes:
    raw = (FIXTURES / name).read_bytes()
    for old, new in swap.items():
        raw = raw.replace(old.encode(), new.encode())
    return raw


async def _counts(api: Api, advisory_id: str) -> dict[str, dict[str, int]]:
    _, body = await api.call("GET", f"/advisories/{advisory_id}", "operator")
    return dict(body["deliveries"])


async def test_a_cap_alert_approved_by_a_second_person_is_delivered_updated_and_cancelled(
    api: Api, tmp_path: Path
) -> None:
    """The Done-when of the press office's door, end to end over HTTP."""
    # the whole country XA: the module's other tests add no recipients there
    reach = await _people(api, tmp_path, "dw")
    alert_id, update_id, _cancel_id = "mfa.kz.evac.2026-001", "mfa.kz.evac.2026-002", "mfa.kz.evac.2026-003"

    assert (await api.call("POST", "/advisories", None, _cap("evacuation-alert.xml")))[0] == 401
    status, answer = await api.call("POST", "/advisories", "press", _cap("evacuation-alert.xml"))
    assert status == 202, answer
    assert answer["needs_approval"] == "approval.rules[0]: every advisory"
    assert answer["status_url"] == f"/advisories/{alert_id}"
    await api.waits_for(alert_id, "pending_approval")
    assert await _counts(api, alert_id) == {}  # nothing planned while it waits

    status, _refused = await api.call("POST", f"/advisories/{alert_id}/approve", "press")
    assert status == 403  # a press token is not an approver
    await api.sandbox.faults("push", status=503)  # the push partner is down while the alert goes out
    status, done = await api.call("POST", f"/advisories/{alert_id}/approve", "approver", {})
    assert (status, done["state"]) == (200, "active"), done

    async def sms_and_email_delivered() -> bool:
        c = await _counts(api, alert_id)
        return (
            c.get("sms-http", {}).get("delivered") == reach["sms-http"]
            and c.get("email", {}).get("delivered") == reach["email"]
        )

    await eventually(sms_and_email_delivered, what="the alert delivered by SMS and e-mail")
    assert "delivered" not in (await _counts(api, alert_id))["push"]  # held: still pending

    _, feed = await api.call("GET", "/feed.atom", None)
    assert f"/cap/{alert_id}".encode() in feed

    # its Update: waits for approval too; once approved, the alert's pending pushes are withdrawn
    status, answer = await api.call("POST", "/advisories", "press", _cap("evacuation-update.xml"))
    assert status == 202, answer
    await api.waits_for(update_id, "pending_approval")
    assert (await api.call("POST", f"/advisories/{update_id}/approve", "approver"))[0] == 200
    await api.waits_for(alert_id, "superseded")
    await api.sandbox.faults("push", count=0)

    async def update_delivered() -> bool:
        c = await _counts(api, update_id)
        return all(c.get(ch, {}).get("delivered") == n for ch, n in reach.items())

    await eventually(update_delivered, what="the update delivered on push, SMS and e-mail")
    push = (await api.sandbox.stats())["channels"]["push"]["by_advisory"]
    assert f"{alert_id}@v1" not in push  # the pending recipients got only the newest form
    assert push[f"{update_id}@v1"]["unique_recipients"] == reach["push"]
    assert push[f"{update_id}@v1"]["duplicates"] == 0
    assert (await _counts(api, alert_id))["push"] == {"cancelled": reach["push"]}

    # its Cancel: never waits for approval, withdraws both, and they leave the feed
    status, answer = await api.call("POST", "/advisories", "press", _cap("evacuation-cancel.xml"))
    assert (status, answer["needs_approval"]) == (202, None)
    await api.waits_for(update_id, "cancelled")
    assert await api.state(alert_id) == "cancelled"
    _, feed = await api.call("GET", "/feed.atom", None)
    assert f"/cap/{update_id}".encode() not in feed
    assert f"/cap/{alert_id}".encode() not in feed

    # every step is in the audit log, with the token that took it
    _, log = await api.call("GET", "/audit?subject=" + f"{alert_id}@v1", "admin")
    steps = [(e["action"], e["actor"].split(":")[-1]) for e in log["entries"]]
    assert steps == [
        ("advisory.submitted", "test"),
        ("advisory.pending_approval", "test"),
        ("advisory.active", "test"),
        ("advisory.superseded", "test"),
        ("advisory.cancelled", "test"),
    ]
    actors = [e["actor"] for e in log["entries"]]
    assert actors[0] == actors[1] != actors[2]  # submitted and approved by two different tokens
    _, view = await api.call("GET", f"/advisories/{alert_id}", "press")
    assert [h["action"] for h in view["history"]] == [a for a, _ in steps]
    assert (await api.call("GET", "/audit", "operator"))[0] == 403


async def test_the_submitter_cannot_approve_their_own_and_decisions_need_reasons(api: Api) -> None:
    record = advisory(id=f"self-{uuid.uuid4().hex[:6]}", audience={"countries": ["XS"]})
    status, answer = await api.call("POST", "/advisories", "press2", record)
    assert status == 202, answer
    await api.waits_for(record["id"], "pending_approval")
    status, problem = await api.call("POST", f"/advisories/{record['id']}/approve", "press2")
    assert status == 403
    assert "second person" in problem["detail"]
    status, problem = await api.call("POST", f"/advisories/{record['id']}/return", "approver", {})
    assert (status, problem["field"]) == (400, "reason")
    status, done = await api.call(
        "POST", f"/advisories/{record['id']}/return", "approver", {"reason": "name the hotline"}
    )
    assert (status, done["state"]) == (200, "returned")
    status, problem = await api.call("POST", f"/advisories/{record['id']}/approve", "approver")
    assert status == 409
    assert "is returned" in problem["detail"]
    _, listed = await api.call("GET", "/advisories?state=returned", "press")
    assert record["id"] in [a["id"] for a in listed["advisories"]]


def _signed_agg(raw: bytes) -> bytes:
    root = etree.fromstring(raw)
    signed = XMLSigner().sign(root, key=AGG_KEY, cert=AGG_CERT.decode())
    return bytes(etree.tostring(signed, xml_declaration=True, encoding="UTF-8"))


def _agg_alert(n: str) -> bytes:
    return _cap(
        "evacuation-alert.xml",
        **{"<sender>mfa.test</sender>": f"<sender>{AGGREGATOR}</sender>", "2026-001": f"2026-agg{n}"},
    )


EXPIRED = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
BAD_CAP = [
    (
        "bad enumeration",
        _cap("evacuation-alert.xml", **{"<urgency>Immediate": "<urgency>Soonish"}),
        422,
        "body",
    ),
    (
        "date-time without a zone",
        _cap("evacuation-alert.xml", **{"10:00:00+05:00</sent>": "10:00:00</sent>"}),
        422,
        "body",
    ),
    (
        "missing required element",
        _cap("evacuation-alert.xml", **{"<sender>mfa.test</sender>": ""}),
        422,
        "body",
    ),
    ("wrong namespace", _cap("evacuation-alert.xml", **{"cap:1.2": "cap:1.1"}), 422, "body"),
    (
        "external entity",
        b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><alert>&x;</alert>',
        400,
        "body",
    ),
    (
        "billion laughs",
        b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">'
        b"]><alert>&b;</alert>",
        400,
        "body",
    ),
    ("oversized", b"<alert>" + b" " * 300_000 + b"</alert>", 413, "body"),
    (
        "unknown sender",
        _cap("evacuation-alert.xml", **{"<sender>mfa.test<": "<sender>nobody.test<"}),
        422,
        "signature",
    ),
    (
        "XML-DSig that does not verify",
        _signed_agg(_agg_alert("1")).replace(b"North", b"South"),
        422,
        "Signature",
    ),
    ("XML-DSig required, none given", _agg_alert("2"), 422, "Signature"),
]


@pytest.mark.parametrize(("what", "body", "status", "field"), BAD_CAP, ids=[row[0] for row in BAD_CAP])
async def test_a_bad_cap_submission_is_a_problem_naming_the_field_and_nothing_is_sent(
    api: Api, what: str, body: bytes, status: int, field: str
) -> None:
    before = await api.sandbox.stats()
    got, problem = await api.call("POST", "/advisories", "press", body)
    assert (got, problem.get("field")) == (status, field), problem
    assert problem["status"] == status
    assert problem["detail"]
    assert await api.sandbox.stats() == before


BAD_JSON: list[tuple[str, Any, int, str]] = [
    ("malformed JSON", b'{"id": "x",', 400, "body"),
    (
        "expired",
        {"expires_at": EXPIRED.isoformat(), "issued_at": (EXPIRED - dt.timedelta(hours=1)).isoformat()},
        422,
        "expires_at",
    ),
    ("wrong Ed25519 signature", {"signature": sign(advisory(), PRIVATE_KEY)["signature"]}, 422, "signature"),
    ("unknown channel", {"channels": ["pigeon"]}, 422, "channels"),
    ("unknown template", {"template": "nope"}, 422, "template"),
    ("no timezone", {"issued_at": "2026-11-25T10:00:00"}, 422, "issued_at"),
    (
        "cancel naming an unknown advisory",
        {"msg_type": "cancel", "references": ["never-sent-1"]},
        404,
        "references",
    ),
]


@pytest.mark.parametrize(("what", "over", "status", "field"), BAD_JSON, ids=[row[0] for row in BAD_JSON])
async def test_a_bad_json_submission_is_a_problem_naming_the_field_and_nothing_is_sent(
    api: Api, what: str, over: Any, status: int, field: str
) -> None:
    before = await api.sandbox.stats()
    body = over if isinstance(over, bytes) else json.dumps({**advisory(), **over}).encode()
    got, problem = await api.call(
        "POST", "/advisories", "press", body, headers={"Content-Type": "application/json"}
    )
    assert (got, problem.get("field")) == (status, field), problem
    assert await api.sandbox.stats() == before


async def test_a_relayed_cap_signed_with_xml_dsig_is_taken_as_it_comes(api: Api) -> None:
    raw = _signed_agg(_agg_alert("3"))
    status, answer = await api.call("POST", "/advisories", "press", raw)
    assert status == 202, answer
    await api.waits_for("mfa.kz.evac.2026-agg3", "pending_approval")
    other = etree.fromstring(_agg_alert("4"))
    by_stranger = etree.tostring(XMLSigner().sign(other, key=OTHER_KEY, cert=OTHER_CERT.decode()))
    status, problem = await api.call("POST", "/advisories", "press", by_stranger)
    assert (status, problem["field"]) == (422, "Signature")
    assert "does not verify against 'aggregator.test'" in problem["detail"]


async def test_a_training_advisory_reaches_only_the_gateways_own_sandbox(api: Api, tmp_path: Path) -> None:
    """The live channels point at the module's sandbox: on push, SMS and e-mail it must receive
    nothing; the gateway's own training sandbox gets every message, and its receipts count."""
    reach = {"push": 10, "sms-http": 6, "email": 4}
    rows = ["id,languages,app_user,phone,email,country"]
    rows += [f"trp{i},en,tr-app-{i},,,XT" for i in range(reach["push"])]
    rows += [f"trs{i},ru,,+7702{i:07d},,XT" for i in range(reach["sms-http"])]
    rows += [f"tre{i},kk,,,tr{i}@mail.example,XT" for i in range(reach["email"])]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    assert api.gw.store is not None
    await import_file(api.gw.store, tmp_path / "t.csv")
    record = advisory(
        id=f"drill-{uuid.uuid4().hex[:6]}",
        audience={"countries": ["XT"]},
        channels=["push", "sms-http", "email"],
        training=True,
    )
    status, answer = await api.call("POST", "/advisories", "press", record)
    assert (status, answer["training"]) == (202, True)
    await api.waits_for(record["id"], "pending_approval")
    assert (await api.call("POST", f"/advisories/{record['id']}/approve", "approver"))[0] == 200

    async def delivered() -> bool:
        counts = await _counts(api, record["id"])
        return all(counts.get(ch, {}).get("delivered") == n for ch, n in reach.items())

    await eventually(delivered, what="the training advisory delivered (receipts from the training sandbox)")
    key = f"{record['id']}@v1"
    live = (await api.sandbox.stats())["channels"]
    assert [ch for ch in reach if key in live[ch]["by_advisory"]] == []  # the live partners saw nothing
    training = api.gw.training
    assert training is not None
    assert training.sandbox is not None
    rehearsed = (await training.sandbox.stats())["channels"]
    assert {ch: rehearsed[ch]["by_advisory"][key]["unique_recipients"] for ch in reach} == reach
    _, feed = await api.call("GET", "/feed.atom", None)
    assert record["id"].encode() not in feed  # a rehearsal is never public
    _, cap = await api.call("GET", f"/advisories/{record['id']}/cap", "press")
    assert b"<status>Exercise</status>" in cap


async def test_a_cancel_from_a_sender_without_authority_is_refused_before_the_topic(api: Api) -> None:
    record = advisory(id=f"own-{uuid.uuid4().hex[:6]}", audience={"countries": ["XR"]})
    assert (await api.call("POST", "/advisories", "press", record))[0] == 202
    await api.waits_for(record["id"], "pending_approval")
    rogue = advisory(
        id=f"rogue-{uuid.uuid4().hex[:6]}", msg_type="cancel", references=[record["id"]], sender=AGGREGATOR
    )
    status, problem = await api.call("POST", "/advisories", "press", rogue)
    assert (status, problem["field"]) == (422, "sender")
    assert f"'{AGGREGATOR}' may not cancel '{record['id']}'" in problem["detail"]
    assert await api.state(record["id"]) == "pending_approval"
    assert await api.state(rogue["id"]) == "HTTP 404"  # never reached the topic


async def test_an_operator_cancels_a_live_advisory_without_approval(api: Api) -> None:
    record = advisory(id=f"op-{uuid.uuid4().hex[:6]}", audience={"countries": ["XO"]})
    assert (await api.call("POST", "/advisories", "press", record))[0] == 202
    await api.waits_for(record["id"], "pending_approval")
    assert (await api.call("POST", f"/advisories/{record['id']}/cancel", "press"))[0] == 403
    status, done = await api.call(
        "POST", f"/advisories/{record['id']}/cancel", "operator", {"reason": "wrong"}
    )
    assert (status, done["state"]) == (200, "cancelled")
    assert await api.state(record["id"]) == "cancelled"
    status, problem = await api.call("POST", "/advisories/never-was/cancel", "operator")
    assert (status, problem["field"]) == (404, "advisory_id")


async def test_unauthenticated_calls_get_401_and_the_public_parts_stay_open(api: Api) -> None:
    for method, path in [
        ("GET", "/advisories"),
        ("GET", "/advisories/x"),
        ("POST", "/advisories/x/approve"),
        ("POST", "/advisories/x/cancel"),
        ("GET", "/audit"),
        ("GET", "/metrics"),
    ]:
        status, problem = await api.call(method, path, None)
        assert (status, problem["title"]) == (401, "Unauthenticated"), path
    for path in ("/healthz", "/feed.atom", "/openapi.yaml"):
        assert (await api.call("GET", path, None))[0] == 200


async def test_readyz_says_the_store_and_kafka_answer_and_reports_each_circuit(api: Api) -> None:
    status, body = await api.call("GET", "/readyz", None)
    assert (status, body["status"], body["store"], body["kafka"]) == (200, "ready", "ok", "ok")
    assert set(body["channels"]) == set(api.gw.adapters)
    assert set(body["channels"].values()) <= {"closed", "open", "half_open"}


async def test_schemathesis_finds_no_server_error_or_undocumented_answer(api: Api, tmp_path: Path) -> None:
    """docs/openapi.yaml against the running server: every answer documented, none a 5xx."""
    _, token = await api.gw.tokens.create("fuzz", ["press", "approver", "operator", "admin"], "test")  # type: ignore[union-attr]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        str(ROOT / "docs" / "openapi.yaml"),
        "--url",
        api.url,
        "-H",
        f"Authorization: Bearer {token}",
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        "--max-examples",
        "25",
        "--seed",
        "1",
        "--no-color",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    assert re.search(r"\d+ passed", text), text[-2000:]
