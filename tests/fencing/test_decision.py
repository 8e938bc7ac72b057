"""Table-driven tests of the per-host core: every row is one event, the WHOLE record expected
after it, and the exact actions."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

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
    as_reference,
    classify,
    decision_id,
    fingerprint,
    heartbeat_token,
    judge,
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
    unknown_alert_after=3,
    probe_timeout=180.0,
    judge_readable_only=False,
    clock_skew_alert=30.0,
    suspect_alert_after=1800.0,
    suspect_renotify=3600.0,
    fencing_resend_after=900.0,
)
T0 = 1_000.0  # CloudStack's suspect time of episode 1 (also the worker clock's origin here)
DID = decision_id("h1", 1, T0)

DISK = "/mnt/p1/vm1.qcow2"
DISK2 = "/mnt/p1/vm2.qcow2"
HB = "/mnt/p1/KVMHA/hb-10.0.0.11"
# The filer's clock: deliberately far from the worker's (a filer with a wrong clock).
OLD: tuple[tuple[str, float], ...] = ((DISK, T0 - 500), (HB, T0 - 400))
BEAT: tuple[tuple[str, str], ...] = ((HB, "600"),)

Row = tuple[HostEvent, HostRecord, tuple[HostAction, ...]]


def run(start: HostRecord, rows: list[Row], policy: Policy = POLICY) -> HostRecord:
    """Apply each row's event and assert the whole record and the actions after it."""
    record = start
    for number, (event, expected, actions) in enumerate(rows, 1):
        record, got = step(record, event, policy)
        assert record == expected, f"row {number}: {event}"
        assert got == actions, f"row {number}: {event}"
    return record


def reading(
    at: float,
    check: int,
    mtimes: tuple[tuple[str, float], ...] = OLD,
    heartbeats: tuple[tuple[str, str], ...] = BEAT,
    *,
    episode: int = 1,
    complete: bool = True,
    unreadable: int = 0,
    reason: str | None = None,
    neighbour_offset: float | None = None,
    filer_offset: float | None = None,
    missing: tuple[str, ...] = (),
    unread_contents: tuple[str, ...] = (),
) -> ProbeFinished:
    """A probe's reading of h1's files, arrived at `at` (worker clock); `missing` are the
    requested files it could not read."""
    return ProbeFinished(
        at=at,
        episode=episode,
        check=check,
        mtimes=mtimes,
        heartbeats=heartbeats,
        complete=complete,
        files_wanted=len(mtimes),
        neighbour="n2",
        unreadable=unreadable,
        reason=reason,
        neighbour_offset=neighbour_offset,
        filer_offset=filer_offset,
        missing=missing,
        unread_contents=unread_contents,
    )


def failed(at: float, check: int, reason: str = "ssh refused", episode: int = 1) -> ProbeFinished:
    """A probe that could read nothing."""
    return ProbeFinished(at=at, episode=episode, check=check, reason=reason)


IDLE = HostRecord("h1")
SUSPECT = HostRecord("h1", state=HostState.SUSPECT, since=T0, episode=1, suspect_since=T0)


def requested(record: HostRecord, at: float) -> HostRecord:
    return replace(
        record,
        checks_requested=record.checks_requested + 1,
        probe_outstanding=True,
        last_request_at=at,
    )


def judged(
    record: HostRecord,
    r: ProbeFinished,
    evidence: Evidence,
    reason: str | None = None,
    **changes: Any,
) -> HostRecord:
    """`record` once the core judged reading `r` as `evidence` (counts and state in changes)."""
    beats = dict(r.heartbeats)
    new = replace(
        record,
        probe_outstanding=False,
        last_result_at=r.at,
        last_check=r.check,
        last_evidence=evidence,
        last_probe_at=r.at,
        newest_write=max((m for p, m in r.mtimes if p not in beats), default=None),
        files_checked=len(r.mtimes),
        unreadable=r.unreadable,
        neighbour=r.neighbour,
        reason=reason,
        neighbour_offset=r.neighbour_offset,
        filer_offset=r.filer_offset,
        **changes,
    )
    if evidence is Evidence.UNKNOWN:
        return new
    # a judged complete reading is the reference for the next check; a file it lacks keeps
    # its last known value (a file is only ever compared with itself)
    return replace(
        new,
        ref_at=r.at,
        ref_mtimes=tuple(
            sorted({**dict(record.ref_mtimes), **{fingerprint(p): m for p, m in r.mtimes}}.items())
        ),
        ref_heartbeats=tuple(
            sorted(
                {
                    **dict(record.ref_heartbeats),
                    **{fingerprint(p): heartbeat_token(c) for p, c in r.heartbeats},
                }.items()
            )
        ),
    )


def probe(check: int, episode: int = 1, since: float = T0) -> RunProbe:
    return RunProbe(episode=episode, suspect_since=since, check=check)


PROPOSAL = ProposeFence(
    episode=1,
    suspect_since=T0,
    stale_checks=3,
    newest_write=T0 - 500,
    files_checked=2,
    decision_id=DID,
    neighbour="n2",
)


def recovered(state: str, ended_by: str = "up", episode: int = 1) -> Notify:
    return Notify(NoticeKind.HOST_RECOVERED, episode, (("ended_by", ended_by), ("state", state)))


def cannot_verify(n: int, reason: str, neighbour: str = "none") -> Notify:
    details = (("unknown_in_a_row", str(n)), ("reason", reason), ("neighbour", neighbour))
    return Notify(NoticeKind.CANNOT_VERIFY, 1, details)


def too_long(suspect_for: float, state: str, reason: str) -> Notify:
    details = (("suspect_for", f"{suspect_for:.0f}"), ("state", state), ("reason", reason))
    return Notify(NoticeKind.SUSPECT_TOO_LONG, 1, details)


def to_baseline() -> tuple[HostRecord, list[Row]]:
    """From Up to the baseline: the first tick requests check 1 at once."""
    opened = replace(SUSPECT, opened_at=T0 + 5)
    r1 = requested(opened, T0 + 5)
    b1 = judged(r1, reading(T0 + 10, 1), Evidence.BASELINE)
    rows: list[Row] = [
        (HostDisconnected(at=T0, status=HostStatus.ALERT), SUSPECT, (MarkSuspect(1, T0),)),
        (Tick(at=T0 + 5), r1, (probe(1),)),  # the baseline: no interval wait
        (Tick(at=T0 + 6), r1, ()),  # outstanding: no second probe
        (reading(T0 + 10, 1), b1, ()),
    ]
    return b1, rows


def to_proposal() -> tuple[HostRecord, list[Row]]:
    """From Up to a fence proposal: the baseline, then three stale checks one interval apart."""
    b1, rows = to_baseline()
    r2 = requested(b1, T0 + 70)
    s2 = judged(r2, reading(T0 + 75, 2), Evidence.STALE, stale_count=1)
    r3 = requested(s2, T0 + 135)
    s3 = judged(r3, reading(T0 + 140, 3), Evidence.STALE, stale_count=2)
    r4 = requested(s3, T0 + 200)
    s4 = judged(r4, reading(T0 + 205, 4), Evidence.STALE, stale_count=3)
    proposed = replace(
        s4, state=HostState.FENCE_PROPOSED, since=T0 + 205, decision_id=DID, sent_at=T0 + 205
    )
    rows += [
        (Tick(at=T0 + 69), b1, ()),  # 59 s after the baseline arrived: not yet
        (Tick(at=T0 + 70), r2, (probe(2),)),
        (reading(T0 + 75, 2), s2, ()),
        (Tick(at=T0 + 134), s2, ()),  # the interval counts from the last result's arrival
        (Tick(at=T0 + 135), r3, (probe(3),)),
        (reading(T0 + 140, 3), s3, ()),
        (Tick(at=T0 + 200), r4, (probe(4),)),
        (reading(T0 + 205, 4), proposed, (PROPOSAL,)),
    ]
    return proposed, rows


def test_baseline_then_three_stale_checks_propose_one_fence_then_fenced_until_back_up() -> None:
    proposed, rows = to_proposal()
    resent = replace(proposed, sent_at=T0 + 265)
    fencing = replace(resent, state=HostState.FENCING, since=T0 + 270)
    fencing2 = replace(fencing, sent_at=T0 + 1165)
    fenced = replace(fencing2, state=HostState.FENCED, since=T0 + 1200, power_state="off")
    back = replace(fenced, state=HostState.IDLE, since=T0 + 3000)
    rows += [
        (Tick(at=T0 + 264), proposed, ()),  # no probes once proposed, no re-send yet
        (reading(T0 + 264.5, 4), proposed, ()),  # redelivered last result: late
        (HostDisconnected(at=T0 + 264.6), proposed, ()),
        (Tick(at=T0 + 265), resent, (PROPOSAL,)),  # unanswered for an interval: same proposal
        (FenceApproved(at=T0 + 270, episode=1, decision_id=DID), fencing, ()),
        (FenceApproved(at=T0 + 271, episode=1, decision_id=DID), fencing, ()),
        (FenceWithheld(T0 + 272, 1, DID, WithheldReason.PAUSED), fencing, ()),
        (Tick(at=T0 + 1164), fencing, ()),
        (Tick(at=T0 + 1165), fencing2, (PROPOSAL,)),  # no outcome for fencing_resend_after
        (
            FenceFinished(
                at=T0 + 1200, episode=1, decision_id=DID, success=True, power_state="off"
            ),
            fenced,
            (),
        ),
        (FenceFinished(at=T0 + 1201, episode=1, decision_id=DID, success=True), fenced, ()),
        (FenceFinished(at=T0 + 1202, episode=1, decision_id=DID, success=False), fenced, ()),
        (FenceApproved(at=T0 + 1203, episode=1, decision_id=DID), fenced, ()),
        (FenceWithheld(T0 + 1204, 1, DID, WithheldReason.PAUSED), fenced, ()),
        (Tick(at=T0 + 2900), fenced, ()),  # fenced: no probe, no re-send, no alert
        (MaintenanceEnded(at=T0 + 2901), fenced, ()),
        (HostCameBack(at=T0 + 3000), back, (ClearSuspect(1, T0 + 3000), recovered("fenced"))),
        (HostCameBack(at=T0 + 3001), back, ()),
        (FenceFinished(at=T0 + 3002, episode=1, decision_id=DID, success=True), back, ()),
        (reading(T0 + 3003, 4), back, ()),
        (Tick(at=T0 + 9000), back, ()),
    ]
    run(IDLE, rows)


def test_next_disconnection_opens_a_new_episode_with_fresh_counts() -> None:
    proposed, rows = to_proposal()
    back = replace(proposed, state=HostState.IDLE, since=T0 + 500)
    t1 = T0 + 1000
    second = HostRecord("h1", state=HostState.SUSPECT, since=t1, episode=2, suspect_since=t1)
    opened = requested(replace(second, opened_at=t1 + 3), t1 + 3)
    rows += [
        (HostCameBack(at=T0 + 500), back, (ClearSuspect(1, T0 + 500), recovered("fence_proposed"))),
        (HostDisconnected(at=t1), second, (MarkSuspect(2, t1),)),
        # episode 1's verdict and reading arrive after episode 2 began: late, ignored
        (FenceApproved(at=t1 + 1, episode=1, decision_id=DID), second, ()),
        (reading(t1 + 2, 4, episode=1), second, ()),
        (Tick(at=t1 + 3), opened, (probe(1, 2, t1),)),
        # episode 2's baseline is its own: nothing is compared with episode 1's files
        (
            reading(t1 + 4, 1, episode=2),
            judged(opened, reading(t1 + 4, 1, episode=2), Evidence.BASELINE),
            (),
        ),
    ]
    run(IDLE, rows)


def test_a_disconnection_older_than_the_return_never_reopens_the_episode() -> None:
    proposed, rows = to_proposal()
    back = replace(proposed, state=HostState.IDLE, since=T0 + 500)
    t1 = T0 + 501
    second = HostRecord("h1", state=HostState.SUSPECT, since=t1, episode=2, suspect_since=t1)
    rows += [
        (HostCameBack(at=T0 + 500), back, (ClearSuspect(1, T0 + 500), recovered("fence_proposed"))),
        # a delayed poll (or the alert redelivered) from before the host came back: late
        (HostDisconnected(at=T0 + 10), back, ()),
        (HostDisconnected(at=T0 + 499.9), back, ()),
        # a disconnection after the return opens episode 2
        (HostDisconnected(at=t1), second, (MarkSuspect(2, t1),)),
    ]
    run(IDLE, rows)


# Readings that differ from the baseline (OLD, BEAT), each in one way, and why it is alive.
WRITTEN = ((DISK, T0 - 499), (HB, T0 - 400))
CHANGES = [
    pytest.param(WRITTEN, BEAT, f"{DISK} changed", id="disk-written"),
    # a filer whose clock was stepped back: the mtime moved, that is all that counts
    pytest.param(((DISK, T0 - 9000), (HB, T0 - 400)), BEAT, f"{DISK} changed", id="disk-back"),
    pytest.param(((DISK, T0 - 500), (HB, T0 - 399)), BEAT, f"{HB} changed", id="hb-touched"),
    pytest.param(
        ((DISK, T0 - 500), (DISK2, T0 - 3000), (HB, T0 - 400)),
        BEAT,
        f"{DISK2} appeared",
        id="disk-appeared",
    ),
    # the heartbeat's content moved while its mtime did not (the host's clock, not the filer's)
    pytest.param(OLD, ((HB, "601"),), f"{HB} changed", id="beat-content"),
]


@pytest.mark.parametrize(("mtimes", "heartbeats", "why"), CHANGES)
def test_any_change_since_the_previous_reading_is_alive_and_resets_the_run(
    mtimes: tuple[tuple[str, float], ...], heartbeats: tuple[tuple[str, str], ...], why: str
) -> None:
    b1, rows = to_baseline()
    r2 = requested(b1, T0 + 70)
    s2 = judged(r2, reading(T0 + 75, 2), Evidence.STALE, stale_count=1)
    r3 = requested(s2, T0 + 135)
    s3 = judged(r3, reading(T0 + 140, 3), Evidence.STALE, stale_count=2)
    r4 = requested(s3, T0 + 200)
    changed = reading(T0 + 205, 4, mtimes, heartbeats)
    a4 = judged(r4, changed, Evidence.ALIVE, why, stale_count=0)
    r5 = requested(a4, T0 + 265)
    # the changed reading is the new reference: the same files again are stale, one of three
    s5 = judged(r5, reading(T0 + 270, 5, mtimes, heartbeats), Evidence.STALE, stale_count=1)
    rows += [
        (Tick(at=T0 + 70), r2, (probe(2),)),
        (reading(T0 + 75, 2), s2, ()),
        (Tick(at=T0 + 135), r3, (probe(3),)),
        (reading(T0 + 140, 3), s3, ()),
        (Tick(at=T0 + 200), r4, (probe(4),)),
        (changed, a4, ()),
        (changed, a4, ()),  # redelivered: late
        (Tick(at=T0 + 265), r5, (probe(5),)),
        (reading(T0 + 270, 5, mtimes, heartbeats), s5, ()),
    ]
    run(IDLE, rows)


def test_a_disk_that_left_the_host_is_no_change() -> None:
    """A VM CloudStack already restarted elsewhere leaves the file list: not a sign of life."""
    two = ((DISK, T0 - 500), (DISK2, T0 - 300), (HB, T0 - 400))
    r1 = requested(replace(SUSPECT, opened_at=T0), T0)
    b1 = judged(r1, reading(T0 + 1, 1, two), Evidence.BASELINE)
    r2 = requested(b1, T0 + 61)
    s2 = judged(r2, reading(T0 + 62, 2), Evidence.STALE, stale_count=1)
    run(
        SUSPECT,
        [
            (Tick(at=T0), r1, (probe(1),)),
            (reading(T0 + 1, 1, two), b1, ()),
            (Tick(at=T0 + 61), r2, (probe(2),)),
            (reading(T0 + 62, 2), s2, ()),
        ],
    )
    assert s2.newest_write == T0 - 500 and s2.files_checked == 2


def test_a_file_missing_from_one_reading_and_back_unchanged_is_no_change() -> None:
    """The probe cannot stat a file it read before (ESTALE, EIO) and lists it as missing: that
    reading is unknown (it neither counts nor breaks the stale run, and never becomes the
    reference). Back with the same mtime, the file did not change: no sign of life, so a flaky
    file never resets the stale run and a dead host is still fenced."""
    two = ((DISK, T0 - 500), (DISK2, T0 - 300), (HB, T0 - 400))
    policy = replace(POLICY, extra_checks=1)
    why = f"1 of the files read before could not be read now (gone, or their stat failed): {DISK2}"
    r1 = requested(replace(SUSPECT, opened_at=T0), T0)
    b1 = judged(r1, reading(T0 + 1, 1, two), Evidence.BASELINE)
    r2 = requested(b1, T0 + 61)
    flaky = reading(T0 + 62, 2, missing=(DISK2,))
    u2 = judged(r2, flaky, Evidence.UNKNOWN, why, unknown_count=1)
    assert dict(u2.ref_mtimes)[fingerprint(DISK2)] == T0 - 300  # remembered while missing
    r3 = requested(u2, T0 + 122)
    s3 = judged(r3, reading(T0 + 123, 3, two), Evidence.STALE, stale_count=1, unknown_count=0)
    r4 = requested(s3, T0 + 183)
    s4 = judged(r4, reading(T0 + 184, 4, two), Evidence.STALE, stale_count=2)
    proposed = replace(
        s4, state=HostState.FENCE_PROPOSED, since=T0 + 184, decision_id=DID, sent_at=T0 + 184
    )
    run(
        SUSPECT,
        [
            (Tick(at=T0), r1, (probe(1),)),
            (reading(T0 + 1, 1, two), b1, ()),
            (Tick(at=T0 + 61), r2, (probe(2),)),
            (flaky, u2, ()),
            (Tick(at=T0 + 122), r3, (probe(3),)),
            (reading(T0 + 123, 3, two), s3, ()),
            (Tick(at=T0 + 183), r4, (probe(4),)),
            (
                reading(T0 + 184, 4, two),
                proposed,
                (replace(PROPOSAL, stale_checks=2, newest_write=T0 - 300, files_checked=3),),
            ),
        ],
        policy,
    )
    # back *changed* while it was missing: that is a change
    moved = ((DISK, T0 - 500), (DISK2, T0 - 299), (HB, T0 - 400))
    alive, _ = step(r3, reading(T0 + 123, 3, moved), policy)
    assert (alive.last_evidence, alive.reason) == (Evidence.ALIVE, f"{DISK2} changed")


BUSY_IDLE = ((DISK, T0 - 500), (DISK2, T0 - 300), (HB, T0 - 400))
"""A host's files: DISK the busy VM's disk, DISK2 an idle VM's, HB its heartbeat file."""


def _busy_and_idle() -> HostRecord:
    """h1 suspect, baseline of BUSY_IDLE read at T0 + 5, check 2 requested at T0 + 70."""
    r1 = requested(replace(SUSPECT, opened_at=T0 + 1), T0 + 1)
    base, _ = step(r1, reading(T0 + 5, 1, BUSY_IDLE), POLICY)
    assert base.last_evidence is Evidence.BASELINE
    return requested(base, T0 + 70)


def _lost(*paths: str) -> str:
    return (
        f"{len(paths)} of the files read before could not be read now (gone, or their stat "
        f"failed): {', '.join(paths)}"
    )


def test_a_busy_disk_read_before_and_unreadable_now_is_unknown_never_stale() -> None:
    """A live host whose agent died (heartbeat unchanged) and whose one busy VM's disk the
    neighbour suddenly cannot stat, the other VMs idle: every file read is unchanged, but the one
    that would have changed was not read. Unknown (counted, alerted), never stale: no fence."""
    policy = replace(POLICY, extra_checks=1, unknown_alert_after=3)
    record = _busy_and_idle()
    ref = (record.ref_at, record.ref_mtimes, record.ref_heartbeats)
    idle = ((DISK2, T0 - 300), (HB, T0 - 400))  # DISK could not be read
    at = T0 + 71
    for n in range(1, 6):
        result = reading(at, record.checks_requested, idle, BEAT, missing=(DISK,))
        assert judge(record, result, policy) == (Evidence.UNKNOWN, _lost(DISK))
        before = record
        record, actions = step(record, result, policy)
        assert record == judged(before, result, Evidence.UNKNOWN, _lost(DISK), unknown_count=n)
        # the reference is never updated by such a reading
        assert (record.ref_at, record.ref_mtimes, record.ref_heartbeats) == ref
        alert = (cannot_verify(3, _lost(DISK), "n2"),) if n == 3 else ()
        assert actions == alert and record.state is HostState.SUSPECT
        assert record.stale_count == 0
        at += 61
        record = requested(record, at - 1)
    # the same with the heartbeat file's content and mtime unreadable too (a dead agent's
    # heartbeat file next to it, both on a path the neighbour cannot stat)
    result = reading(at, record.checks_requested, ((DISK2, T0 - 300),), (), missing=(DISK, HB))
    assert judge(record, result, policy) == (Evidence.UNKNOWN, _lost(DISK, HB))


def test_a_file_read_before_and_unreadable_now_is_unknown_whatever_the_order_of_checks() -> None:
    """Too soon, or the reference stamped on another worker's clock: the reading lacks a file
    read before, which is the stronger reason (a failure to gather evidence: counted)."""
    record = _busy_and_idle()
    idle = ((DISK2, T0 - 300), (HB, T0 - 400))
    soon = replace(record, last_request_at=T0 + 10)
    assert judge(soon, reading(T0 + 11, 2, idle, missing=(DISK,)), POLICY) == (
        Evidence.UNKNOWN,
        _lost(DISK),
    )
    other = replace(record, request_clock="worker-b")
    assert judge(other, reading(T0 + 71, 2, idle, missing=(DISK,)), POLICY) == (
        Evidence.UNKNOWN,
        _lost(DISK),
    )
    after, _ = step(soon, reading(T0 + 11, 2, idle, missing=(DISK,)), POLICY)
    assert after.unknown_count == 1  # not "only early": it counts toward cannot-verify


def test_another_file_that_changed_still_proves_the_host_alive() -> None:
    """A changed mtime on the filer's own clock is positive evidence of writes: alive (which
    never leads to a fence), also when a file read before could not be read now. The missing
    file keeps its last known value in the reference."""
    record = _busy_and_idle()
    moved = ((DISK2, T0 - 299), (HB, T0 - 400))
    result = reading(T0 + 71, 2, moved, missing=(DISK,))
    assert judge(record, result, POLICY) == (Evidence.ALIVE, f"{DISK2} changed")
    after, _ = step(record, result, POLICY)
    assert dict(after.ref_mtimes)[fingerprint(DISK)] == T0 - 500
    assert dict(after.ref_mtimes)[fingerprint(DISK2)] == T0 - 299
    beat = reading(T0 + 71, 2, BUSY_IDLE[1:], ((HB, "601"),), missing=(DISK,))
    assert judge(record, beat, POLICY) == (Evidence.ALIVE, f"{HB} changed")


def test_a_requested_file_never_read_in_the_episode_makes_the_reading_unknown() -> None:
    """A requested file the reference never held (a busy disk no neighbour could read since
    the first check, next to idle disks and a dead agent's stopped heartbeat) may be the one
    file a live host writes: unknown, never stale (it was judged on the other files, and a
    live host could be proposed for a fence at the last check). A file that changed still
    proves the host alive; a reading with nothing missing is judged as ever."""
    record = _busy_and_idle()
    result = reading(T0 + 71, 2, BUSY_IDLE, missing=("/mnt/p1/vm7.qcow2", "/mnt/p1/vm7.qcow2"))
    why = (
        "1 of the requested files could not be read at any check of this episode (gone, or "
        "their stat failed): /mnt/p1/vm7.qcow2"
    )
    assert judge(record, result, POLICY) == (Evidence.UNKNOWN, why)
    after, _ = step(record, result, POLICY)
    assert after.unknown_count == 1 and after.stale_count == record.stale_count
    assert (after.ref_at, after.ref_mtimes) == (record.ref_at, record.ref_mtimes)
    many = reading(T0 + 71, 2, BUSY_IDLE, missing=tuple(f"/mnt/p1/n{i}" for i in range(4)))
    assert judge(record, many, POLICY)[1] == (
        "4 of the requested files could not be read at any check of this episode (gone, or "
        "their stat failed): /mnt/p1/n0, /mnt/p1/n1, /mnt/p1/n2 (+1 more)"
    )
    moved = ((DISK, T0 + 60), *BUSY_IDLE[1:])
    assert judge(record, reading(T0 + 71, 2, moved, missing=("/mnt/p1/vm7.qcow2",)), POLICY) == (
        Evidence.ALIVE,
        f"{DISK} changed",
    )
    assert judge(record, reading(T0 + 71, 2, BUSY_IDLE), POLICY) == (Evidence.STALE, None)


def test_the_reason_names_at_most_three_unreadable_files_and_counts_each_once() -> None:
    disks = tuple(f"/mnt/p1/d{i}.qcow2" for i in range(5))
    r1 = requested(replace(SUSPECT, opened_at=T0 + 1), T0 + 1)
    base, _ = step(r1, reading(T0 + 5, 1, (*((d, T0) for d in disks), (HB, T0))), POLICY)
    r2 = requested(base, T0 + 70)
    result = reading(T0 + 71, 2, ((HB, T0),), missing=(*disks, disks[0], "/mnt/p1/new"))
    why = (
        "5 of the files read before could not be read now (gone, or their stat failed): "
        f"{disks[0]}, {disks[1]}, {disks[2]} (+2 more)"
    )
    assert judge(r2, result, POLICY) == (Evidence.UNKNOWN, why)


def test_a_heartbeat_read_before_whose_content_cannot_be_read_now_is_unknown_never_stale() -> None:
    """The heartbeat's stat works (its mtime is in the reading, not missing) but its content
    cannot be read (EIO, no read permission): its content may be what changed (the host's own
    clock), so the reading is unknown, never "unchanged". A heartbeat whose content was never
    read leaves the verdict to the others; a file missing and its content unread count once;
    a changed file still proves the host alive."""
    record = _busy_and_idle()
    why = (
        "1 of the files read before could not be read now (gone, their stat failed, or their "
        f"content unreadable): {HB}"
    )
    result = reading(T0 + 71, 2, BUSY_IDLE, (), unread_contents=(HB, HB))
    assert judge(record, result, POLICY) == (Evidence.UNKNOWN, why)
    after, _ = step(record, result, POLICY)
    assert after.unknown_count == 1 and after.stale_count == record.stale_count
    assert (after.ref_at, after.ref_heartbeats) == (record.ref_at, record.ref_heartbeats)
    both = reading(T0 + 71, 2, BUSY_IDLE[1:], (), missing=(HB,), unread_contents=(HB,))
    assert judge(record, both, POLICY) == (Evidence.UNKNOWN, _lost(HB))
    never = replace(record, ref_heartbeats=())
    assert judge(never, result, POLICY) == (Evidence.STALE, None)
    moved = ((BUSY_IDLE[0][0], BUSY_IDLE[0][1] + 1), *BUSY_IDLE[1:])
    alive = reading(T0 + 71, 2, moved, (), unread_contents=(HB,))
    assert judge(record, alive, POLICY)[0] is Evidence.ALIVE


def test_host_without_vms_is_judged_on_its_heartbeat_file_alone() -> None:
    only = ((HB, T0 - 400),)
    r1 = requested(replace(SUSPECT, opened_at=T0), T0)
    b1 = judged(r1, reading(T0 + 1, 1, only), Evidence.BASELINE)
    r2 = requested(b1, T0 + 61)
    s2 = judged(r2, reading(T0 + 62, 2, only), Evidence.STALE, stale_count=1)
    run(
        SUSPECT,
        [
            (Tick(at=T0), r1, (probe(1),)),
            (reading(T0 + 1, 1, only), b1, ()),
            (Tick(at=T0 + 61), r2, (probe(2),)),
            (reading(T0 + 62, 2, only), s2, ()),
        ],
    )
    assert s2.newest_write is None and s2.files_checked == 1


def test_no_change_sooner_than_an_interval_after_the_reference_is_unknown() -> None:
    """Intervals are the worker's clock: a result stamped early (a worker whose clock is behind
    took the partition over) cannot make two readings look an interval apart when they are not."""
    b1, rows = to_baseline()  # the reference arrived at T0 + 10
    r2 = requested(b1, T0 + 70)
    early = failed(T0 - 50, 2)  # stamped by a clock 2 minutes behind
    u2 = judged(r2, early, Evidence.UNKNOWN, "ssh refused", unknown_count=1)
    r3 = requested(u2, T0 + 30)  # due: an interval after that stamp
    soon = judged(
        r3,
        reading(T0 + 31, 3),
        Evidence.UNKNOWN,
        "too soon: 20 s since the previous reading, at least 60 s needed",
        unknown_count=1,  # early is no failure to gather evidence: not counted
    )
    r4 = requested(soon, T0 + 91)
    s4 = judged(r4, reading(T0 + 92, 4), Evidence.STALE, stale_count=1, unknown_count=0)
    rows += [
        (Tick(at=T0 + 70), r2, (probe(2),)),
        (early, u2, ()),
        (Tick(at=T0 + 30), r3, (probe(3),)),
        (reading(T0 + 31, 3), soon, ()),
        (Tick(at=T0 + 91), r4, (probe(4),)),
        # compared with the baseline (the too-soon reading never became the reference)
        (reading(T0 + 92, 4), s4, ()),
    ]
    run(IDLE, rows)


def test_unknown_never_counts_never_resets_and_alerts_once_per_run() -> None:
    policy = replace(POLICY, extra_checks=1, unknown_alert_after=3)
    b1, rows = to_baseline()
    r2 = requested(b1, T0 + 70)
    s2 = judged(r2, reading(T0 + 75, 2), Evidence.STALE, stale_count=1)
    rows += [(Tick(at=T0 + 70), r2, (probe(2),)), (reading(T0 + 75, 2), s2, ())]
    moved = ((DISK, T0 + 7000), (HB, T0 + 7000))  # what an incomplete reading saw: ignored
    unreadable_why = (
        "2 disks on storage the probe cannot read (judge_readable_only is off for this cluster)"
    )
    unknowns: list[tuple[ProbeFinished, str]] = [
        (failed(0, 0, "ssh refused"), "ssh refused"),
        (reading(0, 0, moved, complete=False, reason="partial output"), "partial output"),
        (reading(0, 0, moved, complete=False), "incomplete reading"),
        (reading(0, 0, unreadable=2), unreadable_why),
        (reading(0, 0, (), ()), "no files to read"),
        (
            reading(0, 0, (), (), reason="storage not mounted: /mnt/p1"),
            "storage not mounted: /mnt/p1",
        ),
    ]
    rec, at = s2, T0 + 75
    for n, (shape, why) in enumerate(unknowns, 1):
        at += 61
        rec = requested(rec, at)
        rows.append((Tick(at=at), rec, (probe(rec.checks_requested),)))
        result = replace(shape, at=at + 1, check=rec.checks_requested)
        rec = judged(rec, result, Evidence.UNKNOWN, why, unknown_count=n)
        alert = (cannot_verify(3, why, "n2"),) if n == 3 else ()
        rows.append((result, rec, alert))
    # the stale count stayed 1 and the reference is still the baseline: one more stale proposes
    assert rec.stale_count == 1 and rec.ref_at == T0 + 75
    at += 61
    rec = requested(rec, at)
    rows.append((Tick(at=at), rec, (probe(rec.checks_requested),)))
    last = reading(at + 1, rec.checks_requested)
    final = judged(rec, last, Evidence.STALE, stale_count=2, unknown_count=0)
    final = replace(
        final, state=HostState.FENCE_PROPOSED, since=at + 1, decision_id=DID, sent_at=at + 1
    )
    rows.append((last, final, (replace(PROPOSAL, stale_checks=2),)))
    run(IDLE, rows, policy)


def test_an_incomplete_reading_never_becomes_the_reference() -> None:
    """Its changes are not compared away: the next complete reading still shows them."""
    b1, rows = to_baseline()
    moved = ((DISK, T0 - 100), (HB, T0 - 400))
    r2 = requested(b1, T0 + 70)
    cut = reading(T0 + 75, 2, moved, complete=False, reason="partial output")
    u2 = judged(r2, cut, Evidence.UNKNOWN, "partial output", unknown_count=1)
    r3 = requested(u2, T0 + 135)
    a3 = judged(r3, reading(T0 + 140, 3, moved), Evidence.ALIVE, f"{DISK} changed", unknown_count=0)
    rows += [
        (Tick(at=T0 + 70), r2, (probe(2),)),
        (cut, u2, ()),
        (Tick(at=T0 + 135), r3, (probe(3),)),
        (reading(T0 + 140, 3, moved), a3, ()),
    ]
    run(IDLE, rows)


def test_judge_readable_only_lets_unreadable_disks_pass() -> None:
    policy = replace(POLICY, judge_readable_only=True, extra_checks=0)
    r1 = requested(replace(SUSPECT, opened_at=T0), T0)
    first = reading(T0 + 1, 1, unreadable=3)
    b1 = judged(r1, first, Evidence.BASELINE)
    r2 = requested(b1, T0 + 61)
    second = reading(T0 + 62, 2, unreadable=3)
    s2 = judged(r2, second, Evidence.STALE, stale_count=1)
    proposed = replace(
        s2, state=HostState.FENCE_PROPOSED, since=T0 + 62, decision_id=DID, sent_at=T0 + 62
    )
    run(
        SUSPECT,
        [
            (Tick(at=T0), r1, (probe(1),)),
            (first, b1, ()),
            (Tick(at=T0 + 61), r2, (probe(2),)),
            (second, proposed, (replace(PROPOSAL, stale_checks=1),)),
        ],
        policy,
    )
    assert proposed.unreadable == 3


def test_unknown_alert_repeats_after_a_new_run_of_unknowns() -> None:
    policy = replace(POLICY, unknown_alert_after=1)
    r1 = requested(replace(SUSPECT, opened_at=T0 + 60), T0 + 60)
    u1 = judged(r1, failed(T0 + 61, 1, "no neighbour"), Evidence.UNKNOWN, "no neighbour")
    u1 = replace(u1, unknown_count=1)
    r2 = requested(u1, T0 + 121)
    b2 = judged(r2, reading(T0 + 122, 2), Evidence.BASELINE, unknown_count=0)
    r3 = requested(b2, T0 + 182)
    u3 = judged(r3, failed(T0 + 183, 3, "no neighbour"), Evidence.UNKNOWN, "no neighbour")
    u3 = replace(u3, unknown_count=1)
    r4 = requested(u3, T0 + 243)
    a4 = judged(
        r4,
        reading(T0 + 244, 4, heartbeats=((HB, "x"),)),
        Evidence.ALIVE,
        f"{HB} changed",
        unknown_count=0,
    )
    r5 = requested(a4, T0 + 304)
    u5 = replace(
        judged(r5, failed(T0 + 305, 5, "timeout"), Evidence.UNKNOWN, "timeout"), unknown_count=1
    )
    run(
        SUSPECT,
        [
            (Tick(at=T0 + 60), r1, (probe(1),)),
            (failed(T0 + 61, 1, "no neighbour"), u1, (cannot_verify(1, "no neighbour"),)),
            (Tick(at=T0 + 121), r2, (probe(2),)),
            (reading(T0 + 122, 2), b2, ()),  # the baseline ends the unknown run
            (Tick(at=T0 + 182), r3, (probe(3),)),
            (failed(T0 + 183, 3, "no neighbour"), u3, (cannot_verify(1, "no neighbour"),)),
            (Tick(at=T0 + 243), r4, (probe(4),)),
            (reading(T0 + 244, 4, heartbeats=((HB, "x"),)), a4, ()),
            (Tick(at=T0 + 304), r5, (probe(5),)),
            (failed(T0 + 305, 5, "timeout"), u5, (cannot_verify(1, "timeout"),)),
        ],
        policy,
    )


def test_a_stale_check_ends_the_unknown_run() -> None:
    policy = replace(POLICY, unknown_alert_after=2)
    b1, rows = to_baseline()
    r2 = requested(b1, T0 + 70)
    u2 = judged(r2, failed(T0 + 71, 2), Evidence.UNKNOWN, "ssh refused", unknown_count=1)
    r3 = requested(u2, T0 + 131)
    s3 = judged(r3, reading(T0 + 132, 3), Evidence.STALE, stale_count=1, unknown_count=0)
    r4 = requested(s3, T0 + 192)
    u4 = judged(r4, failed(T0 + 193, 4), Evidence.UNKNOWN, "ssh refused", unknown_count=1)
    rows += [
        (Tick(at=T0 + 70), r2, (probe(2),)),
        (failed(T0 + 71, 2), u2, ()),
        (Tick(at=T0 + 131), r3, (probe(3),)),
        (reading(T0 + 132, 3), s3, ()),
        (Tick(at=T0 + 192), r4, (probe(4),)),
        (failed(T0 + 193, 4), u4, ()),  # one unknown in a new run: no alert
    ]
    run(IDLE, rows, policy)


def test_lost_probe_counts_as_unknown_and_the_next_is_requested_on_the_same_tick() -> None:
    policy = replace(POLICY, unknown_alert_after=1, probe_timeout=100.0)
    b1, rows = to_baseline()
    r2 = requested(b1, T0 + 70)
    lost = replace(
        r2,
        probe_outstanding=False,
        unknown_count=1,
        last_check=2,
        last_evidence=Evidence.UNKNOWN,
        last_probe_at=T0 + 170,
        last_result_at=T0 + 70,
        reason="probe result lost",
    )
    r3 = requested(lost, T0 + 170)
    rows += [
        (Tick(at=T0 + 70), r2, (probe(2),)),
        (Tick(at=T0 + 169), r2, ()),
        (Tick(at=T0 + 170), r3, (cannot_verify(1, "probe result lost", "n2"), probe(3))),
        (reading(T0 + 171, 2), r3, ()),  # the lost check's answer: late
        (Tick(at=T0 + 172), r3, ()),
    ]
    record = run(IDLE, rows, policy)
    # a lost probe never breaks the stale run either: the reference is still the baseline
    assert record.ref_at == T0 + 10 and record.stale_count == 0


def test_lost_probe_waits_for_the_interval_when_the_timeout_is_shorter() -> None:
    policy = replace(POLICY, probe_timeout=30.0)
    r1 = requested(replace(SUSPECT, opened_at=T0 + 60), T0 + 60)
    lost = replace(
        r1,
        probe_outstanding=False,
        unknown_count=1,
        last_check=1,
        last_evidence=Evidence.UNKNOWN,
        last_probe_at=T0 + 90,
        last_result_at=T0 + 60,
        reason="probe result lost",
    )
    run(
        SUSPECT,
        [
            (Tick(at=T0 + 60), r1, (probe(1),)),
            (Tick(at=T0 + 90), lost, ()),
            (Tick(at=T0 + 119), lost, ()),
            (Tick(at=T0 + 120), requested(lost, T0 + 120), (probe(2),)),
        ],
        policy,
    )


def test_no_extra_checks_means_the_first_stale_check_proposes() -> None:
    policy = replace(POLICY, extra_checks=0)
    b1, rows = to_baseline()
    r2 = requested(b1, T0 + 70)
    s2 = judged(r2, reading(T0 + 75, 2), Evidence.STALE, stale_count=1)
    proposed = replace(
        s2, state=HostState.FENCE_PROPOSED, since=T0 + 75, decision_id=DID, sent_at=T0 + 75
    )
    rows += [
        (Tick(at=T0 + 70), r2, (probe(2),)),
        (reading(T0 + 75, 2), proposed, (replace(PROPOSAL, stale_checks=1),)),
    ]
    run(IDLE, rows, policy)


def skew(*pairs: tuple[str, float]) -> Notify:
    details = (
        *((f"{name}_offset", f"{value:+.0f}") for name, value in pairs),
        ("reason", ", ".join(f"{n} clock {v:+.0f} s" for n, v in pairs)),
        ("neighbour", "n2"),
    )
    return Notify(NoticeKind.CLOCK_SKEW, 1, details)


def test_clock_skew_above_the_threshold_notifies_once_per_episode_and_changes_no_verdict() -> None:
    r1 = requested(replace(SUSPECT, opened_at=T0), T0)
    at_limit = reading(T0 + 1, 1, neighbour_offset=-30.0, filer_offset=30.0)
    b1 = judged(r1, at_limit, Evidence.BASELINE)
    r2 = requested(b1, T0 + 61)
    ahead = reading(T0 + 62, 2, neighbour_offset=-30.5, filer_offset=86_400.0)
    s2 = judged(r2, ahead, Evidence.STALE, stale_count=1, skew_notified=True)
    r3 = requested(s2, T0 + 122)
    behind = reading(T0 + 123, 3, neighbour_offset=-99.0, filer_offset=-86_400.0)
    s3 = judged(r3, behind, Evidence.STALE, stale_count=2, skew_notified=True)
    back = replace(s3, state=HostState.IDLE, since=T0 + 200, probe_outstanding=False)
    t1 = T0 + 300
    second = HostRecord("h1", state=HostState.SUSPECT, since=t1, episode=2, suspect_since=t1)
    r21 = requested(replace(second, opened_at=t1), t1)
    again = reading(t1 + 1, 1, episode=2, filer_offset=31.0)
    b21 = judged(r21, again, Evidence.BASELINE, skew_notified=True)
    notice2 = replace(skew(("filer", 31.0)), episode=2)
    run(
        SUSPECT,
        [
            (Tick(at=T0), r1, (probe(1),)),
            (at_limit, b1, ()),  # exactly the threshold: no notice
            (Tick(at=T0 + 61), r2, (probe(2),)),
            (ahead, s2, (skew(("neighbour", -30.5), ("filer", 86_400.0)),)),
            (Tick(at=T0 + 122), r3, (probe(3),)),
            (behind, s3, ()),  # once per episode
            (HostCameBack(at=T0 + 200), back, (ClearSuspect(1, T0 + 200), recovered("suspect"))),
            (HostDisconnected(at=t1), second, (MarkSuspect(2, t1),)),
            (Tick(at=t1), r21, (probe(1, 2, t1),)),
            (again, b21, (notice2,)),  # a new episode notifies again
        ],
    )


def test_clock_skew_is_measured_on_unknown_readings_too() -> None:
    r1 = requested(replace(SUSPECT, opened_at=T0), T0)
    result = replace(failed(T0 + 1, 1), neighbour="n2", neighbour_offset=45.0)
    u1 = judged(r1, result, Evidence.UNKNOWN, "ssh refused", unknown_count=1, skew_notified=True)
    run(
        SUSPECT,
        [(Tick(at=T0), r1, (probe(1),)), (result, u1, (skew(("neighbour", 45.0)),))],
    )


def test_suspect_too_long_repeats_until_a_decision_and_never_once_fencing() -> None:
    policy = replace(POLICY, suspect_alert_after=300.0, suspect_renotify=600.0)
    proposed, rows = to_proposal()  # opened at T0 + 5, proposed at T0 + 205
    a1 = replace(proposed, sent_at=T0 + 305, last_alert_at=T0 + 305)
    withheld = replace(
        a1,
        state=HostState.WITHHELD,
        since=T0 + 310,
        withheld_reason=WithheldReason.CAP_REACHED,
    )
    a2 = replace(withheld, last_alert_at=T0 + 905)
    rows += [
        (Tick(at=T0 + 304), replace(proposed, sent_at=T0 + 304), (PROPOSAL,)),
        (
            Tick(at=T0 + 305),
            replace(proposed, sent_at=T0 + 304, last_alert_at=T0 + 305),
            (too_long(300, "fence_proposed", "no decision yet"),),
        ),
    ]
    run(IDLE, rows, policy)
    rows2: list[Row] = [
        (Tick(at=T0 + 305), a1, (too_long(300, "fence_proposed", "no decision yet"), PROPOSAL)),
        (FenceWithheld(T0 + 310, 1, DID, WithheldReason.CAP_REACHED), withheld, ()),
        (Tick(at=T0 + 904), withheld, ()),
        (Tick(at=T0 + 905), a2, (too_long(900, "withheld", "cap_reached"),)),
        (Tick(at=T0 + 1504), a2, ()),
    ]
    run(proposed, rows2, policy)
    # once approved, the actuator owns the host (it retries and notifies): no alert
    for state, actions in [
        (HostState.FENCING, (PROPOSAL,)),
        (HostState.FENCED, ()),
        (HostState.FAILED, ()),
    ]:
        record = replace(proposed, state=state)
        new, got = step(record, Tick(at=T0 + 50_000), policy)
        assert got == actions, state
        assert new.last_alert_at is None


def test_suspect_too_long_in_suspect_says_why_no_decision_was_made() -> None:
    policy = replace(
        POLICY, suspect_alert_after=300.0, suspect_renotify=600.0, probe_timeout=10_000.0
    )
    b1, rows = to_baseline()
    r2 = requested(b1, T0 + 70)  # never answered (probe_timeout is long)
    rows += [
        (Tick(at=T0 + 70), r2, (probe(2),)),
        (Tick(at=T0 + 304), r2, ()),
        (
            Tick(at=T0 + 305),
            replace(r2, last_alert_at=T0 + 305),
            (too_long(300, "suspect", "no decision yet"),),
        ),
        (Tick(at=T0 + 904), replace(r2, last_alert_at=T0 + 305), ()),
        (
            Tick(at=T0 + 905),
            replace(r2, last_alert_at=T0 + 905),
            (too_long(900, "suspect", "no decision yet"),),
        ),
    ]
    record = run(IDLE, rows, policy)
    unknown = replace(record, reason="ssh refused")
    assert step(unknown, Tick(at=T0 + 1505), policy)[1] == (
        too_long(1500, "suspect", "ssh refused"),
    )
    # closed states never alert
    for state in (HostState.IDLE, HostState.MAINTENANCE):
        closed = replace(record, state=state, last_alert_at=None, probe_outstanding=False)
        assert step(closed, Tick(at=T0 + 99_999), policy) == (closed, ())


@pytest.mark.parametrize(
    "reason",
    [
        WithheldReason.QUIET_PERIOD,
        WithheldReason.PAUSED,
        WithheldReason.CLUSTER_SIZE_UNKNOWN,
        WithheldReason.STORM_GUARD,
    ],
)
def test_a_temporary_withhold_keeps_probing_and_the_next_stale_check_proposes_again(
    reason: WithheldReason,
) -> None:
    proposed, rows = to_proposal()
    withheld = replace(proposed, state=HostState.WITHHELD, since=T0 + 206, withheld_reason=reason)
    r5 = requested(withheld, T0 + 265)
    u5 = judged(r5, failed(T0 + 266, 5), Evidence.UNKNOWN, "ssh refused", unknown_count=1)
    r6 = requested(u5, T0 + 326)
    s6 = judged(r6, reading(T0 + 327, 6), Evidence.STALE, stale_count=3, unknown_count=0)
    again = replace(s6, state=HostState.FENCE_PROPOSED, since=T0 + 327, sent_at=T0 + 327)
    fencing = replace(again, state=HostState.FENCING, since=T0 + 330, withheld_reason=None)
    verdict = FenceWithheld(T0 + 206, 1, DID, reason)
    rows += [
        (verdict, withheld, ()),
        (verdict, withheld, ()),  # the gate repeating itself: late
        (Tick(at=T0 + 264), withheld, ()),
        (Tick(at=T0 + 265), r5, (probe(5),)),
        (failed(T0 + 266, 5), u5, ()),  # unknown: no proposal, still withheld
        (Tick(at=T0 + 326), r6, (probe(6),)),
        # one more stale check proposes again, same decision id: the gate judges again
        (reading(T0 + 327, 6), again, (PROPOSAL,)),
        (FenceApproved(at=T0 + 330, episode=1, decision_id=DID), fencing, ()),
    ]
    run(IDLE, rows)


def test_an_approval_may_follow_a_temporary_withhold() -> None:
    """The gate judged a re-sent proposal again and approved it while the host was withheld."""
    proposed, rows = to_proposal()
    withheld = replace(
        proposed,
        state=HostState.WITHHELD,
        since=T0 + 206,
        withheld_reason=WithheldReason.QUIET_PERIOD,
    )
    r5 = requested(withheld, T0 + 265)
    # (check 5 is no longer waited for: no answer is taken while fencing)
    fencing = replace(
        r5, state=HostState.FENCING, since=T0 + 266, withheld_reason=None, probe_outstanding=False
    )
    rows += [
        (FenceWithheld(T0 + 206, 1, DID, WithheldReason.QUIET_PERIOD), withheld, ()),
        (Tick(at=T0 + 265), r5, (probe(5),)),
        (FenceApproved(at=T0 + 266, episode=1, decision_id=DID), fencing, ()),
        (reading(T0 + 267, 5), fencing, ()),  # no longer probing: late
        (Tick(at=T0 + 268), fencing, ()),
    ]
    run(IDLE, rows)


def test_a_proposal_resent_after_an_approval_that_followed_a_temporary_withhold_is_the_same() -> (
    None
):
    """The approval of the re-sent proposal came while the host was withheld: once fencing, the
    proposal re-sent on a tick must be the one proposed (1 + extra_checks stale checks), not a
    weaker one."""
    proposed, _ = to_proposal()
    withheld = replace(
        proposed,
        state=HostState.WITHHELD,
        since=T0 + 206,
        withheld_reason=WithheldReason.QUIET_PERIOD,
    )
    fencing = replace(withheld, state=HostState.FENCING, since=T0 + 207, withheld_reason=None)
    record = run(
        proposed,
        [
            (FenceWithheld(T0 + 206, 1, DID, WithheldReason.QUIET_PERIOD), withheld, ()),
            (FenceApproved(at=T0 + 207, episode=1, decision_id=DID), fencing, ()),
        ],
    )
    assert step(record, Tick(at=T0 + 205 + 900), POLICY)[1] == (PROPOSAL,)


def test_alive_after_a_temporary_withhold_returns_to_suspect_and_approvals_are_late() -> None:
    proposed, rows = to_proposal()
    withheld = replace(
        proposed,
        state=HostState.WITHHELD,
        since=T0 + 206,
        withheld_reason=WithheldReason.STORM_GUARD,
    )
    r5 = requested(withheld, T0 + 265)
    wrote = reading(T0 + 266, 5, WRITTEN)
    a5 = judged(
        r5,
        wrote,
        Evidence.ALIVE,
        f"{DISK} changed",
        state=HostState.SUSPECT,
        since=T0 + 266,  # when it entered SUSPECT again
        stale_count=0,
        withheld_reason=None,
    )
    rows += [
        (FenceWithheld(T0 + 206, 1, DID, WithheldReason.STORM_GUARD), withheld, ()),
        (Tick(at=T0 + 265), r5, (probe(5),)),
        (wrote, a5, ()),
        # the host proved alive: a verdict on the old proposal changes nothing
        (FenceApproved(at=T0 + 267, episode=1, decision_id=DID), a5, ()),
        (FenceWithheld(T0 + 268, 1, DID, WithheldReason.STORM_GUARD), a5, ()),
    ]
    rec = run(IDLE, rows)
    assert rec.state is HostState.SUSPECT and rec.decision_id == DID
    # a new stale run of 1 + extra_checks proposes again, with the episode's one decision id
    at, more = T0 + 266, list[Row]()
    for n in (1, 2, 3):
        at += 61
        rec2 = requested(rec, at)
        more.append((Tick(at=at), rec2, (probe(rec2.checks_requested),)))
        result = reading(at + 1, rec2.checks_requested, WRITTEN)
        rec = judged(rec2, result, Evidence.STALE, stale_count=n)
        actions: tuple[HostAction, ...] = ()
        if n == 3:
            rec = replace(rec, state=HostState.FENCE_PROPOSED, since=at + 1, sent_at=at + 1)
            actions = (replace(PROPOSAL, newest_write=T0 - 499),)
        more.append((result, rec, actions))
    run(a5, more)


def test_an_outcome_after_the_host_proved_alive_again_is_recorded() -> None:
    """The gate approved a re-sent proposal while the host was withheld for a temporary reason;
    the host then proved alive (SUSPECT, approval late) but the actuator had the approval and
    powered it off. The outcome is a fact and must be recorded, not refused as illegal."""
    proposed, _ = to_proposal()
    withheld = replace(
        proposed,
        state=HostState.WITHHELD,
        since=T0 + 206,
        withheld_reason=WithheldReason.PAUSED,
    )
    r5 = requested(withheld, T0 + 265)
    alive, _ = step(r5, reading(T0 + 266, 5, WRITTEN), POLICY)
    assert alive.state is HostState.SUSPECT and alive.decision_id == DID
    ok = FenceFinished(at=T0 + 300, episode=1, decision_id=DID, success=True, power_state="off")
    assert step(alive, ok, POLICY) == (
        replace(alive, state=HostState.FENCED, since=T0 + 300, power_state="off"),
        (),
    )
    # A failure or a refusal while the host is checked again changes nothing: checks go on.
    bad = FenceFinished(at=T0 + 300, episode=1, decision_id=DID, success=False, error="x")
    assert step(alive, bad, POLICY) == (alive, ())


@pytest.mark.parametrize("reason", [WithheldReason.CAP_REACHED, WithheldReason.GLOBAL_CAP_REACHED])
def test_a_budget_withhold_is_final_stops_probing_and_ignores_approvals(
    reason: WithheldReason,
) -> None:
    proposed, rows = to_proposal()
    withheld = replace(proposed, state=HostState.WITHHELD, since=T0 + 206, withheld_reason=reason)
    verdict = FenceWithheld(T0 + 206, 1, DID, reason)
    rows += [
        (verdict, withheld, ()),
        (verdict, withheld, ()),
        (Tick(at=T0 + 400), withheld, ()),  # no probe, no re-send
        (reading(T0 + 401, 4), withheld, ()),
        (HostDisconnected(at=T0 + 402), withheld, ()),
        (FenceApproved(at=T0 + 403, episode=1, decision_id=DID), withheld, ()),
        (Tick(at=T0 + 1000), withheld, ()),
    ]
    record = run(IDLE, rows)
    # an outcome is a fact (the actuator did act): it is recorded even now
    ok = FenceFinished(at=T0 + 500, episode=1, decision_id=DID, success=True, power_state="off")
    assert step(record, ok, POLICY) == (
        replace(record, state=HostState.FENCED, since=T0 + 500, power_state="off"),
        (),
    )
    bad = FenceFinished(at=T0 + 500, episode=1, decision_id=DID, success=False, error="x")
    assert step(record, bad, POLICY) == (
        replace(record, state=HostState.FAILED, since=T0 + 500, error="x"),
        (),
    )


def test_failed_fence_is_not_proposed_again_and_a_retried_success_fences() -> None:
    proposed, rows = to_proposal()
    fencing = replace(proposed, state=HostState.FENCING, since=T0 + 210)
    failed_ = replace(
        fencing, state=HostState.FAILED, since=T0 + 300, power_state="on", error="bmc timeout"
    )
    fenced = replace(failed_, state=HostState.FENCED, since=T0 + 400, power_state="off", error=None)
    fail = FenceFinished(
        at=T0 + 300,
        episode=1,
        decision_id=DID,
        success=False,
        power_state="on",
        error="bmc timeout",
    )
    rows += [
        (FenceApproved(at=T0 + 210, episode=1, decision_id=DID), fencing, ()),
        (fail, failed_, ()),
        (fail, failed_, ()),
        (Tick(at=T0 + 5000), failed_, ()),  # the actuator retries and notifies, not the core
        (FenceApproved(at=T0 + 361, episode=1, decision_id=DID), failed_, ()),
        (FenceWithheld(T0 + 362, 1, DID, WithheldReason.PAUSED), failed_, ()),
        (reading(T0 + 363, 4), failed_, ()),
        (
            FenceFinished(at=T0 + 400, episode=1, decision_id=DID, success=True, power_state="off"),
            fenced,
            (),
        ),
        (fail, fenced, ()),  # an older failure redelivered after the success: late
    ]
    run(IDLE, rows)


def test_an_outcome_may_overtake_its_approval() -> None:
    proposed, rows = to_proposal()
    failed_ = replace(proposed, state=HostState.FAILED, since=T0 + 210, error="no route")
    rows += [
        (
            FenceFinished(at=T0 + 210, episode=1, decision_id=DID, success=False, error="no route"),
            failed_,
            (),
        ),
        (FenceApproved(at=T0 + 211, episode=1, decision_id=DID), failed_, ()),
    ]
    run(IDLE, rows)
    fenced = replace(proposed, state=HostState.FENCED, since=T0 + 210)
    ok = FenceFinished(at=T0 + 210, episode=1, decision_id=DID, success=True)
    assert step(proposed, ok, POLICY) == (fenced, ())


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
    r1 = requested(replace(SUSPECT, opened_at=T0 + 60), T0 + 60)
    back = replace(r1, state=HostState.IDLE, since=T0 + 65, probe_outstanding=False)
    run(
        SUSPECT,
        [
            (Tick(at=T0 + 60), r1, (probe(1),)),
            (HostCameBack(at=T0 + 65), back, (ClearSuspect(1, T0 + 65), recovered("suspect"))),
            (reading(T0 + 70, 1), back, ()),
            (Tick(at=T0 + 200), back, ()),
            (MaintenanceEnded(at=T0 + 201), back, ()),
        ],
    )


def test_maintenance_ends_the_episode_and_ignores_disconnections_until_it_ends() -> None:
    maint = replace(SUSPECT, state=HostState.MAINTENANCE, since=T0 + 10)
    ended = recovered("suspect", "maintenance")
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
            (reading(T0 + 15, 1), maint, ()),
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


@pytest.mark.parametrize(
    "state",
    [
        HostState.FENCE_PROPOSED,
        HostState.FENCING,
        HostState.FENCED,
        HostState.WITHHELD,
        HostState.FAILED,
    ],
)
def test_maintenance_ends_every_open_state(state: HostState) -> None:
    proposed, _ = to_proposal()
    record = replace(proposed, state=state)
    new = replace(record, state=HostState.MAINTENANCE, since=T0 + 900)
    assert step(record, MaintenanceStarted(at=T0 + 900), POLICY) == (
        new,
        (ClearSuspect(1, T0 + 900), recovered(state.value, "maintenance")),
    )


@pytest.mark.parametrize(
    "event",
    [
        ProbeFinished(at=T0, episode=0, check=1),
        ProbeFinished(at=T0, episode=2, check=1),
        FenceApproved(at=T0, episode=2, decision_id=DID),
        FenceWithheld(at=T0, episode=3, decision_id=DID, reason=WithheldReason.PAUSED),
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
        step(record, reading(T0 + 61, check), POLICY)


def test_an_older_check_of_the_open_episode_is_late() -> None:
    b1, _ = to_baseline()
    r2 = requested(b1, T0 + 70)
    assert classify(r2, reading(T0 + 71, 1), POLICY) is Trigger.LATE
    assert step(r2, reading(T0 + 71, 1), POLICY) == (r2, ())
    assert step(b1, reading(T0 + 71, 1), POLICY) == (b1, ())  # nothing outstanding


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


@pytest.mark.parametrize("success", [True, False])
def test_an_outcome_before_any_proposal_is_illegal_and_changes_nothing(success: bool) -> None:
    record = requested(SUSPECT, T0 + 60)
    snapshot = record.to_dict()
    event = FenceFinished(at=T0, episode=1, decision_id=DID, success=success)
    with pytest.raises(IllegalTransition):
        step(record, event, POLICY)
    assert record.to_dict() == snapshot


@pytest.mark.parametrize(
    "event",
    [
        FenceApproved(at=T0, episode=1, decision_id=DID),
        FenceWithheld(at=T0, episode=1, decision_id=DID, reason=WithheldReason.PAUSED),
    ],
)
def test_a_verdict_in_suspect_is_late(event: HostEvent) -> None:
    """Before any proposal, or after the host proved alive again: nothing to approve."""
    record = requested(SUSPECT, T0 + 60)
    assert classify(record, event, POLICY) is Trigger.LATE
    assert step(record, event, POLICY) == (record, ())


def test_results_of_an_ended_episode_are_late_in_every_closed_state() -> None:
    proposed, _ = to_proposal()
    for state in (HostState.IDLE, HostState.MAINTENANCE):
        closed = replace(proposed, state=state)
        for event in (
            reading(T0 + 500, 4),
            reading(T0 + 500, 99),  # even an unrequested check: the episode is over
            FenceApproved(at=T0 + 500, episode=1, decision_id=DID),
            FenceWithheld(at=T0, episode=1, decision_id="x", reason=WithheldReason.PAUSED),
            FenceFinished(at=T0, episode=1, decision_id=DID, success=True),
        ):
            assert classify(closed, event, POLICY) is Trigger.LATE
            assert step(closed, event, POLICY) == (closed, ())


def test_every_state_has_a_row_and_every_target_is_a_state() -> None:
    assert set(TRANSITIONS) == set(HostState)
    for row in TRANSITIONS.values():
        assert Trigger.LATE in row
        for targets in row.values():
            assert targets and set(targets) <= set(HostState)


def test_record_round_trips_through_plain_data_and_json() -> None:
    proposed, _ = to_proposal()
    withheld = replace(proposed, withheld_reason=WithheldReason.CAP_REACHED)
    data = withheld.to_dict()
    assert data["state"] == "fence_proposed" and data["last_evidence"] == "stale"
    expected = sorted([[fingerprint(HB), T0 - 400], [fingerprint(DISK), T0 - 500]])
    assert data["ref_mtimes"] == expected
    assert data["ref_heartbeats"] == [[fingerprint(HB), "600"]]
    assert HostRecord.from_dict({**data, "added_later": 1}) == withheld
    # through JSON the pairs come back as lists: the record still compares equal
    assert HostRecord.from_dict(json.loads(json.dumps(data))) == withheld
    assert HostRecord.from_dict({"host": "h9"}) == HostRecord("h9")
    assert HostRecord.from_dict({"host": "h9", "ref_mtimes": None}) == HostRecord("h9")


def test_a_record_read_back_from_json_judges_like_the_original() -> None:
    b1, _ = to_baseline()
    r2 = requested(b1, T0 + 70)
    copy = HostRecord.from_dict(json.loads(json.dumps(r2.to_dict())))
    assert step(copy, reading(T0 + 75, 2), POLICY) == step(r2, reading(T0 + 75, 2), POLICY)
    assert step(copy, reading(T0 + 75, 2), POLICY)[0].last_evidence is Evidence.STALE


def test_committed_state_diagram_is_generated_from_the_table() -> None:
    page = Path(__file__).resolve().parents[2] / "docs" / "state-diagram.md"
    assert page.read_text() == diagram.page(), "run: python -m fencing.diagram > " + str(page)
    for state in HostState:
        assert state.name in diagram.mermaid()
    assert "SUSPECT --> FENCE_PROPOSED : probe_stale" in diagram.mermaid()
    assert "WITHHELD --> SUSPECT : probe_alive" in diagram.mermaid()


def test_diagram_module_prints_the_page(capsys: pytest.CaptureFixture[str]) -> None:
    diagram.main()
    assert capsys.readouterr().out == diagram.page()


def _baselined() -> HostRecord:
    """h1 suspect, baseline read at T0 + 5, check 2 requested at T0 + 70."""
    r1 = requested(replace(SUSPECT, opened_at=T0 + 1), T0 + 1)
    base, _ = step(r1, reading(T0 + 5, 1), POLICY)
    assert base.last_evidence is Evidence.BASELINE
    return requested(base, T0 + 70)


def test_a_direct_sign_of_life_is_alive_without_any_change() -> None:
    r2 = _baselined()
    watched = replace(reading(T0 + 71, 2), live_signs=("watcher of 10.0.0.11 on rbd/vol-1",))
    new, actions = step(r2, watched, POLICY)
    assert (new.last_evidence, new.reason, actions) == (
        Evidence.ALIVE,
        "watcher of 10.0.0.11 on rbd/vol-1",
        (),
    )


def test_early_checks_of_a_slow_back_end_never_alert_cannot_verify() -> None:
    """RBD's floor (watch timeout) above the check interval: the checks inside the window are
    too soon, which is no failure to gather evidence; the cannot-verify notice stays for real
    failures, and the window's end is judged as usual."""
    policy = replace(POLICY, unknown_alert_after=1)
    record = _baselined()  # reference at T0 + 5, check 2 requested at T0 + 70
    for check, at in ((2, T0 + 71), (3, T0 + 81)):
        record, actions = step(record, replace(reading(at, check), min_gap=120.0), policy)
        assert record.last_evidence is Evidence.UNKNOWN and record.unknown_count == 0
        assert actions == ()
        record = requested(record, at + 9 if check == 2 else T0 + 130)
    record, _ = step(record, replace(reading(T0 + 131, 4), min_gap=120.0), policy)
    assert record.last_evidence is Evidence.STALE
    failed_reading, notices = step(requested(record, T0 + 200), failed(T0 + 201, 5), policy)
    assert failed_reading.unknown_count == 1
    assert [a.kind for a in notices if isinstance(a, Notify)] == [NoticeKind.CANNOT_VERIFY]


def test_a_worker_clock_stepped_back_restarts_the_window_instead_of_waiting_it_out() -> None:
    """An NTP step back of an hour on the watch worker: the old reference cannot measure an
    interval (an hour of "too soon" would be an hour of silence); the reading is a new reference,
    the stale run so far is kept, and the next interval on the new clock is judged as usual."""
    r2 = _baselined()  # reference at T0 + 5
    stale2, _ = step(r2, reading(T0 + 71, 2), POLICY)
    assert (stale2.last_evidence, stale2.stale_count) == (Evidence.STALE, 1)
    back = T0 - 3600
    r3 = requested(stale2, back)
    rebased, actions = step(r3, reading(back + 1, 3), POLICY)
    assert (rebased.last_evidence, rebased.stale_count, actions) == (Evidence.BASELINE, 1, ())
    assert rebased.reason == (
        "the worker's clock went back 3671 s: this reading is the new reference"
    )
    assert rebased.ref_at == back + 1
    r4 = requested(rebased, back + 62)
    proposed, _ = step(r4, reading(back + 63, 4), POLICY)
    assert proposed.last_evidence is Evidence.STALE and proposed.stale_count == 2
    needed = 1 + POLICY.extra_checks
    assert proposed.state is (HostState.FENCE_PROPOSED if needed == 2 else HostState.SUSPECT)


def test_a_worker_clock_stepped_back_sends_the_next_check_at_once_through_the_tick() -> None:
    """The same step back, through the ticks: the next check goes out on the first tick after
    the step, not once the new clock has caught up with the old result's stamp (an hour of no
    check and no notice)."""
    stale2, _ = step(_baselined(), reading(T0 + 71, 2), POLICY)
    back = T0 - 3600  # the last result arrived at T0 + 71 on the old clock
    r3, actions = step(stale2, Tick(at=back), POLICY)
    assert actions == (probe(3),)
    assert (r3.checks_requested, r3.probe_outstanding, r3.last_request_at) == (3, True, back)
    rebased, _ = step(r3, reading(back + 1, 3), POLICY)
    assert (rebased.last_evidence, rebased.stale_count) == (Evidence.BASELINE, 1)
    waiting, actions = step(rebased, Tick(at=back + 60), POLICY)  # 59 s on the new clock
    assert (waiting, actions) == (rebased, ())
    r4, actions = step(rebased, Tick(at=back + 61), POLICY)
    assert actions == (probe(4),)
    judged4, _ = step(r4, reading(back + 62, 4), POLICY)
    assert (judged4.last_evidence, judged4.stale_count) == (Evidence.STALE, 2)


def test_a_probe_outstanding_across_a_clock_step_back_is_timed_out_on_the_new_clock() -> None:
    """An unanswered probe whose request time is now in the future: its age is measured again
    from the step (lost after probe_timeout on the new clock), never after the clock caught up."""
    r2 = _baselined()  # check 2 requested at T0 + 70, unanswered
    back = T0 - 3600
    rebased, actions = step(r2, Tick(at=back), POLICY)
    assert actions == () and rebased == replace(r2, last_request_at=back, opened_at=back)
    same, actions = step(rebased, Tick(at=back + 179), POLICY)
    assert (same, actions) == (rebased, ())
    lost, actions = step(rebased, Tick(at=back + 180), POLICY)
    assert actions == (probe(3),)
    assert (lost.reason, lost.unknown_count, lost.last_request_at) == (
        "probe result lost",
        1,
        back + 180,
    )
    # Its answer, arriving now, is judged on the earlier (rebased) request time: a new reference.
    late_answer, _ = step(rebased, reading(back + 5, 2), POLICY)
    assert late_answer.last_evidence is Evidence.BASELINE


def test_reminders_and_resends_go_on_after_a_clock_step_back() -> None:
    """suspect_too_long, its repeats and a proposal's re-send are due on a clock that went back
    past their stamps: the reminder counts the episode again from the step (one alert period,
    not the size of the step), a repeat or a re-send stamped in the future goes out at once."""
    late = T0 + 1 + POLICY.suspect_alert_after
    alerted, actions = step(_baselined(), Tick(at=late), POLICY)
    assert [a.kind for a in actions if isinstance(a, Notify)] == [NoticeKind.SUSPECT_TOO_LONG]
    back = T0 - 3600
    rebased, actions = step(alerted, Tick(at=back), POLICY)
    assert rebased.opened_at == back
    assert not [a for a in actions if isinstance(a, Notify)]
    again, actions = step(rebased, Tick(at=back + POLICY.suspect_alert_after), POLICY)
    assert [a.kind for a in actions if isinstance(a, Notify)] == [NoticeKind.SUSPECT_TOO_LONG]
    assert again.last_alert_at == back + POLICY.suspect_alert_after
    # A repeat stamped after now (the step came between the reminder and this tick):
    future = replace(again, last_alert_at=back + 10 * POLICY.suspect_renotify)
    _, actions = step(future, Tick(at=back + POLICY.suspect_alert_after + 1), POLICY)
    assert [a.kind for a in actions if isinstance(a, Notify)] == [NoticeKind.SUSPECT_TOO_LONG]
    proposed, _ = to_proposal()
    assert proposed.sent_at == T0 + 205
    resent, actions = step(proposed, Tick(at=back), POLICY)
    assert actions == (PROPOSAL,) and resent.sent_at == back
    fencing = replace(proposed, state=HostState.FENCING)
    _, actions = step(fencing, Tick(at=back), POLICY)
    assert actions == (PROPOSAL,)


def test_a_reference_stamped_on_another_workers_clock_measures_no_interval() -> None:
    """The partition moves from worker A to worker B, whose clock is an hour ahead: B's first
    tick finds A's result an hour old and requests at once; compared with A's stamp the window
    would be an hour, in truth it is seconds. The reading is a new reference on B's clock (the
    stale run so far kept); B's next interval is judged as usual."""
    r1 = replace(requested(replace(SUSPECT, opened_at=T0 + 1), T0 + 1), request_clock="A")
    base, _ = step(r1, replace(reading(T0 + 5, 1), clock="A"), POLICY)
    r2, _ = step(base, Tick(at=T0 + 66, clock="A"), POLICY)
    stale2, _ = step(r2, replace(reading(T0 + 67, 2), clock="A"), POLICY)
    assert (stale2.last_evidence, stale2.stale_count, stale2.ref_clock) == (Evidence.STALE, 1, "A")
    ahead = T0 + 67 + 3600  # B's clock, seconds after A's last result
    r3, actions = step(stale2, Tick(at=ahead, clock="B"), POLICY)
    # (the episode's age is carried from A's stamps: no early suspect_too_long, tested below)
    assert actions[-1] == probe(3) and r3.request_clock == "B"
    rebased, actions = step(r3, replace(reading(ahead + 1, 3), clock="B"), POLICY)
    assert (rebased.last_evidence, rebased.stale_count, actions) == (Evidence.BASELINE, 1, ())
    assert rebased.reason == (
        "the reference was stamped on another worker's clock (A, this check B): "
        "this reading is the new reference"
    )
    assert (rebased.ref_at, rebased.ref_clock) == (ahead + 1, "B")
    # A result that arrives on B for a check A requested: no interval either.
    r4 = replace(requested(rebased, ahead + 62), request_clock="A")
    again, _ = step(r4, replace(reading(ahead + 63, 4), clock="B"), POLICY)
    assert again.last_evidence is Evidence.BASELINE and again.ref_clock == "B"
    r5, actions = step(again, Tick(at=ahead + 124, clock="B"), POLICY)
    assert actions == (probe(5),)
    stale5, _ = step(r5, replace(reading(ahead + 125, 5), clock="B"), POLICY)
    assert (stale5.last_evidence, stale5.stale_count) == (Evidence.STALE, 2)
    # A change is a change whichever clocks stamped the readings.
    r6 = replace(requested(stale5, ahead + 190), request_clock="A")
    moved = ((DISK, T0 - 499), (HB, T0 - 400))
    alive, _ = step(r6, replace(reading(ahead + 191, 6, moved), clock="B"), POLICY)
    assert (alive.last_evidence, alive.stale_count) == (Evidence.ALIVE, 0)


def _too_long_notices(actions: tuple[HostAction, ...]) -> list[Notify]:
    return [a for a in actions if isinstance(a, Notify) and a.kind is NoticeKind.SUSPECT_TOO_LONG]


def test_an_episode_moved_to_a_worker_ahead_is_not_reported_too_long_early() -> None:
    """The partition moves from worker A to worker B, whose clock is an hour ahead, 61 s into
    the episode. Measured from A's stamp of the first tick on B's clock, the episode was an hour
    old: suspect_too_long at B's first tick, 239 s early. The age A measured (first tick to its
    last request, both A's stamps) is carried and the rest measured on B's clock."""
    policy = replace(POLICY, suspect_alert_after=300.0, probe_timeout=10_000.0)
    r1, _ = step(SUSPECT, Tick(at=T0 + 1, clock="A"), policy)
    assert (r1.opened_at, r1.opened_clock, r1.request_clock) == (T0 + 1, "A", "A")
    base, _ = step(r1, replace(reading(T0 + 2, 1), clock="A"), policy)
    r2, actions = step(base, Tick(at=T0 + 62, clock="A"), policy)
    assert actions == (probe(2),)
    for offset in (3600.0, -3600.0):  # B an hour ahead, or an hour behind
        b = T0 + 63 + offset
        moved, actions = step(r2, Tick(at=b, clock="B"), policy)
        assert _too_long_notices(actions) == [], offset
        assert (moved.opened_at, moved.opened_clock) == (b - 61, "B")
        moved, actions = step(moved, Tick(at=b + 238, clock="B"), policy)
        assert _too_long_notices(actions) == []
        _, actions = step(moved, Tick(at=b + 239, clock="B"), policy)
        assert _too_long_notices(actions) == [too_long(300, "suspect", "no decision yet")]


def test_a_suspect_too_long_sent_on_another_clock_is_repeated_one_renotify_later() -> None:
    """A told suspect_too_long (A's clock); the partition moves to B, an hour ahead: B's first
    tick neither repeats it at once (an hour since A's stamp on B's clock) nor forgets it."""
    policy = replace(
        POLICY, suspect_alert_after=300.0, suspect_renotify=600.0, probe_timeout=10_000.0
    )
    r1, _ = step(SUSPECT, Tick(at=T0 + 1, clock="A"), policy)
    alerted, actions = step(r1, Tick(at=T0 + 301, clock="A"), policy)
    assert _too_long_notices(actions) and alerted.last_alert_at == T0 + 301
    b = T0 + 302 + 3600
    moved, actions = step(alerted, Tick(at=b, clock="B"), policy)
    assert _too_long_notices(actions) == [] and moved.last_alert_at == b
    # (A's age up to its last request, check 1 at its first tick: 0 s carried)
    assert (moved.opened_at, moved.opened_clock) == (b, "B")
    moved, actions = step(moved, Tick(at=b + 599, clock="B"), policy)
    assert _too_long_notices(actions) == []
    _, actions = step(moved, Tick(at=b + 600, clock="B"), policy)
    assert _too_long_notices(actions) == [too_long(600, "suspect", "no decision yet")]


def test_an_age_not_measured_on_the_opening_clock_is_not_carried() -> None:
    """Only two stamps of the clock that opened the episode measure its age: a last request
    on a third clock (or none at all) carries nothing."""
    opened = replace(
        SUSPECT,
        state=HostState.FENCE_PROPOSED,
        decision_id=DID,
        opened_at=T0 + 1,
        opened_clock="A",
        last_request_at=T0 + 500,
        request_clock="C",
        sent_at=T0 + 2000,
    )
    moved, _ = step(opened, Tick(at=T0 + 2000, clock="B"), POLICY)
    assert (moved.opened_at, moved.opened_clock, moved.last_alert_at) == (T0 + 2000, "B", None)
    never, _ = step(replace(opened, last_request_at=None), Tick(at=T0 + 2000, clock="B"), POLICY)
    assert (never.opened_at, never.opened_clock) == (T0 + 2000, "B")


def test_workers_flapping_between_two_clocks_never_build_a_stale_run_in_seconds() -> None:
    """Rebalances back and forth between a worker an hour ahead and one on time, a few seconds
    apart: every switch used to be judged on the other clock's stamps (one stale check per
    switch to the worker ahead, a fence proposed after three switches in under a minute).
    Without a whole interval on one clock nothing is stale."""
    record = replace(SUSPECT, opened_at=T0 + 1)
    real = T0 + 1.0
    for n in range(12):
        clock, offset = ("ahead", 3600.0) if n % 2 else ("on-time", 0.0)
        record, actions = step(record, Tick(at=real + offset, clock=clock), POLICY)
        assert actions and isinstance(actions[-1], RunProbe)
        check = actions[-1].check
        record, actions = step(
            record, replace(reading(real + offset + 1, check), clock=clock), POLICY
        )
        assert record.last_evidence is Evidence.BASELINE, n
        assert record.stale_count == 0 and record.state is HostState.SUSPECT
        real += 5.0


def test_a_disconnection_stamped_by_another_clock_is_never_taken_for_one_before_the_return() -> (
    None
):
    """The host came back, stamped by the poller on worker P; it dies; the report comes from a
    worker whose clock is ten minutes behind P's (the poll leader moved, or the event bus is read
    on another worker): compared with P's stamp, every report looked older than the return and
    was ignored as late until that clock caught up: ten minutes of a dead host not watched.
    A report of P's own clock from before the return is still late."""
    back = replace(SUSPECT, state=HostState.IDLE, since=T0 + 600, since_clock="P")
    down = HostDisconnected(at=T0 + 5, status=HostStatus.DOWN, clock="E")
    opened, actions = step(back, down, POLICY)
    assert (opened.state, opened.episode, actions) == (
        HostState.SUSPECT,
        2,
        (MarkSuspect(2, T0 + 5),),
    )
    late = replace(down, clock="P")
    assert step(back, late, POLICY) == (back, ())
    # The stamp's clock comes from the signal that closed the episode:
    up, _ = step(replace(SUSPECT, opened_at=T0), HostCameBack(at=T0 + 600, clock="P"), POLICY)
    assert (up.since, up.since_clock) == (T0 + 600, "P")
    maint = replace(up, state=HostState.MAINTENANCE)
    ended, _ = step(maint, MaintenanceEnded(at=T0 + 700, clock="E"), POLICY)
    assert (ended.state, ended.since, ended.since_clock) == (HostState.IDLE, T0 + 700, "E")


def test_a_back_ends_own_floor_keeps_a_short_window_from_being_stale() -> None:
    r2 = _baselined()  # 65 s between the baseline's arrival and this request
    slow = replace(reading(T0 + 71, 2), min_gap=90.0)
    new, _ = step(r2, slow, POLICY)
    assert new.last_evidence is Evidence.UNKNOWN
    assert new.reason == "too soon: 65 s since the previous reading, at least 90 s needed"
    assert new.ref_at == T0 + 5  # the reference stays: the next window is measured from it


def test_an_event_without_an_entry_in_the_table_raises_and_changes_nothing() -> None:
    from unittest import mock

    from fencing.decision import TRANSITIONS as TABLE

    fenced = replace(SUSPECT, state=HostState.FENCED, decision_id=DID)
    snapshot = fenced.to_dict()
    with mock.patch.dict(TABLE[HostState.FENCED]):  # type: ignore[arg-type]
        del TABLE[HostState.FENCED][Trigger.TICK]  # type: ignore[attr-defined]
        with pytest.raises(IllegalTransition, match="not allowed in state fenced"):
            step(fenced, Tick(at=T0 + 1), POLICY)
    assert fenced.to_dict() == snapshot


def test_a_refused_fence_goes_back_to_checking_and_proposes_again_on_fresh_evidence() -> None:
    """The actuator's last-moment checks refused the approved fence (a decision too old after
    a restart, CloudStack not answering): nothing was done. The host is checked again and its
    next stale check proposes again, same decision id; the refused approval read late, or the
    same refusal again, changes nothing; a success that follows is a fact."""
    proposed, rows = to_proposal()
    fencing = replace(proposed, state=HostState.FENCING, since=T0 + 206)
    refused = FenceFinished(
        at=T0 + 207, episode=1, decision_id=DID, success=False, error="too old", refused=True
    )
    withheld = replace(
        fencing,
        state=HostState.WITHHELD,
        since=T0 + 207,
        withheld_reason=WithheldReason.REFUSED,
        error="too old",
    )
    r5 = requested(withheld, T0 + 265)
    s5 = judged(r5, reading(T0 + 266, 5), Evidence.STALE, stale_count=3)
    again = replace(s5, state=HostState.FENCE_PROPOSED, since=T0 + 266, sent_at=T0 + 266)
    fencing2 = replace(again, state=HostState.FENCING, since=T0 + 267, withheld_reason=None)
    ok = FenceFinished(at=T0 + 268, episode=1, decision_id=DID, success=True, power_state="off")
    fenced = replace(
        fencing2, state=HostState.FENCED, since=T0 + 268, power_state="off", error=None
    )
    rows += [
        (FenceApproved(at=T0 + 206, episode=1, decision_id=DID), fencing, ()),
        (refused, withheld, ()),
        (refused, withheld, ()),  # the same refusal read again
        (FenceApproved(at=T0 + 206, episode=1, decision_id=DID), withheld, ()),  # the refused one
        (Tick(at=T0 + 265), r5, (probe(5),)),  # probing again: one interval after check 4
        (reading(T0 + 266, 5), again, (PROPOSAL,)),
        (FenceApproved(at=T0 + 267, episode=1, decision_id=DID), fencing2, ()),
        (ok, fenced, ()),
        (refused, fenced, ()),  # a refusal of another copy, after the success: late
    ]
    run(IDLE, rows)


def test_a_check_out_when_the_fence_is_approved_is_not_waited_for_after_a_refusal() -> None:
    """A temporary withhold keeps the host checked; its check is out when the re-judged
    proposal is approved (FENCING: no answer is taken), then the actuator refuses. The host is
    checked again one interval after its last check, not after a probe timeout spent waiting for
    an answer no one takes, and no lost check (unknown) is counted. Found by TestHostMachine."""
    _, rows = to_proposal()
    record = run(IDLE, rows)
    withhold = FenceWithheld(T0 + 206, 1, DID, WithheldReason.QUIET_PERIOD)
    record, _ = step(record, withhold, POLICY)
    record, actions = step(record, Tick(at=T0 + 265), POLICY)
    assert actions == (probe(5),) and record.probe_outstanding
    record, _ = step(record, FenceApproved(at=T0 + 266, episode=1, decision_id=DID), POLICY)
    assert record.state is HostState.FENCING and not record.probe_outstanding
    refused = FenceFinished(at=T0 + 267, episode=1, decision_id=DID, success=False, refused=True)
    record, _ = step(record, refused, POLICY)
    assert record.state is HostState.WITHHELD and not record.probe_outstanding
    unknowns = record.unknown_count
    record, actions = step(record, Tick(at=T0 + 325), POLICY)  # one interval after check 5
    assert actions == (probe(6),) and record.probe_outstanding
    assert record.unknown_count == unknowns


def test_a_refusal_may_overtake_its_approval_and_a_host_alive_since_is_not_proposed() -> None:
    proposed, rows = to_proposal()
    refused = FenceFinished(at=T0 + 206, episode=1, decision_id=DID, success=False, refused=True)
    withheld = replace(
        proposed, state=HostState.WITHHELD, since=T0 + 206, withheld_reason=WithheldReason.REFUSED
    )
    r5 = requested(withheld, T0 + 265)
    wrote = reading(T0 + 266, 5, WRITTEN)
    a5 = judged(
        r5,
        wrote,
        Evidence.ALIVE,
        f"{DISK} changed",
        state=HostState.SUSPECT,
        since=T0 + 266,
        stale_count=0,
        withheld_reason=None,
    )
    rows += [
        (refused, withheld, ()),  # before the approval it answers
        (FenceApproved(at=T0 + 205, episode=1, decision_id=DID), withheld, ()),
        (Tick(at=T0 + 265), r5, (probe(5),)),
        (wrote, a5, ()),  # it wrote: back to suspect, the run starts again
        (refused, a5, ()),  # late
    ]
    run(IDLE, rows)


# -- the reference reading: fingerprints of paths, exact mtimes, heartbeat tokens --------------


def test_a_file_is_keyed_by_a_64_bit_fingerprint_of_its_path() -> None:
    key = fingerprint(DISK)
    assert len(key) == 16 and int(key, 16) >= 0 and key == key.lower()
    assert key == fingerprint(DISK) and key != fingerprint(DISK2)
    assert fingerprint("/mnt/\udcff") != fingerprint("/mnt/")  # any str, even undecodable bytes


def test_a_short_heartbeat_is_kept_as_itself_and_a_long_one_as_a_128_bit_digest() -> None:
    assert heartbeat_token("1732950000\n") == "1732950000\n"
    assert heartbeat_token("x" * 32) == "x" * 32
    long, longer = "x" * 33, "x" * 32 + "y"
    assert heartbeat_token(long).startswith("#") and len(heartbeat_token(long)) == 33
    assert heartbeat_token(long) != heartbeat_token(longer)
    assert heartbeat_token("é" * 16) == "é" * 16  # 32 UTF-8 bytes
    assert heartbeat_token("é" * 17).startswith("#")
    assert as_reference([(DISK, 5.0), (HB, 6.0)], [(HB, long)]) == (
        tuple(sorted([(fingerprint(DISK), 5.0), (fingerprint(HB), 6.0)])),
        ((fingerprint(HB), heartbeat_token(long)),),
    )


@pytest.mark.parametrize(
    ("before", "after", "evidence", "reason"),
    [
        ("a" * 40, "a" * 40, Evidence.STALE, None),
        ("a" * 40, "a" * 39 + "b", Evidence.ALIVE, f"{HB} changed"),
        ("a" * 40, "600", Evidence.ALIVE, f"{HB} changed"),
    ],
)
def test_a_long_heartbeat_is_compared_by_its_digest(
    before: str, after: str, evidence: Evidence, reason: str | None
) -> None:
    b1 = judged(
        requested(replace(SUSPECT, opened_at=T0), T0),
        reading(T0 + 1, 1, heartbeats=((HB, before),)),
        Evidence.BASELINE,
    )
    assert dict(b1.ref_heartbeats)[fingerprint(HB)] == heartbeat_token(before)
    r2 = requested(b1, T0 + 61)
    assert judge(r2, reading(T0 + 62, 2, heartbeats=((HB, after),)), POLICY) == (evidence, reason)


def test_the_reason_names_the_new_readings_full_path() -> None:
    b1, _ = to_baseline()
    r2 = requested(b1, T0 + 70)
    new = "/mnt/p1/vm9.qcow2"
    assert judge(r2, reading(T0 + 71, 2, (*OLD, (new, T0))), POLICY) == (
        Evidence.ALIVE,
        f"{new} appeared",
    )
    moved = ((DISK, T0 - 499), (HB, T0 - 400))
    assert judge(r2, reading(T0 + 71, 2, moved), POLICY) == (Evidence.ALIVE, f"{DISK} changed")


@pytest.mark.parametrize("where", ["mtimes", "heartbeats"])
def test_two_files_of_one_reading_with_one_fingerprint_make_it_unknown(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never seen (64 bits), but never a guess: the reference could not tell the two files
    apart, so a change of one to the other's value would look unchanged (stale-ward). The
    reading is unknown (never a reference, counted toward cannot-verify), even with a live
    sign."""
    from fencing import decision

    real = decision.fingerprint
    monkeypatch.setattr(
        decision, "fingerprint", lambda p: real(DISK) if p in (DISK, DISK2) else real(p)
    )
    b1, _ = to_baseline()
    r2 = requested(b1, T0 + 70)
    if where == "mtimes":
        clashing = reading(T0 + 75, 2, (*OLD, (DISK2, T0 - 500)))
    else:
        clashing = reading(T0 + 75, 2, heartbeats=((DISK, "1"), (DISK2, "1")))
    clashing = replace(clashing, live_signs=("rbd watch held",))
    why = f"{DISK} and {DISK2} share a reference fingerprint: cannot tell them apart"
    assert judge(r2, clashing, POLICY) == (Evidence.UNKNOWN, why)
    after, _ = step(r2, clashing, POLICY)
    assert after == judged(r2, clashing, Evidence.UNKNOWN, why, unknown_count=1)
    assert after.ref_mtimes == b1.ref_mtimes and after.ref_heartbeats == b1.ref_heartbeats


def test_a_suspect_too_long_reminder_keeps_its_age_across_moves() -> None:
    """A told suspect_too_long, then checked on for 499 s more (its own stamps); the partition
    moves to B (an hour ahead). The reminder is due one renotify after A's notice: 101 s into
    B's clock, not a whole renotify after the move. Counted from each move, partitions moving
    more often than `suspect_renotify` (a worker in a restart loop, rebalances) never repeated
    it: a stuck episode told once, then silence."""
    policy = replace(
        POLICY, suspect_alert_after=300.0, suspect_renotify=600.0, probe_timeout=10_000.0
    )
    alerted = replace(
        SUSPECT,
        opened_at=T0 + 1,
        opened_clock="A",
        last_alert_at=T0 + 301,
        last_request_at=T0 + 800,
        request_clock="A",
        probe_outstanding=True,
    )
    b = T0 + 801 + 3600
    moved, actions = step(alerted, Tick(at=b, clock="B"), policy)
    assert _too_long_notices(actions) == [] and moved.last_alert_at == b - 499
    _, actions = step(moved, Tick(at=b + 100, clock="B"), policy)
    assert _too_long_notices(actions) == []
    _, actions = step(moved, Tick(at=b + 101, clock="B"), policy)
    assert len(_too_long_notices(actions)) == 1
    # Moves every 400 s (less than the renotify): the reminder still comes every ~600 s.
    record, real, told = alerted, 801.0, []
    for n in range(6):
        clock = f"W{n}"
        offset = 3600.0 * (n % 2)
        for t in (real, real + 200.0, real + 399.0):
            record, actions = step(record, Tick(at=T0 + t + offset, clock=clock), policy)
            told += [t] * len(_too_long_notices(actions))
            record = replace(record, last_request_at=T0 + t + offset, request_clock=clock)
        real += 400.0
    assert told and told[0] <= 301 + 600 + 200
    assert all(b - a <= 600 + 200 for a, b in itertools.pairwise(told))
    # A last request on a third clock measures nothing: the reminder counts from the move.
    third = replace(alerted, request_clock="C")
    moved, _ = step(third, Tick(at=b, clock="B"), policy)
    assert moved.last_alert_at == b
