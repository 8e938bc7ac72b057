"""Topic records to and from core types.

Rule: conversions only, and total: a record that does not fit becomes None or a dead-letter
reason, never an exception through a stream. Nothing here decides, remembers or does I/O.
"""

from __future__ import annotations

import base64
import logging
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
    dead-letter reason), or None for a record that changes nothing (a refused fence)."""
    if not message.key:
        return f"a {message.topic} record without a host uuid key"
    try:
        if message.topic == topics.host_signals:
            s = HostSignal.model_validate_json(message.value)
            return HostInput(_signal_event(s), s.host)
        if message.topic == topics.probe_results:
            r = ProbeResult.model_validate_json(message.value)
            return HostInput(probe_finished(r, time.time()), r.host)
        if message.topic == topics.fence_decisions:
            d = FenceDecision.model_validate_json(message.value)
            if d.approved:
                return HostInput(FenceApproved(d.decided_at, d.episode, d.decision_id), d.host)
            reason = d.withheld_reason or WithheldReason.PAUSED
            return HostInput(FenceWithheld(d.decided_at, d.episode, d.decision_id, reason), d.host)
        if message.topic == topics.fence_outcomes:
            o = FenceOutcome.model_validate_json(message.value)
            if o.refused:
                # Nothing was done to the host: its record stays where it is and the core sends
                # the proposal again later (the gate re-approves at its own now, the actuator
                # checks everything afresh). People were told by the fence_refused notice.
                return None
            return HostInput(
                FenceFinished(
                    o.finished_at, o.episode, o.decision_id, o.success, o.power_after, o.error
                ),
                o.host,
            )
    except (ValidationError, ValueError) as exc:
        return f"invalid {message.topic} record: {_first(exc)}"
    return f"unexpected topic {message.topic}"


def probe_finished(r: ProbeResult, arrived_at: float) -> ProbeFinished:
    """A probe result as the core's event, stamped with the watch worker's clock on arrival:
    intervals are measured on that one clock, never on the probe's or the filer's."""
    return ProbeFinished(
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
        return HostDisconnected(s.at, s.status or HostStatus.DISCONNECTED)
    if s.kind == "up":
        return HostCameBack(s.at)
    if s.kind == "maintenance_started":
        return MaintenanceStarted(s.at)
    if s.kind == "maintenance_ended":
        return MaintenanceEnded(s.at)
    return Tick(s.at)


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
    model: type[BaseModel] = {
        topics.fence_decisions: FenceDecision,
        topics.fence_outcomes: FenceOutcome,
        topics.notices: Notice,
    }[message.topic]
    return load(model, message.value)  # type: ignore[return-value]
