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
    # A baseline, then at least 1 + extra_checks + 1 checks, every one saw it alive (its
    # heartbeat stopped with the agent; its VMs' disks kept moving).
    checks = s["checks"]["kvm02"]
    assert checks[0] == "baseline" and len(checks) >= 4
    assert set(checks[1:]) == {"alive"}
    assert s["fences_executed"] == 0 and s["fences_withheld"] == 0
    assert s["bmc_power_offs"] == {} and s["declare_degraded"] == {}


async def test_host_crash_is_fenced_once_in_time(broker: EmbeddedBroker, tmp_path: Path) -> None:
    s = await _play("host-crash", broker, tmp_path)
    assert s["bmc_power_offs"] == {"kvm03": 1}
    assert s["declare_degraded"] == {"kvm03": 1}
    assert s["restarted"] == {"kvm03": 2}
    assert s["fences_executed"] == 1
    # The baseline at the disconnect, then 1 + extra_checks stale checks: from the crash to the
    # verified off within check_interval x (1 + extra_checks) plus the pipeline's slack.
    assert s["checks"]["kvm03"][:4] == ["baseline", "stale", "stale", "stale"]
    assert s["fence_ideal_seconds"] == 3.0
    took = s["crash_to_fence_seconds"]["kvm03"]
    assert s["fence_ideal_seconds"] < took <= s["fence_deadline_seconds"]
    assert s["fence_over_ideal_seconds"]["kvm03"] == pytest.approx(took - 3.0, abs=0.11)
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


def _fenced_after_alive(s: dict[str, Any], name: str) -> list[str]:
    """The checks of a host that lived (agent dead, VMs writing), then crashed: a baseline,
    alive checks only, then exactly 1 + extra_checks stale ones and the fence."""
    checks = s["checks"][name]
    assert checks[0] == "baseline"
    first_stale = checks.index("stale")
    assert set(checks[1:first_stale]) == {"alive"} and first_stale - 1 >= 4, checks
    assert checks[first_stale : first_stale + 3] == ["stale"] * 3, checks
    assert s["bmc_power_offs"] == {name: 1}
    assert s["declare_degraded"] == {name: 1}
    assert s["restarted"] == {name: 2}
    assert s["fences_executed"] == 1 and s["fences_withheld"] == 0
    # No power-off before the crash.
    assert all(at >= s["marks"][f"crash:{name}"] for at, _n in s["bmc_power_off_at"])
    assert "fence_decided" in s["trap_kinds"] and "fence_succeeded" in s["trap_kinds"]
    assert any("SUCCEEDED" in m for m in s["mail_subjects"])
    return checks


async def test_agent_dies_then_crash_is_fenced_once_in_time(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    s = await _play("agent-dies-then-crash", broker, tmp_path)
    _fenced_after_alive(s, "kvm02")
    took = s["crash_to_fence_seconds"]["kvm02"]
    # Crash (mid-episode) to verified off: 1 + extra_checks intervals, one more check at most
    # (the first after the crash may see its last writes), plus the pipeline.
    assert s["fence_ideal_seconds"] < took <= s["fence_deadline_mid_episode_seconds"]


@pytest.mark.parametrize(
    ("scenario", "offset"), [("filer-clock-behind", -8), ("filer-clock-ahead", 8)]
)
async def test_filer_clock_skew_changes_no_verdict(
    broker: EmbeddedBroker, tmp_path: Path, scenario: str, offset: int
) -> None:
    s = await _play(scenario, broker, tmp_path)
    _fenced_after_alive(s, "kvm04")
    # The skew was measured (heartbeat mtime on the filer minus its content, the host's clock),
    # shown, and told, never used.
    measured = [o for o in s["filer_offsets"]["kvm04"] if o is not None]
    assert measured and all(abs(o - offset) <= 1.5 for o in measured), measured
    assert "clock_skew" in s["notices_by_host"]["kvm04"]
    assert "clock_skew" in s["trap_kinds"]
    assert any("CLOCK-SKEW" in m for m in s["mail_subjects"])


async def test_vms_restarted_elsewhere_do_not_keep_the_dead_host_alive(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    s = await _play("vms-restarted-elsewhere", broker, tmp_path)
    checks = s["checks"]["kvm05"]
    assert checks[0] == "baseline" and "alive" not in checks
    assert checks[1:4] == ["stale"] * 3
    # The baseline read both disks and the heartbeat; after CloudStack moved the VMs, only the
    # heartbeat is the suspect's.
    files = s["files_read"]["kvm05"]
    assert files[0] == 3 and set(files[1:]) == {1}, files
    assert s["bmc_power_offs"] == {"kvm05": 1}
    assert s["declare_degraded"] == {"kvm05": 1}
    assert s["restarted"] == {"kvm05": 2}  # by CloudStack's own HA, before the fence
    assert s["fences_executed"] == 1


async def test_rbd_disk_is_unknown_notified_never_fenced(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    s = await _play("rbd-disks", broker, tmp_path)
    assert set(s["checks"]["kvm06"]) == {"unknown"} and len(s["checks"]["kvm06"]) >= 5
    assert s["fences_executed"] == 0 and s["fences_withheld"] == 0
    assert s["bmc_power_offs"] == {} and s["declare_degraded"] == {}
    assert "cannot_verify" in s["notices_by_host"]["kvm06"]
    assert "cannot_verify" in s["trap_kinds"]
    assert any("CANNOT-VERIFY" in m and "kvm06" in m for m in s["mail_subjects"])


async def test_suspect_too_long_is_mailed_and_trapped_repeatedly(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    s = await _play("suspect-too-long", broker, tmp_path)
    assert s["notices_by_host"]["kvm07"].count("suspect_too_long") >= 2
    assert s["trap_kinds"].count("suspect_too_long") >= 2
    assert len([m for m in s["mail_subjects"] if "SUSPECT-TOO-LONG" in m]) >= 2
    assert s["fences_executed"] == 0 and s["bmc_power_offs"] == {}


async def test_pause_withholds_and_resume_fences_once(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    s = await _play("pause-then-resume", broker, tmp_path)
    assert s["withheld_reasons"] and set(s["withheld_reasons"]) == {"paused"}
    assert s["fences_executed"] == 1
    assert s["bmc_power_offs"] == {"kvm06": 1}
    assert s["declare_degraded"] == {"kvm06": 1}
    assert s["restarted"] == {"kvm06": 2}
    # Checked on while paused, powered off only after the resume.
    assert s["checks"]["kvm06"].count("stale") > 3
    ((off_at, _n),) = s["bmc_power_off_at"]
    assert off_at >= s["marks"]["resume:kvm06"]
    assert "fence_withheld" in s["trap_kinds"] and "fence_succeeded" in s["trap_kinds"]
    assert any("WITHHELD" in m for m in s["mail_subjects"])


async def test_busy_disk_unreadable_is_unknown_notified_never_fenced(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """A live host (agent dead, heartbeat stopped) whose one busy VM's disk the neighbours can
    no longer stat, its other VM idle: every file read is unchanged, yet never stale."""
    s = await _play("busy-disk-unreadable", broker, tmp_path)
    checks = s["checks"]["kvm02"]
    assert checks[0] == "baseline" and "stale" not in checks and "unknown" in checks
    assert s["fences_executed"] == 0 and s["fences_withheld"] == 0
    assert s["bmc_power_offs"] == {} and s["declare_degraded"] == {}
    assert "cannot_verify" in s["notices_by_host"]["kvm02"]
    assert "cannot_verify" in s["trap_kinds"]
    assert any("CANNOT-VERIFY" in m and "kvm02" in m for m in s["mail_subjects"])


def test_every_scenario_is_covered_here() -> None:
    names = {n.removeprefix("test_") for n in globals() if n.startswith("test_")}
    assert len(SCENARIOS) == 23
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
        "agent-dies-then-crash": "agent_dies_then_crash_is_fenced_once_in_time",
        "filer-clock-behind": "filer_clock_skew_changes_no_verdict",
        "filer-clock-ahead": "filer_clock_skew_changes_no_verdict",
        "vms-restarted-elsewhere": "vms_restarted_elsewhere_do_not_keep_the_dead_host_alive",
        "rbd-disks": "rbd_disk_is_unknown_notified_never_fenced",
        "suspect-too-long": "suspect_too_long_is_mailed_and_trapped_repeatedly",
        "pause-then-resume": "pause_withholds_and_resume_fences_once",
        "busy-disk-unreadable": "busy_disk_unreadable_is_unknown_notified_never_fenced",
    }
    # On a real Ceph: tests/e2e/test_rbd_scenarios.py.
    from tests.e2e import test_rbd_scenarios as rbd

    on_ceph = {
        "rbd-host-crash": "rbd_host_crash_watches_expire_then_fenced_once",
        "rbd-agent-dies": "rbd_agent_dies_watches_stay_never_fenced",
        "rbd-bmc-unreachable": "rbd_bmc_unreachable_blocklist_fallback_restarts_the_vms",
        "ceph-unreachable": "ceph_unreachable_is_unknown_notified_never_fenced",
    }
    # With CloudStack's own investigator and VM-HA: tests/e2e/test_cloudstack_ha.py.
    from tests.e2e import test_cloudstack_ha as cs_ha

    cloudstack_ha = {
        "cloudstack-marks-down": (
            "cloudstack_marks_a_crashed_host_down_and_fencer_still_fences_it_once"
        ),
        "agent-dies-cloudstack-says-down": (
            "a_live_host_cloudstack_takes_for_down_is_never_judged_dead_on_its_own_vms"
        ),
    }
    assert {**covered, **on_ceph, **cloudstack_ha}.keys() == SCENARIOS.keys()
    assert set(covered.values()) <= names
    assert all(hasattr(rbd, f"test_{n}") for n in on_ceph.values())
    assert all(hasattr(cs_ha, f"test_{n}") for n in cloudstack_ha.values())


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
    p = _demo("--json", "--fast")
    # It ends by itself (about a minute; how fast is for benchmarks/, not a timed test).
    out, err = p.communicate(timeout=150)
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
    # The evidence is in the timeline: three stale checks (the timeline is the order in which
    # the demo's tap read several topics: the last probe result may be read after the decision
    # it led to, as the fresh-clone CI run of 2026-11-30 saw under load).
    crash_events = [e for e in events if e["scenario"] == "host-crash"]
    assert any(e["kind"] == "decision" for e in crash_events)
    stale = [e for e in crash_events if e.get("data", {}).get("evidence") == "stale"]
    assert len(stale) >= 3
    pids = [
        e["data"]["pid"] for e in events if e["kind"] == "worker" and "pid" in e.get("data", {})
    ]
    assert len(pids) == 2 and not any(_alive(pid) for pid in pids)


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
