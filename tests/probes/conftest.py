"""Fixtures: a simulated CloudStack, lab KVM hosts with real SSH, and settings that reach them."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fencing.settings import FencerSettings
from lab.cloudstack_sim import CloudStackSimulator, SimCloud, StoragePool
from lab.kvm_hosts import KvmLab, LabKvmHost
from probes.nfs_ssh import NfsSshProbe
from probes.service import ProbeService


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
