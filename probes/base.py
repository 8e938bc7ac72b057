"""The storage-probe interface and the one evidence rule every back end shares.

Rule: a back end only *reads* (mtimes, heartbeat contents, whether a pool is mounted) and hands a
`Reading` to `judge`; `judge` alone turns readings into alive | stale | unknown. Alive needs one
positive sign (a disk written after the suspect time, or a heartbeat fresher than
heartbeat_max_age at check time); stale needs a complete reading of every pool with no such sign;
anything less is unknown with a reason, and unknown is never evidence of death.

A new back end (Ceph RBD, ...) is a new module with a class that has `name` and
`async check(target) -> ProbeOutcome`, registered with `register_probe` (or under the
`fencer.probes` entry-point group); the core and the streams never change.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

from fencing.events import Evidence
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


@dataclass(frozen=True)
class Reading:
    """What a back end saw. Missing paths are simply absent from the maps."""

    now: float  # the reader's clock when it looked (heartbeats are judged against it)
    mtimes: Mapping[str, float] = field(default_factory=dict)
    heartbeat_values: Mapping[str, str] = field(default_factory=dict)  # raw content
    mounted: Mapping[str, bool] = field(default_factory=dict)  # mount point -> usable
    complete: bool = True  # False when output was cut short (timeout, lost connection)
    incomplete_reason: str | None = None


@dataclass(frozen=True)
class Verdict:
    """The evidence rule's answer."""

    evidence: Evidence
    reason: str | None
    newest_write: float | None
    heartbeat: float | None
    files_checked: int
    files_missing: int


@dataclass(frozen=True)
class ProbeOutcome:
    """One check's result, as a back end returns it."""

    evidence: Evidence
    reason: str | None = None
    newest_write: float | None = None
    heartbeat: float | None = None
    files_checked: int = 0
    files_missing: int = 0
    neighbour: str | None = None
    duration: float = 0.0
    probe: str = "nfs"

    @classmethod
    def unknown(cls, reason: str, probe: str, **kw: Any) -> ProbeOutcome:
        """An unknown outcome that says why."""
        return cls(Evidence.UNKNOWN, reason=reason, probe=probe, **kw)

    @classmethod
    def from_verdict(
        cls, v: Verdict, probe: str, neighbour: str | None, duration: float
    ) -> ProbeOutcome:
        """Wrap the rule's verdict with who looked and how long it took."""
        return cls(
            v.evidence,
            v.reason,
            v.newest_write,
            v.heartbeat,
            v.files_checked,
            v.files_missing,
            neighbour,
            duration,
            probe,
        )

    def to_result(self, request: ProbeRequest, finished_at: float) -> ProbeResult:
        """The probe-results wire record for `request`."""
        return ProbeResult(
            host=request.host,
            episode=request.episode,
            check=request.check,
            evidence=self.evidence,
            suspect_since=request.suspect_since,
            finished_at=finished_at,
            newest_write=self.newest_write,
            heartbeat=self.heartbeat,
            files_checked=self.files_checked,
            files_missing=self.files_missing,
            neighbour=self.neighbour,
            reason=self.reason,
            duration=self.duration,
            probe=self.probe,
        )


def parse_heartbeat(raw: str) -> float | None:
    """CloudStack's heartbeat file holds `date +%s`; anything else is unreadable."""
    try:
        value = float(raw.strip().split()[0])
    except (ValueError, IndexError):
        return None
    return value if value > 0 else None


def judge(target: ProbeTarget, reading: Reading, heartbeat_max_age: float) -> Verdict:
    """The evidence rule (see the module docstring); pure, shared by every back end."""
    wanted = list(target.files) + list(target.heartbeats)
    present = [p for p in wanted if p in reading.mtimes]
    checked, missing = len(wanted), len(wanted) - len(present)
    disk_mtimes = [reading.mtimes[d] for d in target.files if d in reading.mtimes]
    newest = max(disk_mtimes, default=None)
    beats = [
        v
        for hb in target.heartbeats
        if (v := parse_heartbeat(reading.heartbeat_values.get(hb, ""))) is not None
    ]
    heartbeat = max(beats, default=None)

    def verdict(evidence: Evidence, reason: str | None) -> Verdict:
        return Verdict(evidence, reason, newest, heartbeat, checked, missing)

    if newest is not None and newest > target.suspect_since:
        return verdict(Evidence.ALIVE, None)
    if heartbeat is not None and reading.now - heartbeat < heartbeat_max_age:
        return verdict(Evidence.ALIVE, None)
    if not reading.complete:
        return verdict(Evidence.UNKNOWN, reading.incomplete_reason or Reason.PARTIAL)
    if not target.pools:
        return verdict(Evidence.UNKNOWN, f"{Reason.NO_FILES}: no storage pool known for the host")
    for pool in target.pools:
        if not reading.mounted.get(pool.mount_point, False):
            return verdict(Evidence.UNKNOWN, f"{Reason.NOT_MOUNTED}: {pool.mount_point}")
        paths = [*pool.disks, *([pool.heartbeat] if pool.heartbeat else [])]
        if paths and not any(p in reading.mtimes for p in paths):
            # A mounted pool where nothing of the host's exists is more likely an empty
            # mount-point directory (NFS not mounted) than a host that never wrote there.
            return verdict(
                Evidence.UNKNOWN,
                f"{Reason.NOT_MOUNTED}: none of the host's {len(paths)} files under "
                f"{pool.mount_point}",
            )
    if not present:
        return verdict(Evidence.UNKNOWN, f"{Reason.NO_FILES}: nothing to read")
    return verdict(Evidence.STALE, None)


@runtime_checkable
class StorageProbe(Protocol):
    """A storage back end: look at a suspect host's storage once."""

    name: str

    async def check(self, target: ProbeTarget) -> ProbeOutcome:
        """One check; never raises, unknown outcomes say why."""
        ...

    async def close(self) -> None:
        """Release pooled connections."""
        ...


ProbeFactory = Callable[..., StorageProbe]

# Built-in back ends, imported only when asked for.
_BUILTIN: dict[str, str] = {
    "nfs": "probes.nfs_ssh:NfsSshProbe",
    "mounted": "probes.mounted:MountedProbe",
}
_REGISTRY: dict[str, ProbeFactory] = {}


def register_probe(name: str, factory: ProbeFactory) -> None:
    """Make a back end available under `name` (factory(settings, **kw) -> StorageProbe)."""
    _REGISTRY[name] = factory


def available_probes() -> list[str]:
    """Every back-end name: built-in, registered and installed through entry points."""
    names = set(_BUILTIN) | set(_REGISTRY)
    names |= {ep.name for ep in entry_points(group="fencer.probes")}
    return sorted(names)


def create_probe(name: str, settings: Any, **kw: Any) -> StorageProbe:
    """Build the back end called `name`; ValueError names the unknown back end."""
    factory = _REGISTRY.get(name)
    if factory is None:
        target = _BUILTIN.get(name)
        if target is None:
            for ep in entry_points(group="fencer.probes"):
                if ep.name == name:
                    target = ep.value
                    break
        if target is None:
            raise ValueError(f"unknown storage probe {name!r}; known: {available_probes()}")
        module, _, attr = target.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    return factory(settings, **kw)
