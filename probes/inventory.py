"""CloudStack inventory lookups for probes: which files a suspect host writes, and who its
neighbours are.

Rule: everything here is read from the CloudStack API through fencer's one client
(`fencing.cloudstack`: signed requests, every page fetched); any API or transport failure raises
`InventoryError` (the client's `CloudStackError`), whose text is safe to publish (never a key,
a signature or a request URL) and becomes unknown evidence.
A host's storage is looked up afresh at every check: the VMs CloudStack places on the host now
are the ones whose disks tell whether the host still writes (a VM that CloudStack's HA restarted
elsewhere no longer counts).
"""

from __future__ import annotations

import asyncio
import posixpath
from dataclasses import dataclass
from typing import Any

from fencing.cloudstack import CloudStack, CloudStackError, Row, Rows, host_from_api
from fencing.settings import FencerSettings
from probes.rbd import image_key, spec_of

NFS_POOL_TYPES = {"NetworkFilesystem"}
# The VM states in which a VM placed on the host may run there: CloudStack's own HA restarts
# the Starting, Running and Stopping VMs of a host declared degraded (a stop or start the
# disconnected agent never carried out leaves the VM running in one of them), and a Migrating
# VM runs on its source host until the switch. Only Running was read: a live host whose
# writing VMs were Stopping or Starting had them left out, and looked stale by its idle VMs
# and its heartbeat alone.
PLACED_STATES = frozenset({"Starting", "Running", "Stopping", "Migrating"})
RBD_POOL_TYPES = {"RBD"}  # listStoragePools `type` of a Ceph RBD pool (probes.rbd reads it)
# Pool states in which CloudStack has unmounted the pool from every host (and taken it out of
# the KVM heartbeat): a pool that holds none of the host's disks is then not read at all (no
# neighbour has it mounted, so each check of every host would be "storage not mounted",
# unknown). One that holds a disk of the host is read whatever its state.
UNMOUNTED_POOL_STATES = frozenset({"Maintenance"})


# CloudStack could not tell us what we needed; the message is safe to publish.
InventoryError = CloudStackError


@dataclass(frozen=True)
class KvmHost:
    """A host as listHosts reports it."""

    uuid: str
    name: str
    ip: str
    cluster_uuid: str | None
    zone_uuid: str | None
    state: str
    resourcestate: str
    hypervisor: str = "KVM"


@dataclass(frozen=True)
class Pool:
    """A primary storage pool."""

    uuid: str
    name: str
    type: str
    ipaddress: str | None
    path: str | None
    cluster_uuid: str | None
    zone_uuid: str | None
    scope: str | None
    state: str | None = None  # listStoragePools `state` (Up, Disabled, Maintenance, ...)


@dataclass(frozen=True)
class Disk:
    """One VM disk as the host sees it: `<mount root>/<pool uuid>/<volume path>`."""

    volume_uuid: str
    vm_uuid: str
    pool_uuid: str
    path: str


@dataclass(frozen=True)
class HostStorage:
    """What a suspect host writes: the disks of the VMs that may run on it (`PLACED_STATES`)
    and a heartbeat per NFS pool."""

    host: KvmHost
    pools: tuple[Pool, ...]
    disks: tuple[Disk, ...]
    vm_count: int
    skipped_disks: int  # disks on pools no back end reads (neither NFS nor RBD)
    mount_root: str
    rbd_pools: tuple[Pool, ...] = ()  # RBD pools holding the host's disks
    rbd_disks: tuple[Disk, ...] = ()  # path: "rbd:<ceph pool>/<image>" (probes.rbd)

    def mount_point(self, pool: Pool) -> str:
        """Where KVM mounts `pool`."""
        return posixpath.join(self.mount_root, pool.uuid)

    def heartbeat(self, pool: Pool) -> str:
        """CloudStack's heartbeat file for this host on `pool` (KVMHAMonitor)."""
        return posixpath.join(self.mount_root, pool.uuid, "KVMHA", f"hb-{self.host.ip}")


def kvm_host(row: Row) -> KvmHost:
    """A listHosts row -> KvmHost: the HostRef of `host_from_api` plus the states."""
    ref = host_from_api(row)
    return KvmHost(
        uuid=ref.host_uuid,
        name=ref.host_name or ref.host_uuid,
        ip=ref.ip_address or "",
        cluster_uuid=ref.cluster_uuid,
        zone_uuid=ref.zone_uuid,
        state=row.get("state", ""),
        resourcestate=row.get("resourcestate", ""),
        hypervisor=row.get("hypervisor", ""),
    )


def _pool_from_api(p: dict[str, Any]) -> Pool:
    return Pool(
        uuid=p["id"],
        name=p.get("name", p["id"]),
        type=p.get("type", ""),
        ipaddress=p.get("ipaddress"),
        path=p.get("path"),
        cluster_uuid=p.get("clusterid"),
        zone_uuid=p.get("zoneid"),
        scope=p.get("scope"),
        state=p.get("state"),
    )


def rbd_disk_path(pool: Pool, volume_path: str) -> str | None:
    """`rbd:<ceph pool>/<image>` of a volume on an RBD pool (the pool's `path` is the Ceph pool,
    the volume's `path` the image), or None when either name is not a plain Ceph name."""
    ceph_pool = (pool.path or "").strip("/")
    image = volume_path.strip("/")
    if not ceph_pool or "/" in ceph_pool or "/" in image:
        return None
    key = image_key(ceph_pool, image)
    return key if spec_of(key) else None


def _safe_path(part: str) -> bool:
    # A volume path is a file name under the pool; anything that climbs out or breaks the
    # one-path-per-line protocol of the probes is refused.
    return bool(part) and "\n" not in part and "\x00" not in part and ".." not in part.split("/")


# (inside Inventory, `list` is the method)
_KvmHosts = list[KvmHost]
_Pools = list[Pool]
_Disks = list[Disk]


class Inventory:
    """CloudStack lookups through one shared client (fencing.cloudstack); `close()` when done."""

    def __init__(self, settings: FencerSettings, client: CloudStack | None = None) -> None:
        self._settings = settings
        self.cloudstack = client or CloudStack(settings)

    async def close(self) -> None:
        """Close the HTTP session."""
        await self.cloudstack.close()

    async def list(self, command: str, **params: Any) -> Rows:
        """Every page of a list command (raises InventoryError)."""
        return await self.cloudstack.list(command, **params)

    async def kvm_hosts(self, **params: Any) -> Rows:
        """Every KVM routing host's listHosts row (`params` filter further)."""
        return await self.list("listHosts", type="Routing", hypervisor="KVM", **params)

    async def host(self, host_uuid: str) -> KvmHost:
        """One host by uuid."""
        hosts = await self.list("listHosts", id=host_uuid)
        if not hosts:
            raise InventoryError(f"CloudStack listHosts: no host {host_uuid}", "listHosts")
        return kvm_host(hosts[0])

    async def cluster_hosts(self, cluster_uuid: str) -> _KvmHosts:
        """Every KVM routing host of a cluster (any state; neighbours.py chooses)."""
        return [kvm_host(h) for h in await self.kvm_hosts(clusterid=cluster_uuid)]

    async def running_vms(self, host_uuid: str) -> Rows:
        """VMs that may run on the host (`PLACED_STATES`), in every account and project."""
        # As root admin, no projectid lists only non-project VMs and projectid=-1 lists only
        # project VMs, so both are needed. No state filter: a stopped VM has no host, and the
        # states a VM on the host may still run in are kept below.
        plain, projects = await asyncio.gather(
            self.list("listVirtualMachines", hostid=host_uuid, listall=True),
            self.list("listVirtualMachines", hostid=host_uuid, listall=True, projectid="-1"),
        )
        seen: dict[str, dict[str, Any]] = {}
        for vm in [*plain, *projects]:
            if vm.get("state") in PLACED_STATES:
                seen.setdefault(vm["id"], vm)
        return list(seen.values())

    async def volumes(self, vm: dict[str, Any]) -> Rows:
        """The VM's volumes."""
        extra = {"projectid": "-1"} if vm.get("projectid") else {}
        return await self.list("listVolumes", virtualmachineid=vm["id"], listall=True, **extra)

    async def pools(self) -> _Pools:
        """Every primary storage pool."""
        return [_pool_from_api(p) for p in await self.list("listStoragePools")]

    async def storage_of(self, host_uuid: str) -> HostStorage:
        """The host's disks and heartbeat files, as CloudStack places them now."""
        return await self._lookup(host_uuid)

    async def _lookup(self, host_uuid: str) -> HostStorage:
        host, vms, pools = await asyncio.gather(
            self.host(host_uuid), self.running_vms(host_uuid), self.pools()
        )
        if not host.ip:
            raise InventoryError(
                f"CloudStack listHosts: host {host.name} has no ipaddress", "listHosts"
            )
        by_uuid = {p.uuid: p for p in pools}
        # The pools a KVM host mounts: its cluster's, and the zone-wide ones of its zone (not one
        # CloudStack unmounted for maintenance, unless it holds a disk of the host: below).
        mounted = [
            p
            for p in pools
            if p.type in NFS_POOL_TYPES
            and p.state not in UNMOUNTED_POOL_STATES
            and (
                (p.cluster_uuid is not None and p.cluster_uuid == host.cluster_uuid)
                or (p.scope == "ZONE" and p.zone_uuid in (None, host.zone_uuid))
            )
        ]
        root = self._settings.ssh.mount_root
        disks: _Disks = []
        rbd_pools: _Pools = []
        rbd_disks: _Disks = []
        skipped = 0
        for vm, vols in zip(
            vms, await asyncio.gather(*(self.volumes(v) for v in vms)), strict=True
        ):
            for vol in vols:
                pool = by_uuid.get(vol.get("storageid", ""))
                path = vol.get("path") or ""
                if pool is not None and pool.type in RBD_POOL_TYPES:
                    key = rbd_disk_path(pool, path)
                    if key is None:
                        skipped += 1
                        continue
                    if pool not in rbd_pools:
                        rbd_pools.append(pool)
                    rbd_disks.append(Disk(vol["id"], vm["id"], pool.uuid, key))
                    continue
                if pool is None or pool.type not in NFS_POOL_TYPES or not _safe_path(path):
                    skipped += 1
                    continue
                if pool not in mounted:
                    mounted.append(pool)
                disks.append(
                    Disk(vol["id"], vm["id"], pool.uuid, posixpath.join(root, pool.uuid, path))
                )
        return HostStorage(
            host,
            tuple(mounted),
            tuple(disks),
            len(vms),
            skipped,
            root,
            tuple(rbd_pools),
            tuple(rbd_disks),
        )
