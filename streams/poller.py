"""The listHosts poller: what CloudStack's host list says changed since the last poll.

Rule: CloudStack publishes nothing when a host comes back Up, so the poller reads listHosts,
turns each changed host into host signals and counts each cluster's Enabled hosts for the storm
guard. It remembers only the last state seen per host, and fills the shared `HostDirectory`.
That memory is the host directory log (streams.directory) once it is read: shared by every
ingest worker and kept across leaders, so a new leader reports only what changed (an Up host no
leader ever saw costs nothing); without it, this process's own memory (its first poll reports
every host).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fencing.cloudstack import host_from_api
from fencing.events import HostStatus, NoticeKind
from fencing.records import GateSignal, HostRef, HostSignal, Notice
from streams.worker_clock import CLOCK_ID, worker_clock

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
    # The directory log (streams.directory), once read: the last entry per host uuid, and its
    # state "state/resourcestate" (None: a recheck, report the host at the next poll).
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen: dict[str, str | None] = field(default_factory=dict)
    memory_ready: bool = False


@dataclass
class Poller:
    """Polls listHosts through `inventory()` (built on first use) and remembers what it saw."""

    inventory: Callable[[], Any]
    directory: HostDirectory
    last_state: dict[str, str] = field(default_factory=dict)  # uuid -> "state/resourcestate"
    # streams.directory.DirectoryLog: the memory shared through Kafka (None: this process only)
    log: Any = None
    log_timeout: float = 10.0  # how long a poll waits for the directory log to be read
    # entries of the last poll to write once its signals are delivered (`remember`)
    pending: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)  # of the last poll
    clock_id: str = CLOCK_ID  # which clock stamps the signals' `at` (the core compares only it)
    clock: Callable[[], float] = worker_clock  # that clock (never stepped)
    # Where a listHosts outage is told (async Notice -> None; None: logged only). A poll that
    # fails is logged; `outage_after` failed polls in a row are told (cannot_verify), again
    # every `outage_renotify` seconds of this clock while they last: with CloudStack's API
    # down, no host coming back is seen and every fence is refused, and with no host suspect
    # nothing else would tell anyone.
    notify: Callable[[Notice], Awaitable[None]] | None = None
    outage_after: int = 3
    outage_renotify: float = 3600.0
    failures: int = 0  # failed polls in a row
    failing_since: float | None = None  # the first of them, on `clock`
    outage_told: tuple[int, float] | None = None  # (reminders sent, the last one's time)

    async def poll(self) -> tuple[list[HostSignal], list[GateSignal]]:
        """listHosts: signals for hosts whose state changed since the last poll, cluster sizes.

        With the directory log read (`directory.memory_ready`), "since the last poll" means
        since the last poll of any leader, and a host no leader ever saw is reported only when
        it is not Up (down and maintenance: as every poll); call `remember()` once the signals
        are delivered. Without it, this process's own memory (the first poll reports all)."""
        # The never-stepped clock named `clock_id`: a wall clock stepped back would stamp the
        # next disconnection earlier than this worker's own stamp of the host's return (late).
        now = self.clock()
        if self.log is not None and not self.directory.memory_ready:
            await self.log.start(within=self.log_timeout)
        shared = self.directory.memory_ready
        self.pending = []
        self.stats = {}
        # Rechecks asked before the request: one asked while its answer is on the way (an alert
        # called the host down) may be newer than the answer (`_older_than_a_recheck`).
        asked_before = set(self.directory.recheck) | {
            u for u, s in self.directory.seen.items() if s is None
        }
        try:
            hosts = await self.inventory().kvm_hosts()
        except Exception as exc:
            log.warning("listHosts poll failed: %s", exc)
            await self._failed(now, exc)
            return [], []
        if self.failures:
            log.warning(
                "listHosts answers again after %d failed poll(s) (%.0f s)",
                self.failures,
                now - (self.failing_since or now),
            )
        self.failures, self.failing_since, self.outage_told = 0, None, None
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
            if state not in DOWN_STATES and self._older_than_a_recheck(uuid, asked_before):
                continue
            # Non-Up hosts are reported on every poll (the core ignores repeats, and a host whose
            # maintenance ended while it is still down must open a new episode); Up hosts and
            # maintenance only when they change.
            if shared:
                entry = _entry(h, key)
                known = uuid in self.directory.seen
                changed = (
                    (known and self.directory.seen[uuid] != key)
                    or uuid in self.directory.recheck
                    # never seen by any leader: not Up (down is reported below anyway)
                    or (not known and (state != "Up" or rstate in MAINTENANCE_STATES))
                )
                if self.directory.entries.get(uuid) != entry:
                    self.pending.append((uuid, entry))
            else:
                changed = (
                    previous is None
                    or self.last_state.get(uuid) != key
                    or uuid in self.directory.recheck
                )
                self.last_state[uuid] = key
            self.directory.recheck.discard(uuid)
            if not changed and (state not in DOWN_STATES or rstate in MAINTENANCE_STATES):
                continue
            ref = host_from_api(h)
            if rstate in MAINTENANCE_STATES:
                signals.append(
                    HostSignal(
                        kind="maintenance_started",
                        host=ref,
                        at=now,
                        source="poller",
                        clock=self.clock_id,
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
                        clock=self.clock_id,
                        resource_state=rstate,
                    )
                )
                signals.append(
                    HostSignal(
                        kind="disconnected",
                        host=ref,
                        at=now,
                        source="poller",
                        clock=self.clock_id,
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
                        clock=self.clock_id,
                        resource_state=rstate,
                    )
                )
                signals.append(
                    HostSignal(
                        kind="up",
                        host=ref,
                        at=now,
                        source="poller",
                        clock=self.clock_id,
                        status=HostStatus.UP,
                        resource_state=rstate,
                    )
                )
        gates = [
            GateSignal(kind="cluster_size", cluster_uuid=c, at=now, host_count=n)
            for c, n in sizes.items()
            if c
        ]
        self.stats = {
            "hosts": len(hosts),
            "signals": len(signals),
            "entries": len(self.pending),
            "shared_memory": int(shared),
        }
        return signals, gates

    def _older_than_a_recheck(self, uuid: str, asked_before: set[str]) -> bool:
        """Whether a recheck of the host was asked while this poll's answer was on its way:
        then an answer that is not down may predate the alert that asked it (listHosts made
        its page before the host died, the answer arrived late). Stamped when the poll began,
        its "up" would end the episode that alert opened (on this process's clock the
        alert's stamp is later: a host_recovered for a dead host, its checks started over).
        Nothing is reported; the recheck stays, and the next poll reports the host as
        CloudStack then sees it."""
        if uuid in asked_before:
            return False
        asked = uuid in self.directory.recheck or (
            uuid in self.directory.seen and self.directory.seen[uuid] is None
        )
        if asked:
            log.info("host %s: listHosts answer older than its recheck: reported next poll", uuid)
        return asked

    async def _failed(self, now: float, exc: Exception) -> None:
        """Count a failed poll; tell people once `outage_after` failed in a row, and again every
        `outage_renotify` seconds while the outage lasts (never raises)."""
        self.failures += 1
        if self.failing_since is None:
            self.failing_since = now
        if self.failures < self.outage_after:
            return
        told = self.outage_told
        if told is not None and now - told[1] < self.outage_renotify:
            return
        number = 1 if told is None else told[0] + 1
        self.outage_told = (number, now)
        notice = outage_notice(
            self.clock_id, self.failing_since, now, self.failures, number, str(exc)
        )
        log.error("%s", notice.reason)
        if self.notify is None:
            return
        try:
            await self.notify(notice)
        except Exception as err:  # the error log above stands; the next reminder comes anyway
            log.error("cannot send the listHosts outage notice: %s", err)

    async def remember(self) -> int:
        """Write the last poll's changed entries to the directory log (after its signals were
        delivered: a leader killed in between leaves them unwritten, and the next leader reports
        those hosts again). The number written; 0 without the log."""
        pending, self.pending = self.pending, []
        if not pending or self.log is None or not self.directory.memory_ready:
            return 0
        try:
            n: int = await self.log.write(pending)
        except Exception as exc:
            # Not remembered: the next leader may report these hosts again (never fewer).
            log.warning("host directory: %d entries not written: %s", len(pending), exc)
            return 0
        return n


def _entry(h: dict[str, Any], key: str) -> dict[str, Any]:
    """A listHosts row as a directory entry (streams.directory)."""
    entry = {
        "s": key,
        "c": h.get("clusterid"),
        "i": h.get("ipaddress"),
        "n": h.get("name"),
        "z": h.get("zoneid"),
    }
    return {k: v for k, v in entry.items() if k == "s" or v is not None}


def outage_notice(
    clock_id: str, since: float, now: float, failures: int, number: int, error: str
) -> Notice:
    """The cannot_verify notice of a listHosts outage: its id names this process's clock, the
    outage's start on it and the reminder's number (each reminder is a new id, the same one
    read again is not)."""
    return Notice(
        notice_id=f"listhosts-outage/{clock_id}/{since:.3f}/{number}",
        kind=NoticeKind.CANNOT_VERIFY,
        host=HostRef(host_uuid="unknown"),
        at=now,
        reason=(
            f"CloudStack's listHosts has failed {failures} poll(s) in a row for {now - since:.0f} "
            f"s ({error[:300]}): hosts coming back are not seen, and every fence is refused "
            "while CloudStack cannot confirm the host down"
        ),
    )
