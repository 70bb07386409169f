"""The public face: each published advisory as CAP 1.2 (``/cap/{id}``) and an Atom index of them
(``/feed.atom``) that public alert aggregators, the ministry's site and embassies can poll.

Published = the newest version of an advisory that is active or completed and not expired (a cancel
is published too, so that pollers withdraw what it names). One Atom entry per advisory, its id stable
across versions (``urn:broadcast-gateway:advisory:<id>``) and its ``updated`` the newest version's, so
an update replaces its entry and an expired or withdrawn advisory leaves the feed. Each entry links
its CAP document (``type="application/cap+xml"``). Both routes are open: the text is public by nature.
Inline content is exported as it is; a template is rendered for the push channel's title and body in
every language it has.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web
from lxml import etree

from gateway.api import problem
from gateway.cap import cap_identifier, to_cap
from gateway.lifecycle import Reference
from gateway.models import Advisory, now
from gateway.rendering import Renderer
from gateway.store import Store

ATOM = "http://www.w3.org/2005/Atom"
CAP_TYPE = "application/cap+xml"


class Feed:
    def __init__(self, store: Store, renderer: Renderer, public_url: str | None) -> None:
        self.store = store
        self.renderer = renderer
        self.public_url = public_url.rstrip("/") if public_url else None

    def base(self, request: web.Request) -> str:
        """Where links point: ``http.public_url``, else the address the caller used."""
        return self.public_url or str(request.url.origin())

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/feed.atom", self.atom), web.get("/cap/{advisory_id}", self.cap)]

    def texts(self, adv: Advisory) -> dict[str, tuple[str, str]]:
        """Language → (headline, description), in the advisory's language order."""
        if adv.msg_type == "cancel":
            return {}
        if adv.template is None:
            return {lang: (c.title, c.body) for lang, c in adv.content.items()}
        available = self.renderer.languages(adv, "push", ("title", "body"))
        order = [*adv.languages, self.renderer.default_language, *sorted(available)]
        out: dict[str, tuple[str, str]] = {}
        for lang in dict.fromkeys(lang for lang in order if lang in available):
            parts = self.renderer.render(adv, lang, "push", ("title", "body"))
            out[lang] = (parts["title"], parts["body"])
        return out

    async def document(self, adv: Advisory) -> bytes:
        named = []
        for ref in adv.references:
            for r, _ in await self.store.published(Reference.parse(ref).advisory_id, any_state=True):
                named.append((r.sender, cap_identifier(r), r.issued_at))
        return to_cap(adv, self.texts(adv), named)

    async def cap(self, request: web.Request) -> web.Response:
        advisory_id = request.match_info["advisory_id"]
        found = await self.store.published(advisory_id)
        if not found:
            detail = f"no published advisory {advisory_id!r} (unknown, withdrawn or expired)"
            return problem(404, "Unknown advisory", detail, field="advisory_id")
        return web.Response(body=await self.document(found[0][0]), content_type=CAP_TYPE, charset="utf-8")

    async def atom(self, request: web.Request) -> web.Response:
        base = self.base(request)
        published = await self.store.published()
        root = etree.Element(f"{{{ATOM}}}feed", nsmap={None: ATOM})

        def add(parent: Any, name: str, text: str | None = None, **attrs: str) -> Any:
            child = etree.SubElement(parent, f"{{{ATOM}}}{name}", **attrs)
            child.text = text
            return child

        add(root, "id", "urn:broadcast-gateway:feed")
        add(root, "title", "Official advisories")
        add(root, "updated", _atom_time(max((at for _, at in published), default=now())))
        add(root, "link", rel="self", href=f"{base}/feed.atom", type="application/atom+xml")
        author = add(root, "author")
        add(author, "name", "broadcast-gateway")
        for adv, stored_at in published:
            texts = self.texts(adv)
            title, summary = next(iter(texts.values()), (f"Cancelled: {', '.join(adv.references)}", ""))
            entry = add(root, "entry")
            add(entry, "id", f"urn:broadcast-gateway:advisory:{adv.id}")
            add(entry, "title", title)
            add(entry, "updated", _atom_time(stored_at))
            add(entry, "published", _atom_time(adv.issued_at))
            add(entry, "summary", summary or title)
            add(entry, "link", rel="alternate", type=CAP_TYPE, href=f"{base}/cap/{adv.id}")
        body = etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)
        return web.Response(body=body, content_type="application/atom+xml", charset="utf-8")


def _atom_time(at: datetime) -> str:
    return at.replace(microsecond=0).isoformat()
