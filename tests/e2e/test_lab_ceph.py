"""The lab cloud on a real Ceph, without fencer: the RBD pool and its volumes are listed as
CloudStack lists them and each volume is a real image; each Running VM's qemu (a librbd client
bound to its host's address) watches its image; the agent dying leaves the watches, a power-off
through the BMC (Debian's ipmitool) kills them without unwatching, so they linger the watch
timeout and expire; CloudStack restarting the VMs elsewhere opens them from the new host.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from cs import AIOCloudStack

from lab.cloud import BMC_USER, LabCloud
from streams.broker import EmbeddedBroker
from tests.conftest import WATCH_TIMEOUT, Ceph

pytestmark = pytest.mark.timeout(120)


async def _watches(lab: LabCloud, name: str) -> list[str]:
    return await asyncio.to_thread(lab.rbd_watchers, name)


async def test_lab_vms_hold_real_watches_that_follow_the_host(
    broker: EmbeddedBroker, tmp_path: Path, ceph_clean: Ceph
) -> None:
    async with LabCloud(
        broker,
        hosts=3,
        root=tmp_path / "lab",
        interval=0.2,
        rbd_only_hosts=("kvm02",),
        ceph=ceph_clean.cluster,
    ) as lab:
        assert lab.sim is not None and lab.rbd_pool is not None
        vms = lab.vms_of("kvm02")
        async with AIOCloudStack(lab.sim.url, lab.sim.api_key, lab.sim.secret_key) as api:
            pools = (await api.listStoragePools(clusterid=lab.cluster.uuid))["storagepool"]
            vols = [
                v
                for vm in vms
                for v in (await api.listVolumes(virtualmachineid=vm, listall="true"))["volume"]
            ]
        (rbd,) = [p for p in pools if p["type"] == "RBD"]
        assert (rbd["ipaddress"], rbd["path"]) == ("127.0.0.1", "rbd")  # monitor, Ceph pool
        assert len(vols) == 2 and {v["storageid"] for v in vols} == {rbd["id"]}
        for v in vols:  # a volume's path is its image in the Ceph pool
            info = ceph_clean.cluster.run("rbd", "info", f"rbd/{v['path']}", "--format", "json")
            assert json.loads(info.stdout)["name"] == v["path"]

        h = lab.host("kvm02")
        watches = await _watches(lab, "kvm02")
        assert len(watches) == 2 and all(f" {h.ip}:0/" in w for w in watches), watches
        assert await _watches(lab, "kvm01") == []

        lab.agent_dies("kvm02")  # CloudStack loses the agent; qemu lives on
        await asyncio.sleep(1.5)
        assert len(await _watches(lab, "kvm02")) == 2

        bmc = lab.bmcs["kvm02"]
        env = {**os.environ, "IPMI_PASSWORD": lab.bmc_passwords["kvm02"]}
        cmd = ["ipmitool", "-I", "lanplus", "-H", bmc.address, "-p", str(bmc.port)]
        cmd += ["-U", BMC_USER, "-E", "chassis", "power", "off"]
        done = await asyncio.to_thread(
            subprocess.run, cmd, env=env, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        off = time.monotonic()
        while h.powered and time.monotonic() - off < 5:
            await asyncio.sleep(0.05)
        assert not h.powered
        assert len(await _watches(lab, "kvm02")) == 2  # a dead client's watch lingers ...
        while await _watches(lab, "kvm02") and time.monotonic() - off < WATCH_TIMEOUT + 10:
            await asyncio.sleep(0.2)
        lingered = time.monotonic() - off
        assert await _watches(lab, "kvm02") == []  # ... then expires
        assert WATCH_TIMEOUT - 1.5 < lingered < WATCH_TIMEOUT + 10, lingered

        moved = lab.vms_restarted_elsewhere("kvm02")
        assert sorted(moved) == sorted(vms)
        new = set(moved.values())
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if sum([len(await _watches(lab, n)) for n in new]) == 2:
                break
            await asyncio.sleep(0.2)
        assert sum([len(await _watches(lab, n)) for n in new]) == 2
        assert await _watches(lab, "kvm02") == []
