"""``broadcast-gateway``: run, broker, sandbox, publish, recipients, replay, db, status, demo, drill,
bench."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import yaml

from gateway import kafka
from gateway import logging as gw_logging
from gateway.errors import ConfigError, InputError
from gateway.lifecycle import partition_key
from gateway.settings import KafkaSettings, Settings, load_settings

SIGNING_KEY_ENV = "GATEWAY_SIGNING_KEY"
SANDBOX_SECRET_ENV = "SANDBOX_SECRET"  # noqa: S105 - the name of a variable, not a secret


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings([Path(p) for p in args.config or []])
    gw_logging.configure(settings.logging.level, settings.logging.format)
    return settings


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stop``: the process finishes what it is doing, then exits."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


# -- run ------------------------------------------------------------------------------------------


# Python's cycle collector, for a process that makes a few hundred short-lived objects a delivery:
# the default (700, 10, 10) collects the youngest generation every 700 allocations net, thousands of
# times a second under load, and the oldest every 70,000, walking every object the service holds.
# Started objects are frozen (never walked again); the youngest is collected every 50,000. 100,000
# push: all sent 15.7-17.6 s -> 12.4-15.1 s, urgent first request p99 0.38-0.43 s -> 0.27-0.32 s,
# peak RSS +5 MB (three interleaved runs each; docs/performance.md, fourth pass).
GC_THRESHOLDS = (50_000, 50, 100)


def tune_gc() -> None:
    """Freeze what exists now and collect less often: for a service, once it has started."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def _run(settings: Settings) -> None:
    from gateway.app import Gateway

    gateway = Gateway(settings)
    await gateway.start()
    tune_gc()
    stop_on_signals(gateway.stopping)
    try:
        await gateway.wait()
    finally:
        await gateway.stop()


def cmd_run(args: argparse.Namespace) -> int:
    asyncio.run(_run(_settings(args)))
    return 0


# -- broker ---------------------------------------------------------------------------------------


async def _broker(settings: Settings, port: int | None) -> None:
    from gateway.broker import EmbeddedBroker

    async with EmbeddedBroker(port=port) as broker:
        await kafka.ensure_topics(broker.bootstrap_servers, settings.kafka, settings.channels)
        print(f"Kafka (Tansu, memory only) at {broker.bootstrap_servers}", flush=True)
        print(f"  export GATEWAY__KAFKA__BOOTSTRAP_SERVERS={broker.bootstrap_servers}", flush=True)
        stop = asyncio.Event()
        stop_on_signals(stop)
        await stop.wait()


def cmd_broker(args: argparse.Namespace) -> int:
    asyncio.run(_broker(_settings(args), args.port))
    return 0


# -- sandbox --------------------------------------------------------------------------------------


def cmd_sandbox(args: argparse.Namespace) -> int:
    from gateway.sandbox.server import serve

    _settings(args)  # configures logging
    secret = os.environ.get(SANDBOX_SECRET_ENV)
    if not secret:
        raise ConfigError(
            f"sandbox: set {SANDBOX_SECRET_ENV} (the secret the sandbox partners share with the gateway)"
        )
    asyncio.run(
        serve(
            args.host,
            args.port,
            args.smtp_port,
            args.smpp_port,
            secret,
            args.gateway_url,
            args.receipt_delay,
            args.segment_size,
        )
    )
    return 0


# -- publish --------------------------------------------------------------------------------------


def load_advisory_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: {e.strerror}") from e
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise InputError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from e
    if not isinstance(data, dict):
        raise InputError(f"{path}: an advisory is a mapping")
    # YAML turns timestamps into datetimes; the wire form is JSON text
    return dict(json.loads(json.dumps(data, default=lambda v: v.isoformat())))


def record_key(record: dict[str, Any]) -> bytes:
    """The Kafka key of an advisory record (``lifecycle.partition_key``)."""
    references = record.get("references") or []
    return partition_key(str(record.get("id", "")), str(record.get("msg_type")), references)


async def publish(
    bootstrap_servers: str, topic: str, record: dict[str, Any], settings: KafkaSettings | None = None
) -> None:
    raw = json.dumps(record, ensure_ascii=False).encode()
    await publish_raw(bootstrap_servers, topic, raw, record_key(record), settings=settings)


async def publish_raw(
    bootstrap_servers: str,
    topic: str,
    raw: bytes,
    key: bytes,
    headers: list[tuple[str, bytes]] | None = None,
    settings: KafkaSettings | None = None,
) -> None:
    """One record to ``topic`` (with ``settings``: through a managed cluster's TLS and SASL)."""
    producer = kafka.producer(bootstrap_servers, settings)
    await producer.start()
    try:
        await producer.send_and_wait(topic, raw, key=key, headers=headers)
    finally:
        await producer.stop()


def cmd_publish(args: argparse.Namespace) -> int:
    from gateway.intake import parse
    from gateway.signing import sign

    settings = _settings(args)
    key = os.environ.get(SIGNING_KEY_ENV)
    if args.key_file:
        key = Path(args.key_file).read_text(encoding="utf-8").strip()
    if Path(args.file).suffix.lower() == ".xml":
        return _publish_cap(settings, Path(args.file), key)
    record = load_advisory_file(Path(args.file))
    if key:
        record = sign(record, key)
    adv = parse(record)
    if not settings.kafka.bootstrap_servers:
        raise ConfigError(
            "kafka.bootstrap_servers: not set; publish needs a running broker "
            "(see `broadcast-gateway broker`)"
        )
    asyncio.run(
        publish(settings.kafka.bootstrap_servers, settings.kafka.topic_advisories, record, settings.kafka)
    )
    print(
        f"published {adv.key} to {settings.kafka.topic_advisories}"
        f"{'' if record.get('signature') else ' (unsigned)'}"
    )
    return 0


def _publish_cap(settings: Settings, path: Path, key: str | None) -> int:
    """A CAP 1.2 document as it is, checked here first, its signature in the record header."""
    from gateway.cap import parse_cap
    from gateway.intake import parse
    from gateway.signing import SIGNATURE_HEADER, sign_document

    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: {e.strerror}") from e
    record = parse_cap(raw, settings.intake.limits, settings.intake.cap_channels)
    adv = parse(record)
    if not settings.kafka.bootstrap_servers:
        raise ConfigError("kafka.bootstrap_servers: not set; publish needs a running broker")
    headers = [(SIGNATURE_HEADER, sign_document(raw, key).encode())] if key else []
    topic = settings.kafka.topic_advisories
    asyncio.run(
        publish_raw(settings.kafka.bootstrap_servers, topic, raw, record_key(record), headers, settings.kafka)
    )
    print(f"published CAP {adv.key} ({adv.msg_type}) to {topic}{'' if headers else ' (unsigned)'}")
    return 0


# -- recipients import ----------------------------------------------------------------------------


async def _import(settings: Settings, path: Path, encoding: str | None) -> int:
    from rich.progress import BarColumn, Progress, TextColumn

    from gateway.directory import RowError, import_file
    from gateway.store import Store

    store = await Store.open(settings.store.url, settings.store.migrate)
    err = sys.stderr

    def on_error(e: RowError) -> None:
        print(f"{path.name}:{e.line}: {e.reason}", file=err)

    try:
        with Progress(
            TextColumn("importing"),
            BarColumn(),
            TextColumn("{task.completed} rows"),
            transient=True,
            disable=not sys.stderr.isatty(),
        ) as progress:
            task = progress.add_task("rows", total=None)
            report = await import_file(
                store, path, lambda n: progress.advance(task, n), on_error, on_error, encoding
            )
    finally:
        await store.close()
    print(f"loaded {report.loaded} recipients ({report.warned} with warnings); {report.failed} rows skipped")
    return 0 if report.failed == 0 else 1


def cmd_recipients(args: argparse.Namespace) -> int:
    return asyncio.run(_import(_settings(args), Path(args.file), args.encoding))


# -- replay ---------------------------------------------------------------------------------------


async def replay(settings: Settings, advisory_id: str, channel: str | None, limit: int) -> int:
    """Failed deliveries back to queued, and their chunks onto their lane (the planner's own
    publishing, so an urgent advisory's replay stays urgent); returns how many."""
    from collections import defaultdict

    from gateway.planner import Planner
    from gateway.store import Store

    if not settings.kafka.bootstrap_servers:
        raise ConfigError("kafka.bootstrap_servers: not set; replay needs the gateway's broker")
    store = await Store.open(settings.store.url, settings.store.migrate)
    producer = kafka.producer(settings.kafka.bootstrap_servers, settings.kafka)
    await producer.start()
    try:
        planner = Planner(store, producer, settings.kafka, settings.planner.chunk_size, kinds={})
        rows = await store.requeue_failed(advisory_id, channel, limit)
        by_version: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        for version, ch, delivery in rows:
            by_version[version][ch].append(delivery)
        for version, by_channel in by_version.items():
            adv = await store.advisory(advisory_id, version)
            if adv is not None:
                await planner.publish(adv, by_channel, "replay")
        return len(rows)
    finally:
        await producer.stop()
        await store.close()


def cmd_replay(args: argparse.Namespace) -> int:
    n = asyncio.run(replay(_settings(args), args.advisory, args.channel, args.limit))
    print(f"re-queued {n} failed deliveries of {args.advisory}")
    return 0


# -- status ---------------------------------------------------------------------------------------


async def _status(settings: Settings, advisory_id: str | None) -> dict[str, Any]:
    from gateway.store import Store

    store = await Store.open(settings.store.url, settings.store.migrate)
    try:
        return {
            "advisory_id": advisory_id,
            "by_channel": await store.counts(advisory_id),
            "segments": [s.as_dict() for s in await store.segments(advisory_id)],
        }
    finally:
        await store.close()


async def _follow(settings: Settings, advisory_id: str) -> int:
    """Redraw the counts every second until every delivery of the advisory is final."""
    from rich.console import Console
    from rich.live import Live

    from gateway.progress import settled, table
    from gateway.store import Store

    store = await Store.open(settings.store.url, settings.store.migrate)
    try:
        with Live(console=Console(), refresh_per_second=2) as live:
            while True:
                counts = await store.counts(advisory_id)
                live.update(table(counts, advisory_id))
                if settled(counts):
                    return 0
                await asyncio.sleep(1.0)  # the refresh rate of the display
    finally:
        await store.close()


def cmd_status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.follow:
        if not args.advisory:
            raise InputError("advisory: --follow needs the advisory to follow")
        return asyncio.run(_follow(settings, args.advisory))
    status = asyncio.run(_status(settings, args.advisory))
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    from rich.console import Console

    from gateway.progress import segments_table, table

    if not status["by_channel"] and not status["segments"]:
        print(f"advisory_id: no deliveries for {args.advisory!r}" if args.advisory else "no deliveries")
        return 1
    console = Console()
    if status["by_channel"]:
        console.print(table(status["by_channel"], args.advisory or "every advisory"))
    if status["segments"]:
        console.print(segments_table(status["segments"], args.advisory or "every advisory"))
    return 0


async def _report(settings: Settings, args: argparse.Namespace) -> int:
    import getpass

    from gateway.report import write_csv
    from gateway.store import Store

    store = await Store.open(settings.store.url, settings.store.migrate)
    try:
        written = await write_csv(store, args.advisory, sys.stdout, args.unmasked, f"cli:{getpass.getuser()}")
    finally:
        await store.close()
    if not written:
        print(f"advisory_id: no deliveries for {args.advisory!r}", file=sys.stderr)
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    return asyncio.run(_report(_settings(args), args))


# -- tokens and audit ----------------------------------------------------------------------------


async def _tokens(settings: Settings, args: argparse.Namespace) -> int:
    import getpass

    from gateway.auth import Tokens
    from gateway.store import Store

    store = await Store.open(settings.store.url, settings.store.migrate)
    actor = f"cli:{getpass.getuser()}"
    try:
        tokens = Tokens(store)
        if args.action == "create":
            token_id, token = await tokens.create(args.name, args.role or [], actor)
            print(f"token {token_id} ({args.name}: {', '.join(args.role)}); shown once, keep it secret:")
            print(token)
        elif args.action == "revoke":
            if not await tokens.revoke(args.id, actor):
                raise InputError(f"id: no live token {args.id!r}")
            print(f"revoked {args.id}")
        else:
            for t in await tokens.list():
                state = f"revoked {t['revoked_at']:%Y-%m-%d %H:%M}" if t["revoked_at"] else "live"
                print(f"{t['id']}  {t['name']:<24} {','.join(t['roles']):<28} {state}")
        return 0
    finally:
        await store.close()


def cmd_tokens(args: argparse.Namespace) -> int:
    return asyncio.run(_tokens(_settings(args), args))


async def _audit(settings: Settings, subject: str | None) -> int:
    from gateway import audit
    from gateway.store import Store

    store = await Store.open(settings.store.url, settings.store.migrate)
    try:
        for e in await audit.read(store.engine, subject):
            detail = json.dumps(e["detail"], ensure_ascii=False)
            print(f"{e['at']:%Y-%m-%dT%H:%M:%S}  {e['actor']:<28} {e['action']:<22} {e['subject']}  {detail}")
        return 0
    finally:
        await store.close()


def cmd_audit(args: argparse.Namespace) -> int:
    return asyncio.run(_audit(_settings(args), args.subject))


# -- db -------------------------------------------------------------------------------------------


async def _db(settings: Settings, action: str) -> str:
    from sqlalchemy.ext.asyncio import create_async_engine

    from gateway import migrate

    engine = create_async_engine(settings.store.url)
    try:
        if action == "upgrade":
            before, after = await migrate.upgrade(engine)
            return f"schema upgraded: {before or '(empty)'} → {after}" if before != after else f"at {after}"
        revision = await migrate.current(engine)
        return f"schema at {revision or '(empty)'}; this release needs {migrate.head()}"
    finally:
        await engine.dispose()


def cmd_db(args: argparse.Namespace) -> int:
    print(asyncio.run(_db(_settings(args), args.action)))
    return 0


# -- demo -----------------------------------------------------------------------------------------


def cmd_drill(args: argparse.Namespace) -> int:
    if args.scenario == "scale":
        from gateway import scale

        return scale.main(
            args.recipients, args.instances, args.json, args.timeout, args.postgres, not args.no_kill
        )
    from gateway.drill import main

    return main(args.scenario, args.recipients, args.json, args.timeout, args.channel)


def cmd_bench(args: argparse.Namespace) -> int:
    from gateway.bench import main

    return main(
        args.recipients,
        args.channel,
        args.json,
        args.timeout,
        args.apprise,
        args.urgent,
        args.chart,
        args.profile,
        args.no_floor,
        args.floor_only,
        args.planner_process,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return asyncio.run(run_demo(args.recipients, args.json, args.timeout))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="broadcast-gateway", description=__doc__)
    p.add_argument("--config", action="append", metavar="FILE", help="extra YAML configuration (repeatable)")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("run", help="run the gateway service (SIGTERM finishes in-flight work)").set_defaults(
        func=cmd_run
    )

    b = sub.add_parser("broker", help="run the embedded Kafka broker (Tansu) alone")
    b.add_argument("--port", type=int, default=None)
    b.set_defaults(func=cmd_broker)

    s = sub.add_parser(
        "sandbox", help="run the sandbox partners (push, sms-http, email, smpp) in this process"
    )
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8700, help="HTTP: push and sms-http partners, /stats")
    s.add_argument("--smtp-port", type=int, default=8725, help="the SMTP relay")
    s.add_argument(
        "--smpp-port",
        type=int,
        default=2775,
        help="the SMSC (system_id gateway, password: 8 first characters of the secret)",
    )
    s.add_argument("--gateway-url", default=None, help="where receipts go: <url>/receipts/<channel>")
    s.add_argument("--receipt-delay", type=float, default=0.5, help="seconds before a receipt is sent")
    s.add_argument(
        "--segment-size",
        type=int,
        default=1_000_000,
        help="virtual users in each segment the push partner holds",
    )
    s.set_defaults(func=cmd_sandbox)

    pub = sub.add_parser(
        "publish", help="validate an advisory (JSON, YAML, or CAP 1.2 XML) and put it on the topic"
    )
    pub.add_argument("file")
    pub.add_argument("--key-file", help=f"Ed25519 private key (base64) to sign with; or ${SIGNING_KEY_ENV}")
    pub.set_defaults(func=cmd_publish)

    r = sub.add_parser("recipients", help="the recipient directory")
    rsub = r.add_subparsers(dest="action", required=True)
    ri = rsub.add_parser("import", help="import CSV or JSON Lines; bad rows are reported and skipped")
    ri.add_argument("file")
    ri.add_argument("--encoding", help="the file's encoding if not UTF-8 or UTF-16 with a BOM (e.g. cp1251)")
    ri.set_defaults(func=cmd_recipients)

    rp = sub.add_parser(
        "replay", help="re-queue the failed deliveries of an advisory (after fixing the cause)"
    )
    rp.add_argument("advisory")
    rp.add_argument("--channel", help="only this channel")
    rp.add_argument("--limit", type=int, default=1_000_000, help="at most this many")
    rp.set_defaults(func=cmd_replay)

    tk = sub.add_parser("tokens", help="API tokens: create (shown once), list, revoke")
    tsub = tk.add_subparsers(dest="action", required=True)
    tc = tsub.add_parser("create", help="a new token with roles")
    tc.add_argument("--name", required=True, help="whose token (a person or a system)")
    tc.add_argument(
        "--role", action="append", help="press, approver, operator, admin or partner:<name> (repeatable)"
    )
    tc.set_defaults(func=cmd_tokens)
    tsub.add_parser("list", help="every token, live or revoked (never the secret)").set_defaults(
        func=cmd_tokens
    )
    tr = tsub.add_parser("revoke", help="revoke a token by its id (takes effect at once)")
    tr.add_argument("id")
    tr.set_defaults(func=cmd_tokens)

    au = sub.add_parser("audit", help="the audit log: who did what, when (append-only)")
    au.add_argument("subject", nargs="?", help="one subject: an advisory (id@vN) or token:<id>")
    au.set_defaults(func=cmd_audit)

    db = sub.add_parser("db", help="the store's schema: upgrade it to this release, or show its revision")
    db.add_argument("action", choices=["upgrade", "current"])
    db.set_defaults(func=cmd_db)

    rep = sub.add_parser("report", help="per-recipient outcomes of an advisory as CSV (streamed)")
    rep.add_argument("advisory", help="the advisory id (every version)")
    rep.add_argument("--csv", action="store_true", help="CSV (the only format; kept explicit)")
    rep.add_argument(
        "--unmasked", action="store_true", help="full addresses (recorded in the audit log with who asked)"
    )
    rep.set_defaults(func=cmd_report)
    st = sub.add_parser("status", help="delivery counts per channel and status, with progress bars")
    st.add_argument("advisory", nargs="?")
    st.add_argument("--json", action="store_true", help="the counts as JSON")
    st.add_argument("--follow", action="store_true", help="redraw every second until every delivery is final")
    st.set_defaults(func=cmd_status)

    d = sub.add_parser(
        "demo", help="broker + sandbox + gateway + 10,000 recipients + one evacuation advisory"
    )
    d.add_argument("--recipients", type=int, default=10_000)
    d.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    d.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    d.set_defaults(func=cmd_demo)  # in a terminal it waits for Enter before and after: the console stays up
    dr = sub.add_parser(
        "drill", help="rehearse an outage, a crash, a cancel or an urgent advisory against the sandboxes"
    )
    dr.add_argument("scenario", choices=["outage", "crash", "cancel", "priority", "poison", "scale"])
    dr.add_argument("--recipients", type=int, default=20_000)
    dr.add_argument(
        "--channel",
        choices=["push", "sms-http", "smpp", "email"],
        default="push",
        help="the one channel every recipient is on (smpp, email: for outage and crash; duplicates are "
        "reported against the in-flight bound)",
    )
    dr.add_argument("--json", action="store_true", help="print the report as one JSON object")
    dr.add_argument("--timeout", type=float, default=300.0, help="seconds each step may take")
    dr.add_argument("--instances", type=int, default=3, help="scale: gateway processes (the last is killed)")
    dr.add_argument("--no-kill", action="store_true", help="scale: kill none (to measure N instances)")
    dr.add_argument(
        "--postgres",
        default="postgresql+asyncpg://postgres@127.0.0.1:5432/test",
        help="scale: a PostgreSQL server (URL of any database on it; the drill makes its own database)",
    )
    dr.set_defaults(func=cmd_drill)
    b = sub.add_parser(
        "bench", help="time one broadcast end to end beside the floor (a bare client) and Apprise"
    )
    b.add_argument("--recipients", type=int, default=100_000)
    b.add_argument("--channel", choices=["push", "sms-http", "email", "smpp"], default="push")
    b.add_argument("--json", action="store_true", help="print the report as one JSON object")
    b.add_argument("--chart", help="draw deliveries/s and the gateway's RSS over time to this PNG")
    b.add_argument("--profile", help="sample the gateway with py-spy; collapsed stacks to this file")
    b.add_argument(
        "--apprise", type=int, default=10_000, help="messages through Apprise (projected to N; 0: none)"
    )
    b.add_argument("--urgent", type=int, default=0, help="urgent advisories published during the bulk")
    b.add_argument("--no-floor", action="store_true", help="leave out the floor client")
    b.add_argument("--floor-only", action="store_true", help="only the floor: how much the sandbox absorbs")
    b.add_argument(
        "--planner-process",
        action="store_true",
        help="plan in a second gateway process (roles: intake); the measured one dispatches",
    )
    b.add_argument("--timeout", type=float, default=1800.0, help="seconds the broadcast may take")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, InputError) as e:
        print(f"broadcast-gateway: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
