"""Inventory lookups against the CloudStack simulator (signed requests, every page)."""

import posixpath
import time

import pytest
from pydantic import SecretStr

from fencing.records import HostRef, ProbeRequest
from probes.inventory import Inventory, InventoryError
from probes.service import ProbeService

pytestmark = pytest.mark.timeout(30)


async def test_storage_of_a_host_gives_mount_paths_and_heartbeats(world):
    cloud, host = world.cloud, world.suspect.cloud_host
    project_vm = cloud.add_vm(host, "proj-vm", project_uuid="p-1", account="alice")
    project_disk = cloud.add_volume(project_vm, world.pool, name="DATA", type="DATADISK")
    other_vm = cloud.add_vm(host, "stopped", state="Stopped")
    cloud.add_volume(other_vm, world.pool)
    inv = Inventory(world.settings)
    try:
        s = await inv.storage_of(host.uuid)
        # CloudStack's HA restarts one VM elsewhere: the next check no longer counts its disks.
        other = world.lab.by_name("kvm02").uuid
        cloud.set_vm_state(project_vm.uuid, "Running", host_uuid=other)
        again = await inv.storage_of(host.uuid)
    finally:
        await inv.close()
    root = world.settings.ssh.mount_root
    assert s.vm_count == 5 and again.vm_count == 4  # looked up afresh at every check
    assert posixpath.join(root, world.pool.uuid, project_disk.path) not in {
        d.path for d in again.disks
    }
    assert posixpath.join(root, world.pool.uuid, project_disk.path) in {d.path for d in s.disks}
    assert len(s.disks) == 5
    assert [s.heartbeat(p) for p in s.pools] == [f"{root}/{world.pool.uuid}/KVMHA/hb-{host.ip}"]
    assert ("listVirtualMachines", "-1") in {(c, p.get("projectid")) for c, p in cloud.calls}


async def test_the_disks_of_vms_starting_stopping_or_migrating_on_the_host_are_read(world):
    """A stop (or start, or migration) the disconnected agent never carried out leaves a VM
    that still runs on the host in Stopping (Starting, Migrating): CloudStack's own HA counts
    those VMs as the host's. Reading Running VMs only, a live host whose writing VMs were in
    one of these states was judged by its idle VMs and heartbeat alone (stale: fenced)."""
    cloud, host = world.cloud, world.suspect.cloud_host
    states = ("Stopping", "Starting", "Migrating", "Stopped", "Error")
    vols = {}
    for state in states:
        vm = cloud.add_vm(host, f"vm-{state.lower()}")
        vols[state] = cloud.add_volume(vm, world.pool)
        cloud.set_vm_state(vm.uuid, state)
        vm.host_uuid = host.uuid  # (the simulator empties it on Stopped; a row may keep it)
    inv = Inventory(world.settings)
    try:
        s = await inv.storage_of(host.uuid)
    finally:
        await inv.close()
    root = world.settings.ssh.mount_root
    paths = {d.path for d in s.disks}
    for state in states:
        wanted = posixpath.join(root, world.pool.uuid, vols[state].path) in paths
        assert wanted is (state in ("Stopping", "Starting", "Migrating")), state
    assert s.vm_count == 4 + 3


async def test_cluster_hosts_reads_every_page(world):
    cluster = world.cloud.clusters[world.suspect.cloud_host.cluster_uuid]
    for i in range(520):
        world.cloud.add_host(cluster, f"extra{i:03d}", f"10.9.{i // 250}.{i % 250}")
    inv = Inventory(world.settings)
    try:
        hosts = await inv.cluster_hosts(cluster.uuid)
    finally:
        await inv.close()
    assert len(hosts) == 523
    pages = [p.get("page") for c, p in world.cloud.calls if c == "listHosts"]
    assert pages == ["1", "2"]


async def test_bad_secret_is_refused_and_becomes_unknown_evidence(world):
    cs = world.settings.cloudstack.model_copy(update={"secret_key": SecretStr("not-the-secret")})
    settings = world.settings.model_copy(update={"cloudstack": cs})
    inv = Inventory(settings)
    with pytest.raises(InventoryError, match=r"\(401\): unable to verify"):
        await inv.host(world.suspect.uuid)
    await inv.close()
    svc = ProbeService(settings)
    try:
        r = await svc.run(
            ProbeRequest(
                host=HostRef(host_uuid=world.suspect.uuid),
                episode=1,
                check=1,
                suspect_since=time.time(),
                requested_at=time.time(),
            )
        )
    finally:
        await svc.close()
    assert not r.complete and r.reason.startswith("inventory: CloudStack")
    assert (
        "not-the-secret" not in r.model_dump_json() and world.sim.api_key not in r.model_dump_json()
    )


async def test_unreachable_cloudstack_is_a_clean_error(world):
    cs = world.settings.cloudstack.model_copy(update={"endpoint": "http://127.0.0.1:9/client/api"})
    inv = Inventory(world.settings.model_copy(update={"cloudstack": cs}))
    with pytest.raises(InventoryError, match=r"cannot reach 127\.0\.0\.1:9") as err:
        await inv.host("x")
    await inv.close()
    assert "apikey" not in str(err.value).lower() and "signature" not in str(err.value).lower()


async def test_mounted_probe_reads_the_workers_own_filesystem(world):
    suspect = time.time() - 100
    world.age_everything(suspect - 500)
    svc = ProbeService(world.settings, probe_name="mounted")
    req = ProbeRequest(
        host=HostRef(host_uuid=world.suspect.uuid),
        episode=1,
        check=1,
        suspect_since=suspect,
        requested_at=suspect,
    )
    try:
        stale = await svc.run(req)
        world.heartbeat().write_text(f"{int(time.time())}\n")
        alive = await svc.run(req)
    finally:
        await svc.close()
    assert (stale.complete, stale.probe, stale.neighbour) == (True, "mounted", "local")
    hb = str(world.heartbeat())
    assert alive.complete and alive.heartbeats[hb] != stale.heartbeats[hb]
