"""The NFS probe through real SSH (asyncssh lab hosts on loopback) over real files.

The probe reports readings (mtimes on the filer's clock, heartbeat contents, completeness); the
core judges them against earlier readings, so these tests check what was read, never a verdict."""

import asyncio
import os
import time

import asyncssh
import pytest

from fencing.records import HostRef, ProbeRequest
from probes.base import Neighbour, PoolTarget, ProbeTarget
from probes.nfs_ssh import NfsSshProbe
from probes.service import ProbeService

pytestmark = pytest.mark.timeout(30)


def request(world, suspect_since: float, episode: int = 1) -> ProbeRequest:
    return ProbeRequest(
        host=HostRef(host_uuid=world.suspect.uuid),
        episode=episode,
        check=1,
        suspect_since=suspect_since,
        requested_at=suspect_since,
    )


async def test_reading_reports_each_files_mtime_as_the_filer_stamped_it(world, service):
    suspect = time.time() - 100
    world.age_everything(suspect - 500)
    os.utime(world.disks()[2], (suspect + 5, suspect + 5))
    r = await service.run(request(world, suspect))
    assert r.complete and r.reason is None
    assert r.mtimes[str(world.disks()[2])] == int(suspect + 5)
    assert sorted(r.mtimes.values()).count(int(suspect - 500)) == 4
    assert (len(r.mtimes), r.files_wanted, r.unreadable) == (5, 5, 0)
    assert r.neighbour in ("kvm02", "kvm03")
    # the lab's hosts share this clock: the offset is the SSH round trip's share only (room for a
    # loaded CI machine), nowhere near a wrong unit or a missing clock line
    assert r.neighbour_offset is not None and abs(r.neighbour_offset) < 15


async def test_heartbeat_content_is_reported_raw_and_the_filer_offset_measured(world, service):
    suspect = time.time() - 100
    world.age_everything(suspect - 500)
    written = int(time.time()) - 30  # the host's clock 30 s behind the filer's
    world.heartbeat().write_text(f"{written}\n")
    r = await service.run(request(world, suspect))
    assert r.complete
    assert r.heartbeats[str(world.heartbeat())].strip() == str(written)
    assert r.filer_offset is not None and 28 <= r.filer_offset <= 32


async def test_everything_old_is_stale(world, service):
    suspect = time.time() - 100
    world.age_everything(suspect - 500)
    r = await service.run(request(world, suspect))
    assert r.complete and set(r.mtimes.values()) == {int(suspect - 500)}
    assert r.heartbeats[str(world.heartbeat())].strip() == str(int(suspect - 500))
    assert (len(r.mtimes), r.probe) == (5, "nfs")


async def test_missing_files_are_counted_one_by_one(world, service):
    suspect = time.time() - 100
    world.age_everything(suspect - 500)
    world.disks()[0].unlink()
    world.disks()[1].unlink()
    r = await service.run(request(world, suspect))
    assert r.complete  # the rest are read; the core judges what the missing ones mean
    assert (len(r.mtimes), r.files_wanted) == (3, 5)
    assert sorted(r.missing) == sorted(str(d) for d in world.disks()[:2])


async def test_first_neighbour_down_second_answers(world, service):
    suspect = time.time() - 100
    world.age_everything(suspect - 500)
    kvm02 = world.lab.by_name("kvm02")
    await kvm02.ssh_unreachable("refuse")
    r = await service.run(request(world, suspect))
    assert r.complete and r.neighbour == "kvm03"
    # The one that answered is asked first next time, even after kvm02 is back.
    await kvm02.recover()
    before = kvm02.execs
    r2 = await service.run(request(world, suspect, episode=2))
    assert r2.neighbour == "kvm03" and kvm02.execs == before


async def test_no_neighbour_reachable_is_unknown_with_every_reason(world, service):
    suspect = time.time() - 100
    world.age_everything(suspect - 500)
    await world.lab.by_name("kvm02").ssh_unreachable("refuse")
    await world.lab.by_name("kvm03").crash(state=None)  # CloudStack has not noticed yet
    r = await service.run(request(world, suspect))
    assert not r.complete and r.mtimes == {}
    assert r.reason.count("unreachable") == 2 and "[kvm02]" in r.reason and "[kvm03]" in r.reason
    # Once CloudStack shows them down, nobody is left to ask.
    world.cloud.set_host_state(world.lab.by_name("kvm02").uuid, "Alert")
    world.cloud.set_host_state(world.lab.by_name("kvm03").uuid, "Disconnected")
    r = await service.run(request(world, suspect, episode=2))
    assert not r.complete and r.reason.startswith("no neighbour")


async def test_wrong_host_key_is_unknown_and_says_why(world, service):
    suspect = time.time() - 100
    world.age_everything(suspect - 500)
    for h in world.hosts:
        h.host_key = asyncssh.generate_private_key("ssh-ed25519")  # keys changed, known_hosts not
        await h.start_ssh()
    r = await service.run(request(world, suspect))
    assert not r.complete
    assert r.reason.startswith("host key mismatch") and "not in ssh.known_hosts" in r.reason


async def test_unauthorised_client_key_is_auth_failed(world):
    other = world.lab.root / "other_key"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(other))
    settings = world.settings.model_copy(
        update={"ssh": world.settings.ssh.model_copy(update={"key_file": other})}
    )
    svc = ProbeService(settings)
    try:
        r = await svc.run(request(world, time.time()))
    finally:
        await svc.close()
    assert not r.complete and r.reason.startswith("auth failed")


async def test_command_timeout_is_unknown_and_partial_output_is_not_trusted(world, service):
    suspect = time.time() - 100
    world.age_everything(suspect - 500)
    for h in world.hosts[1:]:
        h.slow_exec(20)
    started = time.monotonic()
    r = await service.run(request(world, suspect))
    assert not r.complete
    assert r.reason.startswith("timeout") and r.reason.count("timeout") == 2
    # two neighbours x command_timeout 2 s, and room for a loaded CI machine; a probe that
    # waited for the hanging commands would take their 20 s
    assert time.monotonic() - started < 12


async def test_hung_ssh_endpoint_times_out_on_connect(world, service):
    suspect = time.time() - 100
    world.age_everything(suspect - 500)
    await world.lab.by_name("kvm02").ssh_unreachable("hang")
    r = await service.run(request(world, suspect))
    assert r.complete and r.neighbour == "kvm03"


async def test_storage_outage_is_unknown(world, service):
    suspect = time.time() - 100
    world.age_everything(suspect - 500)
    world.lab.storage_outage()
    r = await service.run(request(world, suspect))
    assert not r.complete and r.reason.startswith("storage not mounted")
    world.lab.storage_restored()
    assert (await service.run(request(world, suspect))).complete


async def test_thousand_files_in_one_exec_over_one_connection(world, nfs):
    suspect = time.time() - 100
    root = world.lab.mount_root / world.pool.uuid
    paths = []
    for i in range(1000):
        p = root / f"vol-{i:04d} with space"
        p.write_bytes(b"")
        os.utime(p, (suspect - 10, suspect - 10))
        paths.append(str(p))
    os.utime(paths[777], (suspect + 1, suspect + 1))
    world.age_everything(suspect - 500)
    kvm02 = world.lab.by_name("kvm02")
    target = ProbeTarget(
        world.suspect.uuid,
        "kvm01",
        world.suspect.ip,
        suspect,
        (PoolTarget(world.pool.uuid, str(root), str(world.heartbeat()), tuple(paths)),),
        (Neighbour(kvm02.uuid, "kvm02", kvm02.ip),),
    )
    before = kvm02.execs
    out = await nfs.check(target)
    assert out.complete and out.mtimes[paths[777]] == int(suspect + 1)
    assert (len(out.mtimes), out.files_wanted) == (1001, 1001)
    assert kvm02.execs - before == 1
    os.utime(paths[777], (suspect - 10, suspect - 10))
    outs = await asyncio.gather(*(nfs.check(target) for _ in range(3)))
    assert all(o.complete and o.mtimes[paths[777]] == int(suspect - 10) for o in outs)
    assert nfs.pool.connects == 1 and kvm02.execs - before == 4


async def test_pooled_connection_that_died_is_replaced(world, nfs):
    suspect = time.time() - 100
    world.age_everything(suspect - 500)
    kvm02 = world.lab.by_name("kvm02")
    target = ProbeTarget(
        world.suspect.uuid,
        "kvm01",
        world.suspect.ip,
        suspect,
        (
            PoolTarget(
                world.pool.uuid,
                str(world.lab.mount_root / world.pool.uuid),
                str(world.heartbeat()),
                tuple(str(d) for d in world.disks()),
            ),
        ),
        (Neighbour(kvm02.uuid, "kvm02", kvm02.ip),),
    )
    assert (await nfs.check(target)).complete
    await kvm02.stop_ssh()  # drops the established connection
    await kvm02.start_ssh()
    assert (await nfs.check(target)).complete
    assert nfs.pool.connects == 2


async def test_missing_known_hosts_refuses_to_probe(world):
    settings = world.settings.model_copy(
        update={"ssh": world.settings.ssh.model_copy(update={"known_hosts": None})}
    )
    probe = NfsSshProbe(settings)
    kvm02 = world.lab.by_name("kvm02")
    out = await probe.check(
        ProbeTarget("h", None, None, 0.0, (), (Neighbour(kvm02.uuid, "kvm02", kvm02.ip),))
    )
    await probe.close()
    assert not out.complete and "known_hosts is not set" in out.reason


@pytest.mark.parametrize("shell", ["bash", "dash"])
def test_remote_script_gives_the_same_reading_under_bash_and_dash(world, shell):
    import subprocess

    from probes.nfs_ssh import build_command, parse_output

    suspect = time.time() - 100
    world.age_everything(suspect - 500)
    world.disks()[0].unlink()
    target = ProbeTarget(
        world.suspect.uuid,
        "kvm01",
        world.suspect.ip,
        suspect,
        (
            PoolTarget(
                world.pool.uuid,
                str(world.lab.mount_root / world.pool.uuid),
                str(world.heartbeat()),
                (*tuple(str(d) for d in world.disks(world.suspect)), "/nope/x"),
            ),
        ),
    )
    command, stdin = build_command(target)
    before = time.time()
    out = subprocess.run([shell, "-c", command], input=stdin, capture_output=True, text=True).stdout
    after = time.time()
    reading = parse_output(target, out, 0.0)
    assert reading.complete and int(before) <= reading.now <= after  # the shell's own clock
    assert reading.heartbeat_values[str(world.heartbeat())] == str(int(suspect - 500))
    assert len(reading.mtimes) == 4 and "/nope/x" not in reading.mtimes  # 3 disks + heartbeat
    assert set(reading.mounted.values()) == {True}


async def test_host_without_files_still_gets_an_answer(world, nfs):
    kvm02 = world.lab.by_name("kvm02")
    target = ProbeTarget(
        "h",
        "kvm09",
        "10.0.0.99",
        time.time(),
        (PoolTarget(world.pool.uuid, str(world.lab.mount_root / world.pool.uuid), None, ()),),
        (Neighbour(kvm02.uuid, "kvm02", kvm02.ip),),
    )
    out = await nfs.check(target)
    assert not out.complete and out.reason.startswith("no files")


async def test_a_neighbour_that_failed_is_asked_after_the_others_at_the_next_check(world):
    """One neighbour per check (max_neighbours 1): kvm02 refuses SSH, the check is unknown.
    The next check of the suspect asks kvm03 first (rotation), not kvm02 again: a host that one
    neighbour cannot look at does not stay unknown while another can."""
    suspect = time.time() - 100
    world.age_everything(suspect - 500)
    ssh = world.settings.ssh.model_copy(update={"max_neighbours": 1})
    svc = ProbeService(world.settings.model_copy(update={"ssh": ssh}))
    kvm02, kvm03 = world.lab.by_name("kvm02"), world.lab.by_name("kvm03")
    try:
        await kvm02.ssh_unreachable("refuse")
        r1 = await svc.run(request(world, suspect))
        assert not r1.complete and "[kvm02]" in r1.reason and kvm03.execs == 0
        await kvm02.recover()
        r2 = await svc.run(request(world, suspect))
        assert r2.complete and r2.neighbour == "kvm03"
        world.disks()[0].unlink()  # a disk kvm03 (and every neighbour) cannot stat now
        r3 = await svc.run(request(world, suspect))
        assert r3.complete and r3.neighbour == "kvm03" and r3.missing
        r4 = await svc.run(request(world, suspect))
        assert r4.neighbour == "kvm02"  # kvm03 lacked a file: the other is asked first
    finally:
        await svc.close()
