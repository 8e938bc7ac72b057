"""hypothesis over the decision core.

The evidence rule of issue 13, as properties: a constant offset of the filer's clock (or of the
host's) changes no verdict and no decision; a host whose files stop changing is fenced after
exactly `1 + extra_checks` stale checks whatever it wrote before; a host with a change in every
window never is; unknown readings never count; a file read before that cannot be read now is
never stale. Then stateful machines: one host's core and the
cluster gate keep their safety invariants whatever order facts, readings, verdicts and
redeliveries arrive in.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as tally
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fencing.decision import (
    CLOSED,
    HostRecord,
    HostState,
    IllegalTransition,
    decision_id,
    fingerprint,
    heartbeat_token,
    step,
)
from fencing.events import (
    ClearSuspect,
    Evidence,
    FenceAction,
    FenceApproved,
    FenceFinished,
    FenceWithheld,
    HostAction,
    HostCameBack,
    HostDisconnected,
    HostEvent,
    HostStatus,
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
from fencing.gate import (
    TEMPORARY,
    ClusterGate,
    ClusterPaused,
    ClusterSized,
    FenceRequest,
    GateContext,
    GlobalGate,
    HostCleared,
    HostSuspected,
    Logged,
    Verdict,
    decide,
    logged_grants,
    observe,
    one_clock,
    pause_all,
    reconcile,
    refreshed,
)
from fencing.policy import Policy

FAST = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DAY = 86_400
T0 = 1_700_000_000.0  # epoch seconds: the worker clock starts here, the filer's near it
DISK = "/mnt/p1/vm1.qcow2"
DISK2 = "/mnt/p1/vm2.qcow2"
HB = "/mnt/p1/KVMHA/hb-10.0.0.11"

# Offsets are whole seconds plus 1/1024ths: adding one to an epoch mtime is exact in a float,
# so two shifted readings are equal exactly when the unshifted ones are (as on a real filer).
offsets = st.builds(
    lambda seconds, fraction: seconds + fraction / 1024,
    st.integers(-30 * DAY, 30 * DAY),
    st.integers(0, 1023),
)


@dataclass
class Files:
    """What is on the filer for one suspect host: mtimes on the filer's clock, the heartbeat
    content on the host's. Readings are made from it, shifted by a constant clock offset."""

    mtimes: dict[str, float] = field(
        default_factory=lambda: {DISK: T0 - 500.5, DISK2: T0 - 300.25, HB: T0 - 400.125}
    )
    beat: int = int(T0 - 400)
    born: int = 0

    def change(self, kind: str) -> None:
        """The host (or CloudStack) changes something; 'vanish' is a VM restarted elsewhere."""
        if kind == "disk":
            self.mtimes[DISK] = self.mtimes.get(DISK, T0) + 7.125
        elif kind == "beat":
            self.beat += 5
        elif kind == "touch":
            self.mtimes[HB] += 5.0
        elif kind == "appear":
            self.born += 1
            self.mtimes[f"/mnt/p1/new{self.born}.qcow2"] = T0 - 1000.0 - self.born
        elif kind == "vanish":
            self.mtimes.pop(DISK2, None)

    def read(
        self,
        at: float,
        episode: int,
        check: int,
        *,
        filer: float = 0.0,
        host: int = 0,
        complete: bool = True,
        unreadable: int = 0,
        neighbour_offset: float | None = None,
    ) -> ProbeFinished:
        mtimes = tuple((path, m + filer) for path, m in sorted(self.mtimes.items()))
        beat = self.beat + host
        return ProbeFinished(
            at=at,
            episode=episode,
            check=check,
            mtimes=mtimes if complete else mtimes[:1],
            heartbeats=((HB, f"{beat}\n"),),
            complete=complete,
            files_wanted=len(mtimes),
            unreadable=unreadable,
            neighbour="n2",
            reason=None if complete else "partial output",
            neighbour_offset=neighbour_offset,
            filer_offset=round(self.mtimes[HB] + filer - beat, 1),
        )


CHANGES = ("disk", "beat", "touch", "appear")
NO_CHANGE = ("same", "vanish")
UNKNOWNS = ("incomplete", "unreadable", "empty", "failed", "lost")
UNSTAT = "unstat"  # the busy disk (DISK) cannot be stat'ed now: a complete reading that lacks it
UNREAD = "unread"  # the heartbeat is stat'ed but its content cannot be read now


def reading_of(
    kind: str, files: Files, at: float, episode: int, check: int, filer: float, host: int
) -> ProbeFinished:
    """The probe's answer for a check of the given kind (after any change it made)."""
    if kind == "failed":
        return ProbeFinished(at=at, episode=episode, check=check, reason="ssh refused")
    if kind == "empty":
        return ProbeFinished(at=at, episode=episode, check=check, complete=True, neighbour="n2")
    if kind == UNSTAT:
        r = files.read(at, episode, check, filer=filer, host=host)
        return replace(r, mtimes=tuple(pm for pm in r.mtimes if pm[0] != DISK), missing=(DISK,))
    if kind == UNREAD:
        r = files.read(at, episode, check, filer=filer, host=host)
        return replace(r, heartbeats=(), unread_contents=tuple(p for p, _ in r.heartbeats))
    return files.read(
        at,
        episode,
        check,
        filer=filer,
        host=host,
        complete=kind != "incomplete",
        unreadable=1 if kind == "unreadable" else 0,
    )


Entry = tuple[int, HostEvent, HostRecord, tuple[HostAction, ...]]
"""(script step, event, record after it, actions)."""


def probing(record: HostRecord) -> bool:
    return record.state is HostState.SUSPECT or (
        record.state is HostState.WITHHELD and record.withheld_reason in TEMPORARY
    )


def drive(
    script: Sequence[tuple[str, float]], policy: Policy, filer: float = 0.0, host: int = 0
) -> list[Entry]:
    """Disconnect h1, then one check per script step `(kind, wait)`: tick every `wait` seconds
    of the worker clock until a probe is requested, change the files as the kind says, and
    answer one second later (a 'lost' probe is never answered). Stops once not probing."""
    record = HostRecord("h1")
    trace: list[Entry] = []
    files = Files()

    def apply(n: int, event: HostEvent) -> tuple[HostAction, ...]:
        nonlocal record
        record, actions = step(record, event, policy)
        trace.append((n, event, record, actions))
        return actions

    now = T0
    apply(-1, HostDisconnected(at=now))
    for n, (kind, wait) in enumerate(script):
        request: RunProbe | None = None
        while request is None:
            if not probing(record):
                return trace
            now += wait
            request = next((a for a in apply(n, Tick(at=now)) if isinstance(a, RunProbe)), None)
        files.change(kind)
        if kind != "lost":
            now += 1.0
            apply(n, reading_of(kind, files, now, 1, request.check, filer, host))
    return trace


def steps(kinds: Sequence[str], min_size: int = 0, max_size: int = 12) -> st.SearchStrategy:
    wait = st.sampled_from([10.0, 30.0, 59.0, 60.0, 61.0, 125.0])
    return st.lists(st.tuples(st.sampled_from(kinds), wait), min_size=min_size, max_size=max_size)


def judged(trace: list[Entry]) -> list[tuple[int, Evidence | None, tuple[HostAction, ...]]]:
    """The verdict of every accepted reading: (script step, evidence, actions)."""
    return [
        (n, record.last_evidence, actions)
        for n, event, record, actions in trace
        if isinstance(event, ProbeFinished)
    ]


def proposals(trace: list[Entry]) -> list[tuple[int, HostEvent, ProposeFence]]:
    return [
        (n, event, a)
        for n, event, _, actions in trace
        for a in actions
        if isinstance(a, ProposeFence)
    ]


def policy_of(extra: int, readable: bool = False) -> Policy:
    return Policy(
        check_interval=60.0,
        extra_checks=extra,
        unknown_alert_after=2,
        probe_timeout=120.0,
        judge_readable_only=readable,
        clock_skew_alert=30.0,
    )


def unshifted(record: HostRecord, filer: float, host: int) -> HostRecord:
    """The record as the unshifted run should have it (offsets are shown, never used)."""
    return replace(
        record,
        newest_write=None if record.newest_write is None else record.newest_write - filer,
        ref_mtimes=tuple((p, m - filer) for p, m in record.ref_mtimes),
        ref_heartbeats=tuple((p, f"{int(v) - host}\n") for p, v in record.ref_heartbeats),
        filer_offset=None,
        skew_notified=False,
    )


def decided(actions: tuple[HostAction, ...], filer: float) -> tuple[HostAction, ...]:
    """The actions without clock-skew notices, proposals' shown mtime unshifted."""
    out: list[HostAction] = []
    for a in actions:
        if isinstance(a, Notify) and a.kind is NoticeKind.CLOCK_SKEW:
            continue
        if isinstance(a, ProposeFence) and a.newest_write is not None:
            a = replace(a, newest_write=a.newest_write - filer)
        out.append(a)
    return tuple(out)


@PROPERTY
@given(
    script=steps(CHANGES + NO_CHANGE + UNKNOWNS, max_size=16),
    filer=offsets,
    host=st.integers(-30 * DAY, 30 * DAY),
    extra=st.integers(0, 3),
    readable=st.booleans(),
)
def test_a_constant_clock_offset_changes_no_verdict_and_no_decision(
    script: list[tuple[str, float]], filer: float, host: int, extra: int, readable: bool
) -> None:
    policy = policy_of(extra, readable)
    plain = drive(script, policy)
    shifted = drive(script, policy, filer, host)
    assert len(plain) == len(shifted)
    for (n1, _, r1, a1), (n2, _, r2, a2) in zip(plain, shifted, strict=True):
        assert n1 == n2
        assert unshifted(r2, filer, host) == unshifted(r1, 0.0, 0)
        assert decided(a2, filer) == decided(a1, 0.0)


@PROPERTY
@given(
    before=steps(CHANGES + UNKNOWNS, max_size=10),
    after=steps(NO_CHANGE + UNKNOWNS, max_size=10),
    extra=st.integers(0, 3),
    filer=offsets,
)
def test_a_host_whose_files_stop_changing_is_fenced_after_exactly_1_plus_extra_stale_checks(
    before: list[tuple[str, float]], after: list[tuple[str, float]], extra: int, filer: float
) -> None:
    """Whatever the host wrote before (any run of alive checks, any unknowns in between)."""
    policy = policy_of(extra)
    stop = len(before)
    tail = [("same", 60.0)] * (extra + 2)  # enough stale checks to end any script
    trace = drive([*before, *after, *tail], policy, filer)
    verdicts = judged(trace)
    known_before = [e for n, e, _ in verdicts if n < stop and e is not Evidence.UNKNOWN]
    assert all(e in (Evidence.BASELINE, Evidence.ALIVE) for e in known_before)
    known_after = [(e, a) for n, e, a in verdicts if n >= stop and e is not Evidence.UNKNOWN]
    expected = [Evidence.STALE] * (1 + extra)
    if not known_before:  # the first complete reading after the stop is the baseline
        expected = [Evidence.BASELINE, *expected]
    assert [e for e, _ in known_after] == expected
    decisions = [tuple(x for x in a if not isinstance(x, Notify)) for _, a in known_after]
    assert decisions[:-1] == [()] * (len(expected) - 1)
    (n, event, proposal), *more = proposals(trace)
    assert not more and isinstance(event, ProbeFinished) and n >= stop
    assert proposal.stale_checks == 1 + extra
    assert proposal.decision_id == decision_id("h1", 1, T0)
    assert trace[-1][2].state is HostState.FENCE_PROPOSED


@PROPERTY
@given(
    script=steps(CHANGES + UNKNOWNS, max_size=20),
    extra=st.integers(0, 3),
    filer=offsets,
)
def test_a_host_with_a_change_in_every_window_is_never_fenced(
    script: list[tuple[str, float]], extra: int, filer: float
) -> None:
    trace = drive(script, policy_of(extra), filer)
    known = [e for _, e, _ in judged(trace) if e is not Evidence.UNKNOWN]
    assert known[:1] in ([], [Evidence.BASELINE])
    assert set(known[1:]) <= {Evidence.ALIVE}
    assert not proposals(trace)
    assert all(record.state is HostState.SUSPECT for _, _, record, _ in trace)
    assert all(record.stale_count == 0 for _, _, record, _ in trace)


@PROPERTY
@given(
    data=st.data(),
    script=steps(CHANGES + NO_CHANGE, max_size=12),
    extra=st.integers(0, 3),
)
def test_unknown_readings_never_count_and_never_break_a_run(
    data: st.DataObject, script: list[tuple[str, float]], extra: int
) -> None:
    """Unknowns put anywhere into a script change no verdict of a complete reading and move no
    proposal: it is made on the same complete reading, with the same evidence."""
    noisy: list[tuple[str, float]] = []
    for entry in script:
        noisy += data.draw(steps(UNKNOWNS, max_size=3))
        noisy.append(entry)
    policy = policy_of(extra)
    clean_trace, noisy_trace = drive(script, policy), drive(noisy, policy)

    def known(trace: list[Entry]) -> list[tuple[Evidence | None, tuple[HostAction, ...]]]:
        return [
            (e, tuple(a for a in acts if not isinstance(a, Notify)))
            for _, e, acts in judged(trace)
            if e is not Evidence.UNKNOWN
        ]

    assert known(noisy_trace) == known(clean_trace)
    assert [p for _, _, p in proposals(noisy_trace)] == [p for _, _, p in proposals(clean_trace)]


@PROPERTY
@given(
    script=steps((*CHANGES, *NO_CHANGE, *UNKNOWNS, UNSTAT), max_size=16), extra=st.integers(0, 3)
)
def test_a_file_read_before_that_cannot_be_read_now_is_never_stale(
    script: list[tuple[str, float]], extra: int
) -> None:
    """A reading that lacks the busy disk the reference holds is unknown, or alive when another
    file changed: never stale, never a proposal, never the reference. (So is one lacking a
    requested file that was never read: `HostMachine`'s oracle.)"""
    trace = drive(script, policy_of(extra))
    lacking = [
        (before, record, actions)
        for (_, _, before, _), (_, event, record, actions) in itertools.pairwise(trace)
        if isinstance(event, ProbeFinished)
        and event.missing
        and fingerprint(DISK) in dict(before.ref_mtimes)
    ]
    for before, record, actions in lacking:
        assert record.last_evidence in (Evidence.UNKNOWN, Evidence.ALIVE)
        assert not any(isinstance(a, ProposeFence) for a in actions)
        if record.last_evidence is Evidence.UNKNOWN:
            assert (record.ref_at, record.ref_mtimes) == (before.ref_at, before.ref_mtimes)
            assert record.unknown_count == before.unknown_count + 1  # counted: alerts follow
    tally(f"readings lacking a file read before: {min(len(lacking), 3)}")


class HostMachine(RuleBasedStateMachine):
    """One host's record driven by random facts, file changes, readings, verdicts and
    redeliveries, checked against an oracle that restates the evidence rule."""

    @initialize(
        extra=st.integers(0, 3),
        alert_after=st.integers(1, 3),
        timeout_intervals=st.integers(1, 4),
        readable=st.booleans(),
        filer=offsets,
    )
    def setup(
        self, extra: int, alert_after: int, timeout_intervals: int, readable: bool, filer: float
    ) -> None:
        self.policy = Policy(
            check_interval=60.0,
            extra_checks=extra,
            unknown_alert_after=alert_after,
            probe_timeout=60.0 * timeout_intervals,
            judge_readable_only=readable,
            clock_skew_alert=30.0,
            suspect_alert_after=600.0,
            suspect_renotify=900.0,
            fencing_resend_after=300.0,
        )
        self.filer = filer
        self.record = HostRecord("h1")
        self.now = 1_000.0
        self.sent: list[HostEvent] = []
        self.files = Files()
        # the oracle's view of the open episode
        self.open_episode: int | None = None
        self.suspect_since = 0.0
        self.outstanding: RunProbe | None = None
        self.requested_at = 0.0
        self.ref: tuple[dict[str, float], dict[str, str]] | None = None
        self.ref_at: float | None = None
        self.run = 0  # stale checks in a row (unknowns neither count nor break it)
        self.unknowns = 0
        self.early = False
        self.proposal: ProposeFence | None = None
        self.judged_proposals: Counter[int] = Counter()  # proposals made by a stale check
        self.temporary_withholds: Counter[int] = Counter()
        self.skew_notices: Counter[int] = Counter()
        self.apply(HostDisconnected(at=self.now))  # most of the interest is in an episode

    # -- the one place events enter ------------------------------------------------------------

    def apply(self, event: HostEvent) -> None:
        before = self.record
        snapshot = before.to_dict()
        try:
            new, actions = step(before, event, self.policy)
        except IllegalTransition:
            assert before.to_dict() == snapshot
            self.check_raises_again(before, event)
            return
        assert step(before, event, self.policy) == (new, actions)  # deterministic
        out = self.outstanding
        if isinstance(event, Tick) and out is not None:
            if self.requested_at - event.at >= self.policy.probe_timeout:
                # a tick a whole timeout before the request (the worker's clock went back, or an
                # old tick read again): the request's age is measured again from this tick
                self.requested_at = event.at
            elif event.at - self.requested_at >= self.policy.probe_timeout:
                self.unknowns += 1  # lost: one unknown, and the next check may go out at once
                self.outstanding = None
        accepted = self.accepted(event)
        if accepted is not None:
            assert isinstance(event, ProbeFinished)
            assert (new.last_probe_at, new.last_check) == (event.at, event.check)
            assert new.last_evidence is accepted
        elif isinstance(event, ProbeFinished):
            assert new == before  # late, repeated or for an ended episode: ignored
        if isinstance(event, FenceApproved) and before.state is HostState.SUSPECT:
            assert new == before  # nothing proposed, or the host proved alive since
        if (
            isinstance(event, FenceWithheld)
            and before.state is HostState.FENCE_PROPOSED
            and event.episode == before.episode
        ):
            assert new.state is HostState.WITHHELD and new.withheld_reason is event.reason
            if event.reason in TEMPORARY:
                self.run = self.policy.extra_checks  # the next stale check proposes again
                self.temporary_withholds[event.episode] += 1
        if isinstance(event, FenceFinished) and event.refused:
            if (
                before.state in (HostState.FENCE_PROPOSED, HostState.FENCING)
                and event.episode == before.episode
            ):
                # nothing was done: checked again, the next stale check proposes again
                assert new.state is HostState.WITHHELD
                assert new.withheld_reason is WithheldReason.REFUSED
                self.run = self.policy.extra_checks
                self.temporary_withholds[event.episode] += 1
            else:
                assert new == before  # a refusal changes nothing anywhere else
        for action in actions:
            self.follow(action, event, accepted, before)
        self.record = new
        tally(f"reached {new.state.value}")
        if not probing(new):
            self.outstanding = None  # an answer now is late
        self.sent.append(event)

    def check_raises_again(self, before: HostRecord, event: HostEvent) -> None:
        try:
            step(before, event, self.policy)
        except IllegalTransition:
            return
        raise AssertionError("an illegal event was accepted on the second try")

    def accepted(self, event: HostEvent) -> Evidence | None:
        """The oracle's verdict when this reading answers the outstanding check, else None."""
        out = self.outstanding
        if not isinstance(event, ProbeFinished) or out is None:
            return None
        if (event.episode, event.check) != (out.episode, out.check):
            return None
        self.outstanding = None
        self.early = False
        verdict = self.oracle(event)
        if verdict is Evidence.UNKNOWN:
            self.unknowns += 0 if self.early else 1
            return verdict
        self.unknowns = 0
        if verdict is Evidence.STALE:
            self.run += 1
        elif verdict is Evidence.ALIVE:
            self.run = 0
        # every file keeps its last known value, also while a reading lacks it
        mtimes, beats = self.ref or ({}, {})
        self.ref = ({**mtimes, **dict(event.mtimes)}, {**beats, **dict(event.heartbeats)})
        self.ref_at = event.at
        return verdict

    def oracle(self, r: ProbeFinished) -> Evidence:
        """Issue 13's rule, restated: each clock compared only with itself."""
        if not r.complete or (r.unreadable and not self.policy.judge_readable_only):
            return Evidence.UNKNOWN
        if not r.mtimes and not r.heartbeats:
            return Evidence.UNKNOWN
        if r.live_signs:  # a direct sign of life (an RBD watch held by the host)
            return Evidence.ALIVE
        if self.ref is None or self.ref_at is None:
            return Evidence.BASELINE
        mtimes, beats = self.ref
        if any(mtimes.get(p) != m for p, m in r.mtimes):
            return Evidence.ALIVE
        if any(beats.get(p) != v for p, v in r.heartbeats):
            return Evidence.ALIVE
        if r.missing:
            return Evidence.UNKNOWN  # a requested file unreadable now: never "no change"
        if any(p in beats for p in r.unread_contents):
            return Evidence.UNKNOWN  # a heartbeat's content read before, unreadable now
        gap = self.requested_at - self.ref_at
        if gap < 0:
            return Evidence.BASELINE  # the worker's clock went back: a new reference
        if gap < max(self.policy.check_interval, r.min_gap):
            self.early = True  # too soon: not an interval between the two readings, and no
            return Evidence.UNKNOWN  # failure to gather evidence either (never counted)
        return Evidence.STALE

    def follow(
        self, action: HostAction, event: HostEvent, accepted: Evidence | None, before: HostRecord
    ) -> None:
        if isinstance(action, MarkSuspect):
            assert self.open_episode is None and isinstance(event, HostDisconnected)
            self.open_episode, self.suspect_since = action.episode, action.at
            self.files, self.ref, self.ref_at, self.run, self.unknowns = Files(), None, None, 0, 0
        elif isinstance(action, ClearSuspect):
            assert self.open_episode == action.episode
            self.open_episode, self.outstanding, self.proposal = None, None, None
        elif isinstance(action, RunProbe):
            assert action.episode == self.open_episode and isinstance(event, Tick)
            assert action.check == before.checks_requested + 1
            assert self.outstanding is None, "a second probe while one is outstanding"
            self.outstanding, self.requested_at = action, event.at
        elif isinstance(action, ProposeFence):
            self.check_proposal(action, event, accepted, before)
        elif action.kind is NoticeKind.CLOCK_SKEW:
            self.skew_notices[action.episode] += 1
            assert self.skew_notices[action.episode] == 1, "two clock_skew notices"
        elif action.kind is NoticeKind.CANNOT_VERIFY:
            assert self.unknowns == self.policy.unknown_alert_after
        elif action.kind is NoticeKind.SUSPECT_TOO_LONG:
            assert isinstance(event, Tick)
            assert before.state in (HostState.SUSPECT, HostState.FENCE_PROPOSED, HostState.WITHHELD)
        else:
            assert action.kind is NoticeKind.HOST_RECOVERED

    def check_proposal(
        self, p: ProposeFence, event: HostEvent, accepted: Evidence | None, before: HostRecord
    ) -> None:
        assert p.episode == self.open_episode
        assert p.decision_id == decision_id("h1", p.episode, self.suspect_since)
        if isinstance(event, Tick):
            # a re-send of the unanswered proposal: the very same one
            assert before.state in (HostState.FENCE_PROPOSED, HostState.FENCING)
            assert p == self.proposal
            return
        # only a stale check can complete the run: never an unknown, never a verdict
        assert isinstance(event, ProbeFinished) and accepted is Evidence.STALE
        assert self.run == 1 + self.policy.extra_checks == p.stale_checks
        self.judged_proposals[p.episode] += 1
        # one proposal per episode, and one more after each temporary withhold
        assert self.judged_proposals[p.episode] <= 1 + self.temporary_withholds[p.episode]
        self.proposal = p

    # -- rules ------------------------------------------------------------------------------------

    @rule(dt=st.sampled_from([0.0, 10.0, 60.0, 60.0, 61.0, 200.0]) | st.floats(0, 400))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.apply(Tick(at=self.now))

    @rule(
        kind=st.sampled_from(["down", "down", "down", "up", "maintenance", "maintenance_over"]),
        status=st.sampled_from([HostStatus.DISCONNECTED, HostStatus.ALERT, HostStatus.DOWN]),
    )
    def host_fact(self, kind: str, status: HostStatus) -> None:
        events: dict[str, HostEvent] = {
            "down": HostDisconnected(at=self.now, status=status),
            "up": HostCameBack(at=self.now),
            "maintenance": MaintenanceStarted(at=self.now),
            "maintenance_over": MaintenanceEnded(at=self.now),
        }
        self.apply(events[kind])

    @rule(kind=st.sampled_from([*CHANGES, "vanish"]))
    def files_change(self, kind: str) -> None:
        self.files.change(kind)

    @precondition(lambda self: self.outstanding is not None)
    @rule(
        kind=st.sampled_from(
            ["same", "same", "same", *CHANGES, *UNKNOWNS[:-1], UNSTAT, UNREAD, "skewed"]
        ),
        delay=st.floats(0, 30),
    )
    def answer(self, kind: str, delay: float) -> None:
        self.answer_with(kind, delay)

    @precondition(lambda self: self.open_episode is not None)
    @rule(kind=st.sampled_from(["same", "same", "same", *CHANGES, *UNKNOWNS, UNSTAT, UNREAD]))
    def check_cycle(self, kind: str) -> None:
        """One check interval passes and the probe it starts is answered: deep episodes fast."""
        self.now += self.policy.check_interval
        self.apply(Tick(at=self.now))
        if self.outstanding is not None and kind != "lost":
            self.answer_with(kind, 1.0)

    @precondition(lambda self: self.open_episode is not None)
    @rule(cycles=st.integers(1, 4))
    def quiet_cycles(self, cycles: int) -> None:
        """Checks that find nothing changed: the way to a proposal."""
        for _ in range(cycles):
            self.check_cycle("same")

    def answer_with(self, kind: str, delay: float) -> None:
        out = self.outstanding
        assert out is not None
        self.files.change(kind)
        at = self.now + delay
        if kind == "skewed":
            result = self.files.read(at, out.episode, out.check, filer=self.filer + 3 * DAY)
            result = replace(result, neighbour_offset=-45.0)
        else:
            result = reading_of(kind, self.files, at, out.episode, out.check, self.filer, 0)
        self.apply(result)

    @precondition(lambda self: self.outstanding is not None)
    @rule(
        mtimes=st.dictionaries(
            st.sampled_from([DISK, DISK2, HB]), st.sampled_from([T0, T0 + 1.5, T0 - 3 * DAY])
        ),
        beat=st.none() | st.sampled_from(["1\n", "2\n", "garbage"]),
        complete=st.booleans(),
        unreadable=st.integers(0, 2),
        live=st.booleans(),
        min_gap=st.sampled_from([0.0, 0.0, 90.0, 600.0]),
        delay=st.floats(0, 30),
        missing=st.lists(st.sampled_from([DISK, DISK2, HB, "/mnt/p1/vm9.qcow2"]), max_size=2),
        unread_contents=st.lists(st.sampled_from([HB, DISK, "/mnt/p1/hb9"]), max_size=1),
    )
    def answer_anything(
        self,
        mtimes: dict[str, float],
        beat: str | None,
        complete: bool,
        unreadable: int,
        live: bool,
        min_gap: float,
        delay: float,
        missing: list[str],
        unread_contents: list[str],
    ) -> None:
        out = self.outstanding
        assert out is not None
        self.apply(
            ProbeFinished(
                at=self.now + delay,
                episode=out.episode,
                check=out.check,
                mtimes=tuple(sorted(mtimes.items())),
                heartbeats=() if beat is None else ((HB, beat),),
                complete=complete,
                unreadable=unreadable,
                live_signs=("watcher of 10.0.0.11 on rbd/vol-1",) if live else (),
                min_gap=min_gap,
                missing=tuple(missing),
                unread_contents=tuple(unread_contents),
            )
        )

    @precondition(lambda self: self.proposal is not None)
    @rule(
        verdicts=st.lists(
            st.tuples(
                st.sampled_from(
                    ["approve", "withhold", "withhold", "success", "failure", "refused"]
                ),
                st.sampled_from([r for r in WithheldReason if r is not WithheldReason.REFUSED]),
            ),
            min_size=1,
            max_size=3,
        ),
        wait=st.sampled_from([0.0, 60.0, 300.0]),
    )
    def gate_or_actuator(self, verdicts: list[tuple[str, WithheldReason]], wait: float) -> None:
        """A few verdicts and outcomes for the proposal, in any order, then maybe a tick."""
        for verdict, reason in verdicts:
            p = self.proposal
            if p is None:
                return
            at, ep, did = self.now, p.episode, p.decision_id
            events: dict[str, HostEvent] = {
                "approve": FenceApproved(at=at, episode=ep, decision_id=did),
                "withhold": FenceWithheld(at=at, episode=ep, decision_id=did, reason=reason),
                "success": FenceFinished(at=at, episode=ep, decision_id=did, success=True),
                "failure": FenceFinished(at=at, episode=ep, decision_id=did, success=False),
                "refused": FenceFinished(
                    at=at, episode=ep, decision_id=did, success=False, refused=True
                ),
            }
            self.apply(events[verdict])
        if wait:
            self.now += wait
            self.apply(Tick(at=self.now))

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        results: list[HostEvent] = [e for e in self.sent if isinstance(e, ProbeFinished)]
        use_results = bool(results) and data.draw(st.booleans())
        self.apply(data.draw(st.sampled_from(results if use_results else self.sent)))

    @rule(
        kind=st.sampled_from(["future_episode", "zero_episode", "unrequested_check", "decision"]),
    )
    def illegal(self, kind: str) -> None:
        r = self.record
        if kind == "future_episode":
            event: HostEvent = FenceApproved(at=self.now, episode=r.episode + 1, decision_id="x")
        elif kind == "zero_episode":
            event = self.files.read(self.now, 0, 1)
        elif kind == "unrequested_check":
            event = self.files.read(self.now, max(r.episode, 1), r.checks_requested + 1)
        else:
            event = FenceFinished(
                at=self.now, episode=max(r.episode, 1), decision_id="not-ours", success=True
            )
        snapshot = r.to_dict()
        try:
            step(r, event, self.policy)
        except IllegalTransition:
            assert self.record is r and r.to_dict() == snapshot
            return
        # only an ended episode (or one with nothing proposed yet) may swallow these as late
        assert kind not in ("future_episode", "zero_episode")
        assert r.episode >= 1
        assert r.state in CLOSED or (kind == "decision" and r.decision_id is None)

    # -- invariants -------------------------------------------------------------------------------

    @invariant()
    def record_agrees_with_the_oracle(self) -> None:
        r = self.record
        needed = 1 + self.policy.extra_checks
        assert (self.open_episode is not None) == (r.state not in CLOSED)
        assert 0 <= r.stale_count <= needed
        assert r.last_check <= r.checks_requested
        if r.decision_id is not None:
            assert r.decision_id == decision_id("h1", r.episode, r.suspect_since or 0.0)
        if r.state not in CLOSED and r.state is not HostState.SUSPECT:
            assert r.decision_id is not None and self.judged_proposals[r.episode] >= 1
        if r.state is HostState.SUSPECT:
            assert r.stale_count < needed
        if r.state in CLOSED:
            return
        if r.state in (HostState.SUSPECT, HostState.FENCE_PROPOSED):
            assert r.stale_count == self.run
        assert r.unknown_count == self.unknowns or not probing(r)
        assert r.ref_at == self.ref_at
        if self.ref is not None:
            # the oracle keeps paths and contents; the record their fingerprints and tokens
            mtimes, beats = self.ref
            assert dict(r.ref_mtimes) == {fingerprint(p): m for p, m in mtimes.items()}
            assert dict(r.ref_heartbeats) == {
                fingerprint(p): heartbeat_token(c) for p, c in beats.items()
            }
        if probing(r):
            assert r.probe_outstanding == (self.outstanding is not None)
        assert r.skew_notified == (self.skew_notices[r.episode] == 1)


class GateMachine(RuleBasedStateMachine):
    """Three clusters sharing a global budget, under random requests, facts and redeliveries,
    and hand-overs of the gate to another process whose clock is off by hours (`hand_over`):
    `now` is the true time, the gate judges on its owner's clock (`gate_now`), every budget is
    checked in true time."""

    CLUSTERS = ("a", "b", "c")
    # Mostly both rows written; sometimes the worker dies between the two writes, or after
    # publishing the decision and before either ("both"): only the decision log holds it then.
    LOSE = st.sampled_from([None, None, "cluster", "global", "both"])

    @initialize(
        cap=st.integers(0, 3),
        global_cap=st.integers(0, 5),
        window=st.sampled_from([60.0, 600.0, 3600.0]),
        ratio=st.sampled_from([0.0, 0.5, 1.0]),
        first_clock=st.sampled_from([None, "g0"]),  # None: rows from before clocks had names
        quiet=st.sampled_from([0.0, 30.0]),
    )
    def setup(
        self,
        cap: int,
        global_cap: int,
        window: float,
        ratio: float,
        first_clock: str | None,
        quiet: float,
    ) -> None:
        policy = Policy(
            fence_cap=cap,
            global_cap=global_cap,
            fence_window=window,
            storm_ratio=ratio,
            startup_quiet=quiet,
        )
        self.ctx = GateContext(policy=policy, started_at=0.0, clock_id=first_clock)
        self.rows = {c: observe(ClusterGate(c), ClusterSized(4)) for c in self.CLUSTERS}
        self.glob = GlobalGate()
        self.now = 0.0  # the true time
        self.offset = 0.0  # the gate owner's clock minus the true time
        self.owners = 1
        self.n = 0
        self.requests: list[FenceRequest] = []
        self.first: dict[str, Verdict] = {}
        self.first_at: dict[str, float] = {}  # the true time of each id's first verdict
        self.judged: dict[str, list[Verdict]] = {}  # every verdict each id was judged to
        self.grants: list[tuple[str, float]] = []  # (cluster, true time) of every power-down
        self.lost: set[str] = set()  # decision ids whose cluster row write was lost
        self.log: list[Logged] = []  # fence-decisions: every published verdict

    @property
    def gate_now(self) -> float:
        return self.now + self.offset

    def judge(self, request: FenceRequest, lose: str | None = None) -> None:
        """Judge as the shell does (every row and the decision log taken over onto the gate's
        clock, the global row reconciled with them first); `lose` names the row whose write is
        lost (the worker died between the two writes), or "both" (it died after publishing the
        decision, before either)."""
        now, own = self.gate_now, self.ctx.clock_id
        window = self.ctx.policy.fence_window
        glob, rows, log = one_clock(self.glob, self.rows.values(), self.log, now, own)
        glob = reconcile(glob, rows, now, window, logged_grants(log, now, window))
        row = next(r for r in rows if r.cluster == request.cluster)
        result = decide(row, glob, request, self.ctx, now)
        assert decide(row, glob, request, self.ctx, now) == result  # deterministic
        row, glob, verdict = result
        v = verdict
        self.log.append(Logged(v.decision_id, v.host, v.cluster, v.action, v.approved, v.at, own))
        if lose in ("cluster", "both"):
            self.lost.add(request.decision_id)
        else:
            self.rows[request.cluster] = row
        if lose not in ("global", "both"):
            self.glob = glob
        assert verdict.approved == (verdict.reason is None) and verdict.at == now
        first = self.first.get(request.decision_id)
        since = self.now - self.first_at.get(request.decision_id, self.now)  # true time
        if verdict.repeated:
            if request.decision_id in self.lost:
                # Judged again after a verdict was lost with its row's write: the row still
                # holds an earlier verdict of the id, and an approval or a final withhold is
                # given again as such. It may be one the model saw leave the window (true
                # time): a stamp of another clock is aged as of the latest time that clock is
                # known to have reached, and the row that knew the latest (the shared one, taken
                # over since) may be gone, so it is aged less: held longer, never shorter (the
                # take-over's documented price).
                earlier = self.judged[v.decision_id]
                if verdict.approved:
                    assert any(f.approved for f in earlier)
                else:
                    assert verdict.reason not in TEMPORARY
                    assert verdict.reason in {f.reason for f in earlier}
            elif verdict.approved and (first is None or not first.approved or since >= window):
                # Its last verdict is gone from the window (or was a temporary withhold), but a
                # repeat of its approval is logged in it: the log keeps the fence counted from
                # that stamp (logged_grants), and the id is approved again, consuming nothing.
                assert any(d.decision_id == v.decision_id and d.approved for d in self.log[:-1])
            else:
                assert first is not None and (first.approved or first.reason not in TEMPORARY)
                assert verdict == replace(first, repeated=True, at=now)
            return
        assert (
            first is None
            or first.reason in TEMPORARY
            or since >= window
            # a verdict lost with its row is judged again, unless a grant still stands for it
            or (request.decision_id in self.lost and not first.action.powers_down)
            or (request.decision_id in self.lost and not first.approved)
        ), "a redelivery was judged again"
        self.first[request.decision_id] = verdict
        self.first_at[request.decision_id] = self.now
        self.judged.setdefault(request.decision_id, []).append(verdict)
        if verdict.approved and request.action.powers_down:
            self.grants.append((request.cluster, self.now))

    @rule(
        cluster=st.sampled_from(CLUSTERS),
        action=st.sampled_from(
            [FenceAction.STOP, FenceAction.REBOOT, FenceAction.NOTHING, FenceAction.BLINK]
        ),
        dt=st.floats(0, 400),
        skew=st.floats(-8000, 8000) | st.floats(-400, 400),
        lose=LOSE,
    )
    def request(
        self, cluster: str, action: FenceAction, dt: float, skew: float, lose: str | None
    ) -> None:
        self.now += dt
        self.n += 1
        # the proposing worker's clock is off by `skew`; the gate judges at its own clock
        r = FenceRequest(f"d{self.n}", f"h{self.n % 5}", cluster, action, self.now + skew)
        self.requests.append(r)
        self.judge(r, lose)

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), dt=st.floats(0, 100), lose=LOSE)
    def redeliver(self, data: st.DataObject, dt: float, lose: str | None) -> None:
        r = data.draw(st.sampled_from(self.requests))
        self.now += dt
        self.judge(replace(r, at=self.now), lose)

    @rule(
        down=st.floats(0, 4000),
        offset=st.floats(-8000, 8000) | st.floats(-60, 60),
        up=st.sampled_from([0.0, 1000.0]),
        take_over=st.booleans(),
        lost=st.sets(st.sampled_from(["*", *CLUSTERS])),
    )
    def hand_over(
        self, down: float, offset: float, up: float, take_over: bool, lost: set[str]
    ) -> None:
        """The gates partition moves to another process (a restart, a rebalance) after `down`
        seconds, whose clock is `offset` off the truth and which started `up` seconds ago; it
        may take every row over at once (the shell's take-over), some of those writes lost."""
        self.now += down
        self.offset = offset
        started = self.gate_now - up
        self.ctx = replace(self.ctx, clock_id=f"g{self.owners}", started_at=started)
        self.owners += 1
        if not take_over:
            return
        glob, rows, _ = one_clock(
            self.glob, self.rows.values(), (), self.gate_now, self.ctx.clock_id
        )
        self.glob = self.glob if "*" in lost else glob
        self.rows = {r.cluster: self.rows[r.cluster] if r.cluster in lost else r for r in rows}

    @rule(dt=st.floats(0, 400), after=st.sampled_from([0.0, 60.0]))
    def refresh(self, dt: float, after: float) -> None:
        """The owner writes its shared row's clock (the latest time its clock is known to have
        reached)."""
        self.now += dt
        self.glob = refreshed(self.glob, self.gate_now, self.ctx.clock_id, after) or self.glob

    @rule(
        cluster=st.sampled_from(CLUSTERS),
        host=st.sampled_from(["h0", "h1", "h2", "h3", "h4"]),
        suspect=st.booleans(),
    )
    def membership(self, cluster: str, host: str, suspect: bool) -> None:
        fact = HostSuspected(host) if suspect else HostCleared(host)
        self.rows[cluster] = observe(self.rows[cluster], fact)

    @rule(cluster=st.sampled_from(CLUSTERS), hosts=st.integers(0, 6))
    def sized(self, cluster: str, hosts: int) -> None:
        self.rows[cluster] = observe(self.rows[cluster], ClusterSized(hosts))

    @rule(cluster=st.none() | st.sampled_from(CLUSTERS), paused=st.booleans())
    def pause(self, cluster: str | None, paused: bool) -> None:
        if cluster is None:
            self.glob = pause_all(self.glob, paused)
        else:
            self.rows[cluster] = observe(self.rows[cluster], ClusterPaused(paused))

    @invariant()
    def budget_never_exceeded_in_any_window(self) -> None:
        policy = self.ctx.policy
        w = policy.fence_window
        times = [t for _, t in self.grants]
        assert times == sorted(times), "the gate clock went back"
        for _, t in self.grants:
            window = [(c, g) for c, g in self.grants if t - w < g <= t]
            assert len(window) <= policy.global_cap
            for cluster in self.CLUSTERS:
                assert sum(1 for c, _ in window if c == cluster) <= policy.fence_cap

    @invariant()
    def one_fence_is_one_grant_in_every_row(self) -> None:
        for grants in (self.glob.grants, *(r.grants for r in self.rows.values())):
            ids = [g.decision_id for g in grants]
            assert len(ids) == len(set(ids)), ids


TestHostMachine = HostMachine.TestCase
TestHostMachine.settings = settings(FAST, max_examples=500, stateful_step_count=50)
# CPU-bound: 187 s seen on a loaded CI run (about 15 s alone), against the default 300 s
TestHostMachine.pytestmark = [pytest.mark.timeout(600)]
TestGateMachine = GateMachine.TestCase
TestGateMachine.settings = FAST
