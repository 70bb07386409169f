"""The sandbox relay (gateway/sandbox/email.py): its quick reading of MAIL and RCPT arguments says
what aiosmtpd's own reading says, for plain addresses and for anything else."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from aiosmtpd.smtp import SMTP
from hypothesis import given
from hypothesis import strategies as st

from gateway.sandbox.email import EmailSink, _SinkSMTP

_LOCAL = st.text("abcXYZ019._%+-", min_size=1, max_size=20)
_DOMAIN = st.text("abcxyz019.-", min_size=1, max_size=20)
_REST = st.sampled_from(["", " SIZE=1234", "  BODY=8BITMIME", "SIZE=1", " x y"])
_ODD = st.text(st.characters(codec="ascii", exclude_characters="\r\n"), max_size=30)


@contextmanager
def _readers() -> Iterator[tuple[SMTP, _SinkSMTP]]:
    """aiosmtpd's reader and the sandbox's, on a loop of their own that is closed after (without
    one, aiosmtpd makes a new event loop for each and leaves it open)."""
    loop = asyncio.new_event_loop()
    sink = EmailSink("s", None)
    try:
        yield SMTP(sink, loop=loop), _SinkSMTP(sink, loop=loop)
    finally:
        loop.close()


def _read(reader: SMTP, arg: str) -> object:
    """What ``reader`` reads out of ``arg``, or the error it raises (the email package's parser
    raises IndexError for ``0@``: aiosmtpd then answers 500, and so must the sandbox)."""
    try:
        return reader._getaddr(arg)
    except Exception as e:  # the error itself is the outcome compared
        return type(e)


@given(local=_LOCAL, domain=_DOMAIN, rest=_REST, space=st.sampled_from(["", " ", "  "]))
def test_a_plain_address_is_read_as_aiosmtpd_reads_it(local: str, domain: str, rest: str, space: str) -> None:
    arg = f"{space}<{local}@{domain}>{rest}"
    with _readers() as (aiosmtpd, relay):
        assert _read(relay, arg) == _read(aiosmtpd, arg)


@given(arg=_ODD)
def test_any_other_argument_is_read_as_aiosmtpd_reads_it(arg: str) -> None:
    with _readers() as (aiosmtpd, relay):
        assert _read(relay, arg) == _read(aiosmtpd, arg)
