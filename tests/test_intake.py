"""Intake: whatever a record raises while it is decoded, validated, verified or render-checked, it is
the record's fault — an InputError of the stage's kind, never an exception that stalls intake."""

from __future__ import annotations

import json
import uuid
from typing import Any, cast

import pytest
from aiokafka import TopicPartition
from structlog.testing import capture_logs

from channels.email import EmailAdapter, EmailSettings
from channels.push import PushAdapter, PushSettings
from gateway import kafka
from gateway.errors import ContentError, DecodeError, InputError, SchemaError
from gateway.intake import Intake, Stage
from gateway.poison import Poison, corpus
from gateway.rendering import Renderer
from gateway.settings import IntakeSettings, load_settings
from gateway.signing import Verifier, new_key, sign
from tests.conftest import PUBLIC_KEY, SENDER, advisory, signed

FORGER_KEY, _ = new_key()
ROGUE = "embassy.rogue"
ROGUE_KEY, ROGUE_PUBLIC = new_key()
SETTINGS = load_settings(environ={})


def _intake(**limits: Any) -> Intake:
    targets = {
        "push": PushAdapter("push", PushSettings(adapter="push", secret="x"), None),  # type: ignore[arg-type]
        "email": EmailAdapter("email", EmailSettings(adapter="email", secret="x"), None),  # type: ignore[arg-type]
    }
    settings = IntakeSettings.model_validate(
        {"trusted_keys": {SENDER: PUBLIC_KEY, ROGUE: ROGUE_PUBLIC}, "limits": limits}
    )
    renderer = Renderer(SETTINGS.rendering.templates_path(), "en")
    verifier = Verifier(settings.trusted_keys)
    none = cast(Any, None)  # validate() touches neither store, planner nor producer
    return Intake(none, none, renderer, verifier, none, "dlq", targets, settings)


def _rogue(record: dict[str, Any]) -> dict[str, Any]:
    return sign({**record, "sender": ROGUE}, ROGUE_KEY)


def _corpus() -> list[Poison]:
    good = advisory(channels=["push", "email"])
    return corpus(good, signed, lambda r: sign(r, FORGER_KEY), _rogue)


@pytest.mark.parametrize("poison", [p for p in _corpus() if not p.after_good], ids=lambda p: p.name)
def test_every_bad_record_is_an_input_error_of_its_stage(poison: Poison) -> None:
    with pytest.raises(InputError) as caught:
        _intake().validate(poison.raw)
    assert caught.value.kind == poison.expected, str(caught.value)
    assert str(caught.value)  # a reason a person can act on goes to the DLQ


def test_a_good_record_passes_every_stage() -> None:
    adv, record = _intake().validate(json.dumps(signed(advisory(channels=["push", "email"]))).encode())
    assert adv.channels == ("push", "email")
    assert record["signature"]


def test_deep_nesting_is_refused_before_json_decoding_recurses() -> None:
    """100 KB of '[' used to raise RecursionError inside json.loads and stall intake for ever."""
    with pytest.raises(DecodeError, match=r"nested deeper than 16 levels at byte 16"):
        _intake().validate(b"[" * 100_000)


def test_a_template_filter_given_a_number_names_template_language_and_channel() -> None:
    """``open_crossings: 5`` where the template applies ``| length``: a TypeError, not an outage."""
    data = {**advisory()["data"], "open_crossings": 5}
    raw = json.dumps(signed(advisory(data=data))).encode()
    with pytest.raises(ContentError, match=r"evacuation/\w+/push\.\w+\.j2 \(language \w+, channel push\)"):
        _intake().validate(raw)


def test_a_subject_with_a_line_break_is_refused_at_intake() -> None:
    content = {"en": {"title": "Leave\r\nBcc: everyone@example.org", "body": "Cross at North Gate."}}
    raw = json.dumps(signed(advisory(channels=["email"], template=None, data={}, content=content))).encode()
    with pytest.raises(ContentError, match=r"channel 'email': subject: a line break"):
        _intake().validate(raw)


@pytest.mark.parametrize(
    ("limit", "value", "over", "message"),
    [
        (
            "max_record_bytes",
            2048,
            {"data": {**advisory()["data"], "hotline": "1" * 3000}},
            "bytes; the limit",
        ),
        (
            "max_string_chars",
            100,
            {"data": {**advisory()["data"], "hotline": "1" * 101}},
            "data.hotline: 101",
        ),
        (
            "max_list_items",
            20,
            {"data": {**advisory()["data"], "open_crossings": [{}] * 21}},
            "data.open_crossings: 21 items; the limit is 20",
        ),
        ("max_channels", 1, {"channels": ["push", "email"]}, "channels: 2 channels; the limit is 1"),
        ("max_languages", 1, {"languages": ["kk", "ru"]}, "languages: 2 languages"),
        ("max_version", 10, {"version": 11}, "version: 11 is above the limit 10"),
        ("max_depth", 3, {"data": {"a": {"b": {"c": 1}}}}, "nested deeper than 3"),
    ],
)
def test_each_limit_is_configurable_and_named_in_the_refusal(
    limit: str, value: int, over: dict[str, Any], message: str
) -> None:
    raw = json.dumps(signed(advisory(**over))).encode()
    with pytest.raises((DecodeError, SchemaError), match=message):
        _intake(**{limit: value}).validate(raw)


def test_a_stage_turns_any_exception_into_its_input_error_and_lets_input_errors_through() -> None:
    with (
        pytest.raises(SchemaError, match=r"validate: ZeroDivisionError: division by zero"),
        Stage(SchemaError, "validate"),
    ):
        1 / 0  # noqa: B018 - the point is the exception
    with pytest.raises(ContentError, match="as it was"), Stage(SchemaError, "validate"):
        raise ContentError("as it was")


async def test_a_commit_for_a_partition_this_consumer_lost_is_dropped_not_fatal(kafka_bootstrap: str) -> None:
    """After a rebalance the record's partition belongs to another member, which replays it (storing
    it again changes nothing): the commit is dropped and intake goes on with its own partitions."""
    topic = f"advisories-{uuid.uuid4().hex[:8]}"
    consumer = kafka.consumer(kafka_bootstrap, [topic], f"intake-{uuid.uuid4().hex[:8]}", SETTINGS.kafka)
    await consumer.start()
    try:
        lost = TopicPartition(f"{topic}-elsewhere", 0)
        with capture_logs() as logs:
            await _intake()._commit(consumer, lost, 42)
        assert [e["event"] for e in logs] == ["intake.commit_dropped"]
        assert logs[0]["offset"] == 42
    finally:
        await consumer.stop()
