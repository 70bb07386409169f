"""Recipient import: streaming CSV and JSON Lines; bad rows reported by line number, good rows kept."""

from __future__ import annotations

import codecs
from pathlib import Path

import pytest

from gateway.directory import import_file
from gateway.errors import InputError
from gateway.store import Store


async def _store(tmp_path: Path) -> Store:
    return await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'dir.db'}")


async def test_csv_bad_rows_are_reported_with_line_numbers_and_good_rows_load(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text(
        "id,languages,phone,email,app_user,country,tags\n"
        "a1,kk|ru,+7 701 123 4567,a1@example.kz,app-a1,XA,registered\n"
        "a2,ru,12345,,app-a2,XA,\n"  # line 3: not a phone number
        "a3,en,,not-an-email,app-a3,XA,\n"  # line 4: bad e-mail
        "a4,en,,,app-a4,XA,,extra-cell\n"  # line 5: too many cells
        ",en,,,app-a5,XA,\n"  # line 6: no id
        "a6,en,+44 20 7946 0958,,,GB,\n",
        encoding="utf-8",
    )
    store = await _store(tmp_path)
    try:
        report = await import_file(store, path)
        assert report.loaded == 3
        assert [(w.line, w.reason.split(":")[0]) for w in report.warnings] == [(3, "phone")]
        assert [(e.line, e.reason.split(":")[0]) for e in report.errors] == [
            (4, "email"),
            (5, "1 more cells than the header has columns"),
            (6, "id"),
        ]
        assert await store.count_recipients() == 3
        page = await store.audience_page(["XA"], [], ["registered"], "", 10)
        assert [(r.id, r.phone, r.languages) for r in page] == [("a1", "+77011234567", ("kk", "ru"))]
    finally:
        await store.close()


async def test_jsonl_import_upserts_and_reports_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(
        '{"id": "b1", "languages": ["kk"], "app_user": "u1", "country": "XA"}\n'
        "not json\n"
        "\n"
        '{"id": "b1", "languages": ["ru"], "app_user": "u1", "country": "XA"}\n'
        '["a", "list"]\n',
        encoding="utf-8",
    )
    store = await _store(tmp_path)
    try:
        report = await import_file(store, path)
        assert report.loaded == 1
        assert [e.line for e in report.errors] == [2, 5]
        (only,) = await store.audience_page(["XA"], [], [], "", 10)
        assert only.languages == ("ru",), "the later row for the same id wins"
    finally:
        await store.close()


async def test_a_large_file_streams_in_blocks(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    with path.open("w", encoding="utf-8") as f:
        f.write("id,app_user,country\n")
        for i in range(25_000):
            f.write(f"c{i:06d},u{i},XA\n")
    store = await _store(tmp_path)
    progress: list[int] = []
    try:
        report = await import_file(store, path, on_progress=progress.append)
        assert report.loaded == 25_000
        assert max(progress) <= 1000, "rows are handled a block at a time"
        assert sum(progress) == 25_000
    finally:
        await store.close()


HEADER = "id,languages,app_user,country\n"
ROWS = "k1,kk,app-k1,XA\nk2,ru,app-k2,XA\n"
NAMES = "id,languages,app_user,country,region\nc1,kk,app-c1,XA,Алматы облысы\nc2,ru,app-c2,XA,Қарағанды\n"


async def _import_bytes(tmp_path: Path, name: str, data: bytes, encoding: str | None = None) -> list[str]:
    path = tmp_path / name
    path.write_bytes(data)
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / (name + '.db')}")
    try:
        report = await import_file(store, path, encoding=encoding)
        assert report.failed == 0, report.errors
        return [r.region or r.id for r in await store.audience_page(["XA"], [], [], "", 10)]
    finally:
        await store.close()


async def test_utf8_with_and_without_bom_and_utf16_with_bom_are_read(tmp_path: Path) -> None:
    expected = ["Алматы облысы", "Қарағанды"]
    assert await _import_bytes(tmp_path, "a.csv", NAMES.encode("utf-8")) == expected
    assert await _import_bytes(tmp_path, "b.csv", NAMES.encode("utf-8-sig")) == expected
    assert await _import_bytes(tmp_path, "c.csv", NAMES.encode("utf-16")) == expected  # BOM + LE
    assert await _import_bytes(tmp_path, "d.csv", codecs.BOM_UTF16_BE + NAMES.encode("utf-16-be")) == expected
    jsonl = '{"id": "j1", "app_user": "u", "country": "XA", "region": "Өскемен"}\n'
    assert await _import_bytes(tmp_path, "e.jsonl", jsonl.encode("utf-16")) == ["Өскемен"]


async def test_a_cp1251_file_is_refused_before_loading_and_named(tmp_path: Path) -> None:
    russian = "id,languages,app_user,country,region\nc1,ru,app-c1,XA,Москва\nc2,ru,app-c2,XA,Тверь\n"
    path = tmp_path / "win.csv"
    path.write_bytes(russian.encode("cp1251"))
    store = await _store(tmp_path)
    try:
        with pytest.raises(
            InputError, match=r"win.csv:2: not UTF-8 \(byte 0xcc\); it looks like Windows-1251"
        ):
            await import_file(store, path)
        assert await store.count_recipients() == 0
        report = await import_file(store, path, encoding="cp1251")
        assert report.loaded == 2
        assert [r.region for r in await store.audience_page(["XA"], [], [], "", 10)] == ["Москва", "Тверь"]
    finally:
        await store.close()


async def test_a_later_undecodable_line_is_a_bad_row_with_its_number(tmp_path: Path) -> None:
    filler = "".join(f"f{i:05d},en,app-f{i},XA\n" for i in range(5000))  # past the 64 KiB sniffed
    data = (HEADER + filler).encode() + b"bad,en,app-\xff\xfe,XA\n" + b"last,en,app-last,XA\n"
    path = tmp_path / "late.csv"
    path.write_bytes(data)
    store = await _store(tmp_path)
    try:
        report = await import_file(store, path)
        assert (report.loaded, [(e.line, e.reason.split(" (")[0]) for e in report.errors]) == (
            5001,
            [(5002, "not utf-8 text")],
        )
    finally:
        await store.close()


async def test_an_unknown_encoding_name_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text(HEADER + ROWS, encoding="utf-8")
    store = await _store(tmp_path)
    try:
        with pytest.raises(InputError, match=r"--encoding: 'klingon' is not an encoding"):
            await import_file(store, path, encoding="klingon")
    finally:
        await store.close()
