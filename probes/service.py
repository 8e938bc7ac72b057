"""One probe request in, one probe result out: inventory, neighbour choice, back end.

Rule: `ProbeService.run` never raises for anything the outside world does (CloudStack down, no
neighbour, SSH refused, storage unreadable): it returns an unknown result that says why. The
Faust probe agent keeps one `ProbeService` per worker (pooled SSH and HTTP connections) and calls
`run` for each record of the probe-requests topic.

Back ends are chosen per storage pool from CloudStack's pool type, never by a global setting:
NFS pools go to the NFS back end (or the one named by `probe_name`, e.g. `mounted`), RBD pools
to `probes.rbd`. A host with disks on both gets both, run at once, and ONE merged reading: it is
complete only if every back end's is, its mtimes, heartbeats and live signs are the union, and
`unreadable` counts the disks on pools no back end reads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace

from fencing.records import ProbeRequest, ProbeResult
from fencing.settings import FencerSettings
from probes.base import (
    Neighbour,
    PoolTarget,
    ProbeOutcome,
    ProbeTarget,
    Reason,
    StorageProbe,
    create_probe,
)
from probes.inventory import HostStorage, Inventory, InventoryError, KvmHost
from probes.neighbours import NeighbourChooser
from probes.rbd import RbdProbe


def target_for(
    storage: HostStorage,
    suspect_since: float,
    neighbours: NeighbourChooser | None = None,
    cluster_hosts: list[KvmHost] | None = None,
) -> ProbeTarget:
    """The back-end view of a host's storage (plus its chosen neighbours)."""
    pools = tuple(
        PoolTarget(
            pool_uuid=p.uuid,
            mount_point=storage.mount_point(p),
            heartbeat=storage.heartbeat(p),
            disks=tuple(d.path for d in storage.disks if d.pool_uuid == p.uuid),
        )
        for p in storage.pools
    )
    chosen: tuple[Neighbour, ...] = ()
    if neighbours is not None and cluster_hosts is not None:
        chosen = neighbours.as_neighbours(neighbours.choose(storage.host, cluster_hosts))
    return ProbeTarget(
        host_uuid=storage.host.uuid,
        host_name=storage.host.name,
        host_ip=storage.host.ip,
        suspect_since=suspect_since,
        pools=pools,
        cluster_uuid=storage.host.cluster_uuid,
        neighbours=chosen,
        unreadable=storage.skipped_disks,
    )


def rbd_target_for(
    storage: HostStorage, suspect_since: float, storage_ip: str, base: ProbeTarget
) -> ProbeTarget:
    """The RBD back end's view: the host's images per RBD pool, its storage-network address."""
    pools = tuple(
        PoolTarget(
            pool_uuid=p.uuid,
            mount_point=(p.path or "").strip("/"),  # the Ceph pool
            heartbeat=None,
            disks=tuple(d.path for d in storage.rbd_disks if d.pool_uuid == p.uuid),
        )
        for p in storage.rbd_pools
    )
    return replace(base, host_ip=storage_ip, pools=pools, suspect_since=suspect_since)


def merge_outcomes(outcomes: list[ProbeOutcome], unreadable: int) -> ProbeOutcome:
    """One reading from several back ends' readings of the same host."""
    if len(outcomes) == 1:
        return replace(outcomes[0], unreadable=unreadable)
    reasons = [f"{o.probe}: {o.reason}" for o in outcomes if not o.complete]
    neighbours = list(dict.fromkeys(o.neighbour for o in outcomes if o.neighbour))
    return ProbeOutcome(
        mtimes={k: v for o in outcomes for k, v in o.mtimes.items()},
        heartbeats={k: v for o in outcomes for k, v in o.heartbeats.items()},
        complete=all(o.complete for o in outcomes),
        reason="; ".join(reasons) or None,
        files_wanted=sum(o.files_wanted for o in outcomes),
        unreadable=unreadable,
        neighbour=", ".join(neighbours) or None,
        duration=max(o.duration for o in outcomes),
        probe="+".join(o.probe for o in outcomes),
        neighbour_offset=next(
            (o.neighbour_offset for o in outcomes if o.neighbour_offset is not None), None
        ),
        filer_offset=next((o.filer_offset for o in outcomes if o.filer_offset is not None), None),
        live_signs=tuple(s for o in outcomes for s in o.live_signs),
        min_gap=max(o.min_gap for o in outcomes),
        missing=tuple(p for o in outcomes for p in o.missing),
        unread_contents=tuple(p for o in outcomes for p in o.unread_contents),
        passed_over=tuple(dict.fromkeys(p for o in outcomes for p in o.passed_over)),
    )


class ProbeService:
    """Inventory + neighbours + the storage back ends, with their connections kept open."""

    def __init__(
        self,
        settings: FencerSettings,
        *,
        probe: StorageProbe | None = None,
        probe_name: str = "nfs",
        rbd_probe: StorageProbe | None = None,
        inventory: Inventory | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.probe = probe or create_probe(probe_name, settings)
        self._rbd = rbd_probe
        self.inventory = inventory or Inventory(settings)
        self.neighbours = NeighbourChooser(settings.ssh.max_neighbours)
        self.clock = clock

    @property
    def rbd(self) -> StorageProbe:
        """The RBD back end, opened on first use (sharing the NFS probe's SSH connections)."""
        if self._rbd is None:
            self._rbd = RbdProbe(self.settings, pool=getattr(self.probe, "pool", None))
        return self._rbd

    async def close(self) -> None:
        """Close SSH and HTTP connections."""
        if self._rbd is not None:
            await self._rbd.close()
        await self.probe.close()
        await self.inventory.close()

    async def targets(
        self, request: ProbeRequest
    ) -> tuple[list[tuple[StorageProbe, ProbeTarget]], int]:
        """Each back end the host's pools need, with its target; and the unreadable disks
        (raises InventoryError)."""
        # Asked again at every check: a VM that CloudStack's own HA restarted on another host no
        # longer counts for the suspect (its new writes are not the suspect's).
        storage = await self.inventory.storage_of(request.host.host_uuid)
        hosts: list[KvmHost] = []
        if storage.host.cluster_uuid:
            hosts = await self.inventory.cluster_hosts(storage.host.cluster_uuid)
        nfs = target_for(storage, request.suspect_since, self.neighbours, hosts)
        chosen: list[tuple[StorageProbe, ProbeTarget]] = []
        if storage.pools or not storage.rbd_disks:
            chosen.append((self.probe, nfs))
        if storage.rbd_disks:
            ip = self.settings.storage_ip_for(storage.host.uuid, storage.host.ip)
            chosen.append((self.rbd, rbd_target_for(storage, request.suspect_since, ip, nfs)))
        return chosen, storage.skipped_disks

    async def target(self, request: ProbeRequest) -> ProbeTarget:
        """The first back end's target (raises InventoryError)."""
        chosen, _ = await self.targets(request)
        return chosen[0][1]

    async def run(self, request: ProbeRequest) -> ProbeResult:
        """Check one suspect host once, with every back end its pools need."""
        started = time.monotonic()
        try:
            chosen, unreadable = await self.targets(request)
        except InventoryError as exc:
            outcome = ProbeOutcome.unknown(
                f"{Reason.INVENTORY}: {exc}", self.probe.name, duration=time.monotonic() - started
            )
            return outcome.to_result(request, self.clock())
        outcomes = list(await asyncio.gather(*(p.check(t) for p, t in chosen)))
        for (_, target), outcome in zip(chosen, outcomes, strict=True):
            for n in target.neighbours:
                if n.name in outcome.passed_over:
                    # The next checks of this suspect ask another neighbour first (rotation).
                    self.neighbours.passed_over(target.host_uuid, n.uuid)
                elif outcome.complete and n.name == outcome.neighbour:
                    self.neighbours.answered(target.cluster_uuid, n.uuid)
                    self.neighbours.read_cleanly(target.host_uuid, n.uuid)
        return merge_outcomes(outcomes, unreadable).to_result(request, self.clock())


async def run_probe(
    request: ProbeRequest, settings: FencerSettings, service: ProbeService | None = None
) -> ProbeResult:
    """Check one suspect host; with no `service`, open and close one for this request."""
    if service is not None:
        return await service.run(request)
    own = ProbeService(settings)
    try:
        return await own.run(request)
    finally:
        await own.close()
