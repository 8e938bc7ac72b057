"""Linux inotify through ctypes: which files of one directory were opened, read or closed, by
any process (the probe's remote shell behind sshd included). The kernel queues an event during
the system call itself, so once a probe's answer is back every open it made is in the queue."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from collections import Counter
from pathlib import Path

IN_ACCESS = 0x001
IN_CLOSE_WRITE = 0x008
IN_CLOSE_NOWRITE = 0x010
IN_OPEN = 0x020
IN_Q_OVERFLOW = 0x4000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class Inotify:
    """Watch one directory for opens, reads and closes of the files in it."""

    def __init__(self, directory: Path) -> None:
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        mask = IN_OPEN | IN_ACCESS | IN_CLOSE_NOWRITE | IN_CLOSE_WRITE
        if _libc.inotify_add_watch(self.fd, os.fsencode(directory), mask) < 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"inotify_add_watch {directory}")
        self.log: list[tuple[str, int]] = []

    def drain(self) -> list[tuple[str, int]]:
        """Every event queued since the last drain: (file name, mask)."""
        got: list[tuple[str, int]] = []
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:  # pragma: no cover - only a broken inotify
                if exc.errno == errno.EINTR:
                    continue
                raise
            at = 0
            while at < len(buf):
                _wd, mask, _cookie, size = _EVENT.unpack_from(buf, at)
                at += _EVENT.size
                name = buf[at : at + size].split(b"\0", 1)[0].decode()
                at += size
                assert not mask & IN_Q_OVERFLOW, "inotify queue overflowed: events were lost"
                got.append((name, mask))
        self.log += got
        return got

    def count(self, kind: int) -> Counter[str]:
        """How many events of `kind` each file had, over everything drained so far."""
        self.drain()
        return Counter(name for name, mask in self.log if mask & kind)

    def clear(self) -> None:
        """Forget every event so far."""
        self.drain()
        self.log = []

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Inotify:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
