"""What every sandbox partner does, whatever its protocol.

It honours idempotency keys (a replayed key is answered with the first answer and not counted
again), counts what it accepted per recipient and advisory (with the wall-clock time of each take —
a batch request is one — so a drill can ask what arrived after a moment), can be told to fail (status
codes, Retry-After, latency, hangs, connection resets), and sends signed receipts to the gateway's
webhook after a delay — retrying while the gateway is down, as a real partner does. A protocol
subclass adds its routes (or its server) and says how its receipts look on the wire.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import itertools
import json
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import aiohttp
import orjson
from aiohttp import web

from channels.base import hmac_headers, verify_hmac
from gateway.errors import AuthError
from gateway.logging import get_logger

log = get_logger(__name__)

RECEIPT_BATCH = 500


@dataclass
class Faults:
    """What the partner does wrong for the next ``count`` requests (count < 0: until cleared)."""

    status: int | None = None
    count: int = 0
    retry_after: float | None = None
    latency_s: float = 0.0
    hang: bool = False
    reset: bool = False  # drop the connection without an answer

    taken: int = 0  # requests answered with a fault since these faults were set

    def take(self) -> Faults | None:
        if self.count == 0:
            return None
        if self.count > 0:
            self.count -= 1
        self.taken += 1
        return self


@dataclass
class Counter:
    """What a partner took for one advisory: a second message to a recipient is a duplicate. Messages
    are counted a take at a time (a batch request is one take, at one wall-clock moment)."""

    accepted: int = 0
    recipients: set[str] = field(default_factory=set)
    languages: collections.Counter[str] = field(default_factory=collections.Counter)
    times: list[float] = field(default_factory=list)  # wall clock of each take, in order
    upto: list[int] = field(default_factory=list)  # messages accepted up to and including each take

    @property
    def duplicates(self) -> int:
        return self.accepted - len(self.recipients)

    def add(self, recipients: list[str], languages: list[str], at: float) -> None:
        self.accepted += len(recipients)
        self.recipients.update(recipients)
        self.languages.update(languages)
        self.times.append(at)
        self.upto.append(self.accepted)

    def as_dict(self, since: float | None = None) -> dict[str, Any]:
        out = {
            "accepted": self.accepted,
            "unique_recipients": len(self.recipients),
            "duplicates": self.duplicates,
            "languages": dict(sorted(self.languages.items())),
            "first_at": self.times[0] if self.times else None,
            "last_at": self.times[-1] if self.times else None,
        }
        if since is not None:
            before = bisect.bisect_right(self.times, since)
            out["accepted_since"] = self.accepted - (self.upto[before - 1] if before else 0)
        return out


class SandboxPartner:
    """Shared state and behaviour of a sandbox partner; ``channel`` names it in /stats and /control."""

    channel: ClassVar[str]
    receipt_status = "delivered"  # what receipts say; /control/<channel>/config can change it

    def __init__(self, secret: str, receipt_url: str | None, receipt_delay_s: float = 0.5) -> None:
        self.secret = secret
        self.receipt_url = receipt_url
        self.receipt_delay_s = receipt_delay_s
        self.send_receipts = True  # false: accepted messages get no receipt (the bench's floor)
        self.faults = Faults()
        self.faulted = 0  # requests answered with an injected fault, under faults set before these
        self.by_advisory: dict[str, Counter] = {}
        self.everyone: set[str] = set()  # recipients of any advisory
        self.answers: dict[str, str] = {}  # idempotency key -> the partner's message id, first answer
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(4)  # message ids unique across partners and restarts
        self.requests = 0
        self.replays = 0
        self.rejected = 0
        self.receipts_sent = 0
        self.open_requests = 0
        self.most_open_requests = 0  # the most requests this partner saw open at once
        self._pending: deque[tuple[float, dict[str, Any]]] = deque()
        self._wakeup = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post(f"/control/{self.channel}/faults", self.set_faults),
            web.post(f"/control/{self.channel}/config", self.set_config),
            web.post(f"/apprise/{self.channel}", self.take_apprise),
        ]

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        self._sender = asyncio.create_task(self._send_receipts(), name=f"{self.channel}-receipts")

    async def stop(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        if self._session is not None:
            await self._session.close()

    def stats(self, since: float | None = None) -> dict[str, Any]:
        """Counts; with ``since`` (epoch seconds), also what was accepted after that moment."""
        counters = self.by_advisory.values()
        languages: collections.Counter[str] = collections.Counter()
        for c in counters:
            languages.update(c.languages)
        firsts = [c.times[0] for c in counters if c.times]
        lasts = [c.times[-1] for c in counters if c.times]
        return {
            "accepted": sum(c.accepted for c in counters),
            "unique_recipients": len(self.everyone),
            "duplicates": sum(c.duplicates for c in counters),
            "languages": dict(sorted(languages.items())),
            "first_at": min(firsts, default=None),
            "last_at": max(lasts, default=None),
            "requests": self.requests,
            "faulted": self.faulted + self.faults.taken,
            "idempotent_replays": self.replays,
            "rejected": self.rejected,
            "receipts_sent": self.receipts_sent,
            "receipts_pending": len(self._pending),
            "most_open_requests": self.most_open_requests,
            "by_advisory": {k: c.as_dict(since) for k, c in sorted(self.by_advisory.items())},
        }

    async def set_faults(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.faulted += self.faults.taken
        self.faults = Faults(
            status=body.get("status"),
            count=int(
                body.get("count", -1 if body.get("status") or body.get("hang") or body.get("reset") else 0)
            ),
            retry_after=body.get("retry_after"),
            latency_s=float(body.get("latency_s", 0.0)),
            hang=bool(body.get("hang", False)),
            reset=bool(body.get("reset", False)),
        )
        return web.json_response({"faults": self.faults.__dict__})

    async def set_config(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.receipt_url = body.get("receipt_url", self.receipt_url)
        self.receipt_delay_s = float(body.get("receipt_delay_s", self.receipt_delay_s))
        self.receipt_status = str(body.get("receipt_status", self.receipt_status))
        self.send_receipts = bool(body.get("receipts", self.send_receipts))
        self._wakeup.set()
        return web.json_response(
            {
                "receipt_url": self.receipt_url,
                "receipt_delay_s": self.receipt_delay_s,
                "receipt_status": self.receipt_status,
                "receipts": self.send_receipts,
            }
        )

    async def take_apprise(self, request: web.Request) -> web.Response:
        """One notification from Apprise's ``json://`` plugin (the bench's peer): its payload with the
        URL's extras (``?:idempotency_key=…&:advisory=…&:user_ref=…``), counted like any message."""
        with self.open_request():
            self.requests += 1
            try:
                m = json.loads(await request.read())
                key, advisory = str(m["idempotency_key"]), str(m["advisory"])
                recipient = str(m.get("user_ref") or m.get("to") or m.get("email"))
            except (ValueError, KeyError, TypeError):
                self.rejected += 1
                return web.json_response({"error": "idempotency_key and advisory are required"}, status=400)
            message_id, _ = self.accept(key, recipient, advisory, "en")
            return web.json_response({"message_id": message_id})

    def wake(self) -> None:
        """Look at the receipt queue again (the receipt URL or delay changed)."""
        self._wakeup.set()

    @contextlib.contextmanager
    def open_request(self) -> Iterator[None]:
        """Count a request as open for its whole handling (the partner's view of concurrency)."""
        self.open_requests += 1
        self.most_open_requests = max(self.most_open_requests, self.open_requests)
        try:
            yield
        finally:
            self.open_requests -= 1

    def batch_route(
        self, path: str, max_batch: int, take: Callable[[list[Any]], list[dict[str, Any]]]
    ) -> web.RouteDef:
        """POST ``path`` with ``{"messages": [...]}`` (signed): faults first, then ``take`` of the whole
        list (one result per message, in order), answered ``{"results": [...]}`` — the shape of every
        HTTP partner here."""

        async def handle(request: web.Request) -> web.Response:
            with self.open_request():
                body = await request.read()
                if (refused := await self.http_fault(request, body)) is not None:
                    return refused
                try:
                    messages = orjson.loads(body)["messages"]
                except (ValueError, KeyError, TypeError):
                    return web.json_response({"error": 'body must be {"messages": [...]}'}, status=400)
                if not isinstance(messages, list) or not 1 <= len(messages) <= max_batch:
                    return web.json_response({"error": f"messages: 1 to {max_batch} items"}, status=413)
                results = take(messages)
                return web.Response(body=orjson.dumps({"results": results}), content_type="application/json")

        return web.post(path, handle)

    async def http_fault(self, request: web.Request, body: bytes) -> web.Response | None:
        """Check the signature and apply any injected fault; a response here ends the request."""
        try:
            verify_hmac(self.secret, body, request.headers)
        except AuthError as e:
            return web.json_response({"error": str(e)}, status=401)
        self.requests += 1
        fault = self.faults.take()
        if fault is None:
            return None
        if fault.latency_s:
            await asyncio.sleep(fault.latency_s)
        if fault.hang:
            await asyncio.Event().wait()  # never answers; the client's timeout ends it
        if fault.reset and request.transport is not None:
            request.transport.abort()  # the client sees the connection reset mid-request
            return web.Response(status=499)
        if fault.status is not None:
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
            return web.json_response({"error": "injected fault"}, status=fault.status, headers=headers)
        return None

    def accept(
        self, key: str, recipient: str, advisory: str, language: str, status: str | None = None
    ) -> tuple[str, bool]:
        """Take one message; returns (partner message id, first time). A seen key is a replay, not
        counted. Its receipt will say ``status`` (default: the partner's ``receipt_status``)."""
        message_id, first = self.answer(key, status)
        if first:
            self.count(recipient, advisory, language)
        return message_id, first

    def answer(self, key: str, status: str | None = None) -> tuple[str, bool]:
        """The message id for ``key`` and whether it is new: a seen key is a replay, answered with the
        first id; a new one gets its receipt queued (saying ``status``). The caller counts new ones."""
        fresh = f"{self._id_prefix}{next(self._ids):x}"  # a replay leaves its number unused
        message_id = self.answers.setdefault(key, fresh)  # one look-up in a table of millions
        if message_id is not fresh:
            self.replays += 1
            return message_id, False
        if self.send_receipts:
            due = asyncio.get_running_loop().time() + self.receipt_delay_s
            self._pending.append((due, self.receipt(key, message_id, status or self.receipt_status)))
            self._wakeup.set()
        return message_id, True

    def count(self, recipient: str, advisory: str, language: str) -> None:
        """Count one message taken for a recipient (a second one for the same advisory is a duplicate)."""
        self.count_many(advisory, [recipient], [language])

    def count_many(self, advisory: str, recipients: list[str], languages: list[str]) -> None:
        """Count messages of one advisory taken together (one batch request), one per recipient listed."""
        counter = self.by_advisory.get(advisory)
        if counter is None:
            counter = self.by_advisory[advisory] = Counter()
        counter.add(recipients, languages, time.time())
        self.everyone.update(recipients)

    def receipt(self, key: str, message_id: str, status: str) -> dict[str, Any]:
        """One receipt as this partner's webhook carries it."""
        return {"idempotency_key": key, "message_id": message_id, "status": status}

    def receipt_body(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        return {"receipts": batch}

    async def _send_receipts(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.2
        while True:
            if not self._pending or not self.receipt_url:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            wait = self._pending[0][0] - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)  # the receipt delay itself: a timer, not a wait for an event
            batch: list[dict[str, Any]] = []
            while self._pending and self._pending[0][0] <= loop.time() and len(batch) < RECEIPT_BATCH:
                batch.append(self._pending.popleft()[1])
            if not batch:
                continue
            if await self._post_receipts(batch):
                backoff = 0.2
                self.receipts_sent += len(batch)
            else:
                self._pending.extendleft((loop.time(), r) for r in reversed(batch))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _post_receipts(
        self, batch: list[dict[str, Any]], url: str | None = None, key: str | None = None
    ) -> bool:
        """POST receipts, signed, to the gateway (``url``: instead of ``receipt_url``; ``key``: the
        body's list is named this instead of ``receipt_body``'s shape)."""
        assert self._session is not None
        target = url or self.receipt_url
        assert target is not None
        body = orjson.dumps({key: batch} if key else self.receipt_body(batch))
        headers = {"Content-Type": "application/json", **hmac_headers(self.secret, body)}
        try:
            async with self._session.post(
                target, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=10)
            ) as resp:
                if resp.status == 200:
                    return True
                log.warning(
                    "sandbox.receipts_refused", channel=self.channel, status=resp.status, count=len(batch)
                )
                return False
        except (aiohttp.ClientError, TimeoutError) as e:
            log.info(
                "sandbox.receipts_unreachable", channel=self.channel, error=type(e).__name__, count=len(batch)
            )
            return False
