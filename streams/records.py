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
from collections.abc import MutableMapping
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


def host_input(message: Any, topics: Any) -> HostInput | str:
    """The core event a record on one of the host's input topics carries, or why not."""
    if not message.key:
        return f"a {message.topic} record without a host uuid key"
    try:
        if message.topic == topics.host_signals:
            s = HostSignal.model_validate_json(message.value)
            return HostInput(_signal_event(s), s.host)
        if message.topic == topics.probe_results:
            r = ProbeResult.model_validate_json(message.value)
            return HostInput(
                ProbeFinished(
                    at=r.finished_at,
                    episode=r.episode,
                    check=r.check,
                    evidence=r.evidence,
                    newest_write=r.newest_write,
                    heartbeat=r.heartbeat,
                    files_checked=r.files_checked,
                    files_missing=r.files_missing,
                    neighbour=r.neighbour,
                    reason=r.reason,
                ),
                r.host,
            )
        if message.topic == topics.fence_decisions:
            d = FenceDecision.model_validate_json(message.value)
            if d.approved:
                return HostInput(FenceApproved(d.decided_at, d.episode, d.decision_id), d.host)
            reason = d.withheld_reason or WithheldReason.PAUSED
            return HostInput(FenceWithheld(d.decided_at, d.episode, d.decision_id, reason), d.host)
        if message.topic == topics.fence_outcomes:
            o = FenceOutcome.model_validate_json(message.value)
            return HostInput(
                FenceFinished(
                    o.finished_at, o.episode, o.decision_id, o.success, o.power_after, o.error
                ),
                o.host,
            )
    except (ValidationError, ValueError) as exc:
        return f"invalid {message.topic} record: {_first(exc)}"
    return f"unexpected topic {message.topic}"


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
    """Whether the host's record is in a state that checks on ticks."""
    return bool(row.get("record", {}).get("state") == core.HostState.SUSPECT.value)


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
            sig = GateSignal(
                kind=kind, cluster_uuid=ref.cluster_uuid or "", at=action.at, host_uuid=key
            )
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
    return {"record": new.to_dict(), "host": ref.model_dump()}, out


def host_state(row: dict[str, Any]) -> bytes:
    """The host-states record of a hosts-table row."""
    return dump(HostStateRecord(host=HostRef(**row["host"]), record=row["record"], updated_at=time.time()))


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
) -> FenceDecision | None:
    """Feed the gate one record; the decision for a proposal."""
    if isinstance(item, GateSignal):
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
    cluster = item.host.cluster_uuid or ""
    settings = runtime.current
    row = cluster_row(table.get(cluster), cluster)
    row = gatecore.observe(row, gatecore.ClusterPaused(runtime.cluster_paused(cluster)))
    glob = gatecore.pause_all(global_row(table.get(GLOBAL_ROW)), runtime.globally_paused())
    policy = replace(runtime.policy, fence_cap=settings.fence_cap_for(cluster))
    ctx = gatecore.GateContext(policy=policy, started_at=runtime.started_at)
    request = gatecore.FenceRequest(
        item.decision_id, item.host.host_uuid, cluster, item.action, item.proposed_at
    )
    try:
        row, glob, verdict = gatecore.decide(row, glob, request, ctx)
    except core.CoreError as exc:
        log.warning("gate refused %s: %s", item.decision_id, exc)
        return None
    table[cluster] = _jsonable(row)
    table[GLOBAL_ROW] = _jsonable(glob)
    decision = FenceDecision(
        decision_id=item.decision_id,
        host=item.host,
        episode=item.episode,
        action=item.action,
        approved=verdict.approved,
        withheld_reason=verdict.reason,
        evidence=item.evidence,
        decided_at=verdict.at,
        budget_used=verdict.budget_used,
        budget_cap=verdict.budget_cap,
    )
    return runtime.sign_decision(decision)  # the actuator obeys only signed decisions


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

            self._actuator = Actuator(self.settings)
        live = await self.live()
        self._actuator.settings = live
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
        done[decision.decision_id] = outcome.model_dump(mode="json")
        table[key] = done
        return [(topics.fence_outcomes, key.encode(), dump(outcome))]

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

    async def preflight(self) -> list[Notice]:
        """A PREFLIGHT_FAILED notice for each host whose BMC would not answer a fence now
        (at most one per host per day: the notice id carries the day)."""
        from fencing.actuator import preflight

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
        results = await preflight(live, list(refs.values()))
        day = int(time.time() // 86400)
        return [
            Notice(
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
        """Hand a record to the notifier once (the table remembers what was handed over)."""
        from notifiers.render import record_id

        if self._notifier is None:
            from notifiers.service import Notifier

            self._notifier = Notifier.from_settings(self.settings)
        rid = record_id(record)
        sent = dict(table.get(key) or {})
        if rid in sent:
            return
        sent[rid] = time.time()
        table[key] = sent
        await self._notifier.handle(record)

    async def close(self) -> None:
        """Close every client."""
        if self._store is not None:
            await self._store.stop()
        if self._actuation is not None:
            await self._actuation.stop()
        for service in (self._probes, self._inventory):
            if service is not None:
                await service.close()
        if self._notifier is not None:
            await self._notifier.drain(grace=5)
