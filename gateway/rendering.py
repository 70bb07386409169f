"""Localized rendering: ``templates/<name>/<lang>/<kind>.<part>.j2`` or inline per-language content.

The language is the first of recipient chain → advisory chain → configured default that the
template (or inline content) has for the channel kind. A rendering is cached per advisory version x
language x channel kind, and done per recipient only when the template reads ``recipient``.
Templates run sandboxed with strict undefined variables: a missing value is an error, never a blank.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import jinja2
import jinja2.meta
from jinja2.sandbox import SandboxedEnvironment

from gateway.errors import ContentError
from gateway.models import Advisory, Reachable, Recipient

# inline content (title, body) stands in for every required part a channel asks for
_INLINE = {"title": "title", "body": "body", "subject": "title", "text": "body"}


class Target(Protocol):
    """What rendering needs to know of a channel (a channel adapter is one)."""

    channel: str
    kind: ClassVar[str]
    parts: ClassVar[tuple[str, ...]]
    optional_parts: ClassVar[tuple[str, ...]]
    header_parts: ClassVar[tuple[str, ...]]

    def check_rendering(self, rendered: Mapping[str, str], adv: Advisory) -> None:
        """Raise ContentError if the channel cannot carry this rendering (size, encoding)."""


class Renderer:
    def __init__(self, templates_dir: Path, default_language: str) -> None:
        self.templates_dir = templates_dir
        self.default_language = default_language
        self.env = SandboxedEnvironment(
            loader=jinja2.FileSystemLoader(str(templates_dir)),
            undefined=jinja2.StrictUndefined,
            autoescape=lambda name: bool(name and name.endswith(".html.j2")),
            keep_trailing_newline=False,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._cache: dict[tuple[str, str, str], dict[str, str]] = {}
        self._per_recipient: dict[tuple[str, str, str], bool] = {}
        self._languages: dict[tuple[str, str, tuple[str, ...]], frozenset[str]] = {}

    # -- what exists --------------------------------------------------------------------------

    def template_exists(self, name: str) -> bool:
        return (self.templates_dir / name).is_dir()

    def languages(self, adv: Advisory, kind: str, parts: Sequence[str]) -> frozenset[str]:
        """Languages in which this advisory can be rendered for a channel kind."""
        if adv.template is None:
            return frozenset(adv.content)
        key = (adv.template, kind, tuple(parts))
        if key not in self._languages:
            base = self.templates_dir / adv.template
            found = (
                {
                    d.name
                    for d in base.iterdir()
                    if d.is_dir() and all((d / f"{kind}.{p}.j2").is_file() for p in parts)
                }
                if base.is_dir()
                else set()
            )
            self._languages[key] = frozenset(found)
        return self._languages[key]

    def choose_language(
        self, adv: Advisory, recipient: Reachable | None, kind: str, parts: Sequence[str]
    ) -> str | None:
        available = self.languages(adv, kind, parts)
        chain: Iterable[str] = (
            *(recipient.languages if recipient else ()),
            *adv.languages,
            self.default_language,
        )
        return next((lang for lang in chain if lang in available), None)

    # -- rendering ----------------------------------------------------------------------------

    def uses_recipient(self, adv: Advisory, lang: str, kind: str, parts: Sequence[str]) -> bool:
        """Whether this advisory's rendering in ``lang`` for ``kind`` reads the recipient (then it is
        rendered per recipient, else once)."""
        return adv.template is not None and self._uses_recipient(adv.template, lang, kind, parts)

    def _uses_recipient(self, template: str, lang: str, kind: str, parts: Sequence[str]) -> bool:
        key = (template, lang, kind)
        if key not in self._per_recipient:
            uses = False
            for part in parts:
                name = f"{template}/{lang}/{kind}.{part}.j2"
                source, _, _ = self.env.loader.get_source(self.env, name)  # type: ignore[union-attr]
                uses = uses or "recipient" in jinja2.meta.find_undeclared_variables(self.env.parse(source))
            self._per_recipient[key] = uses
        return self._per_recipient[key]

    def render(
        self,
        adv: Advisory,
        lang: str,
        kind: str,
        parts: Sequence[str],
        recipient: Recipient | None = None,
        optional: Sequence[str] = (),
    ) -> dict[str, str]:
        """The rendered parts, in order (a later part sees the earlier ones as ``parts``); optional
        parts only where the template has them. Raises ContentError naming the template."""
        if adv.template is None:
            content = adv.content[lang]
            return {p: getattr(content, _INLINE[p]) for p in parts}
        per_recipient = self._uses_recipient(adv.template, lang, kind, parts)
        cache_key = (adv.key, lang, kind)
        if not per_recipient and cache_key in self._cache:
            return self._cache[cache_key]
        context: dict[str, Any] = {
            **adv.data,
            "advisory": adv.model_dump(exclude={"data", "content", "signature"}),
            "language": lang,
        }
        if per_recipient:
            if recipient is None:
                recipient = Recipient.model_construct(id="(preview)", languages=(lang,))
            context["recipient"] = recipient.model_dump(exclude={"phone", "email", "opt_outs"})
        out: dict[str, str] = {}
        context["parts"] = out
        have_optional = [
            p for p in optional if (self.templates_dir / adv.template / lang / f"{kind}.{p}.j2").is_file()
        ]
        for part in (*parts, *have_optional):
            name = f"{adv.template}/{lang}/{kind}.{part}.j2"
            try:
                out[part] = self.env.get_template(name).render(context).strip()
            except Exception as e:  # a filter given the wrong type raises TypeError, not TemplateError
                raise ContentError(
                    f"template {name} (language {lang}, channel {kind}): {type(e).__name__}: {str(e)[:300]}"
                ) from e
        if not per_recipient:
            self._cache[cache_key] = out
        return out

    # -- intake check -------------------------------------------------------------------------

    def check(self, adv: Advisory, targets: Iterable[Target]) -> None:
        """Prove at intake that every channel renders, in the default language at least, and that
        every language's rendering fits the channel (``Target.check_rendering``)."""
        if adv.template is not None and not self.template_exists(adv.template):
            raise ContentError(f"template: unknown template {adv.template!r}")
        for t in targets:
            available = self.languages(adv, t.kind, t.parts)
            if self.default_language not in available:
                where = f"template {adv.template!r}" if adv.template else "content"
                raise ContentError(
                    f"{where}: no {self.default_language!r} (default language) text for channel "
                    f"{t.channel!r}; have {sorted(available) or 'none'}"
                )
            for lang in sorted(available):
                rendered = self.render(adv, lang, t.kind, t.parts, optional=t.optional_parts)
                try:
                    check_text(rendered, t.header_parts)
                    t.check_rendering(rendered, adv)
                except ContentError as e:
                    raise ContentError(f"language {lang!r} on channel {t.channel!r}: {e}") from e


def unencodable(parts: Iterable[tuple[str, str]]) -> str | None:
    """Why one of these (name, text) pairs is not encodable text (a lone surrogate from a
    ``\\ud800`` escape), or None. Checked at intake (``check_text``) and per message in dispatch."""
    for name, text in parts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"{name}: not encodable text ({e.reason} at character {e.start})"
    return None


def check_text(rendered: Mapping[str, str], header_parts: Iterable[str]) -> None:
    """Raise ContentError if a part is not encodable text, or a header part (a subject, a title:
    one line at the partner) holds a line break or another control character."""
    problem = unencodable(rendered.items())
    if problem is not None:
        raise ContentError(problem)
    for part in header_parts:
        text = rendered.get(part, "")
        bad = next(
            (i for i, ch in enumerate(text) if unicodedata.category(ch) == "Cc" or ch in "\u2028\u2029"), None
        )
        if bad is not None:
            raise ContentError(
                f"{part}: a line break or control character ({text[bad]!r}) at character {bad}; "
                f"a {part} is one line"
            )
