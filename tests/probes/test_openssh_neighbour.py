"""The NFS probe against Debian's OpenSSH sshd (the server real KVM hosts run)."""

import os
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
