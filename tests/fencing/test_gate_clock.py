"""The gate's windows on one clock: rows and logged decisions stamped by another gate process
(the gates partition moved, or the worker restarted) are taken over at their age on the clock
that stamped them, never compared with the new owner's clock (safety rule 1)."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from fencing.events import FenceAction, WithheldReason
from fencing.gate import (
    ClusterGate,
    ClusterSized,
    FenceRequest,
    GateContext,
    GlobalGate,
    Grant,
    Logged,
    Verdict,
    decide,
    latest_known,
    logged_grants,
    observe,
    one_clock,
    reconcile,
    refreshed,
    restamp,
    take_over,
    take_over_global,
    take_over_logged,
)
from fencing.policy import Policy

MIN = 60.0
WINDOW = 30 * MIN
POLICY = Policy(fence_cap=1, fence_window=WINDOW, global_cap=5, storm_ratio=0.5, startup_quiet=0)
T = 1_000_000.0
ON_A = GateContext(policy=POLICY, started_at=0.0, clock_id="A")
ON_B = GateContext(policy=POLICY, started_at=0.0, clock_id="B")


def ready(cluster: str = "c1") -> ClusterGate:
    return observe(ClusterGate(cluster), ClusterSized(10))


def req(n: int, at: float = 0.0, cluster: str = "c1") -> FenceRequest:
    return FenceRequest(f"d{n}", f"h{n}", cluster, FenceAction.STOP, at)


def logged(v: Verdict, clock_id: str | None) -> Logged:
    return Logged(v.decision_id, v.host, v.cluster, v.action, v.approved, v.at, clock_id)


def handed_over(
    glob: GlobalGate, rows: list[ClusterGate], log: list[Logged], now: float, own: str | None
) -> tuple[GlobalGate, dict[str, ClusterGate]]:
    """What the shell does when it takes the rows over: every row and the log on its clock, the
    shared row reconciled with them."""
    g, clusters, on_own = one_clock(glob, rows, log, now, own)
    whole = reconcile(g, clusters, now, WINDOW, logged_grants(on_own, now, WINDOW))
    return whole, {c.cluster: c for c in clusters}


def approved_on_a() -> tuple[ClusterGate, GlobalGate, Verdict]:
    row, glob, v = decide(ready(), GlobalGate(), req(1), ON_A, T)
    assert v.approved and row.clock_id == glob.clock_id == "A"
    return row, glob, v


# B's clock runs 30 min ahead of A's: B takes over moments (5 s) after A's last known moment.
AHEAD = WINDOW
TAKEN = T + 5 + AHEAD  # B's clock at the take-over
LATER = TAKEN + 10 * MIN  # B's clock 10 min later: the grant is 10 min 5 s old in truth


def test_a_grant_of_the_old_owner_counts_on_the_new_owners_clock_ahead() -> None:
    """Cap 1 in 30 min. A approves a fence; the partition moves to B, whose clock is 30 min
    ahead; 10 min later B is asked for another. Compared with B's clock A's grant looked 40 min
    old, out of the window: a second power-down in 10 minutes against a cap of one."""
    row, glob, _ = approved_on_a()
    # Today's comparison (the rows' stamps taken as they are on B's clock) approves: the bug.
    _, _, unsafe = decide(row, glob, req(2), replace(ON_B, clock_id="A"), LATER)
    assert unsafe.approved
    # Taken over: the grant keeps its age on A's clock (0 s at A's last known moment).
    whole, rows = handed_over(glob, [row], [], TAKEN, "B")
    assert whole.grants == (Grant("d1", "h1", "c1", TAKEN),) == rows["c1"].grants
    assert whole.clock_id == rows["c1"].clock_id == "B" and whole.clock == TAKEN
    row2, glob2, v2 = decide(rows["c1"], whole, req(2), ON_B, LATER)
    assert (v2.approved, v2.reason, v2.budget_used) == (False, WithheldReason.CAP_REACHED, 1)
    # Without the shell's take-over (the rows as A wrote them), decide takes them over itself.
    _, _, v3 = decide(row, glob, req(3), ON_B, LATER)
    assert (v3.approved, v3.reason) == (False, WithheldReason.CAP_REACHED)
    assert row2.grants == glob2.grants and row2.clock_id == glob2.clock_id == "B"


def test_only_the_decision_log_proves_the_old_owners_grant() -> None:
    """The same, A's two row writes of its decision lost: only fence-decisions holds it (its
    decided_at and decided_clock); A's refresh of the shared row (30 s later) survived."""
    _, _, v = approved_on_a()
    log = [logged(v, "A")]
    glob = GlobalGate(clock=T + 30, clock_id="A")  # A's refresh, without the grant
    # Today: the logged stamp compared with B's clock: out of the window, approved.
    blind = reconcile(glob, [ready()], LATER, WINDOW, logged_grants(log, LATER, WINDOW))
    assert blind.grants == ()
    assert decide(ready(), blind, req(2), replace(ON_B, clock_id=None), LATER)[2].approved
    # Taken over: 30 s old at A's latest known moment, the refresh.
    whole, rows = handed_over(glob, [ready()], log, TAKEN, "B")
    assert whole.grants == (Grant("d1", "h1", "c1", TAKEN - 30),)
    row, glob2, v2 = decide(rows["c1"], whole, req(2), ON_B, LATER)
    assert (v2.approved, v2.reason) == (False, WithheldReason.CAP_REACHED)
    assert row.grants == whole.grants  # the cluster row made whole from the shared one
    # The lost decision proposed again: the same approval, nothing consumed.
    _, _, again = decide(row, glob2, req(1), ON_B, LATER + 1)
    assert again.approved and again.repeated and again.budget_used == 1


def test_the_grant_leaves_the_window_a_whole_window_after_the_take_over() -> None:
    """No grant is held for ever: on B's clock it leaves the window one window after the stamp
    it was given at the take-over (its true age then, less the hand-over gap)."""
    row, glob, _ = approved_on_a()
    taken, rows = handed_over(glob, [row], [], TAKEN, "B")
    row, whole, held = decide(rows["c1"], taken, req(2), ON_B, TAKEN + WINDOW - 1)
    assert held.reason is WithheldReason.CAP_REACHED
    _, _, v = decide(row, whole, req(3), ON_B, TAKEN + WINDOW)
    assert v.approved and v.budget_used == 1
    # And a third owner C, 2 hours behind, takes B's rows over in turn (a chain of owners):
    # B's refresh 40 s after its take-over is its latest known moment.
    b_glob = refreshed(taken, TAKEN + 40, "B", 30.0)
    assert b_glob is not None and b_glob.clock == TAKEN + 40
    c_now = TAKEN + 60 - 2 * 3600
    c_glob, c_rows = handed_over(b_glob, [rows["c1"]], [], c_now, "C")
    assert c_glob.grants == (Grant("d1", "h1", "c1", c_now - 40),)
    on_c = replace(ON_B, clock_id="C")
    assert decide(c_rows["c1"], c_glob, req(4), on_c, c_now)[2].reason is (
        WithheldReason.CAP_REACHED
    )
    _, _, late = decide(c_rows["c1"], c_glob, req(5), on_c, c_now - 40 + WINDOW)
    assert late.approved


def test_old_rows_and_records_without_a_clock_name_count_as_one_unnamed_clock() -> None:
    """Rows and decisions written before clocks had names (clock_id None) are one clock: aged
    against the latest of their stamps and row clocks, never compared with the new clock."""
    old = GateContext(policy=POLICY, started_at=0.0)  # the gate before this change
    row, glob, v = decide(ready(), GlobalGate(), req(1), old, T)
    assert row.clock_id is None and glob.clock_id is None
    row = replace(row, clock=T + 60)  # a later judgement of the cluster (no fence)
    assert latest_known([row, glob], [logged(v, None)]) == {None: T + 60}
    whole, rows = handed_over(glob, [row], [logged(v, None)], TAKEN, "B")
    assert whole.grants == (Grant("d1", "h1", "c1", TAKEN - 60),) == rows["c1"].grants
    assert rows["c1"].verdicts[0].at == TAKEN - 60
    _, _, v2 = decide(rows["c1"], whole, req(2), ON_B, LATER)
    assert v2.reason is WithheldReason.CAP_REACHED
    # Only the log holds it: its own stamp is its clock's latest known time.
    whole, rows = handed_over(GlobalGate(), [], [logged(v, None)], TAKEN, "B")
    assert whole.grants == (Grant("d1", "h1", "c1", TAKEN),)


def test_latest_known_takes_every_stamp_of_each_clock() -> None:
    g = Grant("d1", "h1", "c1", T + 5)
    v = Verdict("d2", "h2", "c1", FenceAction.STOP, T + 9, False, WithheldReason.CAP_REACHED)
    rows: list[ClusterGate | GlobalGate] = [
        ClusterGate("c1", clock=T, grants=(g,), verdicts=(v,), clock_id="A"),
        ClusterGate("c2", clock=T + 7, clock_id="A"),
        ClusterGate("c3"),  # never judged: knows nothing
        GlobalGate(clock=T - 3, grants=(replace(g, at=T + 20),), clock_id="B"),
    ]
    log = [Logged("d3", "h3", "c1", FenceAction.STOP, True, T + 8, "A"), logged_d(T + 1, "C")]
    assert latest_known(rows, log) == {"A": T + 9, "B": T + 20, "C": T + 1}
    assert latest_known([]) == {}


def logged_d(at: float, clock_id: str | None) -> Logged:
    return Logged("d9", "h9", "c1", FenceAction.STOP, True, at, clock_id)


def test_restamp_never_makes_a_stamp_older_than_its_age() -> None:
    latest: dict[str | None, float] = {"A": T + 100}
    assert restamp(T + 40, "B", latest, 5.0, "B") == T + 40  # own clock: as it is
    assert restamp(T + 40, "A", latest, 5.0, "B") == 5.0 - 60
    assert restamp(T + 140, "A", latest, 5.0, "B") == 5.0  # after its latest: age 0, never -40
    assert restamp(T + 40, "Z", latest, 5.0, "B") == 5.0  # a clock nothing else knows: age 0


def test_take_over_of_rows_and_records_already_on_the_clock_changes_nothing() -> None:
    row, glob, v = approved_on_a()
    latest = latest_known([row, glob])
    assert take_over(row, latest, T + 9, "A") is row
    assert take_over_global(glob, latest, T + 9, "A") is glob
    mine = logged(v, "A")
    assert take_over_logged([mine, logged(v, "Z")], latest, T + 9, "A") == (
        mine,
        replace(mine, clock_id="A", at=T + 9),
    )
    # A shared row of another clock with a cluster row of this one: decide takes it over.
    b_row, _, _ = decide(ready("c2"), GlobalGate(), req(5, cluster="c2"), ON_B, T)
    _, g, _ = decide(b_row, glob, req(6, cluster="c2"), ON_B, T + 1)
    assert g.clock_id == "B" and [x.at for x in g.grants] == [T + 1, T]


def test_the_owner_refreshes_its_shared_row_only_when_it_is_old_and_its_own() -> None:
    glob = GlobalGate(clock=T, clock_id="B")
    assert refreshed(glob, T + 59, "B", 60.0) is None
    assert refreshed(glob, T + 60, "B", 60.0) == replace(glob, clock=T + 60)
    assert refreshed(glob, T + 600, "A", 60.0) is None  # not its clock: take it over first


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.floats(0, 4000), min_size=1, max_size=6),  # grant times on A (true time)
    st.floats(0, 4000),  # A's latest known moment after the last grant (its refresh)
    st.floats(0, 4000),  # the gap: from that moment to B's take-over
    st.floats(-8000, 8000),  # B's clock minus A's
    st.floats(-8000, 8000),  # A's clock minus the truth
)
def test_a_taken_over_grant_is_never_younger_in_truth_than_on_the_new_clock(
    grants: list[float], refresh: float, gap: float, b_minus_a: float, a_err: float
) -> None:
    """Whatever the two clocks' offset: a grant taken over is at least as young on B's clock as
    it is in truth (it counts at least as long), and at most `gap` younger."""
    on_a = [t + a_err for t in grants]
    last_a = max(on_a) + refresh
    glob = GlobalGate(
        clock=last_a,
        clock_id="A",
        grants=tuple(Grant(f"d{n}", "h", "c1", at) for n, at in enumerate(on_a)),
    )
    true_take = max(grants) + refresh + gap
    b_now = true_take + a_err + b_minus_a
    taken, _, _ = one_clock(glob, [], [], b_now, "B")
    for truth, g in zip(grants, taken.grants, strict=True):
        true_age = true_take - truth
        age_on_b = b_now - g.at
        assert age_on_b <= true_age + 1e-6
        assert age_on_b >= true_age - gap - 1e-6
