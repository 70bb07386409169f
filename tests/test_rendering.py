"""Rendering: language chain, strict variables, channel limits, cache vs per-recipient rendering."""

from __future__ import annotations

from pathlib import Path

import pytest

from channels.push import PushAdapter, PushSettings
from gateway.errors import ContentError
from gateway.models import Advisory, Recipient
from gateway.rendering import Renderer
from gateway.settings import load_settings
from tests.conftest import advisory

PUSH = ("title", "body")
TEMPLATES = load_settings(environ={}).rendering.templates_path()


def _renderer() -> Renderer:
    return Renderer(TEMPLATES, "en")


def _push() -> PushAdapter:
    """A push adapter: only its declared parts and limits are used here, nothing is sent."""
    return PushAdapter("push", PushSettings(adapter="push", secret="x"), None)  # type: ignore[arg-type]


def _adv(**over: object) -> Advisory:
    return Advisory.model_validate(advisory(**over))


@pytest.mark.parametrize(
    ("recipient_chain", "advisory_chain", "expected"),
    [
        (("kk", "ru"), (), "kk"),
        (("ru",), ("kk",), "ru"),
        (("de",), ("ru",), "ru"),  # recipient's language missing → the advisory's
        (("de",), (), "en"),  # → the configured default
        ((), ("fr", "kk"), "kk"),
    ],
)
def test_language_chain_is_recipient_then_advisory_then_default(
    recipient_chain: tuple[str, ...], advisory_chain: tuple[str, ...], expected: str
) -> None:
    r = Recipient(id="r", languages=recipient_chain)
    assert _renderer().choose_language(_adv(languages=list(advisory_chain)), r, "push", PUSH) == expected


def test_evacuation_template_renders_in_kazakh_with_the_crossings_and_hotline() -> None:
    parts = _renderer().render(_adv(), "kk", "push", PUSH)
    assert "ашық" in parts["title"]
    assert "North Gate → Belmora (24/7)" in parts["body"]
    assert "+7 7172 00 00 00" in parts["body"]


def test_a_missing_variable_is_an_error_naming_the_template() -> None:
    adv = _adv(data={"country_name": "Arvenia"})
    with pytest.raises(
        ContentError,
        match=r"evacuation/en/push.title.j2 \(language en, channel push\): "
        r"UndefinedError: 'open_crossings' is undefined",
    ):
        _renderer().render(adv, "en", "push", PUSH)


def test_rendering_is_cached_per_language_and_channel() -> None:
    renderer = _renderer()
    adv = _adv()
    assert renderer.render(adv, "ru", "push", PUSH) is renderer.render(adv, "ru", "push", PUSH)


def test_a_template_that_reads_recipient_fields_renders_per_recipient(tmp_path: Path) -> None:
    folder = tmp_path / "personal" / "en"
    folder.mkdir(parents=True)
    (folder / "push.title.j2").write_text("Leave now", encoding="utf-8")
    (folder / "push.body.j2").write_text("You are registered in {{ recipient.region }}.", encoding="utf-8")
    renderer = Renderer(tmp_path, "en")
    adv = _adv(template="personal", data={})
    north = renderer.render(adv, "en", "push", PUSH, Recipient(id="a", region="north"))
    south = renderer.render(adv, "en", "push", PUSH, Recipient(id="b", region="south"))
    assert (north["body"], south["body"]) == ("You are registered in north.", "You are registered in south.")


def test_check_rejects_a_rendering_over_the_channel_limit_naming_language_and_channel() -> None:
    adv = _adv(data={**advisory()["data"], "country_name_kk": "Ұ" * 300})
    with pytest.raises(
        ContentError, match=r"language 'kk' on channel 'push': title is \d+ characters; the limit is 120"
    ):
        _renderer().check(adv, [_push()])


def test_check_rejects_inline_content_without_the_default_language() -> None:
    adv = _adv(template=None, data={}, content={"ru": {"title": "Внимание", "body": "Покиньте страну"}})
    with pytest.raises(ContentError, match=r"no 'en' \(default language\) text for channel 'push'"):
        _renderer().check(adv, [_push()])


def test_inline_content_serves_every_part() -> None:
    adv = _adv(template=None, data={}, content={"en": {"title": "Leave", "body": "Go north"}})
    assert _renderer().render(adv, "en", "email", ("subject", "text")) == {
        "subject": "Leave",
        "text": "Go north",
    }
