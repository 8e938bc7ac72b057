"""Fixtures: a simulated CloudStack, lab KVM hosts with real SSH, and settings that reach them;
a cloud whose VMs live on RBD images of the session's real Ceph (`ceph`, tests/conftest.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fencing.settings import FencerSettings
from lab.cloudstack_sim import CloudStackSimulator, SimCloud, StoragePool
from lab.kvm_hosts import KvmLab, LabKvmHost
from probes.nfs_ssh import NfsSshProbe
from probes.service import ProbeService
from tests.conftest import Ceph


@dataclass
class World:
    """One cluster: three lab hosts (kvm01 is the suspect), one NFS pool, VMs on kvm01."""

    cloud: SimCloud
    sim: CloudStackSimulator
    lab: KvmLab
    pool: StoragePool
    hosts: list[LabKvmHost]
    settings: FencerSettings

    @property
    def suspect(self) -> LabKvmHost:
        return self.hosts[0]

    def disks(self, host: LabKvmHost | None = None) -> list[Path]:
        return (host or self.suspect).disk_files()

    def heartbeat(self, host: LabKvmHost | None = None) -> Path:
        return (host or self.suspect).heartbeat_file(self.pool.uuid)

    def age_everything(self, at: float) -> None:
        """Set every suspect file's mtime, and its heartbeat content, to `at`."""
        for d in self.disks():
            os.utime(d, (at, at))
        hb = self.heartbeat()
        hb.write_text(f"{int(at)}\n")
        os.utime(hb, (at, at))


@pytest.fixture
async def world() -> AsyncIterator[World]:
    cloud = SimCloud()
    zone = cloud.add_zone()
    cluster = cloud.add_cluster(zone)
    pool = cloud.add_pool(cluster, "nfs1")
    # Writers run once at start and then sleep for an hour: the tests own every mtime.
    lab = KvmLab(cloud, interval=3600)
    hosts = [lab.add_host(cluster, f"kvm0{i}") for i in range(1, 4)]
    for i in range(4):
        vm = cloud.add_vm(hosts[0].cloud_host, f"vm{i}")
        cloud.add_volume(vm, pool)
    async with CloudStackSimulator(cloud) as sim, lab:
        settings = FencerSettings(
            ssh={**lab.ssh_settings(), "max_neighbours": 2, "command_timeout": 2.0},
            cloudstack={"endpoint": sim.url, "api_key": sim.api_key, "secret_key": sim.secret_key},
        )
        yield World(cloud, sim, lab, pool, hosts, settings)


@pytest.fixture
async def service(world: World) -> AsyncIterator[ProbeService]:
    svc = ProbeService(world.settings)
    yield svc
    await svc.close()


@pytest.fixture
async def nfs(world: World) -> AsyncIterator[NfsSshProbe]:
    probe = NfsSshProbe(world.settings)
    yield probe
    await probe.close()


def now() -> float:
    return time.time()


@dataclass
class RbdWorld:
    """One cluster of three lab hosts with an RBD pool (and maybe an NFS one); kvm01 is the
    suspect and `images` are its VMs' RBD disks (pool `rbd`)."""

    cloud: SimCloud
    sim: CloudStackSimulator
    lab: KvmLab
    hosts: list[LabKvmHost]
    settings: FencerSettings
    ceph: Ceph
    rbd_pool: StoragePool
    nfs_pool: StoragePool | None
    images: list[str]

    @property
    def suspect(self) -> LabKvmHost:
        return self.hosts[0]

    def key(self, image: str) -> str:
        """The image's key in a reading's mtimes."""
        return f"rbd:rbd/{image}"


async def rbd_world(ceph: Ceph, nfs_vms: int = 0, rbd_vms: int = 2) -> AsyncIterator[RbdWorld]:
    """Three lab hosts; kvm01 runs `rbd_vms` VMs on RBD images (and `nfs_vms` on NFS)."""
    cloud = SimCloud()
    zone = cloud.add_zone()
    cluster = cloud.add_cluster(zone)
    nfs = cloud.add_pool(cluster, "nfs1") if nfs_vms else None
    rbd = cloud.add_pool(cluster, "ceph1", "127.0.0.1", path="rbd", type="RBD")
    lab = KvmLab(cloud, interval=3600)
    hosts = [lab.add_host(cluster, f"kvm0{i}") for i in range(1, 4)]
    images = []
    for i in range(rbd_vms):
        image = ceph.image()
        images.append(image)
        vm = cloud.add_vm(hosts[0].cloud_host, f"rbd-vm{i}")
        cloud.add_volume(vm, rbd, path=image)
    for i in range(nfs_vms):
        assert nfs is not None
        vm = cloud.add_vm(hosts[0].cloud_host, f"nfs-vm{i}")
        cloud.add_volume(vm, nfs)
    async with CloudStackSimulator(cloud) as sim, lab:
        settings = FencerSettings(
            ssh={**lab.ssh_settings(), "max_neighbours": 2, "command_timeout": 15.0},
            cloudstack={"endpoint": sim.url, "api_key": sim.api_key, "secret_key": sim.secret_key},
            rbd=ceph.rbd_settings(),
        )
        yield RbdWorld(cloud, sim, lab, hosts, settings, ceph, rbd, nfs, images)


@pytest.fixture
async def rworld(ceph_clean: Ceph) -> AsyncIterator[RbdWorld]:
    """kvm01 runs two VMs whose disks are RBD images (no NFS pool)."""
    async for w in rbd_world(ceph_clean):
        yield w


@pytest.fixture
async def mixed_world(ceph_clean: Ceph) -> AsyncIterator[RbdWorld]:
    """kvm01 runs two VMs on RBD and two on NFS."""
    async for w in rbd_world(ceph_clean, nfs_vms=2):
        yield w


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[int]:
    """Debian's OpenSSH sshd on a loopback port, accepting tmp_path/client for this user
    (tmp_path/known_hosts has its host key); yields the port."""
    os.makedirs("/run/sshd", exist_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", tmp_path / "host"], check=True
    )
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", tmp_path / "client"], check=True
    )
    (tmp_path / "authorized_keys").write_text((tmp_path / "client.pub").read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "sshd_config"
    cfg.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {tmp_path / 'host'}\n"
        f"PidFile {tmp_path / 'sshd.pid'}\nAuthorizedKeysFile {tmp_path / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
    )
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", cfg], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.02)
        host_pub = (tmp_path / "host.pub").read_text().split()
        (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
        yield port
    finally:
        proc.terminate()
        proc.wait(5)
