"""The mounted probe on a hung mount (review3: partial failures): a read that never returns holds
its thread for good (a thread cannot be cancelled). Those threads must never be the event loop's
default executor, which the worker's IPMI driver (fencing.drivers.ipmi) and SNMP notifier use
through `asyncio.to_thread`: once a few hung reads filled it, every fence of the worker timed out
waiting for a thread.

The hang is a real one: the heartbeat is a FIFO without a writer, whose open blocks in the kernel
as an open on a hung NFS mount does, until the test opens its write end."""

import asyncio
import os
import threading
import time

import pytest

from fencing.settings import FencerSettings
from probes.base import PoolTarget, ProbeTarget
from probes.mounted import MAX_HUNG_READS, MountedProbe

pytestmark = pytest.mark.timeout(60)


def _target(tmp_path, heartbeat: str) -> ProbeTarget:
    pool = tmp_path / "pool-1"
    pool.mkdir(exist_ok=True)
    disk = pool / "disk-0.qcow2"
    disk.write_bytes(b"")
    return ProbeTarget(
        "h1",
        "kvm01",
        "10.0.0.11",
        time.time() - 100,
        (PoolTarget("pool-1", str(pool), heartbeat, (str(disk),)),),
    )


def _release(fifo: str) -> None:
    """Open the FIFO's write end until every blocked reader got through (then it is gone)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # no reader blocked (any more)
            return
        os.close(fd)
        time.sleep(0.05)


async def test_hung_reads_never_take_the_threads_the_fence_drivers_need(tmp_path):
    fifo = str(tmp_path / "hb-fifo")
    os.mkfifo(fifo)
    probe = MountedProbe(FencerSettings(), timeout=0.2)
    target = _target(tmp_path, fifo)
    # More checks than the default executor has threads (min(32, cpus + 4)).
    checks = min(32, (os.cpu_count() or 1) + 4) + 2
    try:
        outcomes = [await probe.check(target) for _ in range(checks)]
        assert all(not o.complete and o.reason.startswith("timeout") for o in outcomes)
        # What the IPMI driver does for each BMC call: a short blocking call in a thread.
        answer = await asyncio.wait_for(asyncio.to_thread(lambda: "bmc answered"), 5)
        assert answer == "bmc answered"
        assert probe.outstanding == MAX_HUNG_READS
        assert "have not returned" in outcomes[-1].reason
    finally:
        # (a thread of its own: the default executor may be the one that is full)
        releaser = threading.Thread(target=_release, args=(fifo,), daemon=True)
        releaser.start()
        while releaser.is_alive():
            await asyncio.sleep(0.05)
    # The mount answers again: the hung reads return, and the next check reads it.
    for _ in range(100):
        if probe.outstanding == 0:
            break
        await asyncio.sleep(0.05)
    assert probe.outstanding == 0
    os.unlink(fifo)
    hb = tmp_path / "hb"
    hb.write_text("1700000000\n")
    again = await probe.check(_target(tmp_path, str(hb)))
    assert again.complete, again.reason
    assert again.heartbeats == {str(hb): "1700000000\n"}
