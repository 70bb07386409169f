"""Property tests at every edge where outside input comes in: any input ends in a result or a
clean rejection (an InputError, which becomes a DLQ entry, a 400 or a bad row), never an unhandled
exception. ``make fuzz`` runs atheris on the same entry points (tests/fuzz/)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

from aiosmpplib import DeliverSm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from channels.base import hmac_headers
from channels.email import EmailAdapter, EmailSettings
from channels.push import PushAdapter, PushSettings
from channels.smpp import SmppAdapter
from channels.sms_http import SmsHttpAdapter, SmsHttpSettings
from gateway.directory import import_file
from gateway.errors import InputError
from gateway.store import Store
from tests.conftest import advisory, signed
from tests.test_intake import _intake

SECRET = "fuzz-secret"
EXAMPLES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=25,
)
INTAKE = _intake()


def _judged(raw: bytes) -> None:
    with contextlib.suppress(InputError):
        INTAKE.validate(raw)


@EXAMPLES
@given(st.binary(max_size=2000))
def test_any_bytes_are_an_advisory_or_an_input_error(raw: bytes) -> None:
    _judged(raw)


@EXAMPLES
@given(json_values)
def test_any_json_value_is_an_advisory_or_an_input_error(value: Any) -> None:
    _judged(json.dumps(value).encode())


FIELDS = sorted(advisory())


@EXAMPLES
@given(st.sampled_from(FIELDS), json_values)
def test_a_signed_advisory_with_any_field_of_any_value_is_judged(field: str, value: Any) -> None:
    """Signed after the change, so every stage runs: the schema, the signature, the render check."""
    _judged(json.dumps(signed(advisory(**{field: value}))).encode())


@EXAMPLES
@given(st.dictionaries(st.sampled_from(sorted(advisory()["data"])), json_values))
def test_template_data_of_any_shape_renders_or_is_a_content_error(data: dict[str, Any]) -> None:
    """``open_crossings: 5`` once raised TypeError from a filter and stalled intake."""
    record = advisory(channels=["push", "email"])
    _judged(json.dumps(signed({**record, "data": {**record["data"], **data}})).encode())


PARSERS = [
    PushAdapter("push", PushSettings(adapter="push", secret=SECRET), None),  # type: ignore[arg-type]
    SmsHttpAdapter("sms-http", SmsHttpSettings(adapter="sms-http", secret=SECRET), None),  # type: ignore[arg-type]
    EmailAdapter("email", EmailSettings(adapter="email", secret=SECRET), None),  # type: ignore[arg-type]
]
LIST_KEYS = {"push": "receipts", "sms-http": "dlrs", "email": "events"}


@EXAMPLES
@given(st.sampled_from(PARSERS), st.lists(json_values, max_size=4) | json_values)
def test_a_signed_receipt_body_of_any_shape_is_receipts_or_an_input_error(adapter: Any, items: Any) -> None:
    body = json.dumps({LIST_KEYS[adapter.channel]: items}).encode()
    try:
        receipts = adapter.parse_receipts(body, hmac_headers(SECRET, body))
    except InputError:
        return
    assert all(r.delivery_id for r in receipts) or receipts == []


@EXAMPLES
@given(st.text(min_size=1, max_size=200), st.text(max_size=40))
def test_any_smpp_receipt_text_is_a_receipt_none_or_a_schema_error(text: str, log_id: str) -> None:
    dlr = DeliverSm(short_message=text, log_id=log_id, esm_class=0x04)
    with contextlib.suppress(InputError):
        found = SmppAdapter.receipt_of(dlr)
        # what the store is given fits it: a receipt it refused would be retried for ever
        assert found is None or len(found.partner_id or "") <= 65


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["r.csv", "r.jsonl"]), st.binary(max_size=600) | st.text(max_size=300).map(str.encode))
def test_any_recipient_file_loads_its_good_rows_or_is_refused_whole(name: str, data: bytes) -> None:
    async def run() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            store = await Store.open(f"sqlite+aiosqlite:///{Path(tmp) / 's.db'}")
            try:
                report = await import_file(store, path)
                assert report.loaded == await store.count_recipients()
            except InputError:
                pass
            finally:
                await store.close()

    asyncio.run(run())
