"""atheris entry points: the same edges as tests/test_fuzzed_edges.py, driven by coverage-guided
fuzzing (``make fuzz``; not part of ``make test``). A crash here is any exception other than the
clean rejection (InputError); each finding becomes a regression test in tests/test_fuzzed_edges.py.

    python -m tests.fuzz.targets intake|receipts|smpp|recipients [libFuzzer flags]
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from aiosmpplib import DeliverSm

    from channels.base import hmac_headers
    from channels.push import PushAdapter, PushSettings
    from channels.smpp import SmppAdapter
    from gateway.directory import import_file
    from gateway.errors import InputError
    from gateway.store import Store
    from tests.test_intake import _intake

SECRET = "fuzz-secret"


def intake() -> Callable[[bytes], None]:
    judge = _intake()
    judge.verifier = None  # a mutated signed record never verifies: reach the schema and render check

    def one(raw: bytes) -> None:
        with contextlib.suppress(InputError):
            judge.validate(raw)

    return one


def receipts() -> Callable[[bytes], None]:
    push = PushAdapter("push", PushSettings(adapter="push", secret=SECRET), None)  # type: ignore[arg-type]

    def one(body: bytes) -> None:
        with contextlib.suppress(InputError):
            push.parse_receipts(body, hmac_headers(SECRET, body))

    return one


def smpp() -> Callable[[bytes], None]:
    def one(data: bytes) -> None:
        text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(300) or "x"
        with contextlib.suppress(InputError):
            SmppAdapter.receipt_of(DeliverSm(short_message=text, log_id="d#1/1", esm_class=0x04))

    return one


def recipients() -> Callable[[bytes], None]:
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-recipients-"))
    store = asyncio.run(Store.open(f"sqlite+aiosqlite:///{tmp / 's.db'}"))

    def one(data: bytes) -> None:
        path = tmp / ("r.jsonl" if data[:1] == b"{" else "r.csv")
        path.write_bytes(data)
        with contextlib.suppress(InputError):
            asyncio.run(import_file(store, path))

    return one


TARGETS = {"intake": intake, "receipts": receipts, "smpp": smpp, "recipients": recipients}


def seed(corpus: Path) -> None:
    """Start intake's corpus from a good signed advisory and every record of the poison corpus."""
    import json

    from gateway.poison import corpus as poison_corpus
    from gateway.signing import new_key, sign
    from tests.conftest import advisory, signed

    corpus.mkdir(parents=True, exist_ok=True)
    good = advisory(channels=["push", "email"])
    (corpus / "good").write_bytes(json.dumps(signed(good)).encode())
    forger = new_key()[0]
    for p in poison_corpus(good, signed, lambda r: sign(r, forger), lambda r: sign(r, forger)):
        (corpus / p.name).write_bytes(p.raw[:65536])


if __name__ == "__main__":
    name, flags = sys.argv[1], sys.argv[2:]
    if name == "intake":
        seed(Path(next((f for f in flags if not f.startswith("-")), "var/fuzz/intake/corpus")))
    atheris.Setup([sys.argv[0], *flags], TARGETS[name]())
    atheris.Fuzz()
