"""The listHosts poller: what CloudStack's host list says changed since the last poll.

Rule: CloudStack publishes nothing when a host comes back Up, so the poller reads listHosts,
turns each changed host into host signals and counts each cluster's Enabled hosts for the storm
guard. It remembers only the last state it saw per host, and fills the shared `HostDirectory`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fencing.events import HostStatus
from fencing.records import GateSignal, HostRef, HostSignal

log = logging.getLogger("fencer.streams")

DOWN_STATES = {
    "Disconnected": HostStatus.DISCONNECTED,
    "Alert": HostStatus.ALERT,
    "Down": HostStatus.DOWN,
}
MAINTENANCE_STATES = {
    "PrepareForMaintenance",
    "Maintenance",
    "ErrorInMaintenance",
    "ErrorInPrepareForMaintenance",
}


@dataclass
class HostDirectory:
    """What the worker learned about hosts from listHosts, shared by the poller and ingest."""

    placed: dict[str, tuple[str, str]] = field(default_factory=dict)  # uuid -> (cluster, ip)
    names: dict[str, str] = field(default_factory=dict)  # host name -> uuid
    # Hosts the event bus called down since the last poll: the next poll reports their state
    # whatever it is, so an alert processed late (after the host came back) ends at that poll.
    recheck: set[str] = field(default_factory=set)


@dataclass
class Poller:
    """Polls listHosts through `inventory()` (built on first use) and remembers what it saw."""

    inventory: Callable[[], Any]
    directory: HostDirectory
    last_state: dict[str, str] = field(default_factory=dict)  # uuid -> "state/resourcestate"

    async def poll(self) -> tuple[list[HostSignal], list[GateSignal]]:
        """listHosts: signals for hosts whose state changed since the last poll, cluster sizes."""
        now = time.time()
        try:
            hosts = await self.inventory()._list("listHosts", type="Routing", hypervisor="KVM")
        except Exception as exc:
            log.warning("listHosts poll failed: %s", exc)
            return [], []
        signals: list[HostSignal] = []
        sizes: dict[str, int] = {}
        for h in hosts:
            uuid = h["id"]
            cluster = h.get("clusterid") or ""
            sizes.setdefault(cluster, 0)
            if h.get("resourcestate") == "Enabled":
                # The storm guard's denominator: hosts that could be running VMs (not Disabled,
                # not in or entering maintenance).
                sizes[cluster] = sizes.get(cluster, 0) + 1
            state, rstate = h.get("state", ""), h.get("resourcestate", "")
            self.directory.names[h.get("name", uuid)] = uuid
            previous = self.directory.placed.get(uuid)
            self.directory.placed[uuid] = (cluster, h.get("ipaddress", ""))
            key = f"{state}/{rstate}"
            # Non-Up hosts are reported on every poll (the core ignores repeats, and a host whose
            # maintenance ended while it is still down must open a new episode); Up hosts and
            # maintenance only when they change.
            changed = (
                previous is None
                or self.last_state.get(uuid) != key
                or uuid in self.directory.recheck
            )
            self.directory.recheck.discard(uuid)
            self.last_state[uuid] = key
            if not changed and (state not in DOWN_STATES or rstate in MAINTENANCE_STATES):
                continue
            ref = HostRef(
                host_uuid=uuid,
                host_name=h.get("name"),
                cluster_uuid=cluster or None,
                cluster_name=h.get("clustername"),
                zone_uuid=h.get("zoneid"),
                zone_name=h.get("zonename"),
                ip_address=h.get("ipaddress"),
            )
            if rstate in MAINTENANCE_STATES:
                signals.append(
                    HostSignal(
                        kind="maintenance_started",
                        host=ref,
                        at=now,
                        source="poller",
                        resource_state=rstate,
                    )
                )
            elif state in DOWN_STATES:
                # CloudStack's resource state says the host is out of maintenance: end it here
                # too (the cancel event may have been missed); the core ignores it otherwise.
                signals.append(
                    HostSignal(
                        kind="maintenance_ended",
                        host=ref,
                        at=now,
                        source="poller",
                        resource_state=rstate,
                    )
                )
                signals.append(
                    HostSignal(
                        kind="disconnected",
                        host=ref,
                        at=now,
                        source="poller",
                        status=DOWN_STATES[state],
                        resource_state=rstate,
                    )
                )
            elif state == "Up":
                signals.append(
                    HostSignal(
                        kind="maintenance_ended",
                        host=ref,
                        at=now,
                        source="poller",
                        resource_state=rstate,
                    )
                )
                signals.append(
                    HostSignal(
                        kind="up",
                        host=ref,
                        at=now,
                        source="poller",
                        status=HostStatus.UP,
                        resource_state=rstate,
                    )
                )
        gates = [
            GateSignal(kind="cluster_size", cluster_uuid=c, at=now, host_count=n)
            for c, n in sizes.items()
            if c
        ]
        return signals, gates
