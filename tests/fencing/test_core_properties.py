"""hypothesis stateful tests over random event sequences: the host core and the cluster gate
keep their safety invariants whatever order facts, results and redeliveries arrive in."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import replace

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fencing.decision import CLOSED, HostRecord, HostState, IllegalTransition, step
from fencing.events import (
    ClearSuspect,
    Evidence,
    FenceAction,
    FenceApproved,
    FenceFinished,
    FenceWithheld,
    HostCameBack,
    HostDisconnected,
    HostEvent,
    HostStatus,
    MaintenanceEnded,
    MaintenanceStarted,
    MarkSuspect,
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
    Verdict,
    decide,
    observe,
    pause_all,
)
from fencing.policy import Policy

FAST = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def oracle_evidence(suspect_since: float, r: ProbeFinished, max_age: float) -> Evidence:
    """The feature design's rule, restated independently of the core."""
    if r.evidence is Evidence.ALIVE:
        return Evidence.ALIVE
    if r.newest_write is not None and r.newest_write > suspect_since:
        return Evidence.ALIVE
    if r.heartbeat is not None and r.at - r.heartbeat <= max_age:
        return Evidence.ALIVE
    if r.evidence is Evidence.UNKNOWN or (r.files_checked == 0 and r.heartbeat is None):
        return Evidence.UNKNOWN
    return Evidence.STALE


class HostMachine(RuleBasedStateMachine):
    """One host's record driven by random facts, probe answers, verdicts and redeliveries."""

    @initialize(
        extra=st.integers(0, 3),
        alert_after=st.integers(1, 3),
        timeout_intervals=st.integers(1, 4),
    )
    def setup(self, extra: int, alert_after: int, timeout_intervals: int) -> None:
        # probe_timeout >= check_interval: a lost probe is replaced on the tick that loses it
        self.policy = Policy(
            check_interval=60.0,
            extra_checks=extra,
            heartbeat_max_age=61.0,
            unknown_alert_after=alert_after,
            probe_timeout=60.0 * timeout_intervals,
        )
        self.record = HostRecord("h1")
        self.now = 1_000.0
        self.sent: list[HostEvent] = []
        self.evidence: dict[int, list[Evidence]] = defaultdict(list)
        self.proposals: Counter[int] = Counter()
        self.outstanding: RunProbe | None = None
        self.open_episode: int | None = None
        self.proposal: ProposeFence | None = None

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
        accepted = self.accepted(event)
        if accepted is not None:
            assert new.last_probe_at == event.at and new.last_evidence is accepted
        elif isinstance(event, ProbeFinished):
            assert new == before  # late, repeated or for an ended episode: ignored
        for action in actions:
            self.follow(action, event, accepted)
        self.record = new
        self.sent.append(event)

    def check_raises_again(self, before: HostRecord, event: HostEvent) -> None:
        try:
            step(before, event, self.policy)
        except IllegalTransition:
            return
        raise AssertionError("an illegal event was accepted on the second try")

    def accepted(self, event: HostEvent) -> Evidence | None:
        """The oracle's view: does this result answer the outstanding probe of an open episode?"""
        out = self.outstanding
        if not isinstance(event, ProbeFinished) or out is None:
            return None
        if (event.episode, event.check) != (out.episode, out.check):
            return None
        self.outstanding = None
        judged = oracle_evidence(out.suspect_since, event, self.policy.heartbeat_max_age)
        self.evidence[out.episode].append(judged)
        return judged

    def follow(self, action: object, event: HostEvent, accepted: Evidence | None) -> None:
        if isinstance(action, MarkSuspect):
            assert self.open_episode is None
            self.open_episode = action.episode
        elif isinstance(action, ClearSuspect):
            assert self.open_episode == action.episode
            self.open_episode, self.outstanding, self.proposal = None, None, None
        elif isinstance(action, RunProbe):
            assert action.episode == self.open_episode
            if self.outstanding is not None:  # the previous probe was lost: unknown
                self.evidence[action.episode].append(Evidence.UNKNOWN)
            self.outstanding = action
        elif isinstance(action, ProposeFence):
            self.check_proposal(action, event, accepted)

    def check_proposal(self, p: ProposeFence, event: HostEvent, accepted: Evidence | None) -> None:
        self.proposals[p.episode] += 1
        assert self.proposals[p.episode] == 1, "two proposals in one episode"
        # only a stale result can complete the run: never a tick, never an unknown
        assert isinstance(event, ProbeFinished) and accepted is Evidence.STALE
        needed = 1 + self.policy.extra_checks
        counted = [e for e in self.evidence[p.episode] if e is not Evidence.UNKNOWN]
        assert len(counted) >= needed
        assert counted[-needed:] == [Evidence.STALE] * needed
        assert p.stale_checks == needed
        self.proposal = p
        self.outstanding = None

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

    @precondition(lambda self: self.outstanding is not None)
    @rule(
        shape=st.sampled_from(["stale", "stale", "stale", "write", "beat", "unknown", "empty"]),
        delay=st.floats(0, 30),
    )
    def answer(self, shape: str, delay: float) -> None:
        self.answer_with(shape, delay)

    @precondition(lambda self: self.open_episode is not None)
    @rule(shape=st.sampled_from(["stale", "stale", "stale", "write", "beat", "unknown", "empty"]))
    def check_cycle(self, shape: str) -> None:
        """One check interval passes and the probe it starts is answered: deep episodes fast."""
        self.now += self.policy.check_interval
        self.apply(Tick(at=self.now))
        if self.outstanding is not None:
            self.answer_with(shape, 1.0)

    def answer_with(self, shape: str, delay: float) -> None:
        out = self.outstanding
        assert out is not None
        at = self.now + delay
        base = ProbeFinished(
            at=at,
            episode=out.episode,
            evidence=Evidence.STALE,
            newest_write=out.suspect_since - 100,
            heartbeat=at - 500,
            files_checked=3,
            check=out.check,
        )
        shaped = {
            "stale": base,
            "write": replace(base, newest_write=out.suspect_since + 1),
            "beat": replace(base, heartbeat=at - 30),
            "unknown": replace(base, evidence=Evidence.UNKNOWN),
            "empty": replace(base, newest_write=None, heartbeat=None, files_checked=0),
        }
        self.apply(shaped[shape])

    @precondition(lambda self: self.outstanding is not None)
    @rule(
        reported=st.sampled_from(list(Evidence)),
        write_offset=st.none() | st.floats(-600, 600),
        heartbeat_age=st.none() | st.floats(0, 300),
        files=st.integers(0, 3),
        delay=st.floats(0, 30),
    )
    def answer_anything(
        self,
        reported: Evidence,
        write_offset: float | None,
        heartbeat_age: float | None,
        files: int,
        delay: float,
    ) -> None:
        out = self.outstanding
        assert out is not None
        at = self.now + delay
        self.apply(
            ProbeFinished(
                at=at,
                episode=out.episode,
                evidence=reported,
                newest_write=None if write_offset is None else out.suspect_since + write_offset,
                heartbeat=None if heartbeat_age is None else at - heartbeat_age,
                files_checked=files,
                check=out.check,
            )
        )

    @precondition(lambda self: self.proposal is not None)
    @rule(
        verdict=st.sampled_from(["approve", "withhold", "success", "failure"]),
        reason=st.sampled_from(list(WithheldReason)),
    )
    def gate_or_actuator(self, verdict: str, reason: WithheldReason) -> None:
        p = self.proposal
        assert p is not None
        at, ep, did = self.now, p.episode, p.decision_id
        events: dict[str, HostEvent] = {
            "approve": FenceApproved(at=at, episode=ep, decision_id=did),
            "withhold": FenceWithheld(at=at, episode=ep, decision_id=did, reason=reason),
            "success": FenceFinished(at=at, episode=ep, decision_id=did, success=True),
            "failure": FenceFinished(at=at, episode=ep, decision_id=did, success=False),
        }
        self.apply(events[verdict])

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        results = [e for e in self.sent if isinstance(e, ProbeFinished)]
        pool = results if results and data.draw(st.booleans()) else self.sent
        self.apply(data.draw(st.sampled_from(pool)))

    @rule(
        kind=st.sampled_from(["future_episode", "zero_episode", "unrequested_check", "decision"]),
    )
    def illegal(self, kind: str) -> None:
        r = self.record
        if kind == "future_episode":
            event: HostEvent = FenceApproved(at=self.now, episode=r.episode + 1, decision_id="x")
        elif kind == "zero_episode":
            event = ProbeFinished(at=self.now, episode=0, evidence=Evidence.STALE, check=1)
        elif kind == "unrequested_check":
            event = ProbeFinished(
                at=self.now,
                episode=max(r.episode, 1),
                evidence=Evidence.STALE,
                check=r.checks_requested + 1,
            )
        else:
            event = FenceFinished(
                at=self.now, episode=max(r.episode, 1), decision_id="not-ours", success=True
            )
        before = r
        try:
            step(r, event, self.policy)
        except IllegalTransition:
            assert self.record is before and self.record == before
            return
        # only an ended episode may swallow these as late
        assert r.state in CLOSED and r.episode >= 1 and kind != "future_episode"
        assert kind != "zero_episode"

    # -- invariants -------------------------------------------------------------------------------

    @invariant()
    def counts_are_sane(self) -> None:
        r = self.record
        assert 0 <= r.stale_count <= 1 + self.policy.extra_checks
        proposed = r.state not in CLOSED and r.state is not HostState.SUSPECT
        if proposed:
            assert r.decision_id is not None and self.proposals[r.episode] == 1
        if r.state is HostState.SUSPECT:
            assert r.decision_id is None and self.proposals[r.episode] == 0
        if r.state is HostState.SUSPECT:
            assert r.stale_count < 1 + self.policy.extra_checks
        if r.probe_outstanding:
            assert r.state is HostState.SUSPECT and r.checks_requested >= 1
        assert (self.open_episode is not None) == (r.state not in CLOSED)


class GateMachine(RuleBasedStateMachine):
    """Three clusters sharing a global budget, under random requests, facts and redeliveries."""

    CLUSTERS = ("a", "b", "c")

    @initialize(
        cap=st.integers(0, 3),
        global_cap=st.integers(0, 5),
        window=st.sampled_from([60.0, 600.0, 3600.0]),
        ratio=st.sampled_from([0.0, 0.5, 1.0]),
    )
    def setup(self, cap: int, global_cap: int, window: float, ratio: float) -> None:
        policy = Policy(
            fence_cap=cap,
            global_cap=global_cap,
            fence_window=window,
            storm_ratio=ratio,
            startup_quiet=30.0,
        )
        self.ctx = GateContext(policy=policy, started_at=0.0)
        self.rows = {c: observe(ClusterGate(c), ClusterSized(4)) for c in self.CLUSTERS}
        self.glob = GlobalGate()
        self.now = 0.0
        self.n = 0
        self.requests: list[FenceRequest] = []
        self.first: dict[str, Verdict] = {}
        self.grants: list[tuple[str, float]] = []  # (cluster, time) of every power-down approved

    def judge(self, request: FenceRequest) -> None:
        row = self.rows[request.cluster]
        result = decide(row, self.glob, request, self.ctx, self.now)
        assert decide(row, self.glob, request, self.ctx, self.now) == result  # deterministic
        row, self.glob, verdict = result
        self.rows[request.cluster] = row
        if verdict.skew is not None:
            # refused unjudged: the stamp is too far from the gate's own clock
            assert abs(request.at - self.now) > self.ctx.clock_tolerance
            assert not verdict.approved and verdict.reason is None
            return
        assert verdict.approved == (verdict.reason is None) and verdict.at == self.now
        first = self.first.get(request.decision_id)
        if verdict.repeated:
            assert first is not None and (first.approved or first.reason not in TEMPORARY)
            assert verdict == replace(first, repeated=True, at=self.now)
            return
        window = self.ctx.policy.fence_window
        assert first is None or first.reason in TEMPORARY or verdict.at - first.at >= window, (
            "a redelivery was judged again"
        )
        self.first[request.decision_id] = verdict
        if verdict.approved and request.action.powers_down:
            self.grants.append((request.cluster, verdict.at))

    @rule(
        cluster=st.sampled_from(CLUSTERS),
        action=st.sampled_from(
            [FenceAction.STOP, FenceAction.REBOOT, FenceAction.NOTHING, FenceAction.BLINK]
        ),
        dt=st.floats(0, 400),
        skew=st.floats(-8000, 8000) | st.floats(-400, 400),
    )
    def request(self, cluster: str, action: FenceAction, dt: float, skew: float) -> None:
        self.now += dt
        self.n += 1
        # the proposing worker's clock is off by `skew`; the gate judges at its own clock
        r = FenceRequest(f"d{self.n}", f"h{self.n % 5}", cluster, action, self.now + skew)
        self.requests.append(r)
        self.judge(r)

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), dt=st.floats(0, 100))
    def redeliver(self, data: st.DataObject, dt: float) -> None:
        r = data.draw(st.sampled_from(self.requests))
        self.now += dt
        self.judge(replace(r, at=self.now))

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


TestHostMachine = HostMachine.TestCase
TestHostMachine.settings = FAST
TestGateMachine = GateMachine.TestCase
TestGateMachine.settings = FAST
