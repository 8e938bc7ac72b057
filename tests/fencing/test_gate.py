"""Table-driven tests of the cluster gate: the whole cluster row, the global row and the verdict
after every request."""

from __future__ import annotations

from dataclasses import replace

import pytest

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
    Verdict,
    decide,
    observe,
    pause_all,
)
from fencing.policy import Policy

POLICY = Policy(fence_cap=3, fence_window=3600.0, global_cap=4, storm_ratio=0.5, startup_quiet=120)
START = 0.0
CTX = GateContext(policy=POLICY, started_at=START)
T = 10_000.0


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
        cluster, glob, got = decide(cluster, glob, r, CTX)
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
        cluster, glob, got = decide(cluster, glob, r, CTX)
        assert got == approved(r, 3)
        assert cluster == replace(before, clock=T + 5, verdicts=(*before.verdicts, got))
        assert glob == GlobalGate(clock=T + 5, grants=full)
    stop = req(9, T + 6)
    _, _, got = decide(cluster, glob, stop, CTX)
    assert got == withheld(stop, WithheldReason.CAP_REACHED, 3)


def test_global_cap_spans_clusters() -> None:
    glob = GlobalGate()
    a, b = ready("a"), ready("b")
    verdicts = []
    for n, at in enumerate((T, T + 1, T + 2)):
        a, glob, v = decide(a, glob, req(n, at, cluster="a"), CTX)
        verdicts.append(v.approved)
    b, glob, v1 = decide(b, glob, req(10, T + 3, cluster="b"), CTX)
    b, glob, v2 = decide(b, glob, req(11, T + 4, cluster="b"), CTX)
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
    new, glob, got = decide(cluster, GlobalGate(), r, CTX)
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
    cluster, glob, v1 = decide(ready(), GlobalGate(), r1, ctx)
    cluster, glob, v2 = decide(cluster, glob, r2, ctx)
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
    cluster, glob, v1 = decide(cluster, glob, r1, CTX)
    assert v1 == withheld(r1, WithheldReason.PAUSED, 0)
    cluster = observe(cluster, ClusterPaused(False))
    glob = pause_all(glob, False)
    r2 = req(2, T + 1)
    cluster, glob, v2 = decide(cluster, glob, r2, CTX)
    assert v2 == approved(r2, 1)
    assert cluster == ClusterGate(
        "c1", hosts=10, clock=T + 1, grants=(grant(r2),), verdicts=(v1, v2)
    )


def test_a_redelivered_request_gets_its_first_verdict_and_consumes_nothing() -> None:
    cluster, glob = ready(), GlobalGate()
    r1 = req(1, T)
    cluster, glob, v1 = decide(cluster, glob, r1, CTX)
    again = replace(r1, at=T + 50)
    c2, g2, v2 = decide(cluster, glob, again, CTX)
    assert v2 == replace(v1, repeated=True)
    assert c2 == replace(cluster, clock=T + 50) and g2 == replace(glob, clock=T + 50)
    # a withheld one stays withheld even when the reason has gone
    paused = observe(c2, ClusterPaused(True))
    r3 = req(3, T + 60)
    c3, g3, v3 = decide(paused, g2, r3, CTX)
    c4, _, v4 = decide(observe(c3, ClusterPaused(False)), g3, replace(r3, at=T + 70), CTX)
    assert v4 == replace(v3, repeated=True) and not v4.approved
    assert c4.grants == (grant(r1),)


def test_a_skewed_request_is_judged_at_the_gate_clock() -> None:
    cluster, glob = ready(), GlobalGate()
    r1 = req(1, T)
    cluster, glob, _ = decide(cluster, glob, r1, CTX)
    early = req(2, T - 5000)  # a worker with a slow clock: never outside the window
    cluster, glob, got = decide(cluster, glob, early, CTX)
    assert got == approved(early, 2, at=T)
    assert glob.grants == (grant(r1), grant(early, at=T))


def test_operator_only_actions_and_foreign_rows_are_refused() -> None:
    with pytest.raises(IllegalRequest, match="operator-only"):
        decide(ready(), GlobalGate(), req(1, T, FenceAction.START), CTX)
    with pytest.raises(IllegalRequest, match="operator-only"):
        decide(ready(), GlobalGate(), req(1, T, FenceAction.TEST), CTX)
    with pytest.raises(IllegalRequest, match="cluster c2"):
        decide(ready(), GlobalGate(), req(1, T, cluster="c2"), CTX)


def test_zero_caps_disable_power_downs_only() -> None:
    ctx = replace(CTX, policy=replace(POLICY, fence_cap=0))
    r1, r2 = req(1, T), req(2, T, FenceAction.NOTHING)
    cluster, glob, v1 = decide(ready(), GlobalGate(), r1, ctx)
    cluster, glob, v2 = decide(cluster, glob, r2, ctx)
    assert (v1.approved, v1.reason, v2.approved) == (False, WithheldReason.CAP_REACHED, True)
    ctx = replace(CTX, policy=replace(POLICY, global_cap=0))
    _, _, v3 = decide(ready(), GlobalGate(), r1, ctx)
    assert v3.reason is WithheldReason.GLOBAL_CAP_REACHED
