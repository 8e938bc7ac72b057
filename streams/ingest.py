"""CloudStack's event bus -> host signals.

Rule: one parsed event bus record (streams.parser) becomes at most one host signal, completed
with the host's cluster and address from the `HostDirectory` the poller fills, else from the
inventory; a record fencer cannot use becomes a dead-letter reason. Nothing here decides.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fencing.events import HostStatus
from fencing.records import HostRef, HostSignal
from streams import parser
from streams.poller import DOWN_STATES, HostDirectory

log = logging.getLogger("fencer.streams")


@dataclass
class Ingest:
    """Maps event bus records to host signals; host lookups through `inventory()`."""

    inventory: Callable[[], Any]
    directory: HostDirectory

    async def signal(self, message: Any) -> tuple[HostSignal | None, str | None]:
        """A CloudStack event bus record as a host signal, or a dead-letter reason, or neither."""
        parsed = parser.parse_record(message.key, message.value)
        if isinstance(parsed, parser.Rejected):
            return None, parsed.reason
        # The signal's time is this worker's clock on arrival: CloudStack's own event time (the
        # management server's clock) is shown, never compared with the poller's times (rule 1).
        at = time.time()
        reported_at = getattr(parsed, "at", None)
        kind: str | None = None
        status: HostStatus | None = None
        if isinstance(parsed, parser.HostDisconnectedAlert):
            kind, status = "disconnected", HostStatus.DISCONNECTED
        elif isinstance(parsed, parser.HostDownAlert):
            kind, status = "disconnected", HostStatus.DOWN
        elif isinstance(parsed, parser.HostAlertStateAlert):
            kind, status = "disconnected", HostStatus.ALERT
        elif isinstance(parsed, parser.MaintenancePrepare) and parsed.status == "Completed":
            kind = "maintenance_started"
        elif isinstance(parsed, parser.MaintenancePrepare) and parsed.status in (
            "Scheduled",
            "Started",
        ):
            kind = "maintenance_started"
        elif isinstance(parsed, parser.MaintenanceCancel) and parsed.status == "Completed":
            kind = "maintenance_ended"
        if kind is None:
            return None, None
        uuid = getattr(parsed, "host_uuid", None)
        name = getattr(parsed, "host_name", None)
        if uuid is None and name:
            uuid = await self.resolve_name(name)
        if uuid is None:
            return None, f"{parsed.kind}: no host uuid in the event and none found by name"
        ref = HostRef(host_uuid=uuid, host_name=name, zone_uuid=getattr(parsed, "zone_uuid", None))
        cached = self.directory.placed.get(uuid)
        if kind == "disconnected":
            # CloudStack's state now is the arbiter, not its alert's time: an alert for a host
            # CloudStack reports up (redelivered, or processed after the host came back) opens
            # nothing; a host it reports down, or cannot be asked about, is reported, and the
            # next poll reports it again as CloudStack then sees it.
            now = await self._current_state(uuid)
            if now is not None and now not in DOWN_STATES:
                log.info(
                    "host %s: %s alert ignored: CloudStack reports the host %s now",
                    uuid,
                    parsed.kind,
                    now,
                )
                return None, None
            self.directory.recheck.add(uuid)
        if cached is not None:
            ref = ref.model_copy(update={"cluster_uuid": cached[0], "ip_address": cached[1]})
        else:
            ref = await self._complete_ref(ref)
        signal = HostSignal(
            kind=kind,  # type: ignore[arg-type]
            host=ref,
            at=at,
            reported_at=float(reported_at) if reported_at else None,
            status=status,
        )
        return signal, None

    async def resolve_name(self, name: str) -> str | None:
        """A host uuid from its name (older alert wordings carry only name and numeric id)."""
        if name in self.directory.names:
            return self.directory.names[name]
        try:
            hosts = await self.inventory()._list("listHosts", name=name, type="Routing")
        except Exception as exc:
            log.warning("cannot resolve host %s: %s", name, exc)
            return None
        for h in hosts:
            if h.get("name") == name:
                self.directory.names[name] = h["id"]
                return str(h["id"])
        return None

    async def _current_state(self, host_uuid: str) -> str | None:
        """The host's state in CloudStack now, or None when CloudStack cannot say."""
        try:
            return (await self.inventory().host(host_uuid)).state or None
        except Exception as exc:
            log.warning("cannot read host %s's state from CloudStack: %s", host_uuid, exc)
            return None

    async def _complete_ref(self, ref: HostRef) -> HostRef:
        try:
            h = await self.inventory().host(ref.host_uuid)
        except Exception as exc:
            log.warning("cannot look up host %s: %s", ref.host_uuid, exc)
            return ref
        return ref.model_copy(
            update={
                "cluster_uuid": h.cluster_uuid,
                "ip_address": h.ip,
                "host_name": h.name,
                "zone_uuid": h.zone_uuid,
            }
        )
