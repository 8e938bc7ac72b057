"""End to end: the actuator obeys only fencer's own signed, fresh, confirmed decision, once.

Each test starts a lab cloud (CloudStack simulator, SSH hosts, pyghmi BMCs, mail and trap
receivers) and real `fencer worker` processes on the session broker, then writes to
`fence-decisions` as an attacker (unsigned, another key), as a replay (an old signed record) or
as fencer's gate (the lab's key) for a host CloudStack says is Connecting or in Maintenance.
What the peers saw is asserted: power-offs counted by the BMCs, notices on the topic, traps and
mails received. The crash test SIGKILLs a worker between its claim and the BMC call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from fencing.events import FenceAction
from fencing.records import EvidenceSummary, FenceDecision, HostRef, HostStateRecord
from fencing.settings import FencerSettings
from fencing.signing import DECISION, load_keyring, parse_keys, sign
from lab.cloud import LabCloud
from lab.pipeline import Tap, WorkerProcess, write_settings
from streams.broker import EmbeddedBroker

pytestmark = pytest.mark.timeout(180)


class Stage:
    """A lab cloud, its settings file, a tap on fencer's topics and the workers started."""

    def __init__(self, lab: LabCloud, settings: FencerSettings, tmp: Path) -> None:
        self.lab, self.settings, self.tmp = lab, settings, tmp
        self.t = settings.kafka.topics
        self.file = write_settings(settings, tmp / "fencer.yaml")
        self.tap = Tap(settings)
        self.workers: list[WorkerProcess] = []

    async def start(self) -> Stage:
        t = self.t
        await self.tap.start(
            [
                t.fence_proposals,
                t.fence_decisions,
                t.fence_outcomes,
                t.notices,
                t.host_states,
                t.fence_claims,
                t.dead_letter,
            ]
        )
        return self

    async def worker(self, roles: str = "all") -> WorkerProcess:
        """Start a worker and wait until its poller reports the cluster's size."""
        seen = len(self.sizes())
        w = WorkerProcess(self.file, roles, self.tmp / f"worker{len(self.workers)}.log").start()
        self.workers.append(w)
        await self.tap.wait_for(lambda: len(self.sizes()) > seen, 90, "the worker to start")
        return w

    def sizes(self) -> list[dict[str, Any]]:
        return [
            v for _k, v in self.tap.of(self.t.fence_proposals) if v.get("kind") == "cluster_size"
        ]

    def of(self, topic: str, host: str | None = None) -> list[dict[str, Any]]:
        return [v for k, v in self.tap.of(topic) if host is None or k == host]

    def notices(self, kind: str, host: str | None = None) -> list[dict[str, Any]]:
        return [v for v in self.of(self.t.notices, host) if v.get("kind") == kind]

    def logs(self) -> str:
        return "\n".join(
            w.log_file.read_text(errors="replace")
            for w in self.workers
            if w.log_file is not None and w.log_file.exists()
        )

    async def stop(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(w.stop, 10) for w in self.workers))
        await self.tap.stop()


@pytest.fixture
async def stage(broker: EmbeddedBroker, tmp_path: Path) -> AsyncIterator[Stage]:
    async with LabCloud(broker, hosts=5, root=tmp_path / "lab", interval=0.5) as lab:
        settings = lab.settings()
        s = await Stage(lab, settings, tmp_path).start()
        try:
            yield s
        finally:
            await s.stop()


def decision_for(lab: LabCloud, name: str, decided_at: float, episode: int = 1) -> FenceDecision:
    h = lab.host(name)
    return FenceDecision(
        decision_id=f"{h.uuid}/{episode}/{int(decided_at) - 30}",
        host=HostRef(host_uuid=h.uuid, host_name=name, cluster_uuid=lab.cluster.uuid),
        episode=episode,
        action=FenceAction.STOP,
        approved=True,
        evidence=EvidenceSummary(suspect_since=decided_at - 30, stale_checks=3, files_checked=2),
        decided_at=decided_at,
        budget_used=1,
        budget_cap=3,
    )


def signed(d: FenceDecision, ring: Any) -> FenceDecision:
    return FenceDecision.model_validate(sign(ring, DECISION, d.model_dump(mode="json")))


async def back_with_record(s: Stage, d: FenceDecision) -> None:
    """Write the host-states record fencer's watch would have written for this decision."""
    record = {
        "host": d.host.host_uuid,
        "state": "fencing",
        "episode": d.episode,
        "decision_id": d.decision_id,
        "last_evidence": "stale",
        "stale_count": 3,
    }
    value = HostStateRecord(host=d.host, record=record, updated_at=time.time())
    await s.tap.send(s.t.host_states, d.host.host_uuid, value)


async def test_forged_decisions_are_refused_and_reported(stage: Stage) -> None:
    s, lab = stage, stage.lab
    await s.worker()
    # The case: the agent died, CloudStack says Disconnected, the host runs and writes.
    lab.agent_dies("kvm02")
    live = lab.host("kvm02")
    await s.tap.wait_for(
        lambda: s.of(s.t.host_states, live.uuid), 30, "fencer to watch the disconnected host"
    )
    now = time.time()
    unsigned = decision_for(lab, "kvm02", now)
    stranger = signed(
        decision_for(lab, "kvm02", now, episode=2), parse_keys("lab " + "x" * 40, "t")
    )
    await s.tap.send(s.t.fence_decisions, live.uuid, unsigned)
    await s.tap.send(s.t.fence_decisions, live.uuid, stranger)
    await s.tap.wait_for(
        lambda: len(s.notices("forged_record", live.uuid)) >= 2, 60, "two forged_record notices"
    )
    await s.tap.wait_for(
        lambda: (
            [t for t in lab.traps.traps if t.kind == "forged_record"][1:]
            and [m for m in lab.mail.mails if "FORGED" in m.subject][1:]
        ),
        30,
        "two forged_record traps and mails",
    )
    reasons = [n["reason"] for n in s.notices("forged_record", live.uuid)]
    assert any("(unsigned)" in r for r in reasons)
    assert any("bad signature" in r for r in reasons)
    n = s.notices("forged_record", live.uuid)[0]
    assert n["topic"] == s.t.fence_decisions and n["claimed_host"] == live.uuid
    assert isinstance(n["partition"], int) and isinstance(n["offset"], int)
    trap = next(t for t in lab.traps.traps if t.kind == "forged_record")
    assert s.t.fence_decisions in str(trap.varbinds.get("fencerReason"))
    # The actuator and the host watcher both dead-letter them.
    await s.tap.wait_for(lambda: len(s.of(s.t.dead_letter)) >= 4, 30, "four dead letters")
    await asyncio.sleep(3)  # nothing may follow
    assert lab.bmc_power_offs("kvm02") == 0 and lab.power_offs == []
    assert s.of(s.t.fence_outcomes) == [] and s.of(s.t.fence_claims) == []
    assert lab.degraded_calls("kvm02") == []
    assert lab.host("kvm02").powered and lab.restarted_elsewhere("kvm02") == []
    # Fencer's record of the host never saw an approval; nobody was told of a "decision".
    states = [v["record"]["state"] for v in s.of(s.t.host_states, live.uuid)]
    assert "fencing" not in states and "fenced" not in states, states
    assert not [t for t in lab.traps.traps if t.kind == "fence_decided"]


async def test_replayed_and_unconfirmed_decisions_are_refused(stage: Stage) -> None:
    s, lab = stage, stage.lab
    ring = load_keyring(s.settings)  # fencer's own key: these records are genuine
    await s.worker()
    # A replay: a genuine decision from an hour ago appended again, for a host CloudStack says
    # is down now (its agent died; it still runs and writes, so fencer's own checks never
    # propose it). Its stamp is not what refuses it (clocks are never compared): fencer's own
    # record of the host does not stand behind it.
    old_host = lab.host("kvm01")
    lab.agent_dies("kvm01")
    replay = signed(decision_for(lab, "kvm01", time.time() - 3600, episode=7), ring)
    await s.tap.send(s.t.fence_decisions, old_host.uuid, replay)
    # Agent coming back: CloudStack says Connecting (its agent died and reconnected, and its
    # startup takes long: the lab's CloudStack would otherwise make it Up at its next pass).
    connecting = lab.host("kvm03")
    lab.cloud.connect_delay = 600.0
    lab.agent_dies("kvm03")
    lab.agent_recovers("kvm03")
    assert lab.cloud.hosts[connecting.uuid].state == "Connecting"
    d3 = signed(decision_for(lab, "kvm03", time.time()), ring)
    await back_with_record(s, d3)
    await s.tap.send(s.t.fence_decisions, connecting.uuid, d3)
    # An operator's host: Disconnected, but in Maintenance.
    maint = lab.host("kvm04")
    lab.cloud.hosts[maint.uuid].resourcestate = "Maintenance"
    lab.cloud.set_host_state(maint.uuid, "Disconnected")
    await s.tap.wait_for(
        lambda: any(
            v["record"].get("state") == "maintenance" for v in s.of(s.t.host_states, maint.uuid)
        ),
        30,
        "fencer to see kvm04 in maintenance",
    )
    d4 = signed(decision_for(lab, "kvm04", time.time()), ring)
    await back_with_record(s, d4)
    await s.tap.send(s.t.fence_decisions, maint.uuid, d4)

    def refused(h: Any) -> list[dict[str, Any]]:
        return s.notices("fence_refused", h.uuid)

    def outcome_of(h: Any) -> list[dict[str, Any]]:
        return [v for v in s.of(s.t.fence_outcomes) if v["host"]["host_uuid"] == h.uuid]

    # The notice and the outcome go to two topics: either may be read first.
    await s.tap.wait_for(
        lambda: all(refused(h) and outcome_of(h) for h in (old_host, connecting, maint)),
        60,
        "three fence_refused notices and their outcomes",
    )
    why = refused(old_host)[0]["reason"]
    assert "not this one" in why or "no record of this host" in why, why
    assert "CloudStack says the host is Connecting now" in refused(connecting)[0]["reason"]
    assert "resource state is Maintenance" in refused(maint)[0]["reason"]
    outcomes = {v["host"]["host_uuid"]: v for v in s.of(s.t.fence_outcomes)}
    for h in (old_host, connecting, maint):
        assert outcomes[h.uuid]["success"] is False
        assert outcomes[h.uuid]["error"].startswith("refused: ")
    await s.tap.wait_for(
        lambda: len([t for t in lab.traps.traps if t.kind == "fence_refused"]) >= 3,
        30,
        "three fence_refused traps",
    )
    assert lab.power_offs == [] and s.of(s.t.fence_claims) == []
    assert all(lab.degraded_calls(n) == [] for n in ("kvm01", "kvm03", "kvm04"))


async def test_a_worker_killed_between_claim_and_bmc_call_powers_off_once(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    async with LabCloud(broker, hosts=4, root=tmp_path / "lab", interval=0.5) as lab:
        base = lab.settings()
        settings = base.model_copy(
            update={
                "actuator": base.actuator.model_copy(
                    # The lease outlasts the decision's age limit: the takeover must not
                    # refuse a decision only because it waited for a dead claimant.
                    update={"decision_max_age": 30.0, "claim_lease": 32.0}
                )
            }
        )
        s = await Stage(lab, settings, tmp_path).start()
        try:
            first = await s.worker()
            victim = lab.host("kvm03")
            lab.bmc_unreachable("kvm03")  # the BMC call will hang after the claim
            await lab.crash("kvm03")
            await s.tap.wait_for(
                lambda: [c for c in s.of(s.t.fence_claims) if c["host_uuid"] == victim.uuid],
                90,
                "the actuator's claim",
            )
            first.kill()
            assert lab.bmc_power_offs("kvm03") == 0
            assert s.of(s.t.fence_outcomes, victim.uuid) == []
            lab.bmcs["kvm03"].resume()
            await s.worker()
            await s.tap.wait_for(
                lambda: [o for o in s.of(s.t.fence_outcomes, victim.uuid) if o["success"]],
                120,
                "a successful outcome after the restart",
            )
            await asyncio.sleep(3)
            assert lab.bmc_power_offs("kvm03") == 1
            assert len(lab.degraded_calls("kvm03")) == 1
            claims = [
                c
                for c in s.of(s.t.fence_claims)
                if c["host_uuid"] == victim.uuid and c["state"] != "renewed"
            ]
            states = [c["state"] for c in claims]
            # The dead worker's claim, then the takeover that did it. A decision re-sent while
            # the takeover waited out the lease may race a second claimant: the log's order
            # decides, and the loser releases its claim without touching the BMC.
            assert states[0] == "claimed" and states.count("done") == 1, states
            (done,) = [c for c in claims if c["state"] == "done"]
            winner = next(c for c in claims if c["claim_id"] == done["claim_id"])
            assert winner["state"] == "claimed" and winner["takeover_of"] == claims[0]["claim_id"]
            assert claims[0]["claimed_by"] != winner["claimed_by"]
            others = {c["claim_id"] for c in claims[1:] if c["state"] == "claimed"} - {
                winner["claim_id"]
            }
            released = {c["claim_id"] for c in claims if c["state"] == "released"}
            assert others <= released, states
            assert "taking over" in s.logs()
        finally:
            await s.stop()


async def test_roles_in_another_order_rerun_nothing(stage: Stage) -> None:
    s, lab = stage, stage.lab
    w = await s.worker("ingest,probe,actuate,notify")
    victim = lab.host("kvm05")
    await lab.crash("kvm05")
    await s.tap.wait_for(
        lambda: [o for o in s.of(s.t.fence_outcomes, victim.uuid) if o["success"]],
        90,
        "the fence",
    )
    outcomes = len(s.of(s.t.fence_outcomes))
    w.stop()
    await s.worker("notify,actuate,probe,ingest")
    await asyncio.sleep(6)
    assert len(s.of(s.t.fence_outcomes)) == outcomes
    assert lab.bmc_power_offs("kvm05") == 1 and len(lab.degraded_calls("kvm05")) == 1
    # One consumer group, one set of tables: the second worker went on where the first stopped.
    groups = [p.name for p in (s.settings.data_dir / "faust").iterdir()]
    assert groups == [s.settings.kafka.group_id], groups
    claims = [c for c in s.of(s.t.fence_claims) if c["host_uuid"] == victim.uuid]
    assert [c["state"] for c in claims if c["state"] != "renewed"] == ["claimed", "done"]


async def wait_listening(s: Stage, worker: WorkerProcess, within: float = 90) -> None:
    """Wait until the actuate worker's decision log took its first sample (what is appended
    from then on is read live)."""
    deadline = time.monotonic() + within
    while "actuator listening:" not in (
        worker.log_file.read_text(errors="replace") if worker.log_file else ""
    ):
        assert time.monotonic() < deadline, s.logs()[-3000:]
        await asyncio.sleep(0.2)


async def test_the_gates_clock_far_off_changes_nothing_for_a_decision_read_live(
    stage: Stage,
) -> None:
    """Decisions stamped 10 minutes in the past and in the future of the actuator's clock
    (the gate worker's clock far behind or ahead), signed with fencer's key and backed by
    fencer's record, appended while the actuator listens: both are carried out, once each.
    An actuate-only worker: no watch rewrites the host records the test wrote."""
    s, lab = stage, stage.lab
    ring = load_keyring(s.settings)
    w = WorkerProcess(s.file, "actuate,notify", s.tmp / "actuator.log").start()
    s.workers.append(w)
    await wait_listening(s, w)
    decided: dict[str, FenceDecision] = {}
    for name, skew in (("kvm01", -600.0), ("kvm02", 600.0)):
        lab.agent_dies(name)  # CloudStack: Disconnected; the host still runs
        d = signed(decision_for(lab, name, time.time() + skew), ring)
        await back_with_record(s, d)
        await s.tap.send(s.t.fence_decisions, d.host.host_uuid, d)
        decided[name] = d
    for name, d in decided.items():
        await s.tap.wait_for(
            lambda d=d: [o for o in s.of(s.t.fence_outcomes, d.host.host_uuid) if o["success"]],
            60,
            f"{name} fenced",
        )
    await asyncio.sleep(2)
    for name, d in decided.items():
        assert lab.bmc_power_offs(name) == 1, name
        assert len(lab.degraded_calls(name)) == 1, name
        assert s.notices("fence_refused", d.host.host_uuid) == []
    assert "read live: reached the log at most" in s.logs()


async def test_a_decision_written_while_no_actuator_listened_is_refused_then_fenced_once(
    stage: Stage,
) -> None:
    """A crashed host's fence is approved while no actuate worker runs. The actuator started
    later reads that decision from the topic's backlog: refused as not read live, nothing
    done; the host goes back to checking, its next stale check proposes again under the same
    decision id, and the decision the gate repeats is read live and carried out, once."""
    s, lab = stage, stage.lab
    arrived: list[tuple[float, dict[str, Any]]] = []  # outcomes, on the test's clock
    s.tap.on_record = lambda topic, _k, v: (
        arrived.append((time.monotonic(), v)) if topic == s.t.fence_outcomes else None
    )
    await s.worker("ingest,probe,notify")
    victim = lab.host("kvm04")
    await lab.crash("kvm04")
    await s.tap.wait_for(
        lambda: [d for d in s.of(s.t.fence_decisions, victim.uuid) if d.get("approved")],
        90,
        "an approved decision while no actuator runs",
    )
    (first,) = [d for d in s.of(s.t.fence_decisions, victim.uuid) if d.get("approved")]
    await asyncio.sleep(1)
    assert lab.bmc_power_offs("kvm04") == 0
    w = WorkerProcess(s.file, "actuate", s.tmp / "actuator.log").start()
    s.workers.append(w)
    await s.tap.wait_for(
        lambda: [o for o in s.of(s.t.fence_outcomes, victim.uuid) if o["success"]],
        120,
        "the fence after the refusal",
    )
    refused_at = next(at for at, o in arrived if o.get("refused"))
    fenced_at = next(at for at, o in arrived if o["success"])
    print(f"a backlog refusal delayed the fence by {fenced_at - refused_at:.1f} s")
    await asyncio.sleep(3)
    outcomes = s.of(s.t.fence_outcomes, victim.uuid)
    assert [o["refused"] for o in outcomes] == [True, False], outcomes
    assert "not read live" in outcomes[0]["error"]
    assert {o["decision_id"] for o in outcomes} == {first["decision_id"]}
    (notice,) = s.notices("fence_refused", victim.uuid)
    assert "not read live" in notice["reason"]
    assert lab.bmc_power_offs("kvm04") == 1 and len(lab.degraded_calls("kvm04")) == 1
    approved = [d for d in s.of(s.t.fence_decisions, victim.uuid) if d.get("approved")]
    assert len(approved) >= 2 and {d["decision_id"] for d in approved} == {first["decision_id"]}
    claims = [c["state"] for c in s.of(s.t.fence_claims) if c["host_uuid"] == victim.uuid]
    assert [c for c in claims if c != "renewed"] == ["claimed", "done"], claims
