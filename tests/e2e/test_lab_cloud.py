"""The lab cloud itself, without fencer: the event bus forwarder sends CloudStack's exact records,
a BMC power-off (through Debian's ipmitool) really stops the host, the receivers record what a
real SNMP sender and SMTP client deliver, and each fault knob does to the files what CloudStack
and NFS would (read back with `stat` and `cat` over SSH on a neighbour, as a probe reads them):
agent death stops the heartbeat only, idle VMs leave their disks alone, a filer clock offset
moves every mtime but no heartbeat content, CloudStack's own HA moves a VM and its writes, and
an RBD volume is listed as CloudStack lists it and has no file."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import asyncssh
import pytest
from cs import AIOCloudStack
from pysnmp.hlapi.v3arch.asyncio import (
    CommunityData,
    ContextData,
    NotificationType,
    ObjectIdentity,
    ObjectType,
    SnmpEngine,
    UdpTransportTarget,
    send_notification,
)
from pysnmp.proto.rfc1902 import OctetString

from lab.cloud import BMC_USER, LabCloud
from lab.pipeline import Tap
from notifiers.render import NOTIFICATIONS_OID, OBJECTS_OID
from streams.broker import EmbeddedBroker

pytestmark = pytest.mark.timeout(90)


async def test_forwarder_sends_cloudstacks_exact_records(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    async with LabCloud(broker, hosts=4, root=tmp_path / "lab", interval=0.5) as lab:
        settings = lab.settings()
        tap = await Tap(settings).start([settings.kafka.topics.cloudstack])
        try:
            lab.agent_dies("kvm02")
            await lab.flush()
            published = list(lab.cloud.events)
            assert published, "the simulator published nothing"
            got = await tap.wait_for(
                lambda: len(tap.of(settings.kafka.topics.cloudstack)) >= len(published),
                15,
                "the forwarded records",
            )
            assert got
            received = tap.of(settings.kafka.topics.cloudstack)
            assert [(k, v) for k, v in received] == [(k, json.loads(v)) for k, v in published]
            assert received[0][0] is None  # alerts carry no key, as in CloudStack
            assert "Host disconnected" in received[0][1]["subject"]
        finally:
            await tap.stop()


async def test_bmc_power_off_stops_the_host(broker: EmbeddedBroker, tmp_path: Path) -> None:
    async with LabCloud(broker, hosts=3, root=tmp_path / "lab", interval=0.2) as lab:
        h = lab.host("kvm02")
        pool = lab.pools[0].uuid
        hb = h.heartbeat_file(pool)
        bmc = lab.bmcs["kvm02"]
        env = {**os.environ, "IPMI_PASSWORD": lab.bmc_passwords["kvm02"]}
        cmd = ["ipmitool", "-I", "lanplus", "-H", bmc.address, "-p", str(bmc.port)]
        cmd += ["-U", BMC_USER, "-E", "chassis", "power", "off"]
        done = await asyncio.to_thread(
            subprocess.run, cmd, env=env, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 5
        while h.powered and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not h.powered
        assert lab.power_offs and lab.power_offs[0][1] == "kvm02"
        # The agent's connection does not close with the power: CloudStack notices when it is
        # behind on ping (ping.interval x ping.timeout), as it would a crash.
        assert lab.cloud.hosts[h.uuid].state == "Up"
        limit = lab.cloud.ping_interval * (lab.cloud.ping_timeout + 2)
        assert await _until(lambda: lab.cloud.hosts[h.uuid].state == "Disconnected", limit)
        before = hb.stat().st_mtime
        other = lab.host("kvm01").heartbeat_file(pool)
        other_before = other.stat().st_mtime
        await asyncio.sleep(1.0)
        assert hb.stat().st_mtime == before, "a powered-off host still writes its heartbeat"
        assert await _advances(other, other_before), "the other hosts stopped writing"
        assert lab.bmc_power_offs("kvm02") == 1


async def test_receivers_record_mail_and_traps(broker: EmbeddedBroker, tmp_path: Path) -> None:
    async with LabCloud(broker, hosts=2, root=tmp_path / "lab") as lab:
        await aiosmtplib.send(
            "From: fencer@lab\r\nTo: ops@lab\r\nSubject: [fencer] hello\r\n\r\nbody\r\n",
            sender="fencer@lab",
            recipients=["ops@lab"],
            hostname="127.0.0.1",
            port=lab.mail.port,
        )
        engine = SnmpEngine()
        try:
            err, *_ = await send_notification(
                engine,
                CommunityData("public", mpModel=1),
                await UdpTransportTarget.create(("127.0.0.1", lab.traps.port)),
                ContextData(),
                "trap",
                NotificationType(ObjectIdentity((*NOTIFICATIONS_OID, 3))).add_varbinds(
                    ObjectType(ObjectIdentity((*OBJECTS_OID, 1, 0)), OctetString("kvm09"))
                ),
            )
        finally:
            engine.close_dispatcher()
        assert err is None
        deadline = time.monotonic() + 5
        while not lab.traps.traps and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert [m.subject for m in lab.mail.mails] == ["[fencer] hello"]
        assert lab.mail.mails[0].to == ("ops@lab",)
        (trap,) = lab.traps.traps
        assert trap.kind == "fence_succeeded" and trap.version == "v2c"
        assert trap.varbinds["fencerHostName"] == "kvm09"
        assert lab.traps.errors == []


# ---------------------------------------------------------------------------------------------
# The fault knobs, seen from a neighbour


async def _read(lab: LabCloud, via: str, files: list[Path]) -> dict[Path, tuple[float, str]]:
    """{file: (mtime as `stat` on host `via` reports it, content if small)} over real SSH."""
    h = lab.host(via)
    script = "; ".join(
        f"stat -c %.9Y {shlex.quote(str(f))}; head -c 40 {shlex.quote(str(f))} | tr -dc 0-9; echo"
        for f in files
    )
    async with asyncssh.connect(
        h.ip,
        port=lab.kvm.port,
        username="root",
        client_keys=[str(lab.kvm.client_key_file)],
        known_hosts=str(lab.kvm.known_hosts_file),
        agent_path=None,
    ) as conn:
        # stdin at EOF: the lab's exec handler (like a real shell) reads it to the end.
        done = await conn.run(script, stdin=asyncssh.DEVNULL, check=True, timeout=20)
    lines = str(done.stdout).splitlines()
    assert len(lines) == 2 * len(files), lines
    return {f: (float(lines[2 * i]), lines[2 * i + 1]) for i, f in enumerate(files)}


async def _until(predicate: Any, within: float) -> bool:
    """Whether `predicate()` becomes true within `within` seconds (polled)."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _mtime(seen: dict[Path, tuple[float, str]], f: Path) -> float:
    return seen[f][0]


async def _advances(f: Path, before: float, within: float = 10.0) -> bool:
    """Whether `f` is written again after `before` (its mtime then), waiting up to `within`."""
    deadline = time.monotonic() + within
    while f.stat().st_mtime == before and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return f.stat().st_mtime != before


async def test_agent_death_stops_the_heartbeat_not_the_disks(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    async with LabCloud(broker, hosts=3, root=tmp_path / "lab", interval=0.2) as lab:
        h = lab.host("kvm02")
        hb = h.heartbeat_file(lab.pools[0].uuid)
        disks = h.disk_files()
        assert len(disks) == 2
        files = [hb, *disks]
        lab.agent_dies("kvm02")
        assert lab.cloud.hosts[h.uuid].state == "Disconnected"
        await asyncio.sleep(0.4)  # a write round already under way ends
        a = await _read(lab, "kvm01", files)
        await asyncio.sleep(1.2)
        b = await _read(lab, "kvm01", files)
        assert b[hb] == a[hb], "the heartbeat moved with the agent dead"
        assert all(_mtime(b, d) > _mtime(a, d) for d in disks), "the VMs stopped writing"

        lab.agent_recovers("kvm02")
        recovered = int(time.time())
        # CloudStack: Connecting until its monitor's next pass, then Up.
        assert lab.cloud.hosts[h.uuid].state == "Connecting"
        assert await _until(lambda: lab.cloud.hosts[h.uuid].state == "Up", 5)
        await asyncio.sleep(1.2)
        c = await _read(lab, "kvm01", files)
        assert _mtime(c, hb) > _mtime(b, hb) and int(c[hb][1]) > int(b[hb][1])
        # the content is the host's clock at a write after the recovery (however late the
        # read came on a loaded machine)
        assert recovered <= int(c[hb][1]) <= time.time()

        await lab.crash("kvm02")
        await asyncio.sleep(0.4)
        d = await _read(lab, "kvm01", files)
        other = lab.host("kvm03").heartbeat_file(lab.pools[0].uuid)
        other_before = other.stat().st_mtime
        await asyncio.sleep(1.2)
        e = await _read(lab, "kvm01", files)
        assert e == d, "a crashed host still writes"
        assert await _advances(other, other_before), "the other hosts stopped writing"


async def test_idle_vms_leave_their_disks_alone(broker: EmbeddedBroker, tmp_path: Path) -> None:
    async with LabCloud(
        broker, hosts=3, root=tmp_path / "lab", interval=0.2, idle_hosts=("kvm02",)
    ) as lab:
        pool = lab.pools[0].uuid
        idle_host = lab.host("kvm02")
        busy = lab.host("kvm03")
        idle_vm, busy_vm = lab.vms_of("kvm03")
        lab.kvm.set_vm_idle(idle_vm)
        (idle_disk,) = busy.disk_files([idle_vm])
        (busy_disk,) = busy.disk_files([busy_vm])
        files = [idle_host.heartbeat_file(pool), *idle_host.disk_files(), idle_disk, busy_disk]
        await asyncio.sleep(0.4)
        a = await _read(lab, "kvm01", files)
        await asyncio.sleep(1.2)
        b = await _read(lab, "kvm01", files)
        assert _mtime(b, files[0]) > _mtime(a, files[0]), "an idle host's agent stopped"
        for f in [*idle_host.disk_files(), idle_disk]:
            assert b[f] == a[f], f"idle disk {f.name} was written"
        assert _mtime(b, busy_disk) > _mtime(a, busy_disk), "a busy VM stopped writing"

        lab.vms_go_idle("kvm02", False)
        lab.kvm.set_vm_idle(idle_vm, False)
        await asyncio.sleep(1.2)
        c = await _read(lab, "kvm01", files)
        assert all(_mtime(c, f) > _mtime(b, f) for f in files), "the VMs did not resume"
        with pytest.raises(KeyError):
            lab.kvm.set_vm_idle("no-such-vm")


@pytest.mark.parametrize("offset", [-480.0, 480.0])
async def test_filer_clock_offset_moves_every_mtime_not_the_heartbeat_content(
    broker: EmbeddedBroker, tmp_path: Path, offset: float
) -> None:
    async with LabCloud(
        broker, hosts=3, root=tmp_path / "lab", interval=0.2, filer_offset=offset
    ) as lab:
        lab.vms_go_idle("kvm03")  # its disks keep the stamp of their creation
        h = lab.host("kvm02")
        hb = h.heartbeat_file(lab.pools[0].uuid)
        files = [hb, *h.disk_files(), *lab.host("kvm03").disk_files()]
        await asyncio.sleep(0.5)
        seen = await _read(lab, "kvm01", files)
        now = time.time()
        # Within 60 s of the expected clock: far from the 480 s offset either way, and room for
        # a loaded machine (the idle disks keep the stamp of the lab's start).
        for f in files:
            assert abs(_mtime(seen, f) - (now + offset)) < 60, (f.name, _mtime(seen, f), now)
        assert abs(int(seen[hb][1]) - now) < 60, "heartbeat content is not the host's clock"

        lab.set_filer_offset(0.0)  # NTP fixed on the filer
        await asyncio.sleep(0.6)
        seen = await _read(lab, "kvm01", files[:3])
        now = time.time()
        assert all(abs(_mtime(seen, f) - now) < 60 for f in files[:3])


async def test_cloudstack_ha_restart_moves_the_vm_and_its_writes(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    async with LabCloud(broker, hosts=3, root=tmp_path / "lab", interval=0.2) as lab:
        assert lab.sim is not None
        suspect = lab.host("kvm02")
        moved_vm, stay_vm = lab.vms_of("kvm02")
        (moved_disk,) = suspect.disk_files([moved_vm])
        (stay_disk,) = suspect.disk_files([stay_vm])
        with pytest.raises(ValueError, match="Up"):
            lab.vms_restarted_elsewhere("kvm02")  # CloudStack restarts nothing of an Up host
        await lab.crash("kvm02")
        assert await _until(lambda: lab.cloud.hosts[suspect.uuid].state == "Disconnected", 10)
        moved = lab.vms_restarted_elsewhere("kvm02", [moved_vm])
        assert moved == {moved_vm: "kvm01"}
        async with AIOCloudStack(lab.sim.url, lab.sim.api_key, lab.sim.secret_key) as api:
            got = await api.listVirtualMachines(id=moved_vm, listall="true")
            on_suspect = await api.listVirtualMachines(hostid=suspect.uuid, listall="true")
        (vm,) = got["virtualmachine"]
        assert (vm["hostid"], vm["hostname"], vm["state"]) == (
            lab.host("kvm01").uuid,
            "kvm01",
            "Running",
        )
        assert [v["id"] for v in on_suspect["virtualmachine"]] == [stay_vm]
        steps = [
            (json.loads(v)["old-state"], json.loads(v)["new-state"])
            for k, v in lab.cloud.events
            if k == moved_vm and "postStateTransitionEvent" in v
        ]
        assert steps == [("Running", "Stopped"), ("Stopped", "Starting"), ("Starting", "Running")]
        await asyncio.sleep(0.4)
        a = await _read(lab, "kvm03", [moved_disk, stay_disk])
        await asyncio.sleep(1.2)
        b = await _read(lab, "kvm03", [moved_disk, stay_disk])
        assert _mtime(b, moved_disk) > _mtime(a, moved_disk), "the new host does not write it"
        assert b[stay_disk] == a[stay_disk], "a VM of the crashed host is written"
        assert lab.restarted_elsewhere("kvm02") == [moved_vm]

        # A host CloudStack merely lost keeps running what it ran: split brain, as for real.
        alive = lab.host("kvm03")
        lab.agent_dies("kvm03")
        vm3 = lab.vms_of("kvm03")[0]
        lab.vms_restarted_elsewhere("kvm03", [vm3])
        assert vm3 in alive.vms() and vm3 in lab.host("kvm01").vms()
        await lab.crash("kvm03")
        assert vm3 not in alive.vms()


async def test_rbd_volume_is_listed_as_cloudstack_lists_it_and_has_no_file(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    async with LabCloud(
        broker, hosts=3, root=tmp_path / "lab", interval=0.2, rbd_hosts=("kvm02",)
    ) as lab:
        assert lab.sim is not None and lab.rbd_pool is not None
        rbd_vm, nfs_vm = lab.vms_of("kvm02")
        async with AIOCloudStack(lab.sim.url, lab.sim.api_key, lab.sim.secret_key) as api:
            pools = (await api.listStoragePools(clusterid=lab.cluster.uuid))["storagepool"]
            vols = (await api.listVolumes(virtualmachineid=rbd_vm, listall="true"))["volume"]
        rbd = [p for p in pools if p["type"] == "RBD"]
        assert [p["type"] for p in pools].count("NetworkFilesystem") == 1
        assert len(rbd) == 1
        assert {k: rbd[0][k] for k in ("id", "name", "ipaddress", "path", "scope", "state")} == {
            "id": lab.rbd_pool.uuid,
            "name": "rbd1",
            "ipaddress": "10.0.0.7",
            "path": "rbd",
            "scope": "CLUSTER",
            "state": "Up",
        }
        (vol,) = vols
        assert (vol["storageid"], vol["storage"], vol["type"]) == (
            lab.rbd_pool.uuid,
            "rbd1",
            "ROOT",
        )
        h = lab.host("kvm02")
        # Nothing to stat: no mount point, no heartbeat, no file for the RBD volume.
        assert h.disk_files([rbd_vm]) == []
        assert h.pools() == [lab.pools[0].uuid]
        assert not (lab.kvm.mount_root / lab.rbd_pool.uuid).exists()
        (nfs_disk,) = h.disk_files([nfs_vm])
        a = await _read(lab, "kvm01", [nfs_disk])
        await asyncio.sleep(1.2)
        b = await _read(lab, "kvm01", [nfs_disk])
        assert _mtime(b, nfs_disk) > _mtime(a, nfs_disk)


# ---------------------------------------------------------------------------------------------
# CloudStack's host state machine: hosts move on by themselves, as AgentManagerImpl moves them


def _alerts(lab: LabCloud, host: str) -> list[tuple[str, str]]:
    """(subject, body) of every host alert published about host `host` (name or numeric id)."""
    h = lab.cloud.hosts[lab.host(host).uuid]
    out = []
    for key, value in lab.cloud.events:
        v = json.loads(value)
        if key is None and v.get("event") == "ALERT.COMPUTE.HOST":
            s = v["subject"]
            if f"name: {h.name} " in s or s == f"Host down, {h.numeric_id}":
                out.append((s, v["body"]))
    return out


async def _listed(lab: LabCloud, name: str) -> dict[str, Any]:
    """The host as listHosts answers it, over the simulator's signed HTTP API."""
    assert lab.sim is not None
    async with AIOCloudStack(lab.sim.url, lab.sim.api_key, lab.sim.secret_key) as api:
        (h,) = (await api.listHosts(id=lab.host(name).uuid))["host"]
    return dict(h)


async def test_a_crash_is_noticed_at_the_ping_timeout_and_goes_to_alert_after_alert_wait(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    async with LabCloud(broker, hosts=3, root=tmp_path / "lab", interval=0.5) as lab:
        c = lab.cloud
        c.alert_wait = 6.0  # alert.wait, scaled further for the test
        uuid = lab.host("kvm02").uuid
        # An Up agent pings: lastpinged moves, shown as CloudStack shows it (January 1970).
        first = c.hosts[uuid].lastpinged
        assert await _until(lambda: c.hosts[uuid].lastpinged > first, 3 * c.ping_interval)
        shown = await _listed(lab, "kvm02")
        assert shown["state"] == "Up" and shown["lastpinged"].startswith("1970-01-")
        await lab.crash("kvm02")
        crashed = time.monotonic()
        pinged = c.hosts[uuid].lastpinged
        # Nothing closes the agent's connection: Up until it is behind on ping.
        await asyncio.sleep(c.ping_interval * c.ping_timeout * 0.6)
        assert c.hosts[uuid].state == "Up" and _alerts(lab, "kvm02") == []
        assert await _until(lambda: c.hosts[uuid].state != "Up", 3 * c.ping_interval)
        noticed = time.monotonic() - crashed
        # (the monitor's passes are one ping.interval apart: the crash fell between two)
        assert c.ping_interval * (c.ping_timeout - 1) <= noticed
        assert c.hosts[uuid].state == "Disconnected"
        ((subject, body),) = _alerts(lab, "kvm02")
        assert subject.startswith("Host disconnected, name: kvm02 (id:")
        assert "is not restarted within alert.wait seconds, host will go to Alert state" in body
        shown = await _listed(lab, "kvm02")
        # A host that lost its connection has no management server; the date of its
        # disconnection stays after it is Up again.
        assert shown["disconnected"] and "managementserverid" not in shown
        # alert.wait after its last ping: Alert (WaitedTooLong publishes nothing).
        assert await _until(lambda: c.hosts[uuid].state == "Alert", c.alert_wait + 5)
        assert time.time() - pinged >= c.alert_wait
        assert len(_alerts(lab, "kvm02")) == 1
        assert c.hosts[uuid].lastpinged == pinged
        assert c.investigations and set(d for n, d in c.investigations) == {"Disconnected"}
        # disconnectAgent stamps `disconnected` again at the Alert.
        alerted = (await _listed(lab, "kvm02"))["disconnected"]
        assert alerted > shown["disconnected"]
        # Powered on again: its agent reconnects, Connecting first, then Up, pinging again.
        await lab.recovers("kvm02")
        assert c.hosts[uuid].state == "Connecting"
        assert (await _listed(lab, "kvm02"))["state"] == "Connecting"
        assert await _until(lambda: c.hosts[uuid].state == "Up", 3 * c.ping_interval)
        assert c.hosts[uuid].lastpinged > pinged
        assert len(_alerts(lab, "kvm02")) == 1  # a reconnect publishes nothing
        back = await _listed(lab, "kvm02")
        assert back["state"] == "Up" and back["managementserverid"]
        assert back["disconnected"] == alerted
        assert "disconnected" not in await _listed(lab, "kvm03")  # never disconnected


async def test_the_investigator_finds_a_crashed_host_down_and_cloudstack_restarts_its_vms(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    async with LabCloud(
        broker, hosts=3, root=tmp_path / "lab", interval=0.5, investigator=True
    ) as lab:
        c = lab.cloud
        h = c.hosts[lab.host("kvm02").uuid]
        vms = lab.vms_of("kvm02")
        await lab.crash("kvm02")
        assert await _until(lambda: h.state == "Down", c.ping_interval * (c.ping_timeout + 3))
        # (a heartbeat written just before the crash may still be fresh at the first
        # investigation: Disconnected then, Down at the monitor's next pass)
        alerts = _alerts(lab, "kvm02")
        subjects = [s for s, _b in alerts]
        first = subjects.index(f"Host down, {h.numeric_id}")
        assert all(s.startswith("Host disconnected, ") for s in subjects[:first]), subjects
        assert subjects[first + 1].startswith("Host is down, name: kvm02 (id:")
        (_s, body), (_s2, body2) = alerts[first : first + 2]
        assert body == f'Host Host {{"id":{h.numeric_id},"name":"kvm02","type":"Routing",' + (
            f'"uuid":"{h.uuid}"}} is down. Starting HA on the VMs'
        )
        assert "Starting HA on the following VMs: " in body2
        # CloudStack's own VM-HA, no fence: the VMs run elsewhere; the BMC was never asked.
        assert await _until(lambda: sorted(lab.restarted_elsewhere("kvm02")) == sorted(vms), 10)
        assert lab.bmc_power_offs("kvm02") == 0
        assert ("kvm02", "Down") in c.investigations


async def test_the_investigator_takes_a_live_host_whose_agent_died_for_down_split_brain(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """#2890: the heartbeat lives in the agent; the agent dies, the host and its VMs live on,
    the neighbours find the heartbeat stale and CloudStack restarts the VMs elsewhere: each VM
    then runs twice, its disk written from two hosts."""
    async with LabCloud(
        broker, hosts=3, root=tmp_path / "lab", interval=0.5, investigator=True
    ) as lab:
        c = lab.cloud
        live = lab.host("kvm02")
        h = c.hosts[live.uuid]
        vms = lab.vms_of("kvm02")
        lab.agent_dies("kvm02")
        # Investigated at once: the heartbeat is fresh, the neighbours say Up: Disconnected.
        assert h.state == "Disconnected" and c.investigations[-1] == ("kvm02", "Disconnected")
        assert await _until(lambda: h.state == "Down", c.ping_interval * (c.ping_timeout + 3))
        assert await _until(lambda: sorted(lab.restarted_elsewhere("kvm02")) == sorted(vms), 10)
        assert live.powered and sorted(live.vms()) == sorted(vms)  # still running them
        disks = live.disk_files(vms)
        before = {d: d.stat().st_mtime for d in disks}
        await asyncio.sleep(1.0)
        assert all(d.stat().st_mtime > before[d] for d in disks)


async def test_the_investigator_cannot_read_the_heartbeat_in_a_storage_outage(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    async with LabCloud(
        broker, hosts=3, root=tmp_path / "lab", interval=0.5, investigator=True
    ) as lab:
        c = lab.cloud
        h = c.hosts[lab.host("kvm02").uuid]
        lab.storage_outage()
        await lab.crash("kvm02")
        assert await _until(lambda: h.state != "Up", c.ping_interval * (c.ping_timeout + 3))
        await asyncio.sleep(2 * c.ping_interval)
        assert h.state == "Disconnected" and lab.restarted_elsewhere("kvm02") == []
        assert "Down" not in {d for _n, d in c.investigations}
