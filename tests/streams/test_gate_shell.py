"""The gate's shell: the gate worker's clock judges and a proposal's stamp is never compared with
it, a decision's two row writes survive losing either, a host without a cluster is never counted
under "", and the storm guard's denominator is the cluster's Enabled hosts as CloudStack's
simulator lists them."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import SecretStr

from fencing.events import FenceAction, HostDisconnected, WithheldReason
from fencing.records import (
    EvidenceSummary,
    FenceDecision,
    FenceProposal,
    GateSignal,
    HostRef,
)
from fencing.settings import CloudStackSettings, FencerSettings, PolicySettings, SigningSettings
from fencing.signing import DECISION, load_keyring, new_key_line, verify
from lab.cloudstack_sim import CloudStackSimulator, SimCloud
from streams import gating
from streams.codec import HostInput, dump, gate_input
from streams.runtime import Runtime
from streams.watch import apply

pytestmark = pytest.mark.timeout(60)

NOW = 1_800_000_000.0
HOUR = 3600.0


SIGNING = SigningSettings(keys=SecretStr(new_key_line("gate-test")))


def runtime(**policy: Any) -> Runtime:
    settings = FencerSettings(
        policy=PolicySettings(**{"startup_quiet": 0, "fence_cap": 3, **policy}), signing=SIGNING
    )
    return Runtime(settings=settings, started_at=NOW - 1000)


def signed(d: FenceDecision) -> dict[str, Any]:
    """The decision's content once its gate signature checks out."""
    ring = load_keyring(FencerSettings(signing=SIGNING))
    return verify(ring, DECISION, d.model_dump(mode="json"))


def proposal(n: int, at: float, cluster: str | None = "c1") -> FenceProposal:
    return FenceProposal(
        decision_id=f"h{n}/1/{int(at)}",
        host=HostRef(host_uuid=f"h{n}", cluster_uuid=cluster),
        episode=1,
        action=FenceAction.STOP,
        evidence=EvidenceSummary(suspect_since=at - 300, stale_checks=3),
        proposed_at=at,
    )


def sized(table: dict[str, Any], rt: Runtime, hosts: int = 20, cluster: str = "c1") -> None:
    sig = GateSignal(kind="cluster_size", cluster_uuid=cluster, at=NOW, host_count=hosts)
    assert gating.apply_gate(table, sig, rt, now=NOW) is None


@pytest.mark.parametrize("offset", [-10 * 60.0, 10 * 60.0, 2 * HOUR])
def test_a_proposal_stamped_minutes_off_is_judged_at_the_gate_clock(offset: float) -> None:
    """The watching worker's clock 10 minutes behind or ahead (or 2 hours) of the gate's: its
    proposals are judged like any other, approved while the budget allows, then capped."""
    rt, table = runtime(), {}
    sized(table, rt)
    for n in range(3):
        p = proposal(n, NOW + n + offset)
        d = gating.apply_gate(table, p, rt, now=NOW + n)
        assert isinstance(d, FenceDecision) and d.approved and d.decided_at == NOW + n
        assert signed(d)["decided_at"] == NOW + n and d.budget_used == n + 1
    assert [g["at"] for g in table["c1"]["grants"]] == [NOW, NOW + 1, NOW + 2]
    capped = gating.apply_gate(table, proposal(8, NOW + 20 + offset), rt, now=NOW + 20)
    assert isinstance(capped, FenceDecision) and not capped.approved
    assert capped.withheld_reason is WithheldReason.CAP_REACHED and capped.budget_used == 3
    assert len(table[gating.GLOBAL_ROW]["grants"]) == 3


def test_the_gate_judges_at_its_own_clock_not_the_stamp() -> None:
    rt, table = runtime(), {}
    sized(table, rt)
    p = proposal(1, NOW - 250)  # a worker 250 s slow
    d = gating.apply_gate(table, p, rt, now=NOW)
    assert isinstance(d, FenceDecision) and d.approved and d.decided_at == NOW
    assert table["c1"]["grants"][0]["at"] == NOW


def test_a_repeated_approval_is_sent_again_at_the_gate_clock() -> None:
    rt, table = runtime(), {}
    sized(table, rt)
    p = proposal(1, NOW)
    first = gating.apply_gate(table, p, rt, now=NOW)
    again = gating.apply_gate(
        table, p.model_copy(update={"proposed_at": NOW + 60}), rt, now=NOW + 61
    )
    assert isinstance(first, FenceDecision) and isinstance(again, FenceDecision)
    # re-sent fresh (the actuator refuses old decisions), signed again by the gate
    assert signed(again) == {**signed(first), "decided_at": NOW + 61}
    assert len(table["c1"]["grants"]) == 1


def test_a_temporary_withhold_is_judged_again() -> None:
    rt, table = runtime(), {}
    p = proposal(1, NOW)
    first = gating.apply_gate(table, p, rt, now=NOW)  # no cluster size yet
    assert isinstance(first, FenceDecision)
    assert first.withheld_reason is WithheldReason.CLUSTER_SIZE_UNKNOWN
    sized(table, rt)
    again = gating.apply_gate(table, p, rt, now=NOW + 60)
    assert isinstance(again, FenceDecision) and again.approved and again.decided_at == NOW + 60


def test_a_proposal_without_a_cluster_is_withheld_as_temporary_and_touches_no_row() -> None:
    rt, table = runtime(), {}
    d = gating.apply_gate(table, proposal(1, NOW, cluster=None), rt, now=NOW)
    assert isinstance(d, FenceDecision) and not d.approved
    assert d.withheld_reason is WithheldReason.CLUSTER_SIZE_UNKNOWN
    assert table == {}
    sig = GateSignal(kind="suspect", cluster_uuid="", at=NOW, host_uuid="h1")
    assert gating.apply_gate(table, sig, rt, now=NOW) is None and table == {}


class StoredTable(dict[str, Any]):
    """A gate table whose values come back as JSON, as from the changelog; counts its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def __setitem__(self, key: str, value: Any) -> None:
        self.writes += 1
        super().__setitem__(key, json.loads(json.dumps(value)))


def test_an_unchanged_gate_row_is_not_written_again() -> None:
    rt, table = runtime(), StoredTable()
    sized(table, rt, hosts=20)
    sized(table, rt, hosts=20)  # the next poll, nothing changed
    assert table.writes == 1 and table["c1"]["hosts"] == 20
    sized(table, rt, hosts=19)
    assert table.writes == 2 and table["c1"]["hosts"] == 19
    suspect = GateSignal(kind="suspect", cluster_uuid="c1", at=NOW, host_uuid="h1")
    assert gating.apply_gate(table, suspect, rt, now=NOW) is None
    assert gating.apply_gate(table, suspect, rt, now=NOW + 1) is None
    assert table.writes == 3 and table["c1"]["suspect"] == ["h1"]
    d = gating.apply_gate(table, proposal(1, NOW + 2), rt, now=NOW + 2)
    assert isinstance(d, FenceDecision) and d.approved
    sized(table, rt, hosts=19)  # a row with a grant, read back from JSON, is still equal
    assert table.writes == 5 and len(table["c1"]["grants"]) == 1


def test_a_suspect_waits_for_its_cluster_before_the_gate_counts_it() -> None:
    settings = FencerSettings(policy=PolicySettings(startup_quiet=0))
    topics = settings.kafka.topics
    policy = settings.policy.to_policy()
    bare = HostInput(HostDisconnected(NOW), HostRef(host_uuid="h1"))
    row, out = apply(None, bare, "h1", policy, settings, topics)
    assert row is not None
    gate_out = [o for o in out if o[0] == topics.fence_proposals]
    assert gate_out == []  # never a row named ""
    # the poller tells the cluster: the held-back suspect signal goes out now, once
    known = HostInput(HostDisconnected(NOW + 30), HostRef(host_uuid="h1", cluster_uuid="c1"))
    row, out = apply(row, known, "h1", policy, settings, topics)
    signals = [GateSignal.model_validate_json(v) for t, _, v in out if t == topics.fence_proposals]
    assert [(s.kind, s.cluster_uuid, s.host_uuid) for s in signals] == [("suspect", "c1", "h1")]
    assert row is not None
    _, out = apply(row, known, "h1", policy, settings, topics)
    assert [o for o in out if o[0] == topics.fence_proposals] == []
    # a host whose cluster is known from the start: one suspect signal, as before
    _, out = apply(None, known, "h2", policy, settings, topics)
    assert len([o for o in out if o[0] == topics.fence_proposals]) == 1


async def test_the_poller_counts_only_enabled_hosts_for_the_storm_guard() -> None:
    sc = SimCloud()
    zone = sc.add_zone()
    c1, c2 = sc.add_cluster(zone), sc.add_cluster(zone)
    for i in range(4):
        sc.add_host(c1, f"up{i}", f"10.0.0.{10 + i}")
    sc.add_host(c1, "down", "10.0.0.20", state="Disconnected")
    sc.add_host(c1, "off", "10.0.0.21", resourcestate="Disabled")
    sc.add_host(c1, "maint", "10.0.0.22", resourcestate="Maintenance")
    sc.add_host(c1, "going", "10.0.0.23", resourcestate="PrepareForMaintenance")
    sc.add_host(c2, "only-disabled", "10.0.1.10", resourcestate="Disabled")
    sim = CloudStackSimulator(sc)
    await sim.start()
    rt = Runtime(
        settings=FencerSettings(
            cloudstack=CloudStackSettings(
                endpoint=sim.url,
                api_key=SecretStr(sim.api_key),
                secret_key=SecretStr(sim.secret_key),
            )
        ),
        started_at=time.time(),
    )
    try:
        _, sizes = await rt.poller.poll()
    finally:
        await rt.close()
        await sim.stop()
    assert {g.cluster_uuid: g.host_count for g in sizes} == {c1.uuid: 5, c2.uuid: 0}


def test_the_gate_topic_tells_its_two_record_kinds_apart_by_kind_and_reads_legacy_records() -> None:
    p, sig = proposal(1, NOW), GateSignal(kind="suspect", cluster_uuid="c1", at=NOW, host_uuid="h1")
    assert json.loads(dump(p))["kind"] == "proposal"
    assert gate_input(SimpleNamespace(value=dump(p))) == p
    assert gate_input(SimpleNamespace(value=dump(sig))) == sig
    # Written before proposals carried a kind: still a proposal (it has a decision_id).
    legacy = {k: v for k, v in json.loads(dump(p)).items() if k != "kind"}
    assert gate_input(SimpleNamespace(value=json.dumps(legacy).encode())) == p
    # A record is read as the kind it names; what does not fit says which field is wrong.
    assert gate_input(SimpleNamespace(value=b'{"kind": "proposal", "episode": 1}')) == (
        "invalid gate record: decision_id: Field required"
    )
    bad = {**json.loads(dump(sig)), "kind": "evicted"}
    assert str(gate_input(SimpleNamespace(value=json.dumps(bad).encode()))).startswith(
        "invalid gate record: kind: Input should be"
    )
    assert gate_input(SimpleNamespace(value=b'{"cluster_uuid": "c1", "at": 1}')) == (
        "invalid gate record: kind: Field required"
    )
    assert str(gate_input(SimpleNamespace(value=b"not json"))).startswith(
        "invalid gate record: value: Invalid JSON"
    )


# -- a decision writes two rows, two changelog records: a worker can die between them ---------


def test_a_decision_whose_global_write_is_lost_still_counts_toward_the_global_cap() -> None:
    rt, table = runtime(global_cap=2), StoredTable()
    sized(table, rt, cluster="c1")
    sized(table, rt, cluster="c2")
    first = gating.apply_gate(table, proposal(1, NOW), rt, now=NOW, position=(0, 2))
    assert isinstance(first, FenceDecision) and first.approved
    before = json.loads(json.dumps(table[gating.GLOBAL_ROW]))
    second = gating.apply_gate(table, proposal(2, NOW + 1), rt, now=NOW + 1, position=(0, 3))
    assert isinstance(second, FenceDecision) and second.approved
    # Killed between the two writes: the cluster row (grant and position) made it, the global
    # row's write did not. The proposal is never judged again (its position is applied).
    table[gating.GLOBAL_ROW] = before
    assert len(table[gating.GLOBAL_ROW]["grants"]) == 1 and table["c1"]["position"] == [0, 3]
    again = gating.apply_gate(table, proposal(2, NOW + 1), rt, now=NOW + 5, position=(0, 3))
    assert again is None
    # The next proposal of another cluster meets both grants: the global cap (2) holds.
    other = gating.apply_gate(table, proposal(3, NOW + 6, "c2"), rt, now=NOW + 6, position=(0, 4))
    assert isinstance(other, FenceDecision) and not other.approved
    assert other.withheld_reason is WithheldReason.GLOBAL_CAP_REACHED
    grants = [g["decision_id"] for g in table[gating.GLOBAL_ROW]["grants"]]
    assert grants == [first.decision_id, second.decision_id]
    assert table["c2"]["grants"] == []


def test_a_decision_whose_cluster_write_is_lost_is_judged_again_and_counts_once() -> None:
    """The reverse order: the global row written, the cluster row (and its position) lost. The
    proposal is read again and judged again: approved again, the same fence, nothing consumed
    twice, and the cluster's next proposal meets the cap with it counted."""
    rt, table = runtime(fence_cap=2, global_cap=5), StoredTable()
    sized(table, rt)
    first = gating.apply_gate(table, proposal(1, NOW), rt, now=NOW, position=(0, 1))
    assert isinstance(first, FenceDecision) and first.approved
    before = json.loads(json.dumps(table["c1"]))
    second = gating.apply_gate(table, proposal(2, NOW + 1), rt, now=NOW + 1, position=(0, 2))
    assert isinstance(second, FenceDecision) and second.approved and second.budget_used == 2
    table["c1"] = before  # the cluster row's write lost
    again = gating.apply_gate(table, proposal(2, NOW + 1), rt, now=NOW + 9, position=(0, 2))
    assert isinstance(again, FenceDecision) and again.approved
    assert signed(again) == {**signed(second), "decided_at": NOW + 9}
    for row in (table["c1"], table[gating.GLOBAL_ROW]):
        assert [g["decision_id"] for g in row["grants"]] == [first.decision_id, second.decision_id]
    assert table["c1"]["position"] == [0, 2]
    third = gating.apply_gate(table, proposal(3, NOW + 10), rt, now=NOW + 10, position=(0, 3))
    assert isinstance(third, FenceDecision) and not third.approved
    assert third.withheld_reason is WithheldReason.CAP_REACHED and third.budget_used == 2


def test_rows_written_before_the_gate_stopped_comparing_clocks_still_load() -> None:
    rt, table = runtime(), StoredTable()
    sized(table, rt)
    first = gating.apply_gate(table, proposal(1, NOW), rt, now=NOW)
    assert isinstance(first, FenceDecision)
    row = table["c1"]
    table["c1"] = {**row, "verdicts": [{**v, "skew": None} for v in row["verdicts"]]}
    resent = proposal(1, NOW).model_copy(update={"proposed_at": NOW + 5})
    again = gating.apply_gate(table, resent, rt, now=NOW + 5)
    assert isinstance(again, FenceDecision) and again.approved and again.budget_used == 1
    assert signed(again) == {**signed(first), "decided_at": NOW + 5}
    assert "skew" not in table["c1"]["verdicts"][0]


class ScannedTable(StoredTable):
    """A gate table that counts how often all of its rows were read."""

    def __init__(self) -> None:
        super().__init__()
        self.scans = 0

    def items(self) -> Any:
        self.scans += 1
        return super().items()


def test_the_shared_row_is_reconciled_once_after_each_assignment_not_at_every_proposal() -> None:
    rt, table, sync = runtime(global_cap=2), ScannedTable(), gating.Reconcile()
    sized(table, rt, cluster="c1")
    sized(table, rt, cluster="c2")
    first = gating.apply_gate(table, proposal(1, NOW), rt, now=NOW, position=(0, 2), sync=sync)
    assert isinstance(first, FenceDecision) and first.approved
    assert table.scans == 1 and not sync.due
    before = json.loads(json.dumps(table[gating.GLOBAL_ROW]))
    second = gating.apply_gate(
        table, proposal(2, NOW + 1), rt, now=NOW + 1, position=(0, 3), sync=sync
    )
    assert isinstance(second, FenceDecision) and second.approved and table.scans == 1
    # The worker dies between the two writes of the second decision; the next owner recovers
    # the rows (the partition is assigned: due again) and reconciles before judging.
    table[gating.GLOBAL_ROW] = before
    asyncio.run(sync.on_partitions_changed(set()))
    assert sync.due
    other = gating.apply_gate(
        table, proposal(3, NOW + 6, "c2"), rt, now=NOW + 6, position=(0, 4), sync=sync
    )
    assert isinstance(other, FenceDecision) and not other.approved
    assert other.withheld_reason is WithheldReason.GLOBAL_CAP_REACHED
    assert table.scans == 2 and not sync.due


class CountedTable(StoredTable):
    """A StoredTable that counts its reads."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def get(self, key: str, default: Any = None) -> Any:
        self.reads += 1
        return super().get(key, default)


def test_the_gate_judges_the_same_through_its_row_cache_and_reads_its_own_rows_from_it() -> None:
    from streams.tables import CachedRows

    rt = runtime(fence_cap=2)
    plain, inner = StoredTable(), CountedTable()
    cached = CachedRows(inner)
    inputs: list[tuple[Any, float, tuple[int, int] | None]] = []
    for c in ("c1", "c2"):
        sig = GateSignal(kind="cluster_size", cluster_uuid=c, at=NOW, host_count=4)
        inputs.append((sig, NOW, None))
    offset = 0
    for n in range(1, 7):  # the third of a cluster is over its cap; one read again
        cluster = "c1" if n % 2 else "c2"
        suspect = GateSignal(kind="suspect", cluster_uuid=cluster, at=NOW + n, host_uuid=f"h{n}")
        inputs.append((suspect, NOW + n, (0, offset)))
        inputs.append((proposal(n, NOW + n, cluster), NOW + n, (0, offset + 1)))
        offset += 2
    inputs.append((proposal(5, NOW + 5, "c1"), NOW + 9, (0, 9)))  # at or before c1's position
    out_plain, out_cached = [], []
    reads_per_input = []
    for item, now, position in inputs:
        out_plain.append(gating.apply_gate(plain, item, rt, now=now, position=position))
        before = inner.reads
        out_cached.append(gating.apply_gate(cached, item, rt, now=now, position=position))
        reads_per_input.append(inner.reads - before)
    assert out_cached == out_plain
    assert [d.approved for d in out_plain if d is not None] == [True] * 4 + [False] * 2
    assert inner == plain and inner.writes == plain.writes
    # What the cache serves is what the table gives back after its JSON round trip.
    for key in inner:
        assert cached.get(key) == inner[key]
        assert json.dumps(cached[key], sort_keys=True) == json.dumps(inner[key], sort_keys=True)
    # Once both rows are written, a proposal reads nothing from the table.
    assert reads_per_input[-1] == 0 and max(reads_per_input[4:]) == 0
    # Forgotten at a change of assignment: the rows are read from the table again.
    asyncio.run(cached.on_partitions_changed(set()))
    inner.reads = 0
    assert cached.get("c1") == inner["c1"] and inner.reads == 1
    assert cached.get("nothing") is None and "nothing" not in cached
    del cached["c2"]
    assert "c2" not in inner and cached.get("c2") is None
    assert sorted(cached) == sorted(inner) and len(cached) == len(inner)
    assert dict(cached.items()) == dict(inner.items())
