"""A primary storage pool in maintenance (review3: partial failures). CloudStack unmounts a pool
it puts in maintenance from every host (its heartbeat stops with it) once no VM uses it: the
pool holds none of the suspect's disks and no neighbour has it mounted. Counted as one of the
suspect's pools, every check of every host of the cluster was "storage not mounted" (unknown):
no dead host could be fenced while an operator kept a pool in maintenance. A pool in maintenance
that still holds a disk of the host stays read (its absence on the neighbour is unknown)."""

import shutil
import time

import pytest

from fencing.records import HostRef, ProbeRequest
from probes.inventory import Inventory

pytestmark = pytest.mark.timeout(60)


def _request(world) -> ProbeRequest:
    now = time.time()
    return ProbeRequest(
        host=HostRef(host_uuid=world.suspect.uuid),
        episode=1,
        check=1,
        suspect_since=now - 100,
        requested_at=now,
    )


def _unmount(world, pool) -> None:
    # What every host sees of an NFS pool CloudStack unmounted: no mount point.
    shutil.rmtree(world.lab.mount_root / pool.uuid)


async def test_a_pool_in_maintenance_without_the_hosts_disks_is_not_read(world, service):
    spare = world.cloud.add_pool(world.cloud.clusters[world.pool.cluster_uuid], "nfs-spare")
    world.lab.ensure_files()
    spare.state = "Maintenance"
    _unmount(world, spare)
    result = await service.run(_request(world))
    assert result.complete, result.reason
    assert not any(spare.uuid in path for path in (*result.mtimes, *result.missing))
    inv = Inventory(world.settings)
    try:
        storage = await inv.storage_of(world.suspect.uuid)
    finally:
        await inv.close()
    assert [p.uuid for p in storage.pools] == [world.pool.uuid]


async def test_a_pool_in_maintenance_that_holds_a_disk_of_the_host_is_still_read(world, service):
    spare = world.cloud.add_pool(world.cloud.clusters[world.pool.cluster_uuid], "nfs-spare")
    vm = world.cloud.add_vm(world.suspect.cloud_host, "vm-on-spare")
    world.cloud.add_volume(vm, spare)
    world.lab.ensure_files()
    spare.state = "Maintenance"
    _unmount(world, spare)
    result = await service.run(_request(world))
    assert not result.complete and result.reason.startswith("storage not mounted"), result.reason


async def test_the_pool_in_use_is_read_whatever_the_other_pools_states(world, service):
    """Up and Disabled pools stay mounted (and heartbeated): still read."""
    spare = world.cloud.add_pool(world.cloud.clusters[world.pool.cluster_uuid], "nfs-spare")
    world.lab.ensure_files()
    spare.state = "Disabled"
    world.lab.by_name("kvm01").write_once()
    result = await service.run(_request(world))
    assert result.complete, result.reason
    assert any(spare.uuid in path for path in result.mtimes)
