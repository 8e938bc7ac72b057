"""End to end, never silent: real `fencer worker` processes on the embedded broker, the lab's
pyghmi BMCs, the CloudStack simulator and the lab's mail and trap receivers.

- The gate judges by its own clock only: proposals stamped 10 minutes behind, 10 minutes and
  2 hours ahead (a watch worker's clock off) are judged like any other, at the gate's clock, with
  no clock_skew notice; with a cap of 3, 3 approvals, no more.
- A BMC that does not answer for two attempts and CloudStack failing declareHostAsDegraded
  twice still end in a verified power-off and the VMs running elsewhere.
- A fence that fails is told again every renotify_interval until an operator answers with
  `fencer fence retry HOST`, which fences it (same decision), and the reminders stop.
Every notification carries its stable id (mail body, trap varbind fencerNoticeId).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fencing.events import FenceAction
from fencing.records import EvidenceSummary, FenceProposal, HostRef
from fencing.settings import FencerSettings
from lab.cloud import LabCloud
from lab.pipeline import Tap, WorkerProcess, write_settings
from streams.broker import EmbeddedBroker

pytestmark = pytest.mark.timeout(240)


@dataclass
class World:
    lab: LabCloud
    settings: FencerSettings
    file: Path
    tap: Tap
    worker: WorkerProcess

    def log(self) -> str:
        assert self.worker.log_file is not None
        return self.worker.log_file.read_text(errors="replace")

    def of(self, topic: str) -> list[dict[str, Any]]:
        return [v for _, v in self.tap.of(topic)]


async def world(
    broker: EmbeddedBroker, tmp_path: Path, hosts: int, **actuator: Any
) -> AsyncIterator[World]:
    async with LabCloud(broker, hosts=hosts, interval=0.5, root=tmp_path / "lab") as lab:
        base = lab.settings(fence_cap=3, check_interval=1.0)
        settings = base.model_copy(update={"actuator": base.actuator.model_copy(update=actuator)})
        file = write_settings(settings, tmp_path / "fencer.yaml")
        t = settings.kafka.topics
        tap = await Tap(settings).start(
            [t.fence_proposals, t.fence_decisions, t.fence_outcomes, t.notices]
        )
        worker = WorkerProcess(file, "all", tmp_path / "worker.log").start()
        w = World(lab, settings, file, tap, worker)
        try:
            await tap.wait_for(
                lambda: any(v.get("kind") == "cluster_size" for v in w.of(t.fence_proposals)),
                90,
                "the worker to poll CloudStack",
            )
            yield w
        finally:
            await asyncio.to_thread(worker.stop, 10)
            await tap.stop()


@pytest.fixture
async def small(broker: EmbeddedBroker, tmp_path: Path) -> AsyncIterator[World]:
    async for w in world(broker, tmp_path, hosts=4):
        yield w


@pytest.fixture
async def failing(broker: EmbeddedBroker, tmp_path: Path) -> AsyncIterator[World]:
    async for w in world(broker, tmp_path, hosts=6, fence_deadline=20.0, renotify_interval=3.0):
        yield w


def proposal(w: World, n: int, at: float) -> FenceProposal:
    host = f"00000000-0000-4000-8000-{n:012d}"  # not a CloudStack host: never fenced
    return FenceProposal(
        decision_id=f"{host}/1/{int(at)}",
        host=HostRef(host_uuid=host, cluster_uuid=w.lab.cluster.uuid, host_name=f"ghost{n}"),
        episode=1,
        action=FenceAction.STOP,
        evidence=EvidenceSummary(suspect_since=at - 60, stale_checks=3),
        proposed_at=at,
    )


async def test_proposals_stamped_minutes_off_are_judged_at_the_gate_clock_and_the_cap_holds(
    small: World,
) -> None:
    w, t = small, small.settings.kafka.topics
    cluster = w.lab.cluster.uuid
    sent = time.time()
    off = [
        proposal(w, 0, sent - 10 * 60),
        proposal(w, 1, sent + 10 * 60),
        proposal(w, 2, sent + 2 * 3600),
    ]
    for p in off:
        await w.tap.send(t.fence_proposals, cluster, p)
    for n in (8, 9):
        await w.tap.send(t.fence_proposals, cluster, proposal(w, n, time.time()))
    await w.tap.wait_for(
        lambda: len(w.of(t.fence_decisions)) >= 5 and w.of(t.fence_decisions), 60, "5 decisions"
    )
    await asyncio.sleep(1.0)  # nothing more may come
    decisions = w.of(t.fence_decisions)
    assert len(decisions) == 5
    assert {d["decision_id"] for d in decisions if d["approved"]} == {p.decision_id for p in off}
    assert sorted(d["withheld_reason"] for d in decisions if not d["approved"]) == [
        "cap_reached",
        "cap_reached",
    ]
    # Judged at the gate's clock (the test and the worker share this machine's clock), not at
    # the stamps; and no proposal was refused for its stamp.
    assert all(sent - 1 <= d["decided_at"] <= time.time() for d in decisions), decisions
    assert [n for n in w.of(t.notices) if n["kind"] == "clock_skew"] == []
    assert "clock_skew" not in [x.kind for x in w.lab.traps.traps]


async def wait_for_log(w: World, pattern: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    text = pattern
    while re.search(pattern, w.log()) is None:
        tail = "\n".join(w.log().splitlines()[-25:])
        assert time.monotonic() < deadline, f"the worker never logged {text!r}; log:\n{tail}"
        await asyncio.sleep(0.1)


async def test_a_fence_never_gives_up_silently(failing: World, tmp_path: Path) -> None:
    w, t, lab = failing, failing.settings.kafka.topics, failing.lab
    # kvm02: BMC down for two attempts, CloudStack fails declareHostAsDegraded twice.
    # kvm04: BMC down until an operator retries after the fence deadline.
    kvm02, kvm04 = lab.host("kvm02").uuid, lab.host("kvm04").uuid
    lab.bmc_unreachable("kvm02")
    lab.bmc_unreachable("kvm04")
    lab.cloud.fail_next_jobs["declarehostasdegraded"] = 2
    await lab.crash("kvm02")
    await lab.crash("kvm04")

    # (the first calls to the BMC read its identity, then its power: either may be failing)
    await wait_for_log(w, f"host {kvm02}: stop attempt 2 failed", 90)
    lab.bmcs["kvm02"].resume()

    def outcome(host: str, success: bool) -> list[dict[str, Any]]:
        return [
            o
            for o in w.of(t.fence_outcomes)
            if o["host"]["host_uuid"] == host and o["success"] is success
        ]

    fenced = await w.tap.wait_for(lambda: outcome(kvm02, True), 60, "kvm02 fenced")
    assert fenced[0]["verified"] and fenced[0]["power_after"] == "off"
    assert lab.bmc_power_offs("kvm02") == 1
    assert len(lab.degraded_calls("kvm02")) == 3
    assert sorted(lab.restarted_elsewhere("kvm02")) == sorted(lab.vms_of("kvm02"))

    failed = await w.tap.wait_for(lambda: outcome(kvm04, False), 60, "kvm04 fence_failed")
    assert "fence deadline of 20 s" in failed[0]["error"]
    assert lab.bmc_power_offs("kvm04") == 0 and lab.degraded_calls("kvm04") == []
    decision_id = failed[0]["decision_id"]

    def reminders() -> list[dict[str, Any]]:
        return [
            n
            for n in w.of(t.notices)
            if n["kind"] == "fence_failed" and n.get("decision_id") == decision_id
        ]

    await w.tap.wait_for(lambda: len(reminders()) >= 2, 30, "two fence_failed reminders")
    ids = [n["notice_id"] for n in reminders()]
    assert len(set(ids)) == len(ids)
    traps = await w.tap.wait_for(
        lambda: [
            x
            for x in lab.traps.traps
            if x.kind == "fence_failed" and x.varbinds.get("fencerDecisionId") == decision_id
        ][2:],
        30,
        "the failure and two reminders as traps",
    )
    assert len({x.varbinds["fencerNoticeId"] for x in traps}) == len(traps)

    # the operator answers: the same decision runs again, and fences
    lab.bmcs["kvm04"].resume()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cli = subprocess.run(
        [sys.executable, "-m", "streams.cli", "fence", "retry", kvm04, "-c", str(w.file)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert cli.returncode == 0, cli.stderr
    assert f"retry of host {kvm04}" in cli.stdout
    done = await w.tap.wait_for(lambda: outcome(kvm04, True), 60, "kvm04 fenced on retry")
    assert done[0]["decision_id"] == decision_id
    assert lab.bmc_power_offs("kvm04") == 1
    assert sorted(lab.restarted_elsewhere("kvm04")) == sorted(lab.vms_of("kvm04"))
    # no reminder after the retry worked
    settled = len(reminders())
    await asyncio.sleep(4 * w.settings.actuator.renotify_interval)
    assert len(reminders()) <= settled + 1  # one may have been on its way
    assert all(n["at"] <= done[0]["finished_at"] + 5 for n in reminders())
