"""The mounted probe: the same check as the NFS probe, on the worker's own filesystem (the
shared storage is mounted where fencer runs, e.g. a CephFS or NFS mount on the worker).

Rule: only reads (open and fstat, or stat; a heartbeat's first bytes), in a thread of its own
with a deadline, so a hung mount gives "timeout" instead of a stuck event loop; the core judges
the reading. A read of a hung mount never returns, and a thread cannot be cancelled: each read
runs in its own daemon thread (never one of the event loop's default executor, which the IPMI
driver and the SNMP notifier share: a few hung reads there held up every fence of the worker),
and while `MAX_HUNG_READS` reads have not returned, a check starts no new one (unknown).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable

from fencing.settings import FencerSettings
from probes.base import ProbeOutcome, ProbeTarget, Reading, Reason, outcome_of

# Reads of the mount that may be outstanding at once (each one a thread blocked in the kernel).
MAX_HUNG_READS = 4

# O_NONBLOCK: an open of a FIFO returns at once instead of waiting for a writer (no effect on a
# regular file); O_NOCTTY: a terminal device never becomes the worker's controlling terminal.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def fresh_stat(path: str) -> os.stat_result:
    """The file's attributes as its server has them: opened read-only (nothing read) and
    fstat'ed, since the open of a file on an NFS mount with the default `cto` makes the client
    revalidate its attributes (close-to-open), where a bare stat may answer from the attribute
    cache (up to acregmax, 60 s, old). When the open fails (no read permission, a socket), a
    plain stat, as before. Raises OSError when even that fails (a missing file)."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError:
        return os.stat(path)
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def read_local(target: ProbeTarget, clock: Callable[[], float] = time.time) -> Reading:
    """Stat every file and read every heartbeat on this machine."""
    mounted = {
        p.mount_point: os.path.isdir(p.mount_point) and os.access(p.mount_point, os.R_OK | os.X_OK)
        for p in target.pools
    }
    mtimes: dict[str, float] = {}
    for path in (*target.files, *target.heartbeats):
        try:
            mtimes[path] = float(int(fresh_stat(path).st_mtime))
        except OSError:
            continue
    beats: dict[str, str] = {}
    for path in target.heartbeats:
        try:
            with open(path, "rb") as f:
                beats[path] = f.read(64).decode("ascii", "replace")
        except OSError:
            continue
    now = clock()
    return Reading(now=now, mtimes=mtimes, heartbeat_values=beats, mounted=mounted, local_now=now)


class MountedProbe:
    """Storage probe over a filesystem mounted on the worker itself."""

    name = "mounted"

    def __init__(
        self,
        settings: FencerSettings,
        *,
        timeout: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.timeout = timeout or settings.ssh.command_timeout
        self.clock = clock
        self.outstanding = 0  # reads started whose thread has not returned (hung, or running)

    async def close(self) -> None:
        """Nothing pooled (a hung read's daemon thread is left to the kernel)."""

    def _read(self, target: ProbeTarget) -> asyncio.Future[Reading]:
        """`read_local` in a daemon thread of its own; the future is set when it returns."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Reading] = loop.create_future()

        def settle(result: Reading | None, exc: BaseException | None) -> None:
            self.outstanding -= 1
            if done.done():  # (the check gave up waiting: its deadline passed)
                return
            if exc is not None:
                done.set_exception(exc)
            else:
                assert result is not None
                done.set_result(result)

        def run() -> None:
            result: Reading | None = None
            error: BaseException | None = None
            try:
                result = read_local(target, self.clock)
            except BaseException as exc:  # handed to the waiting check, never lost
                error = exc
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:  # the loop closed while the read hung: nobody waits for it
                pass

        self.outstanding += 1
        threading.Thread(target=run, name="fencer-mounted-read", daemon=True).start()
        return done

    async def check(self, target: ProbeTarget) -> ProbeOutcome:
        """One local check."""
        started = time.monotonic()
        if self.outstanding >= MAX_HUNG_READS:
            return ProbeOutcome.unknown(
                f"{Reason.TIMEOUT}: {self.outstanding} earlier reads of the local mount have not "
                "returned (a hung mount): no new one is started",
                self.name,
                neighbour="local",
            )
        try:
            reading = await asyncio.wait_for(self._read(target), self.timeout)
        except TimeoutError:
            return ProbeOutcome.unknown(
                f"{Reason.TIMEOUT}: the local mount did not answer within {self.timeout:g} s",
                self.name,
                neighbour="local",
                duration=time.monotonic() - started,
            )
        return outcome_of(target, reading, self.name, "local", time.monotonic() - started)
