"""pyghmi's reply race: how many IPMI calls stall, with and without fencer's workaround.

pyghmi 1.6.19 sends a request, then registers its wait for the reply; a reply that the IO
thread reads in between is noticed only when the retry timer fires, 0.5-1 s later
(fencing/drivers/ipmi.py, third defect). This benchmark sends N Get Chassis Status commands
through one session of fencer's IPMI driver, first with pyghmi's own `_io_wait`, then with the
workaround, against the lab's pyghmi BMC and (if installed) OpenIPMI's ipmi_sim, plus N/4
full sessions (login, one command, logout: what one fence or pre-flight costs), and counts
the calls slower than the stall threshold. Loopback answers in about a millisecond, so a call over
0.3 s is a stall, not a slow BMC.

    python -m benchmarks.pyghmi_stall --json [--calls N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

from pydantic import SecretStr

from fencing.drivers import ipmi
from lab import openipmi
from lab.bmc import BmcSimulator

STALL_S = 0.3


async def _calls(port: int, user: str, password: str, n: int) -> list[float]:
    """N Get Chassis Status commands in one session (login outside the measurement)."""
    driver = ipmi.IpmiDriver("127.0.0.1", user, SecretStr(password), port, timeout=10)
    try:
        await driver.get_power()
        samples = []
        for _ in range(n):
            started = time.perf_counter()
            await driver.get_power()
            samples.append(time.perf_counter() - started)
        return samples
    finally:
        await driver.aclose()


async def _sessions(port: int, user: str, password: str, n: int) -> list[float]:
    """N times: login (five exchanges), Get Chassis Status, logout; as the actuator does."""
    samples = []
    for _ in range(n):
        driver = ipmi.IpmiDriver("127.0.0.1", user, SecretStr(password), port, timeout=10)
        started = time.perf_counter()
        try:
            await driver.get_power()
        finally:
            await driver.aclose()
        samples.append(time.perf_counter() - started)
    return samples


def _figures(samples: list[float]) -> dict[str, Any]:
    stalls = [s for s in samples if s > STALL_S]
    return {
        "calls": len(samples),
        "stalled": len(stalls),
        "stall_rate": round(len(stalls) / len(samples), 3),
        "median_s": round(statistics.median(samples), 4),
        "max_s": round(max(samples), 3),
        "total_s": round(sum(samples), 2),
    }


async def _both(port: int, user: str, password: str, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        for name, enabled in (("pyghmi_as_is", False), ("with_workaround", True)):
            ipmi.use_reply_race_workaround(enabled)
            out[name] = {
                "one_session": _figures(await _calls(port, user, password, n)),
                "session_per_call": _figures(await _sessions(port, user, password, n // 4)),
            }
    finally:
        ipmi.use_reply_race_workaround(True)
    return out


def run(calls: int = 200) -> dict[str, Any]:
    """Both modes against each BMC; figures per BMC and mode."""
    result: dict[str, Any] = {"benchmark": "pyghmi_stall", "stall_threshold_s": STALL_S}
    with BmcSimulator("admin", "bench-throwaway") as sim:
        result["lab_bmc"] = asyncio.run(_both(sim.port, "admin", "bench-throwaway", calls))
    if openipmi.available():
        with openipmi.IpmiSim() as isim:
            result["ipmi_sim"] = asyncio.run(_both(isim.port, isim.username, isim.password, calls))
    else:
        result["ipmi_sim"] = "not installed (Debian package openipmi)"
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--json", action="store_true", help="one line")
    a = ap.parse_args()
    r = run(a.calls)
    print(json.dumps(r) if a.json else json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
