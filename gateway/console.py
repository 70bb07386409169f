"""The console: the operations room, the approvals queue, the press desk and the history, served by
the gateway itself (aiohttp + Jinja2 + server-sent events; no build step).

Every page is rendered on the server and reads without JavaScript (``<noscript>`` pages refresh
every 5 s); with JavaScript, ``/console/stream`` (server-sent events) replaces the live part once a
second. Numbers come from the store's counters (gateway/store/counts.py: no scan of deliveries), circuit
states from this process's adapters, the dead-letter list from the audit log.

Who may do what is the API's: the same tokens and roles (gateway/auth.py). A browser presents its
token once at ``/console/login``; it is kept in an HttpOnly, SameSite=Strict cookie (Secure
behind https), and every POST must come from the console's own origin (Origin, else Referer).
Interface languages: kk, ru, en (``?lang=``, then the cookie, then Accept-Language).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jinja2
from aiohttp import web

from channels.base import Adapter
from channels.sms import layout
from gateway import audit
from gateway.auth import Principal, Tokens, bearer_token
from gateway.cap import is_cap, parse_cap
from gateway.errors import DecisionError, DecodeError, InputError
from gateway.intake import Intake, Stage, parse
from gateway.lifecycle import AdvisoryState
from gateway.logging import get_logger
from gateway.models import FINAL, Advisory, Status, aware, now
from gateway.rendering import Renderer
from gateway.store import Count, Store, Version
from gateway.submissions import DECISION_ROUTES
from gateway.trends import LATENCIES, Chart, Trends, chart

log = get_logger(__name__)

WEB = Path(__file__).parent / "web"
COOKIE = "gw_console"
LANG_COOKIE = "gw_lang"
UI_LANGUAGES = ("kk", "ru", "en")
LIVE_STATES = (AdvisoryState.ACTIVE.value, AdvisoryState.PENDING_APPROVAL.value)
STREAM_INTERVAL_S = 1.0
MAX_STREAMS = 64  # server-sent event clients at once (each costs one counters read a second)
SENT = frozenset({Status.SENT.value, Status.DELIVERED.value, Status.READ.value, Status.UNKNOWN.value})
FAILED = frozenset({Status.FAILED.value})
FINAL_VALUES = frozenset(s.value for s in FINAL)
WARN_FAILED_SHARE = 0.03  # as GOV.UK Notify: a warning above 3 % failed

READ = frozenset({"press", "approver", "operator", "admin"})
CANCEL = frozenset({"operator", "admin"})
DECIDE = frozenset({"approver"})
SUBMIT = frozenset({"press"})

STATIC = {"console.css": "text/css", "console.js": "text/javascript"}
# the interface's words, per language (advisory text is the press office's, never translated here)
UI: dict[str, dict[str, str]] = json.loads((WEB / "ui.json").read_text(encoding="utf-8"))


@dataclass
class Bar:
    """One progress bar: final (sent, failed, …) out of all, with the status counts."""

    label: str
    total: int = 0
    statuses: dict[str, int] = field(default_factory=dict)

    def add(self, status: str, n: int) -> None:
        self.total += n
        self.statuses[status] = self.statuses.get(status, 0) + n

    @property
    def done(self) -> int:
        return sum(n for s, n in self.statuses.items() if s in FINAL_VALUES)

    @property
    def sent(self) -> int:
        return sum(n for s, n in self.statuses.items() if s in SENT)

    @property
    def failed(self) -> int:
        return sum(n for s, n in self.statuses.items() if s in FAILED)

    @property
    def percent(self) -> int:
        return int(100 * self.done / self.total) if self.total else 0

    @property
    def failed_share(self) -> float:
        return self.failed / self.total if self.total else 0.0

    @property
    def warn(self) -> bool:
        return self.failed_share > WARN_FAILED_SHARE


@dataclass
class Progress:
    """An advisory's counters as the console shows them."""

    version: Version
    total: Bar
    channels: list[Bar]
    languages: list[Bar]
    cells: dict[tuple[str, str], Bar]  # (channel, language) -> bar


def progress_of(version: Version, counts: Sequence[Count]) -> Progress:
    total = Bar("all")
    channels: dict[str, Bar] = {}
    languages: dict[str, Bar] = {}
    cells: dict[tuple[str, str], Bar] = {}
    for c in counts:
        if c.version != version.version:
            continue
        lang = c.language or "—"
        total.add(c.status, c.n)
        channels.setdefault(c.channel, Bar(c.channel)).add(c.status, c.n)
        languages.setdefault(lang, Bar(lang)).add(c.status, c.n)
        cells.setdefault((c.channel, lang), Bar(f"{c.channel} · {lang}")).add(c.status, c.n)
    return Progress(
        version,
        total,
        sorted(channels.values(), key=lambda b: b.label),
        sorted(languages.values(), key=lambda b: b.label),
        cells,
    )


@dataclass(frozen=True, slots=True)
class Preview:
    channel: str
    kind: str
    language: str
    parts: dict[str, str]
    facts: list[str]
    problem: str | None


class Console:
    def __init__(
        self,
        store: Store,
        tokens: Tokens,
        intake: Intake,
        renderer: Renderer,
        adapters: Mapping[str, Adapter],
        submit: Callable[[Principal, bytes, str], Awaitable[web.Response]],
        senders: Sequence[str],
        stopping: asyncio.Event,
    ) -> None:
        self.store = store
        self.tokens = tokens
        self.intake = intake
        self.renderer = renderer
        self.adapters = adapters
        self.submit_ = submit
        self.senders = list(senders)
        self.stopping = stopping
        self._static = {name: (WEB / "static" / name).read_bytes() for name in STATIC}  # at start-up
        self.trends = Trends()  # latency and channel rates over time; run by the gateway (run())
        self.streams = 0
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(WEB),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            enable_async=False,
        )
        self.env.filters["n"] = lambda v: f"{int(v):,}".replace(",", "\u202f")
        self.env.filters["pct"] = lambda v: f"{100 * v:.1f} %"
        self.env.filters["when"] = lambda v: v.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        self.templates_available = sorted(
            p.name for p in renderer.templates_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    async def run(self, stopping: asyncio.Event) -> None:
        await self.trends.run(stopping)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/console", self.redirect_root),
            web.get("/console/", self.room),
            web.get("/console/login", self.login_form),
            web.post("/console/login", self.login),
            web.post("/console/logout", self.logout),
            web.get("/console/stream", self.stream),
            web.get("/console/approvals", self.approvals),
            web.get("/console/history", self.history),
            web.get("/console/compose", self.compose),
            web.post("/console/compose", self.compose_post),
            web.get("/console/advisories/{advisory_id}", self.advisory),
            web.post("/console/advisories/{advisory_id}/cancel", self.cancel),
            web.post("/console/advisories/{advisory_id}/decide", self.decide),
            web.get("/console/static/{name}", self.static),
        ]

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        kind = STATIC.get(name)
        if kind is None:
            raise web.HTTPNotFound()
        return web.Response(
            body=self._static[name], content_type=kind, headers={"Cache-Control": "max-age=300"}
        )

    # -- who and in which language ------------------------------------------------------------

    async def _principal(self, request: web.Request) -> Principal | None:
        token = bearer_token(request) or request.cookies.get(COOKIE, "")
        return await self.tokens.authenticate(token) if token else None

    async def _who(self, request: web.Request, roles: frozenset[str]) -> Principal:
        """The signed-in caller, if they hold one of ``roles``; else to the login page / 403."""
        who = await self._principal(request)
        if who is None:
            raise web.HTTPSeeOther(f"/console/login?next={request.path_qs}")
        if not who.roles & roles:
            raise web.HTTPForbidden(
                text=self._page(request, "forbidden.html", who=who, needed=sorted(roles)),
                content_type="text/html",
            )
        return who

    @staticmethod
    def _same_origin(request: web.Request) -> None:
        """A POST comes from the console's own pages (with SameSite=Strict cookies: no forged form)."""
        if request.headers.get("Authorization"):
            return  # a token in a header is not sent by a browser on its own
        source = request.headers.get("Origin") or request.headers.get("Referer") or ""
        if urlsplit(source).netloc != request.host:
            raise web.HTTPForbidden(text="cross-origin form refused")

    @staticmethod
    def _lang(request: web.Request) -> str:
        for wanted in (request.query.get("lang"), request.cookies.get(LANG_COOKIE)):
            if wanted in UI_LANGUAGES:
                return wanted
        for part in request.headers.get("Accept-Language", "").split(","):
            code = part.split(";")[0].strip().lower()[:2]
            if code in UI_LANGUAGES:
                return code
        return "en"

    def _page(self, request: web.Request, name: str, **context: Any) -> str:
        lang = self._lang(request)
        words = UI[lang]
        return self.env.get_template(name).render(
            t=lambda key: words.get(key, UI["en"].get(key, key)),
            lang=lang,
            languages=UI_LANGUAGES,
            path=request.path,
            **context,
        )

    def _html(self, request: web.Request, name: str, status: int = 200, **context: Any) -> web.Response:
        response = web.Response(
            text=self._page(request, name, **context), content_type="text/html", status=status
        )
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "form-action 'self'; frame-ancestors 'none'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        if "lang" in request.query and request.query["lang"] in UI_LANGUAGES:
            response.set_cookie(LANG_COOKIE, request.query["lang"], samesite="Strict", max_age=31536000)
        return response

    # -- sign in --------------------------------------------------------------------------------

    async def redirect_root(self, _: web.Request) -> web.Response:
        raise web.HTTPMovedPermanently("/console/")

    async def login_form(self, request: web.Request) -> web.Response:
        return self._html(request, "login.html", error=None, next=_local(request.query.get("next")))

    async def login(self, request: web.Request) -> web.Response:
        self._same_origin(request)
        form = await request.post()
        token = str(form.get("token", "")).strip()
        who = await self.tokens.authenticate(token) if token else None
        if who is None:
            return self._html(
                request, "login.html", status=401, error="login_failed", next=_local(form.get("next"))
            )
        response = web.HTTPSeeOther(_local(form.get("next")))
        response.set_cookie(
            COOKIE, token, httponly=True, samesite="Strict", secure=request.secure, path="/console"
        )
        log.info("console.signed_in", actor=who.actor)
        raise response

    async def logout(self, request: web.Request) -> web.Response:
        self._same_origin(request)
        response = web.HTTPSeeOther("/console/login")
        response.del_cookie(COOKIE, path="/console")
        raise response

    # -- the operations room -------------------------------------------------------------------

    async def _live(self) -> list[Progress]:
        versions = await self.store.newest_versions(LIVE_STATES, limit=50)
        out = []
        for v in versions:
            out.append(progress_of(v, await self.store.progress(v.advisory_id)))
        return out

    def _health(self) -> list[dict[str, Any]]:
        """A row per channel, and one per provider behind a routed channel (``<channel>/<provider>``:
        the name its own metrics carry)."""
        rates = self.trends.health()
        rows = []
        for name, a in sorted(self.adapters.items()):
            rows.append(
                {"channel": name, "kind": a.kind, "circuit": a.circuit.state.value, "rates": rates.get(name)}
            )
            providers: Mapping[str, Adapter] = getattr(a, "providers", {})
            for p in providers.values():
                rows.append(
                    {
                        "channel": p.channel,
                        "kind": p.kind,
                        "circuit": p.circuit.state.value,
                        "rates": rates.get(p.channel),
                    }
                )
        return rows

    def _charts(self) -> list[Chart]:
        dispatch, delivery = LATENCIES
        return [
            chart("dispatch_p50", self.trends.series(dispatch, 0.5)),
            chart("dispatch_p99", self.trends.series(dispatch, 0.99)),
            chart("delivery_p50", self.trends.series(delivery, 0.5)),
            chart("delivery_p99", self.trends.series(delivery, 0.99)),
        ]

    async def _dead_letters(self, limit: int = 20) -> list[dict[str, Any]]:
        rows = await audit.read(self.store.engine, subject_prefix="dlq:", limit=limit, newest_first=True)
        return [{"at": aware(r["at"]), "source": r["subject"][4:], **dict(r["detail"] or {})} for r in rows]

    async def _room_context(self) -> dict[str, Any]:
        return {
            "live": await self._live(),
            "health": self._health(),
            "charts": self._charts(),
            "dead_letters": await self._dead_letters(),
            "updated": now(),
        }

    async def room(self, request: web.Request) -> web.Response:
        who = await self._who(request, READ)
        return self._html(request, "room.html", who=who, **await self._room_context())

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the live part of a page, re-rendered once a second."""
        who = await self._who(request, READ)
        if self.streams >= MAX_STREAMS:
            raise web.HTTPServiceUnavailable(text="too many live views; reload in a while")
        advisory_id = request.query.get("advisory")
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        self.streams += 1
        try:
            while not self.stopping.is_set():
                if advisory_id:
                    context = await self._advisory_context(advisory_id, who, live_only=True)
                    html = self._page(request, "advisory_live.html", who=who, **context)
                else:
                    html = self._page(request, "room_live.html", who=who, **await self._room_context())
                data = "".join(f"data: {line}\n" for line in html.splitlines())
                await response.write(f"event: live\n{data}\n".encode())
                with contextlib.suppress(TimeoutError):  # the next update is due, or the gateway stops
                    await asyncio.wait_for(self.stopping.wait(), STREAM_INTERVAL_S)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.streams -= 1
        return response

    # -- one advisory ---------------------------------------------------------------------------

    async def _advisory_context(
        self, advisory_id: str, who: Principal, live_only: bool = False
    ) -> dict[str, Any]:
        versions = await self.store.versions(advisory_id)
        if not versions:
            raise web.HTTPNotFound(text=f"no advisory {advisory_id!r}")
        newest = versions[-1]
        counts = await self.store.progress(advisory_id)
        context: dict[str, Any] = {
            "advisory_id": advisory_id,
            "newest": newest,
            "versions": versions,
            "progress": [progress_of(v, counts) for v in reversed(versions)],
            "health": self._health(),
            "can_cancel": bool(who.roles & CANCEL) and newest.state.value in LIVE_STATES,
            "can_decide": bool(who.roles & DECIDE) and newest.state is AdvisoryState.PENDING_APPROVAL,
            "own": newest.submitted_by == who.actor,
            "updated": now(),
        }
        if not live_only:
            context["history"] = [
                {**dict(r), "at": aware(r["at"])}
                for r in await audit.read(self.store.engine, subject_prefix=f"{advisory_id}@v")
            ]
            context["reasons"] = await self.store.failure_reasons(advisory_id, newest.version)
            sent, within = await self.store.sent_within(advisory_id, newest.version, 10.0)
            context["within_10s"] = {"sent": sent, "within": within, "share": within / sent if sent else None}
        return context

    async def advisory(self, request: web.Request) -> web.Response:
        who = await self._who(request, READ)
        context = await self._advisory_context(request.match_info["advisory_id"], who)
        flash = request.query.get("done")
        return self._html(request, "advisory.html", who=who, flash=flash, **context)

    async def cancel(self, request: web.Request) -> web.Response:
        self._same_origin(request)
        who = await self._who(request, CANCEL)
        advisory_id = request.match_info["advisory_id"]
        form = await request.post()
        if form.get("confirm") != advisory_id:
            context = await self._advisory_context(advisory_id, who)
            return self._html(
                request, "advisory.html", status=422, who=who, flash=None, error="confirm_id", **context
            )
        reason = str(form.get("reason") or "").strip()[:1000] or "cancelled from the console"
        try:
            await self.store.cancel(advisory_id, who.actor, reason)
        except (InputError, DecisionError) as e:  # nothing live to cancel, or unknown: shown, not a 500
            return await self._advisory_error(request, who, advisory_id, _why(e))
        raise web.HTTPSeeOther(f"/console/advisories/{advisory_id}?done=cancelled")

    async def decide(self, request: web.Request) -> web.Response:
        self._same_origin(request)
        who = await self._who(request, DECIDE)
        advisory_id = request.match_info["advisory_id"]
        form = await request.post()
        decision = DECISION_ROUTES.get(str(form.get("decision")))
        reason = str(form.get("reason") or "").strip()[:1000] or None
        if decision is None:
            return await self._advisory_error(
                request, who, advisory_id, "decision: approve, reject or return"
            )
        if decision is not AdvisoryState.ACTIVE and reason is None:
            return await self._advisory_error(
                request, who, advisory_id, "reason: say why (the submitter reads it)"
            )
        try:
            version = int(str(form.get("version")))
            await self.store.decide(advisory_id, version, decision, who.actor, reason)
        except ValueError:
            return await self._advisory_error(request, who, advisory_id, "version: a whole number")
        except (InputError, DecisionError) as e:  # own advisory, decided meanwhile, unknown
            return await self._advisory_error(request, who, advisory_id, _why(e))
        raise web.HTTPSeeOther(f"/console/advisories/{advisory_id}?done={decision.value}")

    async def _advisory_error(
        self, request: web.Request, who: Principal, advisory_id: str, message: str
    ) -> web.Response:
        context = await self._advisory_context(advisory_id, who)
        return self._html(request, "advisory.html", status=422, who=who, flash=None, error=message, **context)

    # -- approvals and history -------------------------------------------------------------------

    async def approvals(self, request: web.Request) -> web.Response:
        who = await self._who(request, READ)
        waiting = await self.store.newest_versions([AdvisoryState.PENDING_APPROVAL.value], limit=200)
        return self._html(request, "approvals.html", who=who, waiting=waiting)

    async def history(self, request: web.Request) -> web.Response:
        who = await self._who(request, READ)
        found = await self.store.newest_versions(limit=200)
        return self._html(request, "history.html", who=who, found=found)

    # -- the press desk --------------------------------------------------------------------------

    def _form_defaults(self) -> dict[str, Any]:
        return {
            "id": "",
            "sender": self.senders[0] if self.senders else "",
            "template": self.templates_available[0] if self.templates_available else "",
            "data": "{}",
            "channels": list(self.adapters),
            "countries": "",
            "severity": "severe",
            "urgency": "immediate",
            "hours": "24",
            "languages": "kk,ru,en",
            "cap": "",
            "mode": "template",
        }

    async def compose(self, request: web.Request) -> web.Response:
        who = await self._who(request, READ)
        return self._compose_page(request, who, self._form_defaults(), None, None, None)

    def _compose_page(
        self,
        request: web.Request,
        who: Principal,
        form: Mapping[str, Any],
        previews: list[Preview] | None,
        audience: int | None,
        error: str | None,
        status: int = 200,
    ) -> web.Response:
        return self._html(
            request,
            "compose.html",
            status=status,
            who=who,
            form=form,
            previews=previews,
            audience=audience,
            error=error,
            can_submit=bool(who.roles & SUBMIT),
            templates=self.templates_available,
            senders=self.senders,
            all_channels=list(self.adapters),
        )

    def _record(self, form: Mapping[str, Any]) -> tuple[bytes, str]:
        """The submission the form describes: CAP as pasted, or an advisory record."""
        if form["mode"] == "cap":
            return str(form["cap"]).encode(), "application/cap+xml"
        try:
            data = json.loads(form["data"] or "{}")
        except ValueError as e:
            raise InputError(f"data: not JSON: {e}") from e
        try:
            hours = float(form["hours"])
        except ValueError as e:
            raise InputError("expires_at: hours, a number") from e
        issued = datetime.now(UTC).replace(microsecond=0)
        record = {
            "id": form["id"],
            "version": 1,
            "msg_type": "alert",
            "sender": form["sender"],
            "issued_at": issued.isoformat(),
            "expires_at": (issued + timedelta(hours=hours)).isoformat(),
            "severity": form["severity"],
            "urgency": form["urgency"],
            "audience": {"countries": [c.strip() for c in str(form["countries"]).split(",") if c.strip()]},
            "channels": list(form["channels"]),
            "languages": [x.strip() for x in str(form["languages"]).split(",") if x.strip()],
            "template": form["template"],
            "data": data,
        }
        return json.dumps(record, ensure_ascii=False).encode(), "application/json"

    async def compose_post(self, request: web.Request) -> web.Response:
        self._same_origin(request)
        who = await self._who(request, READ)
        posted = await request.post()
        form = self._form_defaults()
        for key in form:
            if key == "channels":
                form[key] = [str(c) for c in posted.getall("channels", []) if str(c) in self.adapters]
            elif key in posted:
                form[key] = str(posted[key])
        try:
            body, kind = self._record(form)
            adv = self._advisory(body, kind)
            previews = self.preview(adv)
            audience = await self.intake.audience_size(adv)
        except InputError as e:
            return self._compose_page(request, who, form, None, None, str(e), status=422)
        if posted.get("action") != "submit":
            return self._compose_page(request, who, form, previews, audience, None)
        if not who.roles & SUBMIT:
            return self._compose_page(
                request, who, form, previews, audience, "roles: submitting needs press", 403
            )
        answer = await self.submit_(who, body, kind)
        if answer.status != 202:
            problem = json.loads(answer.text or "{}")
            return self._compose_page(
                request, who, form, previews, audience, str(problem.get("detail")), status=answer.status
            )
        raise web.HTTPSeeOther(f"/console/advisories/{adv.id}?done=submitted")

    def _advisory(self, body: bytes, kind: str) -> Advisory:
        limits = self.intake.settings.limits
        if kind == "application/cap+xml":
            if not is_cap(body):
                raise InputError("cap: not a CAP 1.2 alert")
            with Stage(DecodeError, "cap"):  # whatever the parse raises, the pasted text is at fault
                record = parse_cap(body, limits, self.intake.settings.cap_channels)
        else:
            record = json.loads(body)
        return parse(record, limits)

    def preview(self, adv: Advisory) -> list[Preview]:
        """Every language × channel exactly as it will be rendered, with what limits it meets: SMS
        encoding and part count, push title/body lengths, e-mail subject. A fresh renderer: a
        preview never fills the live renderer's cache."""
        renderer = Renderer(self.renderer.templates_dir, self.renderer.default_language)
        out = []
        for channel in adv.channels:
            adapter = self.adapters.get(channel)
            if adapter is None:
                raise InputError(f"channels: {channel!r} is not configured here")
            for lang in sorted(renderer.languages(adv, adapter.kind, adapter.parts)):
                problem = None
                parts: dict[str, str] = {}  # a rendering that does not fit is still shown
                try:
                    parts = renderer.render(
                        adv, lang, adapter.kind, adapter.parts, None, adapter.optional_parts
                    )
                    adapter.check_rendering(parts, adv)
                except InputError as e:
                    problem = str(e)
                out.append(Preview(channel, adapter.kind, lang, parts, _facts(adapter, parts), problem))
        return out


def _facts(adapter: Adapter, parts: Mapping[str, str]) -> list[str]:
    facts = []
    if adapter.kind == "sms" and "body" in parts:
        sms = layout(parts["body"])
        facts.append(f"sms_parts:{len(sms.parts)}")
        facts.append(f"encoding:{sms.encoding.upper()}")
        facts.append(f"units:{sms.units}")
    for part, text in parts.items():
        limit = adapter.limits.get(part)
        facts.append(f"{part}:{len(text)}" + (f"/{limit}" if limit else ""))
    return facts


def _why(e: InputError | DecisionError) -> str:
    return e.reason if isinstance(e, DecisionError) else str(e)


def _local(target: Any) -> str:
    """A redirect target inside the console only (never an open redirect)."""
    text = str(target or "")
    return text if text.startswith("/console/") and "//" not in text and "\\" not in text else "/console/"
