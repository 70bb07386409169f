"""The recipient directory: streaming import of CSV and JSON Lines.

The file is read a block of rows at a time in a worker thread (never on the event loop), each row
validated; good rows are upserted in batches, bad rows reported with their line number and reason
and skipped. Memory stays bounded by the batch size whatever the file's length.

Encodings: UTF-8 (with or without BOM) and UTF-16 with BOM are recognised; another encoding is named
with ``encoding`` (``--encoding cp1251``). A file whose first 64 KiB are not UTF-8 is refused before
anything loads, naming the line and, for Cyrillic text, the likely encoding (Windows-1251); a later
line that does not decode is reported as a bad row with its line number.
"""

from __future__ import annotations

import asyncio
import codecs
import csv
import itertools
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from gateway.errors import InputError
from gateway.models import Recipient
from gateway.settings import describe_validation_error
from gateway.store import Store

BLOCK = 1000
KEPT_ERRORS = 100


@dataclass(frozen=True, slots=True)
class RowError:
    line: int
    reason: str


@dataclass
class ImportReport:
    loaded: int = 0
    failed: int = 0
    errors: list[RowError] = field(default_factory=list)  # the first KEPT_ERRORS; all are counted
    warned: int = 0
    warnings: list[RowError] = field(default_factory=list)  # rows loaded, with something to fix

    def add_error(self, err: RowError) -> None:
        self.failed += 1
        if len(self.errors) < KEPT_ERRORS:
            self.errors.append(err)

    def add_warning(self, warning: RowError) -> None:
        self.warned += 1
        if len(self.warnings) < KEPT_ERRORS:
            self.warnings.append(warning)


SNIFF_BYTES = 64 * 1024
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


class Lines:
    """Text lines of a file in a known encoding, numbered from 1; a line that does not decode is
    kept aside with its reason (``bad``) and given to the reader as a placeholder row, so the line
    numbers of every other row stay true. UTF-16 is decoded as a stream: an error there stops."""

    def __init__(self, f: IO[bytes], encoding: str) -> None:
        self.f = f
        self.encoding = encoding
        self.number = 0
        self.bad: dict[int, str] = {}

    def __iter__(self) -> Iterator[str]:
        if codecs.lookup(self.encoding).name.startswith("utf-16"):
            yield from self._stream()
            return
        first = True
        for raw in self.f:
            self.number += 1
            if first and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            first = False
            try:
                yield raw.decode(self.encoding)
            except UnicodeDecodeError as e:
                self.bad[self.number] = (
                    f"not {self.encoding} text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                    "fix the line or name the file's encoding with --encoding"
                )
                yield "\x00\n"  # a row of its own (a blank line would be skipped by the CSV reader)

    def _stream(self) -> Iterator[str]:
        """Lines of a multi-byte stream encoding (UTF-16: a newline is not one byte there)."""
        pending = ""
        try:
            for text in codecs.iterdecode(iter(lambda: self.f.read(SNIFF_BYTES), b""), self.encoding):
                pending += text
                *lines, pending = pending.split("\n")
                for line in lines:
                    self.number += 1
                    yield line + "\n"
        except UnicodeDecodeError as e:
            raise InputError(f"line {self.number + 1}: not {self.encoding} text ({e.reason})") from e
        if pending:
            self.number += 1
            yield pending


def sniff_encoding(head: bytes, name: str) -> str:
    """The file's encoding from its first bytes: a BOM says it; otherwise it must be UTF-8, and a
    file that is not is refused before anything is loaded — named as Windows-1251 when it looks so."""
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as e:
        line = head[: e.start].count(b"\n") + 1
        cyrillic = sum(1 for ch in head.decode("cp1251", errors="replace") if "\u0410" <= ch <= "\u044f")
        guess = (
            "it looks like Windows-1251 (cp1251) text: convert it to UTF-8, or run again with "
            "--encoding cp1251"
            if cyrillic >= 3
            else "convert it to UTF-8, or name its encoding with --encoding"
        )
        raise InputError(f"{name}:{line}: not UTF-8 (byte 0x{head[e.start]:02x}); {guess}") from e
    return "utf-8"


def _csv_rows(lines: Lines) -> Iterator[tuple[int, dict[str, Any] | str]]:
    reader = csv.DictReader(lines)
    for row in reader:
        if reader.line_num in lines.bad:
            yield reader.line_num, lines.bad[reader.line_num]
            continue
        if None in row:
            yield reader.line_num, f"{len(row[None])} more cells than the header has columns"
            continue
        yield reader.line_num, {k: v for k, v in row.items() if v not in (None, "")}


def _jsonl_rows(lines: Lines) -> Iterator[tuple[int, dict[str, Any] | str]]:
    for line_no, line in enumerate(lines, start=1):
        if line_no in lines.bad:
            yield line_no, lines.bad[line_no]
            continue
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as e:
            yield line_no, f"not JSON: {getattr(e, 'msg', e)}"
            continue
        except RecursionError:
            yield line_no, "not JSON: nested too deeply"
            continue
        yield line_no, value if isinstance(value, dict) else "a row must be a JSON object"


def _parse(raw: dict[str, Any] | str) -> Recipient | str:
    if isinstance(raw, str):
        return raw
    try:
        return Recipient.model_validate(raw)
    except ValidationError as e:
        return describe_validation_error(e)


async def read_rows(
    path: Path, encoding: str | None = None
) -> AsyncIterator[list[tuple[int, Recipient | str]]]:
    """Blocks of (line number, recipient or the reason it is not one), read in a worker thread.
    The encoding is ``encoding`` if given, else what ``sniff_encoding`` finds."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows_of: Callable[[Lines], Iterator[tuple[int, dict[str, Any] | str]]] = _csv_rows
    elif suffix in {".jsonl", ".ndjson"}:
        rows_of = _jsonl_rows
    else:
        raise InputError(f"{path.name}: unknown format; use .csv, .jsonl or .ndjson")
    if encoding is not None:
        try:
            codecs.lookup(encoding)
        except LookupError as e:
            raise InputError(f"--encoding: {encoding!r} is not an encoding Python knows") from e
    f = await asyncio.to_thread(open, path, "rb")
    try:
        if encoding is None:
            head = await asyncio.to_thread(f.read, SNIFF_BYTES)
            encoding = sniff_encoding(head, path.name)
            await asyncio.to_thread(f.seek, 0)
        rows = rows_of(Lines(f, encoding))

        def block() -> list[tuple[int, Recipient | str]]:
            try:
                return [(line, _parse(raw)) for line, raw in itertools.islice(rows, BLOCK)]
            except csv.Error as e:
                raise InputError(f"{path.name}: not readable as CSV: {e}") from e

        while chunk := await asyncio.to_thread(block):
            yield chunk
    finally:
        await asyncio.to_thread(f.close)


async def import_file(
    store: Store,
    path: Path,
    on_progress: Callable[[int], None] | None = None,
    on_error: Callable[[RowError], None] | None = None,
    on_warning: Callable[[RowError], None] | None = None,
    encoding: str | None = None,
) -> ImportReport:
    """Upsert every good row of ``path``; returns counts and the first errors."""
    report = ImportReport()
    async for block in read_rows(path, encoding):
        good: dict[str, Recipient] = {}
        for line, parsed in block:
            if isinstance(parsed, Recipient):
                good[parsed.id] = parsed  # a repeated id within a block: the later row wins, as across blocks
                if parsed.phone_problem:
                    warning = RowError(line, f"phone: {parsed.phone_problem}; kept, SMS will be skipped")
                    report.add_warning(warning)
                    if on_warning:
                        on_warning(warning)
            else:
                err = RowError(line, parsed)
                report.add_error(err)
                if on_error:
                    on_error(err)
        await store.upsert_recipients(list(good.values()))
        report.loaded += len(good)
        if on_progress:
            on_progress(len(block))
    return report
