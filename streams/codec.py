"""Topic records to and from core types.

Rule: conversions only, and total: a record that does not fit becomes None or a dead-letter
reason, never an exception through a stream. Nothing here decides, remembers or does I/O.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import struct
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
        missing=tuple(r.missing),
        unread_contents=tuple(r.unread_contents),
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
# default stored as None and trailing Nones dropped. The reference reading (ref_mtimes and
# ref_heartbeats, keyed by path fingerprints) is ONE string in the `ref` slot (`pack_reference`).
# No key string is stored per row, and strings shared by many hosts (cluster, zone, state
# names) are interned when a row is read back from the changelog. Rows written before still
# load: version 2 (the same orders, ROW_V2_RECORD_FIELDS, each per-file map flattened to
# [path, value, path, value, ...]) and version 1 ({"record": {...}, "host": {...}}); their
# path-keyed maps are converted to the fingerprint form on load (`fencing.decision.as_reference`,
# which judges the next reading as the paths did). The orders are their version's and never
# change; a field the core adds later goes to `extras` (a dict, only its non-default values)
# until a new version lists it.

ROW_VERSION = 3
ROW_V2_RECORD_FIELDS: tuple[str, ...] = (
    "state", "episode", "since", "suspect_since", "opened_at", "checks_requested",
    "probe_outstanding", "last_request_at", "last_result_at", "last_check", "stale_count",
    "unknown_count", "last_evidence", "last_probe_at", "ref_at", "ref_mtimes", "ref_heartbeats",
    "newest_write", "files_checked", "unreadable", "neighbour", "reason", "neighbour_offset",
    "filer_offset", "skew_notified", "last_alert_at", "sent_at", "decision_id",
    "withheld_reason", "power_state", "error", "host",
)  # fmt: skip
ROW_RECORD_FIELDS: tuple[str, ...] = (
    "state", "episode", "since", "suspect_since", "opened_at", "checks_requested",
    "probe_outstanding", "last_request_at", "last_result_at", "last_check", "stale_count",
    "unknown_count", "last_evidence", "last_probe_at", "ref_at", "ref",
    "newest_write", "files_checked", "unreadable", "neighbour", "reason", "neighbour_offset",
    "filer_offset", "skew_notified", "last_alert_at", "sent_at", "decision_id",
    "withheld_reason", "power_state", "error", "host",
    # appended (a version 3 row written without them loads: trailing values may be missing)
    "request_clock", "ref_clock", "since_clock", "opened_clock",
)  # fmt: skip
_PACKED_VERSIONS = frozenset({2, ROW_VERSION})  # the list forms: [version, values, host, ...]
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


# The `ref` slot: base64 of [varint H][H x (fingerprint 8 B, varint n, n B of the heartbeat
# token in UTF-8)] then, if there are mtimes, [kind 1 B][M fingerprints x 8 B][M mtimes], the
# mtimes as big-endian uint32 (kind "I": when every one is a whole second in range, as `stat
# %Y` reports them) or float64 (kind "d"); both exact. A 20-disk reference is 324 or 432
# characters where version 2 kept 20 path strings and 20 floats in a list.
_FP = 8


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("hosts row: ref is truncated")
        b = data[i]
        n |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return n, i
        shift += 7


def _fp_bytes(field: str, key: Any) -> bytes:
    try:
        raw = bytes.fromhex(key) if isinstance(key, str) and len(key) == 2 * _FP else b""
    except ValueError:
        raw = b""
    if len(raw) != _FP or raw.hex() != key:
        raise ValueError(f"hosts row: {field} key {str(key)[:60]!r} is not a path fingerprint")
    return raw


def _whole_seconds(values: list[float]) -> bool:
    # -0.0 stays a float64: exactly what the record holds.
    return all(
        float(v).is_integer() and 0 <= v < 2**32 and math.copysign(1.0, v) > 0 for v in values
    )


def pack_reference(mtimes: Any, heartbeats: Any) -> str | None:
    """The record's reference reading (HostRecord.to_dict()'s ref_mtimes and ref_heartbeats,
    fingerprint-keyed pairs) as one compact string, None when both are empty; ValueError naming
    the field for a pair that is not (fingerprint, value)."""
    mtimes, heartbeats = list(mtimes or ()), list(heartbeats or ())
    if not mtimes and not heartbeats:
        return None
    out = bytearray(_varint(len(heartbeats)))
    for key, token in heartbeats:
        if not isinstance(token, str):
            raise ValueError(f"hosts row: ref_heartbeats value of {key!r} is not a string")
        data = token.encode("utf-8", "surrogatepass")
        out += _fp_bytes("ref_heartbeats", key) + _varint(len(data)) + data
    if mtimes:
        values = [m for _key, m in mtimes]
        if not all(isinstance(m, int | float) and not isinstance(m, bool) for m in values):
            raise ValueError("hosts row: ref_mtimes holds a value that is not a number")
        kind = "I" if _whole_seconds(values) else "d"
        out += kind.encode()
        out += b"".join(_fp_bytes("ref_mtimes", key) for key, _m in mtimes)
        out += struct.pack(f">{len(values)}{kind}", *(int(m) if kind == "I" else m for m in values))
    return base64.b64encode(bytes(out)).decode("ascii")


def unpack_reference(value: Any) -> tuple[list[list[Any]], list[list[Any]]]:
    """(ref_mtimes, ref_heartbeats) in HostRecord.to_dict() form from a `ref` slot; ValueError
    naming the slot's problem."""
    if value is None:
        return [], []
    if not isinstance(value, str):
        raise ValueError("hosts row: ref is not a string")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"hosts row: ref is not base64 ({exc})") from None
    count, i = _read_varint(data, 0)
    heartbeats: list[list[Any]] = []
    for _ in range(count):
        key = data[i : i + _FP].hex()
        n, i = _read_varint(data, i + _FP)
        if len(key) != 2 * _FP or i + n > len(data):
            raise ValueError("hosts row: ref is truncated")
        try:
            token = data[i : i + n].decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise ValueError("hosts row: ref holds a heartbeat that is not UTF-8") from None
        heartbeats.append([key, token])
        i += n
    mtimes: list[list[Any]] = []
    if i < len(data):
        kind = chr(data[i])
        size = {"I": 4, "d": 8}.get(kind)
        rest = len(data) - i - 1
        if size is None or rest % (_FP + size):
            raise ValueError("hosts row: ref has a malformed mtimes part")
        m = rest // (_FP + size)
        keys = data[i + 1 : i + 1 + m * _FP].hex()
        values = struct.unpack(f">{m}{kind}", data[i + 1 + m * _FP :])
        mtimes = [[keys[j * 2 * _FP : (j + 1) * 2 * _FP], float(v)] for j, v in enumerate(values)]
    return mtimes, heartbeats


def _upgraded(record: dict[str, Any]) -> dict[str, Any]:
    """A record of a version 1 or 2 row with its path-keyed maps in the fingerprint form."""
    from fencing.decision import as_reference

    mtimes, beats = as_reference(
        ((str(p), v) for p, v in record.get("ref_mtimes") or ()),
        ((str(p), str(v)) for p, v in record.get("ref_heartbeats") or ()),
    )
    return record | {
        "ref_mtimes": [list(pair) for pair in mtimes],
        "ref_heartbeats": [list(pair) for pair in beats],
    }


def pack_row(record: dict[str, Any], host: dict[str, Any]) -> list[Any]:
    """A hosts-table row from HostRecord.to_dict() and HostRef.model_dump()."""
    values: list[Any] = []
    for name in ROW_RECORD_FIELDS:
        if name == "ref":
            values.append(pack_reference(record.get("ref_mtimes"), record.get("ref_heartbeats")))
            continue
        v = record.get(name)
        if name == "host" and v == host.get("host_uuid"):
            v = None  # the row's host uuid, stored once
        elif v == _DEFAULTS.get(name):
            v = None
        values.append(v)
    row: list[Any] = [
        ROW_VERSION,
        _trimmed(values),
        _trimmed([host.get(name) for name in ROW_HOST_FIELDS]),
    ]
    known = set(ROW_RECORD_FIELDS) | _PAIRS
    extras = {k: v for k, v in record.items() if k not in known and v is not None}
    if extras:
        row.append(extras)
    return row


def pack_row_v2(record: dict[str, Any], host: dict[str, Any]) -> list[Any]:
    """A row in the version 2 form, as workers before version 3 wrote it (`record` with its
    ref_mtimes and ref_heartbeats keyed by path, as their HostRecord had them): for the tests
    that load old rows and the benchmark's baseline; no worker writes it any more."""
    values: list[Any] = []
    for name in ROW_V2_RECORD_FIELDS:
        v = record.get(name)
        if name == "host" and v == host.get("host_uuid"):
            v = None
        elif v == _DEFAULTS.get(name):
            v = None
        elif name in _PAIRS:
            v = [x for pair in v or () for x in pair]
        values.append(v)
    row = [2, _trimmed(values), _trimmed([host.get(name) for name in ROW_HOST_FIELDS])]
    known = set(ROW_V2_RECORD_FIELDS)
    extras = {k: v for k, v in record.items() if k not in known and v is not None}
    return [*row, extras] if extras else row


def _shared(v: Any) -> Any:
    return sys.intern(v) if type(v) is str and len(v) <= 40 else v


def unpack_row(row: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(HostRecord.to_dict(), HostRef.model_dump()) of a hosts-table row of any version;
    ValueError naming the row's problem if it is neither."""
    if isinstance(row, dict):  # version 1
        record, host = row.get("record"), row.get("host")
        if not isinstance(record, dict) or not isinstance(host, dict):
            raise ValueError("hosts row: version 1 without a record and a host")
        return _upgraded(record), host
    if not isinstance(row, list | tuple) or len(row) < 3 or row[0] not in _PACKED_VERSIONS:
        version = row[0] if isinstance(row, list | tuple) and row else None
        raise ValueError(f"hosts row: unknown version {version!r}")
    values, host_values = row[1], row[2]
    host = dict.fromkeys(ROW_HOST_FIELDS)
    host.update(zip(ROW_HOST_FIELDS, host_values, strict=False))
    record = dict(_DEFAULTS)
    order = ROW_RECORD_FIELDS if row[0] == ROW_VERSION else ROW_V2_RECORD_FIELDS
    for name, v in zip(order, values, strict=False):
        if v is None:
            continue
        if name == "ref":
            record["ref_mtimes"], record["ref_heartbeats"] = unpack_reference(v)
            continue
        if name in _PAIRS:
            v = [[v[i], v[i + 1]] for i in range(0, len(v), 2)]
        record[name] = v
    if record["host"] is None:
        record["host"] = host["host_uuid"]
    if len(row) > 3 and isinstance(row[3], dict):
        record.update(row[3])
    if row[0] != ROW_VERSION:
        record = _upgraded(record)
    return record, host


# Only strings many hosts share are interned: each interned string is an entry of the
# interpreter's interned-strings table for as long as it lives, so a host's own uuid, name,
# address or reference would cost an entry per host and gain nothing.
_OWN_HOST_FIELDS = frozenset(
    i for i, name in enumerate(ROW_HOST_FIELDS) if name in ("host_uuid", "host_name", "ip_address")
)
_OWN_RECORD_FIELDS = frozenset(
    i for i, name in enumerate(ROW_RECORD_FIELDS) if name in ("ref", "host", "decision_id")
)

# A worker clock's name (`streams.worker_clock.CLOCK_ID`) is shared by every row that worker
# stamped, whatever its length.
_CLOCK_FIELDS = frozenset(i for i, name in enumerate(ROW_RECORD_FIELDS) if name.endswith("_clock"))


def intern_row(row: Any) -> Any:
    """The same row with its short shared strings interned (a row read back from the
    changelog)."""
    if not isinstance(row, list) or len(row) < 3 or row[0] not in _PACKED_VERSIONS:
        return row
    own = _OWN_RECORD_FIELDS if row[0] == ROW_VERSION else frozenset()
    clocks = _CLOCK_FIELDS if row[0] == ROW_VERSION else frozenset()
    # list(tuple(...)): a list of exactly its length (one built by appending, as the JSON
    # decoder's, keeps room to grow: up to 3 pointers more per list, for as long as it lives).
    values = list(
        tuple(
            v if i in own else sys.intern(v) if i in clocks and type(v) is str else _shared(v)
            for i, v in enumerate(row[1])
        )
    )
    host = list(tuple(v if i in _OWN_HOST_FIELDS else _shared(v) for i, v in enumerate(row[2])))
    return [row[0], values, host, *row[3:]]


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
    if isinstance(row, list) and len(row) > 3 and row[0] in _PACKED_VERSIONS:
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
