"""The lab's BMC processes fork from one pre-loaded zygote, each still its own process.

Real peers only: every BMC is checked with Debian's ipmitool over lanplus on loopback.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

import lab.bmc as labbmc
from lab.bmc import BmcSimulator


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _gone(pid: int) -> bool:
    """Ended (a zombie counts as ended) or reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return False


def _power_status(sim: BmcSimulator) -> str:
    out = subprocess.run(
        [
            *("ipmitool", "-I", "lanplus", "-H", "127.0.0.1", "-p", str(sim.port)),
            *("-U", sim.username, "-E", "-N", "1", "-R", "2", "chassis", "power", "status"),
        ],
        env={**os.environ, "IPMI_PASSWORD": sim.password},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def fresh_zygote() -> Iterator[None]:
    """Each test starts with no zygote and leaves none (nor a 'broken' mark) behind."""
    labbmc._shutdown_zygote()
    labbmc._zygote_broken = False
    yield
    labbmc._shutdown_zygote()
    labbmc._zygote_broken = False


def test_each_bmc_is_its_own_process_forked_by_one_zygote(fresh_zygote: None) -> None:
    with BmcSimulator(power="on") as a, BmcSimulator(power="off") as b:
        assert labbmc._zygote is not None
        zygote_pid = labbmc._zygote[0].pid
        assert isinstance(a._proc, labbmc._ForkedBmc) and isinstance(b._proc, labbmc._ForkedBmc)
        assert a._proc.pid != b._proc.pid
        assert _ppid(a._proc.pid) == zygote_pid == _ppid(b._proc.pid)
        assert _power_status(a) == "Chassis Power is on"
        assert _power_status(b) == "Chassis Power is off"
        b.power = "on"
        assert _power_status(b) == "Chassis Power is on"
        assert a.count("get_power") == 1 and b.count("get_power") == 2
        # Pausing one BMC leaves its sibling answering.
        a.pause()
        assert _power_status(b) == "Chassis Power is on"
        a.resume()
        assert _power_status(a) == "Chassis Power is on"
        pid_a, port_a = a._proc.pid, a.port
    # stop() waited for each process to end: the port is free again.
    assert _gone(pid_a)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", port_a))


def test_stop_kills_a_bmc_that_does_not_answer(fresh_zygote: None) -> None:
    sim = BmcSimulator().start()
    assert isinstance(sim._proc, labbmc._ForkedBmc)
    pid = sim._proc.pid
    os.kill(pid, signal.SIGSTOP)  # it cannot obey "stop" any more
    started = time.monotonic()
    sim.stop()
    assert time.monotonic() - started < 10
    assert _wait_gone(pid, 5), "stop() left the frozen BMC process alive"


def test_a_dead_zygote_falls_back_to_new_processes(
    fresh_zygote: None, caplog: pytest.LogCaptureFixture
) -> None:
    with BmcSimulator() as first:
        assert labbmc._zygote is not None
        zygote = labbmc._zygote[0]
        zygote.kill()
        zygote.wait()
        # The BMC it forked lives on: it is its own process.
        assert _power_status(first) == "Chassis Power is on"
        with caplog.at_level(logging.WARNING, logger="lab.bmc"):
            second = BmcSimulator(power="off").start()
        try:
            assert "the BMC zygote failed" in caplog.text
            assert isinstance(second._proc, subprocess.Popen)
            assert _ppid(second._proc.pid) == os.getpid()
            assert _power_status(second) == "Chassis Power is off"
            # and it stays that way: no zygote is started again.
            with BmcSimulator() as third:
                assert isinstance(third._proc, subprocess.Popen)
                assert labbmc._zygote is None
        finally:
            second.stop()
        assert second._proc is None


def test_the_zygote_ends_with_its_parent(fresh_zygote: None) -> None:
    script = textwrap.dedent(
        """
        import os, sys
        import lab.bmc as labbmc
        sim = labbmc.BmcSimulator().start()
        print(labbmc._zygote[0].pid, sim._proc.pid, sim.port, flush=True)
        sys.stdin.readline()
        os._exit(0)  # no stop(), no atexit: the zygote sees EOF, the BMC its pipe close
        """
    )
    p = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout is not None and p.stdin is not None
    line = p.stdout.readline()
    zygote_pid, bmc_pid, _port = (int(x) for x in line.split())
    assert not _gone(zygote_pid) and not _gone(bmc_pid)
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.wait(timeout=10) == 0
    assert _wait_gone(zygote_pid), "the zygote outlived its parent"
    assert _wait_gone(bmc_pid), "the BMC outlived its parent"


def test_concurrent_starts_share_the_zygote(fresh_zygote: None) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(6) as ex:
        sims = list(ex.map(lambda _i: BmcSimulator().start(), range(6)))
    try:
        assert labbmc._zygote is not None
        zygote_pid = labbmc._zygote[0].pid
        pids = {s._proc.pid for s in sims}
        assert len(pids) == 6 and all(_ppid(pid) == zygote_pid for pid in pids)
        assert len({s.port for s in sims}) == 6
        assert all(_power_status(s) == "Chassis Power is on" for s in sims)
    finally:
        with ThreadPoolExecutor(6) as ex:
            list(ex.map(lambda s: s.stop(), sims))
    assert all(_wait_gone(pid, 5) for pid in pids)


def test_a_zygote_that_cannot_start_falls_back_to_new_processes(
    fresh_zygote: None, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No interpreter imports pyghmi in a microsecond: the zygote is not ready in time.
    monkeypatch.setattr(labbmc, "_ZYGOTE_TIMEOUT", 1e-6)
    before = set(_children())
    with caplog.at_level(logging.WARNING, logger="lab.bmc"), BmcSimulator() as sim:
        assert "cannot start the BMC zygote" in caplog.text
        assert labbmc._zygote is None and labbmc._zygote_broken
        assert isinstance(sim._proc, subprocess.Popen)
        assert _power_status(sim) == "Chassis Power is on"
        # the zygote that was too slow was killed and reaped, not left behind
        assert set(_children()) - before == {sim._proc.pid}


def _children() -> list[int]:
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if _ppid(int(entry)) == me:
                    out.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return out
