"""structlog set-up: one event per lifecycle change, JSON lines (readable on a terminal), PII masked."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

_PHONE = re.compile(r"(?<![\w*])\+?\d[\d \-]{6,}\d(?![\w*])")
_EMAIL = re.compile(r"([A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]*@([A-Za-z0-9.\-]+\.[A-Za-z]{2,})")


def mask_phone(text: str) -> str:
    """+77011234567 -> +770*****567: enough to tell numbers apart, not enough to dial."""

    def _mask(m: re.Match[str]) -> str:
        s = m.group(0)
        digits = [c for c in s if c.isdigit()]
        if len(digits) < 8:
            return s
        keep_head = 4 if s.startswith("+") else 3
        return s[:keep_head] + "*" * (len(s) - keep_head - 3) + s[-3:]

    return _PHONE.sub(_mask, text)


def mask_email(text: str) -> str:
    """aigerim@example.kz -> a***@example.kz"""
    return _EMAIL.sub(lambda m: f"{m.group(1)}***@{m.group(2)}", text)


def mask_pii_text(text: str) -> str:
    """Phone numbers and e-mail addresses in ``text`` masked (the logs' masking, and a stored reason's)."""
    return mask_email(mask_phone(text))


def mask(value: Any) -> Any:
    if isinstance(value, str):
        return mask_pii_text(value)
    if isinstance(value, Mapping):
        return {k: mask(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask(v) for v in value]
    return value


# Fields whose values are identifiers we chose, never personal data; masking them would hide digits
# that operators need (offsets, counts, delivery ids).
_SAFE_KEYS = frozenset(
    {
        "event",
        "level",
        "timestamp",
        "logger",
        "advisory_id",
        "delivery_id",
        "offset",
        "partition",
        "count",
        "elapsed_ms",
        "attempt",
        "version",
        "port",
        "line",
        "chunk",
        "bootstrap_servers",
    }
)


def mask_pii(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: masks phone numbers and e-mail addresses in every other field."""
    for key, value in list(event_dict.items()):
        if key not in _SAFE_KEYS:
            event_dict[key] = mask(value)
    return event_dict


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog once for the process; logs go to stderr."""
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            mask_pii,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
