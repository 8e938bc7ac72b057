"""Every disk file is opened (nothing read) before its mtime is taken, so that on an NFS mount
with the default `cto` the client revalidates the file's attributes with the server
(close-to-open) instead of answering the stat from its attribute cache.

This lab has no NFS server or client: what these tests show is that every file is opened, once,
without a byte read, and that a file whose open fails is still reported with its mtime; not the
revalidation itself. Opens are seen with inotify (IN_OPEN), whoever makes them: the shell that
sshd started for the probe, or the mounted probe's worker thread."""

from __future__ import annotations

import asyncio
import getpass
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from fencing.settings import FencerSettings
from probes import nfs_ssh
from probes.base import Neighbour, PoolTarget, ProbeTarget
from probes.mounted import MountedProbe, read_local
from probes.nfs_ssh import NfsSshProbe, build_command, parse_output
from tests.probes.inotify import IN_ACCESS, IN_OPEN, Inotify
from tests.probes.pool_files import Pool, assert_each_disk_opened_once_and_nothing_read

pytestmark = pytest.mark.timeout(60)

# The script without its open loops: what the probe ran before (the detector's control).
_LOOPS = (
    ('for p in "${f[@]}"; do true <"$p"; done 2>/dev/null\n  exec', "exec"),
    (
        'sh -c \'for p in "$@"; do true <"$p"; done; exec stat -c "S %Y %n" -- "$@"\' sh',
        "stat -c 'S %Y %n' --",
    ),
)


def _without_open_loops() -> str:
    script = nfs_ssh.REMOTE_SCRIPT
    for old, new in _LOOPS:
        assert old in script, "the open loop changed: update this test's control"
        script = script.replace(old, new)
    assert "true <" not in script
    return script


async def test_openssh_neighbour_opens_every_disk_before_its_stat(sshd, tmp_path):
    """Through Debian's sshd, the user's login shell (bash here) running the script."""
    pool = Pool(tmp_path / "mnt")
    settings = FencerSettings(
        ssh={
            "user": getpass.getuser(),
            "port": sshd,
            "key_file": str(tmp_path / "client"),
            "known_hosts": str(tmp_path / "known_hosts"),
            "mount_root": str(tmp_path / "mnt"),
        }
    )
    probe = NfsSshProbe(settings)
    try:
        with Inotify(pool.dir) as watch:
            out = await probe.check(pool.target((Neighbour("n1", "kvm02", "127.0.0.1"),)))
            assert out.complete, out.reason
            pool.assert_reading(dict(out.mtimes))
            assert out.files_wanted == len(pool.disks) + 3
            assert_each_disk_opened_once_and_nothing_read(watch, pool)
            # Each check opens them again: a later check is revalidated too, not only the first.
            watch.clear()
            again = await probe.check(pool.target((Neighbour("n1", "kvm02", "127.0.0.1"),)))
            assert again.complete and dict(again.mtimes) == dict(out.mtimes)
            assert_each_disk_opened_once_and_nothing_read(watch, pool)
    finally:
        await probe.close()


def _as_unprivileged(argv: list[str]) -> list[str]:
    """argv run as a user without privilege: root drops to nobody (CAP_DAC_OVERRIDE would open
    a mode 000 file); any other user already has none."""
    if os.geteuid() != 0:
        return argv
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]


@pytest.mark.parametrize("shell", ["bash", "dash"])
def test_a_disk_the_user_cannot_read_is_still_reported_and_the_rest_opened(shell):
    """bash takes the script's mapfile path, dash (the gate's /bin/sh) the xargs path. Run as
    an unprivileged user, one disk mode 000: its open fails, its stat does not."""
    with tempfile.TemporaryDirectory(prefix="fencer-cto-") as d:
        root = Path(d)
        root.chmod(0o755)  # nobody must reach the pool
        pool = Pool(root)
        locked = pool.disks[3]
        os.chmod(locked, 0o000)
        target = pool.target()
        command, stdin = build_command(target)

        def run(script_command: str) -> str:
            argv = _as_unprivileged([shell, "-c", script_command])
            p = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=20)
            assert p.stderr == "", p.stderr  # the failed opens say nothing
            return p.stdout

        with Inotify(pool.dir) as watch:
            out = run(command)
            reading = parse_output(target, out, 0.0)
            assert reading.complete and out.splitlines()[-1].startswith("S ")
            assert out.splitlines()[-1].endswith(" /")  # the completeness marker, still last
            pool.assert_reading(dict(reading.mtimes))  # the locked disk too, with its mtime
            opened = watch.count(IN_OPEN)
            unlocked = pool.names - {os.path.basename(locked)}
            assert {n: opened[n] for n in unlocked} == dict.fromkeys(unlocked, 1)
            assert opened[os.path.basename(locked)] == 0  # the open really failed
            assert not pool.names & set(watch.count(IN_ACCESS))

            # The control: the same script without its open loops reads the same, and no disk
            # is opened: the detector above tells the two apart.
            watch.clear()
            old = run(command.replace(nfs_ssh.REMOTE_SCRIPT, _without_open_loops()))
            assert parse_output(target, old, 0.0).mtimes == reading.mtimes
            assert not pool.names & set(watch.count(IN_OPEN))


async def test_mounted_probe_opens_and_fstats_each_disk(tmp_path):
    pool = Pool(tmp_path)
    fifo = pool.dir / "disk-fifo"
    os.mkfifo(fifo)  # an open without O_NONBLOCK would wait here for a writer, forever
    os.utime(fifo, (pool.base - 9, pool.base - 9))
    target = pool.target()
    target = ProbeTarget(
        target.host_uuid,
        target.host_name,
        target.host_ip,
        target.suspect_since,
        (
            PoolTarget(
                "pool-1",
                str(pool.dir),
                str(pool.heartbeat),
                (*target.pools[0].disks, str(fifo)),
            ),
        ),
    )
    settings = FencerSettings(ssh={"command_timeout": 5.0})
    probe = MountedProbe(settings)
    with Inotify(pool.dir) as watch:
        out = await probe.check(target)
        assert out.complete, out.reason
        mtimes = dict(out.mtimes)
        assert mtimes.pop(str(fifo)) == pool.base - 9
        pool.assert_reading(mtimes)
        assert_each_disk_opened_once_and_nothing_read(watch, pool)
        assert watch.count(IN_OPEN)["disk-fifo"] == 1


async def test_mounted_probe_without_the_open_would_be_seen(tmp_path, monkeypatch):
    """The control for the test above: a plain os.stat opens nothing."""
    pool = Pool(tmp_path)

    def plain(path: str) -> os.stat_result:
        return os.stat(path)

    monkeypatch.setattr("probes.mounted.fresh_stat", plain)
    with Inotify(pool.dir) as watch:
        reading = await asyncio.to_thread(read_local, pool.target())
        pool.assert_reading(dict(reading.mtimes))
        assert not pool.names & set(watch.count(IN_OPEN))


@pytest.mark.parametrize("shell", ["bash", "dash"])
def test_strace_shows_each_disks_open_before_its_stat(shell, tmp_path):
    """inotify sees opens, not stats: strace sees both, in the order the kernel ran them."""
    pool = Pool(tmp_path)
    target = pool.target()
    command, stdin = build_command(target)
    trace = tmp_path / "trace"
    calls = "trace=open,openat,openat2,stat,lstat,newfstatat,statx"
    argv = ["strace", "-f", "-qq", "-e", calls, "-o", str(trace), shell, "-c", command]
    p = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    assert p.stderr == "", p.stderr  # (exit status 1 under bash: stat of the missing disk)
    assert parse_output(target, p.stdout, 0.0).complete
    first: dict[tuple[str, str], int] = {}
    for n, line in enumerate(trace.read_text().splitlines()):
        for path in (*pool.disks, str(pool.sock)):
            if f'"{path}"' in line:
                kind = "open" if "open" in line.split("(", 1)[0] else "stat"
                first.setdefault((path, kind), n)
    for path in pool.disks:
        assert first[(path, "open")] < first[(path, "stat")], path
    # the socket: its open was tried (and failed) before its stat too
    assert first[(str(pool.sock), "open")] < first[(str(pool.sock), "stat")]
