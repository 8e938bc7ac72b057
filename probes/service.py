"""One probe request in, one probe result out: inventory, neighbour choice, back end.

Rule: `ProbeService.run` never raises for anything the outside world does (CloudStack down, no
neighbour, SSH refused, storage unreadable): it returns an unknown result that says why. The
Faust probe agent keeps one `ProbeService` per worker (pooled SSH and HTTP connections) and calls
`run` for each record of the probe-requests topic.
"""

from __future__ import annotations

import time
from collections.abc import Callable

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


class ProbeService:
    """Inventory + neighbours + one storage back end, with their connections kept open."""

    def __init__(
        self,
        settings: FencerSettings,
        *,
        probe: StorageProbe | None = None,
        probe_name: str = "nfs",
        inventory: Inventory | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.probe = probe or create_probe(probe_name, settings)
        self.inventory = inventory or Inventory(settings)
        self.neighbours = NeighbourChooser(settings.ssh.max_neighbours)
        self.clock = clock

    async def close(self) -> None:
        """Close SSH and HTTP connections."""
        await self.probe.close()
        await self.inventory.close()

    async def target(self, request: ProbeRequest) -> ProbeTarget:
        """The check's target (raises InventoryError)."""
        # Asked again at every check: a VM that CloudStack's own HA restarted on another host no
        # longer counts for the suspect (its new writes are not the suspect's).
        storage = await self.inventory.storage_of(request.host.host_uuid)
        hosts = []
        if storage.host.cluster_uuid:
            hosts = await self.inventory.cluster_hosts(storage.host.cluster_uuid)
        return target_for(storage, request.suspect_since, self.neighbours, hosts)

    async def run(self, request: ProbeRequest) -> ProbeResult:
        """Check one suspect host once."""
        started = time.monotonic()
        try:
            target = await self.target(request)
        except InventoryError as exc:
            outcome = ProbeOutcome.unknown(
                f"{Reason.INVENTORY}: {exc}", self.probe.name, duration=time.monotonic() - started
            )
            return outcome.to_result(request, self.clock())
        outcome = await self.probe.check(target)
        if outcome.complete and outcome.neighbour:
            for n in target.neighbours:
                if n.name == outcome.neighbour:
                    self.neighbours.answered(target.cluster_uuid, n.uuid)
        return outcome.to_result(request, self.clock())


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
