"""The Faust tables' rows as the stores the services use.

Rule: a row is read and written whole (each write is one changelog record, durable once set);
the `actuated` table (host uuid -> {decision id: outcome and decision}) says which fences
failed and which reminders are due, the `notified` table is the notifier's idempotency store.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

from fencing.events import NoticeKind
from fencing.records import FenceDecision, FenceOutcome, Notice
from streams.worker_clock import CLOCK_ID


def done_entry(decision: FenceDecision, outcome: FenceOutcome) -> dict[str, Any]:
    """An `actuated` table entry: the outcome, the decision (an operator may retry it) and the
    clock of the process that wrote it (`written_by`: the reminders of a failure this process
    saw itself start one interval later, those of one another process saw at once)."""
    return {
        **outcome.model_dump(mode="json"),
        "decision": decision.model_dump(mode="json"),
        "written_by": CLOCK_ID,
    }


def put_entry(table: MutableMapping[str, Any], key: str, decision_id: str, entry: Any) -> None:
    """Store one decision's entry in the host's `actuated` row, read afresh (other decisions of
    the host may have finished meanwhile) and written whole."""
    row = dict(table.get(key) or {})
    row[decision_id] = entry
    table[key] = row


def failed_fence(
    row: dict[str, Any], decision_id: str | None = None
) -> tuple[str, dict[str, Any]] | None:
    """The host's failed fence: the named decision, else the latest one if it failed.

    The latest is the decision whose outcome reached the row last (the row keeps its entries
    in the order they were first written; one writer per partition), never the largest
    `finished_at`: those are stamped by the clocks of whichever workers ran the fences, and a
    failure stamped behind an earlier success would be taken for the older one (no reminder)."""
    entries = {k: v for k, v in row.items() if isinstance(v, dict) and "success" in v}
    if decision_id is None and entries:
        decision_id = list(entries)[-1]
    entry = entries.get(decision_id or "")
    if entry is None or entry.get("success"):
        return None
    return decision_id or "", entry


@dataclass(frozen=True)
class FailedRun:
    """A failed fence nobody has retried or marked handled: its reminders are due."""

    host: str  # the row's key
    decision_id: str
    outcome: FenceOutcome
    written_by: str | None  # the clock (process) that wrote the entry, if recorded

    @property
    def run_id(self) -> str:
        """The failed run (a retry is a new run: a new start)."""
        return f"{self.decision_id}/fence_failed/{self.outcome.started_at:.0f}"


def failed_runs(rows: Iterable[tuple[str, Any]]) -> list[FailedRun]:
    """Each host whose latest fence failed and that no operator has retried or marked
    handled."""
    out: list[FailedRun] = []
    for host, row in rows:
        target = failed_fence(dict(row or {}))
        if target is None or target[1].get("handled_at") is not None:
            continue
        decision_id, entry = target
        o = FenceOutcome.model_validate(entry)
        written_by = entry.get("written_by")
        out.append(FailedRun(host, decision_id, o, written_by if type(written_by) is str else None))
    return out


def reminder(run: FailedRun, notice_id: str, n: int, at: float) -> Notice:
    """Reminder number `n` of a failed run (`at`: the wall clock, shown only)."""
    o = run.outcome
    failed_at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(o.finished_at))
    return Notice(
        notice_id=notice_id,
        kind=NoticeKind.FENCE_FAILED,
        host=o.host,
        at=at,
        action=o.action,
        decision_id=run.decision_id,
        result=f"reminder {n}: not handled since {failed_at} (the actuator's clock)",
        reason=(
            f"the fence failed and nobody has acted: {o.error or 'no reason given'}; "
            f"`fencer fence retry {run.host}` runs it again, `fencer fence handled {run.host}` "
            "stops these reminders (or the buttons in the web UI)"
        ),
    )


class RowStore(MutableMapping[str, float]):
    """One key of a Faust table as a mapping: each write stores the whole row (a changelog
    record), so a mark is durable as soon as it is set."""

    def __init__(self, table: MutableMapping[str, Any], key: str) -> None:
        self.table, self.key = table, key

    def _row(self) -> dict[str, float]:
        return dict(self.table.get(self.key) or {})

    def __getitem__(self, k: str) -> float:
        return self._row()[k]

    def __setitem__(self, k: str, v: float) -> None:
        self.table[self.key] = {**self._row(), k: v}

    def __delitem__(self, k: str) -> None:
        row = self._row()
        del row[k]
        self.table[self.key] = row

    def __iter__(self) -> Any:
        return iter(self._row())

    def __len__(self) -> int:
        return len(self._row())


HOST_ROW_SERIALIZER = "fencer-host-row"
GATE_ROW_SERIALIZER = "fencer-gate-row"


class _LastDump:
    """Compact JSON, the last row's bytes given once more to the very next encode of the same
    object: Faust encodes each table write twice, back to back inside one `table[key] = row`
    (the changelog record in `on_key_set`, then the store's value), and a row is never changed
    in place (`RowCache`'s rule), so the second is the first's bytes (issue 17: a shared gate
    row of 30 grants, a host row of ~1 KB, twice at every write of a burst). Used once, then
    forgotten: a later encode of the same object encodes it again. The row is held meanwhile,
    so its id is not reused."""

    def __init__(self) -> None:
        self.row: Any = None
        self.out = b""

    def dumps(self, row: Any) -> bytes:
        if row is self.row and row is not None:
            self.row = None
            return self.out
        self.out = json.dumps(row, separators=(",", ":")).encode()
        self.row = row
        return self.out


def host_row_serializer() -> str:
    """The `hosts` table's value serializer (registered with Faust on first use): JSON, and a
    row read back from the changelog gets its shared strings interned (streams.codec)."""
    import json

    from faust.serializers import codecs

    from streams.codec import intern_row

    class HostRowCodec(codecs.Codec):
        last = _LastDump()

        def _loads(self, s: bytes) -> Any:
            return intern_row(json.loads(s))

        def _dumps(self, s: Any) -> bytes:
            return self.last.dumps(s)

    if HOST_ROW_SERIALIZER not in codecs.codecs:
        codecs.register(HOST_ROW_SERIALIZER, HostRowCodec())
    return HOST_ROW_SERIALIZER


def gate_row_serializer() -> str:
    """The `gates` table's value serializer (registered with Faust on first use): compact JSON,
    each row encoded once per write (`_LastDump`); reads what Faust's own `json` codec wrote
    before (JSON either way)."""
    import json

    from faust.serializers import codecs

    class GateRowCodec(codecs.Codec):
        last = _LastDump()

        def _loads(self, s: bytes) -> Any:
            return json.loads(s)

        def _dumps(self, s: Any) -> bytes:
            return self.last.dumps(s)

    if GATE_ROW_SERIALIZER not in codecs.codecs:
        codecs.register(GATE_ROW_SERIALIZER, GateRowCodec())
    return GATE_ROW_SERIALIZER


class RowCache:
    """The rows this worker wrote to a table since its partitions last changed, in front of the
    table (a RocksDB store decodes a row's JSON, twice, at every read).

    Rule: only valid for a table with one writer per partition (the `hosts` table: the watch
    agent of the partition's owner). A row this worker wrote is the table's row until its
    partitions change; every change of assignment (revoked or assigned: another worker may
    have written the rows meanwhile, the changelog recovery rewrites them) forgets every row.
    Rows not written since are read from the table. At most `limit` rows, the least recently
    used forgotten first."""

    def __init__(self, table: MutableMapping[str, Any], limit: int = 4096) -> None:
        self._table = table
        self._limit = limit
        self._rows: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str) -> Any:
        """The row (None if the table has none)."""
        row = self._rows.get(key)
        if row is None:
            return self._table.get(key)
        self._rows.move_to_end(key)
        return row

    def put(self, key: str, row: Any) -> None:
        """Write the row to the table (one changelog record), and remember it."""
        self._table[key] = row
        self._rows[key] = row
        self._rows.move_to_end(key)
        if len(self._rows) > self._limit:
            self._rows.popitem(last=False)

    def drop(self, key: str) -> None:
        """Forget one row (its key is being deleted from the table)."""
        self._rows.pop(key, None)

    def forget(self, *args: Any, **kwargs: Any) -> None:
        """Forget every row (connected to the app's partition signals)."""
        self._rows.clear()

    async def on_partitions_changed(self, *args: Any, **kwargs: Any) -> None:
        """Faust's on_partitions_revoked / on_partitions_assigned receiver."""
        self.forget()


class HeldKeys:
    """Whether this worker holds a key's partition now, for code that walks a table's keys
    outside its stream (the tick timer).

    Rule: Faust's memory store keeps the rows this worker wrote after their partition was
    revoked (it drops only rows it recovered from the changelog, `on_recovery_completed`), so
    its `keys()` lists hosts another worker owns now; a tick sent from here, stamped on this
    worker's clock, raced the owner's: each reopened the episode's age on the other clock, and
    a check requested by the old owner's tick made every reading a new baseline (review3). The
    watch notes the partition each key's records come from (the inputs are co-partitioned by
    host); a key is held while that partition is among the assigned ones of `topic`. A key
    never noted (recovered, not yet read) is held: the store keeps only its own of those.
    RocksDB lists only assigned partitions, so there the rule changes nothing."""

    def __init__(self, topic: str) -> None:
        self._topic = topic
        self._partition: dict[str, int] = {}
        self._assigned: set[int] | None = None  # None: no assignment seen yet

    def note(self, key: str, partition: int) -> None:
        """The watch applied a record of `key` from `partition`."""
        self._partition[key] = partition

    def held(self, key: str) -> bool:
        """False only for a key last applied from a partition this worker no longer holds."""
        p = self._partition.get(key)
        return p is None or self._assigned is None or p in self._assigned

    async def on_partitions_revoked(self, *args: Any, **kwargs: Any) -> None:
        """Faust's on_partitions_revoked receiver: (sender, revoked)."""
        if self._assigned is not None:
            self._assigned -= {tp.partition for tp in args[-1] if tp.topic == self._topic}

    async def on_partitions_assigned(self, *args: Any, **kwargs: Any) -> None:
        """Faust's on_partitions_assigned receiver: (sender, the whole new assignment)."""
        self._assigned = {tp.partition for tp in args[-1] if tp.topic == self._topic}


class CachedRows(MutableMapping[str, Any]):
    """A table as a mapping with a `RowCache` in front (the same rule: one writer per partition,
    forgotten at every change of assignment), for code that reads and writes a table through
    the mapping protocol: the gate's `gates` table (one partition, written only by the gate
    agent of its owner), whose shared row and cluster row every proposal reads back (a RocksDB
    read and a JSON decode each, and the key JSON-encoded, per read).

    Reads of rows this worker wrote since its partitions last changed come from the cache;
    iteration, `items()` and rows not written since read the table. A cached row is the object
    written: it must be JSON-native (what the table gives back after its JSON round trip), and
    neither the writer nor a reader changes it in place."""

    def __init__(self, table: MutableMapping[str, Any], limit: int = 4096) -> None:
        self._table = table
        self._rows = RowCache(table, limit)

    def get(self, key: str, default: Any = None) -> Any:
        row = self._rows.get(key)
        return default if row is None else row

    def __getitem__(self, key: str) -> Any:
        row = self._rows.get(key)
        if row is None:
            raise KeyError(key)
        return row

    def __setitem__(self, key: str, value: Any) -> None:
        self._rows.put(key, value)

    def __delitem__(self, key: str) -> None:
        self._rows.drop(key)
        del self._table[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)

    def items(self) -> Any:
        """The table's own items (the cached rows are equal to them)."""
        return self._table.items()

    async def on_partitions_changed(self, *args: Any, **kwargs: Any) -> None:
        """Faust's on_partitions_revoked / on_partitions_assigned receiver."""
        self._rows.forget()
