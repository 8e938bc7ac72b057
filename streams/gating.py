"""The gate's shell: the gates table's rows to and from the core's gate state.

Rule: `fencing.gate.observe` and `fencing.gate.decide` decide; this module loads the cluster's
and the shared row, applies the live pauses and cap, stores the new rows and returns the signed
decision. Rows are ClusterGate / GlobalGate as JSON. The gate judges by its own clock only: a
proposal's `proposed_at` (the watching worker's clock) is carried, never compared with it.

Its clock is the gate process's never-stepped `streams.worker_clock` (an NTP step of its machine
moves no window, nor the quiet period after its start), named `CLOCK_ID`: every row says which
clock its stamps are on (`clock_id`) and the latest time that clock is known to have reached
(`clock`), and every decision its `decided_clock` (signed with the rest). A process that takes
the gates partition over (a rebalance, a restart: another clock, maybe hours off) never
compares another clock's stamps with its own: it re-stamps them at their age on their own clock
as of that clock's latest known time (`fencing.gate.one_clock`; rows and decisions from before
clocks had names are one unnamed clock), so a grant counts at least as long as it should. The
cost is the time between the old clock's latest known moment and the take-over, counted as
none; two things keep it short. The owner refreshes its shared row's `clock` once it is
`REFRESH_AFTER` (60 s) old, also when no proposal comes; and it takes the rows over as soon as
they are recovered and the decision log read, not at the first proposal (which may come hours
later). Both run in the gate agent (a table is written inside its stream), on a `gate_clock`
record the owner's timer sends itself every `KEEP_CLOCK_EVERY` when there is work
(`clock_work`, `keep_clock`). So after a hand-over a grant is held at most about a minute plus
the hand-over's downtime longer than its window, never shorter.

A cluster's row also remembers `position`, the fence-proposals (partition, offset) of the last
record that wrote it. A record at or before it is one read again after a restart (at least once:
the dead worker wrote the row, then died before its offset was committed): the row already holds
its effect, and it is skipped. Judged again it would be judged against rows that hold its own
effect and later ones: an old `cluster_size` or `suspect` would set the row back in time, and an
old proposal would be signed afresh (a decision the actuator takes as new) against facts it
never met. What a skipped proposal should still get, the core asks for again (an unanswered
proposal is re-sent after `check_interval`, an approval without an outcome after
`fencing_resend_after`).

A decision writes two rows, the cluster's and the shared one: two changelog records, and a
worker can die between them. After a start or a change of the gate partition's owner (the rows
were just recovered from the changelog: where a lost write shows), at the owner's take-over or
its first judgement, whichever comes first, every row is taken onto its clock and the shared
row is reconciled with the grants of every cluster row (`take_over`, `fencing.gate.reconcile`;
`Reconcile` says when), and `decide` makes the cluster row whole from the shared one, so a
grant either write lost still counts. While one worker owns the partition both writes are in
its store at once, so the whole table is not read again for every proposal.

The worker can also die after its decision reached fence-decisions and before either row's
write did (the same producer, different batches): the actuator carries the decision out and no
row counts it. So the decision log is the source of truth: at the same reconciliation the gate
reads fence-decisions (a plain consumer without a group) from where the shared row says it has
merged the log up to (`log_position`, {partition: next offset}, written in the same record as
the grants it merged, so a lost write of the row sets both back together; no position: from the
beginning), keeps only the records whose signature it verifies as the actuator does
(`streams.actuation.read_decision`: a forged record neither fences nor eats the budget), and
`fencing.gate.logged_grants` / `reconcile` merge the approved power-downs still in the window by
decision id, judged by their `decided_at` once taken onto the gate's clock (`decided_clock`
names the clock it is on). The gate agent awaits `Reconcile.prepare` before a proposal: a
proposal after an assignment waits for the read.

The log is not read once only: a former owner stalled longer than the consumer session (SIGSTOP,
a long GC or VM pause, a network hiccup) loses the partition, then wakes and publishes a decision
it judged before the stall, after the new owner's read (its row writes reach the changelog, not
the new owner's store), and the actuator obeys it. So from the reconciliation on, while it owns
the partition, the owner tails the log from where that read ended (`Reconcile.tail`,
`streams.gate_tail.DecisionTail`: the same signature check), and each judgement first merges the
approved power-downs the tail has read so far into the shared row by decision id (its own read
back count once), `log_position` moving in the same record; it never waits for the broker (a
tail that cannot read logs and retries; the gate judges with what was read). The tail halts at
every change of assignment and follows again after the next reconciliation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from aiokafka import ConsumerRecord

from fencing import decision as core
from fencing import gate as gatecore
from fencing.events import FenceAction, WithheldReason
from fencing.records import FenceDecision, FenceProposal, GateSignal
from streams.actuation import read_decision
from streams.topic_reader import TopicReader
from streams.worker_clock import CLOCK_ID, worker_clock

if TYPE_CHECKING:
    from streams.gate_tail import DecisionTail
    from streams.runtime import Runtime

log = logging.getLogger("fencer.streams")

GLOBAL_ROW = "*"  # the gate table's row that every cluster shares
LOG_POSITION = "log_position"  # in the shared row: the decision log merged up to here
REFRESH_AFTER = 60.0  # the owner writes its shared row's clock when it is this old (module rule)
KEEP_CLOCK_EVERY = 5.0  # the owner's clock records go out at most every 2 x this (`keep_clock`)
# How often the owner's timer looks for clock work: the take-over follows the decision log's
# read within about this long (after a start: before the first burst of proposals, which
# otherwise paid for it and for starting the log's tail; issue 17), the refresh as before.
CLOCK_LOOK_EVERY = 1.0


def _grant(d: dict[str, Any]) -> gatecore.Grant:
    return gatecore.Grant(d["decision_id"], d["host"], d["cluster"], d["at"])


_VERDICT_FIELDS = frozenset(gatecore.Verdict.__dataclass_fields__)


def _verdict(d: dict[str, Any]) -> gatecore.Verdict:
    # Fields a verdict no longer has (`skew`, in rows written before the gate stopped comparing
    # clocks) are dropped.
    return gatecore.Verdict(
        **{
            **{k: v for k, v in d.items() if k in _VERDICT_FIELDS},
            "action": FenceAction(d["action"]),
            "reason": WithheldReason(d["reason"]) if d.get("reason") else None,
        }
    )


_SCALARS = frozenset({str, int, bool, type(None)})
_MINUS_INF = float("-inf")
_FIELDS: dict[type, tuple[str, ...]] = {}  # dataclass type -> its field names


def _jsonable(obj: Any) -> Any:
    # The types of the gate's rows, looked up by exact type first: the generic path below cost
    # ~0.3 ms for a shared row of 30 grants, at every decision of a burst (issue 17). Same
    # output as the generic path.
    t = type(obj)
    if t in _SCALARS:
        return obj
    if t is float:
        return None if obj == _MINUS_INF else obj
    if t is tuple:
        return [_grant_json(x) if type(x) is gatecore.Grant else _jsonable(x) for x in obj]
    names = _FIELDS.get(t)
    if names is None and hasattr(obj, "__dataclass_fields__") and not isinstance(obj, type):
        names = _FIELDS.setdefault(t, tuple(obj.__dataclass_fields__))
    if names is None:
        return _jsonable_any(obj)
    out = {}
    for k in names:
        v = getattr(obj, k)
        tv = type(v)
        out[k] = v if tv in _SCALARS or (tv is float and v != _MINUS_INF) else _jsonable(v)
    return out


def _grant_json(g: gatecore.Grant) -> dict[str, Any]:
    # A shared row holds every grant in the window, written again at every decision: the
    # generic path's field loop was most of its cost (issue 17). Same output.
    at = g.at
    return {
        "decision_id": g.decision_id,
        "host": g.host,
        "cluster": g.cluster,
        "at": None if at == _MINUS_INF else at,
    }


def _jsonable_any(obj: Any) -> Any:
    if isinstance(obj, frozenset):
        return sorted(obj)
    if isinstance(obj, tuple):
        return [_jsonable(x) for x in obj]
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _jsonable(getattr(obj, k)) for k in obj.__dataclass_fields__}
    if hasattr(obj, "value") and not isinstance(obj, int | float | str):
        return obj.value
    if obj == float("-inf"):
        return None
    return obj


def cluster_row(d: dict[str, Any] | None, cluster: str) -> gatecore.ClusterGate:
    """The gate table's row for one cluster."""
    if not d:
        return gatecore.ClusterGate(cluster=cluster)
    return gatecore.ClusterGate(
        cluster=cluster,
        hosts=d.get("hosts", 0),
        suspect=frozenset(d.get("suspect", ())),
        paused=d.get("paused", False),
        clock=d["clock"] if d.get("clock") is not None else float("-inf"),
        grants=tuple(_grant(g) for g in d.get("grants", ())),
        verdicts=tuple(_verdict(v) for v in d.get("verdicts", ())),
        clock_id=d.get("clock_id"),
    )


def global_row(d: dict[str, Any] | None) -> gatecore.GlobalGate:
    """The gate table's shared row."""
    if not d:
        return gatecore.GlobalGate()
    return gatecore.GlobalGate(
        paused=d.get("paused", False),
        clock=d["clock"] if d.get("clock") is not None else float("-inf"),
        grants=tuple(_grant(g) for g in d.get("grants", ())),
        clock_id=d.get("clock_id"),
    )


def cluster_rows(
    table: MutableMapping[str, Any],
) -> Iterator[tuple[str, dict[str, Any], gatecore.ClusterGate]]:
    """Every cluster row: its key, as stored, as the core's. A key that is the shared row in
    another spelling is one more cluster row: it only adds grants it holds."""
    for key, stored in list(table.items()):
        if key != GLOBAL_ROW and isinstance(stored, dict):
            yield key, stored, cluster_row(stored, str(key))


def take_over(
    table: MutableMapping[str, Any],
    now: float,
    clock_id: str | None,
    window: float,
    logged: list[gatecore.Logged] | None = None,
    merged_to: LogPosition | None = None,
    write: bool = True,
) -> tuple[gatecore.GlobalGate, LogPosition]:
    """The reconciliation (module rule): every row and the decision log read (`logged`, merged
    up to `merged_to`) on this clock (`fencing.gate.one_clock`), the shared row made whole from
    them; writes each cluster row whose stamps moved and (unless not `write`: the caller writes
    it) the shared row (on this clock, `clock` = now: also the first refresh), and returns the
    shared row with the log position it holds."""
    stored_glob = table.get(GLOBAL_ROW)
    rows = list(cluster_rows(table))
    glob, taken, on_clock = gatecore.one_clock(
        global_row(stored_glob), (r for _, _, r in rows), logged or (), now, clock_id
    )
    moved = 0
    for (key, stored, before), after in zip(rows, taken, strict=True):
        if after is not before and (after.grants or after.verdicts):
            # (its position and anything else it holds kept)
            table[key] = {**stored, **_jsonable(after)}
            moved += 1
    proved = gatecore.logged_grants(on_clock, now, window)
    whole = gatecore.reconcile(glob, taken, now, window, proved)
    whole = replace(whole, clock=now, clock_id=clock_id)
    position = log_position(stored_glob) if merged_to is None else merged_to
    if write:
        table[GLOBAL_ROW] = _shared(whole, position)
    was = stored_glob.get("clock_id") if isinstance(stored_glob, dict) else clock_id
    if moved or was != clock_id:
        log.info(
            "gate: the rows taken over onto this process's clock %s (%d cluster rows moved, "
            "the shared row from clock %s)",
            clock_id,
            moved,
            was,
        )
    return whole, position


def _shared(glob: gatecore.GlobalGate, position: LogPosition) -> dict[str, Any]:
    return {**_jsonable(glob), LOG_POSITION: {str(p): o for p, o in position.items()}}


def clock_work(
    table: MutableMapping[str, Any], sync: Reconcile, now: float, clock_id: str = CLOCK_ID
) -> str | None:
    """What the gate owner has to do to keep its rows on its clock at `now` (module rule):
    "take over" (the decision log is read after an assignment: every row onto this clock),
    "take over without the log" (a shared row of another clock, no reconciliation due),
    "refresh" (the shared row's `clock` is `REFRESH_AFTER` old), or None (nothing, or the log's
    read is still under way)."""
    if sync.due:
        return None if sync.logged is None else "take over"
    stored = table.get(GLOBAL_ROW)
    if not isinstance(stored, dict):
        return None
    glob = global_row(stored)
    if glob.clock_id != clock_id:
        return "take over without the log"
    if gatecore.refreshed(glob, now, clock_id, REFRESH_AFTER) is None:
        return None
    return "refresh"


def keep_clock(
    table: MutableMapping[str, Any],
    runtime: Runtime,
    sync: Reconcile,
    now: float | None = None,
    clock_id: str = CLOCK_ID,
) -> str | None:
    """Do the gate owner's `clock_work` (its agent, on the owner's timer's `gate_clock` record:
    a table is written inside its stream); what it did, or None."""
    now = worker_clock() if now is None else now
    work = clock_work(table, sync, now, clock_id)
    window = runtime.policy.fence_window
    if work == "take over":
        take_over(table, now, clock_id, window, sync.logged, sync.position)
        sync.done()
    elif work == "take over without the log":
        take_over(table, now, clock_id, window)
    elif work == "refresh":
        table[GLOBAL_ROW] = {**table[GLOBAL_ROW], "clock": now}
    return work


def read_again(
    row: dict[str, Any] | None, position: tuple[int, int] | None, what: str, key: str
) -> bool:
    """Whether the record at `position` is one this row has already applied (module rule)."""
    seen = (row or {}).get("position")
    if position is None or not seen or seen[0] != position[0] or position[1] > seen[1]:
        return False
    log.info(
        "gate: %s for %s at offset %d read again (the row has applied up to %d): skipped",
        what,
        key,
        position[1],
        seen[1],
    )
    return True


def _without_position(stored: Any) -> Any:
    if isinstance(stored, dict) and "position" in stored:
        return {k: v for k, v in stored.items() if k != "position"}
    return stored


def _with_position(row: dict[str, Any], position: tuple[int, int] | None) -> dict[str, Any]:
    return row if position is None else {**row, "position": list(position)}


LogPosition = dict[int, int]  # fence-decisions partition -> the next offset to read


def log_position(stored: Any) -> LogPosition:
    """The decision log position the shared row has merged up to ({}: from the beginning)."""
    raw = stored.get(LOG_POSITION) if isinstance(stored, dict) else None
    try:
        return {int(p): int(o) for p, o in (raw or {}).items()}
    except (AttributeError, TypeError, ValueError):
        return {}  # not a position: read the whole log (more, never less)


def logged_of(d: FenceDecision) -> gatecore.Logged:
    """A signed decision read from the log, as the gate core counts it."""
    return gatecore.Logged(
        d.decision_id,
        d.host.host_uuid,
        d.host.cluster_uuid,
        d.action,
        d.approved,
        d.decided_at,
        d.decided_clock,
    )


async def read_decision_log(
    runtime: Runtime, start: LogPosition | None = None, within: float = 30.0
) -> tuple[list[gatecore.Logged], LogPosition]:
    """Every fence-decisions record fencer signed from `start` on (the beginning by default),
    as the gate's core reads it, and the position after the last record read (module rule).
    Raises TopicReaderError (naming the topic) when the topic cannot be read within `within`."""
    ring = runtime.keyring()
    found: list[gatecore.Logged] = []
    end = dict(start or {})
    unsigned = 0

    def on_record(record: ConsumerRecord[bytes, bytes]) -> None:
        nonlocal unsigned
        end[record.partition] = record.offset + 1
        if record.value is None:
            return
        d = read_decision(ring, record)
        if not isinstance(d, FenceDecision):
            unsigned += 1  # the notifier reports it (forged_record); here it counts nothing
            return
        found.append(logged_of(d))

    topic = runtime.settings.kafka.topics.fence_decisions
    started = time.monotonic()
    reader = TopicReader(
        runtime.settings, [topic], on_record, client_id="fencer-gate-log", start=start
    )
    await reader.start(within)
    await reader.stop()
    log.info(
        "gate: read %d signed decisions from %s %s in %.2f s (%d unsigned, not counted)",
        len(found),
        topic,
        f"from {start}" if start else "from the beginning",
        time.monotonic() - started,
        unsigned,
    )
    return found, end


def _ahead_failed(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning(
            "gate: the decision log could not be read ahead (%s): the next proposal reads it",
            task.exception(),
        )


class Reconcile:
    """Whether the shared row is to be reconciled before the next judgement (module rule):
    due at the start, and again at every change of assignment (connected to the app's
    partition signals); done once a judgement wrote the reconciled row. `prepare` reads the
    decision log the reconciliation merges (`logged`), from the position the shared row has
    merged up to, and `position` is where that read ended."""

    def __init__(
        self,
        read: Callable[[Runtime, LogPosition], Awaitable[tuple[list[gatecore.Logged], LogPosition]]]
        | None = None,
        source: tuple[Runtime, MutableMapping[str, Any]] | None = None,
        tail: DecisionTail | None = None,
    ) -> None:
        self.due = True
        self.logged: list[gatecore.Logged] | None = None  # read for the due reconciliation
        self.position: LogPosition = {}
        self._changes = 0
        self._read = read_decision_log if read is None else read
        # The runtime and the gates table: the log is read ahead as soon as the rows are
        # recovered (`on_rebalance_complete`), not when the first proposal is already waiting.
        self.source = source
        self._ahead: asyncio.Task[None] | None = None
        # The decision log read on after the reconciliation (streams.gate_tail): halted at every
        # change of assignment, followed again from where the reconciliation's read ended.
        self.tail: DecisionTail | None = tail

    async def on_partitions_changed(self, *args: Any, **kwargs: Any) -> None:
        """Faust's on_partitions_revoked / on_partitions_assigned receiver."""
        self.due = True
        self.logged = None
        self._changes += 1
        if self.tail is not None:
            self.tail.halt()

    async def prepare(
        self, runtime: Runtime, item: FenceProposal | GateSignal, table: MutableMapping[str, Any]
    ) -> None:
        """Before `item` is judged: read the decision log when `item` is a proposal, a
        reconciliation is due and the log is not read yet (read again if the assignment changed
        during the read: the read must follow the rows' recovery)."""
        if not isinstance(item, FenceProposal):
            return
        ahead = self._ahead
        if ahead is not None and self.due and self.logged is None:
            # The read ahead under way (or its failure: then the log is read again here, and an
            # error reaches the agent).
            with contextlib.suppress(Exception):
                await asyncio.shield(ahead)
        while self.due and self.logged is None:
            await self._read_once(runtime, table)

    async def on_rebalance_complete(self, *args: Any, **kwargs: Any) -> None:
        """Faust's on_rebalance_complete receiver (the rows are recovered): read the decision
        log now, in the background, so the first proposal after a start or a rebalance finds it
        read (measured: 0.3-2 s at a start, mostly connecting)."""
        if self.source is None or not self.due or self.logged is not None:
            return
        if self._ahead is None or self._ahead.done():
            self._ahead = asyncio.create_task(
                self._read_once(*self.source), name="fencer-gate-log-ahead"
            )
            self._ahead.add_done_callback(_ahead_failed)

    async def _read_once(self, runtime: Runtime, table: MutableMapping[str, Any]) -> None:
        changes = self._changes
        logged, position = await self._read(runtime, log_position(table.get(GLOBAL_ROW)))
        if changes == self._changes:
            self.logged, self.position = logged, position

    def done(self) -> None:
        """A judgement (or the owner's take-over) wrote the reconciled rows: the tail reads on
        from where the reconciliation's read ended."""
        if self.tail is not None and self.logged is not None:
            self.tail.follow(self.position, gatecore.latest_known((), self.logged))
        self.due = False
        self.logged = None


def apply_gate(
    table: MutableMapping[str, Any],
    item: FenceProposal | GateSignal,
    runtime: Runtime,
    now: float | None = None,
    position: tuple[int, int] | None = None,
    sync: Reconcile | None = None,
    clock_id: str = CLOCK_ID,
) -> FenceDecision | None:
    """Feed the gate one record at the gate process's clock `now` (by default its never-stepped
    `worker_clock`, named `clock_id`): the decision for a proposal, else None.

    `position` is the record's (partition, offset) on fence-proposals: one the cluster's row
    has already applied is skipped (None; see the module rule)."""
    now = worker_clock() if now is None else now
    if isinstance(item, GateSignal) and item.kind == "gate_clock":
        if sync is not None:
            done = keep_clock(table, runtime, sync, now, clock_id)
            log.debug("gate: %s on the gate's clock record", done or "nothing to do")
        return None
    if isinstance(item, GateSignal):
        if not item.cluster_uuid:
            log.warning("gate: a %s signal without a cluster dropped", item.kind)
            return None
        stored = table.get(item.cluster_uuid)
        if read_again(stored, position, item.kind, item.cluster_uuid):
            return None
        row = cluster_row(stored, item.cluster_uuid)
        fact: gatecore.GateFact
        if item.kind == "cluster_size":
            fact = gatecore.ClusterSized(item.host_count or 0)
        elif item.kind == "suspect":
            fact = gatecore.HostSuspected(item.host_uuid or "")
        else:
            fact = gatecore.HostCleared(item.host_uuid or "")
        observed = _jsonable(gatecore.observe(row, fact))
        # An unchanged row (the poller's cluster sizes, every poll) is not written again: no
        # changelog record, and the gate's next proposal is not queued behind the write. (Its
        # position stays: a record that changed nothing changes nothing when read again.)
        if observed != _without_position(stored):
            table[item.cluster_uuid] = _with_position(observed, position)
        return None
    settings = runtime.current
    cluster = item.host.cluster_uuid
    if not cluster:
        # No cluster row to judge against: a temporary withhold, proposed again later.
        log.warning("gate: %s names no cluster: withheld until it is known", item.decision_id)
        return _decision(item, False, WithheldReason.CLUSTER_SIZE_UNKNOWN, now, 0, 0, clock_id)
    stored = table.get(cluster)
    if read_again(stored, position, f"proposal {item.decision_id}", cluster):
        return None
    policy = replace(runtime.policy, fence_cap=settings.fence_cap_for(cluster))
    # Every row on this clock and the shared row as the sum of the cluster rows and the log: a
    # grant whose shared write was lost counts (`sync`: once after a start or a rebalance, unless
    # the owner's timer did it first; without one, at every judgement).
    if sync is None or sync.due:
        logged = sync.logged if sync is not None else None
        merged = sync.position if sync is not None and sync.logged is not None else None
        window = policy.fence_window
        glob, merged_to = take_over(table, now, clock_id, window, logged, merged, write=False)
    else:
        glob = global_row(table.get(GLOBAL_ROW))
        merged_to = log_position(table.get(GLOBAL_ROW))  # the log merged up to here
        if sync is not None and sync.tail is not None:  # the log read on since (streams.gate_tail)
            glob, merged_to = sync.tail.merge(glob, merged_to, now, policy.fence_window, clock_id)
    row = cluster_row(table.get(cluster), cluster)
    row = gatecore.observe(row, gatecore.ClusterPaused(runtime.cluster_paused(cluster)))
    glob = gatecore.pause_all(glob, runtime.globally_paused())
    ctx = gatecore.GateContext(policy=policy, started_at=runtime.started_at, clock_id=clock_id)
    request = gatecore.FenceRequest(
        item.decision_id, item.host.host_uuid, cluster, item.action, item.proposed_at
    )
    try:
        row, glob, verdict = gatecore.decide(row, glob, request, ctx, now)
    except core.CoreError as exc:
        log.warning("gate refused %s: %s", item.decision_id, exc)
        return None
    table[cluster] = _with_position(_jsonable(row), position)
    table[GLOBAL_ROW] = _shared(glob, merged_to)
    if sync is not None:
        sync.done()
    if position is not None:
        # One line per judged record: a replay that judged a record twice shows in the log.
        log.info(
            "gate: proposal %s at partition %d offset %d judged%s",
            item.decision_id,
            position[0],
            position[1],
            " (a repeat)" if verdict.repeated else "",
        )
    # The actuator obeys only signed decisions.
    return runtime.sign_decision(
        _decision(
            item,
            verdict.approved,
            verdict.reason,
            verdict.at,
            verdict.budget_used,
            verdict.budget_cap,
            clock_id,
        )
    )


def _decision(
    item: FenceProposal,
    approved: bool,
    reason: WithheldReason | None,
    at: float,
    used: int,
    cap: int,
    clock_id: str | None,
) -> FenceDecision:
    return FenceDecision(
        decision_id=item.decision_id,
        host=item.host,
        episode=item.episode,
        action=item.action,
        approved=approved,
        withheld_reason=reason,
        evidence=item.evidence,
        decided_at=at,
        budget_used=used,
        budget_cap=cap,
        decided_clock=clock_id,
    )
