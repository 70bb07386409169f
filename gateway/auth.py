"""API tokens and roles: who may call what on the gateway's HTTP surface.

A token reads ``gw_<id>_<secret>``: the id finds its row in ``tokens``, the secret is checked against
a scrypt hash (the secret itself is never stored, and is shown once, when the token is created).
scrypt runs in a worker thread, once per token per process: a verified token's hash is remembered,
but the row is read on every request, so a revocation takes effect at once.

Roles: ``press`` (submits advisories), ``approver`` (the second person), ``operator`` (watches and
cancels), ``admin`` (tokens, audit), and ``partner:<name>``. Each route names the roles that may
call it (``gateway/api.py``); a route that names none is open (health, and the partners' receipt
webhooks, which carry their own HMAC signatures). No or an unknown token → 401; a token without a
role the route needs → 403; both problem+json.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway import audit
from gateway.errors import InputError
from gateway.models import now
from gateway.schema import tokens

if TYPE_CHECKING:
    from gateway.store import Store

ROLES = ("press", "approver", "operator", "admin")
_PARTNER_ROLE = re.compile(r"^partner:[a-z0-9][a-z0-9._-]{0,63}$")
_TOKEN = re.compile(r"^gw_([0-9a-f]{16})_([A-Za-z0-9_-]{20,100})$")
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}  # ~16 MiB and tens of ms: once per token


def check_roles(roles: Sequence[str]) -> tuple[str, ...]:
    """The roles, or InputError naming the one that is not a role."""
    if not roles:
        raise InputError(f"roles: give at least one of {', '.join(ROLES)} or partner:<name>")
    for role in roles:
        if role not in ROLES and not _PARTNER_ROLE.match(role):
            raise InputError(f"roles: {role!r} is not one of {', '.join(ROLES)} or partner:<name>")
    return tuple(dict.fromkeys(roles))


def _hash(secret: str, salt: bytes) -> str:
    digest = hashlib.scrypt(secret.encode(), salt=salt, **_SCRYPT)
    return "scrypt$" + base64.b64encode(salt).decode() + "$" + base64.b64encode(digest).decode()


def _matches(secret: str, stored: str) -> bool:
    try:
        _, salt, _digest = stored.split("$")
        return hmac.compare_digest(_hash(secret, base64.b64decode(salt)), stored)
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a token's id, name and roles."""

    token_id: str
    name: str
    roles: frozenset[str]

    @property
    def actor(self) -> str:
        return f"token:{self.token_id}:{self.name}"


class Tokens:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._verified: dict[str, str] = {}  # sha256 of a presented token -> the hash it matched

    async def create(self, name: str, roles: Sequence[str], actor: str) -> tuple[str, str]:
        """A new token; returns (id, the token itself — shown once, stored only as a hash)."""
        roles = check_roles(roles)
        if not name.strip():
            raise InputError("name: say whose token this is")
        token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        hashed = await asyncio.to_thread(_hash, secret, secrets.token_bytes(16))
        async with self.store.begin_write() as conn:
            await conn.execute(
                sa.insert(tokens).values(
                    id=token_id, name=name, roles=",".join(roles), hash=hashed, created_at=now()
                )
            )
            await conn.run_sync(
                audit.append, actor, "token.created", f"token:{token_id}", {"name": name, "roles": roles}
            )
        return token_id, f"gw_{token_id}_{secret}"

    async def revoke(self, token_id: str, actor: str) -> bool:
        """Revoke a token (at once, on every instance); False if there is no such live token."""
        async with self.store.begin_write() as conn:
            result = await conn.execute(
                sa.update(tokens)
                .where(tokens.c.id == token_id, tokens.c.revoked_at.is_(None))
                .values(revoked_at=now())
            )
            if result.rowcount:
                await conn.run_sync(audit.append, actor, "token.revoked", f"token:{token_id}")
        return bool(result.rowcount)

    async def list(self) -> list[dict[str, Any]]:
        q = sa.select(tokens.c.id, tokens.c.name, tokens.c.roles, tokens.c.created_at, tokens.c.revoked_at)
        async with self.store.engine.connect() as conn:
            rows = (await conn.execute(q.order_by(tokens.c.created_at))).mappings().all()
        return [{**r, "roles": r["roles"].split(",")} for r in rows]

    async def authenticate(self, presented: str) -> Principal | None:
        """The caller a token speaks for, or None (malformed, unknown, revoked or wrong)."""
        m = _TOKEN.match(presented)
        if m is None:
            return None
        token_id, secret = m.groups()
        q = sa.select(tokens).where(tokens.c.id == token_id, tokens.c.revoked_at.is_(None))
        async with self.store.engine.connect() as conn:
            row = (await conn.execute(q)).mappings().first()
        if row is None:
            return None
        seen = hashlib.sha256(presented.encode()).hexdigest()
        if self._verified.get(seen) != row["hash"]:
            if not await asyncio.to_thread(_matches, secret, row["hash"]):
                return None
            self._verified[seen] = row["hash"]
        return Principal(token_id, row["name"], frozenset(row["roles"].split(",")))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# request[PRINCIPAL_KEY]: who called, on routes that need a role
PRINCIPAL_KEY = web.RequestKey("principal", Principal)


def bearer_token(request: web.Request) -> str:
    """The token of ``Authorization: Bearer <token>``, or "" without one."""
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    return presented.strip() if scheme.lower() == "bearer" else ""


def middleware(
    tokens_: Tokens,
    roles_of: Callable[[web.Request], Collection[str] | None],
    problem: Callable[..., web.Response],
) -> Middleware:
    """Check the bearer token of every request whose route names roles (``roles_of``)."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        needed = roles_of(request)
        if not needed:
            return await handler(request)
        token = bearer_token(request)
        principal = await tokens_.authenticate(token) if token else None
        if principal is None:
            response = problem(
                401, "Unauthenticated", "send Authorization: Bearer <token> (broadcast-gateway tokens create)"
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="broadcast-gateway"'
            return response
        if not principal.roles & set(needed):
            return problem(
                403, "Forbidden", f"this needs one of the roles {', '.join(sorted(needed))}", field="roles"
            )
        request[PRINCIPAL_KEY] = principal
        return await handler(request)

    return check


def roles_table(table: Mapping[str, Collection[str]]) -> Callable[[web.Request], Collection[str] | None]:
    """Roles by route: ``"POST /advisories"`` (one method) before ``"/advisories"`` (any), by the
    route's canonical path (``/advisories/{advisory_id}/status``)."""

    def roles_of(request: web.Request) -> Collection[str] | None:
        route = request.match_info.route
        if route.resource is None:
            return None
        path = route.resource.canonical
        return table.get(f"{request.method} {path}", table.get(path))

    return roles_of
