"""SNMP channel: FENCER-MIB notifications as v2c traps/informs or v3 (USM) traps/informs, one
channel per receiver, sent with pysnmp's v3arch asyncio API.

Rule: every send uses a NEW `SnmpEngine` that is configured with exactly one receiver and one set
of credentials, then closed. pysnmp 7.1 accumulates target and credential configuration in a
reused engine; an engine that once sent v2c to a receiver then sends a later v3 notification to
it twice, once as v3 and once as plaintext v2c (see shared/research/feasibility-peers.md §2).
An engine per send makes that impossible and costs about 45 ms.

The engine id is fixed (settings `snmp.engine_id`, else derived from the host name) so a v3 TRAP
receiver can be told it (`createUser -e <id>`); pysnmp persists snmpEngineBoots per engine id in
the temp directory and increments it for every engine, which keeps the receiver's timeliness
check satisfied.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from importlib.resources import files
from pathlib import Path
from typing import Any

from pysnmp.hlapi.v3arch.asyncio import (
    USM_AUTH_HMAC96_MD5,
    USM_AUTH_HMAC96_SHA,
    USM_AUTH_HMAC192_SHA256,
    USM_AUTH_HMAC384_SHA512,
    USM_PRIV_CBC56_DES,
    USM_PRIV_CFB128_AES,
    USM_PRIV_CFB256_AES,
    CommunityData,
    ContextData,
    NotificationType,
    ObjectIdentity,
    ObjectType,
    SnmpEngine,
    UdpTransportTarget,
    UsmUserData,
    send_notification,
)
from pysnmp.proto.rfc1902 import Integer32, OctetString, Unsigned32
from pysnmp.smi.builder import MibBuilder
from pysnmp.smi.view import MibViewController

from fencing.settings import SnmpReceiver, SnmpSettings
from notifiers.channel import AuthenticationFailed, DeliveryFailed
from notifiers.render import FENCER_OID, Message, SnmpContent, Varbind, render_snmp

AUTH_PROTOCOLS = {
    "SHA": USM_AUTH_HMAC96_SHA,
    "SHA256": USM_AUTH_HMAC192_SHA256,
    "SHA512": USM_AUTH_HMAC384_SHA512,
    "MD5": USM_AUTH_HMAC96_MD5,
}
PRIV_PROTOCOLS = {
    "AES": USM_PRIV_CFB128_AES,
    "AES256": USM_PRIV_CFB256_AES,
    "DES": USM_PRIV_CBC56_DES,
}

# pysnmp's errorIndication names that mean "your credentials are wrong": retrying cannot help.
_AUTH_ERRORS = ("WrongDigest", "UnknownUserName", "DecryptionError", "UnsupportedSecLevel")

_ENGINE_ID_FORMAT_TEXT = 4  # RFC 3411 SnmpEngineID format 4: administratively assigned text


def mib_file() -> Path:
    """FENCER-MIB as installed with the package (for `snmptrapd -M +<its dir> -m +FENCER-MIB`)."""
    return Path(str(files("notifiers") / "mibs" / "FENCER-MIB.txt"))


def default_engine_id(hostname: str | None = None) -> str:
    """An RFC 3411 text-format engine id under the project's PEN: stable per machine."""
    pen = FENCER_OID[-1]
    text = f"fencer@{hostname or socket.gethostname()}".encode()[:27]
    return f"{0x80000000 | pen:08x}{_ENGINE_ID_FORMAT_TEXT:02x}{text.hex()}"


def engine_id_hex(settings: SnmpSettings) -> str:
    """The configured engine id as bare hex, or the default."""
    raw = (settings.engine_id or default_engine_id()).lower().removeprefix("0x")
    try:
        size = len(bytes.fromhex(raw))
    except ValueError:
        raise ValueError(f"snmp.engine_id: not hex: {settings.engine_id!r}") from None
    if not 5 <= size <= 32:
        raise ValueError(f"snmp.engine_id: must be 5 to 32 octets, got {size}")
    return raw


def _value(vb: Varbind) -> Any:
    if vb.syntax == "octets":
        return OctetString(str(vb.value).encode())
    if vb.syntax == "unsigned":
        return Unsigned32(int(vb.value))
    return Integer32(int(vb.value))


@functools.cache
def _load_mibs_once() -> None:
    # pysnmp loads its MIB modules synchronously when the first engine of a process is made
    # (~0.3 s, longer under load): pay it when the channel is built, never in the middle of a
    # fence. Later engines cost ~45 ms each (see the module docstring).
    SnmpEngine()


class SnmpChannel:
    """Sends each notification to one receiver (a trap or an inform, v2c or v3)."""

    def __init__(
        self, receiver: SnmpReceiver, engine_id: str, *, timeout: float = 2.0, retries: int = 1
    ) -> None:
        self.receiver = receiver
        self.engine_id = engine_id
        self.timeout = timeout  # informs only: how long to wait for the acknowledgement
        self.retries = retries
        r = receiver
        self.name = f"snmp {r.version} {r.notify_type} {r.host}:{r.port}"
        _load_mibs_once()

    def _auth(self) -> CommunityData | UsmUserData:
        r = self.receiver
        if r.version == "v2c":
            # v2c is the operator's choice per receiver; v3 is offered beside it.
            return CommunityData(r.community.get_secret_value(), mpModel=1)  # noqa: S508
        assert r.user and r.auth_key and r.priv_key  # the settings model guarantees it for v3
        return UsmUserData(
            r.user,
            r.auth_key.get_secret_value(),
            r.priv_key.get_secret_value(),
            authProtocol=AUTH_PROTOCOLS[r.auth_protocol],
            privProtocol=PRIV_PROTOCOLS[r.priv_protocol],
        )

    async def send(self, message: Message) -> None:
        """Render and send one notification; raise `NotifyError` on any failure."""
        await self.send_content(render_snmp(message))

    def _prepare(self, content: SnmpContent) -> tuple[SnmpEngine, NotificationType]:
        """A fresh engine and the notification resolved with its MIB view (CPU only)."""
        engine = SnmpEngine(snmpEngineID=OctetString(hexValue=self.engine_id))
        view = MibViewController(MibBuilder())
        # pysnmp's send_notification looks the view up here; present, it is not built again.
        engine.cache["mibViewController"] = view
        notification = NotificationType(ObjectIdentity(content.notification_oid)).add_varbinds(
            *(ObjectType(ObjectIdentity(vb.oid), _value(vb)) for vb in content.varbinds)
        )
        return engine, notification.resolve_with_mib(view, ignoreErrors=False)

    async def send_content(self, content: SnmpContent) -> None:
        """Send already rendered varbinds through a fresh engine (see the module docstring)."""
        r = self.receiver
        where = f"snmp: receiver {r.host}:{r.port}"
        # Building an engine and resolving the varbinds against its MIB view loads MIB modules:
        # 50-250 ms of CPU per send. Done in a thread, so a notification never stalls the
        # worker's event loop (and the fencing agents on it).
        engine, notification = await asyncio.to_thread(self._prepare, content)
        try:
            try:
                target = await UdpTransportTarget.create(
                    (r.host, r.port), timeout=self.timeout, retries=self.retries
                )
            except Exception as exc:
                raise DeliveryFailed(f"{where}: cannot resolve or open: {exc}") from None
            error, status, index, _ = await send_notification(
                engine, self._auth(), target, ContextData(), r.notify_type, notification
            )
        finally:
            engine.close_dispatcher()
        if error:
            name = type(error).__name__
            if name in _AUTH_ERRORS:
                raise AuthenticationFailed(f"{where}: {r.version} {r.notify_type} refused: {error}")
            raise DeliveryFailed(f"{where}: {r.notify_type} failed: {error}")
        if status:
            raise DeliveryFailed(f"{where}: {r.notify_type} error status {status} at {index}")


def snmp_channels(settings: SnmpSettings) -> list[SnmpChannel]:
    """One channel per configured receiver, sharing the fixed engine id."""
    eid = engine_id_hex(settings)
    return [SnmpChannel(r, eid) for r in settings.receivers]
