"""No fence reaches a BMC without passing this gate; it is pure: no I/O, and no clock of its
own: the shell passes the gate worker's wall clock as `now`.

State is split the way the shell stores it: one `ClusterGate` per cluster (a table row keyed by
cluster uuid) and one `GlobalGate` (the row every cluster shares). `decide(cluster, glob,
request, ctx, now)` returns both new states and a `Verdict`; `observe(cluster, fact)` feeds the
cluster's membership facts (a host's episode opened or ended, the cluster's size, a pause).

The gate owns its clock. `now` (the gate worker's clock) stamps every verdict and grant and
slides the windows; a proposal's `at` (stamped by the proposing worker's clock) is never used as
a clock. A request stamped more than `ctx.clock_tolerance` before or after `now` is refused
before anything else: the verdict has `skew` set, is neither approved nor withheld, and the rows
keep every grant (a worker whose clock runs two hours fast can never empty a window).

A request is judged in this order; the first rule that holds is the withheld reason:

1. A decision id the gate already approved, or withheld for a final reason (CAP_REACHED,
   GLOBAL_CAP_REACHED), inside the window gets the same verdict again (`repeated=True`, `at` =
   now) and consumes nothing: a re-sent or redelivered proposal is never counted twice. One
   withheld for a TEMPORARY reason (see `TEMPORARY`) is judged again: the reason may have
   passed.
2. Operator pause, global then per cluster: PAUSED.
3. Startup quiet period (`now - ctx.started_at < startup_quiet`): QUIET_PERIOD.
4. Storm guard: the suspect hosts (the requester always included) over the cluster's host count
   above `storm_ratio` means a partition or a storage outage, not crashed hosts: STORM_GUARD.
   With no host count known the guard cannot judge: CLUSTER_SIZE_UNKNOWN.
5. Only actions that power down (`FenceAction.powers_down`: stop, reboot) meet the budgets:
   at most `fence_cap` per cluster and `global_cap` overall in any sliding `fence_window`
   (CAP_REACHED, GLOBAL_CAP_REACHED). "nothing" and "blink" pass 2-4 but never consume budget.

A grant counts while `now - grant.at < fence_window`; a grant stamped after `now` (the gate's
clock stepped back) still counts, so no window ever holds more than the cap.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fencing.decision import TEMPORARY, CoreError
from fencing.events import FenceAction, WithheldReason
from fencing.policy import Policy

# Withheld reasons that may pass: the host keeps being checked and its proposal is judged again.


class IllegalRequest(CoreError):
    """A request the gate cannot judge: an operator-only action, or another cluster's row."""


@dataclass(frozen=True)
class FenceRequest:
    """One host's proposal, as the gate sees it."""

    decision_id: str
    host: str
    cluster: str
    action: FenceAction
    at: float


@dataclass(frozen=True)
class GateContext:
    """What the gate needs from its surroundings."""

    policy: Policy
    started_at: float  # when this service started (gate clock): the quiet period counts from here
    clock_tolerance: float = 300.0  # seconds a request's stamp may differ from the gate's now


@dataclass(frozen=True)
class Grant:
    """One approved power-down, counted against the budgets until it leaves the window."""

    decision_id: str
    host: str
    cluster: str
    at: float


@dataclass(frozen=True)
class Verdict:
    """Approved, or withheld with a reason."""

    decision_id: str
    host: str
    cluster: str
    action: FenceAction
    at: float
    approved: bool
    reason: WithheldReason | None = None
    budget_used: int = 0  # the cluster's power-downs in the window, this one included
    budget_cap: int = 0
    repeated: bool = False  # a redelivered request: the first verdict, nothing consumed
    skew: float | None = None  # refused unjudged: the request's stamp minus the gate's now


@dataclass(frozen=True)
class ClusterGate:
    """One cluster's row."""

    cluster: str
    hosts: int = 0  # hosts in the cluster; 0: not known yet
    suspect: frozenset[str] = frozenset()  # hosts with an open episode
    paused: bool = False
    clock: float = float("-inf")  # the gate's clock at the row's last judgement (display only)
    grants: tuple[Grant, ...] = ()
    verdicts: tuple[Verdict, ...] = ()  # inside the window, for redelivered requests


@dataclass(frozen=True)
class GlobalGate:
    """The row every cluster shares."""

    paused: bool = False
    clock: float = float("-inf")
    grants: tuple[Grant, ...] = ()


@dataclass(frozen=True)
class HostSuspected:
    """A host's episode opened (the core's `MarkSuspect`)."""

    host: str


@dataclass(frozen=True)
class HostCleared:
    """A host's episode ended (the core's `ClearSuspect`)."""

    host: str


@dataclass(frozen=True)
class ClusterSized:
    """The poller counted the cluster's hosts."""

    hosts: int


@dataclass(frozen=True)
class ClusterPaused:
    """An operator paused (or resumed) fencing in this cluster."""

    paused: bool


GateFact = HostSuspected | HostCleared | ClusterSized | ClusterPaused


def observe(gate: ClusterGate, fact: GateFact) -> ClusterGate:
    """The cluster row after one membership or operator fact."""
    if isinstance(fact, HostSuspected):
        return replace(gate, suspect=gate.suspect | {fact.host})
    if isinstance(fact, HostCleared):
        return replace(gate, suspect=gate.suspect - {fact.host})
    if isinstance(fact, ClusterSized):
        return replace(gate, hosts=max(fact.hosts, 0))
    return replace(gate, paused=fact.paused)


def pause_all(glob: GlobalGate, paused: bool) -> GlobalGate:
    """The global row with fencing paused (or resumed) everywhere."""
    return replace(glob, paused=paused)


def in_window(grants: tuple[Grant, ...], now: float, window: float) -> tuple[Grant, ...]:
    """The grants that still count at `now`."""
    return tuple(g for g in grants if now - g.at < window)


def decide(
    cluster: ClusterGate,
    glob: GlobalGate,
    request: FenceRequest,
    ctx: GateContext,
    now: float,
) -> tuple[ClusterGate, GlobalGate, Verdict]:
    """Judge one request at the gate's clock `now`: the new rows and the verdict."""
    if request.action in (FenceAction.START, FenceAction.TEST):
        raise IllegalRequest(
            f"decision {request.decision_id}: {request.action.value} is operator-only"
        )
    if request.cluster != cluster.cluster:
        raise IllegalRequest(
            f"decision {request.decision_id}: cluster {request.cluster} "
            f"judged against the row of cluster {cluster.cluster}"
        )
    policy = ctx.policy
    window = policy.fence_window
    verdicts = tuple(v for v in cluster.verdicts if now - v.at < window)
    local = in_window(cluster.grants, now, window)
    everywhere = in_window(glob.grants, now, window)
    cluster = replace(cluster, clock=now, grants=local, verdicts=verdicts)
    glob = replace(glob, clock=now, grants=everywhere)

    skew = request.at - now
    if abs(skew) > ctx.clock_tolerance:
        refused = Verdict(
            decision_id=request.decision_id,
            host=request.host,
            cluster=request.cluster,
            action=request.action,
            at=now,
            approved=False,
            budget_used=len(local),
            budget_cap=policy.fence_cap,
            skew=skew,
        )
        return cluster, glob, refused

    for earlier in verdicts:
        if earlier.decision_id == request.decision_id:
            if earlier.approved or earlier.reason not in TEMPORARY:
                return cluster, glob, replace(earlier, repeated=True, at=now)
            verdicts = tuple(v for v in verdicts if v.decision_id != request.decision_id)
            break

    reason = _withheld_reason(cluster, glob, request, ctx, now)
    approved = reason is None
    if approved and request.action.powers_down:
        grant = Grant(request.decision_id, request.host, request.cluster, now)
        local = (*local, grant)
        glob = replace(glob, grants=(*everywhere, grant))
    verdict = Verdict(
        decision_id=request.decision_id,
        host=request.host,
        cluster=request.cluster,
        action=request.action,
        at=now,
        approved=approved,
        reason=reason,
        budget_used=len(local),
        budget_cap=policy.fence_cap,
    )
    cluster = replace(cluster, grants=local, verdicts=(*verdicts, verdict))
    return cluster, glob, verdict


def _withheld_reason(
    cluster: ClusterGate,
    glob: GlobalGate,
    request: FenceRequest,
    ctx: GateContext,
    now: float,
) -> WithheldReason | None:
    policy = ctx.policy
    if glob.paused or cluster.paused:
        return WithheldReason.PAUSED
    if now - ctx.started_at < policy.startup_quiet:
        return WithheldReason.QUIET_PERIOD
    if cluster.hosts == 0:
        return WithheldReason.CLUSTER_SIZE_UNKNOWN
    suspect = len(cluster.suspect | {request.host})
    if suspect / max(cluster.hosts, suspect) > policy.storm_ratio:
        return WithheldReason.STORM_GUARD
    if not request.action.powers_down:
        return None
    if len(cluster.grants) >= policy.fence_cap:
        return WithheldReason.CAP_REACHED
    if len(glob.grants) >= policy.global_cap:
        return WithheldReason.GLOBAL_CAP_REACHED
    return None
