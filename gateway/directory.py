"""The recipient directory: streaming import of CSV and JSON Lines.

The file is read a block of rows at a time in a worker thread (never on the event loop), each row
validated; good rows are upserted in batches, bad rows reported with their line number and reason
and skipped. Memory stays bounded by the batch size whatever the file's length.
"""

from __future__ import annotations

import asyncio
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


def _csv_rows(f: IO[str]) -> Iterator[tuple[int, dict[str, Any] | str]]:
    reader = csv.DictReader(f)
    for row in reader:
        if None in row:
            yield reader.line_num, f"{len(row[None])} more cells than the header has columns"
            continue
        yield reader.line_num, {k: v for k, v in row.items() if v not in (None, "")}


def _jsonl_rows(f: IO[str]) -> Iterator[tuple[int, dict[str, Any] | str]]:
    for line_no, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            yield line_no, f"not JSON: {e.msg}"
            continue
        yield line_no, value if isinstance(value, dict) else "a row must be a JSON object"


def _parse(raw: dict[str, Any] | str) -> Recipient | str:
    if isinstance(raw, str):
        return raw
    try:
        return Recipient.model_validate(raw)
    except ValidationError as e:
        return describe_validation_error(e)


async def read_rows(path: Path) -> AsyncIterator[list[tuple[int, Recipient | str]]]:
    """Blocks of (line number, recipient or the reason it is not one), read in a worker thread."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows_of: Callable[[IO[str]], Iterator[tuple[int, dict[str, Any] | str]]] = _csv_rows
    elif suffix in {".jsonl", ".ndjson"}:
        rows_of = _jsonl_rows
    else:
        raise InputError(f"{path.name}: unknown format; use .csv, .jsonl or .ndjson")
    f = await asyncio.to_thread(open, path, encoding="utf-8-sig", newline="")
    try:
        rows = rows_of(f)

        def block() -> list[tuple[int, Recipient | str]]:
            return [(line, _parse(raw)) for line, raw in itertools.islice(rows, BLOCK)]

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
) -> ImportReport:
    """Upsert every good row of ``path``; returns counts and the first errors."""
    report = ImportReport()
    async for block in read_rows(path):
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
