"""The tick cadence of the shell (streams.watch.TickSchedule): a suspect host's next check goes
out within one timer resolution of being due, never earlier than the core allows, and every open
row still gets its periodic tick. Virtual time through the real core (time arrives on events)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from fencing.events import HostDisconnected, HostStatus, ProbeFinished, Tick
from fencing.records import HostRef
from fencing.settings import FencerSettings, PolicySettings
from streams.codec import HostInput, unpack_row
from streams.watch import (
    SWEEP_NET,
    TICK_RESOLUTION,
    TickSchedule,
    apply,
    next_tick_at,
    wants_tick,
)

HOST = "7650a66e-54c1-4a0e-9b7d-7865250dc275"
REF = HostRef(host_uuid=HOST, cluster_uuid="c1")


PROBE_S = 0.3  # how long each probe takes


def _run(check_interval: float, extra: int, fine: bool) -> tuple[float, list[tuple[float, float]]]:
    """Disconnect at 0; a prober that answers stale after PROBE_S; the timer every TICK_RESOLUTION
    (`fine`) or only the old periodic sweep. The proposal's time and (result arrival, next
    request) pairs."""
    settings = FencerSettings(
        policy=PolicySettings(check_interval=check_interval, extra_checks=extra, startup_quiet=0)
    )
    policy, topics = settings.policy.to_policy(), settings.kafka.topics
    period = min(check_interval / 2, 5.0)
    schedule = TickSchedule(period=period)

    def policy_for(cluster: Any) -> Any:
        return settings.policy_for(cluster)

    row, _ = apply(None, HostInput(HostDisconnected(0.0, HostStatus.DISCONNECTED), REF), HOST,
                   policy, settings, topics)  # fmt: skip
    schedule.note(HOST, row, policy_for)
    gaps: list[tuple[float, float]] = []
    last_result = None
    now = 0.0
    step = TICK_RESOLUTION if fine else period
    while now < 100 * check_interval:
        now = round(now + step, 6)
        ticks = []
        if schedule.sweep_due(now):
            schedule.sent(HOST, now)
            ticks.append(now)
        if fine and HOST in schedule.due_now(now) and not ticks:
            ticks.append(now)
        for at in ticks:
            row, out = apply(row, HostInput(Tick(at)), HOST, policy, settings, topics)
            schedule.note(HOST, row, policy_for)
            for topic, _, value in out:
                if topic == topics.fence_proposals and b'"proposal"' in value:
                    return at, gaps
                if topic != topics.probe_requests:
                    continue
                record = unpack_row(row)[0]
                if last_result is not None:
                    gaps.append((last_result, at))
                check = record["checks_requested"]
                # the reading never changes (stale after the baseline)
                result = ProbeFinished(
                    at=at + PROBE_S, episode=1, check=check, mtimes=(("/d", 1.0),), complete=True
                )
                row, out2 = apply(row, HostInput(result), HOST, policy, settings, topics)
                schedule.note(HOST, row, policy_for)
                last_result = at + PROBE_S
                for topic2, _, value2 in out2:
                    if topic2 == topics.fence_proposals and b'"proposal"' in value2:
                        return at + PROBE_S, gaps
    raise AssertionError("no proposal")


@pytest.mark.parametrize(("interval", "extra"), [(1.0, 2), (30.0, 2), (60.0, 1), (7.0, 3)])
def test_checks_go_out_when_due_and_never_sooner(interval: float, extra: int):
    proposed, gaps = _run(interval, extra, fine=True)
    # the ideal: check_interval between each result and the next request, probes included
    ideal = interval * (1 + extra) + (2 + extra) * PROBE_S
    # one timer resolution per check at most (plus float rounding)
    assert ideal <= proposed <= ideal + (2 + extra) * TICK_RESOLUTION + 1e-6
    assert len(gaps) == 1 + extra
    assert all(request - result >= interval for result, request in gaps)


def test_the_periodic_sweep_alone_is_what_made_checks_late():
    fine, _ = _run(30.0, 2, fine=True)
    coarse, _ = _run(30.0, 2, fine=False)
    assert coarse - fine >= 3 * 4.0  # each check waited for the next 5 s sweep


def test_next_tick_at_of_each_state():
    policy = FencerSettings(policy=PolicySettings(check_interval=10, probe_timeout=30)).policy
    p = policy.to_policy()
    assert next_tick_at({"state": "idle"}, p) is None
    assert next_tick_at({"state": "suspect", "opened_at": None}, p) == 0.0
    base = {"state": "suspect", "opened_at": 1.0, "checks_requested": 2}
    m = 0.001  # a millisecond late: the core's own subtraction must agree it is due
    assert next_tick_at({**base, "probe_outstanding": True, "last_request_at": 5.0}, p) == 35 + m
    assert next_tick_at({**base, "last_result_at": 7.0}, p) == 17 + m
    assert next_tick_at({**base, "checks_requested": 0}, p) == 0.0
    withheld = {**base, "state": "withheld", "last_result_at": 7.0}
    assert next_tick_at({**withheld, "withheld_reason": "storm_guard"}, p) == 17 + m
    assert next_tick_at({**withheld, "withheld_reason": "cluster_budget"}, p) is None
    proposed = {"state": "fence_proposed", "opened_at": 1.0, "sent_at": 3.0}
    assert next_tick_at(proposed, p) == 13 + m
    assert next_tick_at({**proposed, "state": "fencing"}, p) == 3 + p.fencing_resend_after + m
    assert next_tick_at({**proposed, "state": "fenced"}, p) is None


def test_a_closed_row_leaves_the_schedule():
    settings = FencerSettings(policy=PolicySettings(startup_quiet=0))
    s = TickSchedule(period=5.0)
    row, _ = apply(None, HostInput(HostDisconnected(0.0, HostStatus.DISCONNECTED), REF), HOST,
                   settings.policy.to_policy(), settings, settings.kafka.topics)  # fmt: skip
    s.note(HOST, row, settings.policy_for)
    assert s.due_now(0.0) == [HOST] and s.due_now(0.05) == []  # once per due time
    s.note(HOST, None, settings.policy_for)
    assert s.next == {}


def test_a_row_of_no_known_version_never_stops_the_timer():
    s = TickSchedule(period=5.0)
    s.note(HOST, [9, ["suspect"], []], FencerSettings().policy_for)
    assert s.next == {} and not wants_tick([9, ["suspect"], []])


def test_a_worker_clock_stepped_back_keeps_the_ticks_and_the_checks_going():
    """An NTP step back of an hour on the watch worker between two timer runs: the sweep goes on
    every period (it waited for the clock to pass its last sweep: an hour without a tick), and
    the real core sends the next check on the first tick after the step."""
    settings = FencerSettings(policy=PolicySettings(check_interval=30.0, startup_quiet=0))
    policy, topics = settings.policy.to_policy(), settings.kafka.topics
    schedule = TickSchedule(period=5.0)
    row, _ = apply(None, HostInput(HostDisconnected(0.0, HostStatus.DISCONNECTED), REF), HOST,
                   policy, settings, topics)  # fmt: skip

    def timer(now: float) -> list[str]:
        """One run of the tick timer (app.tick's logic): the topics each tick produced."""
        nonlocal row
        ticks = [now] if schedule.sweep_due(now) else []
        if not ticks and HOST in schedule.due_now(now):
            ticks.append(now)
        sent: list[str] = []
        for at in ticks:
            row, out = apply(row, HostInput(Tick(at)), HOST, policy, settings, topics)
            schedule.note(HOST, row, settings.policy_for)
            sent += [topic for topic, _, _ in out]
        return sent

    assert timer(1000.0) == [topics.probe_requests]  # the baseline, check 1
    for check, at in ((1, 1000.3), (2, 1030.7)):
        result = ProbeFinished(at=at, episode=1, check=check, mtimes=(("/d", 1.0),), complete=True)
        row, _ = apply(row, HostInput(result), HOST, policy, settings, topics)
        schedule.note(HOST, row, settings.policy_for)
        if check == 1:
            assert timer(1030.4) == [topics.probe_requests]  # check 2, due at 1030.3
    assert unpack_row(row)[0]["stale_count"] == 1
    # The clock steps back an hour; the timer runs every TICK_RESOLUTION from there.
    now, requests = 1031.0 - 3600, []
    while now < 1031.0 - 3600 + 10 and not requests:
        requests = [t for t in timer(now) if t == topics.probe_requests]
        now = round(now + TICK_RESOLUTION, 6)
    assert requests, "no check within 10 s of the step back"
    assert unpack_row(row)[0]["checks_requested"] == 3


def test_the_sweep_ticks_a_row_without_a_due_tick_every_period_and_one_with_one_as_a_net():
    """A row with nothing scheduled gets the sweep's tick when it had none for a period; a row
    whose own due tick is still to come only when it had none for SWEEP_NET; a clock that went
    back past its last tick ticks it at once."""
    s = TickSchedule(period=0.5)
    assert s.sweep_wants(HOST, 10.0)  # never ticked
    s.sent(HOST, 10.0)
    assert not s.sweep_wants(HOST, 10.0) and not s.sweep_wants(HOST, 10.49)
    assert s.sweep_wants(HOST, 10.5)  # nothing scheduled: every period, as before
    s.next[HOST] = 11.0  # its next check falls due at 11.0
    assert not s.sweep_wants(HOST, 10.5) and not s.sweep_wants(HOST, 10.0 + SWEEP_NET - 0.01)
    assert s.sweep_wants(HOST, 10.0 + SWEEP_NET)  # the net, should the due tick never come
    assert s.due_now(11.0) == [HOST]
    # ticked at its due time and nothing new scheduled (the row did not change): every period
    assert not s.sweep_wants(HOST, 11.49) and s.sweep_wants(HOST, 11.5)
    # the clock stepped back past the last tick: ticked now, not once the clock caught up
    assert s.sweep_wants(HOST, 9.0)


Run = tuple[list[float], list[float], list[tuple[float, float]]]


def _timer_run(check_interval: float, seconds: float, answer: bool) -> Run:
    """The tick timer's logic as app.tick runs it (a sweep every min(check_interval / 2, 5 s)
    asking `sweep_wants`, due ticks every TICK_RESOLUTION) through the real core, a prober that
    answers each request alive after PROBE_S (or never, `answer` false): every tick, the sweep's
    ticks among them, and (result, next request) pairs."""
    settings = FencerSettings(
        policy=PolicySettings(check_interval=check_interval, probe_timeout=30, startup_quiet=0)
    )
    policy, topics = settings.policy.to_policy(), settings.kafka.topics
    period = min(check_interval / 2, 5.0)
    schedule = TickSchedule(period=period)
    row, _ = apply(None, HostInput(HostDisconnected(0.0, HostStatus.DISCONNECTED), REF), HOST,
                   policy, settings, topics)  # fmt: skip
    schedule.note(HOST, row, settings.policy_for)
    ticks: list[float] = []
    swept: list[float] = []
    results: list[float] = []
    gaps: list[tuple[float, float]] = []
    now = 0.0
    while now < seconds:
        now = round(now + TICK_RESOLUTION, 6)
        sent = []
        if schedule.sweep_due(now) and schedule.sweep_wants(HOST, now):
            schedule.sent(HOST, now)
            sent.append(now)
            swept.append(now)
        if HOST in schedule.due_now(now) and not sent:
            sent.append(now)
        for at in sent:
            row, out = apply(row, HostInput(Tick(at)), HOST, policy, settings, topics)
            schedule.note(HOST, row, settings.policy_for)
            ticks.append(at)
            if not answer or topics.probe_requests not in [t for t, _, _ in out]:
                continue
            if results:
                gaps.append((results[-1], at))
            check = unpack_row(row)[0]["checks_requested"]
            mtimes = (("/d", float(check)),)  # a new write every check: alive, still suspect
            result = ProbeFinished(
                at=at + PROBE_S, episode=1, check=check, mtimes=mtimes, complete=True
            )
            row, _ = apply(row, HostInput(result), HOST, policy, settings, topics)
            schedule.note(HOST, row, settings.policy_for)
            results.append(at + PROBE_S)
    return ticks, swept, gaps


@pytest.mark.parametrize("interval", [1.0, 30.0])
def test_a_checked_host_is_ticked_when_its_checks_are_due_and_by_the_sweep_only_as_a_net(
    interval: float,
) -> None:
    """Checks every check_interval, each requested within a resolution of being due; the
    sweep's ticks come only as the net (at most one per SWEEP_NET), no longer two per second
    with a 1 s interval; no gap between two ticks longer than the interval plus the probe."""
    seconds = 60 * interval
    ticks, swept, gaps = _timer_run(interval, seconds, answer=True)
    assert len(gaps) >= seconds / (interval + PROBE_S + TICK_RESOLUTION) - 2
    assert all(interval <= b - a <= interval + TICK_RESOLUTION + 1e-6 for a, b in gaps)
    assert len(swept) <= seconds / SWEEP_NET + 1
    assert (
        max(b - a for a, b in itertools.pairwise(ticks)) <= interval + PROBE_S + 2 * TICK_RESOLUTION
    )


def test_a_host_whose_probe_never_answers_still_gets_a_tick_at_least_every_net() -> None:
    """A probe that never answers (its timeout 30 s): the lost probe's due tick comes at the
    timeout, and meanwhile the sweep's net ticks the host every SWEEP_NET (reminders)."""
    ticks, swept, _ = _timer_run(1.0, 120.0, answer=False)
    assert max(b - a for a, b in itertools.pairwise(ticks)) <= SWEEP_NET + 1.0
    assert len(swept) >= 120.0 / (SWEEP_NET + 1.0)
