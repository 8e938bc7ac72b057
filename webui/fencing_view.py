"""What the operator sees about hosts and fences, rebuilt only from fencer's own topics.

Rule: this view never decides anything and never asks the workers. A host's state, episode,
stale count and evidence are the core's latest record on the compacted fencer.host-states topic,
shown as they are: nothing is re-derived from signals or probes, and a host with no record yet
says "no record yet". The other topics (host-signals, probe-results, fence-decisions,
fence-outcomes, notices, read from the beginning) give the last signal, the fence history with
each fence's timeline, and the per-cluster fence budget.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Literal

from aiokafka import ConsumerRecord
from pydantic import BaseModel, Field

from fencing.events import Evidence, FenceAction, HostStatus, NoticeKind, WithheldReason
from fencing.gate import Logged, logged_grants
from fencing.records import (
    EvidenceSummary,
    FenceDecision,
    FenceOutcome,
    HostRef,
    HostSignal,
    HostStateRecord,
    Notice,
    ProbeResult,
)
from fencing.settings import TopicNames

HostFencingState = Literal[
    "up",
    "suspect",
    "fence_proposed",
    "withheld",
    "fencing",
    "fenced",
    "fence_failed",
    "maintenance",
    "unknown",
    "no_record",
]
NO_RECORD: HostFencingState = "no_record"  # the UI says "no record yet"
# The core's states (fencing.decision.HostState) as the UI names them.
_CORE_STATES: dict[str, HostFencingState] = {
    "idle": "up",
    "suspect": "suspect",
    "fence_proposed": "fence_proposed",
    "fencing": "fencing",
    "fenced": "fenced",
    "withheld": "withheld",
    "failed": "fence_failed",
    "maintenance": "maintenance",
}
FenceResult = Literal["withheld", "pending", "succeeded", "failed"]


class TimelineEntry(BaseModel):
    """One step of a fence's story, oldest first."""

    at: float
    kind: Literal["signal", "probe", "decision", "outcome", "notice"]
    text: str
    evidence: Evidence | None = None


class CheckView(BaseModel):
    """One check of a suspect host as the core judged it (from the host-states topic)."""

    check: int
    evidence: Evidence
    finished_at: float = Field(description="when the core judged it (the watch worker's clock)")
    neighbour: str | None = None
    files_checked: int = 0
    newest_write: float | None = Field(None, description="newest disk mtime, the filer's clock")
    reason: str | None = None
    neighbour_offset: float | None = None
    filer_offset: float | None = None


class HostStateView(BaseModel):
    """A host as fencer sees it: its state, the current episode's evidence, its last probe."""

    host: HostRef
    state: HostFencingState
    status: HostStatus | None = None
    episode: int | None = None
    suspect_since: float | None = None
    stale_checks: int = Field(0, description="stale checks in a row in the current episode")
    last_signal: HostSignal | None = None
    last_probe: CheckView | None = None
    evidence: list[CheckView] = Field(
        default_factory=list, description="the episode's checks, as the core judged them"
    )
    last_decision_id: str | None = None
    record: dict[str, object] | None = Field(
        None, description="the core's record of the host (topic host-states), as it left it"
    )


class BlocklistEntryView(BaseModel):
    """A Ceph blocklist entry fencer's storage fence added and no lift has removed since."""

    entry: str
    at: float = Field(description="when the fence notice that recorded it was sent")
    decision_id: str | None = None


class FenceRecord(BaseModel):
    """A fence decision, its outcome (if any) and the evidence timeline behind it."""

    decision_id: str
    host: HostRef
    episode: int
    action: FenceAction
    approved: bool
    withheld_reason: WithheldReason | None = None
    decided_at: float
    evidence: EvidenceSummary
    budget_used: int
    budget_cap: int
    result: FenceResult
    outcome: FenceOutcome | None = None
    timeline: list[TimelineEntry] = Field(default_factory=list)


class BudgetView(BaseModel):
    """Power-downs approved for a cluster in the current window, against its cap."""

    cluster_uuid: str
    used: int
    cap: int
    window: float
    window_start: float
    resets_at: float | None = Field(None, description="when the oldest counted fence expires")


class _Host:
    def __init__(self, ref: HostRef, limit: int) -> None:
        self.ref = ref
        self.signals: deque[HostSignal] = deque(maxlen=limit)
        self.probes: deque[ProbeResult] = deque(maxlen=limit)
        self.notices: deque[Notice] = deque(maxlen=limit)
        self.states: deque[HostStateRecord] = deque(maxlen=limit)
        self.decisions: list[str] = []
        self.blocklist: dict[str, BlocklistEntryView] = {}  # entry -> as recorded


def _merge_ref(old: HostRef, new: HostRef) -> HostRef:
    """Keep names learnt earlier when a later record carries only the uuid."""
    data = old.model_dump()
    data.update({k: v for k, v in new.model_dump().items() if v is not None})
    return HostRef(**data)


class FencingView:
    """Folds fencer's topics into host states, the fence history and fence budgets."""

    def __init__(self, topics: TopicNames, *, per_host_limit: int = 500) -> None:
        self._names = topics
        self._limit = per_host_limit
        self._hosts: dict[str, _Host] = {}
        self._decisions: dict[str, FenceDecision] = {}
        self._outcomes: dict[str, FenceOutcome] = {}
        # Every approved power-down record (a repeat included), as the gate reads its log.
        self._approvals: list[Logged] = []

    @property
    def topics(self) -> list[str]:
        """The topics this view reads."""
        n = self._names
        return [
            n.host_signals,
            n.probe_results,
            n.fence_decisions,
            n.fence_outcomes,
            n.notices,
            n.host_states,
        ]

    def on_record(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """Fold one record (a TopicReader callback); raises on a record that does not parse."""
        if record.value is None:
            return
        n, value = self._names, record.value
        if record.topic == n.host_signals:
            sig = HostSignal.model_validate_json(value)
            self._host(sig.host).signals.append(sig)
        elif record.topic == n.probe_results:
            probe = ProbeResult.model_validate_json(value)
            self._host(probe.host).probes.append(probe)
        elif record.topic == n.fence_decisions:
            dec = FenceDecision.model_validate_json(value)
            h = self._host(dec.host)
            if dec.decision_id not in self._decisions:
                h.decisions.append(dec.decision_id)
            self._decisions[dec.decision_id] = dec
            if dec.approved and dec.action.powers_down:
                self._approvals.append(
                    Logged(
                        dec.decision_id,
                        dec.host.host_uuid,
                        dec.host.cluster_uuid,
                        dec.action,
                        dec.approved,
                        dec.decided_at,
                    )
                )
        elif record.topic == n.fence_outcomes:
            out = FenceOutcome.model_validate_json(value)
            self._host(out.host)
            self._outcomes[out.decision_id] = out
        elif record.topic == n.notices:
            notice = Notice.model_validate_json(value)
            h = self._host(notice.host)
            h.notices.append(notice)
            _fold_blocklist(h.blocklist, notice)
        elif record.topic == n.host_states:
            st = HostStateRecord.model_validate_json(value)
            self._host(st.host).states.append(st)

    def _host(self, ref: HostRef) -> _Host:
        h = self._hosts.get(ref.host_uuid)
        if h is None:
            h = self._hosts[ref.host_uuid] = _Host(ref, self._limit)
        else:
            h.ref = _merge_ref(h.ref, ref)
        return h

    # -- hosts ----------------------------------------------------------------------------------

    def host(self, uuid: str, ref: HostRef | None = None) -> HostStateView:
        """A host as the core's latest record on fencer.host-states says it is; a host with no
        record yet says so (`ref` names a host the topics have not mentioned)."""
        h = self._hosts.get(uuid)
        if h is None:
            return HostStateView(host=ref or HostRef(host_uuid=uuid), state=NO_RECORD)
        last_status = next((s for s in reversed(h.signals) if s.status is not None), None)
        checks = _checks(h.states)
        # The core's own record is the truth: shown as it is, nothing re-derived.
        core = h.states[-1].record if h.states else None
        episode = (int(core.get("episode") or 0) or None) if core else None
        return HostStateView(
            host=h.ref,
            state=_CORE_STATES.get(str(core.get("state")), "unknown") if core else NO_RECORD,
            status=last_status.status if last_status else None,
            episode=episode,
            suspect_since=core.get("suspect_since") if core else None,
            stale_checks=int(core.get("stale_count") or 0) if core else 0,
            record=core,
            last_signal=h.signals[-1] if h.signals else None,
            last_probe=checks[-1][1] if checks else None,
            evidence=[c for ep, c in checks if ep == episode],
            last_decision_id=h.decisions[-1] if h.decisions else None,
        )

    def blocklist(self, uuid: str) -> list[BlocklistEntryView]:
        """The host's blocklist entries as fencer's notices recorded them (added by its storage
        fence, not lifted through fencer since), oldest first."""
        h = self._hosts.get(uuid)
        return sorted(h.blocklist.values(), key=lambda e: e.at) if h else []

    # -- fences ---------------------------------------------------------------------------------

    def fence(self, decision_id: str) -> FenceRecord | None:
        """One fence with its timeline."""
        dec = self._decisions.get(decision_id)
        return self._record(dec, with_timeline=True) if dec else None

    def history(
        self,
        *,
        cluster: str | None = None,
        host: str | None = None,
        since: float | None = None,
        until: float | None = None,
        result: FenceResult | None = None,
        limit: int = 100,
    ) -> list[FenceRecord]:
        """Fences, newest first, filtered; each with its evidence timeline."""
        out: list[FenceRecord] = []
        for dec in sorted(self._decisions.values(), key=lambda d: d.decided_at, reverse=True):
            if cluster is not None and dec.host.cluster_uuid != cluster:
                continue
            if host is not None and dec.host.host_uuid != host:
                continue
            if since is not None and dec.decided_at < since:
                continue
            if until is not None and dec.decided_at > until:
                continue
            rec = self._record(dec, with_timeline=True)
            if result is not None and rec.result != result:
                continue
            out.append(rec)
            if len(out) >= limit:
                break
        return out

    def _record(self, dec: FenceDecision, *, with_timeline: bool) -> FenceRecord:
        outcome = self._outcomes.get(dec.decision_id)
        result: FenceResult
        if not dec.approved:
            result = "withheld"
        elif outcome is None:
            result = "pending"
        else:
            result = "succeeded" if outcome.success else "failed"
        h = self._hosts.get(dec.host.host_uuid)
        return FenceRecord(
            decision_id=dec.decision_id,
            host=h.ref if h else dec.host,
            episode=dec.episode,
            action=dec.action,
            approved=dec.approved,
            withheld_reason=dec.withheld_reason,
            decided_at=dec.decided_at,
            evidence=dec.evidence,
            budget_used=dec.budget_used,
            budget_cap=dec.budget_cap,
            result=result,
            outcome=outcome,
            timeline=self._timeline(dec, outcome) if with_timeline else [],
        )

    def _timeline(self, dec: FenceDecision, outcome: FenceOutcome | None) -> list[TimelineEntry]:
        h = self._hosts.get(dec.host.host_uuid)
        start = dec.evidence.suspect_since - 1.0
        end = (outcome.finished_at if outcome else dec.decided_at) + 1.0
        items: list[TimelineEntry] = []
        if h is not None:
            for sig in h.signals:
                if start <= sig.at <= end:
                    status = f" ({sig.status.value})" if sig.status else ""
                    items.append(
                        TimelineEntry(at=sig.at, kind="signal", text=f"{sig.kind}{status}")
                    )
            for episode, check in _checks(h.states):
                if episode == dec.episode:
                    items.append(
                        TimelineEntry(
                            at=check.finished_at,
                            kind="probe",
                            text=_check_text(check),
                            evidence=check.evidence,
                        )
                    )
            for note in h.notices:
                if note.decision_id == dec.decision_id:
                    items.append(
                        TimelineEntry(at=note.at, kind="notice", text=f"notice {note.kind.value}")
                    )
        verdict = "approved" if dec.approved else f"withheld ({dec.withheld_reason})"
        items.append(
            TimelineEntry(
                at=dec.decided_at,
                kind="decision",
                text=f"{dec.action.value} {verdict}; budget {dec.budget_used}/{dec.budget_cap}",
            )
        )
        if outcome is not None:
            ok = "succeeded" if outcome.success else "failed"
            power = f", power {outcome.power_before} -> {outcome.power_after}"
            err = f": {outcome.error}" if outcome.error else ""
            items.append(
                TimelineEntry(
                    at=outcome.finished_at,
                    kind="outcome",
                    text=f"{outcome.action.value} via {outcome.driver} {ok}{power}{err}",
                )
            )
        return sorted(items, key=lambda e: e.at)

    # -- budget ---------------------------------------------------------------------------------

    def budget(self, cluster_uuid: str, *, now: float, window: float, cap: int) -> BudgetView:
        """The cluster's approved power-downs in the window at `now`, counted by the function the
        gate counts its decision log with (`fencing.gate.logged_grants`): one per decision id,
        stamped by the gate's clock; one stamped after `now` still counts, as at the gate."""
        start = now - window
        times = [
            g.at for g in logged_grants(self._approvals, now, window) if g.cluster == cluster_uuid
        ]
        return BudgetView(
            cluster_uuid=cluster_uuid,
            used=len(times),
            cap=cap,
            window=window,
            window_start=start,
            resets_at=min(times) + window if times else None,
        )


def _checks(states: Iterable[HostStateRecord]) -> list[tuple[object, CheckView]]:
    """Every judged check (episode, check) in the host-states history, oldest first."""
    out: list[tuple[object, CheckView]] = []
    seen: set[tuple[object, ...]] = set()
    for st in states:
        r = st.record
        judged = (r.get("episode"), r.get("last_check"), r.get("last_probe_at"))
        if not r.get("last_evidence") or not r.get("last_check") or judged in seen:
            continue
        seen.add(judged)
        view = CheckView(
            check=int(r["last_check"]),
            evidence=Evidence(str(r["last_evidence"])),
            finished_at=st.updated_at,
            neighbour=r.get("neighbour"),
            files_checked=int(r.get("files_checked") or 0),
            newest_write=r.get("newest_write"),
            reason=r.get("reason"),
            neighbour_offset=r.get("neighbour_offset"),
            filer_offset=r.get("filer_offset"),
        )
        out.append((r.get("episode"), view))
    return out


def _check_text(c: CheckView) -> str:
    """One judged check of the core's record, in words."""
    via = f" via {c.neighbour}" if c.neighbour else ""
    why = f": {c.reason}" if c.reason else ""
    return f"check {c.check}: {c.evidence.value}{via}, {c.files_checked} files{why}"


def _fold_blocklist(entries: dict[str, BlocklistEntryView], n: Notice) -> None:
    """A storage fence's notice records its entry; a lift notice removes the entry it lifted."""
    if n.blocklist_entry is None or n.kind is NoticeKind.BLOCKLIST_NOT_LIFTED:
        return
    if n.kind is NoticeKind.BLOCKLIST_LIFTED:
        entries.pop(n.blocklist_entry, None)
        return
    entries[n.blocklist_entry] = BlocklistEntryView(
        entry=n.blocklist_entry, at=n.at, decision_id=n.decision_id
    )
