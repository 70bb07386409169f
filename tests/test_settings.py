"""Configuration: YAML defaults, environment overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from channels.base import load_settings as load_channel_settings
from channels.push import PushSettings
from gateway.app import build_adapters
from gateway.errors import ConfigError
from gateway.settings import load_settings


def test_defaults_load_from_the_committed_yaml() -> None:
    s = load_settings(environ={})
    assert s.kafka.bootstrap_servers is None  # embedded broker
    assert s.rendering.default_language == "en"
    assert s.channels["push"]["adapter"] == "push"


def test_environment_overrides_any_key_with_yaml_typed_values() -> None:
    s = load_settings(
        environ={
            "GATEWAY__KAFKA__PARTITIONS": "8",
            "GATEWAY__GATEWAY__ROLES": "[intake]",
            "GATEWAY__CHANNELS__PUSH__BASE_URL": "http://partner.example",
        }
    )
    assert s.kafka.partitions == 8
    assert s.gateway.roles == ("intake",)
    assert s.channels["push"]["base_url"] == "http://partner.example"


def test_unknown_key_stops_start_up_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"kafka\.partitons: unknown key"):
        load_settings(environ={"GATEWAY__KAFKA__PARTITONS": "8"})


def test_invalid_value_names_the_key(tmp_path: Path) -> None:
    extra = tmp_path / "bad.yaml"
    extra.write_text("dispatch:\n  max_attempts: 0\n", encoding="utf-8")
    with pytest.raises(
        ConfigError, match=r"dispatch\.max_attempts: Input should be greater than or equal to 1"
    ):
        load_settings([extra], environ={})


def test_a_secret_written_in_yaml_is_refused(tmp_path: Path) -> None:
    extra = tmp_path / "leaky.yaml"
    extra.write_text("channels:\n  push:\n    secret: hunter2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"channels\.push\.secret: secrets may not be written in"):
        load_settings([extra], environ={})


def test_adapter_settings_name_the_channel_key() -> None:
    with pytest.raises(ConfigError, match=r"channels\.push\.rate_per_sec: unknown key"):
        load_channel_settings(PushSettings, "push", {"adapter": "push", "rate_per_sec": 5})


async def test_a_disabled_channel_needs_no_secret_and_is_not_built() -> None:
    settings = load_settings(
        environ={
            "GATEWAY__CHANNELS__PUSH__SECRET": "s",
            "GATEWAY__CHANNELS__SMS_HTTP__ENABLED": "false",
            "GATEWAY__CHANNELS__EMAIL__ENABLED": "false",
            "GATEWAY__CHANNELS__SMPP__ENABLED": "false",
        }
    )
    async with aiohttp.ClientSession() as session:
        assert sorted(build_adapters(settings, session)) == ["push"]
    with pytest.raises(
        ConfigError, match=r"channels\.sms-http\.secret: not set; set GATEWAY__CHANNELS__SMS_HTTP__SECRET"
    ):
        async with aiohttp.ClientSession() as session:
            build_adapters(load_settings(environ={"GATEWAY__CHANNELS__PUSH__SECRET": "s"}), session)


@pytest.mark.parametrize("value", ["abc #def", "[unclosed", "{a: b}", "123", "true", " padded ", "a: b"])
async def test_a_secret_from_the_environment_is_taken_verbatim(value: str) -> None:
    """YAML would make 'abc #def' into 'abc', '123' into a number and '[unclosed' into an error."""
    env = {
        "GATEWAY__CHANNELS__PUSH__SECRET": value,
        "GATEWAY__CHANNELS__SMPP__PASSWORD": value,
        "GATEWAY__CHANNELS__SMS_HTTP__ENABLED": "false",
        "GATEWAY__CHANNELS__EMAIL__ENABLED": "false",
    }
    settings = load_settings(environ=env)
    assert settings.channels["push"]["secret"] == value
    assert settings.channels["smpp"]["password"] == value
    async with aiohttp.ClientSession() as session:
        adapters = build_adapters(settings, session)
    assert adapters["push"]._secret == value


async def test_a_secret_never_appears_in_a_configuration_error() -> None:
    env = {
        "GATEWAY__CHANNELS__PUSH__SECRET": "hunter2-very-secret",
        "GATEWAY__CHANNELS__PUSH__RATE_PER_S": "x",
    }
    with pytest.raises(ConfigError) as caught:
        async with aiohttp.ClientSession() as session:
            build_adapters(load_settings(environ=env), session)
    assert "channels.push.rate_per_s" in str(caught.value)
    assert "hunter2" not in str(caught.value)
