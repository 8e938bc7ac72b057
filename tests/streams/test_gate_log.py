"""The gate's shell reads the decision log (fence-decisions) on the embedded broker: a decision
published whose two row writes were both lost still counts, a record fencer did not sign counts
nothing, and what the read costs with a thousand decisions."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr

from fencing.events import FenceAction, WithheldReason
from fencing.records import EvidenceSummary, FenceDecision, FenceProposal, GateSignal, HostRef
from fencing.settings import FencerSettings, PolicySettings, SigningSettings
from fencing.signing import new_key_line
from streams import gating
from streams.codec import dump
from streams.kafka import aiokafka_kwargs
from streams.runtime import Runtime
from streams.topic_reader import TopicReaderError

NOW = 1_800_000_000.0
SIGNING = SigningSettings(keys=SecretStr(new_key_line("gate-log-test")))
FencerSettingsFactory = Callable[..., FencerSettings]
OTHER = SigningSettings(keys=SecretStr(new_key_line("not-fencer")))


def runtime(make: FencerSettingsFactory, signing: SigningSettings = SIGNING) -> Runtime:
    policy = PolicySettings(startup_quiet=0, fence_cap=2, global_cap=5)
    settings: FencerSettings = make(isolated_topics=True, policy=policy, signing=signing)
    return Runtime(settings=settings, started_at=NOW - 1000)


def proposal(n: int, at: float, cluster: str = "c1") -> FenceProposal:
    return FenceProposal(
        decision_id=f"h{n}/1/{int(at)}",
        host=HostRef(host_uuid=f"h{n}", cluster_uuid=cluster),
        episode=1,
        action=FenceAction.STOP,
        evidence=EvidenceSummary(suspect_since=at - 300, stale_checks=3),
        proposed_at=at,
    )


def sized(table: dict[str, Any], rt: Runtime, cluster: str = "c1") -> None:
    sig = GateSignal(kind="cluster_size", cluster_uuid=cluster, at=NOW, host_count=20)
    assert gating.apply_gate(table, sig, rt, now=NOW) is None


def stored(table: dict[str, Any]) -> dict[str, Any]:
    """The rows as the changelog holds them (JSON)."""
    return {k: json.loads(json.dumps(v)) for k, v in table.items()}


async def publish(rt: Runtime, decisions: list[FenceDecision], raw: bool = False) -> None:
    producer = AIOKafkaProducer(**aiokafka_kwargs(rt.settings))
    await producer.start()
    try:
        for d in decisions:
            key = d.host.host_uuid.encode()
            await producer.send(rt.settings.kafka.topics.fence_decisions, dump(d), key=key)
        await producer.flush()
    finally:
        await producer.stop()


async def test_a_decision_published_whose_two_row_writes_were_lost_counts_at_the_cap(
    fencer_settings: FencerSettingsFactory,
) -> None:
    rt = runtime(fencer_settings)
    table: dict[str, Any] = {}
    sized(table, rt)
    sync = gating.Reconcile()
    await sync.prepare(rt, proposal(1, NOW), table)  # the first start: an empty log
    assert sync.logged == []
    first = gating.apply_gate(table, proposal(1, NOW), rt, now=NOW, position=(0, 1), sync=sync)
    assert isinstance(first, FenceDecision) and first.approved and not sync.due
    before = stored(table)
    second = gating.apply_gate(
        table, proposal(2, NOW + 1), rt, now=NOW + 1, position=(0, 2), sync=sync
    )
    assert isinstance(second, FenceDecision) and second.approved
    # Both reached fence-decisions; the worker died before either row of the second did.
    await publish(rt, [first, second])
    # Records fencer did not sign: an approval signed with another key, one with no signature,
    # and a signed one whose content was changed afterwards. None may take a place in the budget.
    stranger = runtime(fencer_settings, OTHER)
    forged = stranger.sign_decision(second.model_copy(update={"decision_id": "h7/1/x"}))
    unsigned = second.model_copy(update={"decision_id": "h8/1/x", "signature": None})
    changed = second.model_copy(update={"decision_id": "h9/1/x"})
    await publish(rt, [forged, unsigned, changed])
    # The next owner recovers the older rows, is assigned the partition, reads the log.
    table = before
    sync = gating.Reconcile()
    signal = GateSignal(kind="cluster_size", cluster_uuid="c1", at=NOW, host_count=20)
    await sync.prepare(rt, signal, table)  # a signal does not wait for the log
    assert sync.logged is None
    third = proposal(3, NOW + 2)
    await sync.prepare(rt, third, table)
    assert sync.logged is not None
    # (in partition order: the topic is keyed by host)
    assert sorted(d.decision_id for d in sync.logged) == [first.decision_id, second.decision_id]
    # Without the log the cluster would get a third fence over its cap of 2 (the bug) ...
    blind = gating.Reconcile()
    blind.logged = []
    unsafe = gating.apply_gate(stored(table), third, rt, now=NOW + 2, position=(0, 4), sync=blind)
    assert isinstance(unsafe, FenceDecision) and unsafe.approved
    # ... with it, the cap holds; the rows written hold both grants, once each.
    verdict = gating.apply_gate(table, third, rt, now=NOW + 2, position=(0, 4), sync=sync)
    assert isinstance(verdict, FenceDecision) and not verdict.approved
    assert (verdict.withheld_reason, verdict.budget_used) == (WithheldReason.CAP_REACHED, 2)
    for row in (table["c1"], table[gating.GLOBAL_ROW]):
        assert [g["decision_id"] for g in row["grants"]] == [
            first.decision_id,
            second.decision_id,
        ]
    assert not sync.due and sync.logged is None
    # The lost decision proposed again: the same approval, nothing consumed.
    again = gating.apply_gate(
        table, proposal(2, NOW + 1), rt, now=NOW + 3, position=(0, 5), sync=sync
    )
    assert isinstance(again, FenceDecision) and again.approved and again.budget_used == 2
    # The shared row remembers how far the log is merged (every record read, the unsigned ones
    # included); the next owner reads on from there, only what came after.
    merged = table[gating.GLOBAL_ROW][gating.LOG_POSITION]
    assert sum(merged.values()) == 5
    late = rt.sign_decision(second.model_copy(update={"decision_id": "h2/1/late"}))
    await publish(rt, [late])
    sync = gating.Reconcile()
    await sync.prepare(rt, proposal(4, NOW + 5), table)
    assert sync.logged is not None and [d.decision_id for d in sync.logged] == ["h2/1/late"]
    assert sum(sync.position.values()) == 6
    # A shared row written back to before the log was merged (or one without a position):
    # the whole log again.
    table[gating.GLOBAL_ROW] = {**table[gating.GLOBAL_ROW], gating.LOG_POSITION: "bad"}
    sync = gating.Reconcile()
    await sync.prepare(rt, proposal(4, NOW + 5), table)
    assert sync.logged is not None and len(sync.logged) == 3


async def test_reading_a_thousand_decisions_at_start(
    fencer_settings: FencerSettingsFactory,
) -> None:
    rt = runtime(fencer_settings)
    approved = FenceDecision(
        decision_id="x",
        host=HostRef(host_uuid="h0", cluster_uuid="c1"),
        episode=1,
        action=FenceAction.STOP,
        approved=True,
        evidence=EvidenceSummary(suspect_since=NOW - 300, stale_checks=3),
        decided_at=NOW,
    )
    decisions = [
        rt.sign_decision(
            approved.model_copy(
                update={
                    "decision_id": f"h{n}/1/{n}",
                    "host": HostRef(host_uuid=f"h{n}", cluster_uuid=f"c{n % 7}"),
                    "decided_at": NOW + n,
                    "approved": n % 3 != 0,
                }
            )
        )
        for n in range(1000)
    ]
    await publish(rt, decisions)
    started = time.monotonic()
    logged, end = await gating.read_decision_log(rt)
    took = time.monotonic() - started
    started = time.monotonic()
    none, same = await gating.read_decision_log(rt, end)
    after = time.monotonic() - started
    print(f"\nread_decision_log: 1000 decisions in {took:.3f} s, none after them in {after:.3f} s")
    assert len(logged) == 1000 and sum(end.values()) == 1000 and took < 15.0
    assert (none, same) == ([], end)


async def test_an_assignment_during_the_read_reads_the_log_again(
    fencer_settings: FencerSettingsFactory,
) -> None:
    """The rows recovered after an assignment that came during the read may be older than the
    log read: the log is read again, after it."""
    rt = runtime(fencer_settings)
    reads: list[int] = []

    async def read(runtime: Runtime, start: gating.LogPosition) -> Any:
        reads.append(len(reads))
        if len(reads) == 1:
            await sync.on_partitions_changed(set())  # a rebalance while the first read runs
        return await gating.read_decision_log(runtime, start)

    sync = gating.Reconcile(read)
    await sync.prepare(rt, proposal(1, NOW), {})
    assert reads == [0, 1] and sync.logged == [] and sync.due
    await sync.prepare(rt, proposal(1, NOW), {})  # read already, not yet used: not read again
    assert reads == [0, 1]


async def test_an_unreadable_log_is_an_error_naming_the_topic(
    fencer_settings: FencerSettingsFactory,
) -> None:
    """No broker answers: the read fails (the gate agent dead-letters the proposal, which the
    core proposes again), it never judges as if the log were empty."""
    rt = runtime(fencer_settings)
    kafka = rt.settings.kafka.model_copy(update={"bootstrap_servers": "127.0.0.1:1"})
    rt = Runtime(settings=rt.settings.model_copy(update={"kafka": kafka}), started_at=NOW)
    sync = gating.Reconcile()
    with pytest.raises(TopicReaderError, match=rt.settings.kafka.topics.fence_decisions):
        await gating.read_decision_log(rt, within=2.0)
    with pytest.raises(TopicReaderError):
        await sync.prepare(rt, proposal(1, NOW), {})
    assert sync.due and sync.logged is None


async def test_the_log_is_read_ahead_once_the_rows_are_recovered(
    fencer_settings: FencerSettingsFactory,
) -> None:
    """The read starts at Faust's on_rebalance_complete (the rows recovered), from the position
    the recovered shared row holds: the first proposal after a start finds it read and does not
    wait for a read of its own (which cost the first decision of a start 0.3-2 s)."""
    rt = runtime(fencer_settings)
    table: dict[str, Any] = {}
    sized(table, rt)
    starts: list[gating.LogPosition] = []

    async def read(runtime: Runtime, start: gating.LogPosition) -> Any:
        starts.append(start)
        return await gating.read_decision_log(runtime, start)

    sync = gating.Reconcile(read, source=(rt, table))
    await sync.on_partitions_changed(set())
    await sync.on_rebalance_complete()
    await asyncio.sleep(0)
    assert starts == [{}]  # under way before any proposal came
    await sync.prepare(rt, proposal(1, NOW), table)
    assert starts == [{}] and sync.logged == []
    first = gating.apply_gate(table, proposal(1, NOW), rt, now=NOW, position=(0, 1), sync=sync)
    assert first is not None and first.approved
    await publish(rt, [first])
    # Another assignment: read ahead again, from where the shared row says the log was merged.
    await sync.on_partitions_changed(set())
    await sync.on_rebalance_complete()
    await sync.on_rebalance_complete()  # a second signal while the read runs starts no other
    await sync.prepare(rt, proposal(2, NOW + 1), table)
    assert len(starts) == 2 and starts[1] == gating.log_position(table[gating.GLOBAL_ROW])
    assert sync.logged is not None and [d.decision_id for d in sync.logged] == [first.decision_id]
    # Nothing due (a judgement wrote the reconciled rows): no read.
    gating.apply_gate(table, proposal(2, NOW + 1), rt, now=NOW + 1, position=(0, 2), sync=sync)
    await sync.on_rebalance_complete()
    assert len(starts) == 2
