"""The gate's shell keeps its windows on one clock (safety rule 1): after the gates partition
moves to a process whose clock runs 30 minutes ahead, the old owner's grant (from its rows, or
from the decision log alone, read from the embedded broker) still counts at the cap; a wall-clock
step of the gate's own machine changes nothing; the grant leaves the window a whole window after
the take-over; rows and decisions from before clocks had names count conservatively; the owner
refreshes the shared row's clock, also when no proposal comes."""

from __future__ import annotations

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
from fencing.signing import DECISION, new_key_line, sign
from streams import gating
from streams.codec import dump
from streams.kafka import aiokafka_kwargs
from streams.runtime import Runtime
from streams.worker_clock import CLOCK_ID, worker_clock

pytestmark = pytest.mark.timeout(120)

FencerSettingsFactory = Callable[..., FencerSettings]
SIGNING = SigningSettings(keys=SecretStr(new_key_line("gate-clock-test")))
MIN = 60.0
WINDOW = 30 * MIN
T = 1_800_000_000.0  # A's clock at its approval
AHEAD = 30 * MIN  # B's clock minus A's
TAKEN = T + 20 + AHEAD  # B's clock when it takes the rows over (20 s after A's approval)
LATER = TAKEN + 10 * MIN  # B's clock at the second proposal: 10 min 20 s after the first fence


def runtime(make: FencerSettingsFactory | None = None, quiet: float = 0.0) -> Runtime:
    policy = PolicySettings(
        startup_quiet=quiet, fence_cap=1, global_cap=5, fence_window=WINDOW, check_interval=10
    )
    if make is None:
        settings = FencerSettings(policy=policy, signing=SIGNING)
    else:
        settings = make(isolated_topics=True, policy=policy, signing=SIGNING)
    return Runtime(settings=settings, started_at=T - 4 * 3600)


def proposal(n: int, at: float = T) -> FenceProposal:
    return FenceProposal(
        decision_id=f"h{n}/1/{int(at)}",
        host=HostRef(host_uuid=f"h{n}", cluster_uuid="c1"),
        episode=1,
        action=FenceAction.STOP,
        evidence=EvidenceSummary(suspect_since=at - 300, stale_checks=3),
        proposed_at=at,
    )


def sized(table: dict[str, Any], rt: Runtime, now: float, clock_id: str) -> None:
    sig = GateSignal(kind="cluster_size", cluster_uuid="c1", at=now, host_count=20)
    assert gating.apply_gate(table, sig, rt, now=now, clock_id=clock_id) is None


def stored(table: dict[str, Any]) -> dict[str, Any]:
    """The rows as the changelog holds them (JSON)."""
    return {k: json.loads(json.dumps(v)) for k, v in table.items()}


async def publish(rt: Runtime, values: list[bytes], keys: list[str]) -> None:
    producer = AIOKafkaProducer(**aiokafka_kwargs(rt.settings))
    await producer.start()
    try:
        for key, value in zip(keys, values, strict=True):
            await producer.send(rt.settings.kafka.topics.fence_decisions, value, key=key.encode())
        await producer.flush()
    finally:
        await producer.stop()


async def owner_a_approves(rt: Runtime) -> tuple[dict[str, Any], dict[str, Any], FenceDecision]:
    """Owner A (clock "A") approves the first fence and publishes it; the rows before and after
    its two writes (A's refresh of the shared row 10 s after, on the rows after)."""
    table: dict[str, Any] = {}
    sized(table, rt, T - 100, "A")
    sync = gating.Reconcile()
    await sync.prepare(rt, proposal(1), table)
    before = stored(table)
    first = gating.apply_gate(
        table, proposal(1), rt, now=T, position=(0, 1), sync=sync, clock_id="A"
    )
    assert isinstance(first, FenceDecision) and first.approved
    assert (first.decided_at, first.decided_clock) == (T, "A")
    assert table[gating.GLOBAL_ROW]["clock_id"] == table["c1"]["clock_id"] == "A"
    assert gating.keep_clock(table, rt, sync, now=T + 10, clock_id="A") is None  # fresh
    assert gating.keep_clock(table, rt, sync, now=T + 60, clock_id="A") == "refresh"
    assert table[gating.GLOBAL_ROW]["clock"] == T + 60
    await publish(rt, [dump(first)], [first.host.host_uuid])
    return before, stored(table), first


async def owner_b_takes_over(rt: Runtime, table: dict[str, Any]) -> gating.Reconcile:
    """Owner B (clock "B") is assigned the partition: its timer's record takes the rows over
    once the decision log is read."""
    sync = gating.Reconcile(source=(rt, table))
    tick = GateSignal(kind="gate_clock", cluster_uuid=gating.GLOBAL_ROW, at=TAKEN)
    assert gating.apply_gate(table, tick, rt, now=TAKEN, sync=sync, clock_id="B") is None
    assert sync.due  # the log is not read yet: nothing done
    await sync.on_rebalance_complete()
    assert sync._ahead is not None
    await sync._ahead
    assert gating.clock_work(table, sync, TAKEN, "B") == "take over"
    assert gating.apply_gate(table, tick, rt, now=TAKEN, sync=sync, clock_id="B") is None
    assert not sync.due
    assert table[gating.GLOBAL_ROW]["clock_id"] == "B"
    assert table[gating.GLOBAL_ROW]["clock"] == TAKEN
    return sync


async def test_a_new_owner_30_minutes_ahead_counts_the_old_owners_grant(
    fencer_settings: FencerSettingsFactory,
) -> None:
    """Cap 1 in 30 min. A approves; the gates partition moves to B, whose clock is 30 min ahead;
    10 min later B is asked for another fence. Compared with B's clock, A's grant looked 40 min
    old: out of the window, a second power-down in 10 minutes."""
    rt = runtime(fencer_settings)
    _, after, first = await owner_a_approves(rt)
    second = proposal(2, LATER)
    # Today's comparison (A's stamps read as B's clock: one name for both) approves: the bug.
    unsafe = gating.apply_gate(stored(after), second, rt, now=LATER, clock_id="A")
    assert isinstance(unsafe, FenceDecision) and unsafe.approved
    table = stored(after)
    sync = await owner_b_takes_over(rt, table)
    # A's grant was 40 s old at A's latest known moment (its refresh): so it is at the take-over.
    assert [g["at"] for g in table["c1"]["grants"]] == [TAKEN - 60]
    assert table["c1"]["clock_id"] == "B"
    d = gating.apply_gate(table, second, rt, now=LATER, position=(0, 3), sync=sync, clock_id="B")
    assert isinstance(d, FenceDecision) and not d.approved
    assert (d.withheld_reason, d.budget_used, d.decided_clock) == (
        WithheldReason.CAP_REACHED,
        1,
        "B",
    )
    # The first fence proposed again: the same approval, nothing consumed.
    again = gating.apply_gate(
        table, proposal(1), rt, now=LATER + 1, position=(0, 4), sync=sync, clock_id="B"
    )
    assert isinstance(again, FenceDecision) and again.approved and again.budget_used == 1
    assert first.decision_id == again.decision_id


async def test_only_the_decision_log_proves_the_old_owners_grant(
    fencer_settings: FencerSettingsFactory,
) -> None:
    """The same, A's two row writes of its decision lost: the rows are those from before it,
    only fence-decisions (on the embedded broker) holds the grant, with its decided_clock."""
    rt = runtime(fencer_settings)
    before, _, first = await owner_a_approves(rt)
    second = proposal(2, LATER)
    blind = gating.Reconcile()
    blind.logged = []  # without the log: nothing counts the fence
    unsafe = gating.apply_gate(stored(before), second, rt, now=LATER, sync=blind, clock_id="B")
    assert isinstance(unsafe, FenceDecision) and unsafe.approved
    table = stored(before)
    sync = await owner_b_takes_over(rt, table)
    # A's latest known moment is its decision (its rows say less): 0 s old at the take-over.
    assert [g["decision_id"] for g in table[gating.GLOBAL_ROW]["grants"]] == [first.decision_id]
    assert [g["at"] for g in table[gating.GLOBAL_ROW]["grants"]] == [TAKEN]
    d = gating.apply_gate(table, second, rt, now=LATER, position=(0, 3), sync=sync, clock_id="B")
    assert isinstance(d, FenceDecision) and not d.approved
    assert d.withheld_reason is WithheldReason.CAP_REACHED
    assert [g["at"] for g in table["c1"]["grants"]] == [TAKEN]  # made whole from the shared row


async def test_the_grant_leaves_the_window_a_whole_window_after_the_take_over(
    fencer_settings: FencerSettingsFactory,
) -> None:
    """No grant is held for ever: a whole window after the take-over (B's clock), a fence is
    approved again; meanwhile B's refreshes keep its shared row's clock within a minute."""
    rt = runtime(fencer_settings)
    _, after, _ = await owner_a_approves(rt)
    table = stored(after)
    sync = await owner_b_takes_over(rt, table)
    assert gating.keep_clock(table, rt, sync, now=TAKEN + 59, clock_id="B") is None
    assert gating.keep_clock(table, rt, sync, now=TAKEN + 61, clock_id="B") == "refresh"
    held = gating.apply_gate(
        table, proposal(2, TAKEN + 60), rt, now=TAKEN + WINDOW - 61, sync=sync, clock_id="B"
    )
    assert isinstance(held, FenceDecision) and held.withheld_reason is WithheldReason.CAP_REACHED
    d = gating.apply_gate(
        table, proposal(3, TAKEN + 60), rt, now=TAKEN + WINDOW - 60, sync=sync, clock_id="B"
    )
    assert isinstance(d, FenceDecision) and d.approved and d.budget_used == 1


def test_a_wall_clock_step_on_the_gate_machine_keeps_the_grant_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The gate judges on its process's never-stepped clock (streams.worker_clock): an NTP step
    forward by a whole window on its own machine made the grant look a window old (the gate
    judged on time.time()), and the quiet period after its start look over."""
    rt = runtime(quiet=120.0)
    rt = Runtime(settings=rt.settings, started_at=worker_clock())
    table: dict[str, Any] = {}
    sized(table, rt, worker_clock(), CLOCK_ID)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 125)  # the quiet period looks over
    early = gating.apply_gate(table, proposal(1), rt)
    assert isinstance(early, FenceDecision) and early.withheld_reason is WithheldReason.QUIET_PERIOD
    rt = Runtime(settings=rt.settings, started_at=worker_clock() - 125)  # it is over
    first = gating.apply_gate(table, proposal(1), rt)
    assert isinstance(first, FenceDecision) and first.approved
    assert first.decided_clock == CLOCK_ID
    monkeypatch.setattr(time, "time", lambda: real() + 125 + WINDOW)  # the step
    d = gating.apply_gate(table, proposal(2), rt)
    assert isinstance(d, FenceDecision) and d.withheld_reason is WithheldReason.CAP_REACHED
    assert d.decided_at - first.decided_at < 5.0


async def test_rows_and_decisions_from_before_clocks_had_names_count_conservatively(
    fencer_settings: FencerSettingsFactory,
) -> None:
    """Rows without a clock_id and a signed decision without decided_clock (written before this
    change) load; their stamps are one unnamed clock, aged against its latest known time."""
    rt = runtime(fencer_settings)
    grant = {"decision_id": "h1/1/x", "host": "h1", "cluster": "c1", "at": T}
    old_rows = {
        "c1": {
            "cluster": "c1",
            "hosts": 20,
            "suspect": [],
            "paused": False,
            "clock": T + 30,
            "grants": [grant],
            "verdicts": [],
            "position": [0, 7],
        },
        gating.GLOBAL_ROW: {"paused": False, "clock": T, "grants": [grant], "log_position": {}},
    }
    body = FenceDecision(
        decision_id="h9/1/y",
        host=HostRef(host_uuid="h9", cluster_uuid="c2"),
        episode=1,
        action=FenceAction.STOP,
        approved=True,
        evidence=EvidenceSummary(suspect_since=T - 300, stale_checks=3),
        decided_at=T + 50,
    ).model_dump(mode="json")
    del body["decided_clock"], body["signature"]  # as the gate signed it before this change
    old = sign(rt.keyring(), DECISION, body)
    await publish(rt, [json.dumps(old).encode()], ["h9"])
    table = stored(old_rows)
    sync = gating.Reconcile(source=(rt, table))
    await sync.on_rebalance_complete()
    assert sync._ahead is not None
    await sync._ahead
    assert sync.logged is not None and [(d.decision_id, d.clock_id) for d in sync.logged] == [
        ("h9/1/y", None)
    ]
    assert gating.keep_clock(table, rt, sync, now=TAKEN, clock_id="B") == "take over"
    # The unnamed clock's latest known time is the decision's (T + 50): the grants 50 s old.
    assert table["c1"]["grants"] == [{**grant, "at": TAKEN - 50}]
    assert table["c1"]["clock_id"] == "B" and table["c1"]["position"] == [0, 7]
    shared = table[gating.GLOBAL_ROW]
    assert [(g["decision_id"], g["at"]) for g in shared["grants"]] == [
        ("h1/1/x", TAKEN - 50),
        ("h9/1/y", TAKEN),
    ]
    assert sum(shared[gating.LOG_POSITION].values()) == 1
    d = gating.apply_gate(table, proposal(2, LATER), rt, now=LATER, sync=sync, clock_id="B")
    assert isinstance(d, FenceDecision) and d.withheld_reason is WithheldReason.CAP_REACHED
    # Today's comparison of the old stamps with B's clock approved it.
    unsafe = gating.apply_gate(stored(old_rows), proposal(2, LATER), rt, now=LATER, clock_id=None)  # type: ignore[arg-type]
    assert isinstance(unsafe, FenceDecision) and unsafe.approved


def test_a_shared_row_of_another_clock_is_taken_over_without_the_log_when_none_is_due() -> None:
    """A write of another process after the take-over (a worker that had not yet noticed it lost
    the partition): the timer takes it over without the log; aged against its own clock."""
    rt = runtime()
    table: dict[str, Any] = {}
    sized(table, rt, T, "B")
    sync = gating.Reconcile()
    sync.logged = []
    assert gating.keep_clock(table, rt, sync, now=T, clock_id="B") == "take over"
    assert gating.keep_clock(table, rt, sync, now=T + 1, clock_id="B") is None
    zombie = {"decision_id": "z", "host": "hz", "cluster": "c1", "at": 5.0}
    table[gating.GLOBAL_ROW] = {"clock": 9.0, "clock_id": "A", "grants": [zombie]}
    assert (
        gating.keep_clock(table, rt, sync, now=T + 2, clock_id="B") == "take over without the log"
    )
    assert table[gating.GLOBAL_ROW]["grants"] == [{**zombie, "at": T + 2 - 4.0}]
    del table[gating.GLOBAL_ROW]
    assert gating.keep_clock(table, rt, sync, now=T + 3, clock_id="B") is None
