"""SMS over SMPP 3.4 as a transceiver (aiosmpplib's ESME: bind, enquire_link keep-alive, reconnect
with backoff, correlation of responses and receipts).

We choose the encoding (GSM-7 = data_coding 0, UCS-2 = 8) and cut long messages into UDH
concatenated parts ourselves (``channels.sms.udh_segments``: extension characters count two septets,
emoji are never split); each part is one submit_sm. At most ``window`` submit_sm wait for their
response at once; ``rate_per_s`` is the TPS limit, per PDU. A message is accepted when every part
is; its partner id is the SMSC message id of its last part, and the last part's deliver_sm receipt
(``id:… stat:DELIVRD|UNDELIV|EXPIRED|REJECTD|DELETED|UNKNOWN…``) decides its delivery status — a
handset shows a concatenated message only once every part has arrived.

A deliver_sm is answered (deliver_sm_resp) only once its receipt is stored: an SMSC delivers an
unanswered one again at the next bind, so a crash loses none. The receipts are stored in batches by
a task of their own, and their answers go out after each batch; the session goes on reading
meanwhile. (aiosmpplib answers a deliver_sm as soon as its hook returns: storing each receipt in the
hook stopped the session's reading for a write of one receipt, submit_sm_resp included — at 20,000
SMS the channel ran at ~600/s.)

SMPP has no idempotency key: a message resent after a crash is a second SMS. That replay is bounded
by what was in flight (``window``), and is chosen over a missing evacuation message.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from aiosmpplib import (
    ESME,
    NPI,
    TON,
    AbstractBroker,
    AbstractHook,
    DeliverSm,
    DeliverSmResp,
    GenericNack,
    PhoneNumber,
    SmppCommandStatus,
    SmppMessage,
    SubmitSm,
    SubmitSmResp,
)
from aiosmpplib.correlator import SimpleCorrelator
from aiosmpplib.log import StructuredLogger
from aiosmpplib.ratelimiter import SimpleRateLimiter
from aiosmpplib.throttle import AbstractThrottleHandler
from pydantic import Field, SecretStr

from channels.base import Message, Receipt, Result, required_secret
from channels.pacing import Slots
from channels.sms import DLR_STATUS, SmsAdapter, SmsSettings, udh_segments
from gateway.errors import SchemaError
from gateway.logging import get_logger

log = get_logger(__name__)

# submit_sm_resp statuses worth another try; any other error is permanent for that message
RETRY_STATUSES = frozenset(
    {
        SmppCommandStatus.ESME_RTHROTTLED,
        SmppCommandStatus.ESME_RMSGQFUL,
        SmppCommandStatus.ESME_RSYSERR,
        SmppCommandStatus.ESME_RSUBMITFAIL,
    }
)
UDHI = 0b01000000
MESSAGE_ID_MAX = 65  # SMPP 3.4's message_id: a C-Octet String of at most 65 octets


class SmppSettings(SmsSettings):
    host: str = "127.0.0.1"
    port: int = Field(2775, ge=1, le=65535)
    system_id: str = Field("gateway", max_length=15)
    system_type: str = Field("", max_length=12)
    password: SecretStr | None = None
    password_file: Path | None = None
    window: int = Field(10, ge=1, le=1000)  # submit_sm awaiting their response, at most
    enquire_link_s: float = Field(30.0, gt=0)
    # after an ESME_RTHROTTLED answer the session pauses this long, doubled for each throttled
    # answer in a row up to throttle_pause_max_s; the first answer that is not throttled ends it
    throttle_pause_s: float = Field(0.1, gt=0)
    throttle_pause_max_s: float = Field(5.0, gt=0)
    # deliver_sm receipts stored at once at most, and waiting to be stored at most (then the session
    # stops reading until there is room)
    receipts_batch: int = Field(500, ge=1, le=10_000)


class _Queue(AbstractBroker):
    """The ESME's outgoing queue, bounded: ``enqueue`` waits when the SMSC falls behind."""

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[SmppMessage] = asyncio.Queue(maxsize=size)

    async def enqueue(self, message: SmppMessage) -> None:
        await self.queue.put(message)

    async def dequeue(self) -> SmppMessage:
        return await self.queue.get()


class _Hook(AbstractHook):
    def __init__(self, adapter: SmppAdapter) -> None:
        self.adapter = adapter

    async def sending(self, smpp_message: SmppMessage, pdu: bytes, client_id: str) -> None:
        return None

    async def received(self, smpp_message: SmppMessage | None, pdu: bytes, client_id: str) -> None:
        await self.adapter.on_pdu(smpp_message, int.from_bytes(pdu[12:16], "big"))

    async def send_error(self, smpp_message: SmppMessage, error: Exception, client_id: str) -> None:
        self.adapter.on_send_error(smpp_message, error)


class _Correlator(SimpleCorrelator):
    """aiosmpplib's in-memory correlator, whose expiry walked every stored item on every PDU sent or
    received: quadratic in the messages awaiting a receipt (kept 3 days). At 20,000 SMS it was 14 %
    of the gateway's samples; at a million it would be the whole. Items go in in time order with
    one lifetime per store, so expiry reads from the oldest and stops at the first that is still
    young; the stores are ordered dicts, whose oldest is found in one step however many went before
    it (a plain dict's iteration steps over the holes its deletions left)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        for store in (self._store, self._delivery_store, self._delivery_segment_store):
            store._data = OrderedDict()  # no directory: nothing is persisted, _data is all there is

    async def _remove_expired(self) -> None:
        now = time.monotonic()
        while self._store:
            key = next(iter(self._store))
            stored_at, message = self._store[key]
            if now - stored_at <= self.max_ttl_response:
                break
            del self._store[key]
            await self.expired(message)
        for store in (self._delivery_store, self._delivery_segment_store):
            while store:
                key = next(iter(store))
                if now - store[key][0] <= self.max_ttl_delivery:
                    break
                del store[key]


class _Throttle(AbstractThrottleHandler):
    """An SMSC's ESME_RTHROTTLED slows the session down for a moment, not for minutes: a pause of
    ``pause_s`` after a throttled answer, doubled for each one in a row up to ``max_s``; any other
    answer ends the pausing. (aiosmpplib's own handler stopped sending once more than 1 % of the
    answers of its 180 s window were throttled, until that window ran out: 20 throttled answers in
    an outage drill held 2,000 SMS for 176 s. The throttled message itself is retried by dispatch.)"""

    def __init__(self, pause_s: float, max_s: float) -> None:
        self.pause_s = pause_s
        self.max_s = max(max_s, pause_s)
        self._in_a_row = 0
        self._until = 0.0

    async def throttled(self) -> None:
        self._until = time.monotonic() + min(self.max_s, self.pause_s * 2**self._in_a_row)
        self._in_a_row = min(self._in_a_row + 1, 30)

    async def not_throttled(self) -> None:
        self._in_a_row = 0
        self._until = 0.0

    async def allow_request(self) -> bool:
        return time.monotonic() >= self._until

    async def throttle_delay(self) -> float:
        return max(0.0, self._until - time.monotonic())


class _Receipts:
    """deliver_sm receipts waiting to be stored, each with what answers it: the sequence number of its
    deliver_sm and the connection it came on (an answer for a closed connection is not sent: its
    SMSC delivers the receipt again)."""

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[tuple[Receipt, int, object]] = asyncio.Queue(maxsize=size)
        self.unanswered: set[int] = set()  # their deliver_sm_resp, kept back until they are stored

    async def add(self, receipt: Receipt, sequence_num: int, connection: object) -> None:
        await self.queue.put((receipt, sequence_num, connection))
        # after the put and before the hook returns, with no await between: aiosmpplib's answer,
        # sent next in the same task, finds the number here (_Esme._send_data)
        self.unanswered.add(sequence_num)

    async def take(self, limit: int) -> list[tuple[Receipt, int, object]]:
        batch = [await self.queue.get()]
        while len(batch) < limit and not self.queue.empty():
            batch.append(self.queue.get_nowait())
        return batch


class _Esme(ESME):
    receipts: _Receipts | None = None

    async def _send_data(self, smpp_message: SmppMessage) -> None:
        """The answer to a deliver_sm whose receipt is still to be stored is kept back (``answer``
        sends it once it is)."""
        if (
            isinstance(smpp_message, DeliverSmResp)
            and self.receipts is not None
            and smpp_message.sequence_num in self.receipts.unanswered
        ):
            self.receipts.unanswered.discard(smpp_message.sequence_num)
            return
        await super()._send_data(smpp_message)

    @property
    def connection(self) -> object:
        return self._writer

    async def answer(self, sequence_nums: Sequence[int], connection: object) -> None:
        """deliver_sm_resp for receipts now stored, on the connection they came on if it is still
        open: written at once (aiosmpplib writes each PDU on its own, a system call each)."""
        writer = self._writer
        if sequence_nums and connection is not None and connection is writer:
            assert isinstance(writer, asyncio.StreamWriter)
            writer.write(b"".join(DeliverSmResp(n).pdu() for n in sequence_nums))
            async with self._drain_lock:
                await writer.drain()

    async def connect(self) -> None:
        # aiosmpplib replaces a dropped connection's writer without closing it: close it first
        old: asyncio.StreamWriter | None = self._writer
        if old is not None and self._session_state != self.bind_mode.session_state:
            old.close()
        await super().connect()


class SmppAdapter(SmsAdapter):
    name = "smpp"
    idempotent = False  # no idempotency key on the wire: dispatch claims before sending
    receipts_by_partner_id = True  # after a restart a deliver_sm names only the SMSC's message id
    max_batch = 50
    settings_model = SmppSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = self.smpp_settings
        self._password = required_secret(f"channels.{self.channel}.password", s.password, s.password_file)
        self._esme: _Esme | None = None
        self._runner: asyncio.Task[None] | None = None
        self._queue = _Queue(s.window * 2)
        self._window = Slots(s.window)
        self._waiting: dict[str, asyncio.Future[SmppMessage]] = {}
        self._receipts = _Receipts(s.receipts_batch)
        self._storing: asyncio.Task[None] | None = None

    @property
    def smpp_settings(self) -> SmppSettings:
        return cast(SmppSettings, self.settings)

    def _start(self) -> None:
        if self._runner is not None:
            return
        s = self.smpp_settings
        quiet = StructuredLogger(f"aiosmpplib.{self.channel}", level=logging.WARNING)
        self._esme = _Esme(
            smsc_host=s.host,
            smsc_port=s.port,
            system_id=s.system_id,
            password=self._password,
            system_type=s.system_type,
            client_id=self.channel,
            enquire_link_interval=s.enquire_link_s,
            log_level=logging.WARNING,
            hook=_Hook(self),
            broker=self._queue,
            correlator=_Correlator(s.system_id),
            throttle_handler=_Throttle(s.throttle_pause_s, s.throttle_pause_max_s),
            rate_limiter=SimpleRateLimiter(quiet, send_rate=s.rate_per_s),
            socket_timeout=s.timeout_s,
        )
        self._esme.receipts = self._receipts
        self._runner = asyncio.create_task(self._esme.start(), name=f"smpp-{self.channel}")
        self._storing = asyncio.create_task(self._store_receipts(), name=f"smpp-receipts-{self.channel}")

    async def _send(self, batch: Sequence[Message]) -> list[Result]:
        self._start()
        return list(await asyncio.gather(*(self._submit(m) for m in batch)))

    async def _submit(self, m: Message) -> Result:
        encoding, segments = udh_segments(m.parts["body"], reference=random.randrange(256))
        total = len(segments)
        keys = [f"{m.delivery_id}#{seq}/{total}" for seq in range(1, total + 1)]
        loop = asyncio.get_running_loop()
        try:
            for key, segment in zip(keys, segments, strict=True):
                await self._window.acquire(m.priority)  # urgent SMS take the next free place
                self._waiting[key] = loop.create_future()
                self._waiting[key].add_done_callback(lambda _: self._window.release())
                sm = SubmitSm(
                    short_message=m.parts["body"],  # not sent: the pre-encoded segment is
                    source=PhoneNumber(self.smpp_settings.sender, TON.ALPHANUMERIC, NPI.UNKNOWN),
                    destination=PhoneNumber(m.address.lstrip("+"), TON.INTERNATIONAL, NPI.ISDN),
                    esm_class=UDHI if len(segments) > 1 else 0,
                    registered_delivery=1,
                    validity_period=m.expires_at,
                    encoding="gsm0338" if encoding == "gsm7" else "ucs2",
                    log_id=key,
                    auto_message_payload=True,  # the ESME must not split again
                )
                sm.set_encoded_message(segment)
                await self._queue.enqueue(sm)
            async with asyncio.timeout(self.settings.timeout_s):
                responses = [await self._waiting[k] for k in keys]
        except TimeoutError:
            return Result(
                m.delivery_id, "retry", reason="no submit_sm_resp in time (SMSC unreachable or slow)"
            )
        except ConnectionError as e:
            return Result(m.delivery_id, "retry", reason=f"SMSC connection failed: {e}")
        finally:
            for k in keys:
                fut = self._waiting.pop(k, None)
                if fut is not None and not fut.done():
                    fut.cancel()
        return self._result(m.delivery_id, responses)

    @staticmethod
    def _result(delivery_id: str, responses: Sequence[SmppMessage]) -> Result:
        for r in responses:
            status = r.command_status
            if status != SmppCommandStatus.ESME_ROK:
                outcome = "retry" if status in RETRY_STATUSES or isinstance(r, GenericNack) else "rejected"
                return Result(delivery_id, outcome, reason=f"SMSC answered {status.name}")  # type: ignore[arg-type]
        last = cast(SubmitSmResp, responses[-1])
        return Result(delivery_id, "accepted", partner_id=last.message_id)

    async def on_pdu(self, message: SmppMessage | None, sequence_num: int = 0) -> None:
        """A PDU the SMSC sent (``sequence_num``: its header's, which a deliver_sm's answer names)."""
        if isinstance(message, SubmitSmResp | GenericNack):
            fut = self._waiting.get(message.log_id)
            if fut is not None and not fut.done():
                fut.set_result(message)
        elif isinstance(message, DeliverSm) and message.is_receipt():
            await self._on_receipt(message, sequence_num)

    def on_send_error(self, message: SmppMessage, error: Exception) -> None:
        fut = self._waiting.get(getattr(message, "log_id", ""))
        if fut is not None and not fut.done():
            fut.set_exception(ConnectionError(f"{type(error).__name__}: {error}"))

    @staticmethod
    def receipt_of(dlr: DeliverSm) -> Receipt | None:
        """The receipt a deliver_sm carries, or None (not final, unknown, or not the last part: the
        last part speaks for the message). SchemaError if its text cannot be read."""
        try:
            receipt = dlr.parse_receipt()  # raises ValueError on "sub:abc" or a bad date
        except Exception as e:  # an SMSC's text, whatever the parser raises
            raise SchemaError(f"deliver_sm: malformed receipt text: {type(e).__name__}: {e}") from e
        stat = str(receipt.get("stat", "")).upper()
        message_id = str(receipt.get("id", ""))
        if len(message_id) > MESSAGE_ID_MAX:  # stored as the partner id: a store would refuse it
            raise SchemaError(
                f"deliver_sm: message id of {len(message_id)} characters (at most {MESSAGE_ID_MAX})"
            )
        delivery_id, _, part = dlr.log_id.partition("#")
        seq, _, total = part.partition("/")
        status = DLR_STATUS.get(stat)
        if status is None or seq != total:
            return None
        # without a log id (the gateway restarted since it sent), the store finds it by SMSC id
        return Receipt(delivery_id, status, message_id)

    async def _on_receipt(self, dlr: DeliverSm, sequence_num: int) -> None:
        """A receipt to store goes to ``_store_receipts``, and its deliver_sm is answered once it is
        stored; one with nothing to store (not final, not the last part, unreadable) is answered at
        once."""
        try:
            found = self.receipt_of(dlr)
        except SchemaError as e:
            log.warning("smpp.receipt_malformed", channel=self.channel, reason=str(e))
            return
        if found is not None and self.receipt_sink is not None and self._esme is not None:
            await self._receipts.add(found, sequence_num, self._esme.connection)

    async def _store_receipts(self) -> None:
        """Receipts stored a batch at a time (as many as came while the last batch was written), then
        their deliver_sm answered. A store that fails is tried again; nothing is answered meanwhile,
        and a receipt whose connection has closed is delivered again by the SMSC."""
        while True:
            batch = await self._receipts.take(self.smpp_settings.receipts_batch)
            for attempt in itertools.count():
                try:
                    if self.receipt_sink is not None:  # it was when they were taken (_on_receipt)
                        await self.receipt_sink([r for r, _, _ in batch])
                    break
                except Exception as e:  # the store: tried again, the receipts kept unanswered
                    log.warning(
                        "smpp.receipts_retrying", channel=self.channel, error=f"{type(e).__name__}: {e}"
                    )
                    await asyncio.sleep(min(0.1 * 2**attempt, 5.0))
            by_connection: dict[int, tuple[object, list[int]]] = {}
            for _, sequence_num, connection in batch:
                by_connection.setdefault(id(connection), (connection, []))[1].append(sequence_num)
            for connection, sequence_nums in by_connection.values():
                with contextlib.suppress(Exception):  # a connection gone: the SMSC delivers them again
                    if self._esme is not None:
                        await self._esme.answer(sequence_nums, connection)

    async def close(self) -> None:
        if self._esme is not None:
            # ESME.stop() unbinds and half-closes but never closes its socket: close it ourselves
            writer: asyncio.StreamWriter | None = getattr(self._esme, "_writer", None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._esme.stop(), 5)
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
        if self._storing is not None:
            self._storing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._storing
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
