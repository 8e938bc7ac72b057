"""The Faust tables' rows as the stores the services use.

Rule: a row is read and written whole (each write is one changelog record, durable once set);
the `actuated` table (host uuid -> {decision id: outcome and decision}) says which fences
failed and which reminders are due, the `notified` table is the notifier's idempotency store.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any

from fencing.events import NoticeKind
from fencing.records import FenceDecision, FenceOutcome, Notice


def done_entry(decision: FenceDecision, outcome: FenceOutcome) -> dict[str, Any]:
    """An `actuated` table entry: the outcome, and the decision (an operator may retry it)."""
    return {**outcome.model_dump(mode="json"), "decision": decision.model_dump(mode="json")}


def put_entry(table: MutableMapping[str, Any], key: str, decision_id: str, entry: Any) -> None:
    """Store one decision's entry in the host's `actuated` row, read afresh (other decisions of
    the host may have finished meanwhile) and written whole."""
    row = dict(table.get(key) or {})
    row[decision_id] = entry
    table[key] = row


def failed_fence(
    row: dict[str, Any], decision_id: str | None = None
) -> tuple[str, dict[str, Any]] | None:
    """The host's failed fence: the named decision, else the latest one if it failed."""
    entries = {k: v for k, v in row.items() if isinstance(v, dict) and "success" in v}
    if decision_id is None and entries:
        decision_id = max(entries, key=lambda k: entries[k].get("finished_at") or 0.0)
    entry = entries.get(decision_id or "")
    if entry is None or entry.get("success"):
        return None
    return decision_id or "", entry


def reminder_series(notice_id: str) -> tuple[str, int]:
    """A reminder's id as (the id of its failed run, its number)."""
    series, _, n = notice_id.rpartition("/")
    return series, int(n)


def reminders(
    rows: Iterable[tuple[str, Any]],
    now: float,
    interval: float,
    floors: Mapping[str, int] | None = None,
) -> list[Notice]:
    """A fence_failed notice for each host whose latest fence failed and that no operator has
    retried or marked handled: one per `interval` since the failure, each with its own id.
    `floors` (run id -> number, `reminder_series`) is the least number a run's reminder has: the
    caller's own count goes on when the clock's does not (it went back, or runs behind the
    actuator's that stamped the failure)."""
    out: list[Notice] = []
    for host, row in rows:
        target = failed_fence(dict(row or {}))
        if target is None or target[1].get("handled_at") is not None:
            continue
        decision_id, entry = target
        o = FenceOutcome.model_validate(entry)
        series = f"{decision_id}/fence_failed/{o.started_at:.0f}"
        n = max(int((now - o.finished_at) // interval), (floors or {}).get(series, 0))
        if n < 1:
            continue
        minutes = max(now - o.finished_at, n * interval) / 60
        out.append(
            Notice(
                notice_id=f"{series}/{n}",
                kind=NoticeKind.FENCE_FAILED,
                host=o.host,
                at=now,
                action=o.action,
                decision_id=decision_id,
                result=f"reminder {n}: not handled for {minutes:.0f} min",
                reason=(
                    f"the fence failed and nobody has acted: {o.error or 'no reason given'}; "
                    f"`fencer fence retry {host}` runs it again, `fencer fence handled {host}` "
                    "stops these reminders (or the buttons in the web UI)"
                ),
            )
        )
    return out


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


def host_row_serializer() -> str:
    """The `hosts` table's value serializer (registered with Faust on first use): JSON, and a
    row read back from the changelog gets its shared strings interned (streams.codec)."""
    import json

    from faust.serializers import codecs

    from streams.codec import intern_row

    class HostRowCodec(codecs.Codec):
        def _loads(self, s: bytes) -> Any:
            return intern_row(json.loads(s))

        def _dumps(self, s: Any) -> bytes:
            return json.dumps(s, separators=(",", ":")).encode()

    if HOST_ROW_SERIALIZER not in codecs.codecs:
        codecs.register(HOST_ROW_SERIALIZER, HostRowCodec())
    return HOST_ROW_SERIALIZER


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
