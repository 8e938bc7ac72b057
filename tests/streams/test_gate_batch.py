"""The gate's batches (streams.gating "batches"): proposals already buffered are judged one by one
exactly as alone, the shared row is written once per batch and before any of its decisions is
sent, every record is acked after its batch's decisions (also when a send fails), a held batch
never waits for a record that does not come, and a worker that dies mid-batch loses no grant."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest

from fencing.events import WithheldReason
from fencing.records import FenceDecision
from streams import gating
from tests.streams.test_gate_shell import NOW, StoredTable, proposal, runtime, sized

pytestmark = pytest.mark.timeout(60)


def event(offset: int) -> Any:
    return SimpleNamespace(message=SimpleNamespace(partition=0, offset=offset))


def judged(batched: bool, count: int, cap: int) -> tuple[list[FenceDecision], StoredTable]:
    """`count` proposals over three clusters, judged alone or through one held batch."""
    rt, table = runtime(global_cap=cap), StoredTable()
    for c in ("c1", "c2", "c3"):
        sized(table, rt, hosts=20, cluster=c)
    sync = gating.Reconcile()
    rows: Any = gating.HeldSharedRow(table) if batched else table
    out = []
    for n in range(count):
        p = proposal(n, NOW + n, f"c{n % 3 + 1}")
        d = gating.apply_gate(rows, p, rt, now=NOW + n, position=(0, 10 + n), sync=sync)
        assert isinstance(d, FenceDecision)
        out.append(d)
    if batched:
        assert rows.flush()
    return out, table


def test_a_batch_judges_as_each_proposal_alone_and_writes_the_shared_row_once() -> None:
    alone, table_alone = judged(batched=False, count=8, cap=5)
    batch, table_batch = judged(batched=True, count=8, cap=5)
    fields = ("decision_id", "approved", "withheld_reason", "budget_used", "budget_cap")
    assert [[getattr(d, f) for f in fields] for d in batch] == [
        [getattr(d, f) for f in fields] for d in alone
    ]
    assert [d.approved for d in batch].count(True) == 5
    assert batch[-1].withheld_reason is WithheldReason.GLOBAL_CAP_REACHED
    assert dict(table_batch) == dict(table_alone)  # the same rows in the end
    # 3 cluster sizes, then per proposal its cluster row (and, alone, the shared row)
    assert table_alone.writes == 3 + 8 * 2
    assert table_batch.writes == 3 + 8 + 1


async def test_the_rows_are_written_before_the_first_decision_of_the_batch_is_sent() -> None:
    rt, table = runtime(global_cap=10), StoredTable()
    sized(table, rt, hosts=20)
    sent: list[str] = []
    acked: list[int] = []

    async def send(d: FenceDecision) -> None:
        # every grant of the batch is in the stored shared row before any decision goes out
        grants = {g["decision_id"] for g in table[gating.GLOBAL_ROW]["grants"]}
        assert {"h0/1/1800000000", "h1/1/1800000001"} <= grants
        sent.append(d.decision_id)
        assert not acked  # acked only after the batch's sends

    async def ack(e: Any) -> None:
        acked.append(e.message.offset)

    batch = gating.GateBatch(table, send=send, ack=ack)
    for n in range(2):
        async with batch.lock:
            d = gating.apply_gate(batch.rows, proposal(n, NOW + n), rt, now=NOW + n)
            batch.add(event(n), d)
    assert gating.GLOBAL_ROW not in table and sent == []  # held
    async with batch.lock:
        await batch.flush()
    assert sent == ["h0/1/1800000000", "h1/1/1800000001"] and acked == [0, 1]
    assert len(batch) == 0


async def test_a_held_batch_is_flushed_when_no_further_record_comes() -> None:
    rt, table = runtime(), StoredTable()
    sized(table, rt, hosts=20)
    sent: list[str] = []
    acked: list[int] = []

    async def send(d: FenceDecision) -> None:
        sent.append(d.decision_id)

    async def ack(e: Any) -> None:
        acked.append(e.message.offset)

    batch = gating.GateBatch(table, send=send, ack=ack, wait=0.05)
    async with batch.lock:
        batch.add(event(7), gating.apply_gate(batch.rows, proposal(1, NOW), rt, now=NOW))
        batch.flush_later()  # the agent saw another record buffered, which never comes out
    await asyncio.sleep(0.2)
    assert sent == ["h1/1/1800000000"] and acked == [7] and gating.GLOBAL_ROW in table
    assert batch.failed is None


async def test_a_failed_send_still_acks_the_batch_and_a_late_one_is_raised_by_the_agent() -> None:
    rt, table = runtime(), StoredTable()
    sized(table, rt, hosts=20)
    acked: list[int] = []

    async def send(d: FenceDecision) -> None:
        raise ConnectionError("producer closed")

    async def ack(e: Any) -> None:
        acked.append(e.message.offset)

    batch = gating.GateBatch(table, send=send, ack=ack, wait=0.01)
    async with batch.lock:
        batch.add(event(1), gating.apply_gate(batch.rows, proposal(1, NOW), rt, now=NOW))
        with pytest.raises(ConnectionError):
            await batch.flush()
    assert acked == [1] and gating.GLOBAL_ROW in table
    async with batch.lock:
        batch.add(event(2), gating.apply_gate(batch.rows, proposal(2, NOW + 1), rt, now=NOW + 1))
        batch.flush_later()
    await asyncio.sleep(0.1)
    assert acked == [1, 2] and isinstance(batch.failed, ConnectionError)


def test_a_worker_dying_mid_batch_loses_no_grant_and_judges_no_record_twice() -> None:
    """Two proposals judged into a held batch; the worker dies before the flush (cluster rows
    written, the shared row and both decisions not). The next owner recovers the rows,
    reconciles, skips both records read again, and counts both grants against the global cap."""
    rt, table = runtime(global_cap=2), StoredTable()
    for c in ("c1", "c2", "c3"):
        sized(table, rt, hosts=20, cluster=c)
    sync = gating.Reconcile()
    rows = gating.HeldSharedRow(table)
    for n in range(2):
        p = proposal(n, NOW + n, f"c{n + 1}")
        d = gating.apply_gate(rows, p, rt, now=NOW + n, position=(0, 10 + n), sync=sync)
        assert isinstance(d, FenceDecision) and d.approved
    recovered = StoredTable()
    for k, v in table.items():  # the changelog as the dead worker left it: no shared row
        recovered[k] = json.loads(json.dumps(v))
    assert gating.GLOBAL_ROW not in recovered
    after = gating.Reconcile()
    for n in range(2):
        again = gating.apply_gate(
            recovered, proposal(n, NOW + n, f"c{n + 1}"), rt, now=NOW + 5, position=(0, 10 + n),
            sync=after,
        )  # fmt: skip
        assert again is None  # read again: its cluster row applied it
    third = gating.apply_gate(
        recovered, proposal(3, NOW + 6, "c3"), rt, now=NOW + 6, position=(0, 12), sync=after
    )
    assert isinstance(third, FenceDecision) and not third.approved
    assert third.withheld_reason is WithheldReason.GLOBAL_CAP_REACHED
