"""Every fencing decision about one host is made here; nothing here waits, reads a clock or
touches the network.

`step(record, event, policy) -> (record, actions)` is the whole interface: the shell turns a
Kafka record into an event (`fencing.events`), calls `step`, stores the new record and carries
out the actions. Time arrives on events. Records are frozen, so a refused event changes nothing.

How a host is judged (numbers from `fencing.policy.Policy`):

- A `HostDisconnected` (Disconnected, Alert or Down) opens an *episode*: the episode id goes up
  by one, the suspect time is that event's time (a second report in the same episode changes
  nothing, the first time wins), and `MarkSuspect` tells the cluster gate.
- The first check runs one `check_interval` after the suspect time, not at once: a live host
  then had a whole interval to write, so a single early look can never start the count. Then a
  `Tick` requests a probe when `at - last_request_at >= check_interval` and no probe is
  outstanding. An outstanding probe older than `probe_timeout` is *lost*: it counts as one
  unknown result and the next probe may be requested on the same tick, so a lost result can
  never stall an episode.
- Each `ProbeFinished` must name the `check` it answers; only the outstanding check counts, so
  a redelivered or late result never counts twice. The core re-reads the raw fields: any write
  after the suspect time or a heartbeat no older than `heartbeat_max_age` (at the probe's
  finish time) is *alive*, whatever the probe said; a *stale* report with no files and no
  heartbeat is *unknown*.
- alive: the stale and unknown runs reset. stale: the stale run grows; at `1 + extra_checks`
  stale results in a row (unknown results in between neither count nor break the run) exactly
  one `ProposeFence` is made, carrying a decision id `<host>/<episode>/<suspect second>`.
  unknown: never counts toward a fence and never as alive; the `unknown_alert_after`-th unknown
  in a row emits one `Notify(CANNOT_VERIFY)` per run.
- The gate answers `FenceApproved` (-> FENCING) or `FenceWithheld` (-> WITHHELD, final for the
  episode). The actuator answers `FenceFinished`: success -> FENCED until the host comes back
  Up or enters maintenance; failure -> FAILED, no new proposal in that episode (an operator
  putting the host in maintenance, or the host coming back, ends it). A success after a
  failure (a retried decision) moves FAILED to FENCED. An outcome may overtake the approval
  (different consumers): FENCE_PROPOSED accepts it directly.
- `HostCameBack` or `MaintenanceStarted` ends an open episode: `ClearSuspect` for the gate and
  `Notify(HOST_RECOVERED)` with `ended_by`. Maintenance ignores disconnections until it ends.
- Results for an older episode, for an ended episode, or repeating what the record already
  knows are *late*: ignored, not illegal (Kafka redelivers; hosts come back mid-probe). So is a
  disconnection reported with a time before the host was last seen back Up.
- Notices about verdicts and outcomes come from the gate's decision and the actuator's outcome
  records (one per decision id); the core only notifies what only it knows: CANNOT_VERIFY and
  HOST_RECOVERED.

Errors, one hierarchy::

    CoreError                     the core refused its input; the record is unchanged
    ├── IllegalTransition         the event has no entry in TRANSITIONS for the record's state
    │   ├── UnknownEpisode        names an episode that never started (0, or in the future)
    │   ├── UnknownCheck          answers a probe check that was never requested
    │   └── DecisionMismatch      a verdict or outcome for another decision id
    └── IllegalRequest            (fencing.gate) a request the gate cannot judge
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum, StrEnum
from typing import Any, Final

from fencing.events import (
    ClearSuspect,
    Evidence,
    FenceApproved,
    FenceFinished,
    FenceWithheld,
    HostAction,
    HostCameBack,
    HostDisconnected,
    HostEvent,
    MaintenanceEnded,
    MaintenanceStarted,
    MarkSuspect,
    NoticeKind,
    Notify,
    ProbeFinished,
    ProposeFence,
    RunProbe,
    Tick,
    WithheldReason,
)
from fencing.policy import Policy


class HostState(StrEnum):
    """Where a host stands. IDLE and MAINTENANCE have no open episode."""

    IDLE = "idle"  # not suspect (Up, or never seen down)
    SUSPECT = "suspect"  # disconnected: checking storage activity
    FENCE_PROPOSED = "fence_proposed"  # enough stale checks: waiting for the cluster gate
    FENCING = "fencing"  # approved: the actuator is at work
    FENCED = "fenced"  # the actuator reported success: until the host is Up again
    WITHHELD = "withheld"  # the gate refused: final for the episode
    FAILED = "failed"  # the actuator failed: no new proposal in this episode
    MAINTENANCE = "maintenance"  # an operator has the host: never judged


class Trigger(StrEnum):
    """What an event means for the record it meets (see `classify`)."""

    DISCONNECTED = "disconnected"
    CAME_BACK = "came_back"
    MAINTENANCE_STARTED = "maintenance_started"
    MAINTENANCE_ENDED = "maintenance_ended"
    TICK = "tick"
    PROBE_ALIVE = "probe_alive"
    PROBE_STALE = "probe_stale"
    PROBE_UNKNOWN = "probe_unknown"
    FENCE_APPROVED = "fence_approved"
    FENCE_WITHHELD = "fence_withheld"
    FENCE_SUCCEEDED = "fence_succeeded"
    FENCE_FAILED = "fence_failed"
    LATE = "late"  # for an older or ended episode, or already known: ignored


S = HostState
T = Trigger

CLOSED: Final = frozenset({S.IDLE, S.MAINTENANCE})
"""States without an open episode."""

_OPEN_COMMON: Final = (T.DISCONNECTED, T.MAINTENANCE_ENDED, T.TICK, T.LATE)
"""Triggers every open state answers by staying where it is."""


def _stay(state: HostState, *triggers: Trigger) -> dict[Trigger, tuple[HostState, ...]]:
    return {trigger: (state,) for trigger in triggers}


TRANSITIONS: Final[Mapping[HostState, Mapping[Trigger, tuple[HostState, ...]]]] = {
    S.IDLE: {
        **_stay(S.IDLE, T.CAME_BACK, T.MAINTENANCE_ENDED, T.TICK, T.LATE),
        T.DISCONNECTED: (S.SUSPECT,),
        T.MAINTENANCE_STARTED: (S.MAINTENANCE,),
    },
    S.SUSPECT: {
        **_stay(S.SUSPECT, *_OPEN_COMMON, T.PROBE_ALIVE, T.PROBE_UNKNOWN),
        T.PROBE_STALE: (S.SUSPECT, S.FENCE_PROPOSED),
        T.CAME_BACK: (S.IDLE,),
        T.MAINTENANCE_STARTED: (S.MAINTENANCE,),
    },
    S.FENCE_PROPOSED: {
        **_stay(S.FENCE_PROPOSED, *_OPEN_COMMON),
        T.FENCE_APPROVED: (S.FENCING,),
        T.FENCE_WITHHELD: (S.WITHHELD,),
        T.FENCE_SUCCEEDED: (S.FENCED,),
        T.FENCE_FAILED: (S.FAILED,),
        T.CAME_BACK: (S.IDLE,),
        T.MAINTENANCE_STARTED: (S.MAINTENANCE,),
    },
    S.FENCING: {
        **_stay(S.FENCING, *_OPEN_COMMON),
        T.FENCE_SUCCEEDED: (S.FENCED,),
        T.FENCE_FAILED: (S.FAILED,),
        T.CAME_BACK: (S.IDLE,),
        T.MAINTENANCE_STARTED: (S.MAINTENANCE,),
    },
    S.FENCED: {
        **_stay(S.FENCED, *_OPEN_COMMON),
        T.CAME_BACK: (S.IDLE,),
        T.MAINTENANCE_STARTED: (S.MAINTENANCE,),
    },
    S.WITHHELD: {
        **_stay(S.WITHHELD, *_OPEN_COMMON),
        T.CAME_BACK: (S.IDLE,),
        T.MAINTENANCE_STARTED: (S.MAINTENANCE,),
    },
    S.FAILED: {
        **_stay(S.FAILED, *_OPEN_COMMON),
        T.FENCE_SUCCEEDED: (S.FENCED,),
        T.CAME_BACK: (S.IDLE,),
        T.MAINTENANCE_STARTED: (S.MAINTENANCE,),
    },
    S.MAINTENANCE: {
        **_stay(S.MAINTENANCE, T.DISCONNECTED, T.CAME_BACK, T.MAINTENANCE_STARTED, T.TICK, T.LATE),
        T.MAINTENANCE_ENDED: (S.IDLE,),
    },
}
"""For each state, the triggers it accepts and the states each may lead to. A trigger that is
not listed is illegal in that state (for example an approval after the gate withheld)."""


class CoreError(Exception):
    """The core refused its input; the record it was given is unchanged."""


class IllegalTransition(CoreError):
    """The event has no entry in the transition table for the record's state."""


class UnknownEpisode(IllegalTransition):
    """The event names an episode that never started."""


class UnknownCheck(IllegalTransition):
    """The probe result answers a check that was never requested."""


class DecisionMismatch(IllegalTransition):
    """A verdict or outcome carries another decision id than the episode's proposal."""


@dataclass(frozen=True)
class HostRecord:
    """Everything the core remembers about one host (one row of the shell's hosts table)."""

    host: str  # the host uuid: part of every decision id
    state: HostState = HostState.IDLE
    since: float | None = None  # when the record entered `state`
    episode: int = 0  # 1, 2, ...: goes up by one each time the host becomes suspect
    suspect_since: float | None = None
    checks_requested: int = 0  # RunProbe actions in this episode (the last one's `check`)
    probe_outstanding: bool = False  # the last requested check has not been answered
    last_request_at: float | None = None
    stale_count: int = 0  # stale results in a row (unknowns in between do not break it)
    unknown_count: int = 0  # unknown results (or lost probes) in a row
    last_evidence: Evidence | None = None  # as the core judged it, not as the probe said
    last_probe_at: float | None = None
    newest_write: float | None = None
    heartbeat: float | None = None
    files_checked: int = 0
    neighbour: str | None = None
    reason: str | None = None
    decision_id: str | None = None
    withheld_reason: WithheldReason | None = None
    power_state: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (enums as their values) for the shell's table."""
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, Enum):
                data[key] = value.value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HostRecord:
        """The inverse of `to_dict`; keys this version does not know are ignored."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["state"] = HostState(values.get("state", HostState.IDLE.value))
        if values.get("last_evidence") is not None:
            values["last_evidence"] = Evidence(values["last_evidence"])
        if values.get("withheld_reason") is not None:
            values["withheld_reason"] = WithheldReason(values["withheld_reason"])
        return cls(**values)


Step = tuple[HostRecord, tuple[HostAction, ...]]


def step(record: HostRecord, event: HostEvent, policy: Policy) -> Step:
    """Apply one event: the new record and the actions to carry out, or raise `CoreError`."""
    trigger = classify(record, event, policy)
    allowed = TRANSITIONS[record.state].get(trigger)
    if allowed is None:
        raise IllegalTransition(
            f"host {record.host}: {type(event).__name__} ({trigger.value}) "
            f"is not allowed in state {record.state.value}"
        )
    new, actions = _HANDLERS[trigger](record, event, policy)
    assert new.state in allowed, (record.state, trigger, new.state)
    return new, actions


_SIGNALS: Final[Mapping[type, Trigger]] = {
    HostDisconnected: T.DISCONNECTED,
    HostCameBack: T.CAME_BACK,
    MaintenanceStarted: T.MAINTENANCE_STARTED,
    MaintenanceEnded: T.MAINTENANCE_ENDED,
    Tick: T.TICK,
}

_PROBE_TRIGGERS: Final = {
    Evidence.ALIVE: T.PROBE_ALIVE,
    Evidence.STALE: T.PROBE_STALE,
    Evidence.UNKNOWN: T.PROBE_UNKNOWN,
}


def classify(record: HostRecord, event: HostEvent, policy: Policy) -> Trigger:
    """What `event` means for `record`; raises for references to things that never existed."""
    signal = _SIGNALS.get(type(event))
    if signal is not None:
        # A report of a disconnection from before the host was last seen back (a delayed poll,
        # an alert redelivered after recovery) must not reopen the ended episode.
        reported_before_return = (
            signal is T.DISCONNECTED
            and record.state is S.IDLE
            and record.since is not None
            and event.at < record.since
        )
        return T.LATE if reported_before_return else signal
    assert isinstance(event, ProbeFinished | FenceApproved | FenceWithheld | FenceFinished)
    if not 1 <= event.episode <= record.episode:
        raise UnknownEpisode(
            f"host {record.host}: {type(event).__name__} names episode {event.episode}, "
            f"the current one is {record.episode}"
        )
    if event.episode < record.episode or record.state in CLOSED:
        return T.LATE
    if isinstance(event, ProbeFinished):
        if not 1 <= event.check <= record.checks_requested:
            raise UnknownCheck(
                f"host {record.host}: probe result for check {event.check}, "
                f"only {record.checks_requested} requested in episode {record.episode}"
            )
        answers_outstanding = (
            record.state is S.SUSPECT
            and record.probe_outstanding
            and event.check == record.checks_requested
        )
        if not answers_outstanding:
            return T.LATE
        return _PROBE_TRIGGERS[judge(record, event, policy)]
    if record.decision_id is not None and event.decision_id != record.decision_id:
        raise DecisionMismatch(
            f"host {record.host}: {type(event).__name__} for decision {event.decision_id}, "
            f"episode {record.episode} proposed {record.decision_id}"
        )
    if isinstance(event, FenceApproved):
        already = record.state in (S.FENCING, S.FENCED, S.FAILED)
        return T.LATE if already else T.FENCE_APPROVED
    if isinstance(event, FenceWithheld):
        return T.LATE if record.state is S.WITHHELD else T.FENCE_WITHHELD
    if event.success:
        return T.LATE if record.state is S.FENCED else T.FENCE_SUCCEEDED
    return T.LATE if record.state is S.FAILED else T.FENCE_FAILED


def judge(record: HostRecord, result: ProbeFinished, policy: Policy) -> Evidence:
    """The evidence the core accepts from a probe result: any sign of life wins."""
    assert record.suspect_since is not None
    wrote = result.newest_write is not None and result.newest_write > record.suspect_since
    beating = (
        result.heartbeat is not None and result.at - result.heartbeat <= policy.heartbeat_max_age
    )
    if result.evidence is Evidence.ALIVE or wrote or beating:
        return Evidence.ALIVE
    looked_at_nothing = result.files_checked == 0 and result.heartbeat is None
    if result.evidence is Evidence.UNKNOWN or looked_at_nothing:
        return Evidence.UNKNOWN
    return Evidence.STALE


def decision_id(host: str, episode: int, suspect_since: float) -> str:
    """The id of an episode's one fence: stable across redelivery, unique after a table loss."""
    return f"{host}/{episode}/{suspect_since:.0f}"


# ---------------------------------------------------------------------------------------------
# Handlers: one per trigger; `step` has already checked the trigger is legal in the state.

Handler = Callable[[HostRecord, Any, Policy], Step]


def _ignore(record: HostRecord, event: HostEvent, policy: Policy) -> Step:
    return record, ()


def _disconnected(record: HostRecord, event: HostDisconnected, policy: Policy) -> Step:
    if record.state is not S.IDLE:
        return record, ()
    episode = record.episode + 1
    new = HostRecord(
        host=record.host,
        state=S.SUSPECT,
        since=event.at,
        episode=episode,
        suspect_since=event.at,
    )
    return new, (MarkSuspect(episode=episode, at=event.at),)


def _end_episode(record: HostRecord, at: float, state: HostState, ended_by: str) -> Step:
    new = replace(record, state=state, since=at, probe_outstanding=False)
    if record.state in CLOSED:
        return new, ()
    notice = Notify(
        kind=NoticeKind.HOST_RECOVERED,
        episode=record.episode,
        details=(("ended_by", ended_by), ("state", record.state.value)),
    )
    return new, (ClearSuspect(episode=record.episode, at=at), notice)


def _came_back(record: HostRecord, event: HostCameBack, policy: Policy) -> Step:
    if record.state in CLOSED:
        return record, ()
    return _end_episode(record, event.at, S.IDLE, "up")


def _maintenance_started(record: HostRecord, event: MaintenanceStarted, policy: Policy) -> Step:
    if record.state is S.MAINTENANCE:
        return record, ()
    return _end_episode(record, event.at, S.MAINTENANCE, "maintenance")


def _maintenance_ended(record: HostRecord, event: MaintenanceEnded, policy: Policy) -> Step:
    if record.state is not S.MAINTENANCE:
        return record, ()
    return replace(record, state=S.IDLE, since=event.at), ()


def _tick(record: HostRecord, event: Tick, policy: Policy) -> Step:
    if record.state is not S.SUSPECT:
        return record, ()
    suspect_since = record.suspect_since
    assert suspect_since is not None
    actions: list[HostAction] = []
    if record.probe_outstanding:
        assert record.last_request_at is not None
        if event.at - record.last_request_at >= policy.probe_timeout:
            record = _evidence(record, Evidence.UNKNOWN, event.at, reason="probe result lost")
            record, notices = _count_unknown(record, policy)
            actions.extend(notices)
    basis = record.last_request_at if record.last_request_at is not None else suspect_since
    if not record.probe_outstanding and event.at - basis >= policy.check_interval:
        check = record.checks_requested + 1
        record = replace(
            record, checks_requested=check, probe_outstanding=True, last_request_at=event.at
        )
        actions.append(RunProbe(episode=record.episode, suspect_since=suspect_since, check=check))
    return record, tuple(actions)


def _evidence(
    record: HostRecord,
    evidence: Evidence,
    at: float,
    *,
    newest_write: float | None = None,
    heartbeat: float | None = None,
    files_checked: int = 0,
    neighbour: str | None = None,
    reason: str | None = None,
) -> HostRecord:
    """Record one judged result (or a lost probe) and close the outstanding check."""
    return replace(
        record,
        probe_outstanding=False,
        last_evidence=evidence,
        last_probe_at=at,
        newest_write=newest_write,
        heartbeat=heartbeat,
        files_checked=files_checked,
        neighbour=neighbour,
        reason=reason,
    )


def _from_result(record: HostRecord, result: ProbeFinished, evidence: Evidence) -> HostRecord:
    return _evidence(
        record,
        evidence,
        result.at,
        newest_write=result.newest_write,
        heartbeat=result.heartbeat,
        files_checked=result.files_checked,
        neighbour=result.neighbour,
        reason=result.reason,
    )


def _count_unknown(record: HostRecord, policy: Policy) -> Step:
    unknowns = record.unknown_count + 1
    record = replace(record, unknown_count=unknowns)
    if unknowns != policy.unknown_alert_after:
        return record, ()
    notice = Notify(
        kind=NoticeKind.CANNOT_VERIFY,
        episode=record.episode,
        details=(
            ("unknown_in_a_row", str(unknowns)),
            ("reason", record.reason or "unknown"),
            ("neighbour", record.neighbour or "none"),
        ),
    )
    return record, (notice,)


def _probe_alive(record: HostRecord, event: ProbeFinished, policy: Policy) -> Step:
    record = _from_result(record, event, Evidence.ALIVE)
    return replace(record, stale_count=0, unknown_count=0), ()


def _probe_unknown(record: HostRecord, event: ProbeFinished, policy: Policy) -> Step:
    return _count_unknown(_from_result(record, event, Evidence.UNKNOWN), policy)


def _probe_stale(record: HostRecord, event: ProbeFinished, policy: Policy) -> Step:
    record = _from_result(record, event, Evidence.STALE)
    record = replace(record, stale_count=record.stale_count + 1, unknown_count=0)
    if record.stale_count < 1 + policy.extra_checks:
        return record, ()
    suspect_since = record.suspect_since
    assert suspect_since is not None
    ident = decision_id(record.host, record.episode, suspect_since)
    record = replace(record, state=S.FENCE_PROPOSED, since=event.at, decision_id=ident)
    proposal = ProposeFence(
        episode=record.episode,
        suspect_since=suspect_since,
        stale_checks=record.stale_count,
        newest_write=record.newest_write,
        files_checked=record.files_checked,
        decision_id=ident,
        neighbour=record.neighbour,
    )
    return record, (proposal,)


def _fence_approved(record: HostRecord, event: FenceApproved, policy: Policy) -> Step:
    return replace(record, state=S.FENCING, since=event.at), ()


def _fence_withheld(record: HostRecord, event: FenceWithheld, policy: Policy) -> Step:
    return replace(record, state=S.WITHHELD, since=event.at, withheld_reason=event.reason), ()


def _fence_finished(record: HostRecord, event: FenceFinished, policy: Policy) -> Step:
    state = S.FENCED if event.success else S.FAILED
    new = replace(
        record, state=state, since=event.at, power_state=event.power_state, error=event.error
    )
    return new, ()


_HANDLERS: Final[Mapping[Trigger, Handler]] = {
    T.DISCONNECTED: _disconnected,
    T.CAME_BACK: _came_back,
    T.MAINTENANCE_STARTED: _maintenance_started,
    T.MAINTENANCE_ENDED: _maintenance_ended,
    T.TICK: _tick,
    T.PROBE_ALIVE: _probe_alive,
    T.PROBE_STALE: _probe_stale,
    T.PROBE_UNKNOWN: _probe_unknown,
    T.FENCE_APPROVED: _fence_approved,
    T.FENCE_WITHHELD: _fence_withheld,
    T.FENCE_SUCCEEDED: _fence_finished,
    T.FENCE_FAILED: _fence_finished,
    T.LATE: _ignore,
}
