"""Topic records to and from core types.

Rule: conversions only, and total: a record that does not fit becomes None or a dead-letter
reason, never an exception through a stream. Nothing here decides, remembers or does I/O.
"""

from __future__ import annotations

import base64
import logging
import sys
import time
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, Discriminator, Tag, TypeAdapter, ValidationError

from fencing.events import (
    FenceApproved,
    FenceFinished,
    FenceWithheld,
    HostCameBack,
    HostDisconnected,
    HostEvent,
    HostStatus,
    MaintenanceEnded,
    MaintenanceStarted,
    ProbeFinished,
    Tick,
    WithheldReason,
)
from fencing.records import (
    DeadLetter,
    FenceDecision,
    FenceOutcome,
    FenceProposal,
    GateSignal,
    HostRef,
    HostSignal,
    Notice,
    ProbeResult,
)
from streams.worker_clock import CLOCK_ID, worker_clock

log = logging.getLogger("fencer.streams")

M = TypeVar("M", bound=BaseModel)
Out = tuple[str, bytes, bytes]  # (topic name, key, value)


def dump(record: BaseModel) -> bytes:
    """A wire record as the JSON bytes of its topic."""
    return record.model_dump_json().encode()


def load(model: type[M], value: Any) -> M | None:
    """A topic value as `model`, or None (logged) when it does not fit."""
    try:
        return model.model_validate_json(value)
    except (ValidationError, ValueError, TypeError) as exc:
        log.warning("dropping a %s record that does not fit: %s", model.__name__, _first(exc))
        return None


def _first(exc: Exception, skip: int = 0) -> str:
    """The first problem of a failed validation (`skip` leading path parts: a union's tag)."""
    if isinstance(exc, ValidationError):
        e = exc.errors()[0]
        return f"{'.'.join(str(p) for p in e['loc'][skip:]) or 'value'}: {e['msg']}"
    return str(exc)[:200]


def dead_letter(message: Any, reason: str) -> bytes:
    """The dead-letter record for a Kafka message fencer could not use."""
    key = message.key
    if isinstance(key, bytes):
        key = key.decode("utf-8", "replace")
    value = message.value if isinstance(message.value, bytes) else str(message.value).encode()
    return dump(
        DeadLetter(
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            reason=reason,
            key=key,
            value_b64=base64.b64encode(value or b"").decode(),
            at=time.time(),
        )
    )


@dataclass(frozen=True)
class HostInput:
    """A core event for one host, with what the record told us about the host."""

    event: HostEvent
    ref: HostRef | None = None


def host_input(message: Any, topics: Any) -> HostInput | str | None:
    """The core event a record on one of the host's input topics carries, why not (a
    dead-letter reason), or None for a record that changes nothing."""
    if not message.key:
        return f"a {message.topic} record without a host uuid key"
    try:
        if message.topic == topics.host_signals:
            s = HostSignal.model_validate_json(message.value)
            return HostInput(_signal_event(s), s.host)
        if message.topic == topics.probe_results:
            r = ProbeResult.model_validate_json(message.value)
            return HostInput(probe_finished(r, worker_clock(), CLOCK_ID), r.host)
        if message.topic == topics.fence_decisions:
            d = FenceDecision.model_validate_json(message.value)
            if d.approved:
                return HostInput(FenceApproved(d.decided_at, d.episode, d.decision_id), d.host)
            reason = d.withheld_reason or WithheldReason.PAUSED
            return HostInput(FenceWithheld(d.decided_at, d.episode, d.decision_id, reason), d.host)
        if message.topic == topics.fence_outcomes:
            o = FenceOutcome.model_validate_json(message.value)
            # A refusal (nothing was done to the host) sends the record back to checking: its
            # next stale check proposes again. People were told by the fence_refused notice.
            return HostInput(
                FenceFinished(
                    o.finished_at,
                    o.episode,
                    o.decision_id,
                    o.success and not o.refused,
                    o.power_after,
                    o.error,
                    refused=o.refused,
                ),
                o.host,
            )
    except (ValidationError, ValueError) as exc:
        return f"invalid {message.topic} record: {_first(exc)}"
    return f"unexpected topic {message.topic}"


def probe_finished(r: ProbeResult, arrived_at: float, clock: str = "") -> ProbeFinished:
    """A probe result as the core's event, stamped with the watch worker's clock on arrival:
    intervals are measured on that one clock (`clock` names it), never on the probe's or the
    filer's."""
    return ProbeFinished(
        clock=clock,
        at=arrived_at,
        episode=r.episode,
        check=r.check,
        mtimes=tuple(sorted(r.mtimes.items())),
        heartbeats=tuple(sorted(r.heartbeats.items())),
        complete=r.complete,
        files_wanted=r.files_wanted,
        unreadable=r.unreadable,
        neighbour=r.neighbour,
        reason=r.reason,
        neighbour_offset=r.neighbour_offset,
        filer_offset=r.filer_offset,
        live_signs=tuple(r.live_signs),
        min_gap=r.min_gap,
    )


def _signal_event(s: HostSignal) -> HostEvent:
    if s.kind == "disconnected":
        return HostDisconnected(s.at, s.status or HostStatus.DISCONNECTED, clock=s.clock or "")
    if s.kind == "up":
        return HostCameBack(s.at, clock=s.clock or "")
    if s.kind == "maintenance_started":
        return MaintenanceStarted(s.at)
    if s.kind == "maintenance_ended":
        return MaintenanceEnded(s.at, clock=s.clock or "")
    return Tick(s.at, clock=s.clock or "")


def _gate_kind(value: Any) -> str:
    """The union member a fence-proposals record is: its `kind` says which. A record written
    before proposals carried a `kind` (the legacy path) is a proposal if it has a decision_id."""
    if not isinstance(value, dict):
        return "proposal" if isinstance(value, FenceProposal) else "signal"
    kind = value.get("kind")
    if kind is None:
        return "proposal" if "decision_id" in value else "signal"
    return "proposal" if kind == "proposal" else "signal"


GateRecord = TypeAdapter(
    Annotated[
        Annotated[FenceProposal, Tag("proposal")] | Annotated[GateSignal, Tag("signal")],
        Discriminator(_gate_kind),
    ]
)


def gate_input(message: Any) -> FenceProposal | GateSignal | str:
    """A proposal or a gate signal (topic fence-proposals), or why not."""
    try:
        record: FenceProposal | GateSignal = GateRecord.validate_json(message.value or b"")
        return record
    except (ValidationError, ValueError) as exc:
        return f"invalid gate record: {_first(exc, skip=1)}"


def notifiable(message: Any, topics: Any) -> FenceDecision | FenceOutcome | Notice | None:
    """The record on a notifier topic."""
    models: dict[str, type[BaseModel]] = {
        topics.fence_decisions: FenceDecision,
        topics.fence_outcomes: FenceOutcome,
        topics.notices: Notice,
    }
    return load(models[message.topic], message.value)  # type: ignore[return-value]


# -- the hosts table's rows ----------------------------------------------------------------
#
# A row is [ROW_VERSION, record values, host values(, extras)]: the values of the core's
# HostRecord.to_dict() and of the HostRef in the fixed orders below, a value equal to its
# default stored as None and trailing Nones dropped, each per-file map flattened to
# [path, value, path, value, ...]. No key string is stored per row, and strings shared by many
# hosts (cluster, zone, state names) are interned when a row is read back from the changelog.
# A row written before (version 1: {"record": {...}, "host": {...}}) still loads. The orders
# are this version's and never change; a field the core adds later goes to `extras` (a dict,
# only its non-default values) until a new version lists it.

ROW_VERSION = 2
ROW_RECORD_FIELDS: tuple[str, ...] = (
    "state", "episode", "since", "suspect_since", "opened_at", "checks_requested",
    "probe_outstanding", "last_request_at", "last_result_at", "last_check", "stale_count",
    "unknown_count", "last_evidence", "last_probe_at", "ref_at", "ref_mtimes", "ref_heartbeats",
    "newest_write", "files_checked", "unreadable", "neighbour", "reason", "neighbour_offset",
    "filer_offset", "skew_notified", "last_alert_at", "sent_at", "decision_id",
    "withheld_reason", "power_state", "error", "host",
)  # fmt: skip
ROW_HOST_FIELDS: tuple[str, ...] = (
    "host_uuid", "host_name", "cluster_uuid", "ip_address", "zone_uuid", "cluster_name",
    "zone_name",
)  # fmt: skip
_PAIRS = frozenset({"ref_mtimes", "ref_heartbeats"})


def _record_defaults() -> dict[str, Any]:
    from fencing.decision import HostRecord

    return HostRecord(host="").to_dict() | {"host": None}


_DEFAULTS = _record_defaults()


def _trimmed(values: list[Any]) -> list[Any]:
    while values and values[-1] is None:
        values.pop()
    return values


def pack_row(record: dict[str, Any], host: dict[str, Any]) -> list[Any]:
    """A hosts-table row from HostRecord.to_dict() and HostRef.model_dump()."""
    values: list[Any] = []
    for name in ROW_RECORD_FIELDS:
        v = record.get(name)
        if name == "host" and v == host.get("host_uuid"):
            v = None  # the row's host uuid, stored once
        elif v == _DEFAULTS.get(name):
            v = None
        elif name in _PAIRS:
            v = [x for pair in v or () for x in pair]
        values.append(v)
    row: list[Any] = [
        ROW_VERSION,
        _trimmed(values),
        _trimmed([host.get(name) for name in ROW_HOST_FIELDS]),
    ]
    known = set(ROW_RECORD_FIELDS)
    extras = {k: v for k, v in record.items() if k not in known and v is not None}
    if extras:
        row.append(extras)
    return row


def _shared(v: Any) -> Any:
    return sys.intern(v) if type(v) is str and len(v) <= 40 else v


def unpack_row(row: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(HostRecord.to_dict(), HostRef.model_dump()) of a hosts-table row of any version;
    ValueError naming the row's problem if it is neither."""
    if isinstance(row, dict):  # version 1
        record, host = row.get("record"), row.get("host")
        if not isinstance(record, dict) or not isinstance(host, dict):
            raise ValueError("hosts row: version 1 without a record and a host")
        return record, host
    if not isinstance(row, list | tuple) or len(row) < 3 or row[0] != ROW_VERSION:
        version = row[0] if isinstance(row, list | tuple) and row else None
        raise ValueError(f"hosts row: unknown version {version!r}")
    values, host_values = row[1], row[2]
    host = dict.fromkeys(ROW_HOST_FIELDS)
    host.update(zip(ROW_HOST_FIELDS, host_values, strict=False))
    record = dict(_DEFAULTS)
    for name, v in zip(ROW_RECORD_FIELDS, values, strict=False):
        if v is None:
            continue
        if name in _PAIRS:
            v = [[v[i], v[i + 1]] for i in range(0, len(v), 2)]
        record[name] = v
    if record["host"] is None:
        record["host"] = host["host_uuid"]
    if len(row) > 3 and isinstance(row[3], dict):
        record.update(row[3])
    return record, host


def intern_row(row: Any) -> Any:
    """The same row with its short strings interned (a row read back from the changelog)."""
    if not isinstance(row, list) or len(row) < 3 or row[0] != ROW_VERSION:
        return row
    out = [row[0], [_shared(v) for v in row[1]], [_shared(v) for v in row[2]], *row[3:]]
    return out


# A row may end with the position [partition, offset] on the host-signals topic of the last
# host signal that changed it (a list after the values, the host and any extras dict). A worker
# killed before its consumer committed leaves the next owner to read a suffix of the partition
# again; a host signal at or before that position was already applied to the row (a signal that
# changed nothing is not recorded, and reading it again changes nothing either: only a later
# host signal moves a record out of the states it was a no-op in), so `streams.watch.apply`
# skips it: an old "up" read again never ends a newer episode, an old "maintenance started"
# never stops a newer watch. No clock is compared: the partition's own order decides.


def row_position(row: Any) -> tuple[int, int] | None:
    """The (partition, offset) of the last host signal that changed this row, if recorded."""
    if isinstance(row, list) and len(row) > 3 and row[0] == ROW_VERSION:
        pos = row[-1]
        if isinstance(pos, list | tuple) and len(pos) == 2:
            return int(pos[0]), int(pos[1])
    return None


def row_content(row: Any) -> Any:
    """The row without its position (what `pack_row` makes of the same record and host)."""
    return row[:-1] if row_position(row) is not None else row


def with_position(row: list[Any], position: tuple[int, int]) -> list[Any]:
    """The packed row (as `pack_row` made it) carrying `position` (see `row_position`)."""
    return [*row, [position[0], position[1]]]
