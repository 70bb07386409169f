"""A sandbox SMSC speaking SMPP 3.4 over TCP (PDUs from aiosmpplib): binds transceivers, answers
enquire_link, takes submit_sm (reassembling UDH parts), answers submit_sm_resp, and after a delay
sends a deliver_sm receipt for every part. As an SMSC does, it keeps a receipt until the ESME answers
it (deliver_sm_resp) and delivers the unanswered ones again at the account's next bind. SMPP has no
idempotency key, so every submission counts: the same text to the same number twice is a duplicate
in /stats."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import uuid
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiosmpplib import (
    BindTransceiver,
    BindTransceiverResp,
    DeliverSm,
    EnquireLinkResp,
    PduHeader,
    SmppCommand,
    SmppCommandStatus,
    SmppMessage,
    SubmitSm,
    SubmitSmResp,
    UnbindResp,
)

from gateway.logging import get_logger
from gateway.sandbox.partner import SandboxPartner

log = get_logger(__name__)

RECEIPT = 0b00000100  # esm_class: SMSC delivery receipt


class Smsc(SandboxPartner):
    channel = "smpp"
    receipt_status = "DELIVRD"

    def __init__(self, secret: str, *args: Any, system_id: str = "gateway", **kwargs: Any) -> None:
        super().__init__(secret, *args, **kwargs)
        self.system_id = system_id
        self.password = secret[:8]  # SMPP passwords are at most 8 characters
        self.smpp_port = 0
        self.binds = 0
        self.enquire_links = 0
        self.parts_received = 0
        self.encodings: dict[str, int] = {}
        self._sessions: set[asyncio.StreamWriter] = set()
        self._bound: list[asyncio.StreamWriter] = []  # sessions that bound, oldest first
        self._held: list[DeliverSm] = []  # receipts waiting for a bind (their session had closed)
        # receipts sent on a session and not answered yet, by sequence number: held again if it closes
        self._unanswered: dict[asyncio.StreamWriter, dict[int, DeliverSm]] = {}
        self.receipts_answered = 0
        self._scheduled = 0
        self._partial: dict[tuple[str, int, int], dict[int, str]] = {}
        self._sequence = itertools.count(1)
        self._server: asyncio.base_events.Server | None = None

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/control/smpp/drop", self.drop), *super().routes()]

    def stats(self, since: float | None = None) -> dict[str, Any]:
        return {
            **super().stats(since),
            "smpp_port": self.smpp_port,
            "binds": self.binds,
            "enquire_links": self.enquire_links,
            "parts": self.parts_received,
            "encodings": dict(sorted(self.encodings.items())),
            "receipts_held": len(self._held),
            "receipts_answered": self.receipts_answered,  # deliver_sm_resp taken
            "receipts_unanswered": sum(len(u) for u in self._unanswered.values()),
            "receipts_pending": self._scheduled,  # receipts whose delay has not run out yet
        }

    async def start_smpp(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve_session, host, port)
        self.smpp_port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._sessions):
            writer.close()
        await super().stop()

    async def drop(self, _: web.Request) -> web.Response:
        """Cut every SMPP connection (the gateway must reconnect and bind again)."""
        dropped = len(self._sessions)
        for writer in list(self._sessions):
            writer.close()
        return web.json_response({"dropped": dropped})

    async def _serve_session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._sessions.add(writer)
        try:
            while True:
                head = await reader.readexactly(16)
                header = SmppMessage.parse_header(head)
                pdu = head + await reader.readexactly(header.pdu_length - 16)
                await self._on_pdu(pdu, header, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._sessions.discard(writer)
            if writer in self._bound:
                self._bound.remove(writer)
            self._held += self._unanswered.pop(writer, {}).values()  # for the next bind
            writer.close()

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, message: SmppMessage) -> None:
        if not writer.is_closing():
            writer.write(message.pdu())
            await writer.drain()

    async def _on_pdu(self, pdu: bytes, header: PduHeader, writer: asyncio.StreamWriter) -> None:
        command = header.smpp_command
        if command == SmppCommand.BIND_TRANSCEIVER:
            bind = BindTransceiver.from_pdu(pdu, header)
            ok = bind.system_id == self.system_id and bind.password == self.password
            self.binds += ok
            status = SmppCommandStatus.ESME_ROK if ok else SmppCommandStatus.ESME_RINVPASWD
            await self._write(writer, BindTransceiverResp(header.sequence_num, status, system_id="sandbox"))
            if ok:
                self._bound.append(writer)
                held, self._held = self._held, []
                for dlr in held:  # as an SMSC does: receipts kept for the account's next bind
                    await self._deliver(writer, dlr)
        elif command == SmppCommand.DELIVER_SM_RESP:
            if self._unanswered.get(writer, {}).pop(header.sequence_num, None) is not None:
                self.receipts_answered += 1
        elif command == SmppCommand.ENQUIRE_LINK:
            self.enquire_links += 1
            await self._write(writer, EnquireLinkResp(header.sequence_num))
        elif command == SmppCommand.UNBIND:
            await self._write(writer, UnbindResp(header.sequence_num))
            writer.close()
        elif command == SmppCommand.SUBMIT_SM:
            # answered in its own task: a slow answer (latency fault) must not stop the reading
            asyncio.get_running_loop().create_task(self._on_submit(pdu, header, writer))

    async def _on_submit(self, pdu: bytes, header: PduHeader, writer: asyncio.StreamWriter) -> None:
        with self.open_request():
            self.requests += 1
            fault = self.faults.take()
            if fault is not None:
                if fault.latency_s:
                    await asyncio.sleep(fault.latency_s)
                if fault.hang:
                    return  # never answered
                if fault.status is not None:
                    status = (
                        SmppCommandStatus.ESME_RTHROTTLED
                        if fault.status == 429
                        else SmppCommandStatus.ESME_RSYSERR
                        if fault.status >= 500
                        else SmppCommandStatus.ESME_RINVDSTADR
                    )
                    await self._write(writer, SubmitSmResp(header.sequence_num, status))
                    return
            sm = SubmitSm.from_pdu(pdu, header, "gsm0338")
            message_id = uuid.uuid4().hex[:20]
            await self._write(writer, SubmitSmResp(header.sequence_num, message_id=message_id))
        self.parts_received += 1
        self._reassemble(sm)
        if sm.registered_delivery:
            self._scheduled += 1
            asyncio.get_running_loop().call_later(
                self.receipt_delay_s,
                lambda: asyncio.ensure_future(self._receipt(writer, sm, message_id)),
            )

    def _reassemble(self, sm: SubmitSm) -> None:
        ref, seq, total = sm.get_segmentation_data() if sm.is_segmented() else (0, 1, 1)
        key = (sm.destination.number, ref, total)
        parts = self._partial.setdefault(key, {})
        parts[seq] = sm.short_message
        if len(parts) < total:
            return
        del self._partial[key]
        text = "".join(parts[i] for i in range(1, total + 1))
        encoding = sm.encoding or "gsm0338"
        self.encodings[encoding] = self.encodings.get(encoding, 0) + 1
        # no idempotency in SMPP: the same text to the same number again is a duplicate
        self.count("+" + sm.destination.number, hashlib.sha256(text.encode()).hexdigest()[:12], encoding)

    async def _receipt(self, writer: asyncio.StreamWriter, sm: SubmitSm, message_id: str) -> None:
        self._scheduled -= 1
        now = datetime.now(UTC)
        text = DeliverSm.encode_receipt(
            {
                "id": message_id,
                "sub": 1,
                "dlvrd": 1,
                "submit date": now,
                "done date": now,
                "stat": self.receipt_status,
                "err": 0,
                "text": "",
            }
        )
        dlr = DeliverSm(
            sequence_num=next(self._sequence),
            short_message=text,
            source=sm.destination,
            destination=sm.source,
            esm_class=RECEIPT,
            registered_delivery=0,
        )
        await self._deliver(writer, dlr)

    async def _deliver(self, writer: asyncio.StreamWriter, dlr: DeliverSm) -> None:
        """On the submitting session if it is open, else on another bound one, else held for the
        next bind."""
        open_ = [w for w in (writer, *reversed(self._bound)) if not w.is_closing() and w in self._bound]
        if not open_:
            self._held.append(dlr)
            return
        session = open_[0]
        self._unanswered.setdefault(session, {})[dlr.sequence_num] = dlr
        try:
            await self._write(session, dlr)
            self.receipts_sent += 1
        except ConnectionError:
            self._unanswered.get(session, {}).pop(dlr.sequence_num, None)
            self._held.append(dlr)
