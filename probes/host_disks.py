"""Where a host's disks are, asked of CloudStack for the storage fence (fencing.storage_fence):
its VMs in any state, their volumes and the pools' types, and the host's address.

The actuator gets these lookups from the shell (streams.runtime), so that fencing imports no
probe; a failure is a DiskLookupError whose text is InventoryError's (safe to publish).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fencing.settings import FencerSettings
from fencing.storage_fence import DiskLookupError, HostDisks
from probes.inventory import (
    NFS_POOL_TYPES,
    RBD_POOL_TYPES,
    Inventory,
    InventoryError,
    rbd_disk_path,
)
from probes.rbd import spec_of


async def _all_vms(inv: Any, host_uuid: str) -> list[dict[str, Any]]:
    """Every VM CloudStack places on the host, in any state, account or project."""
    plain, projects = await asyncio.gather(
        inv.list("listVirtualMachines", hostid=host_uuid, listall=True),
        inv.list("listVirtualMachines", hostid=host_uuid, listall=True, projectid="-1"),
    )
    seen: dict[str, dict[str, Any]] = {}
    for vm in [*plain, *projects]:
        seen.setdefault(vm["id"], vm)
    return list(seen.values())


async def host_disks(settings: FencerSettings, host_uuid: str) -> HostDisks:
    """Ask CloudStack (listHosts, listVirtualMachines hostid, listVolumes, listStoragePools
    types) where the host's VMs' disks are. Raises DiskLookupError."""
    inv = Inventory(settings)
    try:
        host, vms, pools = await asyncio.gather(
            inv.host(host_uuid), _all_vms(inv, host_uuid), inv.pools()
        )
        volumes = await asyncio.gather(*(inv.volumes(vm) for vm in vms))
    except InventoryError as exc:
        raise DiskLookupError(str(exc)) from None
    finally:
        await inv.close()
    by_uuid = {p.uuid: p for p in pools}
    images: list[str] = []
    nfs = other = 0
    for vols in volumes:
        for vol in vols:
            pool = by_uuid.get(vol.get("storageid", ""))
            if pool is not None and pool.type in RBD_POOL_TYPES:
                key = rbd_disk_path(pool, vol.get("path") or "")
                spec = spec_of(key) if key else None
                if spec is None:
                    other += 1
                elif spec not in images:
                    images.append(spec)
            elif pool is not None and pool.type in NFS_POOL_TYPES:
                nfs += 1
            else:
                other += 1
    address = settings.storage_ip_for(host_uuid, host.ip)
    return HostDisks(address, tuple(images), nfs, other, len(vms))


async def management_ip(settings: FencerSettings, host_uuid: str) -> str:
    """CloudStack's address of the host (listHosts)."""
    inv = Inventory(settings)
    try:
        return (await inv.host(host_uuid)).ip
    finally:
        await inv.close()
