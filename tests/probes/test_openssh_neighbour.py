"""The NFS probe against Debian's OpenSSH sshd (the server real KVM hosts run)."""

import os
import socket
import time

import pytest

from fencing.settings import FencerSettings
from probes.base import Neighbour, PoolTarget, ProbeTarget
from probes.nfs_ssh import NfsSshProbe

pytestmark = pytest.mark.timeout(30)


async def test_openssh_neighbour_reports_stale_then_alive(sshd, tmp_path):
    import getpass

    mnt = tmp_path / "mnt"
    pool = mnt / "pool-1"
    (pool / "KVMHA").mkdir(parents=True)
    suspect = time.time() - 100
    disks = []
    for i in range(20):
        d = pool / f"disk-{i}"
        d.write_bytes(b"")
        os.utime(d, (suspect - 50, suspect - 50))
        disks.append(str(d))
    hb = pool / "KVMHA" / "hb-10.0.0.11"
    hb.write_text(f"{int(suspect - 50)}\n")
    settings = FencerSettings(
        ssh={
            "user": getpass.getuser(),
            "port": sshd,
            "key_file": str(tmp_path / "client"),
            "known_hosts": str(tmp_path / "known_hosts"),
            "mount_root": str(mnt),
        }
    )
    probe = NfsSshProbe(settings)
    target = ProbeTarget(
        "h1",
        "kvm01",
        "10.0.0.11",
        suspect,
        (PoolTarget("pool-1", str(pool), str(hb), (*disks, str(pool / "gone"))),),
        (Neighbour("n1", "kvm02", "127.0.0.1"),),
    )
    try:
        stale = await probe.check(target)
        hb.write_text(f"{int(time.time())}\n")
        alive = await probe.check(target)
    finally:
        await probe.close()
    assert stale.complete, stale.reason
    assert (len(stale.mtimes), stale.files_wanted) == (21, 22)  # 20 disks + heartbeat, 1 gone
    assert alive.complete and alive.neighbour == "kvm02"
    # The heartbeat's content advanced between the two readings: what the core calls alive.
    assert alive.heartbeats[str(hb)] != stale.heartbeats[str(hb)]
    assert probe.pool.connects == 1 and probe.round_trips == 2


@pytest.mark.parametrize("how", ["removed", "dangling symlink"])
async def test_a_busy_disk_unreadable_on_the_neighbour_makes_the_core_say_unknown(
    sshd, tmp_path, how
):
    """A live host whose agent died (heartbeat unchanged), its busy VM's disk suddenly not
    readable by the neighbour, its other VMs idle: through real OpenSSH and the probe's remote
    script, the probe lists the disk missing and the core's verdict is unknown, never stale."""
    import getpass

    from fencing.decision import HostRecord, step
    from fencing.events import Evidence, HostDisconnected, RunProbe, Tick
    from fencing.policy import Policy
    from fencing.records import HostRef, ProbeRequest, ProbeResult
    from streams.codec import probe_finished

    mnt = tmp_path / "mnt"
    pool = mnt / "pool-1"
    (pool / "KVMHA").mkdir(parents=True)
    (pool / "vols").mkdir()
    old = time.time() - 1000
    busy = pool / "vols" / "busy.qcow2"
    idle = [pool / f"idle-{i}.qcow2" for i in range(3)]
    for d in (busy, *idle):
        d.write_bytes(b"")
        os.utime(d, (old, old))
    hb = pool / "KVMHA" / "hb-10.0.0.11"
    hb.write_text(f"{int(old)}\n")
    os.utime(hb, (old, old))
    settings = FencerSettings(
        ssh={
            "user": getpass.getuser(),
            "port": sshd,
            "key_file": str(tmp_path / "client"),
            "known_hosts": str(tmp_path / "known_hosts"),
            "mount_root": str(mnt),
        }
    )
    disks = (str(busy), *map(str, idle))
    target = ProbeTarget(
        "h1",
        "kvm01",
        "10.0.0.11",
        old,
        (PoolTarget("pool-1", str(pool), str(hb), disks),),
        (Neighbour("n1", "kvm02", "127.0.0.1"),),
    )
    policy = Policy(check_interval=60.0, extra_checks=0, unknown_alert_after=1)
    record, _ = step(HostRecord("h1"), HostDisconnected(at=1000.0), policy)
    probe = NfsSshProbe(settings)

    async def check(at: float) -> tuple[ProbeResult, HostRecord, tuple]:
        nonlocal record
        record, actions = step(record, Tick(at=at), policy)
        (run,) = [a for a in actions if isinstance(a, RunProbe)]
        request = ProbeRequest(
            host=HostRef(host_uuid="h1"),
            episode=run.episode,
            check=run.check,
            suspect_since=run.suspect_since,
            requested_at=at,
        )
        outcome = await probe.check(target)
        # through the wire record and the codec, as the watch worker gets it
        wire = ProbeResult.model_validate_json(outcome.to_result(request, at).model_dump_json())
        record, actions = step(record, probe_finished(wire, at + 1), policy)
        return wire, record, actions

    try:
        first, record, _ = await check(1001.0)
        assert first.complete and first.missing == [] and record.last_evidence is Evidence.BASELINE
        # between two checks, the busy disk can no longer be read on the neighbour
        if how == "removed":
            busy.rename(pool / "vols" / "busy.qcow2.moved")
        else:
            (pool / "vols").rename(pool / "vols.moved")
            (pool / "vols").symlink_to(tmp_path / "nowhere")
        second, record, actions = await check(1062.0)
    finally:
        await probe.close()
    assert second.complete, second.reason  # every pool answered, the idle disks were read
    assert second.missing == [str(busy)]
    assert set(second.mtimes) == {*map(str, idle), str(hb)}
    assert record.last_evidence is Evidence.UNKNOWN  # was stale: the host would be fenced
    assert record.reason == (
        f"1 of the files read before could not be read now (gone, or their stat failed): {busy}"
    )
    assert record.stale_count == 0 and record.state.value == "suspect"
    assert [a.kind.value for a in actions] == ["cannot_verify"]


async def test_a_heartbeat_whose_content_cannot_be_read_makes_the_core_say_unknown(sshd, tmp_path):
    """The heartbeat file's stat works (same mtime as before) but its content cannot be read
    now: through real OpenSSH and the probe's remote script, the probe lists it in
    `unread_contents` (not `missing`: its stat worked) and the core's verdict is unknown, never
    stale. (The tests run as root, whom no permission stops from reading: a directory put in
    the heartbeat's place, with its old mtime, is a file whose stat works and whose read fails.)"""
    import getpass

    from fencing.decision import HostRecord, step
    from fencing.events import Evidence, HostDisconnected, RunProbe, Tick
    from fencing.policy import Policy
    from fencing.records import HostRef, ProbeRequest, ProbeResult
    from streams.codec import probe_finished

    mnt = tmp_path / "mnt"
    pool = mnt / "pool-1"
    (pool / "KVMHA").mkdir(parents=True)
    old = time.time() - 1000
    disks = [pool / f"idle-{i}.qcow2" for i in range(3)]
    for d in disks:
        d.write_bytes(b"")
        os.utime(d, (old, old))
    hb = pool / "KVMHA" / "hb-10.0.0.11"
    hb.write_text(f"{int(old)}\n")
    os.utime(hb, (old, old))
    settings = FencerSettings(
        ssh={
            "user": getpass.getuser(),
            "port": sshd,
            "key_file": str(tmp_path / "client"),
            "known_hosts": str(tmp_path / "known_hosts"),
            "mount_root": str(mnt),
        }
    )
    target = ProbeTarget(
        "h1",
        "kvm01",
        "10.0.0.11",
        old,
        (PoolTarget("pool-1", str(pool), str(hb), tuple(map(str, disks))),),
        (Neighbour("n1", "kvm02", "127.0.0.1"),),
    )
    policy = Policy(check_interval=60.0, extra_checks=0, unknown_alert_after=1)
    record, _ = step(HostRecord("h1"), HostDisconnected(at=1000.0), policy)
    probe = NfsSshProbe(settings)

    async def check(at: float) -> tuple[ProbeResult, HostRecord, tuple]:
        nonlocal record
        record, actions = step(record, Tick(at=at), policy)
        (run,) = [a for a in actions if isinstance(a, RunProbe)]
        request = ProbeRequest(
            host=HostRef(host_uuid="h1"),
            episode=run.episode,
            check=run.check,
            suspect_since=run.suspect_since,
            requested_at=at,
        )
        outcome = await probe.check(target)
        wire = ProbeResult.model_validate_json(outcome.to_result(request, at).model_dump_json())
        record, actions = step(record, probe_finished(wire, at + 1), policy)
        return wire, record, actions

    try:
        first, record, _ = await check(1001.0)
        assert first.complete and first.heartbeats == {str(hb): f"{int(old)}"}
        assert first.unread_contents == [] and record.last_evidence is Evidence.BASELINE
        hb.unlink()
        hb.mkdir()
        os.utime(hb, (old, old))
        second, record, actions = await check(1062.0)
    finally:
        await probe.close()
    assert second.complete, second.reason
    assert second.missing == [] and second.heartbeats == {}
    assert second.mtimes[str(hb)] == first.mtimes[str(hb)]  # its stat works, unchanged
    assert second.unread_contents == [str(hb)]
    assert record.last_evidence is Evidence.UNKNOWN  # was stale: the host would be fenced
    assert record.reason == (
        "1 of the files read before could not be read now (gone, their stat failed, or their "
        f"content unreadable): {hb}"
    )
    assert record.stale_count == 0 and record.state.value == "suspect"
    assert [a.kind.value for a in actions] == ["cannot_verify"]


async def test_a_busy_disk_one_neighbour_cannot_read_is_read_by_the_next_neighbour(sshd, tmp_path):
    """A dead host (nothing writes): its busy VM's disk becomes unreadable to neighbour kvm02
    only (hidden in the mount namespace of kvm02's own Debian sshd), kvm03 (the fixture's sshd)
    still reads it. The probe no longer stops at kvm02's complete reading that lacks the disk:
    it asks kvm03, whose reading alone is the check's (never a mix), and the core, comparing it
    with the reference kvm02 read (the filer's mtimes, the host's heartbeat content), says
    stale, not unknown for ever. kvm02 is named as passed over (asked after kvm03 next time)."""
    import getpass
    import subprocess

    from fencing.decision import HostRecord, step
    from fencing.events import Evidence, HostDisconnected, RunProbe, Tick
    from fencing.policy import Policy
    from fencing.records import HostRef, ProbeRequest, ProbeResult
    from streams.codec import probe_finished

    mnt = tmp_path / "mnt"
    pool = mnt / "pool-1"
    (pool / "KVMHA").mkdir(parents=True)
    (pool / "vols").mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    old = time.time() - 1000
    busy = pool / "vols" / "busy.qcow2"
    idle = [pool / f"idle-{i}.qcow2" for i in range(3)]
    for d in (busy, *idle):
        d.write_bytes(b"")
        os.utime(d, (old, old))
    hb = pool / "KVMHA" / "hb-10.0.0.11"
    hb.write_text(f"{int(old)}\n")
    os.utime(hb, (old, old))
    # kvm02: a second sshd on 127.0.0.2 (the same port and host key) in a mount namespace of
    # its own, where the busy disk's directory can be covered later
    cfg = (tmp_path / "sshd_config").read_text()
    cfg = cfg.replace("ListenAddress 127.0.0.1", "ListenAddress 127.0.0.2").replace(
        "sshd.pid", "sshd2.pid"
    )
    (tmp_path / "sshd2_config").write_text(cfg)
    known = tmp_path / "known_hosts"
    line = known.read_text().splitlines()[0]
    known.write_text(f"{line}\n{line.replace('[127.0.0.1]', '[127.0.0.2]')}\n")
    kvm02 = subprocess.Popen(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "/usr/sbin/sshd",
            "-D",
            "-e",
            "-f",
            str(tmp_path / "sshd2_config"),
        ],
        stderr=subprocess.DEVNULL,
    )
    settings = FencerSettings(
        ssh={
            "user": getpass.getuser(),
            "port": sshd,
            "key_file": str(tmp_path / "client"),
            "known_hosts": str(known),
            "mount_root": str(mnt),
        }
    )
    target = ProbeTarget(
        "h1",
        "kvm01",
        "10.0.0.11",
        old,
        (PoolTarget("pool-1", str(pool), str(hb), (str(busy), *map(str, idle))),),
        (Neighbour("n2", "kvm02", "127.0.0.2"), Neighbour("n3", "kvm03", "127.0.0.1")),
    )
    policy = Policy(check_interval=60.0, extra_checks=0, unknown_alert_after=1)
    record, _ = step(HostRecord("h1"), HostDisconnected(at=1000.0), policy)
    probe = NfsSshProbe(settings)

    async def check(at: float) -> tuple:
        nonlocal record
        record, actions = step(record, Tick(at=at), policy)
        (run,) = [a for a in actions if isinstance(a, RunProbe)]
        request = ProbeRequest(
            host=HostRef(host_uuid="h1"),
            episode=run.episode,
            check=run.check,
            suspect_since=run.suspect_since,
            requested_at=at,
        )
        outcome = await probe.check(target)
        wire = ProbeResult.model_validate_json(outcome.to_result(request, at).model_dump_json())
        record, actions = step(record, probe_finished(wire, at + 1), policy)
        return outcome, record, actions

    try:
        deadline = time.monotonic() + 5
        while True:  # kvm02's sshd listening
            try:
                socket.create_connection(("127.0.0.2", sshd), 0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "kvm02's sshd did not start"
                time.sleep(0.02)
        first, record, _ = await check(1001.0)
        assert first.complete and first.neighbour == "kvm02" and first.passed_over == ()
        assert first.missing == () and record.last_evidence is Evidence.BASELINE
        subprocess.run(
            [
                "nsenter",
                "-t",
                str(kvm02.pid),
                "-m",
                "mount",
                "--bind",
                str(empty),
                str(pool / "vols"),
            ],
            check=True,
        )
        second, record, _ = await check(1062.0)
    finally:
        await probe.close()
        kvm02.terminate()
        kvm02.wait(5)
    assert second.complete and second.missing == ()
    assert second.neighbour == "kvm03" and second.passed_over == ("kvm02",)
    assert str(busy) in second.mtimes
    assert record.last_evidence is Evidence.STALE  # was unknown: kvm02 alone lacked the disk
