"""End to end, with CloudStack's own KVM investigator and VM-HA on (lab.cloudstack_sim): the
real workers against a CloudStack that marks hosts Down and restarts their VMs itself, without
any fence.

- A crashed host: CloudStack finds it Down (its heartbeat stale) and restarts its VMs. fencer
  still fences it once, on its own storage evidence, verified off (a host that merely hung
  could come back with its VMs running twice), and leaves the restart to CloudStack:
  declareHostAsDegraded is refused for a Down host and the outcome says so.
- The dangerous twin (#2890): the agent dies, the host and its VMs live on, the heartbeat (it
  lives in the agent) stops, the neighbours take the host for Down and CloudStack restarts its
  VMs elsewhere while the host still runs them. fencer never judged the host dead nor decided a
  fence while the VMs were its own; once CloudStack moved them, fencer reads only what
  CloudStack still places on the host (its heartbeat), finds it stale and powers the live host
  off, once: the second writer of each moved VM's disk stops. The test pins that behaviour
  (see the lab6 report: the fence is told as an ordinary dead host's, not as a split brain).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lab.demo import play
from streams.broker import EmbeddedBroker

pytestmark = pytest.mark.timeout(180)


async def _play(name: str, broker: EmbeddedBroker, tmp_path: Path) -> dict[str, Any]:
    _run, summary = await play(name, broker, tmp_path, fast=True)
    assert summary["failures"] == [], summary
    assert summary["passed"] is True
    return summary


async def test_cloudstack_marks_a_crashed_host_down_and_fencer_still_fences_it_once(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    s = await _play("cloudstack-marks-down", broker, tmp_path)
    marks = s["marks"]
    # CloudStack noticed at the ping timeout, not at the crash.
    assert marks["down:kvm03"] - marks["crash:kvm03"] >= 1.5
    assert s["checks"]["kvm03"][:4] == ["baseline", "stale", "stale", "stale"]
    assert s["bmc_power_offs"] == {"kvm03": 1} and s["fences_executed"] == 1
    assert s["restarted"] == {"kvm03": 2}  # by CloudStack's own HA
    # fencer asked (declareHostAsDegraded) and was told the host is Down: not needed.
    assert s["declare_degraded"] == {"kvm03": 1}
    assert s["crash_to_fence_seconds"]["kvm03"] <= s["fence_deadline_seconds"]
    assert "fence_succeeded" in s["trap_kinds"]
    assert any("SUCCEEDED" in m for m in s["mail_subjects"])


async def test_a_live_host_cloudstack_takes_for_down_is_never_judged_dead_on_its_own_vms(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    s = await _play("agent-dies-cloudstack-says-down", broker, tmp_path)
    checks = s["checks"]["kvm02"]
    marks = s["marks"]
    assert checks[0] == "baseline" and checks[1] == "alive", checks
    assert marks["down:kvm02"] > marks["agent:kvm02"]
    assert s["restarted"] == {"kvm02": 2}  # by CloudStack's own HA, the host still running
    # Today: after the move only the heartbeat is the host's; stale, fenced once.
    facts = s["facts"]
    assert set(facts["files read after the move"]) == {1}, facts
    assert facts["fenced the live host"] is True, facts
    assert s["bmc_power_offs"] == {"kvm02": 1} and s["fences_executed"] == 1
    assert all(at >= marks["moved:kvm02"] for at, _n in s["bmc_power_off_at"])
