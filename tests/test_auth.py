"""API tokens over real HTTP: no token 401, a token without the route's role 403, the right role
200; revoked at once; stored only as a scrypt hash; created and revoked in the audit log; the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import sqlalchemy as sa

from gateway import audit
from gateway.app import Gateway
from gateway.auth import check_roles
from gateway.errors import InputError
from gateway.sandbox.process import SandboxProcess
from gateway.schema import tokens
from gateway.settings import Settings
from tests.conftest import (
    bearer,
    fresh_postgres_database,
    make_settings,
    postgres_url,
    running_gateway,
    settings_env,
)


@pytest.fixture
async def http(gateway: Gateway) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(gateway.public_url) as session:
        yield session


NO_VALID_TOKEN = {
    "none": {},
    "empty": {"Authorization": "Bearer"},
    "basic": {"Authorization": "Basic dXNlcjpwYXNz"},
    "unknown": {"Authorization": "Bearer gw_0123456789abcdef_not-a-real-secret-at-all-xx"},
    "huge": {"Authorization": "Bearer " + "x" * 5000},
    "non-ascii": {"Authorization": "Bearer gw_é"},
}


async def test_no_valid_token_is_a_401_problem(http: aiohttp.ClientSession) -> None:
    for why, headers in NO_VALID_TOKEN.items():
        raw = {k: v.encode("utf-8").decode("latin-1") for k, v in headers.items()}
        for path in ("/metrics", "/advisories/x/status"):
            async with http.get(path, headers=raw) as resp:
                assert resp.status == 401, why
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                assert (await resp.json(content_type="application/problem+json"))[
                    "title"
                ] == "Unauthenticated"


async def test_roles_decide_and_open_routes_stay_open(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    press = await bearer(gateway, "press")
    async with http.get("/metrics", headers=press) as resp:
        assert resp.status == 403
        assert (await resp.json(content_type="application/problem+json"))["field"] == "roles"
    async with http.get("/advisories/nothing/status", headers=press) as resp:
        assert resp.status == 404  # allowed in; the advisory does not exist
    async with http.get("/metrics", headers=await bearer(gateway, "operator")) as resp:
        assert resp.status == 200
    async with http.get("/healthz") as resp:
        assert resp.status == 200


async def test_a_revoked_token_is_refused_at_once_and_both_steps_are_audited(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    assert gateway.tokens is not None
    assert gateway.store is not None
    token_id, token = await gateway.tokens.create("ops-desk", ["operator"], actor="cli:test")
    headers = {"Authorization": f"Bearer {token}"}
    async with http.get("/metrics", headers=headers) as resp:
        assert resp.status == 200
    assert await gateway.tokens.revoke(token_id, actor="cli:test")
    async with http.get("/metrics", headers=headers) as resp:
        assert resp.status == 401
    assert not await gateway.tokens.revoke(token_id, actor="cli:test")
    entries = await audit.read(gateway.store.engine, f"token:{token_id}")
    assert [(e["actor"], e["action"]) for e in entries] == [
        ("cli:test", "token.created"),
        ("cli:test", "token.revoked"),
    ]
    async with gateway.store.engine.connect() as conn:
        stored = (await conn.execute(sa.select(tokens.c.hash).where(tokens.c.id == token_id))).scalar_one()
    secret = token.split("_", 2)[2]  # gw_<hex id>_<secret>; the secret itself may hold "_"
    assert stored.startswith("scrypt$")
    assert secret not in stored


def test_roles_are_checked_by_name() -> None:
    assert check_roles(["press", "partner:superapp", "press"]) == ("press", "partner:superapp")
    with pytest.raises(InputError, match=r"roles: 'root' is not one of press, approver"):
        check_roles(["root"])
    with pytest.raises(InputError, match=r"roles: give at least one"):
        check_roles([])


def test_the_tokens_cli_creates_lists_and_revokes(settings: Settings) -> None:
    env = {**os.environ, **settings_env(settings)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "gateway", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)

    created = cli("tokens", "create", "--name", "press-officer", "--role", "press")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip().splitlines()[-1]
    token_id = token.split("_")[1]
    assert token.startswith(f"gw_{token_id}_")
    listed = cli("tokens", "list").stdout
    assert token_id in listed
    assert "press-officer" in listed
    assert token not in listed
    assert cli("tokens", "revoke", token_id).returncode == 0
    assert "revoked" in cli("tokens", "list").stdout
    again = cli("tokens", "revoke", token_id)
    assert again.returncode == 2
    assert "no live token" in again.stderr
    bad = cli("tokens", "create", "--name", "x", "--role", "root")
    assert bad.returncode == 2
    assert "'root' is not one of" in bad.stderr
    assert "token.revoked" in cli("audit", f"token:{token_id}").stdout


async def test_readyz_is_503_naming_the_store_when_the_database_is_gone(
    tmp_path: Path, kafka_bootstrap: str, sandbox: SandboxProcess
) -> None:
    """An orchestrator takes an instance out of rotation when its database stops answering."""
    import asyncpg

    async with fresh_postgres_database() as url:
        settings = make_settings(tmp_path, kafka_bootstrap, sandbox, GATEWAY__STORE__URL=url)
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
            async with http.get(f"{gw.public_url}/readyz") as resp:
                assert (resp.status, (await resp.json())["store"]) == (200, "ok")
            admin = await asyncpg.connect(postgres_url().replace("postgresql+asyncpg://", "postgresql://"))
            try:
                await admin.execute(f'DROP DATABASE "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
            finally:
                await admin.close()
            async with http.get(f"{gw.public_url}/readyz") as resp:
                body = await resp.json()
            assert (resp.status, body["status"], body["kafka"]) == (503, "not ready", "ok")
            assert body["store"].startswith("unreachable: ")
