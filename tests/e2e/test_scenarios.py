"""End to end: every demo scenario on the real broker with real `fencer worker` processes, real
SSH hosts, pyghmi BMCs, the CloudStack simulator's HTTP API, and mail/trap receivers.

Each test plays one scenario on a fresh lab cloud (own topics and consumer group on the session
broker) and asserts what the issue demands from what the peers saw: power-offs counted by the
BMCs, declareHostAsDegraded calls received by the API, VM states in the simulated cloud, mails
and traps received. `summary["failures"]` is the scenario's own judgement; the explicit checks
below restate the issue's expectations so a weakened judge cannot hide a regression.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lab.demo import SCENARIOS, play
from streams.broker import EmbeddedBroker

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]


async def _play(name: str, broker: EmbeddedBroker, tmp_path: Path) -> dict[str, Any]:
    _run, summary = await play(name, broker, tmp_path, fast=True)
    assert summary["failures"] == [], summary
    assert summary["passed"] is True
    return summary


async def test_agent_dies_is_never_fenced(broker: EmbeddedBroker, tmp_path: Path) -> None:
    s = await _play("agent-dies", broker, tmp_path)
    # Checked at least 1 + extra_checks + 1 times, every check saw it alive.
    assert len(s["checks"]["kvm02"]) >= 4
    assert set(s["checks"]["kvm02"]) == {"alive"}
    assert s["fences_executed"] == 0 and s["fences_withheld"] == 0
    assert s["bmc_power_offs"] == {} and s["declare_degraded"] == {}


async def test_host_crash_is_fenced_once_in_time(broker: EmbeddedBroker, tmp_path: Path) -> None:
    s = await _play("host-crash", broker, tmp_path)
    assert s["bmc_power_offs"] == {"kvm03": 1}
    assert s["declare_degraded"] == {"kvm03": 1}
    assert s["restarted"] == {"kvm03": 2}
    assert s["fences_executed"] == 1
    # check_interval x (extra_checks + 2) plus a few seconds, from the crash to the verified off.
    assert s["crash_to_fence_seconds"]["kvm03"] <= s["fence_deadline_seconds"]
    assert "fence_decided" in s["trap_kinds"] and "fence_succeeded" in s["trap_kinds"]
    assert any("SUCCEEDED" in m for m in s["mail_subjects"])


async def test_storage_outage_fences_nothing(broker: EmbeddedBroker, tmp_path: Path) -> None:
    s = await _play("storage-outage", broker, tmp_path)
    assert s["fences_executed"] == 0 and s["bmc_power_offs"] == {}
    assert "stale" not in s["checks"]["kvm04"] + s["checks"]["kvm05"]
    assert "cannot_verify" in s["notices"] or "storm_guard" in s["withheld_reasons"]
    assert s["emails"] >= 1 and s["traps"] >= 1


async def test_cap_reached_fences_three_and_withholds_the_fourth(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    s = await _play("cap-reached", broker, tmp_path)
    assert s["fences_executed"] == 3
    assert s["withheld_reasons"] == ["cap_reached"]
    assert sum(s["bmc_power_offs"].values()) == 3 and len(s["bmc_power_offs"]) == 3
    assert s["declare_degraded"].keys() == s["bmc_power_offs"].keys()
    assert s["trap_kinds"].count("fence_withheld") == 1
    assert any("WITHHELD" in m for m in s["mail_subjects"])


async def test_neighbour_unreachable_fences_nothing(broker: EmbeddedBroker, tmp_path: Path) -> None:
    s = await _play("neighbour-unreachable", broker, tmp_path)
    assert set(s["checks"]["kvm04"]) == {"unknown"}
    assert s["fences_executed"] == 0 and s["fences_withheld"] == 0 and s["bmc_power_offs"] == {}
    assert "cannot_verify" in s["notices"] and "cannot_verify" in s["trap_kinds"]


async def test_host_recovers_between_checks(broker: EmbeddedBroker, tmp_path: Path) -> None:
    s = await _play("host-recovers", broker, tmp_path)
    assert s["checks"]["kvm06"].count("stale") < 3
    assert s["fences_executed"] == 0 and s["fences_withheld"] == 0 and s["bmc_power_offs"] == {}
    assert "host_recovered" in s["notices"]


async def test_worker_restart_fences_exactly_once(broker: EmbeddedBroker, tmp_path: Path) -> None:
    s = await _play("worker-restart", broker, tmp_path)
    assert s["fences_executed"] == 1
    assert s["bmc_power_offs"] == {"kvm05": 1}
    assert s["declare_degraded"] == {"kvm05": 1}
    assert s["trap_kinds"].count("fence_succeeded") == 1


async def test_bmc_unreachable_fails_and_restarts_nothing(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    s = await _play("bmc-unreachable", broker, tmp_path)
    assert s["fences_executed"] == 0 and s["fences_failed"] >= 1
    assert s["declare_degraded"] == {} and s["vms_restarted_elsewhere"] == 0
    assert "fence_failed" in s["trap_kinds"]
    assert any("FAILED" in m for m in s["mail_subjects"])


async def test_no_vms_host_is_fenced_on_its_heartbeat(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    s = await _play("no-vms", broker, tmp_path)
    assert s["bmc_power_offs"] == {"kvm08": 1}
    assert s["fences_executed"] == 1
    assert s["checks"]["kvm08"].count("stale") >= 3


def test_every_scenario_is_covered_here() -> None:
    names = {n.removeprefix("test_") for n in globals() if n.startswith("test_")}
    assert len(SCENARIOS) == 9
    covered = {
        "agent-dies": "agent_dies_is_never_fenced",
        "host-crash": "host_crash_is_fenced_once_in_time",
        "storage-outage": "storage_outage_fences_nothing",
        "cap-reached": "cap_reached_fences_three_and_withholds_the_fourth",
        "neighbour-unreachable": "neighbour_unreachable_fences_nothing",
        "host-recovers": "host_recovers_between_checks",
        "worker-restart": "worker_restart_fences_exactly_once",
        "bmc-unreachable": "bmc_unreachable_fails_and_restarts_nothing",
        "no-vms": "no_vms_host_is_fenced_on_its_heartbeat",
    }
    assert covered.keys() == SCENARIOS.keys()
    assert set(covered.values()) <= names


# ---------------------------------------------------------------------------------------------
# `fencer demo` as the operator runs it


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose; a reparented worker would not be a zombie for long.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _demo(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "demo", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_demo_list_names_every_scenario() -> None:
    p = _demo("--list")
    out, _err = p.communicate(timeout=60)
    assert p.returncode == 0
    assert [ln.split()[0] for ln in out.splitlines()] == list(SCENARIOS)


def test_demo_json_fast_default_story() -> None:
    started = time.monotonic()
    p = _demo("--json", "--fast")
    out, err = p.communicate(timeout=150)
    took = time.monotonic() - started
    assert p.returncode == 0, (out[-3000:], err[-3000:])
    assert "Traceback" not in err
    lines = [json.loads(ln) for ln in out.splitlines() if ln.strip()]
    summary = lines[-1]["summary"]
    assert summary["passed"] is True
    story = summary["scenarios"]
    assert list(story) == ["agent-dies", "host-crash"]
    assert story["agent-dies"]["fences_executed"] == 0
    crash = story["host-crash"]
    assert crash["fences_executed"] == 1 and crash["bmc_power_offs"] == {"kvm03": 1}
    assert crash["vms_restarted_elsewhere"] == 2
    assert crash["emails"] >= 1 and crash["traps"] >= 1
    events = lines[:-1]
    assert all({"scenario", "t", "kind", "text"} <= e.keys() for e in events)
    kinds = {e["kind"] for e in events if e["scenario"] == "host-crash"}
    assert {"fault", "signal", "probe", "decision", "outcome", "mail", "trap"} <= kinds
    # The evidence is in the timeline: three stale checks before the decision.
    crash_events = [e for e in events if e["scenario"] == "host-crash"]
    decided = next(i for i, e in enumerate(crash_events) if e["kind"] == "decision")
    stale = [e for e in crash_events[:decided] if e.get("data", {}).get("evidence") == "stale"]
    assert len(stale) >= 3
    pids = [
        e["data"]["pid"] for e in events if e["kind"] == "worker" and "pid" in e.get("data", {})
    ]
    assert len(pids) == 2 and not any(_alive(pid) for pid in pids)
    assert took < 120, f"the default story took {took:.0f} s"


def test_demo_ctrl_c_stops_everything_without_a_traceback() -> None:
    p = _demo("--json", "--fast", "--scenario", "agent-dies")
    assert p.stdout is not None
    pid = None
    deadline = time.monotonic() + 90
    while pid is None and time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        e = json.loads(line)
        if e.get("kind") == "worker":
            pid = e["data"]["pid"]
    assert pid is not None, "the demo never started a worker"
    p.send_signal(signal.SIGINT)
    _out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert "interrupted" in err
    assert not _alive(pid)
