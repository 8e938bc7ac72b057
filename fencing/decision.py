"""Every fencing decision about one host is made here; nothing here waits, reads a clock or
touches the network.

`step(record, event, policy) -> (record, actions)` is the whole interface: the shell turns a
Kafka record into an event (`fencing.events`), calls `step`, stores the new record and carries
out the actions. Time arrives on events. Records are frozen, so a refused event changes nothing.

How a host is judged (numbers from `fencing.policy.Policy`). The one rule about clocks: a value
is only ever compared with an earlier value from the same clock. Disk and heartbeat-file mtimes
are the filer's clock, heartbeat contents the suspect host's, and intervals are measured on the
watch worker's clock (`Tick.at`, and `ProbeFinished.at`, stamped when the result arrived).
Host signals (`HostDisconnected`, `HostCameBack`, maintenance) carry the ingesting worker's clock
at arrival or poll time, never CloudStack's; the suspect time (`suspect_since`) is shown and names
the decision, and a disconnection stamped before the host's return is late (a redelivery).

- A `HostDisconnected` (Disconnected, Alert or Down) opens an *episode*: the episode id goes up
  by one, the suspect time is that event's time (a second report in the same episode changes
  nothing), and `MarkSuspect` tells the cluster gate.
- The first `Tick` of the episode requests check 1, the *baseline*, at once. Each later check is
  requested on the first tick at least `check_interval` after the previous result arrived and
  when no probe is outstanding. An outstanding probe older than `probe_timeout` is *lost*: it
  counts as one unknown result and the next probe is requested on the same tick, so a lost
  result can never stall an episode.
- Each `ProbeFinished` must name the `check` it answers; only the outstanding check counts, so a
  redelivered or late result never counts twice. A probe reports a *reading* and the core
  judges it (`judge`): **unknown** when the reading is incomplete, when the host has disks on
  storage the probe cannot read (unless `judge_readable_only`), when nothing could be read, or
  when two of its files share a fingerprint (`fingerprint`: never seen, but never a guess);
  else **alive** when the reading carries a direct sign of life (`live_signs`: an RBD watch held
  by the host); else **baseline** when there is no earlier complete reading; else **alive** when
  any file's mtime or any heartbeat's content changed (or a file appeared) since the previous
  complete reading; else **unknown** when a requested file could not be read now
  (`ProbeFinished.missing`: gone, or a stat that failed, such as ESTALE or EIO; it may be the
  one busy disk of a live host, whether the reference holds it or no check of the episode could
  ever read it), or when a heartbeat whose content the reference
  holds was stat'ed but its content could not be read now (`ProbeFinished.unread_contents`);
  else **stale** when at least `check_interval`
  (or the back end's `min_gap`, if larger) passed between the two readings (from the arrival
  of the previous one to the request of this one: both worker clock, and a lower bound of the
  real gap); else unknown ("too soon"). Every complete reading becomes the
  reference for the next: each file keyed by the fingerprint of its path, its mtime exact, a
  heartbeat's content as itself or a 128-bit digest (`as_reference`: equality is all it needs).
- alive: the stale and unknown runs reset. stale: the stale run grows; at `1 + extra_checks`
  stale results in a row (unknown results in between neither count nor break the run) exactly
  one `ProposeFence` is made, carrying a decision id `<host>/<episode>/<suspect second>`.
  unknown: never counts toward a fence and never as alive; the `unknown_alert_after`-th unknown
  in a row emits one `Notify(CANNOT_VERIFY)` per run. A measured clock skew above
  `clock_skew_alert` emits one `Notify(CLOCK_SKEW)` per episode; it never changes a verdict.
- The gate answers `FenceApproved` (-> FENCING) or `FenceWithheld` (-> WITHHELD). A withhold for
  a *temporary* reason (quiet period, pause, cluster size unknown, storm guard) keeps probing:
  the next stale check proposes again (same decision id, the gate judges again), an alive check
  returns the host to SUSPECT. A budget withhold is final for the episode. The actuator answers
  `FenceFinished`: success -> FENCED until the host comes back Up or enters maintenance;
  failure -> FAILED (the actuator retries and notifies). A success after a failure moves FAILED
  to FENCED. A *refusal* (the actuator's last-moment checks turned the decision down: nothing
  was done) is a temporary withhold (`REFUSED`): the host is checked again and its next stale
  check proposes again, so the fence is retried on fresh evidence after about one interval.
  An outcome may overtake the approval (different consumers): FENCE_PROPOSED accepts it
  directly.
- Nothing stalls silently: a proposal unanswered for `check_interval` is sent again on a tick (the
  gate repeats its verdict), an approval without an outcome for `fencing_resend_after` too; a
  host suspect for `suspect_alert_after` without a decision emits `Notify(SUSPECT_TOO_LONG)`,
  again every `suspect_renotify`, until the episode ends. A worker clock that went back past
  one of these stamps by a whole wait (an NTP step, a worker behind taking the partition over)
  never waits for the clock to catch up: the check or re-send goes out at once, an outstanding
  probe's and the episode's age are measured again from the step. The episode's age is one
  clock's: on a tick of another clock (the partition moved, the worker restarted) the age the
  old clock's own stamps measured is carried and the rest counted from that tick.
- `HostCameBack` or `MaintenanceStarted` ends an open episode: `ClearSuspect` for the gate and
  `Notify(HOST_RECOVERED)` with `ended_by`. Maintenance ignores disconnections until it ends.
- Results for an older episode, for an ended episode, or repeating what the record already
  knows are *late*: ignored, not illegal (Kafka redelivers; hosts come back mid-probe). So is a
  disconnection reported with a time before the host was last seen back Up.
- Notices about verdicts and outcomes come from the gate's decision and the actuator's outcome
  records (one per decision id); the core only notifies what only it knows.

Errors, one hierarchy::

    CoreError                     the core refused its input; the record is unchanged
    ├── IllegalTransition         the event has no entry in TRANSITIONS for the record's state
    │   ├── UnknownEpisode        names an episode that never started (0, or in the future)
    │   ├── UnknownCheck          answers a probe check that was never requested
    │   └── DecisionMismatch      a verdict or outcome for another decision id
    └── IllegalRequest            (fencing.gate) a request the gate cannot judge
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace
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
    PROBE_BASELINE = "probe_baseline"
    PROBE_ALIVE = "probe_alive"
    PROBE_STALE = "probe_stale"
    PROBE_UNKNOWN = "probe_unknown"
    FENCE_APPROVED = "fence_approved"
    FENCE_WITHHELD = "fence_withheld"
    FENCE_SUCCEEDED = "fence_succeeded"
    FENCE_FAILED = "fence_failed"
    FENCE_REFUSED = "fence_refused"
    LATE = "late"  # for an older or ended episode, or already known: ignored


S = HostState
T = Trigger

CLOSED: Final = frozenset({S.IDLE, S.MAINTENANCE})
"""States without an open episode."""

TEMPORARY: Final = frozenset(
    {
        WithheldReason.QUIET_PERIOD,
        WithheldReason.PAUSED,
        WithheldReason.CLUSTER_SIZE_UNKNOWN,
        WithheldReason.STORM_GUARD,
        WithheldReason.REFUSED,
    }
)
"""Withheld reasons that pass: the host keeps being checked and is proposed again."""

_OPEN_COMMON: Final = (T.DISCONNECTED, T.MAINTENANCE_ENDED, T.TICK, T.LATE)
"""Triggers every open state answers by staying where it is."""

_ENDS: Final = (T.CAME_BACK, T.MAINTENANCE_STARTED)


def _stay(state: HostState, *triggers: Trigger) -> dict[Trigger, tuple[HostState, ...]]:
    return {trigger: (state,) for trigger in triggers}


def _ends() -> dict[Trigger, tuple[HostState, ...]]:
    return {T.CAME_BACK: (S.IDLE,), T.MAINTENANCE_STARTED: (S.MAINTENANCE,)}


TRANSITIONS: Final[Mapping[HostState, Mapping[Trigger, tuple[HostState, ...]]]] = {
    S.IDLE: {
        **_stay(S.IDLE, T.CAME_BACK, T.MAINTENANCE_ENDED, T.TICK, T.LATE),
        T.DISCONNECTED: (S.SUSPECT,),
        T.MAINTENANCE_STARTED: (S.MAINTENANCE,),
    },
    S.SUSPECT: {
        **_stay(S.SUSPECT, *_OPEN_COMMON, T.PROBE_BASELINE, T.PROBE_ALIVE, T.PROBE_UNKNOWN),
        T.PROBE_STALE: (S.SUSPECT, S.FENCE_PROPOSED),
        # An approval the actuator carried out although the host proved alive meanwhile: a fact.
        T.FENCE_SUCCEEDED: (S.FENCED,),
        **_ends(),
    },
    S.FENCE_PROPOSED: {
        **_stay(S.FENCE_PROPOSED, *_OPEN_COMMON),
        T.FENCE_APPROVED: (S.FENCING,),
        T.FENCE_WITHHELD: (S.WITHHELD,),
        T.FENCE_SUCCEEDED: (S.FENCED,),
        T.FENCE_FAILED: (S.FAILED,),
        T.FENCE_REFUSED: (S.WITHHELD,),
        **_ends(),
    },
    S.FENCING: {
        **_stay(S.FENCING, *_OPEN_COMMON),
        T.FENCE_SUCCEEDED: (S.FENCED,),
        T.FENCE_FAILED: (S.FAILED,),
        # Refused at the last moment: nothing was done; back to checking (withheld, refused).
        T.FENCE_REFUSED: (S.WITHHELD,),
        **_ends(),
    },
    S.FENCED: {
        **_stay(S.FENCED, *_OPEN_COMMON),
        **_ends(),
    },
    S.WITHHELD: {
        **_stay(S.WITHHELD, *_OPEN_COMMON, T.PROBE_BASELINE, T.PROBE_UNKNOWN),
        T.PROBE_ALIVE: (S.SUSPECT,),
        T.PROBE_STALE: (S.WITHHELD, S.FENCE_PROPOSED),
        # Only a temporary withhold is judged again; its approval may follow.
        T.FENCE_APPROVED: (S.FENCING,),
        T.FENCE_SUCCEEDED: (S.FENCED,),
        T.FENCE_FAILED: (S.FAILED,),
        **_ends(),
    },
    S.FAILED: {
        **_stay(S.FAILED, *_OPEN_COMMON),
        T.FENCE_SUCCEEDED: (S.FENCED,),
        **_ends(),
    },
    S.MAINTENANCE: {
        **_stay(S.MAINTENANCE, T.DISCONNECTED, T.CAME_BACK, T.MAINTENANCE_STARTED, T.TICK, T.LATE),
        T.MAINTENANCE_ENDED: (S.IDLE,),
    },
}
"""For each state, the triggers it accepts and the states each may lead to. A trigger that is
not listed is illegal in that state (for example an approval after a final withhold)."""


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


Pairs = tuple[tuple[str, float], ...]
Texts = tuple[tuple[str, str], ...]

# The reference reading only answers "did this file's value differ from the earlier reading of
# the same file, or is the file new": a file is keyed by a fingerprint of its path, its mtime is
# kept exactly (a changed mtime that compared equal would be stale evidence on a live host) and a
# heartbeat's content as itself when short (CloudStack's is `date +%s`), else as a 128-bit digest.
# Collisions: two files of one reading with one fingerprint make the reading unknown (it never
# becomes a reference). Two files never read together that share a fingerprint share one entry:
# a reading of one is compared with the other's last value, "changed" (alive) when they differ.
# The one stale-ward case left needs that 2**-64 collision between two paths of one host's
# episode AND a value exactly equal to the other file's.
FINGERPRINT_BYTES: Final = 8
HEARTBEAT_KEPT_BYTES: Final = 32
"""A heartbeat content of at most this many UTF-8 bytes is kept as itself; a longer one as "#"
and the hex of its 128-bit BLAKE2b digest (33 bytes: never equal to a content kept as itself)."""


def fingerprint(path: str) -> str:
    """A file's key in the reference reading: 64 bits of BLAKE2b of its path, as 16 hex digits."""
    data = path.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=FINGERPRINT_BYTES).hexdigest()


def heartbeat_token(content: str) -> str:
    """A heartbeat's content as the reference keeps it (equal exactly when the contents are)."""
    data = content.encode("utf-8", "surrogatepass")
    if len(data) <= HEARTBEAT_KEPT_BYTES:
        return content
    return "#" + hashlib.blake2b(data, digest_size=16).hexdigest()


def as_reference(
    mtimes: Iterable[tuple[str, float]], heartbeats: Iterable[tuple[str, str]]
) -> tuple[Pairs, Texts]:
    """A path-keyed reading (or a reference stored before fingerprints) in the reference's form:
    (fingerprint, mtime) and (fingerprint, heartbeat token) pairs, sorted by fingerprint."""
    return (
        tuple(sorted({fingerprint(p): m for p, m in mtimes}.items())),
        tuple(sorted({fingerprint(p): heartbeat_token(c) for p, c in heartbeats}.items())),
    )


@dataclass(frozen=True)
class HostRecord:
    """Everything the core remembers about one host (one row of the shell's hosts table)."""

    host: str  # the host uuid: part of every decision id
    state: HostState = HostState.IDLE
    since: float | None = None  # when the record entered `state` (the event's time)
    episode: int = 0  # 1, 2, ...: goes up by one each time the host becomes suspect
    suspect_since: float | None = None  # when the disconnection was first seen: shown, an id
    opened_at: float | None = None  # worker clock: the episode's first tick
    checks_requested: int = 0  # RunProbe actions in this episode (the last one's `check`)
    probe_outstanding: bool = False  # the last requested check has not been answered
    last_request_at: float | None = None  # worker clock
    last_result_at: float | None = None  # worker clock: the last answer (or loss) arrived
    last_check: int = 0  # the check the last verdict was about
    stale_count: int = 0  # stale results in a row (unknowns in between do not break it)
    unknown_count: int = 0  # unknown results (or lost probes) in a row
    last_evidence: Evidence | None = None  # as the core judged it
    last_probe_at: float | None = None
    ref_at: float | None = None  # worker clock: when the reference reading arrived
    ref_mtimes: Pairs = ()  # the reference reading: (fingerprint, mtime), filer clock
    ref_heartbeats: Texts = ()  # ... (fingerprint, heartbeat token), the host's clock
    newest_write: float | None = None  # newest disk mtime of the last reading (shown only)
    files_checked: int = 0
    unreadable: int = 0
    neighbour: str | None = None
    reason: str | None = None
    neighbour_offset: float | None = None
    filer_offset: float | None = None
    skew_notified: bool = False
    last_alert_at: float | None = None  # worker clock: the last suspect_too_long notice
    sent_at: float | None = None  # worker clock: the proposal was last sent
    decision_id: str | None = None
    withheld_reason: WithheldReason | None = None
    power_state: str | None = None
    error: str | None = None
    request_clock: str | None = None  # the clock of `last_request_at` (`Tick.clock`)
    ref_clock: str | None = None  # the clock of `ref_at` (`ProbeFinished.clock`)
    since_clock: str | None = None  # idle: the clock of `since` (the signal that closed it)
    opened_clock: str | None = None  # the clock of `opened_at` (`Tick.clock`)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (enums as their values) for the shell's table. (Field by
        field: `dataclasses.asdict` deep-copies every pair first, and this runs for every event
        of every host.)"""
        data: dict[str, Any] = {}
        for key in _RECORD_FIELDS:
            value = getattr(self, key)
            if isinstance(value, Enum):
                value = value.value
            elif isinstance(value, tuple):
                value = [list(pair) for pair in value]
            data[key] = value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HostRecord:
        """The inverse of `to_dict`; keys this version does not know are ignored."""
        values = {key: value for key, value in data.items() if key in _RECORD_FIELD_SET}
        values["state"] = HostState(values.get("state", HostState.IDLE.value))
        if values.get("last_evidence") is not None:
            values["last_evidence"] = Evidence(values["last_evidence"])
        if values.get("withheld_reason") is not None:
            values["withheld_reason"] = WithheldReason(values["withheld_reason"])
        for key in ("ref_mtimes", "ref_heartbeats"):
            values[key] = tuple((str(k), v) for k, v in values.get(key) or ())
        return cls(**values)


_RECORD_FIELDS: Final = tuple(f.name for f in fields(HostRecord))
_RECORD_FIELD_SET: Final = frozenset(_RECORD_FIELDS)

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
    if new.probe_outstanding and not probing(new):
        # A check's answer is taken only while the host is checked: once it is not (a fence
        # approved while a check of a temporary withhold was out), that check is answered by no
        # one. Left outstanding, a refusal that sends the host back to checking would wait a
        # whole probe timeout for it and count it lost (an unknown it never was).
        new = replace(new, probe_outstanding=False)
    return new, actions


_SIGNALS: Final[Mapping[type, Trigger]] = {
    HostDisconnected: T.DISCONNECTED,
    HostCameBack: T.CAME_BACK,
    MaintenanceStarted: T.MAINTENANCE_STARTED,
    MaintenanceEnded: T.MAINTENANCE_ENDED,
    Tick: T.TICK,
}

_PROBE_TRIGGERS: Final = {
    Evidence.BASELINE: T.PROBE_BASELINE,
    Evidence.ALIVE: T.PROBE_ALIVE,
    Evidence.STALE: T.PROBE_STALE,
    Evidence.UNKNOWN: T.PROBE_UNKNOWN,
}


def probing(record: HostRecord) -> bool:
    """Whether the record checks storage: suspect, or withheld for a reason that passes."""
    return record.state is S.SUSPECT or (
        record.state is S.WITHHELD and record.withheld_reason in TEMPORARY
    )


def classify(record: HostRecord, event: HostEvent, policy: Policy) -> Trigger:
    """What `event` means for `record`; raises for references to things that never existed."""
    signal = _SIGNALS.get(type(event))
    if signal is not None:
        # A report of a disconnection from before the host was last seen back (a delayed poll,
        # an alert redelivered after recovery) must not reopen the ended episode.
        # Only a stamp of the clock that stamped the return can be told to be earlier: another
        # worker's clock behind would hide every new disconnection it reports (the reporting
        # leader moved, or the event bus is read elsewhere) until it caught up.
        reported_before_return = (
            isinstance(event, HostDisconnected)
            and record.state is S.IDLE
            and record.since is not None
            and record.since_clock == (event.clock or None)
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
            probing(record) and record.probe_outstanding and event.check == record.checks_requested
        )
        if not answers_outstanding:
            return T.LATE
        return _PROBE_TRIGGERS[judge(record, event, policy)[0]]
    if record.decision_id is None and isinstance(event, FenceFinished):
        raise IllegalTransition(
            f"host {record.host}: {type(event).__name__} for decision {event.decision_id}, "
            f"but episode {record.episode} proposed nothing"
        )
    if record.decision_id is not None and event.decision_id != record.decision_id:
        raise DecisionMismatch(
            f"host {record.host}: {type(event).__name__} for decision {event.decision_id}, "
            f"episode {record.episode} proposed {record.decision_id}"
        )
    if isinstance(event, FenceApproved):
        already = record.state in (S.FENCING, S.FENCED, S.FAILED)
        # A final withhold stays final; a host that proved alive again waits for new evidence;
        # a withheld host checked since (not stale) waits for its next stale check, so FENCING
        # always rests on a stale check (what the actuator requires). After a refusal, an
        # approval is the refused one (or a copy the actuator judges on its own): the record
        # waits for its next stale check to propose again.
        closed = record.state is S.SUSPECT or (
            record.state is S.WITHHELD
            and (
                not probing(record)
                or record.last_evidence is not Evidence.STALE
                or record.withheld_reason is WithheldReason.REFUSED
            )
        )
        return T.LATE if already or closed else T.FENCE_APPROVED
    if isinstance(event, FenceWithheld):
        return T.LATE if record.state is not S.FENCE_PROPOSED else T.FENCE_WITHHELD
    if event.success:
        return T.LATE if record.state is S.FENCED else T.FENCE_SUCCEEDED
    if event.refused:
        # Only the fence in flight goes back to checking; anywhere else nothing changes.
        return T.FENCE_REFUSED if record.state in (S.FENCE_PROPOSED, S.FENCING) else T.LATE
    # A failure (or a refusal) while the host is being checked again changes nothing: the
    # checks go on and may propose again.
    return T.LATE if record.state in (S.FAILED, S.FENCED, S.SUSPECT) else T.FENCE_FAILED


def judge(record: HostRecord, result: ProbeFinished, policy: Policy) -> tuple[Evidence, str | None]:
    """The evidence a reading gives, compared with the record's reference reading only."""
    evidence, reason, _early = _judge(record, result, policy)
    return evidence, reason


def _judge(
    record: HostRecord, result: ProbeFinished, policy: Policy
) -> tuple[Evidence, str | None, bool]:
    """`judge`, and whether an unknown is only early: a complete, unchanged reading whose
    window is not over yet is no failure to gather evidence (never counted as cannot-verify)."""
    if not result.complete:
        return Evidence.UNKNOWN, result.reason or "incomplete reading", False
    if result.unreadable and not policy.judge_readable_only:
        return (
            Evidence.UNKNOWN,
            (
                f"{result.unreadable} disks on storage the probe cannot read "
                "(judge_readable_only is off for this cluster)"
            ),
            False,
        )
    if not result.mtimes and not result.heartbeats:
        return Evidence.UNKNOWN, result.reason or "no files to read", False
    clash = _clash(result.mtimes) or _clash(result.heartbeats)
    if clash is not None:
        return Evidence.UNKNOWN, clash, False
    if result.live_signs:
        return Evidence.ALIVE, result.live_signs[0], False
    if record.ref_at is None:
        return Evidence.BASELINE, None, False
    changed = _changed(record.ref_mtimes, result.mtimes, _exact) or _changed(
        record.ref_heartbeats, result.heartbeats, heartbeat_token
    )
    if changed is not None:
        # (Also when a file read before could not be read now: a changed value on its own
        # clock is positive evidence of writes, and alive never leads to a fence.)
        return Evidence.ALIVE, changed, False
    unread = _unread(record, result.missing, result.unread_contents)
    if unread is not None:
        # What it lacks may be the one file that changed: a busy VM's disk unreadable next to
        # idle ones (and a dead agent's heartbeat) would make a live host look stale, whether
        # it was read earlier in the episode or never (unknown is never death).
        return Evidence.UNKNOWN, unread, False
    assert record.last_request_at is not None
    if record.request_clock != record.ref_clock:
        # Another worker's clock (the partition moved, or the worker restarted): the gap between
        # the two stamps is no interval on any one clock (one ahead would make seconds look
        # like minutes); this reading starts a new window on the clock that requested it.
        return (
            Evidence.BASELINE,
            (
                f"the reference was stamped on another worker's clock ({record.ref_clock or '?'},"
                f" this check {record.request_clock or '?'}): this reading is the new reference"
            ),
            False,
        )
    gap = record.last_request_at - record.ref_at
    if gap < 0:
        # The worker's clock was stepped back (or a worker behind took the partition over):
        # no interval can be measured from the old reference; this reading starts a new one.
        return (
            Evidence.BASELINE,
            (f"the worker's clock went back {-gap:.0f} s: this reading is the new reference"),
            False,
        )
    floor = max(policy.check_interval, result.min_gap)
    if gap < floor:
        return (
            Evidence.UNKNOWN,
            f"too soon: {gap:.0f} s since the previous reading, at least {floor:g} s needed",
            True,
        )
    return Evidence.STALE, None, False


def _exact(value: float) -> float:
    return value


def _changed(
    before: tuple[tuple[str, Any], ...],
    now: tuple[tuple[str, Any], ...],
    kept: Callable[[Any], Any],
) -> str | None:
    """The first file whose value differs from the earlier reading (or that appeared), named by
    the new reading's path; `kept` is how the reference keeps a value."""
    earlier = dict(before)
    for path, value in now:
        key = fingerprint(path)
        if key not in earlier:
            return f"{path} appeared"
        if earlier[key] != kept(value):
            return f"{path} changed"
    return None


def _unread(record: HostRecord, missing: tuple[str, ...], contents: tuple[str, ...]) -> str | None:
    """Why a reading cannot be judged as no change: it lacks a requested file (read before in
    the episode, or never: a busy disk no neighbour could read since the first check is as
    unknown as one that went unreadable), or a heartbeat content the reference holds
    (`contents`: stat'ed, not read), named by path; None when every such file was read."""
    known = {key for key, _ in (*record.ref_mtimes, *record.ref_heartbeats)}
    missing = tuple(dict.fromkeys(missing))
    lost = [path for path in missing if fingerprint(path) in known]
    never = [path for path in missing if fingerprint(path) not in known]
    beats = {key for key, _ in record.ref_heartbeats}
    unread = [p for p in dict.fromkeys(contents) if fingerprint(p) in beats and p not in lost]
    lost += unread
    if not lost and not never:
        return None
    if not lost:
        more = f" (+{len(never) - 3} more)" if len(never) > 3 else ""
        return (
            f"{len(never)} of the requested files could not be read at any check of this "
            f"episode (gone, or their stat failed): {', '.join(never[:3])}{more}"
        )
    more = f" (+{len(lost) - 3} more)" if len(lost) > 3 else ""
    how = (
        "gone, their stat failed, or their content unreadable"
        if unread
        else "gone, or their stat failed"
    )
    return (
        f"{len(lost)} of the files read before could not be read now ({how}): "
        f"{', '.join(lost[:3])}{more}"
    )


def _clash(now: tuple[tuple[str, Any], ...]) -> str | None:
    """Why a reading cannot be compared file by file: two of its paths share a fingerprint."""
    seen: dict[str, str] = {}
    for path, _value in now:
        other = seen.setdefault(fingerprint(path), path)
        if other != path:
            return f"{other} and {path} share a reference fingerprint: cannot tell them apart"
    return None


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


def _end_episode(
    record: HostRecord, at: float, state: HostState, ended_by: str, clock: str = ""
) -> Step:
    new = replace(record, state=state, since=at, since_clock=clock or None, probe_outstanding=False)
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
    return _end_episode(record, event.at, S.IDLE, "up", event.clock)


def _maintenance_started(record: HostRecord, event: MaintenanceStarted, policy: Policy) -> Step:
    if record.state is S.MAINTENANCE:
        return record, ()
    return _end_episode(record, event.at, S.MAINTENANCE, "maintenance")


def _maintenance_ended(record: HostRecord, event: MaintenanceEnded, policy: Policy) -> Step:
    if record.state is not S.MAINTENANCE:
        return record, ()
    return replace(record, state=S.IDLE, since=event.at, since_clock=event.clock or None), ()


_UNDECIDED: Final = frozenset({S.SUSPECT, S.FENCE_PROPOSED, S.WITHHELD})
"""Open states without a fence under way: too long in them is worth telling people."""


def _tick(record: HostRecord, event: Tick, policy: Policy) -> Step:
    if record.state in CLOSED:
        return record, ()
    now = event.at
    actions: list[HostAction] = []
    clock = event.clock or None
    if record.opened_at is not None and record.opened_clock != clock:
        record = _reopened(record, now, clock)
    if record.opened_at is None or _went_back(now, record.opened_at, policy.suspect_alert_after):
        # (Also when the worker's clock went back past the episode's first tick by a whole alert
        # period: the episode's age is measured again from now, so the reminder comes at most one
        # alert period late, never as late as the size of the step.)
        record = replace(record, opened_at=now, opened_clock=clock)
    assert record.opened_at is not None
    if record.state in _UNDECIDED and now - record.opened_at >= policy.suspect_alert_after:
        last = record.last_alert_at
        if last is None or _due(now, last, policy.suspect_renotify):
            record = replace(record, last_alert_at=now)
            actions.append(_suspect_too_long(record, now))
    if probing(record):
        record, more = _maybe_probe(record, now, policy, event.clock)
        actions.extend(more)
    elif record.state is S.FENCE_PROPOSED or record.state is S.FENCING:
        wait = (
            policy.check_interval
            if record.state is S.FENCE_PROPOSED
            else (policy.fencing_resend_after)
        )
        if record.sent_at is None or _due(now, record.sent_at, wait):
            record = replace(record, sent_at=now)
            actions.append(_proposal(record))
    return record, tuple(actions)


def _reopened(record: HostRecord, now: float, clock: str | None) -> HostRecord:
    """The episode's age moved onto another clock (the partition moved, or the worker
    restarted): the age the old clock measured (from the episode's first tick to the last check
    it requested, both its own stamps) is kept, and the rest is measured on this clock from
    now, so the sum is never more than the real age (a clock ahead never makes an episode look
    older) and never restarts from zero at each move (moves never silence the notice). A
    suspect_too_long sent on the old clock keeps the age the old clock measured (from the notice
    to its last request): its repeat comes one `suspect_renotify` after the notice at the
    earliest, never at once, and moves more frequent than that never silence it."""
    assert record.opened_at is not None
    measured = 0.0
    alert_age = 0.0
    if record.last_request_at is not None and record.request_clock == record.opened_clock:
        measured = max(0.0, record.last_request_at - record.opened_at)
        if record.last_alert_at is not None:
            alert_age = max(0.0, record.last_request_at - record.last_alert_at)
    last_alert = None if record.last_alert_at is None else now - alert_age
    return replace(record, opened_at=now - measured, opened_clock=clock, last_alert_at=last_alert)


def _went_back(now: float, then: float, wait: float) -> bool:
    """Whether the worker's clock went back past `then` by at least `wait` (an NTP step, or a
    worker whose clock is behind took the partition over). No wait can be measured from a stamp
    that far in the future, and waiting for the clock to catch up with it would be silence. (A
    stamp less than `wait` ahead, such as a result that arrived after a tick was sent, delays a
    wait by less than `wait`.)"""
    return then - now >= wait


def _due(now: float, then: float, wait: float) -> bool:
    """Whether `wait` passed since `then` on the worker's clock, or the clock went back (above)."""
    return now - then >= wait or _went_back(now, then, wait)


def _suspect_too_long(record: HostRecord, now: float) -> Notify:
    assert record.opened_at is not None
    return Notify(
        kind=NoticeKind.SUSPECT_TOO_LONG,
        episode=record.episode,
        details=(
            ("suspect_for", f"{now - record.opened_at:.0f}"),
            ("state", record.state.value),
            ("reason", record.reason or (record.withheld_reason or "no decision yet")),
        ),
    )


def _maybe_probe(record: HostRecord, now: float, policy: Policy, clock: str) -> Step:
    actions: list[HostAction] = []
    if record.probe_outstanding:
        assert record.last_request_at is not None
        if _went_back(now, record.last_request_at, policy.probe_timeout):
            # Its age is measured again from now (an earlier request time only shortens the
            # window its answer is judged on).
            return replace(record, last_request_at=now, request_clock=clock or None), ()
        if now - record.last_request_at < policy.probe_timeout:
            return record, ()
        record = replace(
            record,
            probe_outstanding=False,
            last_evidence=Evidence.UNKNOWN,
            last_check=record.checks_requested,
            last_probe_at=now,
            last_result_at=record.last_request_at,  # so the next check may go out at once
            reason="probe result lost",
        )
        record, notices = _count_unknown(record, policy)
        actions.extend(notices)
    # (After the clock went back the next reading goes out at once: it cannot be judged against
    # the old reference, `judge` makes it the new one.)
    due = record.last_result_at is None or _due(now, record.last_result_at, policy.check_interval)
    if record.checks_requested == 0 or due:
        check = record.checks_requested + 1
        record = replace(
            record,
            checks_requested=check,
            probe_outstanding=True,
            last_request_at=now,
            request_clock=clock or None,
        )
        suspect_since = record.suspect_since
        assert suspect_since is not None
        actions.append(RunProbe(episode=record.episode, suspect_since=suspect_since, check=check))
    return record, tuple(actions)


def _from_result(
    record: HostRecord, result: ProbeFinished, evidence: Evidence, reason: str | None
) -> HostRecord:
    """Record one judged result and close the outstanding check; a complete reading becomes
    the reference that the next check compares with."""
    disks = [m for path, m in result.mtimes if path not in dict(result.heartbeats)]
    record = replace(
        record,
        probe_outstanding=False,
        last_result_at=result.at,
        last_check=result.check,
        last_evidence=evidence,
        last_probe_at=result.at,
        newest_write=max(disks, default=None),
        files_checked=len(result.mtimes),
        unreadable=result.unreadable,
        neighbour=result.neighbour,
        reason=reason,
        neighbour_offset=result.neighbour_offset,
        filer_offset=result.filer_offset,
    )
    if evidence is not Evidence.UNKNOWN:
        # A file the reading lacks keeps its last known value: back unchanged, it is no change
        # (each file is only compared with itself). (A file no longer requested, such as the
        # disk of a VM restarted elsewhere; one requested that could not be read made the
        # reading unknown, unless another file changed: alive.)
        mtimes, heartbeats = as_reference(result.mtimes, result.heartbeats)
        record = replace(
            record,
            ref_at=result.at,
            ref_clock=result.clock or None,
            ref_mtimes=_merged(record.ref_mtimes, mtimes),
            ref_heartbeats=_merged(record.ref_heartbeats, heartbeats),
        )
    return record


def _merged(before: tuple[tuple[str, Any], ...], now: tuple[tuple[str, Any], ...]) -> Any:
    """The earlier reference updated with a new reading's, sorted by fingerprint."""
    return tuple(sorted({**dict(before), **dict(now)}.items()))


def _skew(record: HostRecord, policy: Policy) -> Step:
    offsets = [
        (name, value)
        for name, value in (("neighbour", record.neighbour_offset), ("filer", record.filer_offset))
        if value is not None and abs(value) > policy.clock_skew_alert
    ]
    if record.skew_notified or not offsets:
        return record, ()
    notice = Notify(
        kind=NoticeKind.CLOCK_SKEW,
        episode=record.episode,
        details=(
            *((f"{name}_offset", f"{value:+.0f}") for name, value in offsets),
            ("reason", ", ".join(f"{n} clock {v:+.0f} s" for n, v in offsets)),
            ("neighbour", record.neighbour or "none"),
        ),
    )
    return replace(record, skew_notified=True), (notice,)


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


def _judged(
    record: HostRecord, event: ProbeFinished, policy: Policy
) -> tuple[HostRecord, tuple[HostAction, ...], bool]:
    """The record after the judged reading, its notices, and whether an unknown was only early."""
    evidence, reason, early = _judge(record, event, policy)
    record, notices = _skew(_from_result(record, event, evidence, reason), policy)
    return record, notices, early


def _probe_baseline(record: HostRecord, event: ProbeFinished, policy: Policy) -> Step:
    record, notices, _ = _judged(record, event, policy)
    return replace(record, unknown_count=0), notices


def _probe_alive(record: HostRecord, event: ProbeFinished, policy: Policy) -> Step:
    record, notices, _ = _judged(record, event, policy)
    since = record.since if record.state is S.SUSPECT else event.at
    record = replace(
        record, state=S.SUSPECT, since=since, stale_count=0, unknown_count=0, withheld_reason=None
    )
    return record, notices


def _probe_unknown(record: HostRecord, event: ProbeFinished, policy: Policy) -> Step:
    record, notices, early = _judged(record, event, policy)
    if early:
        return record, notices
    record, more = _count_unknown(record, policy)
    return record, (*notices, *more)


def _probe_stale(record: HostRecord, event: ProbeFinished, policy: Policy) -> Step:
    record, notices, _ = _judged(record, event, policy)
    # After a temporary withhold the run is still whole: its next stale check proposes again.
    count = min(record.stale_count + 1, 1 + policy.extra_checks)
    record = replace(record, stale_count=count, unknown_count=0)
    if record.stale_count < 1 + policy.extra_checks:
        return record, notices
    suspect_since = record.suspect_since
    assert suspect_since is not None
    ident = decision_id(record.host, record.episode, suspect_since)
    record = replace(
        record, state=S.FENCE_PROPOSED, since=event.at, decision_id=ident, sent_at=event.at
    )
    return record, (*notices, _proposal(record))


def _proposal(record: HostRecord) -> ProposeFence:
    assert record.suspect_since is not None and record.decision_id is not None
    return ProposeFence(
        episode=record.episode,
        suspect_since=record.suspect_since,
        stale_checks=record.stale_count,
        newest_write=record.newest_write,
        files_checked=record.files_checked,
        decision_id=record.decision_id,
        neighbour=record.neighbour,
    )


def _fence_approved(record: HostRecord, event: FenceApproved, policy: Policy) -> Step:
    return replace(record, state=S.FENCING, since=event.at, withheld_reason=None), ()


def _fence_withheld(record: HostRecord, event: FenceWithheld, policy: Policy) -> Step:
    # A temporary reason keeps the host probed (`probing`): the next stale check proposes
    # again (the run is still whole), an alive one returns it to SUSPECT. A budget withhold is
    # final.
    return replace(record, state=S.WITHHELD, since=event.at, withheld_reason=event.reason), ()


def _fence_finished(record: HostRecord, event: FenceFinished, policy: Policy) -> Step:
    state = S.FENCED if event.success else S.FAILED
    new = replace(
        record, state=state, since=event.at, power_state=event.power_state, error=event.error
    )
    return new, ()


def _fence_refused(record: HostRecord, event: FenceFinished, policy: Policy) -> Step:
    # Nothing was done to the host. It is checked again (a temporary withhold): its next stale
    # check proposes again under the same decision id (the gate repeats its approval, the
    # actuator checks everything afresh), an alive one returns it to SUSPECT. The actuator
    # told people (fence_refused).
    new = replace(
        record,
        state=S.WITHHELD,
        since=event.at,
        withheld_reason=WithheldReason.REFUSED,
        error=event.error,
    )
    return new, ()


_HANDLERS: Final[Mapping[Trigger, Handler]] = {
    T.DISCONNECTED: _disconnected,
    T.CAME_BACK: _came_back,
    T.MAINTENANCE_STARTED: _maintenance_started,
    T.MAINTENANCE_ENDED: _maintenance_ended,
    T.TICK: _tick,
    T.PROBE_BASELINE: _probe_baseline,
    T.PROBE_ALIVE: _probe_alive,
    T.PROBE_STALE: _probe_stale,
    T.PROBE_UNKNOWN: _probe_unknown,
    T.FENCE_APPROVED: _fence_approved,
    T.FENCE_WITHHELD: _fence_withheld,
    T.FENCE_SUCCEEDED: _fence_finished,
    T.FENCE_FAILED: _fence_finished,
    T.FENCE_REFUSED: _fence_refused,
    T.LATE: _ignore,
}
