"""The probe's least-privilege key against Debian's OpenSSH sshd: authorized_keys forces the
shipped `docs/fencer-probe-gate` (restrict, command=...), the NFS probe works through it, and
anything else sent with that key (a shell, another command, an extra command after the script,
a path outside the mount root, a pty, a port forward) is refused and runs nothing."""

from __future__ import annotations

import getpass
import os
import shlex
import socket
import subprocess
import time
from pathlib import Path

import pytest

from fencing.settings import FencerSettings
from probes.base import Neighbour, PoolTarget, ProbeTarget
from probes.nfs_ssh import REMOTE_SCRIPT, NfsSshProbe, build_command
from tests.probes.inotify import Inotify
from tests.probes.pool_files import Pool, assert_each_disk_opened_once_and_nothing_read

GATE = Path(__file__).resolve().parents[2] / "docs" / "fencer-probe-gate"

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def gated_sshd(tmp_path: Path):
    """sshd whose only key is fencer's, forced through the gate."""
    os.makedirs("/run/sshd", exist_ok=True)
    for name in ("host", "client"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", tmp_path / name], check=True
        )
    script = tmp_path / "probe-script.sh"
    script.write_text(REMOTE_SCRIPT)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    forced = f"{GATE} {script} {mnt}"
    (tmp_path / "authorized_keys").write_text(
        f'restrict,from="127.0.0.1",command="{forced}" ' + (tmp_path / "client.pub").read_text()
    )
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
        yield port, mnt
    finally:
        proc.terminate()
        proc.wait(5)


def _ssh(tmp_path: Path, port: int, command: str | None, *opts: str, stdin: str = ""):
    argv = [
        "ssh",
        "-p",
        str(port),
        "-i",
        str(tmp_path / "client"),
        "-o",
        f"UserKnownHostsFile={tmp_path / 'known_hosts'}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "ExitOnForwardFailure=yes",
        *opts,
        f"{getpass.getuser()}@127.0.0.1",
    ]
    if command is not None:
        argv.append(command)
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=20)


def _pool(mnt: Path) -> tuple[Path, Path, list[str]]:
    pool = mnt / "pool-1"
    (pool / "KVMHA").mkdir(parents=True)
    disks = []
    for i in range(5):
        d = pool / f"disk-{i}"
        d.write_bytes(b"")
        disks.append(str(d))
    hb = pool / "KVMHA" / "hb-10.0.0.11"
    hb.write_text("1700000000\n")
    return pool, hb, disks


async def test_the_probe_works_through_the_gate(gated_sshd, tmp_path):
    port, mnt = gated_sshd
    pool, hb, disks = _pool(mnt)
    settings = FencerSettings(
        ssh={
            "user": getpass.getuser(),
            "port": port,
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
        time.time() - 100,
        (PoolTarget("pool-1", str(pool), str(hb), tuple(disks)),),
        (Neighbour("n1", "kvm02", "127.0.0.1"),),
    )
    try:
        reading = await probe.check(target)
    finally:
        await probe.close()
    assert reading.complete, reading.reason
    assert len(reading.mtimes) == 6  # 5 disks and the heartbeat
    assert reading.heartbeats[str(hb)] == "1700000000"


def _refused(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode != 0, r.stdout
    assert "fencer-probe-gate: refused" in r.stderr, r.stderr


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda mnt, canary: f"touch {canary}", id="another-command"),
        pytest.param(lambda mnt, canary: f"sh -c 'touch {canary}'", id="a-shell"),
        pytest.param(
            lambda mnt, canary: f"set -- m:{mnt}/pool-1\n{REMOTE_SCRIPT}touch {canary}\n",
            id="extra-command-after-the-script",
        ),
        pytest.param(
            lambda mnt, canary: f"set -- m:{mnt}/pool-1; touch {canary}\n{REMOTE_SCRIPT}",
            id="command-in-the-arguments",
        ),
        pytest.param(
            lambda mnt, canary: f"set -- m:{mnt}/$(touch {canary})\n{REMOTE_SCRIPT}",
            id="substitution-in-the-arguments",
        ),
        pytest.param(
            lambda mnt, canary: f"set -- h:/etc/passwd\n{REMOTE_SCRIPT}",
            id="a-file-outside-the-mount-root",
        ),
        pytest.param(
            lambda mnt, canary: f"set -- h:{mnt}/../../../etc/passwd\n{REMOTE_SCRIPT}",
            id="dot-dot-out-of-the-mount-root",
        ),
        pytest.param(
            lambda mnt, canary: f"set -- m:{mnt}/pool-1\necho changed; touch {canary}\n",
            id="another-script",
        ),
    ],
)
def test_anything_else_through_that_key_is_refused(gated_sshd, tmp_path, make):
    port, mnt = gated_sshd
    canary = tmp_path / "canary"
    r = _ssh(tmp_path, port, make(mnt, canary))
    _refused(r)
    assert "root:" not in r.stdout  # /etc/passwd was not read
    assert not canary.exists()  # nothing ran


def test_no_shell_no_pty_no_forwarding(gated_sshd, tmp_path):
    port, _ = gated_sshd
    _refused(_ssh(tmp_path, port, None, "-T"))  # a login shell
    r = _ssh(tmp_path, port, "id", "-tt")  # a pty is refused by `restrict`, the command too
    assert r.returncode != 0 and "uid=" not in r.stdout
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    # A remote forward is asked for at setup: refused, so ssh exits (ExitOnForwardFailure).
    r = _ssh(tmp_path, port, None, "-N", "-R", f"{free}:127.0.0.1:{port}")
    assert r.returncode != 0 and "forwarding failed" in r.stderr.lower(), r.stderr


def test_the_probes_real_command_passes_the_gate_unchanged(gated_sshd, tmp_path):
    """The exact command line and stdin the probe sends, through the ssh client."""
    port, mnt = gated_sshd
    pool, hb, disks = _pool(mnt)
    target = ProbeTarget(
        "h1",
        "kvm01",
        "10.0.0.11",
        time.time(),
        (PoolTarget("pool-1", str(pool), str(hb), tuple(disks)),),
        (),
    )
    command, stdin = build_command(target)
    r = _ssh(tmp_path, port, command, stdin=stdin)
    assert r.returncode == 0, r.stderr
    assert "M 0 ok" in r.stdout and "S " in r.stdout
    assert r.stdout.rstrip().endswith(" /")
    assert shlex.quote(str(pool)) in command  # the arguments went through as sent


async def test_through_the_gate_every_disk_is_opened_before_its_stat(gated_sshd, tmp_path):
    """The gate runs the script with /bin/sh (dash on Debian): its xargs path opens each disk
    (close-to-open revalidation on NFS), and a disk whose open fails keeps its mtime."""
    port, mnt = gated_sshd
    pool = Pool(mnt)
    settings = FencerSettings(
        ssh={
            "user": getpass.getuser(),
            "port": port,
            "key_file": str(tmp_path / "client"),
            "known_hosts": str(tmp_path / "known_hosts"),
            "mount_root": str(mnt),
        }
    )
    probe = NfsSshProbe(settings)
    try:
        with Inotify(pool.dir) as watch:
            out = await probe.check(pool.target((Neighbour("n1", "kvm02", "127.0.0.1"),)))
            assert out.complete, out.reason
            pool.assert_reading(dict(out.mtimes))
            assert_each_disk_opened_once_and_nothing_read(watch, pool)
    finally:
        await probe.close()
