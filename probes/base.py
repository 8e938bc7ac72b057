"""The storage-probe interface: back ends read, the core judges.

Rule: a back end only *reads* (mtimes, heartbeat contents, whether a pool is mounted) and
`outcome_of` turns its `Reading` into a `ProbeOutcome`: the files it could read, whether the
reading is complete (and if not, why), and the clock offsets it measured. Nothing here says
alive or stale: `fencing.decision.judge` compares each reading with the previous one of the same
files, so no clock is ever compared with another machine's.

A new back end (Ceph RBD, ...) is a new module with a class that has `name` and
`async check(target) -> ProbeOutcome`, named in `_BACKENDS`; the core and the streams never
change.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from fencing.records import ProbeRequest, ProbeResult


class Reason:
    """The reasons an unknown outcome gives (first words of `ProbeOutcome.reason`)."""

    NO_NEIGHBOUR = "no neighbour"
    AUTH_FAILED = "auth failed"
    HOST_KEY = "host key mismatch"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"
    NOT_MOUNTED = "storage not mounted"
    NO_FILES = "no files"
    PARTIAL = "partial output"
    COMMAND_FAILED = "command failed"
    INVENTORY = "inventory"
    SSH_ERROR = "ssh error"
    CONFIG = "configuration"


@dataclass(frozen=True)
class Neighbour:
    """A host that can look at the suspect's storage."""

    uuid: str
    name: str
    address: str


@dataclass(frozen=True)
class PoolTarget:
    """One storage pool the suspect host uses: where it is mounted and what to look at."""

    pool_uuid: str
    mount_point: str
    heartbeat: str | None
    disks: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProbeTarget:
    """Everything a back end needs for one check of one suspect host."""

    host_uuid: str
    host_name: str | None
    host_ip: str | None
    suspect_since: float
    pools: tuple[PoolTarget, ...]
    neighbours: tuple[Neighbour, ...] = ()
    cluster_uuid: str | None = None

    @property
    def files(self) -> tuple[str, ...]:
        """Every disk file, all pools."""
        return tuple(d for p in self.pools for d in p.disks)

    @property
    def heartbeats(self) -> tuple[str, ...]:
        """Every heartbeat file, all pools."""
        return tuple(p.heartbeat for p in self.pools if p.heartbeat)

    unreadable: int = 0  # disks on storage this back end cannot read (RBD, local, ...)


@dataclass(frozen=True)
class Reading:
    """What a back end saw. Missing paths are simply absent from the maps (`outcome_of` lists
    the requested ones as `missing`)."""

    now: float  # the reader's (neighbour's) clock when it looked: shown as an offset only
    mtimes: Mapping[str, float] = field(default_factory=dict)
    heartbeat_values: Mapping[str, str] = field(default_factory=dict)  # raw content
    mounted: Mapping[str, bool] = field(default_factory=dict)  # mount point -> usable
    complete: bool = True  # False when output was cut short (timeout, lost connection)
    incomplete_reason: str | None = None
    local_now: float | None = None  # the probe worker's clock when the answer arrived


@dataclass(frozen=True)
class ProbeOutcome:
    """One check's reading, as a back end returns it (no verdict: the core judges)."""

    mtimes: Mapping[str, float] = field(default_factory=dict)
    heartbeats: Mapping[str, str] = field(default_factory=dict)
    complete: bool = False
    reason: str | None = None  # why the reading is incomplete
    files_wanted: int = 0
    unreadable: int = 0
    neighbour: str | None = None
    duration: float = 0.0
    probe: str = "nfs"
    neighbour_offset: float | None = None
    filer_offset: float | None = None
    live_signs: tuple[str, ...] = ()  # direct signs of life (an RBD watch held by the host)
    min_gap: float = 0.0  # this back end's floor for a stale window (RBD: the watch timeout)
    # Requested files it could not read (a stat that failed: gone, ESTALE, EIO, a directory it
    # cannot search; an RBD image that is gone). Only known from an answer read to its end.
    missing: tuple[str, ...] = ()
    # Requested heartbeat files whose stat worked but whose content could not be read (EIO, no
    # read permission, empty): the core never calls such a reading "no change" when it read
    # that content before. Only known from an answer read to its end.
    unread_contents: tuple[str, ...] = ()
    # Neighbours whose reading in this check failed, was incomplete or lacked files (the next
    # checks ask others first: probes.neighbours). Not on the wire.
    passed_over: tuple[str, ...] = ()

    @property
    def lacks_files(self) -> bool:
        """Whether a requested file or heartbeat content could not be read."""
        return bool(self.missing or self.unread_contents)

    @classmethod
    def unknown(cls, reason: str, probe: str, **kw: Any) -> ProbeOutcome:
        """A reading that could not be made, with why."""
        return cls(complete=False, reason=reason, probe=probe, **kw)

    def to_result(self, request: ProbeRequest, finished_at: float) -> ProbeResult:
        """The probe-results wire record for `request`."""
        return ProbeResult(
            host=request.host,
            episode=request.episode,
            check=request.check,
            suspect_since=request.suspect_since,
            finished_at=finished_at,
            mtimes=dict(self.mtimes),
            heartbeats=dict(self.heartbeats),
            complete=self.complete,
            files_wanted=self.files_wanted,
            unreadable=self.unreadable,
            neighbour=self.neighbour,
            reason=self.reason,
            neighbour_offset=self.neighbour_offset,
            filer_offset=self.filer_offset,
            duration=self.duration,
            probe=self.probe,
            live_signs=list(self.live_signs),
            min_gap=self.min_gap,
            missing=list(self.missing),
            unread_contents=list(self.unread_contents),
        )


def parse_heartbeat(raw: str) -> float | None:
    """CloudStack's heartbeat file holds `date +%s`; anything else is unreadable."""
    try:
        value = float(raw.strip().split()[0])
    except (ValueError, IndexError):
        return None
    return value if value > 0 else None


def incomplete_reason(target: ProbeTarget, reading: Reading) -> str | None:
    """Why `reading` is not a complete reading of `target`, or None when it is."""
    if not reading.complete:
        return reading.incomplete_reason or Reason.PARTIAL
    if not target.pools:
        return f"{Reason.NO_FILES}: no storage pool known for the host"
    for pool in target.pools:
        if not reading.mounted.get(pool.mount_point, False):
            return f"{Reason.NOT_MOUNTED}: {pool.mount_point}"
        paths = [*pool.disks, *([pool.heartbeat] if pool.heartbeat else [])]
        if paths and not any(p in reading.mtimes for p in paths):
            # A mounted pool where nothing of the host's exists is more likely an empty
            # mount-point directory (NFS not mounted) than a host that never wrote there.
            return (
                f"{Reason.NOT_MOUNTED}: none of the host's {len(paths)} files under "
                f"{pool.mount_point}"
            )
        if pool.disks and not any(p in reading.mtimes for p in pool.disks):
            # Only the heartbeat is there: the agent writes it, so it stops with a dead agent
            # on a live host; with none of its VMs' disks found (paths that do not resolve on
            # the neighbour, volumes moved) nothing could show their writes. Unknown, not stale.
            return (
                f"{Reason.NO_FILES}: none of the host's {len(pool.disks)} disks under "
                f"{pool.mount_point}, only its heartbeat"
            )
    if not any(p in reading.mtimes for p in (*target.files, *target.heartbeats)):
        return f"{Reason.NO_FILES}: nothing to read"
    return None


def outcome_of(
    target: ProbeTarget, reading: Reading, probe: str, neighbour: str | None, duration: float
) -> ProbeOutcome:
    """The outcome of one reading: what was read, which requested files could not be read,
    whether it is complete, measured offsets."""
    wanted = (*target.files, *target.heartbeats)
    mtimes = {p: reading.mtimes[p] for p in wanted if p in reading.mtimes}
    # A file whose stat failed is absent from the answer; only an answer read to its end tells
    # an unreadable file from one the output never reached. The core decides what it means (a
    # file read before in the episode: unknown, never "no change").
    missing = (
        tuple(p for p in dict.fromkeys(wanted) if p not in reading.mtimes)
        if reading.complete
        else ()
    )
    beats = {
        h: reading.heartbeat_values[h] for h in target.heartbeats if h in reading.heartbeat_values
    }
    # A heartbeat stat'ed (so not missing) without its content: unreadable, never "unchanged".
    unread_contents = (
        tuple(h for h in dict.fromkeys(target.heartbeats) if h in mtimes and h not in beats)
        if reading.complete
        else ()
    )
    reason = incomplete_reason(target, reading)
    neighbour_offset = None
    if reading.local_now is not None:
        neighbour_offset = round(reading.now - reading.local_now, 1)
    filer_offset = None
    stamped = [
        (value, mtimes[h])
        for h, raw in beats.items()
        if h in mtimes and (value := parse_heartbeat(raw)) is not None
    ]
    if stamped:
        content, mtime = max(stamped)
        filer_offset = round(mtime - content, 1)
    return ProbeOutcome(
        mtimes=mtimes,
        heartbeats=beats,
        complete=reason is None,
        reason=reason,
        files_wanted=len(wanted),
        unreadable=target.unreadable,
        neighbour=neighbour,
        duration=duration,
        probe=probe,
        neighbour_offset=neighbour_offset,
        filer_offset=filer_offset,
        missing=missing,
        unread_contents=unread_contents,
    )


@runtime_checkable
class StorageProbe(Protocol):
    """A storage back end: look at a suspect host's storage once."""

    name: str

    async def check(self, target: ProbeTarget) -> ProbeOutcome:
        """One reading; never raises, an incomplete one says why."""
        ...

    async def close(self) -> None:
        """Release pooled connections."""
        ...


# The back ends by name, imported only when asked for: a new back end is one more line here.
_BACKENDS: dict[str, str] = {
    "nfs": "probes.nfs_ssh:NfsSshProbe",
    "mounted": "probes.mounted:MountedProbe",
}


def create_probe(name: str, settings: Any, **kw: Any) -> StorageProbe:
    """Build the back end called `name`; ValueError names the unknown back end."""
    target = _BACKENDS.get(name)
    if target is None:
        raise ValueError(f"unknown storage probe {name!r}; known: {sorted(_BACKENDS)}")
    module, _, attr = target.partition(":")
    factory: Callable[..., StorageProbe] = getattr(importlib.import_module(module), attr)
    return factory(settings, **kw)
