"""Recipient import: streaming CSV and JSON Lines; bad rows reported by line number, good rows kept."""

from __future__ import annotations

from pathlib import Path

from gateway.directory import import_file
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
