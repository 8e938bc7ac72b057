"""No fence reaches a BMC without passing this gate; it is pure: no I/O, and no clock of its
own: the shell passes the gate process's never-stepped clock as `now`, and its name
(`GateContext.clock_id`; streams.worker_clock).

State is split the way the shell stores it: one `ClusterGate` per cluster (a table row keyed by
cluster uuid) and one `GlobalGate` (the row every cluster shares). `decide(cluster, glob,
request, ctx, now)` returns both new states and a `Verdict`; `observe(cluster, fact)` feeds the
cluster's membership facts (a host's episode opened or ended, the cluster's size, a pause).

The gate owns its clock. `now` (the gate worker's clock) stamps every verdict and grant and
slides the windows; a proposal's `at` (stamped by the proposing worker's clock) is kept for
people and never compared with `now`: two machines' clocks are never compared (a watch worker
whose clock lags minutes has its fences judged like any other). A proposal read again after a
restart is the shell's business: its rows keep the position they applied (streams.gating).

The global row is the union of the cluster rows' grants: every grant is written to both, by the
shell, as two records, and a worker can die between the two writes. So each row is made whole
from the other before a request is judged: `decide` merges the global row's grants of the
cluster into the cluster row and the cluster row's into the global row, and the shell first
passes the global row through `reconcile` (every other cluster row's grants merged in, and the
grants the decision log proves: `logged_grants`; the worker can also die after publishing a
decision and before either row's write, and the actuator obeys the published decision). Grants
are merged by decision id: one fence never counts twice, and a decision id that holds a grant in
the window is approved again (rule 1) without consuming anything, even when the verdict that
gave it was lost with its cluster row's write.

A request is judged in this order; the first rule that holds is the withheld reason:

1. A decision id the gate already approved, or withheld for a final reason (CAP_REACHED,
   GLOBAL_CAP_REACHED), inside the window gets the same verdict again (`repeated=True`, `at` =
   now) and consumes nothing: a re-sent or redelivered proposal is never counted twice. One
   whose verdict is gone but whose grant is still in the window is approved again the same way.
   One withheld for a TEMPORARY reason (see `TEMPORARY`) is judged again: the reason may have
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

One clock, never two. Every row names the clock its stamps are on (`clock_id`; None: a row
written before clocks had names, read as one unnamed clock) and `clock`, the latest time that
clock is known to have reached (the row's last judgement, or the owner's refresh of the shared
row). A stamp of another clock (the gates partition moved to another worker, or the worker
restarted) is never compared with `now`: its offset to the gate's clock is unknown. What is
known is its AGE on its own clock as of the latest time that clock is known to have reached
(`latest_known`: the max of its rows' `clock`, of its stamps and of its logged decisions'
`decided_at`). `take_over` re-stamps it on the gate's clock with that age:
`at' = now - max(0, latest - at)`. That age is never more than the true one (the clock ran on
after its latest known moment), so a grant counts at least as long as the truth, never shorter:
no skew between the two clocks lets the cap be exceeded. The price: the time between that
clock's latest known moment and the take-over counts as none, so a grant is held longer by that
gap (the shell keeps it small: the owner refreshes the shared row's `clock`, and takes the rows
over as soon as it owns them). A row of the gate's own clock is left as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
    clock_id: str | None = None  # the name of the clock `now` and `started_at` are on


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


@dataclass(frozen=True)
class ClusterGate:
    """One cluster's row."""

    cluster: str
    hosts: int = 0  # hosts in the cluster; 0: not known yet
    suspect: frozenset[str] = frozenset()  # hosts with an open episode
    paused: bool = False
    clock: float = float("-inf")  # the latest time `clock_id` is known to have reached
    grants: tuple[Grant, ...] = ()
    verdicts: tuple[Verdict, ...] = ()  # inside the window, for redelivered requests
    clock_id: str | None = None  # the clock of `clock` and every stamp (None: unnamed, old rows)


@dataclass(frozen=True)
class GlobalGate:
    """The row every cluster shares."""

    paused: bool = False
    clock: float = float("-inf")  # the latest time `clock_id` is known to have reached
    grants: tuple[Grant, ...] = ()
    clock_id: str | None = None  # as ClusterGate.clock_id


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


def _merged(grants: tuple[Grant, ...], more: Iterable[Grant]) -> tuple[Grant, ...]:
    """`grants` and those of `more` whose decision id they lack (oldest first): one fence is one
    grant, whichever rows it was read from."""
    held = {g.decision_id for g in grants}
    extra: dict[str, Grant] = {}
    for g in more:
        if g.decision_id not in held:
            extra.setdefault(g.decision_id, g)
    return (*grants, *sorted(extra.values(), key=lambda g: (g.at, g.decision_id)))


@dataclass(frozen=True)
class Logged:
    """One decision read back from the decision log (fence-decisions), its signature verified
    by the shell: the log holds every decision the actuator may carry out."""

    decision_id: str
    host: str
    cluster: str | None
    action: FenceAction
    approved: bool
    at: float  # the record's decided_at: the gate's clock when it judged
    clock_id: str | None = None  # the record's decided_clock: which clock (None: unnamed, old)


Clocks = Mapping[str | None, float]  # clock name -> the latest time it is known to have reached


def latest_known(rows: Iterable[ClusterGate | GlobalGate], logged: Iterable[Logged] = ()) -> Clocks:
    """The latest time each clock is known to have reached (module rule): the max of its rows'
    `clock` and of every stamp on it (grants, verdicts, logged decisions)."""
    latest: dict[str | None, float] = {}

    def note(clock_id: str | None, at: float) -> None:
        if at > latest.get(clock_id, float("-inf")):
            latest[clock_id] = at

    for row in rows:
        note(row.clock_id, row.clock)
        for g in row.grants:
            note(row.clock_id, g.at)
        for v in row.verdicts if isinstance(row, ClusterGate) else ():
            note(row.clock_id, v.at)
    for d in logged:
        note(d.clock_id, d.at)
    return latest


def restamp(at: float, clock_id: str | None, latest: Clocks, now: float, own: str | None) -> float:
    """A stamp `at` of the clock `clock_id` as a stamp of the clock `own` at `now` (module
    rule): the same on the same clock; else `now` less its age at the latest time its clock is
    known to have reached (an age never below 0; `at` itself when `latest` lacks the clock)."""
    if clock_id == own:
        return at
    return now - max(0.0, latest.get(clock_id, at) - at)


def _restamped(
    grants: tuple[Grant, ...], old: str | None, latest: Clocks, now: float, own: str | None
) -> tuple[Grant, ...]:
    return tuple(replace(g, at=restamp(g.at, old, latest, now, own)) for g in grants)


def take_over(row: ClusterGate, latest: Clocks, now: float, own: str | None) -> ClusterGate:
    """The cluster row on the clock `own` at `now` (`restamp` of every stamp; `clock` = now);
    the same row when it is on that clock already."""
    if row.clock_id == own:
        return row
    old = row.clock_id
    return replace(
        row,
        clock=now,
        clock_id=own,
        grants=_restamped(row.grants, old, latest, now, own),
        verdicts=tuple(replace(v, at=restamp(v.at, old, latest, now, own)) for v in row.verdicts),
    )


def take_over_global(glob: GlobalGate, latest: Clocks, now: float, own: str | None) -> GlobalGate:
    """The shared row on the clock `own` at `now` (as `take_over`)."""
    if glob.clock_id == own:
        return glob
    grants = _restamped(glob.grants, glob.clock_id, latest, now, own)
    return replace(glob, clock=now, clock_id=own, grants=grants)


def take_over_logged(
    logged: Iterable[Logged], latest: Clocks, now: float, own: str | None
) -> tuple[Logged, ...]:
    """Logged decisions with their `at` on the clock `own` at `now` (as `take_over`)."""
    return tuple(
        d
        if d.clock_id == own
        else replace(d, at=restamp(d.at, d.clock_id, latest, now, own), clock_id=own)
        for d in logged
    )


def one_clock(
    glob: GlobalGate,
    clusters: Iterable[ClusterGate],
    logged: Iterable[Logged],
    now: float,
    own: str | None,
) -> tuple[GlobalGate, tuple[ClusterGate, ...], tuple[Logged, ...]]:
    """Every row and logged decision on the clock `own` at `now`, each clock's stamps aged
    against the latest time it is known to have reached in all of them together (the shell's
    reconciliation after a start or a move: see `take_over`)."""
    clusters, logged = tuple(clusters), tuple(logged)
    latest = latest_known((glob, *clusters), logged)
    return (
        take_over_global(glob, latest, now, own),
        tuple(take_over(c, latest, now, own) for c in clusters),
        take_over_logged(logged, latest, now, own),
    )


def refreshed(glob: GlobalGate, now: float, own: str | None, after: float) -> GlobalGate | None:
    """The shared row with `clock` = now when it is on the clock `own` and its `clock` is
    `after` seconds old or more (the owner's refresh: the latest time its clock is known to have
    reached, for the next owner's take-over); None when it needs none."""
    if glob.clock_id != own or now - glob.clock < after:
        return None
    return replace(glob, clock=now)


def logged_grants(logged: Iterable[Logged], now: float, window: float) -> tuple[Grant, ...]:
    """The grants the decision log proves at `now`: one per approved power-down decision id
    still in the window (as `in_window` counts a row's grants), oldest first. The decisions are
    on the gate's clock (`take_over_logged` first when some are not).

    A decision id judged more than once in the window keeps its earliest stamp in the window:
    the first approval's, as the rows' grant has it. (A repeated approval is stamped when it was
    repeated: once the first has left the window, the repeat keeps the fence counted until it
    leaves too, which may count one fence longer than the rows would, never shorter.)"""
    first: dict[str, Grant] = {}
    for d in logged:
        if not (d.approved and d.action.powers_down and d.cluster) or now - d.at >= window:
            continue
        held = first.get(d.decision_id)
        if held is None or d.at < held.at:
            first[d.decision_id] = Grant(d.decision_id, d.host, d.cluster, d.at)
    return tuple(sorted(first.values(), key=lambda g: (g.at, g.decision_id)))


def reconcile(
    glob: GlobalGate,
    clusters: Iterable[ClusterGate],
    now: float,
    window: float,
    logged: Iterable[Grant] = (),
) -> GlobalGate:
    """The global row with every cluster row's grants still in the window merged in, by decision
    id: a grant whose global write was lost (the worker died between the two writes) counts
    toward the global cap again. `logged` (`logged_grants` of the decision log) is merged the
    same way: a decision published whose two row writes were both lost still counts, in the
    global row and, through `decide`, in its cluster's. The same row when it lacks nothing.
    Every row is on the clock of `now` (`one_clock` first when some are not)."""
    rows = (g for c in clusters for g in in_window(c.grants, now, window))
    # Only the row's grants in the window hold their decision ids: a fence approved again after
    # its first grant left the window is counted by its new grant (from a row or the log).
    kept = in_window(glob.grants, now, window)
    grants = _merged(kept, (*rows, *in_window(tuple(logged), now, window)))
    return glob if len(grants) == len(kept) else replace(glob, grants=grants)


def decide(
    cluster: ClusterGate,
    glob: GlobalGate,
    request: FenceRequest,
    ctx: GateContext,
    now: float,
) -> tuple[ClusterGate, GlobalGate, Verdict]:
    """Judge one request at the gate's clock `now` (named `ctx.clock_id`): the new rows, both on
    that clock (a row of another clock is taken over first, aged against the two rows' latest
    known time of its clock), and the verdict."""
    if request.action in (FenceAction.START, FenceAction.TEST):
        raise IllegalRequest(
            f"decision {request.decision_id}: {request.action.value} is operator-only"
        )
    if request.cluster != cluster.cluster:
        raise IllegalRequest(
            f"decision {request.decision_id}: cluster {request.cluster} "
            f"judged against the row of cluster {cluster.cluster}"
        )
    if cluster.clock_id != ctx.clock_id or glob.clock_id != ctx.clock_id:
        latest = latest_known((cluster, glob))
        cluster = take_over(cluster, latest, now, ctx.clock_id)
        glob = take_over_global(glob, latest, now, ctx.clock_id)
    policy = ctx.policy
    window = policy.fence_window
    verdicts = tuple(v for v in cluster.verdicts if now - v.at < window)
    # Each row made whole from the other: a grant one of them lost with its write still counts.
    mine = in_window(cluster.grants, now, window)
    shared = in_window(glob.grants, now, window)
    local = _merged(mine, (g for g in shared if g.cluster == cluster.cluster))
    everywhere = _merged(shared, mine)
    cluster = replace(cluster, clock=now, grants=local, verdicts=verdicts)
    glob = replace(glob, clock=now, grants=everywhere)

    earlier = next((v for v in verdicts if v.decision_id == request.decision_id), None)
    if earlier is not None and earlier.approved:
        return cluster, glob, replace(earlier, repeated=True, at=now)
    held = next((g for g in local if g.decision_id == request.decision_id), None)
    if held is not None:
        # Approved at `held.at`, its verdict lost with a write of the cluster row: the same
        # approval again, consuming nothing; the row keeps it from now on.
        first = Verdict(
            decision_id=request.decision_id,
            host=request.host,
            cluster=request.cluster,
            action=request.action,
            at=held.at,
            approved=True,
            budget_used=len(local),
            budget_cap=policy.fence_cap,
        )
        kept = tuple(v for v in verdicts if v.decision_id != request.decision_id)
        cluster = replace(cluster, verdicts=(*kept, first))
        return cluster, glob, replace(first, repeated=True, at=now)
    if earlier is not None:
        if earlier.reason not in TEMPORARY:
            return cluster, glob, replace(earlier, repeated=True, at=now)
        verdicts = tuple(v for v in verdicts if v.decision_id != request.decision_id)

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
