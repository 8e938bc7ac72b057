"""The watch's clock: the time ticks and probe-result arrivals are stamped with, and its name.

Rule: the core measures a check interval between two stamps of one clock only (`Tick.clock`,
`ProbeFinished.clock`). This process's clock is the wall time when it started plus the
monotonic time since, so an NTP step while it runs never stretches or shrinks an interval (a
step forward would have made seconds look like a whole interval: a stale check on a window that
never was); its name is unique to this process, so stamps of another worker (a partition that
moved) or of this one before a restart are never taken for its own.
"""

from __future__ import annotations

import os
import socket
import time

_WALL0 = time.time()
_MONO0 = time.monotonic()

CLOCK_ID = f"{socket.gethostname()}:{os.getpid()}:{_WALL0:.3f}"
"""This process's clock, by name."""


def worker_clock() -> float:
    """Epoch seconds on this process's clock: never stepped, near the wall clock."""
    return _WALL0 + (time.monotonic() - _MONO0)
