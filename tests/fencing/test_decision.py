"""Table-driven tests of the per-host core: every row is one event, the WHOLE record expected
after it, and the exact actions."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from fencing import diagram
from fencing.decision import (
    TRANSITIONS,
    DecisionMismatch,
    HostRecord,
    HostState,
    IllegalTransition,
    Trigger,
    UnknownCheck,
    UnknownEpisode,
    classify,
    decision_id,
    step,
)
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
from fencing.policy import Policy

POLICY = Policy(
    check_interval=60.0,
    extra_checks=2,
    heartbeat_max_age=61.0,
    unknown_alert_after=3,
    probe_timeout=180.0,
)
T0 = 1_000.0  # suspect time of episode 1
DID = decision_id("h1", 1, T0)

Row = tuple[HostEvent, HostRecord, tuple[HostAction, ...]]


def run(start: HostRecord, rows: list[Row], policy: Policy = POLICY) -> HostRecord:
    """Apply each row's event and assert the whole record and the actions after it."""
    record = start
    for number, (event, expected, actions) in enumerate(rows, 1):
        record, got = step(record, event, policy)
        assert record == expected, f"row {number}: {event}"
        assert got == actions, f"row {number}: {event}"
    return record


def stale(at: float, check: int, episode: int = 1) -> ProbeFinished:
    return ProbeFinished(
        at=at,
        episode=episode,
        evidence=Evidence.STALE,
        newest_write=T0 - 500,
        files_checked=4,
        neighbour="n2",
        check=check,
    )


def unknown(at: float, check: int, reason: str = "ssh refused") -> ProbeFinished:
    return ProbeFinished(at=at, episode=1, evidence=Evidence.UNKNOWN, check=check, reason=reason)


IDLE = HostRecord("h1")
SUSPECT = HostRecord("h1", state=HostState.SUSPECT, since=T0, episode=1, suspect_since=T0)


def requested(record: HostRecord, at: float) -> HostRecord:
    return replace(
        record,
        checks_requested=record.checks_requested + 1,
        probe_outstanding=True,
        last_request_at=at,
    )


def judged_stale(record: HostRecord, at: float, count: int) -> HostRecord:
    return replace(
        record,
        probe_outstanding=False,
        stale_count=count,
        unknown_count=0,
        last_evidence=Evidence.STALE,
        last_probe_at=at,
        newest_write=T0 - 500,
        heartbeat=None,
        files_checked=4,
        neighbour="n2",
        reason=None,
    )


def probe(check: int, episode: int = 1, since: float = T0) -> RunProbe:
    return RunProbe(episode=episode, suspect_since=since, check=check)


def to_proposal() -> tuple[HostRecord, list[Row]]:
    """The rows from Up to a fence proposal: three stale checks, one interval apart."""
    r1 = requested(SUSPECT, T0 + 60)
    s1 = judged_stale(r1, T0 + 70, 1)
    r2 = requested(s1, T0 + 120)
    s2 = judged_stale(r2, T0 + 130, 2)
    r3 = requested(s2, T0 + 180)
    s3 = judged_stale(r3, T0 + 190, 3)
    proposed = replace(s3, state=HostState.FENCE_PROPOSED, since=T0 + 190, decision_id=DID)
    rows: list[Row] = [
        (HostDisconnected(at=T0, status=HostStatus.ALERT), SUSPECT, (MarkSuspect(1, T0),)),
        (Tick(at=T0 + 30), SUSPECT, ()),  # the first check waits one interval
        (Tick(at=T0 + 60), r1, (probe(1),)),
        (Tick(at=T0 + 65), r1, ()),  # outstanding: no second probe
        (stale(T0 + 70, 1), s1, ()),
        (Tick(at=T0 + 100), s1, ()),  # interval counts from the last request
        (Tick(at=T0 + 120), r2, (probe(2),)),
        (stale(T0 + 130, 2), s2, ()),
        (Tick(at=T0 + 180), r3, (probe(3),)),
        (
            stale(T0 + 190, 3),
            proposed,
            (
                ProposeFence(
                    episode=1,
                    suspect_since=T0,
                    stale_checks=3,
                    newest_write=T0 - 500,
                    files_checked=4,
                    decision_id=DID,
                    neighbour="n2",
                ),
            ),
        ),
    ]
    return proposed, rows


def test_three_stale_checks_propose_one_fence_then_fenced_until_back_up() -> None:
    proposed, rows = to_proposal()
    fencing = replace(proposed, state=HostState.FENCING, since=T0 + 200)
    fenced = replace(fencing, state=HostState.FENCED, since=T0 + 260, power_state="off")
    back = replace(fenced, state=HostState.IDLE, since=T0 + 900)
    recovered = Notify(NoticeKind.HOST_RECOVERED, 1, (("ended_by", "up"), ("state", "fenced")))
    rows += [
        (Tick(at=T0 + 240), proposed, ()),  # no probes once proposed
        (stale(T0 + 241, 3), proposed, ()),  # redelivered last result: late
        (HostDisconnected(at=T0 + 242), proposed, ()),
        (FenceApproved(at=T0 + 200, episode=1, decision_id=DID), fencing, ()),
        (FenceApproved(at=T0 + 201, episode=1, decision_id=DID), fencing, ()),
        (
            FenceFinished(at=T0 + 260, episode=1, decision_id=DID, success=True, power_state="off"),
            fenced,
            (),
        ),
        (FenceFinished(at=T0 + 261, episode=1, decision_id=DID, success=True), fenced, ()),
        (FenceApproved(at=T0 + 262, episode=1, decision_id=DID), fenced, ()),
        (Tick(at=T0 + 600), fenced, ()),
        (MaintenanceEnded(at=T0 + 601), fenced, ()),
        (HostCameBack(at=T0 + 900), back, (ClearSuspect(1, T0 + 900), recovered)),
        (HostCameBack(at=T0 + 901), back, ()),
        (FenceFinished(at=T0 + 902, episode=1, decision_id=DID, success=True), back, ()),
        (stale(T0 + 903, 3), back, ()),
    ]
    run(IDLE, rows)


def test_next_disconnection_opens_a_new_episode_with_fresh_counts() -> None:
    proposed, rows = to_proposal()
    back = replace(proposed, state=HostState.IDLE, since=T0 + 500)
    t1 = T0 + 1000
    second = HostRecord("h1", state=HostState.SUSPECT, since=t1, episode=2, suspect_since=t1)
    recovered = Notify(
        NoticeKind.HOST_RECOVERED, 1, (("ended_by", "up"), ("state", "fence_proposed"))
    )
    rows += [
        (HostCameBack(at=T0 + 500), back, (ClearSuspect(1, T0 + 500), recovered)),
        (HostDisconnected(at=t1), second, (MarkSuspect(2, t1),)),
        # episode 1's verdict arrives after episode 2 began: late, ignored
        (FenceApproved(at=t1 + 1, episode=1, decision_id=DID), second, ()),
        (stale(t1 + 2, 3, episode=1), second, ()),
        (Tick(at=t1 + 60), requested(second, t1 + 60), (probe(1, 2, t1),)),
    ]
    run(IDLE, rows)


def test_a_disconnection_older_than_the_return_never_reopens_the_episode() -> None:
    proposed, rows = to_proposal()
    back = replace(proposed, state=HostState.IDLE, since=T0 + 500)
    recovered = Notify(
        NoticeKind.HOST_RECOVERED, 1, (("ended_by", "up"), ("state", "fence_proposed"))
    )
    t1 = T0 + 501
    second = HostRecord("h1", state=HostState.SUSPECT, since=t1, episode=2, suspect_since=t1)
    rows += [
        (HostCameBack(at=T0 + 500), back, (ClearSuspect(1, T0 + 500), recovered)),
        # a delayed poll (or the alert redelivered) from before the host came back: late
        (HostDisconnected(at=T0 + 10), back, ()),
        (HostDisconnected(at=T0 + 499.9), back, ()),
        # a disconnection after the return opens episode 2
        (HostDisconnected(at=t1), second, (MarkSuspect(2, t1),)),
    ]
    run(IDLE, rows)


def test_alive_resets_the_stale_run_and_fresh_writes_beat_a_stale_report() -> None:
    r1 = requested(SUSPECT, T0 + 60)
    s1 = judged_stale(r1, T0 + 61, 1)
    r2 = requested(s1, T0 + 121)
    # the probe said stale, but a disk was written after the suspect time: alive
    wrote = ProbeFinished(
        at=T0 + 122,
        episode=1,
        evidence=Evidence.STALE,
        newest_write=T0 + 5,
        files_checked=4,
        check=2,
    )
    a2 = replace(
        r2,
        probe_outstanding=False,
        stale_count=0,
        unknown_count=0,
        last_evidence=Evidence.ALIVE,
        last_probe_at=T0 + 122,
        newest_write=T0 + 5,
        files_checked=4,
        neighbour=None,
    )
    r3 = requested(a2, T0 + 182)
    s3 = judged_stale(r3, T0 + 183, 1)
    run(
        SUSPECT,
        [
            (Tick(at=T0 + 60), r1, (probe(1),)),
            (stale(T0 + 61, 1), s1, ()),
            (Tick(at=T0 + 121), r2, (probe(2),)),
            (wrote, a2, ()),
            (wrote, a2, ()),  # redelivered: late
            (Tick(at=T0 + 182), r3, (probe(3),)),
            (stale(T0 + 183, 3), s3, ()),
        ],
    )


@pytest.mark.parametrize(
    ("heartbeat_age", "evidence"),
    [(0.0, Evidence.ALIVE), (61.0, Evidence.ALIVE), (61.5, Evidence.STALE)],
)
def test_heartbeat_fresher_than_max_age_means_alive(
    heartbeat_age: float, evidence: Evidence
) -> None:
    r1 = requested(SUSPECT, T0 + 60)
    at = T0 + 70
    # a host without running VMs: the heartbeat file is the only file
    result = ProbeFinished(
        at=at, episode=1, evidence=Evidence.STALE, heartbeat=at - heartbeat_age, check=1
    )
    judged = replace(
        r1,
        probe_outstanding=False,
        stale_count=1 if evidence is Evidence.STALE else 0,
        last_evidence=evidence,
        last_probe_at=at,
        heartbeat=at - heartbeat_age,
    )
    run(r1, [(result, judged, ())])


def test_stale_with_no_files_and_no_heartbeat_is_unknown() -> None:
    r1 = requested(SUSPECT, T0 + 60)
    result = ProbeFinished(at=T0 + 70, episode=1, evidence=Evidence.STALE, check=1)
    judged = replace(
        r1,
        probe_outstanding=False,
        unknown_count=1,
        last_evidence=Evidence.UNKNOWN,
        last_probe_at=T0 + 70,
    )
    run(replace(r1, stale_count=2), [(result, replace(judged, stale_count=2), ())])


def test_unknown_never_counts_never_resets_and_alerts_once_per_run() -> None:
    policy = replace(POLICY, extra_checks=1)
    rec = requested(SUSPECT, T0 + 60)
    s1 = judged_stale(rec, T0 + 61, 1)
    rows: list[Row] = [(Tick(at=T0 + 60), rec, (probe(1),)), (stale(T0 + 61, 1), s1, ())]
    rec, at = s1, T0 + 61
    for n in range(1, 5):  # four unknowns in a row: the stale count stays 1, one alert
        at += 60
        rec = requested(rec, at)
        rows.append((Tick(at=at), rec, (probe(rec.checks_requested),)))
        rec = replace(
            rec,
            probe_outstanding=False,
            unknown_count=n,
            last_evidence=Evidence.UNKNOWN,
            last_probe_at=at + 1,
            newest_write=None,
            files_checked=0,
            neighbour=None,
            reason="ssh refused",
        )
        alert = Notify(
            NoticeKind.CANNOT_VERIFY,
            1,
            (("unknown_in_a_row", "3"), ("reason", "ssh refused"), ("neighbour", "none")),
        )
        rows.append((unknown(at + 1, rec.checks_requested), rec, (alert,) if n == 3 else ()))
    # the second stale result after the unknowns completes 1 + extra_checks: a proposal
    at += 60
    rec = requested(rec, at)
    rows.append((Tick(at=at), rec, (probe(rec.checks_requested),)))
    final = judged_stale(rec, at + 1, 2)
    final = replace(final, state=HostState.FENCE_PROPOSED, since=at + 1, decision_id=DID)
    proposal = ProposeFence(1, T0, 2, T0 - 500, 4, DID, "n2")
    rows.append((stale(at + 1, rec.checks_requested), final, (proposal,)))
    run(SUSPECT, rows, policy)


def test_unknown_alert_repeats_after_a_new_run_of_unknowns() -> None:
    policy = replace(POLICY, unknown_alert_after=1)
    r1 = requested(SUSPECT, T0 + 60)
    u1 = replace(
        r1,
        probe_outstanding=False,
        unknown_count=1,
        last_evidence=Evidence.UNKNOWN,
        last_probe_at=T0 + 61,
        reason="no neighbour",
    )
    alert = Notify(
        NoticeKind.CANNOT_VERIFY,
        1,
        (("unknown_in_a_row", "1"), ("reason", "no neighbour"), ("neighbour", "none")),
    )
    r2 = requested(u1, T0 + 121)
    a2 = replace(
        r2,
        probe_outstanding=False,
        unknown_count=0,
        last_evidence=Evidence.ALIVE,
        last_probe_at=T0 + 122,
        reason=None,
    )
    alive = ProbeFinished(at=T0 + 122, episode=1, evidence=Evidence.ALIVE, check=2)
    r3 = requested(a2, T0 + 182)
    u3 = replace(u1, checks_requested=3, last_request_at=T0 + 182, last_probe_at=T0 + 183)
    run(
        SUSPECT,
        [
            (Tick(at=T0 + 60), r1, (probe(1),)),
            (unknown(T0 + 61, 1, "no neighbour"), u1, (alert,)),
            (Tick(at=T0 + 121), r2, (probe(2),)),
            (alive, a2, ()),
            (Tick(at=T0 + 182), r3, (probe(3),)),
            (unknown(T0 + 183, 3, "no neighbour"), u3, (alert,)),
        ],
        policy,
    )


def test_lost_probe_counts_as_unknown_and_the_next_is_requested() -> None:
    policy = replace(POLICY, unknown_alert_after=1, probe_timeout=100.0)
    r1 = requested(SUSPECT, T0 + 60)
    lost = replace(
        r1,
        probe_outstanding=False,
        unknown_count=1,
        last_evidence=Evidence.UNKNOWN,
        last_probe_at=T0 + 160,
        reason="probe result lost",
    )
    r2 = requested(lost, T0 + 160)
    alert = Notify(
        NoticeKind.CANNOT_VERIFY,
        1,
        (("unknown_in_a_row", "1"), ("reason", "probe result lost"), ("neighbour", "none")),
    )
    run(
        SUSPECT,
        [
            (Tick(at=T0 + 60), r1, (probe(1),)),
            (Tick(at=T0 + 159), r1, ()),
            (Tick(at=T0 + 160), r2, (alert, probe(2))),
            (stale(T0 + 161, 1), r2, ()),  # the lost check's answer: late
        ],
        policy,
    )


def test_lost_probe_waits_for_the_interval_when_the_timeout_is_shorter() -> None:
    policy = replace(POLICY, probe_timeout=30.0)
    r1 = requested(SUSPECT, T0 + 60)
    lost = replace(
        r1,
        probe_outstanding=False,
        unknown_count=1,
        last_evidence=Evidence.UNKNOWN,
        last_probe_at=T0 + 90,
        reason="probe result lost",
    )
    run(
        SUSPECT,
        [
            (Tick(at=T0 + 60), r1, (probe(1),)),
            (Tick(at=T0 + 90), lost, ()),
            (Tick(at=T0 + 120), requested(lost, T0 + 120), (probe(2),)),
        ],
        policy,
    )


def test_no_extra_checks_means_the_first_stale_check_proposes() -> None:
    policy = replace(POLICY, extra_checks=0)
    r1 = requested(SUSPECT, T0 + 60)
    s1 = judged_stale(r1, T0 + 61, 1)
    proposed = replace(s1, state=HostState.FENCE_PROPOSED, since=T0 + 61, decision_id=DID)
    run(
        SUSPECT,
        [
            (Tick(at=T0 + 60), r1, (probe(1),)),
            (stale(T0 + 61, 1), proposed, (ProposeFence(1, T0, 1, T0 - 500, 4, DID, "n2"),)),
        ],
        policy,
    )


def test_repeated_disconnection_keeps_the_first_suspect_time() -> None:
    run(
        IDLE,
        [
            (HostDisconnected(at=T0), SUSPECT, (MarkSuspect(1, T0),)),
            (HostDisconnected(at=T0 + 5, status=HostStatus.DOWN), SUSPECT, ()),
            (HostDisconnected(at=T0 - 5), SUSPECT, ()),
            (MaintenanceEnded(at=T0 + 6), SUSPECT, ()),
        ],
    )


def test_host_back_mid_probe_ends_the_episode_and_the_answer_is_ignored() -> None:
    r1 = requested(SUSPECT, T0 + 60)
    back = replace(r1, state=HostState.IDLE, since=T0 + 65, probe_outstanding=False)
    recovered = Notify(NoticeKind.HOST_RECOVERED, 1, (("ended_by", "up"), ("state", "suspect")))
    run(
        SUSPECT,
        [
            (Tick(at=T0 + 60), r1, (probe(1),)),
            (HostCameBack(at=T0 + 65), back, (ClearSuspect(1, T0 + 65), recovered)),
            (stale(T0 + 70, 1), back, ()),
            (Tick(at=T0 + 200), back, ()),
            (MaintenanceEnded(at=T0 + 201), back, ()),
        ],
    )


def test_maintenance_ends_the_episode_and_ignores_disconnections_until_it_ends() -> None:
    maint = replace(SUSPECT, state=HostState.MAINTENANCE, since=T0 + 10)
    ended = Notify(
        NoticeKind.HOST_RECOVERED, 1, (("ended_by", "maintenance"), ("state", "suspect"))
    )
    idle = replace(maint, state=HostState.IDLE, since=T0 + 50)
    in_maint = replace(idle, state=HostState.MAINTENANCE, since=T0 + 60)
    t2 = T0 + 100
    second = HostRecord("h1", state=HostState.SUSPECT, since=t2, episode=2, suspect_since=t2)
    run(
        SUSPECT,
        [
            (MaintenanceStarted(at=T0 + 10), maint, (ClearSuspect(1, T0 + 10), ended)),
            (MaintenanceStarted(at=T0 + 11), maint, ()),
            (HostDisconnected(at=T0 + 12), maint, ()),
            (HostCameBack(at=T0 + 13), maint, ()),
            (Tick(at=T0 + 14), maint, ()),
            (MaintenanceEnded(at=T0 + 50), idle, ()),
            (MaintenanceEnded(at=T0 + 51), idle, ()),
            (MaintenanceStarted(at=T0 + 60), in_maint, ()),  # from Up: no episode, no notice
            (
                MaintenanceEnded(at=T0 + 70),
                replace(in_maint, state=HostState.IDLE, since=T0 + 70),
                (),
            ),
            (HostDisconnected(at=t2), second, (MarkSuspect(2, t2),)),
        ],
    )


def test_withheld_is_final_for_the_episode() -> None:
    proposed, rows = to_proposal()
    withheld = replace(
        proposed,
        state=HostState.WITHHELD,
        since=T0 + 200,
        withheld_reason=WithheldReason.STORM_GUARD,
    )
    verdict = FenceWithheld(
        at=T0 + 200, episode=1, decision_id=DID, reason=WithheldReason.STORM_GUARD
    )
    rows += [
        (verdict, withheld, ()),
        (verdict, withheld, ()),
        (Tick(at=T0 + 400), withheld, ()),
        (HostDisconnected(at=T0 + 401), withheld, ()),
    ]
    record = run(IDLE, rows)
    for late in (
        FenceApproved(at=T0 + 402, episode=1, decision_id=DID),
        FenceFinished(at=T0 + 402, episode=1, decision_id=DID, success=True),
        FenceFinished(at=T0 + 402, episode=1, decision_id=DID, success=False),
    ):
        with pytest.raises(IllegalTransition):
            step(record, late, POLICY)


def test_failed_fence_is_not_proposed_again_and_a_retried_success_fences() -> None:
    proposed, rows = to_proposal()
    fencing = replace(proposed, state=HostState.FENCING, since=T0 + 200)
    failed = replace(
        fencing, state=HostState.FAILED, since=T0 + 300, power_state="on", error="bmc timeout"
    )
    fenced = replace(failed, state=HostState.FENCED, since=T0 + 400, power_state="off", error=None)
    fail = FenceFinished(
        at=T0 + 300,
        episode=1,
        decision_id=DID,
        success=False,
        power_state="on",
        error="bmc timeout",
    )
    rows += [
        (FenceApproved(at=T0 + 200, episode=1, decision_id=DID), fencing, ()),
        (fail, failed, ()),
        (fail, failed, ()),
        (Tick(at=T0 + 360), failed, ()),
        (FenceApproved(at=T0 + 361, episode=1, decision_id=DID), failed, ()),
        (
            FenceFinished(at=T0 + 400, episode=1, decision_id=DID, success=True, power_state="off"),
            fenced,
            (),
        ),
    ]
    record = run(IDLE, rows)
    with pytest.raises(IllegalTransition):
        step(record, fail, POLICY)
    with pytest.raises(IllegalTransition):
        step(
            record,
            FenceWithheld(at=T0, episode=1, decision_id=DID, reason=WithheldReason.PAUSED),
            POLICY,
        )


def test_an_outcome_may_overtake_its_approval() -> None:
    proposed, rows = to_proposal()
    failed = replace(proposed, state=HostState.FAILED, since=T0 + 210, error="no route")
    rows += [
        (
            FenceFinished(at=T0 + 210, episode=1, decision_id=DID, success=False, error="no route"),
            failed,
            (),
        ),
        (FenceApproved(at=T0 + 211, episode=1, decision_id=DID), failed, ()),
    ]
    run(IDLE, rows)
    fenced = replace(proposed, state=HostState.FENCED, since=T0 + 210)
    ok = FenceFinished(at=T0 + 210, episode=1, decision_id=DID, success=True)
    assert step(proposed, ok, POLICY) == (fenced, ())


@pytest.mark.parametrize(
    "event",
    [
        ProbeFinished(at=T0, episode=0, evidence=Evidence.STALE, check=1),
        ProbeFinished(at=T0, episode=2, evidence=Evidence.STALE, check=1),
        FenceApproved(at=T0, episode=2, decision_id=DID),
        FenceFinished(at=T0, episode=0, decision_id=DID, success=True),
    ],
)
def test_an_episode_that_never_started_is_illegal(event: HostEvent) -> None:
    record = requested(SUSPECT, T0 + 60)
    with pytest.raises(UnknownEpisode):
        step(record, event, POLICY)
    with pytest.raises(UnknownEpisode):
        step(IDLE, event, POLICY)


@pytest.mark.parametrize("check", [0, 2, 7])
def test_a_check_that_was_never_requested_is_illegal(check: int) -> None:
    record = requested(SUSPECT, T0 + 60)
    with pytest.raises(UnknownCheck):
        step(record, stale(T0 + 61, check), POLICY)


@pytest.mark.parametrize(
    "event",
    [
        FenceApproved(at=T0, episode=1, decision_id="h1/1/999"),
        FenceWithheld(at=T0, episode=1, decision_id="other", reason=WithheldReason.PAUSED),
        FenceFinished(at=T0, episode=1, decision_id="other", success=True),
    ],
)
def test_a_verdict_for_another_decision_is_illegal(event: HostEvent) -> None:
    proposed, _ = to_proposal()
    with pytest.raises(DecisionMismatch):
        step(proposed, event, POLICY)


@pytest.mark.parametrize(
    "event",
    [
        FenceApproved(at=T0, episode=1, decision_id=DID),
        FenceWithheld(at=T0, episode=1, decision_id=DID, reason=WithheldReason.PAUSED),
        FenceFinished(at=T0, episode=1, decision_id=DID, success=True),
        FenceFinished(at=T0, episode=1, decision_id=DID, success=False),
    ],
)
def test_a_verdict_before_any_proposal_is_illegal_and_changes_nothing(event: HostEvent) -> None:
    record = requested(SUSPECT, T0 + 60)
    snapshot = record.to_dict()
    with pytest.raises(IllegalTransition, match="not allowed in state suspect"):
        step(record, event, POLICY)
    assert record.to_dict() == snapshot


def test_results_of_an_ended_episode_are_late_in_every_closed_state() -> None:
    proposed, _ = to_proposal()
    for state in (HostState.IDLE, HostState.MAINTENANCE):
        closed = replace(proposed, state=state)
        for event in (
            stale(T0 + 500, 3),
            stale(T0 + 500, 99),  # even an unrequested check: the episode is over
            FenceApproved(at=T0 + 500, episode=1, decision_id=DID),
            FenceWithheld(at=T0, episode=1, decision_id="x", reason=WithheldReason.PAUSED),
        ):
            assert classify(closed, event, POLICY) is Trigger.LATE
            assert step(closed, event, POLICY) == (closed, ())


def test_every_state_has_a_row_and_every_target_is_a_state() -> None:
    assert set(TRANSITIONS) == set(HostState)
    for row in TRANSITIONS.values():
        for targets in row.values():
            assert targets and set(targets) <= set(HostState)


def test_record_round_trips_through_plain_data() -> None:
    proposed, _ = to_proposal()
    withheld = replace(proposed, withheld_reason=WithheldReason.CAP_REACHED)
    data = withheld.to_dict()
    assert data["state"] == "fence_proposed" and data["last_evidence"] == "stale"
    assert HostRecord.from_dict({**data, "added_later": 1}) == withheld
    assert HostRecord.from_dict({"host": "h9"}) == HostRecord("h9")


def test_committed_state_diagram_is_generated_from_the_table() -> None:
    page = Path(__file__).resolve().parents[2] / "docs" / "state-diagram.md"
    assert page.read_text() == diagram.page(), "run: python -m fencing.diagram > " + str(page)
    for state in HostState:
        assert state.name in diagram.mermaid()
    assert "SUSPECT --> FENCE_PROPOSED : probe_stale" in diagram.mermaid()


def test_diagram_module_prints_the_page(capsys: pytest.CaptureFixture[str]) -> None:
    diagram.main()
    assert capsys.readouterr().out == diagram.page()
