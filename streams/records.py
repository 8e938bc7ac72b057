"""Wire records <-> core types, and the services the topology's agents call.

Rule: nothing here decides. Conversions are total (bad input becomes a dead-letter reason, never
an exception through a stream); the decisions are `fencing.decision.step` and
`fencing.gate.decide`; the I/O lives in probes/, fencing/actuator.py and notifiers/.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import time
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from fencing import decision as core
from fencing import gate as gatecore
from fencing.events import (
    ClearSuspect,
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
    NoticeKind,
    Notify,
    ProbeFinished,
    ProposeFence,
    RunProbe,
    Tick,
    WithheldReason,
)
from fencing.policy import Policy
from fencing.records import (
    DeadLetter,
    EvidenceSummary,
    FenceDecision,
    FenceOutcome,
    FenceProposal,
    GateSignal,
    HostRef,
    HostSignal,
    HostStateRecord,
    Notice,
    OperatorAction,
    ProbeRequest,
    ProbeResult,
)
from fencing.settings import FencerSettings
from streams import parser

log = logging.getLogger("fencer.streams")

M = TypeVar("M", bound=BaseModel)
Out = tuple[str, bytes, bytes]  # (topic name, key, value)
GLOBAL_ROW = "*"  # the gate table's row that every cluster shares
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"

DOWN_STATES = {
    "Disconnected": HostStatus.DISCONNECTED,
    "Alert": HostStatus.ALERT,
    "Down": HostStatus.DOWN,
}
MAINTENANCE_STATES = {
    "PrepareForMaintenance",
    "Maintenance",
    "ErrorInMaintenance",
    "ErrorInPrepareForMaintenance",
}


def dump(record: BaseModel) -> bytes:
    """A wire record as the JSON bytes of its topic."""
    return record.model_dump_json().encode()


def load(model: type[M], value: Any) -> M | None:
    """A topic value as `model`, or None (logged) when it does not fit."""
    try:
        return model.model_validate_json(value)
    except (ValidationError, ValueError, TypeError) as exc:
        log.warning("dropping a %s record that does not fit: %s", model.__name__, _first(exc))
        return None


def _first(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        e = exc.errors()[0]
        return f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}"
    return str(exc)[:200]


def dead_letter(message: Any, reason: str) -> bytes:
    """The dead-letter record for a Kafka message fencer could not use."""
    key = message.key
    if isinstance(key, bytes):
        key = key.decode("utf-8", "replace")
    value = message.value if isinstance(message.value, bytes) else str(message.value).encode()
    return dump(
        DeadLetter(
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            reason=reason,
            key=key,
            value_b64=base64.b64encode(value or b"").decode(),
            at=time.time(),
        )
    )


# ---------------------------------------------------------------------------------------------
# The host watcher: a table row is {"record": HostRecord.to_dict(), "host": HostRef}


@dataclass(frozen=True)
class HostInput:
    """A core event for one host, with what the record told us about the host."""

    event: HostEvent
    ref: HostRef | None = None


def host_input(message: Any, topics: Any) -> HostInput | str | None:
    """The core event a record on one of the host's input topics carries, why not (a
    dead-letter reason), or None for a record that changes nothing (a refused fence)."""
    if not message.key:
        return f"a {message.topic} record without a host uuid key"
    try:
        if message.topic == topics.host_signals:
            s = HostSignal.model_validate_json(message.value)
            return HostInput(_signal_event(s), s.host)
        if message.topic == topics.probe_results:
            r = ProbeResult.model_validate_json(message.value)
            return HostInput(probe_finished(r, time.time()), r.host)
        if message.topic == topics.fence_decisions:
            d = FenceDecision.model_validate_json(message.value)
            if d.approved:
                return HostInput(FenceApproved(d.decided_at, d.episode, d.decision_id), d.host)
            reason = d.withheld_reason or WithheldReason.PAUSED
            return HostInput(FenceWithheld(d.decided_at, d.episode, d.decision_id, reason), d.host)
        if message.topic == topics.fence_outcomes:
            o = FenceOutcome.model_validate_json(message.value)
            if o.refused:
                # Nothing was done to the host: its record stays where it is and the core sends
                # the proposal again later (the gate re-approves at its own now, the actuator
                # checks everything afresh). People were told by the fence_refused notice.
                return None
            return HostInput(
                FenceFinished(
                    o.finished_at, o.episode, o.decision_id, o.success, o.power_after, o.error
                ),
                o.host,
            )
    except (ValidationError, ValueError) as exc:
        return f"invalid {message.topic} record: {_first(exc)}"
    return f"unexpected topic {message.topic}"


def probe_finished(r: ProbeResult, arrived_at: float) -> ProbeFinished:
    """A probe result as the core's event, stamped with the watch worker's clock on arrival:
    intervals are measured on that one clock, never on the probe's or the filer's."""
    return ProbeFinished(
        at=arrived_at,
        episode=r.episode,
        check=r.check,
        mtimes=tuple(sorted(r.mtimes.items())),
        heartbeats=tuple(sorted(r.heartbeats.items())),
        complete=r.complete,
        files_wanted=r.files_wanted,
        unreadable=r.unreadable,
        neighbour=r.neighbour,
        reason=r.reason,
        neighbour_offset=r.neighbour_offset,
        filer_offset=r.filer_offset,
        live_signs=tuple(r.live_signs),
        min_gap=r.min_gap,
    )


def _signal_event(s: HostSignal) -> HostEvent:
    if s.kind == "disconnected":
        return HostDisconnected(s.at, s.status or HostStatus.DISCONNECTED)
    if s.kind == "up":
        return HostCameBack(s.at)
    if s.kind == "maintenance_started":
        return MaintenanceStarted(s.at)
    if s.kind == "maintenance_ended":
        return MaintenanceEnded(s.at)
    return Tick(s.at)


def _merge_ref(old: HostRef | None, new: HostRef | None) -> HostRef | None:
    if old is None or new is None:
        return new or old
    known = {k: v for k, v in new.model_dump().items() if v is not None}
    return old.model_copy(update=known)


def wants_tick(row: dict[str, Any]) -> bool:
    """Whether the host's record has an open episode (ticks check, re-send and remind)."""
    state = row.get("record", {}).get("state")
    return state not in (None, core.HostState.IDLE.value, core.HostState.MAINTENANCE.value)


def tick(row: dict[str, Any], now: float) -> HostSignal:
    """A tick for this row's host."""
    return HostSignal(kind="tick", host=HostRef(**row["host"]), at=now, source="timer")


def apply(
    row: dict[str, Any] | None,
    item: HostInput,
    key: str,
    policy: Policy,
    settings: FencerSettings,
    topics: Any,
) -> tuple[dict[str, Any] | None, list[Out]]:
    """Step the host's record with one event; the new row and the records to send."""
    record = core.HostRecord.from_dict(row["record"]) if row else core.HostRecord(host=key)
    old_ref = HostRef(**row["host"]) if row and row.get("host") else None
    ref = _merge_ref(old_ref, item.ref) or HostRef(host_uuid=key)
    policy = settings.policy_for(ref.cluster_uuid)  # the live settings, cluster overrides applied
    try:
        new, actions = core.step(record, item.event, policy)
    except core.CoreError as exc:
        log.warning("host %s: %s ignored: %s", ref.host_name or key, type(item.event).__name__, exc)
        new, actions = record, ()
    if row is None and new == record and not actions:
        return None, []  # nothing worth remembering about a host we never saw in trouble
    out: list[Out] = []
    hkey = key.encode()
    ckey = (ref.cluster_uuid or "").encode()
    at = getattr(item.event, "at", time.time())
    for action in actions:
        if isinstance(action, RunProbe):
            req = ProbeRequest(
                host=ref,
                episode=action.episode,
                check=action.check,
                suspect_since=action.suspect_since,
                requested_at=at,
                requested_by=WORKER_ID,
            )
            out.append((topics.probe_requests, hkey, dump(req)))
        elif isinstance(action, ProposeFence):
            fence = settings.effective_ipmi(key, ref.cluster_uuid).values.action
            prop = FenceProposal(
                decision_id=action.decision_id,
                host=ref,
                episode=action.episode,
                action=fence,
                evidence=EvidenceSummary(
                    suspect_since=action.suspect_since,
                    stale_checks=action.stale_checks,
                    newest_write=action.newest_write,
                    files_checked=action.files_checked,
                    last_neighbour=action.neighbour,
                ),
                proposed_at=at,
            )
            out.append((topics.fence_proposals, ckey, dump(prop)))
        elif isinstance(action, MarkSuspect | ClearSuspect):
            kind = "suspect" if isinstance(action, MarkSuspect) else "cleared"
            if not ref.cluster_uuid:
                # Never counted under a cluster "": sent once the inventory knows the cluster.
                log.info("host %s: cluster not known yet, the gate hears of it later", key)
                continue
            sig = GateSignal(kind=kind, cluster_uuid=ref.cluster_uuid, at=action.at, host_uuid=key)
            out.append((topics.fence_proposals, ckey, dump(sig)))
        elif isinstance(action, Notify):
            details = dict(action.details)
            notice = Notice(
                notice_id=f"{key}/{action.episode}/{action.kind.value}/{at:.3f}",
                kind=action.kind,
                host=ref,
                at=at,
                reason=details.get("reason") or details.get("ended_by"),
                result=details.get("state"),
                evidence=_evidence_of(new),
            )
            out.append((topics.notices, hkey, dump(notice)))
    out.extend(_late_suspect(old_ref, ref, new, key, at, topics))
    return {"record": new.to_dict(), "host": ref.model_dump()}, out


def judged_check(before: dict[str, Any] | None, row: dict[str, Any]) -> str | None:
    """The evidence of the check the core just judged, if this row change judged one."""
    new, old = row["record"], (before or {}).get("record", {})
    judged = (new.get("episode"), new.get("last_check"), new.get("last_probe_at"))
    if judged == (old.get("episode"), old.get("last_check"), old.get("last_probe_at")):
        return None
    return str(new.get("last_evidence")) if new.get("last_evidence") else None


def _late_suspect(
    old: HostRef | None, ref: HostRef, record: core.HostRecord, key: str, at: float, topics: Any
) -> list[Out]:
    """The gate's `suspect` signal held back while the host's cluster was unknown."""
    episode_open = record.state not in (core.HostState.IDLE, core.HostState.MAINTENANCE)
    if not episode_open or not ref.cluster_uuid or old is None or old.cluster_uuid:
        return []  # (a new row's MarkSuspect already went out with its cluster)
    sig = GateSignal(kind="suspect", cluster_uuid=ref.cluster_uuid, at=at, host_uuid=key)
    return [(topics.fence_proposals, ref.cluster_uuid.encode(), dump(sig))]


def host_state(row: dict[str, Any]) -> bytes:
    """The host-states record of a hosts-table row."""
    ref = HostRef(**row["host"])
    return dump(HostStateRecord(host=ref, record=row["record"], updated_at=time.time()))


def _evidence_of(r: core.HostRecord) -> EvidenceSummary | None:
    if r.suspect_since is None:
        return None
    return EvidenceSummary(
        suspect_since=r.suspect_since,
        stale_checks=r.stale_count,
        newest_write=r.newest_write,
        files_checked=r.files_checked,
        last_neighbour=r.neighbour,
    )


# ---------------------------------------------------------------------------------------------
# The gate: rows are ClusterGate / GlobalGate as JSON


def gate_input(message: Any) -> FenceProposal | GateSignal | str:
    """A proposal or a gate signal, or why not."""
    try:
        if b'"decision_id"' in (message.value or b""):
            return FenceProposal.model_validate_json(message.value)
        return GateSignal.model_validate_json(message.value)
    except (ValidationError, ValueError) as exc:
        return f"invalid gate record: {_first(exc)}"


def _grant(d: dict[str, Any]) -> gatecore.Grant:
    return gatecore.Grant(d["decision_id"], d["host"], d["cluster"], d["at"])


def _verdict(d: dict[str, Any]) -> gatecore.Verdict:
    return gatecore.Verdict(
        **{
            **d,
            "action": FenceAction(d["action"]),
            "reason": WithheldReason(d["reason"]) if d.get("reason") else None,
        }
    )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, frozenset):
        return sorted(obj)
    if isinstance(obj, tuple):
        return [_jsonable(x) for x in obj]
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _jsonable(getattr(obj, k)) for k in obj.__dataclass_fields__}
    if hasattr(obj, "value") and not isinstance(obj, int | float | str):
        return obj.value
    if obj == float("-inf"):
        return None
    return obj


def cluster_row(d: dict[str, Any] | None, cluster: str) -> gatecore.ClusterGate:
    """The gate table's row for one cluster."""
    if not d:
        return gatecore.ClusterGate(cluster=cluster)
    return gatecore.ClusterGate(
        cluster=cluster,
        hosts=d.get("hosts", 0),
        suspect=frozenset(d.get("suspect", ())),
        paused=d.get("paused", False),
        clock=d["clock"] if d.get("clock") is not None else float("-inf"),
        grants=tuple(_grant(g) for g in d.get("grants", ())),
        verdicts=tuple(_verdict(v) for v in d.get("verdicts", ())),
    )


def global_row(d: dict[str, Any] | None) -> gatecore.GlobalGate:
    """The gate table's shared row."""
    if not d:
        return gatecore.GlobalGate()
    return gatecore.GlobalGate(
        paused=d.get("paused", False),
        clock=d["clock"] if d.get("clock") is not None else float("-inf"),
        grants=tuple(_grant(g) for g in d.get("grants", ())),
    )


def apply_gate(
    table: MutableMapping[str, Any],
    item: FenceProposal | GateSignal,
    runtime: Runtime,
    now: float | None = None,
) -> FenceDecision | Notice | None:
    """Feed the gate one record at the gate worker's clock `now`: the decision for a proposal,
    a clock_skew notice for a proposal the gate refuses to judge, else None."""
    now = time.time() if now is None else now
    if isinstance(item, GateSignal):
        if not item.cluster_uuid:
            log.warning("gate: a %s signal without a cluster dropped", item.kind)
            return None
        row = cluster_row(table.get(item.cluster_uuid), item.cluster_uuid)
        fact: gatecore.GateFact
        if item.kind == "cluster_size":
            fact = gatecore.ClusterSized(item.host_count or 0)
        elif item.kind == "suspect":
            fact = gatecore.HostSuspected(item.host_uuid or "")
        else:
            fact = gatecore.HostCleared(item.host_uuid or "")
        table[item.cluster_uuid] = _jsonable(gatecore.observe(row, fact))
        return None
    settings = runtime.current
    cluster = item.host.cluster_uuid
    if not cluster:
        # No cluster row to judge against: a temporary withhold, proposed again later.
        log.warning("gate: %s names no cluster: withheld until it is known", item.decision_id)
        return _decision(item, False, WithheldReason.CLUSTER_SIZE_UNKNOWN, now, 0, 0)
    row = cluster_row(table.get(cluster), cluster)
    row = gatecore.observe(row, gatecore.ClusterPaused(runtime.cluster_paused(cluster)))
    glob = gatecore.pause_all(global_row(table.get(GLOBAL_ROW)), runtime.globally_paused())
    policy = replace(runtime.policy, fence_cap=settings.fence_cap_for(cluster))
    ctx = gatecore.GateContext(
        policy=policy,
        started_at=runtime.started_at,
        clock_tolerance=settings.gate.clock_tolerance,
    )
    request = gatecore.FenceRequest(
        item.decision_id, item.host.host_uuid, cluster, item.action, item.proposed_at
    )
    try:
        row, glob, verdict = gatecore.decide(row, glob, request, ctx, now)
    except core.CoreError as exc:
        log.warning("gate refused %s: %s", item.decision_id, exc)
        return None
    table[cluster] = _jsonable(row)
    table[GLOBAL_ROW] = _jsonable(glob)
    if verdict.skew is not None:
        tolerance = ctx.clock_tolerance
        text = (
            f"proposal {item.decision_id} is stamped {verdict.skew:+.0f} s from the gate's clock "
            f"(tolerance {tolerance:g} s): not judged; fix the clock (NTP) of the worker that "
            "watches this host, the proposal is judged once it is sent with a sane stamp"
        )
        log.warning("gate: %s", text)
        return Notice(
            # One notice per decision and tolerance period: repeated while the skew lasts.
            notice_id=f"{item.decision_id}/clock_skew/{int(now // tolerance)}",
            kind=NoticeKind.CLOCK_SKEW,
            host=item.host,
            at=now,
            action=item.action,
            decision_id=item.decision_id,
            reason=text,
            evidence=item.evidence,
        )
    # The actuator obeys only signed decisions.
    return runtime.sign_decision(
        _decision(
            item,
            verdict.approved,
            verdict.reason,
            verdict.at,
            verdict.budget_used,
            verdict.budget_cap,
        )
    )


def _decision(
    item: FenceProposal,
    approved: bool,
    reason: WithheldReason | None,
    at: float,
    used: int,
    cap: int,
) -> FenceDecision:
    return FenceDecision(
        decision_id=item.decision_id,
        host=item.host,
        episode=item.episode,
        action=item.action,
        approved=approved,
        withheld_reason=reason,
        evidence=item.evidence,
        decided_at=at,
        budget_used=used,
        budget_cap=cap,
    )


# ---------------------------------------------------------------------------------------------
# Notifier input


def notifiable(message: Any, topics: Any) -> FenceDecision | FenceOutcome | Notice | None:
    """The record on a notifier topic."""
    model: type[BaseModel] = {
        topics.fence_decisions: FenceDecision,
        topics.fence_outcomes: FenceOutcome,
        topics.notices: Notice,
    }[message.topic]
    return load(model, message.value)  # type: ignore[return-value]


def _done_entry(decision: FenceDecision, outcome: FenceOutcome) -> dict[str, Any]:
    """An `actuated` table entry: the outcome, and the decision (an operator may retry it)."""
    return {**outcome.model_dump(mode="json"), "decision": decision.model_dump(mode="json")}


def failed_fence(
    row: dict[str, Any], decision_id: str | None = None
) -> tuple[str, dict[str, Any]] | None:
    """The host's failed fence: the named decision, else the latest one if it failed."""
    entries = {k: v for k, v in row.items() if isinstance(v, dict) and "success" in v}
    if decision_id is None and entries:
        decision_id = max(entries, key=lambda k: entries[k].get("finished_at") or 0.0)
    entry = entries.get(decision_id or "")
    if entry is None or entry.get("success"):
        return None
    return decision_id or "", entry


def reminders(rows: Iterable[tuple[str, Any]], now: float, interval: float) -> list[Notice]:
    """A fence_failed notice for each host whose latest fence failed and that no operator has
    retried or marked handled: one per `interval` since the failure, each with its own id."""
    out: list[Notice] = []
    for host, row in rows:
        target = failed_fence(dict(row or {}))
        if target is None or target[1].get("handled_at") is not None:
            continue
        decision_id, entry = target
        o = FenceOutcome.model_validate(entry)
        n = int((now - o.finished_at) // interval)
        if n < 1:
            continue
        minutes = (now - o.finished_at) / 60
        out.append(
            Notice(
                notice_id=f"{decision_id}/fence_failed/{o.started_at:.0f}/{n}",
                kind=NoticeKind.FENCE_FAILED,
                host=o.host,
                at=now,
                action=o.action,
                decision_id=decision_id,
                result=f"reminder {n}: not handled for {minutes:.0f} min",
                reason=(
                    f"the fence failed and nobody has acted: {o.error or 'no reason given'}; "
                    f"`fencer fence retry {host}` runs it again, `fencer fence handled {host}` "
                    "stops these reminders (or the buttons in the web UI)"
                ),
            )
        )
    return out


async def send_operator_action(settings: FencerSettings, action: OperatorAction) -> None:
    """Write an operator's retry or handled record to its topic (CLI and web UI)."""
    from aiokafka import AIOKafkaProducer

    from streams.kafka import aiokafka_kwargs, prepare_kafka

    prepare_kafka(settings)
    producer = AIOKafkaProducer(acks="all", **aiokafka_kwargs(settings))
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.kafka.topics.operator_actions,
            key=action.host_uuid.encode(),
            value=dump(action),
        )
    finally:
        await producer.stop()


class RowStore(MutableMapping[str, float]):
    """One key of a Faust table as a mapping: each write stores the whole row (a changelog
    record), so a mark is durable as soon as it is set."""

    def __init__(self, table: MutableMapping[str, Any], key: str) -> None:
        self.table, self.key = table, key

    def _row(self) -> dict[str, float]:
        return dict(self.table.get(self.key) or {})

    def __getitem__(self, k: str) -> float:
        return self._row()[k]

    def __setitem__(self, k: str, v: float) -> None:
        self.table[self.key] = {**self._row(), k: v}

    def __delitem__(self, k: str) -> None:
        row = self._row()
        del row[k]
        self.table[self.key] = row

    def __iter__(self) -> Any:
        return iter(self._row())

    def __len__(self) -> int:
        return len(self._row())


# ---------------------------------------------------------------------------------------------
# The services behind the agents, created lazily (a role that does not need one never opens it)


@dataclass
class Runtime:
    """Long-lived clients the agents share: CloudStack, SSH probes, BMCs, mail and traps."""

    settings: FencerSettings
    started_at: float
    _probes: Any = None
    _actuator: Any = None
    _notifier: Any = None
    _inventory: Any = None
    _polled: dict[str, tuple[str, str]] = field(default_factory=dict)
    _names: dict[str, str] = field(default_factory=dict)
    _last_state: dict[str, str] = field(default_factory=dict)

    _store: Any = None
    _store_failed: bool = False
    _keyring: Any = None
    _actuation: Any = None
    # async (Notice) -> None, set by the topology: how the actuator's notices reach the topic
    notice_sink: Any = None
    _reminded: set[str] = field(default_factory=set)
    _pins: Any = None  # streams.bmc_pins.BmcPinStore once it has read the topic

    @property
    def policy(self) -> Policy:
        return self.settings.policy.to_policy()

    async def live(self) -> FencerSettings:
        """The file's settings overlaid with the settings topic (what the UI changed)."""
        if self._store is None and not self._store_failed:
            from webui.settings_store import SettingsStore

            store = SettingsStore(self.settings, keyring=self.keyring())
            try:
                await store.start(within=15.0)
                self._store = store
            except Exception as exc:
                log.warning("settings topic unreadable, using the settings file only: %s", exc)
                self._store_failed = True
        return self._store.settings if self._store is not None else self.settings

    @property
    def current(self) -> FencerSettings:
        """The live settings once read, else the file's."""
        return self._store.settings if self._store is not None else self.settings

    def cluster_paused(self, cluster: str) -> bool:
        if self._store is not None:
            return bool(self._store.is_paused(cluster))
        c = self.settings.clusters.get(cluster)
        return bool(c and c.paused)

    def globally_paused(self) -> bool:
        return bool(self._store.is_paused(None)) if self._store is not None else False

    def inventory(self) -> Any:
        if self._inventory is None:
            from probes.inventory import Inventory

            self._inventory = Inventory(self.settings)
        return self._inventory

    async def signal_from_event_bus(self, message: Any) -> tuple[HostSignal | None, str | None]:
        """A CloudStack event bus record as a host signal, or a dead-letter reason, or neither."""
        parsed = parser.parse_record(message.key, message.value)
        if isinstance(parsed, parser.Rejected):
            return None, parsed.reason
        at = getattr(parsed, "at", None) or (message.timestamp or time.time())
        kind: str | None = None
        status: HostStatus | None = None
        if isinstance(parsed, parser.HostDisconnectedAlert):
            kind, status = "disconnected", HostStatus.DISCONNECTED
        elif isinstance(parsed, parser.HostDownAlert):
            kind, status = "disconnected", HostStatus.DOWN
        elif isinstance(parsed, parser.HostAlertStateAlert):
            kind, status = "disconnected", HostStatus.ALERT
        elif isinstance(parsed, parser.MaintenancePrepare) and parsed.status == "Completed":
            kind = "maintenance_started"
        elif isinstance(parsed, parser.MaintenancePrepare) and parsed.status in (
            "Scheduled",
            "Started",
        ):
            kind = "maintenance_started"
        elif isinstance(parsed, parser.MaintenanceCancel) and parsed.status == "Completed":
            kind = "maintenance_ended"
        if kind is None:
            return None, None
        uuid = getattr(parsed, "host_uuid", None)
        name = getattr(parsed, "host_name", None)
        if uuid is None and name:
            uuid = await self.resolve_name(name)
        if uuid is None:
            return None, f"{parsed.kind}: no host uuid in the event and none found by name"
        ref = HostRef(host_uuid=uuid, host_name=name, zone_uuid=getattr(parsed, "zone_uuid", None))
        cached = self._polled.get(uuid)
        if cached is not None:
            ref = ref.model_copy(update={"cluster_uuid": cached[0], "ip_address": cached[1]})
        else:
            ref = await self._complete_ref(ref)
        return HostSignal(kind=kind, host=ref, at=float(at), status=status), None  # type: ignore[arg-type]

    async def resolve_name(self, name: str) -> str | None:
        """A host uuid from its name (older alert wordings carry only name and numeric id)."""
        if name in self._names:
            return self._names[name]
        try:
            hosts = await self.inventory()._list("listHosts", name=name, type="Routing")
        except Exception as exc:
            log.warning("cannot resolve host %s: %s", name, exc)
            return None
        for h in hosts:
            if h.get("name") == name:
                self._names[name] = h["id"]
                return str(h["id"])
        return None

    async def _complete_ref(self, ref: HostRef) -> HostRef:
        try:
            h = await self.inventory().host(ref.host_uuid)
        except Exception as exc:
            log.warning("cannot look up host %s: %s", ref.host_uuid, exc)
            return ref
        return ref.model_copy(
            update={
                "cluster_uuid": h.cluster_uuid,
                "ip_address": h.ip,
                "host_name": h.name,
                "zone_uuid": h.zone_uuid,
            }
        )

    async def poll_hosts(self) -> tuple[list[HostSignal], list[GateSignal]]:
        """listHosts: signals for hosts whose state changed since the last poll, cluster sizes."""
        now = time.time()
        try:
            hosts = await self.inventory()._list("listHosts", type="Routing", hypervisor="KVM")
        except Exception as exc:
            log.warning("listHosts poll failed: %s", exc)
            return [], []
        signals: list[HostSignal] = []
        sizes: dict[str, int] = {}
        for h in hosts:
            uuid = h["id"]
            cluster = h.get("clusterid") or ""
            sizes.setdefault(cluster, 0)
            if h.get("resourcestate") == "Enabled":
                # The storm guard's denominator: hosts that could be running VMs (not Disabled,
                # not in or entering maintenance).
                sizes[cluster] = sizes.get(cluster, 0) + 1
            state, rstate = h.get("state", ""), h.get("resourcestate", "")
            self._names[h.get("name", uuid)] = uuid
            previous = self._polled.get(uuid)
            self._polled[uuid] = (cluster, h.get("ipaddress", ""))
            key = f"{state}/{rstate}"
            # Non-Up hosts are reported on every poll (the core ignores repeats, and a host whose
            # maintenance ended while it is still down must open a new episode); Up hosts and
            # maintenance only when they change.
            changed = previous is None or self._last_state.get(uuid) != key
            self._last_state[uuid] = key
            if not changed and (state not in DOWN_STATES or rstate in MAINTENANCE_STATES):
                continue
            ref = HostRef(
                host_uuid=uuid,
                host_name=h.get("name"),
                cluster_uuid=cluster or None,
                cluster_name=h.get("clustername"),
                zone_uuid=h.get("zoneid"),
                zone_name=h.get("zonename"),
                ip_address=h.get("ipaddress"),
            )
            if rstate in MAINTENANCE_STATES:
                signals.append(
                    HostSignal(
                        kind="maintenance_started",
                        host=ref,
                        at=now,
                        source="poller",
                        resource_state=rstate,
                    )
                )
            elif state in DOWN_STATES:
                # CloudStack's resource state says the host is out of maintenance: end it here
                # too (the cancel event may have been missed); the core ignores it otherwise.
                signals.append(
                    HostSignal(
                        kind="maintenance_ended",
                        host=ref,
                        at=now,
                        source="poller",
                        resource_state=rstate,
                    )
                )
                signals.append(
                    HostSignal(
                        kind="disconnected",
                        host=ref,
                        at=now,
                        source="poller",
                        status=DOWN_STATES[state],
                        resource_state=rstate,
                    )
                )
            elif state == "Up":
                signals.append(
                    HostSignal(
                        kind="maintenance_ended",
                        host=ref,
                        at=now,
                        source="poller",
                        resource_state=rstate,
                    )
                )
                signals.append(
                    HostSignal(
                        kind="up",
                        host=ref,
                        at=now,
                        source="poller",
                        status=HostStatus.UP,
                        resource_state=rstate,
                    )
                )
        gates = [
            GateSignal(kind="cluster_size", cluster_uuid=c, at=now, host_count=n)
            for c, n in sizes.items()
            if c
        ]
        return signals, gates

    async def run_probe(self, request: ProbeRequest) -> ProbeResult:
        """One storage-activity check."""
        if self._probes is None:
            from probes.service import ProbeService

            self._probes = ProbeService(self.settings, inventory=self.inventory())
        result: ProbeResult = await self._probes.run(request)
        return result

    def keyring(self) -> Any:
        """The signing keys (fencing.signing.Keyring); KeyringError names the setting if none."""
        if self._keyring is None:
            from fencing.signing import load_keyring

            self._keyring = load_keyring(self.settings)
        return self._keyring

    def decision_is_signed(self, message: Any, required: bool = True) -> bool:
        """Whether a fence-decisions record carries the gate's signature (when not `required`
        and this worker holds no key, it cannot tell and says yes)."""
        from fencing.signing import DECISION, KeyringError, SignatureError, verify_bytes

        try:
            ring = self.keyring()
        except KeyringError:
            if required:
                raise
            return True
        try:
            verify_bytes(ring, DECISION, message.value)
        except SignatureError:
            return False
        return True

    def sign_decision(self, decision: FenceDecision) -> FenceDecision:
        """The decision with the gate's signature."""
        from fencing.signing import DECISION, sign

        signed = sign(self.keyring(), DECISION, decision.model_dump(mode="json"))
        return FenceDecision.model_validate(signed)

    async def start_actuation(self) -> None:
        """Start reading what the actuator's checks need (host states, claims); retried on use."""
        try:
            await self._actuation_service()
        except Exception as exc:
            log.warning("actuate: cannot read the host-states or fence-claims topic yet: %s", exc)

    async def _actuation_service(self) -> Any:
        if self._actuation is None:
            from streams.actuation import Actuation

            act = Actuation(
                self.settings, self.keyring(), WORKER_ID, lambda h: self.inventory().host(h)
            )
            await act.start()
            self._actuation = act
        return self._actuation

    async def actuate(self, message: Any, table: MutableMapping[str, Any]) -> list[Out]:
        """A fence-decisions record -> what to send: the outcome (and a notice), or nothing.

        Only a decision fencer's gate signed, fresh, backed by fencer's own host record,
        confirmed by CloudStack now and claimed once is carried out (streams.actuation)."""
        from streams.actuation import (
            Forged,
            NotNow,
            forged_notice,
            read_decision,
            refusal,
            refused_notice,
        )

        topics = self.settings.kafka.topics
        act = await self._actuation_service()
        parsed = read_decision(act.ring, message)
        if isinstance(parsed, Forged):
            log.error(
                "REFUSED a fence-decisions record fencer did not sign (%s partition %s offset %s, "
                "names host %s): %s",
                message.topic,
                message.partition,
                message.offset,
                parsed.claimed_host,
                parsed.reason,
            )
            notice = forged_notice(message, parsed, time.time())
            return [
                (topics.notices, notice.host.host_uuid.encode(), dump(notice)),
                (topics.dead_letter, b"", dead_letter(message, f"forged record: {parsed.reason}")),
            ]
        decision = parsed
        if not decision.approved:
            return []
        key = decision.host.host_uuid
        if self._actuator is None:
            from fencing.actuator import Actuator

            self._actuator = Actuator(self.settings, notify=self.emit_notice)
        live = await self.live()
        self._actuator.settings = live
        pins = await self.bmc_pins()
        self._actuator.pins = pins
        self._actuator.announce = getattr(pins, "send_notice", None)
        done = dict(table.get(key) or {})
        first = done.get(decision.decision_id)
        claimed = act.claims.done(decision.decision_id)
        if first is None and claimed is not None and claimed.outcome is not None:
            first = claimed.outcome
        if first is not None:
            log.info("decision %s already carried out: not acting again", decision.decision_id)
            return [(topics.fence_outcomes, key.encode(), dump(FenceOutcome.model_validate(first)))]
        try:
            await act.last_moment(decision, live)

            async def carry_out(takeover: bool) -> FenceOutcome:
                if takeover:
                    # Time passed while the dead claimant's lease ran out: ask again.
                    await act.last_moment(decision, live, fresh=False)
                return await self._carry_out(decision, takeover)

            outcome, _acted = await act.claims.run_once(
                decision, live.actuator.claim_lease, carry_out
            )
        except NotNow as exc:
            now = time.time()
            log.warning(
                "host %s: decision %s REFUSED at the last moment: %s",
                decision.host.host_name or key,
                decision.decision_id,
                exc,
            )
            n = refused_notice(decision, str(exc), now)
            return [
                (topics.fence_outcomes, key.encode(), dump(refusal(decision, str(exc), now))),
                (topics.notices, key.encode(), dump(n)),
            ]
        done = dict(table.get(key) or {})  # other decisions may have finished meanwhile
        done[decision.decision_id] = _done_entry(decision, outcome)
        table[key] = done
        return [(topics.fence_outcomes, key.encode(), dump(outcome))]

    def due_reminders(self, rows: Iterable[tuple[str, Any]], now: float) -> list[Notice]:
        """The fence_failed reminders due now that this worker has not sent yet (after a
        restart one may go out again: the same id, dropped by the notify table)."""
        every = self.current.actuator.renotify_interval
        due = [n for n in reminders(rows, now, every) if n.notice_id not in self._reminded]
        self._reminded.update(n.notice_id for n in due)
        return due

    async def emit_notice(self, notice: Notice) -> None:
        """Send a notice the actuator raised (VMs still down, ...) to the notices topic."""
        if self.notice_sink is None:
            log.error("notice %s (%s) has nowhere to go", notice.notice_id, notice.kind.value)
            return
        await self.notice_sink(notice)

    async def operator_action(
        self, action: OperatorAction, table: MutableMapping[str, Any], key: str
    ) -> FenceOutcome | None:
        """An operator's retry (runs the failed decision again; the new outcome) or handled
        (stops the reminders; None)."""
        target = failed_fence(dict(table.get(key) or {}), action.decision_id)
        if target is None:
            log.warning(
                "operator %s for host %s: no failed fence %s to act on",
                action.kind,
                key,
                action.decision_id or "(latest)",
            )
            return None
        decision_id, entry = target
        if action.kind == "handled":
            row = dict(table.get(key) or {})
            row[decision_id] = {**entry, "handled_at": action.at, "handled_by": action.by}
            table[key] = row
            log.info("fence %s marked handled by %s", decision_id, action.by or "an operator")
            return None
        if "decision" not in entry:
            log.warning("fence %s cannot be retried: its decision was not kept", decision_id)
            return None
        decision = FenceDecision.model_validate(entry["decision"])
        if self._actuator is None:
            from fencing.actuator import Actuator

            self._actuator = Actuator(self.settings, notify=self.emit_notice)
        self._actuator.settings = await self.live()
        log.info("fence %s retried by %s", decision_id, action.by or "an operator")
        from streams.actuation import NotNow, operator_checks, refusal

        try:
            # The operator is the authority on age and evidence; CloudStack must still agree.
            await operator_checks(
                decision, self._actuator.settings, lambda h: self.inventory().host(h)
            )
            outcome: FenceOutcome | None = await self._actuator.handle(decision, again=True)
        except NotNow as exc:
            log.warning("fence %s: operator retry refused: %s", decision_id, exc)
            return refusal(decision, str(exc), time.time())
        if outcome is not None:
            row = dict(table.get(key) or {})
            row[decision_id] = {**_done_entry(decision, outcome), "retried_by": action.by}
            table[key] = row
        return outcome

    async def _carry_out(self, decision: FenceDecision, takeover: bool) -> FenceOutcome:
        """The BMC action; after a dead claimant, read the power first (never reboot twice)."""
        assert self._actuator is not None
        if not takeover or decision.action is not FenceAction.REBOOT:
            # The engine reads power first: a stop finds a host already off and calls it fenced.
            outcome: FenceOutcome = await self._actuator.handle(decision)
            return outcome
        from fencing.actuator import check_host

        live = self._actuator.settings
        read = await check_host(live, decision.host.host_uuid, decision.host.cluster_uuid)
        if read.power == "off":
            stop = decision.model_copy(update={"action": FenceAction.STOP})
            outcome = await self._actuator.handle(stop)
            return outcome.model_copy(update={"action": decision.action})
        now = time.time()
        return FenceOutcome(
            decision_id=decision.decision_id,
            host=decision.host,
            episode=decision.episode,
            action=decision.action,
            driver=read.driver,
            success=False,
            power_before=read.power,
            power_after=read.power,
            started_at=now,
            finished_at=now,
            attempts=0,
            error=(
                f"a claimant died during this reboot and the power reads {read.power or 'unknown'}:"
                " a reboot is never repeated blindly; an operator must check the host"
            ),
        )

    async def bmc_pins(self) -> Any:
        """The BMC pin store (topic bmc-pins), or one that refuses every fence while the topic
        cannot be read: a BMC whose identity cannot be checked is not used (fencing.identity)."""
        if self._pins is not None:
            return self._pins
        from fencing.identity import PinStoreError
        from streams.bmc_pins import BmcPinStore

        store = BmcPinStore(self.settings)
        try:
            await store.start(within=15.0)
        except PinStoreError as exc:
            log.warning("BMC pins unreadable, fences refused until they are: %s", exc)
            return _UnreadablePins(str(exc))
        self._pins = store
        return store

    async def preflight(self) -> list[Notice]:
        """A PREFLIGHT_FAILED notice for each host whose BMC would not answer a fence now, a
        BMC_IDENTITY_CHANGED one for each BMC whose system GUID is not the pinned one (at most
        one per host per day: the notice id carries the day). GUIDs are pinned on first read."""
        from fencing.actuator import preflight
        from fencing.identity import IdentityCheck, identity_notice

        try:
            hosts = await self.inventory()._list("listHosts", type="Routing", hypervisor="KVM")
        except Exception as exc:
            log.warning("pre-flight: cannot list hosts: %s", exc)
            return []
        live = await self.live()
        refs = {
            h["id"]: HostRef(
                host_uuid=h["id"],
                host_name=h.get("name"),
                cluster_uuid=h.get("clusterid"),
                zone_uuid=h.get("zoneid"),
            )
            for h in hosts
            if live.effective_ipmi(h["id"], h.get("clusterid")).address
        }
        pins = await self.bmc_pins()
        results = await preflight(live, list(refs.values()), pins=pins)
        day = int(time.time() // 86400)
        return [
            identity_notice(
                IdentityCheck(r.host_uuid, "changed", guid=r.guid, reason=r.error),
                refs[r.host_uuid],
                r.checked_at,
            )
            if r.identity == "changed"
            else Notice(
                notice_id=f"{r.host_uuid}/preflight/{day}",
                kind=NoticeKind.PREFLIGHT_FAILED,
                host=refs[r.host_uuid],
                at=r.checked_at,
                reason=r.error or r.detail or "the BMC did not answer",
            )
            for r in results
            if not r.ok
        ]

    async def notify(
        self,
        record: FenceDecision | FenceOutcome | Notice,
        table: MutableMapping[str, Any],
        key: str,
    ) -> None:
        """Deliver a record's notification before returning (so the offset is committed after
        delivery): marked in the table per channel once its peer accepted it, at least once."""
        if self._notifier is None:
            from notifiers.service import Notifier

            self._notifier = Notifier.from_settings(self.settings)
        await self._notifier.deliver(record, RowStore(table, key), forever=True)

    async def close(self) -> None:
        """Close every client."""
        if self._store is not None:
            await self._store.stop()
        if self._actuation is not None:
            await self._actuation.stop()
        if self._pins is not None:
            await self._pins.stop()
        for service in (self._probes, self._inventory):
            if service is not None:
                await service.close()
        if self._notifier is not None:
            await self._notifier.drain(grace=5)


class _UnreadablePins:
    """A pin store that cannot be read: every identity check through it is refused."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def get(self, host_uuid: str) -> Any:
        from fencing.identity import PinStoreError

        raise PinStoreError(self.reason)

    async def put(self, pin: Any) -> None:
        from fencing.identity import PinStoreError

        raise PinStoreError(self.reason)
