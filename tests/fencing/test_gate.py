"""Table-driven tests of the cluster gate: the whole cluster row, the global row and the verdict
after every request."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fencing.events import FenceAction, WithheldReason
from fencing.gate import (
    ClusterGate,
    ClusterPaused,
    ClusterSized,
    FenceRequest,
    GateContext,
    GlobalGate,
    Grant,
    HostCleared,
    HostSuspected,
    IllegalRequest,
    Logged,
    Verdict,
    decide,
    logged_grants,
    observe,
    pause_all,
    reconcile,
)
from fencing.policy import Policy

POLICY = Policy(fence_cap=3, fence_window=3600.0, global_cap=4, storm_ratio=0.5, startup_quiet=120)
START = 0.0
CTX = GateContext(policy=POLICY, started_at=START)
T = 10_000.0


def judge(
    cluster: ClusterGate,
    glob: GlobalGate,
    r: FenceRequest,
    ctx: GateContext = CTX,
    now: float | None = None,
) -> tuple[ClusterGate, GlobalGate, Verdict]:
    """The gate at its own clock; unless a test says otherwise, the worker clocks agree."""
    return decide(cluster, glob, r, ctx, r.at if now is None else now)


def ready(cluster: str = "c1", hosts: int = 10) -> ClusterGate:
    return observe(ClusterGate(cluster), ClusterSized(hosts))


def req(
    n: int, at: float, action: FenceAction = FenceAction.STOP, cluster: str = "c1"
) -> FenceRequest:
    return FenceRequest(decision_id=f"d{n}", host=f"h{n}", cluster=cluster, action=action, at=at)


def approved(r: FenceRequest, used: int, at: float | None = None) -> Verdict:
    return Verdict(
        r.decision_id,
        r.host,
        r.cluster,
        r.action,
        r.at if at is None else at,
        True,
        None,
        used,
        POLICY.fence_cap,
    )


def withheld(
    r: FenceRequest, reason: WithheldReason, used: int, at: float | None = None
) -> Verdict:
    return Verdict(
        r.decision_id,
        r.host,
        r.cluster,
        r.action,
        r.at if at is None else at,
        False,
        reason,
        used,
        POLICY.fence_cap,
    )


def grant(r: FenceRequest, at: float | None = None) -> Grant:
    return Grant(r.decision_id, r.host, r.cluster, r.at if at is None else at)


def test_cap_per_sliding_window_per_cluster() -> None:
    cluster, glob = ready(), GlobalGate()
    r1, r2, r3 = req(1, T), req(2, T + 10), req(3, T + 20, FenceAction.REBOOT)
    r4 = req(4, T + 30)
    r5 = req(5, T + 3600)  # r1 left the window (half-open: now - at < window)
    r6 = req(6, T + 3605)  # r2 is still inside
    expected = []
    for r, verdict in [
        (r1, approved(r1, 1)),
        (r2, approved(r2, 2)),
        (r3, approved(r3, 3)),
        (r4, withheld(r4, WithheldReason.CAP_REACHED, 3)),
        (r5, approved(r5, 3)),
        (r6, withheld(r6, WithheldReason.CAP_REACHED, 3)),
    ]:
        cluster, glob, got = judge(cluster, glob, r, CTX)
        assert got == verdict
        expected.append(verdict)
    live = (grant(r2), grant(r3), grant(r5))
    recent = tuple(v for v in expected if T + 3605 - v.at < 3600)
    assert cluster == ClusterGate("c1", hosts=10, clock=T + 3605, grants=live, verdicts=recent)
    assert glob == GlobalGate(clock=T + 3605, grants=live)


def test_nothing_and_blink_never_consume_the_budget() -> None:
    cluster, glob = ready(), GlobalGate()
    full = tuple(grant(req(n, T + n)) for n in range(3))
    cluster = replace(cluster, grants=full, clock=T + 2)
    glob = replace(glob, grants=full, clock=T + 2)
    for n, action in ((7, FenceAction.NOTHING), (8, FenceAction.BLINK)):
        r = req(n, T + 5, action)
        before = cluster
        cluster, glob, got = judge(cluster, glob, r, CTX)
        assert got == approved(r, 3)
        assert cluster == replace(before, clock=T + 5, verdicts=(*before.verdicts, got))
        assert glob == GlobalGate(clock=T + 5, grants=full)
    stop = req(9, T + 6)
    _, _, got = judge(cluster, glob, stop, CTX)
    assert got == withheld(stop, WithheldReason.CAP_REACHED, 3)


def test_global_cap_spans_clusters() -> None:
    glob = GlobalGate()
    a, b = ready("a"), ready("b")
    verdicts = []
    for n, at in enumerate((T, T + 1, T + 2)):
        a, glob, v = judge(a, glob, req(n, at, cluster="a"), CTX)
        verdicts.append(v.approved)
    b, glob, v1 = judge(b, glob, req(10, T + 3, cluster="b"), CTX)
    b, glob, v2 = judge(b, glob, req(11, T + 4, cluster="b"), CTX)
    assert verdicts == [True, True, True]
    assert v1 == replace(approved(req(10, T + 3, cluster="b"), 1))
    assert v2 == withheld(req(11, T + 4, cluster="b"), WithheldReason.GLOBAL_CAP_REACHED, 1)
    assert len(glob.grants) == 4 and glob.clock == T + 4
    assert b == ClusterGate(
        "b", hosts=10, clock=T + 4, grants=(grant(req(10, T + 3, cluster="b")),), verdicts=(v1, v2)
    )


@pytest.mark.parametrize(
    ("hosts", "marked", "reason"),
    [
        (4, {"h1"}, None),  # only the requester
        (4, {"h1", "h2"}, None),  # 2/4 = 0.5: not above the ratio
        (4, {"h1", "h2", "h3"}, WithheldReason.STORM_GUARD),
        (4, {"h2", "h3"}, WithheldReason.STORM_GUARD),  # the requester always counts
        (1, set(), WithheldReason.STORM_GUARD),  # a one-host cluster: 1/1
        (2, {"h2", "h3", "h4"}, WithheldReason.STORM_GUARD),  # more suspects than hosts known
        (0, set(), WithheldReason.CLUSTER_SIZE_UNKNOWN),
    ],
)
def test_storm_guard(hosts: int, marked: set[str], reason: WithheldReason | None) -> None:
    cluster = ready(hosts=hosts)
    for host in marked:
        cluster = observe(cluster, HostSuspected(host))
    r = req(1, T)
    new, glob, got = judge(cluster, GlobalGate(), r, CTX)
    if reason is None:
        assert got == approved(r, 1)
        assert glob == GlobalGate(clock=T, grants=(grant(r),))
    else:
        assert got == withheld(r, reason, 0)
        assert glob == GlobalGate(clock=T)
    assert new.suspect == frozenset(marked) and new.hosts == hosts


def test_membership_facts() -> None:
    cluster = ClusterGate("c1")
    cluster = observe(cluster, HostSuspected("h1"))
    cluster = observe(cluster, HostSuspected("h1"))
    cluster = observe(cluster, HostSuspected("h2"))
    cluster = observe(cluster, HostCleared("h1"))
    cluster = observe(cluster, HostCleared("h9"))
    cluster = observe(cluster, ClusterSized(-3))
    assert cluster == ClusterGate("c1", suspect=frozenset({"h2"}))
    assert observe(cluster, ClusterPaused(True)) == replace(cluster, paused=True)


def test_quiet_period_after_start() -> None:
    ctx = replace(CTX, started_at=T)
    r1, r2 = req(1, T + 119.9), req(2, T + 120)
    cluster, glob, v1 = judge(ready(), GlobalGate(), r1, ctx)
    cluster, glob, v2 = judge(cluster, glob, r2, ctx)
    assert v1 == withheld(r1, WithheldReason.QUIET_PERIOD, 0)
    assert v2 == approved(r2, 1)


@pytest.mark.parametrize("where", ["cluster", "global"])
def test_operator_pause_withholds_everything(where: str) -> None:
    cluster, glob = ready(), GlobalGate()
    if where == "cluster":
        cluster = observe(cluster, ClusterPaused(True))
    else:
        glob = pause_all(glob, True)
    r1 = req(1, T, FenceAction.BLINK)
    cluster, glob, v1 = judge(cluster, glob, r1, CTX)
    assert v1 == withheld(r1, WithheldReason.PAUSED, 0)
    cluster = observe(cluster, ClusterPaused(False))
    glob = pause_all(glob, False)
    r2 = req(2, T + 1)
    cluster, glob, v2 = judge(cluster, glob, r2, CTX)
    assert v2 == approved(r2, 1)
    assert cluster == ClusterGate(
        "c1", hosts=10, clock=T + 1, grants=(grant(r2),), verdicts=(v1, v2)
    )


def test_a_redelivered_approval_is_repeated_at_the_gate_clock_and_consumes_nothing() -> None:
    cluster, glob = ready(), GlobalGate()
    r1 = req(1, T)
    cluster, glob, v1 = judge(cluster, glob, r1, CTX)
    again = replace(r1, at=T + 50)
    c2, g2, v2 = judge(cluster, glob, again, CTX)
    assert v2 == replace(v1, repeated=True, at=T + 50)
    # the row keeps the first verdict and the one grant
    assert c2 == replace(cluster, clock=T + 50) and g2 == replace(glob, clock=T + 50)


@pytest.mark.parametrize("reason", [WithheldReason.CAP_REACHED, WithheldReason.GLOBAL_CAP_REACHED])
def test_a_final_withhold_is_repeated_even_when_the_budget_came_back(
    reason: WithheldReason,
) -> None:
    policy = (
        replace(POLICY, fence_cap=1)
        if reason is WithheldReason.CAP_REACHED
        else replace(POLICY, global_cap=1)
    )
    ctx = replace(CTX, policy=policy)
    other = ready("c0") if reason is WithheldReason.GLOBAL_CAP_REACHED else None
    cluster, glob = ready(), GlobalGate()
    if other is not None:
        _, glob, _ = judge(other, glob, req(9, T, cluster="c0"), ctx)
    else:
        cluster, glob, _ = judge(cluster, glob, req(9, T), ctx)
    r1 = req(1, T + 10)
    cluster, glob, v1 = judge(cluster, glob, r1, ctx)
    assert (v1.approved, v1.reason) == (False, reason)
    later = T + 3605  # the grant left the window, the verdict is still inside it
    c2, g2, v2 = judge(cluster, glob, replace(r1, at=later), ctx)
    assert v2 == replace(v1, repeated=True, at=later)
    assert c2.grants == () and g2.grants == ()


@pytest.mark.parametrize(
    ("block", "unblock", "reason"),
    [
        (
            lambda c: observe(c, ClusterPaused(True)),
            lambda c: observe(c, ClusterPaused(False)),
            WithheldReason.PAUSED,
        ),
        (
            lambda c: replace(c, hosts=0),
            lambda c: observe(c, ClusterSized(10)),
            WithheldReason.CLUSTER_SIZE_UNKNOWN,
        ),
        (
            lambda c: observe(observe(c, HostSuspected("h8")), HostSuspected("h9")),
            lambda c: observe(observe(c, HostCleared("h8")), HostCleared("h9")),
            WithheldReason.STORM_GUARD,
        ),
    ],
)
def test_a_temporary_withhold_is_judged_again_once_the_reason_passed(
    block: object, unblock: object, reason: WithheldReason
) -> None:
    cluster, glob = block(ready(hosts=4)), GlobalGate()  # type: ignore[operator]
    r1 = req(1, T)
    cluster, glob, v1 = judge(cluster, glob, r1, CTX)
    assert v1 == withheld(r1, reason, 0)
    # still blocked: judged again, withheld again, nothing consumed, one verdict kept
    cluster, glob, v2 = judge(cluster, glob, replace(r1, at=T + 60), CTX)
    assert v2 == withheld(r1, reason, 0, at=T + 60) and not v2.repeated
    assert [v.decision_id for v in cluster.verdicts] == ["d1"]
    cluster = unblock(cluster)  # type: ignore[operator]
    cluster, glob, v3 = judge(cluster, glob, replace(r1, at=T + 120), CTX)
    assert v3 == approved(r1, 1, at=T + 120)
    assert cluster.verdicts == (v3,) and glob.grants == (grant(r1, at=T + 120),)
    # and from now on the approval is repeated
    _, _, v4 = judge(cluster, glob, replace(r1, at=T + 180), CTX)
    assert v4 == replace(v3, repeated=True, at=T + 180)


def test_the_quiet_period_counts_on_the_gate_clock_not_the_stamp() -> None:
    ctx = replace(CTX, started_at=T)
    r1 = req(1, T + 200)  # stamped after the quiet period by a worker 100 s fast
    cluster, glob, v1 = judge(ready(), GlobalGate(), r1, ctx, now=T + 100)
    assert v1 == withheld(r1, WithheldReason.QUIET_PERIOD, 0, at=T + 100)
    cluster, glob, v2 = judge(cluster, glob, replace(r1, at=T + 120), ctx, now=T + 121)
    assert v2 == approved(r1, 1, at=T + 121)


@pytest.mark.parametrize("offset", [-600.0, 600.0, -2 * 3600.0, 2 * 3600.0])
def test_a_stamp_minutes_off_the_gate_clock_is_judged_normally(offset: float) -> None:
    """Two machines' clocks are never compared: a watch worker 10 minutes (or 2 hours) slow or
    fast has its proposals judged at the gate's clock like any other."""
    cluster, glob = ready(), GlobalGate()
    r1 = req(1, T)
    cluster, glob, _ = judge(cluster, glob, r1, CTX)
    off = req(2, T + 1 + offset)
    cluster, glob, got = judge(cluster, glob, off, CTX, now=T + 1)
    assert got == approved(off, 2, at=T + 1)
    assert glob.grants == (grant(r1), grant(off, at=T + 1))
    assert cluster.grants == glob.grants and cluster.clock == T + 1
    # with the budget spent it meets the cap like any other
    cluster, glob, _ = judge(cluster, glob, req(3, T + 2), CTX)
    late = req(4, T + 3 + offset)
    _, _, got = judge(cluster, glob, late, CTX, now=T + 3)
    assert got == withheld(late, WithheldReason.CAP_REACHED, 3, at=T + 3)


def test_a_grant_stamped_after_the_gate_clock_still_counts() -> None:
    # the gate's own clock stepped back 10 minutes: earlier grants stay in the window
    cluster, glob = ready(), GlobalGate()
    for n in range(3):
        cluster, glob, _ = judge(cluster, glob, req(n, T + n), CTX)
    r = req(5, T - 600)
    _, _, v = judge(cluster, glob, r, CTX, now=T - 600)
    assert v == withheld(r, WithheldReason.CAP_REACHED, 3, at=T - 600)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0, 2000),  # how far the gate's clock moved since the last request
            st.floats(-3 * 3600, 3 * 3600),  # the proposing worker's clock error
            st.integers(0, 6),  # which host (and decision)
            st.sampled_from(["a", "b"]),
            st.sampled_from([FenceAction.STOP, FenceAction.REBOOT, FenceAction.BLINK]),
        ),
        max_size=40,
    )
)
def test_no_window_ever_holds_more_than_the_cap_whatever_the_stamps(
    steps: list[tuple[float, float, int, str, FenceAction]],
) -> None:
    policy = replace(POLICY, global_cap=5)
    ctx = replace(CTX, policy=policy)
    rows = {"a": ready("a"), "b": ready("b")}
    glob = GlobalGate()
    now = T
    granted: list[tuple[float, str]] = []
    for moved, error, host, cluster, action in steps:
        now += moved
        r = FenceRequest(f"{cluster}{host}", f"{cluster}{host}", cluster, action, now + error)
        before = len(glob.grants)
        rows[cluster], glob, v = decide(rows[cluster], glob, r, ctx, now)
        assert v.at == now and v.approved == (v.reason is None)
        if len(glob.grants) > before:
            assert v.approved and not v.repeated and action.powers_down and v.at == now
            granted.append((now, cluster))
    for t, _ in granted:
        inside = [c for at, c in granted if t - policy.fence_window < at <= t]
        assert len(inside) <= policy.global_cap
        for name in ("a", "b"):
            assert inside.count(name) <= policy.fence_cap


def test_operator_only_actions_and_foreign_rows_are_refused() -> None:
    with pytest.raises(IllegalRequest, match="operator-only"):
        judge(ready(), GlobalGate(), req(1, T, FenceAction.START), CTX)
    with pytest.raises(IllegalRequest, match="operator-only"):
        judge(ready(), GlobalGate(), req(1, T, FenceAction.TEST), CTX)
    with pytest.raises(IllegalRequest, match="cluster c2"):
        judge(ready(), GlobalGate(), req(1, T, cluster="c2"), CTX)


def test_zero_caps_disable_power_downs_only() -> None:
    ctx = replace(CTX, policy=replace(POLICY, fence_cap=0))
    r1, r2 = req(1, T), req(2, T, FenceAction.NOTHING)
    cluster, glob, v1 = judge(ready(), GlobalGate(), r1, ctx)
    cluster, glob, v2 = judge(cluster, glob, r2, ctx)
    assert (v1.approved, v1.reason, v2.approved) == (False, WithheldReason.CAP_REACHED, True)
    ctx = replace(CTX, policy=replace(POLICY, global_cap=0))
    _, _, v3 = judge(ready(), GlobalGate(), r1, ctx)
    assert v3.reason is WithheldReason.GLOBAL_CAP_REACHED


# -- the two rows of one decision are two writes: a worker can die between them ----------------


def test_reconcile_merges_every_cluster_rows_grants_by_decision_id() -> None:
    a1, a2 = grant(req(1, T, cluster="a")), grant(req(2, T + 5, cluster="a"))
    b3, old = grant(req(3, T + 2, cluster="b")), grant(req(4, T - 3600, cluster="b"))
    glob = GlobalGate(clock=T, grants=(a1,))
    rows = [ClusterGate("a", grants=(a1, a2)), ClusterGate("b", grants=(old, b3))]
    merged = reconcile(glob, rows, T + 10, POLICY.fence_window)
    # nothing twice, nothing out of the window, the rest oldest first
    assert merged == GlobalGate(clock=T, grants=(a1, b3, a2))
    # the same grant in two rows (a key spelled twice) is still one grant
    again = reconcile(merged, [*rows, ClusterGate("b", grants=(b3,))], T + 11, 3600.0)
    assert again is merged
    assert reconcile(GlobalGate(), [ClusterGate("b", grants=(b3, b3))], T, 3600.0).grants == (b3,)


def test_a_grant_whose_global_write_was_lost_counts_toward_the_global_cap() -> None:
    ctx = replace(CTX, policy=replace(POLICY, global_cap=2))
    a, b, glob = ready("a"), ready("b"), GlobalGate()
    a, glob, _ = judge(a, glob, req(1, T, cluster="a"), ctx)
    before = glob
    a, glob, v2 = judge(a, glob, req(2, T + 1, cluster="a"), ctx)
    assert v2.approved
    glob = before  # the worker died after writing the cluster row: the global row is older
    r3 = req(3, T + 2, cluster="b")
    # Without the reconciliation the other cluster would get a third fence (the bug) ...
    _, _, unsafe = judge(b, glob, r3, ctx)
    assert unsafe.approved
    # ... with it the lost grant counts again.
    whole = reconcile(glob, [a, b], T + 2, POLICY.fence_window)
    assert [g.decision_id for g in whole.grants] == ["d1", "d2"]
    b, glob, v3 = judge(b, whole, r3, ctx)
    assert v3 == withheld(r3, WithheldReason.GLOBAL_CAP_REACHED, 0)
    assert [g.decision_id for g in glob.grants] == ["d1", "d2"]


def test_the_same_cluster_makes_the_global_row_whole_without_help() -> None:
    ctx = replace(CTX, policy=replace(POLICY, global_cap=2))
    a, glob = ready("a"), GlobalGate()
    a, glob, _ = judge(a, glob, req(1, T, cluster="a"), ctx)
    before = glob
    a, _, _ = judge(a, glob, req(2, T + 1, cluster="a"), ctx)
    r3 = req(3, T + 2, cluster="a")
    a, glob, v3 = judge(a, before, r3, ctx)
    assert v3 == withheld(r3, WithheldReason.GLOBAL_CAP_REACHED, 2)
    assert [g.decision_id for g in glob.grants] == ["d1", "d2"]


def test_a_grant_whose_cluster_write_was_lost_counts_once_and_is_approved_once() -> None:
    """The reverse order: the global row was written, the cluster row was not (the proposal's
    position with it): the proposal is judged again. It must not count twice, and must not
    take a second place in either budget."""
    ctx = replace(CTX, policy=replace(POLICY, fence_cap=2))
    cluster, glob = ready(), GlobalGate()
    r1, r2 = req(1, T), req(2, T + 1)
    cluster, glob, _ = judge(cluster, glob, r1, ctx)
    before = cluster
    _, glob, v2 = judge(cluster, glob, r2, ctx)
    cluster = before  # the worker died after writing the global row
    # Another request of the cluster meets both grants: the cap (2) is reached.
    r3 = req(3, T + 2)
    cluster, glob, v3 = judge(cluster, glob, r3, ctx)
    assert (v3.approved, v3.reason, v3.budget_used) == (False, WithheldReason.CAP_REACHED, 2)
    assert cluster.grants == glob.grants == (grant(r1), grant(r2))
    # The proposal read again: approved again (the same fence), nothing consumed.
    cluster, glob, again = judge(cluster, glob, replace(r2, at=T + 3), ctx, now=T + 3)
    first = replace(v2, budget_cap=2)
    assert again == replace(first, repeated=True, at=T + 3)
    assert cluster.grants == glob.grants == (grant(r1), grant(r2))
    assert cluster.verdicts[-1] == first and cluster.clock == T + 3
    # ... and from now on its verdict is in the row: repeated as any approval.
    _, _, third = judge(cluster, glob, replace(r2, at=T + 4), ctx, now=T + 4)
    assert third == replace(first, repeated=True, at=T + 4)


def test_a_lost_approval_over_a_temporary_withhold_is_approved_again() -> None:
    cluster, glob = observe(ready(), ClusterPaused(True)), GlobalGate()
    r1 = req(1, T)
    cluster, glob, v1 = judge(cluster, glob, r1, CTX)
    assert v1.reason is WithheldReason.PAUSED
    paused = cluster
    cluster = observe(cluster, ClusterPaused(False))
    _, glob, v2 = judge(cluster, glob, replace(r1, at=T + 60), CTX)
    assert v2 == approved(r1, 1, at=T + 60)
    # the approval's cluster write lost: the row still holds the withhold; paused again since
    cluster, glob, v3 = judge(paused, glob, replace(r1, at=T + 90), CTX)
    assert v3 == replace(v2, repeated=True, at=T + 90)
    assert cluster.verdicts == (v2,) and cluster.grants == (grant(r1, at=T + 60),)


# -- the decision log: a decision published whose two row writes were both lost ----------------


def logged(v: Verdict) -> Logged:
    """The decision record of a verdict, as the shell reads it back from fence-decisions."""
    return Logged(v.decision_id, v.host, v.cluster, v.action, v.approved, v.at)


def test_the_log_proves_one_grant_per_approved_power_down_in_the_window() -> None:
    r1, r2, r3 = req(1, T), req(2, T + 1), req(3, T + 2, FenceAction.BLINK)
    log = [
        logged(approved(r1, 1)),
        logged(approved(r1, 1, at=T + 30)),  # repeated: the first stamp counts
        logged(withheld(r2, WithheldReason.CAP_REACHED, 3)),
        logged(approved(r2, 2, at=T + 40)),
        logged(approved(r3, 2)),  # a blink consumes nothing
        Logged("d4", "h4", None, FenceAction.STOP, True, T),  # no cluster: never approved
        logged(approved(req(5, T - 3600), 1)),  # left the window
        logged(approved(req(6, T + 99), 3)),  # stamped after `now`: still counts
    ]
    assert logged_grants(log, T + 50, 3600.0) == (
        grant(r1),
        grant(r2, at=T + 40),
        grant(req(6, T + 99)),
    )
    # The first approval left the window, its repeat has not: the repeat counts (never shorter).
    assert logged_grants(log, T + 3600, 3600.0) == (
        grant(r1, at=T + 30),
        grant(r2, at=T + 40),
        grant(req(6, T + 99)),
    )
    assert logged_grants([], T, 3600.0) == ()


def test_a_published_decision_whose_two_row_writes_were_lost_counts_in_both_caps() -> None:
    ctx = replace(CTX, policy=replace(POLICY, fence_cap=2, global_cap=3))
    a, b, glob = ready("a"), ready("b"), GlobalGate()
    published: list[Verdict] = []
    for r in (req(1, T, cluster="a"), req(2, T + 1, cluster="b")):
        row = a if r.cluster == "a" else b
        row, glob, v = judge(row, glob, r, ctx)
        a, b = (row, b) if r.cluster == "a" else (a, row)
        published.append(v)
    old_a, old_glob = a, glob
    r3 = req(3, T + 2, cluster="a")
    _, _, v3 = judge(a, glob, r3, ctx)
    assert v3.approved
    published.append(v3)
    # The worker died after publishing v3, before either row's write: the rows are the old ones.
    a, glob = old_a, old_glob
    r4, r5 = req(4, T + 3, cluster="a"), req(5, T + 3, cluster="b")
    # Without the log the cluster and the global cap would each grant one fence too many (the bug)
    assert judge(a, reconcile(glob, [a, b], T + 3, 3600.0), r4, ctx)[2].approved
    assert judge(b, reconcile(glob, [a, b], T + 3, 3600.0), r5, ctx)[2].approved
    # ... with it, both hold.
    proved = logged_grants(map(logged, published), T + 3, 3600.0)
    whole = reconcile(glob, [a, b], T + 3, 3600.0, proved)
    assert [g.decision_id for g in whole.grants] == ["d1", "d2", "d3"]
    a2, glob2, v4 = judge(a, whole, r4, ctx)
    assert v4 == replace(withheld(r4, WithheldReason.CAP_REACHED, 2), budget_cap=2)
    assert a2.grants == glob2.grants[0::2] == (grant(req(1, T, cluster="a")), grant(r3))
    _, _, v5 = judge(b, whole, r5, ctx)
    assert v5 == replace(withheld(r5, WithheldReason.GLOBAL_CAP_REACHED, 1), budget_cap=2)
    # The lost decision proposed again: the same approval, nothing consumed.
    _, glob3, again = judge(a, whole, replace(r3, at=T + 4), ctx)
    assert again == replace(v3, repeated=True, at=T + 4)
    assert glob3.grants == whole.grants
    # Reconciled twice with the same log: nothing changes.
    assert reconcile(whole, [a, b], T + 3, 3600.0, proved) is whole


def test_a_fence_approved_again_after_its_window_counts_though_both_row_writes_were_lost() -> None:
    """A decision approved, and approved again once its first grant left the window (proposed
    again after a refusal); the worker died after publishing the second approval, before either
    row's write. The global row still holds the first, expired grant of that decision id: it
    must not hide the logged new one (it did: the next fence in the cluster was approved, two
    power-downs in one window against a cap of one). Found by TestGateMachine."""
    ctx = replace(CTX, policy=replace(POLICY, fence_cap=1, global_cap=2, fence_window=60.0))
    a, glob = ready("a"), GlobalGate()
    r1, r2 = req(1, T, cluster="a"), req(2, T, cluster="a")
    a, glob, v2 = judge(a, glob, r2, ctx)
    assert v2.approved
    log = [logged(v2)]
    _, _, again = judge(a, reconcile(glob, [a], T + 60, 60.0), replace(r2, at=T + 60), ctx)
    assert again.approved and not again.repeated  # a new grant: the first left the window
    log.append(logged(again))  # published; both row writes lost: `a` and `glob` are the old
    proved = logged_grants(log, T + 60, 60.0)
    assert proved == (grant(r2, at=T + 60),)
    whole = reconcile(glob, [a], T + 60, 60.0, proved)
    assert whole.grants == (grant(r2, at=T + 60),)
    _, _, v1 = judge(a, whole, replace(r1, at=T + 60), ctx)
    assert v1 == replace(withheld(r1, WithheldReason.CAP_REACHED, 1, at=T + 60), budget_cap=1)
