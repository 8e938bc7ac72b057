"""A pool directory for the open-before-stat tests (tests/probes/test_open_before_stat.py and
the gate's): disks with distinct mtimes, one whose open fails, one missing."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from probes.base import Neighbour, PoolTarget, ProbeTarget
from tests.probes.inotify import IN_ACCESS, IN_CLOSE_NOWRITE, IN_CLOSE_WRITE, IN_OPEN, Inotify


class Pool:
    """A pool directory: disks with distinct mtimes, a heartbeat, a socket where a disk is
    expected (open fails with ENXIO for anyone, root too, stat works) and a missing disk."""

    def __init__(self, root: Path, disks: int = 20) -> None:
        self.dir = root / "pool-1"
        (self.dir / "KVMHA").mkdir(parents=True)
        self.base = int(time.time()) - 1000
        self.disks: list[str] = []
        for i in range(disks):
            d = self.dir / f"disk {i}"  # a space: the paths are passed as they are
            d.write_bytes(b"qcow")
            os.utime(d, (self.base + i, self.base + i))
            self.disks.append(str(d))
        self.sock = self.dir / "disk-socket"
        os.mknod(self.sock, stat.S_IFSOCK | 0o644)
        os.utime(self.sock, (self.base - 7, self.base - 7))
        self.gone = str(self.dir / "disk-gone")
        self.heartbeat = self.dir / "KVMHA" / "hb-10.0.0.11"
        self.heartbeat.write_text(f"{self.base}\n")

    @property
    def names(self) -> set[str]:
        """The file names of the regular disks (what must be opened)."""
        return {os.path.basename(d) for d in self.disks}

    def target(self, neighbours: tuple[Neighbour, ...] = ()) -> ProbeTarget:
        return ProbeTarget(
            "h1",
            "kvm01",
            "10.0.0.11",
            time.time() - 100,
            (
                PoolTarget(
                    "pool-1",
                    str(self.dir),
                    str(self.heartbeat),
                    (*self.disks, str(self.sock), self.gone),
                ),
            ),
            neighbours,
        )

    def assert_reading(self, mtimes: dict[str, float] | object) -> None:
        """Every disk with its own mtime, the socket with its mtime, the missing one absent."""
        assert isinstance(mtimes, dict)
        for i, d in enumerate(self.disks):
            assert mtimes[d] == self.base + i, d
        assert mtimes[str(self.sock)] == self.base - 7  # its open failed: still stat'ed
        assert self.gone not in mtimes
        assert len(mtimes) == len(self.disks) + 2  # the disks, the socket, the heartbeat


def assert_each_disk_opened_once_and_nothing_read(watch: Inotify, pool: Pool) -> None:
    opened = watch.count(IN_OPEN)
    assert {n: opened[n] for n in pool.names} == dict.fromkeys(pool.names, 1)
    assert opened["disk-socket"] == 0  # the open failed (ENXIO): no event
    assert watch.count(IN_CLOSE_NOWRITE) >= opened  # closed again, every one of them
    assert not pool.names & set(watch.count(IN_ACCESS) + watch.count(IN_CLOSE_WRITE))
