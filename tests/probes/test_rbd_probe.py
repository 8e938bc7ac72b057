"""The RBD probe against a real Ceph (one monitor, one memstore OSD), through real SSH to lab
neighbours, with librbd clients holding watches from each lab host's own address.

The probe reports readings (watchers of the suspect's address as live signs, modify_timestamp
as each image's mtime); where a test needs a verdict it runs the core's own `step`."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from types import SimpleNamespace

import pytest

from fencing.decision import HostRecord, HostState, step
from fencing.events import Evidence, HostDisconnected, ProposeFence, RunProbe, Tick
from fencing.policy import Policy
from fencing.records import HostRef, ProbeRequest, ProbeResult
from fencing.settings import FencerSettings, HostSettings
from lab.ceph import LabRbd
from lab.cloudstack_sim import CloudStackSimulator, SimCloud
from lab.kvm_hosts import KvmLab
from probes.base import PoolTarget, ProbeTarget
from probes.rbd import CEPH_HEALTH, RbdProbe, parse_output, watcher_ip
from probes.service import ProbeService
from streams.codec import probe_finished

pytestmark = pytest.mark.timeout(60)


def request(world, check: int = 1, episode: int = 1) -> ProbeRequest:
    now = time.time()
    return ProbeRequest(
        host=HostRef(host_uuid=world.suspect.uuid),
        episode=episode,
        check=check,
        suspect_since=now,
        requested_at=now,
    )


async def probe(world, settings=None, check: int = 1) -> ProbeResult:
    svc = ProbeService(settings or world.settings)
    try:
        return await svc.run(request(world, check))
    finally:
        await svc.close()


async def test_watch_of_the_suspects_address_is_a_live_sign(rworld):
    a, b = rworld.images
    c = rworld.ceph.cluster
    with c.client(f"rbd/{a}", rworld.suspect.ip):
        execs = sum(h.execs for h in rworld.hosts)
        r = await probe(rworld)
        execs = sum(h.execs for h in rworld.hosts) - execs
    assert r.complete and r.reason is None, r.reason
    assert r.probe == "rbd" and r.neighbour in ("kvm02", "kvm03")
    assert execs == 1  # one exec for all of the host's images
    assert len(r.live_signs) == 1
    assert r.live_signs[0].startswith(f"watcher {rworld.suspect.ip}:0/")
    assert r.live_signs[0].endswith(f"of {rworld.suspect.ip} on rbd/{a}")
    assert set(r.mtimes) == {rworld.key(a), rworld.key(b)}
    assert all(abs(v - time.time()) < 120 for v in r.mtimes.values())  # epoch seconds, UTC
    assert (r.files_wanted, r.unreadable, r.min_gap) == (2, 0, 6.0)
    print(f"one RBD check of 2 images: {r.duration:.2f} s")


async def test_anothers_watch_on_the_hosts_image_is_unknown_unless_ignored(rworld):
    """A watch from an address that is not the host's is no sign of the host's life, and most
    likely IS the host on an unnamed storage network: unknown, unless the operator says ignore."""
    a, b = rworld.images
    c = rworld.ceph.cluster
    other = rworld.hosts[1].ip
    ignore = rworld.settings.rbd.model_copy(update={"foreign_watchers": "ignore"})
    with c.client(f"rbd/{a}", rworld.suspect.ip), c.client(f"rbd/{b}", other):
        default = await probe(rworld)
        ignored = await probe(rworld, rworld.settings.model_copy(update={"rbd": ignore}))
    assert not default.complete and default.reason is not None
    assert default.reason.startswith(
        f"foreign watcher: rbd/{b} watched from {other}, not the host's storage address "
        f"{rworld.suspect.ip}"
    ), default.reason
    assert ignored.complete and len(ignored.live_signs) == 1 and f"rbd/{a}" in ignored.live_signs[0]


async def test_the_storage_ip_setting_names_the_hosts_watchers(rworld):
    a = rworld.images[0]
    storage_ip = "127.0.2.200"  # the host's Ceph-network address differs from its management one
    hosts = {rworld.suspect.uuid: HostSettings(storage_ip=storage_ip)}
    settings = rworld.settings.model_copy(update={"hosts": hosts})
    with rworld.ceph.cluster.client(f"rbd/{a}", storage_ip):
        by_storage_ip = await probe(rworld, settings)
        by_management_ip = await probe(rworld)
    assert by_storage_ip.complete and by_storage_ip.live_signs
    assert storage_ip in by_storage_ip.live_signs[0]
    # Without the setting the host's own watch is not recognised: never stale, unknown, saying why.
    assert not by_management_ip.complete and by_management_ip.live_signs == []
    assert f"watched from {storage_ip}" in (by_management_ip.reason or "")
    assert "hosts.<uuid>.storage_ip" in (by_management_ip.reason or "")


async def test_a_write_advances_modify_timestamp_on_the_osds_clock(rworld):
    a = rworld.images[0]
    with rworld.ceph.cluster.client(f"rbd/{a}", rworld.suspect.ip) as vm:
        before = await probe(rworld)
        # The client's rbd_mtime_update_interval is 1 s (whole seconds, from the stored value), and
        # librbd stamps the image asynchronously after the write.
        await asyncio.sleep(2.1)
        assert vm.write() == "ok"
        for _ in range(10):
            after = await probe(rworld)
            if after.mtimes.get(rworld.key(a)) != before.mtimes[rworld.key(a)]:
                break
            await asyncio.sleep(0.3)
    assert before.complete and after.complete
    assert after.mtimes[rworld.key(a)] > before.mtimes[rworld.key(a)]
    b = rworld.key(rworld.images[1])
    assert after.mtimes[b] == before.mtimes[b]  # untouched image: same value, same clock


async def test_crashed_host_watch_expires_and_the_core_judges_stale(rworld):
    """check 1 sees the host's watch (alive); the host dies (SIGKILL: no clean close); its watch
    lingers until the watch timeout, then a complete reading without it and without an mtime
    change, at least min_gap after the previous one, is stale: the core proposes a fence."""
    a = rworld.images[0]
    policy = Policy(check_interval=1.0, extra_checks=0)
    record = HostRecord(rworld.suspect.uuid)
    t0 = time.time()
    record, _ = step(record, HostDisconnected(t0), policy)
    vm = rworld.ceph.cluster.client(f"rbd/{a}", rworld.suspect.ip).start()
    svc = ProbeService(rworld.settings)
    killed_at = None
    seen: list[tuple[float, Evidence | None, int]] = []
    proposal = None
    try:
        while proposal is None and time.time() - t0 < 40:
            record, actions = step(record, Tick(time.time()), policy)
            for act in actions:
                if isinstance(act, ProposeFence):
                    proposal = act
                if not isinstance(act, RunProbe):
                    continue
                req = ProbeRequest(
                    host=HostRef(host_uuid=rworld.suspect.uuid),
                    episode=act.episode,
                    check=act.check,
                    suspect_since=act.suspect_since,
                    requested_at=time.time(),
                )
                result = await svc.run(req)
                record, after = step(record, probe_finished(result, time.time()), policy)
                proposal = next((x for x in after if isinstance(x, ProposeFence)), proposal)
                seen.append((time.time(), record.last_evidence, len(result.live_signs)))
                if killed_at is None and result.live_signs:
                    vm.kill()  # the host crashes right after the baseline check saw it
                    killed_at = time.time()
            await asyncio.sleep(0.3)
    finally:
        vm.kill()
        vm.close()
        await svc.close()
    assert killed_at is not None and seen[0][1:] == (Evidence.ALIVE, 1)
    assert proposal is not None, seen
    assert record.state is HostState.FENCE_PROPOSED and record.stale_count == 1
    # No stale verdict while the dead client's watch still showed, nor before min_gap.
    watch_seen = [at for at, _, signs in seen if signs]
    stale_at = next(at for at, ev, _ in seen if ev is Evidence.STALE)
    assert stale_at > max(watch_seen)
    assert stale_at - killed_at >= rworld.settings.rbd.watch_timeout
    assert any(signs for at, _, signs in seen if at > killed_at)  # it did linger a while
    print(f"kill -> stale verdict {stale_at - killed_at:.1f} s; checks: {seen}")


async def test_stopped_monitor_is_an_incomplete_reading_naming_it(rworld):
    c = rworld.ceph.cluster
    c.stop_mon()
    started = time.monotonic()
    r = await probe(rworld)
    took = time.monotonic() - started
    assert not r.complete and r.reason is not None
    assert r.reason.startswith("ceph unreachable"), r.reason
    assert r.live_signs == [] and r.mtimes == {}
    # connect timeout 3 s per neighbour, two neighbours, and room for a loaded CI machine; a
    # probe without its own timeout would wait on the Ceph client's (300 s)
    assert took < 30
    c.start_mon()
    assert (await probe(rworld)).complete


async def test_refused_keyring_is_an_incomplete_reading(rworld, tmp_path):
    forged = tmp_path / "ceph.client.fencer-probe.keyring"
    gen = rworld.ceph.cluster.run(
        "ceph-authtool", "--create-keyring", str(forged), "--gen-key", "-n", "client.fencer-probe"
    )
    assert gen.returncode == 0
    rbd = rworld.settings.rbd.model_copy(update={"keyring": str(forged)})
    r = await probe(rworld, rworld.settings.model_copy(update={"rbd": rbd}))
    assert not r.complete and r.reason is not None
    assert "keyring refused" in r.reason, r.reason
    assert str(forged.read_text()).split("key = ")[1].strip() not in r.model_dump_json()


async def test_missing_image_is_absent_and_the_rest_still_read(rworld):
    rworld.ceph.cluster.run("rbd", "rm", f"rbd/{rworld.images[1]}")
    r = await probe(rworld)
    assert r.complete and set(r.mtimes) == {rworld.key(rworld.images[0])}
    assert r.files_wanted == 2
    # listed as missing, as an NFS disk whose stat failed: the core calls the reading unknown
    # when the image was read before in the episode
    assert r.missing == [rworld.key(rworld.images[1])]


def test_an_image_whose_status_or_info_fails_makes_the_reading_incomplete():
    """Any failure but ENOENT (EIO, a timeout, a refused key) on one image: incomplete, so
    unknown whatever the core knows. ENOENT: the image is gone, listed as missing."""
    health = json.dumps({"status": "HEALTH_OK"})
    specs = ["rbd/a", "rbd/b", "rbd/c"]
    out = f"N 1\nH {health}\nW 0 100 []\nX 1 5 EIO\nX 2 2 No such file\nD\n"
    r = parse_output(specs, out)
    assert r.problem == "image unreadable: rbd/b: ceph unreachable: EIO"
    target = ProbeTarget(
        "h1", "kvm01", "10.0.0.11", 0.0, (PoolTarget("rbd", "rbd", None, ("rbd:rbd/a",)),)
    )
    probe = RbdProbe(FencerSettings())
    outcome = probe._outcome(target, specs, r, 1.0, "kvm02", time.monotonic())
    assert not outcome.complete and outcome.reason == r.problem
    gone = parse_output(specs, out.replace("X 1 5 EIO", "W 1 100 []"))
    outcome = probe._outcome(target, specs, gone, 1.0, "kvm02", time.monotonic())
    assert outcome.complete and outcome.missing == ("rbd:rbd/c",)
    assert set(outcome.mtimes) == {"rbd:rbd/a", "rbd:rbd/b"}


async def test_host_with_nfs_and_rbd_disks_gets_both_back_ends_in_one_reading(mixed_world):
    w = mixed_world
    a = w.images[0]
    with w.ceph.cluster.client(f"rbd/{a}", w.suspect.ip):
        both = await probe(w)
        w.lab.storage_outage(w.nfs_pool.uuid)
        try:
            nfs_down = await probe(w)
        finally:
            w.lab.storage_restored(w.nfs_pool.uuid)
    assert both.complete, both.reason
    assert both.probe == "nfs+rbd"
    rbd_keys = {k for k in both.mtimes if k.startswith("rbd:")}
    nfs_files = {k for k in both.mtimes if k.startswith("/")}
    assert rbd_keys == {w.key(i) for i in w.images}
    assert len(nfs_files) == 3  # two disks and the heartbeat file
    assert len(both.heartbeats) == 1 and len(both.live_signs) == 1
    assert (both.files_wanted, both.unreadable, both.min_gap) == (5, 0, 6.0)
    # One back end's incomplete reading makes the merged one incomplete, naming which.
    assert not nfs_down.complete and nfs_down.reason.startswith("nfs: storage not mounted")
    assert nfs_down.live_signs  # still shown; the core does not judge an incomplete reading


async def test_disks_on_pools_no_back_end_reads_are_counted_unreadable(rworld):
    local = rworld.cloud.add_pool(None, "local1", type="Filesystem")
    vm = rworld.cloud.add_vm(rworld.suspect.cloud_host, "local-vm")
    rworld.cloud.add_volume(vm, local)
    r = await probe(rworld)
    assert r.complete and r.unreadable == 1 and r.probe == "rbd"


def test_health_err_makes_the_reading_incomplete():
    health = {"status": "HEALTH_ERR", "checks": {"OSD_FULL": {}}, "mutes": []}
    out = f"N 1\nH {json.dumps(health)}\nD\n"
    assert parse_output([], out).problem == f"{CEPH_HEALTH}: HEALTH_ERR (OSD_FULL)"
    warn = {"status": "HEALTH_WARN", "checks": {"POOL_NO_REDUNDANCY": {}}}
    assert parse_output([], f"N 1\nH {json.dumps(warn)}\nD\n").problem is None


@pytest.mark.parametrize(
    ("address", "ip"),
    [
        ("127.0.2.11:0/4147887291", "127.0.2.11"),
        ("v2:10.0.0.5:0/1", "10.0.0.5"),
        ("[fd00::5]:0/77", "fd00::5"),
        ("[fd00:0:0::05]:0/77", "fd00::5"),
    ],
)
def test_watcher_address_to_ip(address, ip):
    assert watcher_ip(address) == ip


async def test_lab_rbd_watchers_stay_when_the_agent_dies_and_expire_when_the_host_crashes(
    ceph_clean,
):
    cloud = SimCloud()
    cluster = cloud.add_cluster(cloud.add_zone())
    lab = KvmLab(cloud, interval=3600)
    hosts = [lab.add_host(cluster, f"kvm0{i}") for i in range(1, 4)]
    rbd = LabRbd(ceph_clean.cluster, cloud, lab)
    rbd.add_pool(cluster)
    rbd.add_disk(cloud.add_vm(hosts[0].cloud_host, "vm0"))
    rbd.add_disk(cloud.add_vm(hosts[1].cloud_host, "vm1"))
    async with CloudStackSimulator(cloud) as sim, lab:
        settings = FencerSettings(
            ssh={**lab.ssh_settings(), "command_timeout": 15.0},
            cloudstack={"endpoint": sim.url, "api_key": sim.api_key, "secret_key": sim.secret_key},
            rbd=ceph_clean.rbd_settings(),
        )
        world = SimpleNamespace(suspect=hosts[0], settings=settings)
        rbd.sync()
        try:
            hosts[0].agent_dies()
            agent_dead = await probe(world)
            await rbd.crash(hosts[0])
            crashed_at = time.monotonic()
            while rbd.watchers_of(hosts[0].ip) and time.monotonic() - crashed_at < 30:
                await asyncio.sleep(0.2)
            expired_after = time.monotonic() - crashed_at
            crashed = await probe(world)
            others = rbd.watchers_of(hosts[1].ip)
        finally:
            rbd.close()
    assert agent_dead.complete and len(agent_dead.live_signs) == 1
    assert crashed.complete and crashed.live_signs == [] and len(crashed.mtimes) == 1
    # lingered, then expired (Ceph's own timer: room for a loaded CI machine)
    assert 2 < expired_after < settings.rbd.watch_timeout + 20
    assert len(others) == 1  # kvm02's VM still runs


async def test_neighbour_without_the_ceph_python_modules_is_an_incomplete_reading(rworld):
    # fencer's own venv Python has no python3-rados: a neighbour set up without ceph-common.
    rbd = rworld.settings.rbd.model_copy(update={"python": sys.executable})
    r = await probe(rworld, rworld.settings.model_copy(update={"rbd": rbd}))
    assert not r.complete and r.reason is not None
    assert "command failed: no python3-rados/python3-rbd on the neighbour" in r.reason


async def test_rbd_neighbours_that_failed_are_asked_after_the_others_next_time(rworld):
    """One neighbour per check: the RBD reading through kvm02 fails (no python3-rados there,
    as in the test above); the suspect's next check asks kvm03 first (rotation), not kvm02."""
    rbd = rworld.settings.rbd.model_copy(update={"python": sys.executable})
    ssh = rworld.settings.ssh.model_copy(update={"max_neighbours": 1})
    svc = ProbeService(rworld.settings.model_copy(update={"rbd": rbd, "ssh": ssh}))
    try:
        first = await svc.run(request(rworld))
        assert not first.complete and "[kvm02]" in (first.reason or "")
        second = await svc.run(request(rworld, check=2))
        assert "[kvm03]" in (second.reason or "")  # the next neighbour, though it fails too
        third = await svc.run(request(rworld, check=3))
        assert "[kvm02]" in (third.reason or "")  # passed over longest ago: its turn again
    finally:
        await svc.close()
