"""In-process mail and SNMP trap receivers for the lab: what fencer's notifiers reached.

Rule: both receivers only record what arrived, as it arrived; they never answer differently by
content. They run inside the lab's process (no Debian package needed), so `fencer demo` works on
a fresh machine: aiosmtpd for mail, and a UDP endpoint that decodes SNMPv2c notifications with
pysnmp's protocol modules and names FENCER-MIB's objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope
from pyasn1.codec.ber import decoder
from pysnmp.proto import api

from notifiers.render import KINDS, NOTIFICATIONS_OID, OBJECT_NUMBERS, OBJECTS_OID

SNMP_TRAP_OID = (1, 3, 6, 1, 6, 3, 1, 1, 4, 1, 0)
_OBJECT_NAMES = {n: name for name, n in OBJECT_NUMBERS.items()}
_NOTIFICATION_NAMES = {n: kind.value for kind, (_label, _sev, n) in KINDS.items()}


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Mail:
    """One message the mail receiver accepted."""

    at: float
    sender: str
    to: tuple[str, ...]
    subject: str
    body: str


class _Handler:
    def __init__(self, receiver: MailReceiver) -> None:
        self.receiver = receiver

    async def handle_DATA(self, server: object, session: object, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content or b""
        msg = email.message_from_bytes(
            raw if isinstance(raw, bytes) else raw.encode(), policy=email.policy.default
        )
        part = msg.get_body(("plain",)) if msg.is_multipart() else msg
        body = part.get_content() if part is not None else ""
        self.receiver.mails.append(
            Mail(
                time.time(),
                envelope.mail_from or "",
                tuple(envelope.rcpt_tos),
                str(msg.get("Subject", "")),
                str(body),
            )
        )
        return "250 OK"


class MailReceiver:
    """An aiosmtpd server on 127.0.0.1 (its own thread) that keeps every message."""

    def __init__(self) -> None:
        self.mails: list[Mail] = []
        self.port = 0
        self._controller: Controller | None = None

    def start(self) -> MailReceiver:
        """Listen on a free port."""
        self.port = _free_port()
        self._controller = Controller(_Handler(self), hostname="127.0.0.1", port=self.port)
        self._controller.start()
        return self

    def stop(self) -> None:
        """Stop listening; idempotent."""
        if self._controller is not None:
            with contextlib.suppress(Exception):
                self._controller.stop()
            self._controller = None


@dataclass(frozen=True)
class Trap:
    """One SNMP notification: its FENCER-MIB kind and the varbinds by object name."""

    at: float
    kind: str
    version: str
    community: str
    varbinds: dict[str, Any] = field(default_factory=dict)


def _value(v: Any) -> Any:
    try:
        return int(v)
    except (TypeError, ValueError):
        pass
    try:
        return bytes(v).decode("utf-8", "replace")
    except (TypeError, ValueError):
        return str(v.prettyPrint())


def decode_notification(data: bytes) -> list[Trap]:
    """The SNMPv1/v2c notifications in one datagram (v3 is not decoded: the lab sends v2c)."""
    traps = []
    now = time.time()
    while data:
        version = int(api.decodeMessageVersion(data))
        pmod = api.PROTOCOL_MODULES[version]
        msg, data = decoder.decode(data, asn1Spec=pmod.Message())
        pdu = pmod.apiMessage.get_pdu(msg)
        community = bytes(pmod.apiMessage.get_community(msg)).decode("utf-8", "replace")
        kind, binds = "unknown", {}
        for oid, val in pmod.apiPDU.get_varbinds(pdu):
            o = tuple(oid)
            if o == SNMP_TRAP_OID:
                t = tuple(val)
                if t[: len(NOTIFICATIONS_OID)] == NOTIFICATIONS_OID:
                    kind = _NOTIFICATION_NAMES.get(t[-1], str(t))
            elif o[: len(OBJECTS_OID)] == OBJECTS_OID and len(o) > len(OBJECTS_OID):
                name = _OBJECT_NAMES.get(o[len(OBJECTS_OID)], ".".join(map(str, o)))
                binds[name] = _value(val)
        traps.append(Trap(now, kind, "v2c" if version == 1 else "v1", community, binds))
    return traps


class _TrapProtocol(asyncio.DatagramProtocol):
    def __init__(self, receiver: TrapReceiver) -> None:
        self.receiver = receiver

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.receiver.traps.extend(decode_notification(data))
        except Exception as exc:  # junk on the port is recorded, never raised into the loop
            self.receiver.errors.append(f"{type(exc).__name__}: {exc}")


class TrapReceiver:
    """A UDP SNMP notification receiver on 127.0.0.1 in the running event loop."""

    def __init__(self) -> None:
        self.traps: list[Trap] = []
        self.errors: list[str] = []
        self.port = 0
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self) -> TrapReceiver:
        """Listen on a free UDP port."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _TrapProtocol(self), local_addr=("127.0.0.1", 0)
        )
        self._transport = transport
        self.port = transport.get_extra_info("sockname")[1]
        return self

    def stop(self) -> None:
        """Stop listening; idempotent."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None
