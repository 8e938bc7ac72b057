"""The gate owner tails the decision log (streams.gate_tail) on the embedded broker: a decision a
stalled former owner publishes after the new owner's reconciliation read counts at the new
owner's next judgement; the owner's own decisions read back count once; forged, withheld and
non-power-down records count nothing and do not stop the tail; another cluster's decision counts
only toward the global cap; the tail stops at a change of assignment and follows again after the
next reconciliation; a broker gone is retried and logged while the gate judges on."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr

from fencing import gate as gatecore
from fencing.events import FenceAction, NoticeKind, WithheldReason
from fencing.records import (
    EvidenceSummary,
    FenceDecision,
    FenceProposal,
    GateSignal,
    HostRef,
    Notice,
)
from fencing.settings import FencerSettings, PolicySettings, SigningSettings
from fencing.signing import new_key_line
from streams import gating
from streams.broker import EmbeddedBroker
from streams.codec import dump
from streams.gate_tail import DecisionTail, merge
from streams.kafka import aiokafka_kwargs
from streams.runtime import Runtime
from tests.streams.kafka_proxy import FETCH, KafkaProxy, ProxiedBroker

pytestmark = pytest.mark.timeout(120)

FencerSettingsFactory = Callable[..., FencerSettings]
SIGNING = SigningSettings(keys=SecretStr(new_key_line("gate-tail-test")))
OTHER = SigningSettings(keys=SecretStr(new_key_line("not-fencer")))
MIN = 60.0
WINDOW = 30 * MIN
A_T = 1_800_000_000.0  # the stalled owner A's clock when it judged its late decision
B_T = A_T + 7 * 3600.0  # owner B's clock (hours off A's: never compared)


def policy(cap: int = 1, global_cap: int = 5) -> PolicySettings:
    return PolicySettings(
        startup_quiet=0, fence_cap=cap, global_cap=global_cap, fence_window=WINDOW
    )


def runtime(
    make: FencerSettingsFactory,
    cap: int = 1,
    global_cap: int = 5,
    signing: SigningSettings = SIGNING,
) -> Runtime:
    settings = make(isolated_topics=True, policy=policy(cap, global_cap), signing=signing)
    return Runtime(settings=settings, started_at=B_T - 4 * 3600)


def proposal(n: int, cluster: str = "c1") -> FenceProposal:
    return FenceProposal(
        decision_id=f"h{n}/1/x",
        host=HostRef(host_uuid=f"h{n}", cluster_uuid=cluster),
        episode=1,
        action=FenceAction.STOP,
        evidence=EvidenceSummary(suspect_since=A_T - 300, stale_checks=3),
        proposed_at=A_T,
    )


def decision(
    n: int,
    cluster: str = "c1",
    approved: bool = True,
    action: FenceAction = FenceAction.STOP,
    at: float = A_T,
    clock: str | None = "A",
) -> FenceDecision:
    """A decision as owner A (clock "A") judged it."""
    return FenceDecision(
        decision_id=f"h{n}/1/x",
        host=HostRef(host_uuid=f"h{n}", cluster_uuid=cluster),
        episode=1,
        action=action,
        approved=approved,
        withheld_reason=None if approved else WithheldReason.CAP_REACHED,
        evidence=EvidenceSummary(suspect_since=at - 300, stale_checks=3),
        decided_at=at,
        budget_used=1,
        budget_cap=1,
        decided_clock=clock,
    )


def sized(table: dict[str, Any], rt: Runtime, cluster: str = "c1") -> None:
    sig = GateSignal(kind="cluster_size", cluster_uuid=cluster, at=B_T, host_count=20)
    assert gating.apply_gate(table, sig, rt, now=B_T, clock_id="B") is None


def stored(table: dict[str, Any]) -> dict[str, Any]:
    """The rows as the changelog holds them (JSON)."""
    return {k: json.loads(json.dumps(v)) for k, v in table.items()}


async def publish(rt: Runtime, decisions: list[FenceDecision]) -> None:
    producer = AIOKafkaProducer(**aiokafka_kwargs(rt.settings))
    await producer.start()
    try:
        for d in decisions:
            key = d.host.host_uuid.encode()
            await producer.send(rt.settings.kafka.topics.fence_decisions, dump(d), key=key)
        await producer.flush()
    finally:
        await producer.stop()


class Clock:
    """Owner B's process clock, moved by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def owner_b(
    rt: Runtime, table: dict[str, Any], clock: Clock
) -> tuple[gating.Reconcile, DecisionTail]:
    """Owner B (clock "B") is assigned the gates partition: it reads the log ahead and its
    timer's record takes the rows over; then its tail follows the log."""
    tail = DecisionTail(rt, clock=clock, clock_id="B", check_every=1.0, retry_first=0.2)
    sync = gating.Reconcile(source=(rt, table), tail=tail)
    await sync.on_partitions_changed(set())
    await sync.on_rebalance_complete()
    assert sync._ahead is not None
    await sync._ahead
    assert not tail.running  # not before the reconciliation
    tick = GateSignal(kind="gate_clock", cluster_uuid=gating.GLOBAL_ROW, at=clock.now)
    assert gating.apply_gate(table, tick, rt, now=clock.now, sync=sync, clock_id="B") is None
    assert not sync.due and tail.running
    return sync, tail


async def read_up_to(tail: DecisionTail, records: int, within: float = 20.0) -> None:
    """Wait (in the test only: a judgement never waits) until the tail read `records`."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while tail.records < records:
        assert loop.time() < end, f"the tail read {tail.records} of {records} records"
        await asyncio.sleep(0.05)


def judge(
    table: dict[str, Any],
    rt: Runtime,
    n: int,
    now: float,
    sync: gating.Reconcile,
    cluster: str = "c1",
) -> FenceDecision:
    d = gating.apply_gate(
        table, proposal(n, cluster), rt, now=now, position=(0, n), sync=sync, clock_id="B"
    )
    assert isinstance(d, FenceDecision)
    return d


def grant_ids(row: dict[str, Any]) -> list[str]:
    return [g["decision_id"] for g in row["grants"]]


async def test_a_late_decision_of_a_stalled_former_owner_counts_at_the_next_judgement(
    fencer_settings: FencerSettingsFactory,
) -> None:
    """Cap 1. B recovers the rows (no fence yet), reads the log (empty) and takes the rows over.
    Then A wakes and publishes the approval it judged before its stall. Without the tail B
    approves a second power-down in the window (the bug); with it, CAP_REACHED."""
    rt = runtime(fencer_settings)
    table: dict[str, Any] = {}
    sized(table, rt)
    clock = Clock(B_T)
    sync, tail = await owner_b(rt, table, clock)
    merged_before = gating.log_position(table[gating.GLOBAL_ROW])
    assert merged_before == {}  # an empty log
    late = rt.sign_decision(decision(1))
    await publish(rt, [late])
    await read_up_to(tail, 1)
    blind = stored(table)  # the same rows, judged without the tail (today's gate)
    clock.now = B_T + 60
    reconciled = gating.Reconcile()
    reconciled.done()
    unsafe = gating.apply_gate(
        blind, proposal(2), rt, now=clock.now, position=(0, 2), sync=reconciled, clock_id="B"
    )
    assert isinstance(unsafe, FenceDecision) and unsafe.approved  # two fences, cap 1
    d = judge(table, rt, 2, clock.now, sync)
    assert not d.approved
    assert (d.withheld_reason, d.budget_used) == (WithheldReason.CAP_REACHED, 1)
    for row in (table["c1"], table[gating.GLOBAL_ROW]):
        assert grant_ids(row) == [late.decision_id]
        # On B's clock: read at B_T (A's only known stamp: as young as "now" when it was read).
        assert [g["at"] for g in row["grants"]] == [B_T]
    # The shared row says how far the log is merged: past A's record, in the same record.
    assert sum(gating.log_position(table[gating.GLOBAL_ROW]).values()) == 1
    # It counts a whole window after it was read, then no more.
    clock.now = B_T + WINDOW - 1
    assert judge(table, rt, 3, clock.now, sync).withheld_reason == WithheldReason.CAP_REACHED
    clock.now = B_T + WINDOW
    assert judge(table, rt, 4, clock.now, sync).approved
    await tail.stop()


async def test_own_decisions_read_back_count_once(
    fencer_settings: FencerSettingsFactory,
) -> None:
    """Cap 2. B's own approval is published and read back by its tail: the next host is the
    second fence (not the third), the one after is CAP_REACHED at 2."""
    rt = runtime(fencer_settings, cap=2)
    table: dict[str, Any] = {}
    sized(table, rt)
    clock = Clock(B_T)
    sync, tail = await owner_b(rt, table, clock)
    first = judge(table, rt, 1, B_T + 1, sync)
    assert first.approved and first.decided_clock == "B"
    await publish(rt, [first, first])  # also delivered twice
    await read_up_to(tail, 2)
    second = judge(table, rt, 2, B_T + 2, sync)
    assert second.approved and second.budget_used == 2
    await publish(rt, [second])
    await read_up_to(tail, 3)
    third = judge(table, rt, 3, B_T + 3, sync)
    assert (third.withheld_reason, third.budget_used) == (WithheldReason.CAP_REACHED, 2)
    for row in (table["c1"], table[gating.GLOBAL_ROW]):
        assert grant_ids(row) == [first.decision_id, second.decision_id]
        assert [g["at"] for g in row["grants"]] == [B_T + 1, B_T + 2]  # its own stamps kept
    assert sum(gating.log_position(table[gating.GLOBAL_ROW]).values()) == 3
    await tail.stop()


async def test_forged_withheld_and_non_power_down_records_count_nothing_and_the_tail_reads_on(
    fencer_settings: FencerSettingsFactory,
) -> None:
    """Cap 2. After B's reconciliation: an approval signed with another key, one without a
    signature, one changed after signing, a signed withheld decision, a signed approved blink,
    then a signed late approval. Only the last counts: the next fence is the second."""
    rt = runtime(fencer_settings, cap=2)
    table: dict[str, Any] = {}
    sized(table, rt)
    clock = Clock(B_T)
    sync, tail = await owner_b(rt, table, clock)
    stranger = runtime(fencer_settings, signing=OTHER)
    forged = stranger.sign_decision(decision(7))
    unsigned = decision(8)
    changed = rt.sign_decision(decision(9)).model_copy(update={"decision_id": "h9/1/y"})
    withheld = rt.sign_decision(decision(5, approved=False))
    blink = rt.sign_decision(decision(6, action=FenceAction.BLINK))
    late = rt.sign_decision(decision(4))
    await publish(rt, [forged, unsigned, changed, withheld, blink, late])
    await read_up_to(tail, 6)
    assert tail.unsigned == 3
    d = judge(table, rt, 2, B_T + 5, sync)
    assert d.approved and d.budget_used == 2
    for row in (table["c1"], table[gating.GLOBAL_ROW]):
        assert grant_ids(row) == [late.decision_id, d.decision_id]
    assert judge(table, rt, 3, B_T + 6, sync).withheld_reason == WithheldReason.CAP_REACHED
    # Every record read moves the merged position, the unsigned ones too.
    assert sum(gating.log_position(table[gating.GLOBAL_ROW]).values()) == 6
    await tail.stop()


async def test_another_clusters_late_decision_counts_only_toward_the_global_cap(
    fencer_settings: FencerSettingsFactory,
) -> None:
    """Cap 1 per cluster, 2 overall. A's late approval in c2: c1's first fence is still
    approved (its cluster cap untouched), then c3's is GLOBAL_CAP_REACHED."""
    rt = runtime(fencer_settings, cap=1, global_cap=2)
    table: dict[str, Any] = {}
    for cluster in ("c1", "c2", "c3"):
        sized(table, rt, cluster)
    clock = Clock(B_T)
    sync, tail = await owner_b(rt, table, clock)
    late = rt.sign_decision(decision(9, cluster="c2"))
    await publish(rt, [late])
    await read_up_to(tail, 1)
    d = judge(table, rt, 1, B_T + 1, sync)
    assert d.approved and d.budget_used == 1
    assert grant_ids(table["c1"]) == [d.decision_id]
    assert grant_ids(table[gating.GLOBAL_ROW]) == [late.decision_id, d.decision_id]
    e = judge(table, rt, 3, B_T + 2, sync, cluster="c3")
    assert e.withheld_reason == WithheldReason.GLOBAL_CAP_REACHED
    # And c2's own next fence meets its cluster cap (the shared row's c2 grant counts there).
    f = judge(table, rt, 2, B_T + 3, sync, cluster="c2")
    assert f.withheld_reason == WithheldReason.CAP_REACHED
    await tail.stop()


async def test_the_tail_stops_at_a_change_of_assignment_and_follows_after_the_reconciliation(
    fencer_settings: FencerSettingsFactory,
) -> None:
    """A change of assignment halts the tail and forgets what it read unmerged; the next
    reconciliation reads it from the shared row's position, then the tail follows from there."""
    rt = runtime(fencer_settings, cap=4)
    table: dict[str, Any] = {}
    sized(table, rt)
    clock = Clock(B_T)
    sync, tail = await owner_b(rt, table, clock)
    first = rt.sign_decision(decision(1))
    await publish(rt, [first])
    await read_up_to(tail, 1)
    await sync.on_partitions_changed(set())  # revoked (then assigned again)
    assert not tail.running and tail.records == 0
    second = rt.sign_decision(decision(2))
    await publish(rt, [second])
    await asyncio.sleep(0.5)
    assert tail.records == 0  # halted: reads nothing
    # The first proposal after the assignment waits for the log's read (both decisions: the
    # shared row had merged none), the reconciliation merges them, then the tail follows.
    clock.now = B_T + 10
    await sync.prepare(rt, proposal(3), table)
    assert sync.logged is not None
    assert sorted(x.decision_id for x in sync.logged) == [first.decision_id, second.decision_id]
    d = judge(table, rt, 3, clock.now, sync)
    assert d.approved and d.budget_used == 3
    assert tail.running and tail.position == gating.log_position(table[gating.GLOBAL_ROW])
    assert sum(tail.position.values()) == 2
    third = rt.sign_decision(decision(4))
    await publish(rt, [third])
    await read_up_to(tail, 1)
    clock.now = B_T + 11
    e = judge(table, rt, 5, clock.now, sync)
    assert (e.withheld_reason, e.budget_used) == (WithheldReason.CAP_REACHED, 4)
    for row in (table["c1"], table[gating.GLOBAL_ROW]):
        assert grant_ids(row) == [
            first.decision_id,
            second.decision_id,
            d.decision_id,
            third.decision_id,
        ]
    assert sum(gating.log_position(table[gating.GLOBAL_ROW]).values()) == 3
    await tail.stop()


async def test_a_broker_gone_is_retried_and_logged_and_the_gate_judges_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The tail's broker stops: the tail logs its failures and retries; judgements go on at
    once with the rows and what was read; once a broker answers again the tail reads on."""
    caplog.set_level(logging.INFO, logger="fencer.streams")
    async with EmbeddedBroker() as broker:
        settings = broker.fencer_settings(policy=policy(cap=3), signing=SIGNING)
        rt = Runtime(settings=settings, started_at=B_T - 4 * 3600)
        table: dict[str, Any] = {}
        sized(table, rt)
        clock = Clock(B_T)
        sync, tail = await owner_b(rt, table, clock)
        late = rt.sign_decision(decision(1))
        await publish(rt, [late])
        await read_up_to(tail, 1)
        port = broker.port
        assert port is not None
    # The broker is gone.
    loop = asyncio.get_running_loop()
    end = loop.time() + 30
    while tail.failures < 2:
        assert loop.time() < end, "the tail never noticed the broker gone"
        await asyncio.sleep(0.1)
    assert tail.running
    assert (
        "cannot be tailed" in caplog.text
        and rt.settings.kafka.topics.fence_decisions in caplog.text
    )
    started = loop.time()
    d = judge(table, rt, 2, B_T + 1, sync)
    assert loop.time() - started < 0.5  # never waits for the broker
    assert d.approved and d.budget_used == 2  # what was read counts
    assert grant_ids(table["c1"]) == [late.decision_id, d.decision_id]
    # A broker on the same address again (empty: memory storage): the tail reads on.
    async with EmbeddedBroker(port) as again:
        assert again.port == port
        await publish(rt, [rt.sign_decision(decision(3))])
        end = loop.time() + 30
        while tail.failures or not any(
            x.decision_id == "h3/1/x" for x in tail.read(B_T, WINDOW)[0]
        ):
            assert loop.time() < end, "the tail did not read on after the broker came back"
            await asyncio.sleep(0.1)
        e = judge(table, rt, 4, B_T + 2, sync)
        assert (e.withheld_reason, e.budget_used) == (WithheldReason.CAP_REACHED, 3)
        assert "tailed again" in caplog.text
        await tail.stop()


def test_merge_takes_other_clocks_over_and_leaves_a_row_of_another_clock() -> None:
    """`merge` alone (no broker): a logged decision of another clock given to it is taken onto
    the row's clock (aged against its clock's latest stamp among them, never younger); a shared
    row not yet on the gate's clock is left as it is, its position too (the reconciliation
    takes it over with the log); positions only move forward."""
    glob = gatecore.GlobalGate(clock=B_T, clock_id="B")
    logged = (
        gatecore.Logged("h1/1/x", "h1", "c1", FenceAction.STOP, True, A_T - 600, "A"),
        gatecore.Logged("h2/1/x", "h2", "c2", FenceAction.REBOOT, True, A_T, "A"),
        gatecore.Logged("h3/1/x", "h3", "c1", FenceAction.STOP, True, B_T - WINDOW, "B"),
    )
    whole, position = merge(glob, {0: 5, 1: 2}, logged, {0: 7, 1: 1}, B_T, WINDOW, "B")
    assert [(g.decision_id, g.at) for g in whole.grants] == [
        ("h1/1/x", B_T - 600),
        ("h2/1/x", B_T),
    ]  # h3: out of the window on B's own clock
    assert position == {0: 7, 1: 2}
    other = gatecore.GlobalGate(clock=A_T, clock_id="A")
    assert merge(other, {0: 5}, logged, {0: 7}, B_T, WINDOW, "B") == (other, {0: 5})


async def test_a_cancelled_error_not_of_the_tail_itself_does_not_end_the_tail(
    fencer_settings: FencerSettingsFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """aiokafka can raise the CancelledError of a task of its own (its fetch task after a lost
    broker) out of a read: the tail took it for its own cancellation and ended for good, with no
    word: a late approval of a stalled former owner then never counted (the cap exceeded) until
    the next change of assignment. Only the tail's own cancellation ends it; this is retried,
    logged, and the late decision counts."""
    from aiokafka import AIOKafkaConsumer

    rt = runtime(fencer_settings, cap=1)
    table: dict[str, Any] = {}
    sized(table, rt)
    clock = Clock(B_T)
    real = AIOKafkaConsumer.getmany
    raised: list[int] = []

    async def getmany(self: AIOKafkaConsumer, *args: Any, **kwargs: Any) -> Any:
        if not raised:
            raised.append(1)
            raise asyncio.CancelledError()  # as aiokafka's own fetch task's
        return await real(self, *args, **kwargs)

    caplog.set_level(logging.WARNING, logger="fencer.streams")
    sync, tail = await owner_b(rt, table, clock)
    monkeypatch.setattr(AIOKafkaConsumer, "getmany", getmany)  # the tail's reads from now on
    late = rt.sign_decision(decision(1))
    await publish(rt, [late])
    await read_up_to(tail, 1)
    assert raised and tail.running
    assert "cannot be tailed (CancelledError" in caplog.text
    withheld = judge(table, rt, 2, B_T + 5, sync)
    assert withheld.withheld_reason is WithheldReason.CAP_REACHED
    await tail.stop()
    assert not tail.running


async def test_an_old_approval_written_to_the_log_again_is_as_old_as_it_is(
    fencer_settings: FencerSettingsFactory,
) -> None:
    """Cap 1. Owner A's log holds an approval from two windows before A's last decision (a
    withhold, read by B's reconciliation). Someone writes A's old signed approval to the log
    again after B's reconciliation: the tail ages it against the latest time A's clock is known
    to have reached in that read (two windows old: out of the window), so it eats no budget:
    the next fence's grant is the only one in the shared row. (Aged only against stamps the
    tail read itself, it counted as new for a whole window toward the global cap.)"""
    rt = runtime(fencer_settings)
    old = rt.sign_decision(decision(1, cluster="c9", at=A_T))
    last = rt.sign_decision(decision(2, cluster="c9", approved=False, at=A_T + 2 * WINDOW))
    await publish(rt, [old, last])
    table: dict[str, Any] = {}
    sized(table, rt)
    clock = Clock(B_T)
    sync, tail = await owner_b(rt, table, clock)
    assert grant_ids(table[gating.GLOBAL_ROW]) == []  # the old approval is out of the window
    await publish(rt, [old])  # the replay
    await read_up_to(tail, 1)
    clock.now = B_T + 60
    d = judge(table, rt, 3, clock.now, sync)
    assert d.approved, d.withheld_reason
    assert grant_ids(table["c1"]) == [d.decision_id]
    assert grant_ids(table[gating.GLOBAL_ROW]) == [d.decision_id]
    await tail.stop()


async def test_a_tail_that_keeps_failing_notifies_repeatedly_then_logs_recovered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Rule 5: a tail failing only logged a warning, forever. Failing for `notify_after` in a
    row it sends a decision_log_unread notice through the runtime's notice path, then again
    every `renotify` while it still fails (not at every retry), each with an id of its own;
    reading again it logs "recovered"."""
    caplog.set_level(logging.INFO, logger="fencer.streams")
    sent: list[Notice] = []

    async def sink(notice: Notice) -> None:
        sent.append(notice)

    async with EmbeddedBroker() as broker:
        settings = broker.fencer_settings(policy=policy(cap=3), signing=SIGNING)
        rt = Runtime(settings=settings, started_at=B_T - 4 * 3600)
        rt.notice_sink = sink
        clock = Clock(B_T)
        tail = DecisionTail(
            rt,
            clock=clock,
            clock_id="B",
            check_every=1.0,
            retry_first=0.2,
            notify_after=1.5,
            renotify=2.5,
        )
        tail.follow({})
        await publish(rt, [rt.sign_decision(decision(1))])
        await read_up_to(tail, 1)
        port = broker.port
        assert port is not None
    loop = asyncio.get_running_loop()
    end = loop.time() + 40
    while len(sent) < 3:
        assert loop.time() < end, f"{len(sent)} notices after {tail.failures} failures"
        await asyncio.sleep(0.1)
    assert tail.running and tail.failures > len(sent)  # not one at every retry
    assert {n.kind for n in sent} == {NoticeKind.DECISION_LOG_UNREAD}
    ids = [n.notice_id for n in sent]
    assert len(set(ids)) == len(ids) and all(rt.reminder_tag in i for i in ids)
    assert sent[0].host.host_uuid == f"topic:{rt.settings.kafka.topics.fence_decisions}"
    assert "decision log" in (sent[0].reason or "")
    assert "recovered" not in caplog.text
    async with EmbeddedBroker(port):
        end = loop.time() + 30
        while tail.failures:
            assert loop.time() < end, "the tail did not read on after the broker came back"
            await asyncio.sleep(0.1)
        assert "recovered" in caplog.text
        await tail.stop()


async def test_a_gate_without_a_notice_sink_writes_its_notice_to_the_notices_topic(
    fencer_settings: FencerSettingsFactory,
) -> None:
    """The gate runs in the ingest role, which alone has no notice sink (only the actuate role
    sets one): the tail's decision_log_unread notice goes to the notices topic itself, where
    the notifiers read it. The broker is up; the tail fails because it cannot read its log (a
    topic that does not exist: no partitions), as with an ACL or a deleted topic."""
    from streams.topic_reader import TopicReader

    base = fencer_settings(isolated_topics=True, policy=policy(), signing=SIGNING)
    gone = f"{base.kafka.topics.fence_decisions}-gone"
    settings = base.model_copy(
        update={
            "kafka": base.kafka.model_copy(
                update={"topics": base.kafka.topics.model_copy(update={"fence_decisions": gone})}
            )
        }
    )
    rt = Runtime(settings=settings, started_at=B_T - 4 * 3600)
    assert rt.notice_sink is None
    tail = DecisionTail(
        rt, clock=Clock(B_T), clock_id="B", check_every=1.0, retry_first=0.2, notify_after=0.5
    )
    tail.follow({})
    loop = asyncio.get_running_loop()
    end = loop.time() + 30
    while tail.notices < 1:
        assert loop.time() < end, f"no notice sent after {tail.failures} failures"
        await asyncio.sleep(0.1)
    await tail.stop()
    got: list[Notice] = []
    reader = TopicReader(
        settings,
        [settings.kafka.topics.notices],
        lambda r: got.append(Notice.model_validate_json(r.value or b"")),
        client_id="test-notices",
    )
    await reader.start(10)
    await reader.stop()
    (notice,) = got
    assert notice.kind is NoticeKind.DECISION_LOG_UNREAD
    assert notice.host.host_uuid == f"topic:{gone}"
    assert notice.notice_id == f"decision-log-unread/{rt.reminder_tag}/1/1"


async def test_a_tail_connected_but_never_answered_a_fetch_is_told_unread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The broker answers metadata (the tail connects, its checks pass) but every fetch is
    dropped: aiokafka retries it without a word, so the tail saw no failure, or failed and
    connected again at once, resetting its count at each connect: never a notice. The time
    since the tail last READ (a fetch answered) counts now: decision_log_unread after
    `notify_after`, repeated; reading again ends the spell ("recovered")."""
    caplog.set_level(logging.INFO, logger="fencer.streams")
    sent: list[Notice] = []

    async def sink(notice: Notice) -> None:
        sent.append(notice)

    proxy = KafkaProxy()
    await proxy.start()
    try:
        async with ProxiedBroker(proxy) as broker:
            settings = broker.fencer_settings(policy=policy(cap=3), signing=SIGNING)
            rt = Runtime(settings=settings, started_at=B_T - 4 * 3600)
            rt.notice_sink = sink
            tail = DecisionTail(
                rt,
                clock=Clock(B_T),
                clock_id="B",
                check_every=1.0,
                retry_first=0.2,
                notify_after=2.0,
                renotify=2.5,
            )
            tail.follow({})
            await publish(rt, [rt.sign_decision(decision(1))])
            await read_up_to(tail, 1)
            await asyncio.sleep(3.0)  # reading, idle: no notice
            assert sent == []
            proxy.drop.add(FETCH)
            await asyncio.sleep(1.5)  # the fetch in flight (held 0.5 s) is answered
            await publish(rt, [rt.sign_decision(decision(2))])
            loop = asyncio.get_running_loop()
            end = loop.time() + 40
            while len(sent) < 2:
                assert loop.time() < end, f"{len(sent)} notices, {proxy.dropped} fetches dropped"
                await asyncio.sleep(0.1)
            assert proxy.dropped > 0 and tail.records == 1  # nothing read meanwhile
            assert {n.kind for n in sent} == {NoticeKind.DECISION_LOG_UNREAD}
            assert len({n.notice_id for n in sent}) == 2
            assert "has not read the decision log" in (sent[0].reason or "")
            assert "recovered" not in caplog.text
            proxy.drop.clear()
            await read_up_to(tail, 2, within=30)
            end = loop.time() + 10
            while "recovered" not in caplog.text:
                assert loop.time() < end
                await asyncio.sleep(0.1)
            await tail.stop()
    finally:
        await proxy.stop()
