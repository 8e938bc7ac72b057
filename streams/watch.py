"""The host watcher's shell: one host's table row stepped by one core event.

Rule: `fencing.decision.step` decides; this module only loads the row, calls it with the live
settings and turns its actions into topic records (probe requests, proposals, gate signals,
notices). A row is `streams.codec.pack_row(HostRecord.to_dict(), HostRef)` (compact, versioned;
`unpack_row` reads every version).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from fencing import decision as core
from fencing.events import ClearSuspect, MarkSuspect, Notify, ProposeFence, RunProbe
from fencing.policy import Policy
from fencing.records import (
    EvidenceSummary,
    FenceProposal,
    GateSignal,
    HostRef,
    HostSignal,
    HostStateRecord,
    Notice,
    ProbeRequest,
)
from fencing.settings import FencerSettings
from streams.codec import (
    ROW_VERSION,
    HostInput,
    Out,
    dump,
    pack_row,
    row_content,
    row_position,
    unpack_row,
    with_position,
)
from streams.worker_clock import CLOCK_ID

log = logging.getLogger("fencer.streams")

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


_UNPACKED: dict[int, tuple[Any, tuple[dict[str, Any], dict[str, Any]]]] = {}
_UNPACKED_MAX = 64


def _unpacked(row: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """`unpack_row`, remembered for the rows unpacked last, by identity: one event's row was
    unpacked up to six times (the step, the schedule, the host-states record, the judged check,
    the tick timer; issue 17). A row is never changed in place (the watch writes new lists,
    streams.tables.RowCache); the dicts returned are shared: read them, never change them."""
    hit = _UNPACKED.get(id(row))
    if hit is not None and hit[0] is row:
        return hit[1]
    out = unpack_row(row)
    if len(_UNPACKED) >= _UNPACKED_MAX:
        _UNPACKED.clear()
    _UNPACKED[id(row)] = (row, out)  # (the row is held: its id is not reused meanwhile)
    return out


_POLICIES: dict[tuple[int, str | None], tuple[FencerSettings, Policy]] = {}


def policy_for(settings: FencerSettings, cluster_uuid: str | None) -> Policy:
    """`settings.policy_for(cluster_uuid)`, remembered per settings object (the live settings
    are replaced, never changed in place, when the settings topic changes them): built twice
    per event before, ~16 us each (issue 17)."""
    hit = _POLICIES.get((id(settings), cluster_uuid))
    if hit is not None and hit[0] is settings:
        return hit[1]
    policy = settings.policy_for(cluster_uuid)
    if len(_POLICIES) >= 1024:
        _POLICIES.clear()
    _POLICIES[(id(settings), cluster_uuid)] = (settings, policy)  # (held: its id stays its own)
    return policy


_ACTIONS: dict[tuple[int, str, str | None], tuple[FencerSettings, Any]] = {}


def fence_action(settings: FencerSettings, host_uuid: str, cluster_uuid: str | None) -> Any:
    """`settings.effective_ipmi(host, cluster).values.action`, remembered per settings object
    as `policy_for` (~24 us each, at every proposal of a burst; issue 17)."""
    key = (id(settings), host_uuid, cluster_uuid)
    hit = _ACTIONS.get(key)
    if hit is not None and hit[0] is settings:
        return hit[1]
    action = settings.effective_ipmi(host_uuid, cluster_uuid).values.action
    if len(_ACTIONS) >= 1024:
        _ACTIONS.clear()
    _ACTIONS[key] = (settings, action)  # (held: its id stays its own)
    return action


def _merge_ref(old: HostRef | None, new: HostRef | None) -> HostRef | None:
    if old is None or new is None:
        return new or old
    known = {k: v for k, v in new.model_dump().items() if v is not None}
    return old.model_copy(update=known)


def wants_tick(row: Any) -> bool:
    """Whether the host's record has an open episode (ticks check, re-send and remind)."""
    try:
        state = _unpacked(row)[0].get("state")
    except ValueError as exc:  # never a crashed timer: the row is reported, its host skipped
        log.warning("hosts table: %s", exc)
        return False
    return state not in (None, core.HostState.IDLE.value, core.HostState.MAINTENANCE.value)


# How often the tick timer looks at the rows; a check goes out at most this late.
TICK_RESOLUTION = 0.1
# While a row's next due tick is still to come, the sweep ticks it at most this often (the net
# under `next_tick_at`; fencer's default check_interval of 60 s sweeps every 5 s anyway).
SWEEP_NET = 5.0
# Due times are this much later than the exact sum, so that the core's own `now - last >=
# interval` (one float subtraction) agrees that the tick is due.
_MARGIN = 0.001
_CLOSED = frozenset(s.value for s in core.CLOSED)
_TEMPORARY = frozenset(r.value for r in core.TEMPORARY)


def next_tick_at(record: dict[str, Any], policy: Policy) -> float | None:
    """The worker-clock time from which a tick moves this record on (a check request, a lost
    probe, a proposal re-sent), or None when only the periodic tick has work (reminders).
    A shell-side schedule only: the core still decides what each tick does."""
    state = record.get("state")
    if state in _CLOSED or state is None:
        return None
    if record.get("opened_at") is None:
        return 0.0
    if state == "suspect" or (state == "withheld" and record.get("withheld_reason") in _TEMPORARY):
        if record.get("probe_outstanding"):
            return float(record.get("last_request_at") or 0.0) + policy.probe_timeout + _MARGIN
        last = record.get("last_result_at")
        if not record.get("checks_requested") or last is None:
            return 0.0
        return float(last) + policy.check_interval + _MARGIN
    sent = record.get("sent_at")
    if state == "fence_proposed":
        return 0.0 if sent is None else float(sent) + policy.check_interval + _MARGIN
    if state == "fencing":
        return 0.0 if sent is None else float(sent) + policy.fencing_resend_after + _MARGIN
    return None


class TickSchedule:
    """When the tick timer sends a host a tick: every `period` seconds a sweep of the table
    ticks each open row that had no tick in the last period, or in the last SWEEP_NET while a
    due tick of its own is still to come (`sweep_wants`: reminders and a safety net), and in
    between as soon as a row's
    `next_tick_at` has come, so a check goes out within TICK_RESOLUTION of being due instead of
    up to a whole period late. The due times are noted as the watch writes rows (and on each
    sweep): between sweeps only those few hosts are looked at, never the whole table."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.next: dict[str, float] = {}  # host uuid -> when a tick next moves its record on
        self.last: dict[str, float] = {}  # host uuid -> when its last tick was sent
        self.swept_at: float | None = None

    def note(self, host: str, row: Any, policy_for: Callable[[str | None], Policy]) -> None:
        """Remember when the host's row (as just written, or swept) next needs a tick."""
        at = None
        if row is not None and _open(row):
            try:
                record, ref = _unpacked(row)
            except ValueError:
                record, ref = {}, {}  # (wants_tick reports it)
            at = next_tick_at(record, policy_for(ref.get("cluster_uuid")))
        if at is None:
            self.next.pop(host, None)
        else:
            self.next[host] = at

    def sweep_due(self, now: float) -> bool:
        """Whether this timer run sweeps the whole table (taken as done). A clock that went
        back past the last sweep sweeps now: waiting for it to catch up would be silence."""
        if self.swept_at is not None and 0 <= now - self.swept_at < self.period:
            return False
        self.swept_at = now
        return True

    def sent(self, host: str, now: float) -> None:
        """A tick went out to `host` at `now`."""
        self.last[host] = now

    def sweep_wants(self, host: str, now: float) -> bool:
        """Whether this sweep sends `host` a tick. Not when it got one (due, or from a sweep)
        less than `period` ago; and while its next due tick is still to come (its checks,
        lost probes and re-sent proposals are ticked when due) not before SWEEP_NET since its
        last tick: the sweep is then only the net under `next_tick_at` (and its reminders, an
        hour apart and more). So a row with nothing scheduled is ticked every period or two as
        before, a row checked every check_interval no longer gets the sweep's ticks on top of
        its own (with a 1 s interval the sweep was two ticks per host per second, each a
        record to produce, fetch and step: issue 17). A clock that went back past the last
        tick ticks now, as `sweep_due`."""
        last = self.last.get(host)
        if last is None or now < last:
            return True
        pending = self.next.get(host)
        if pending is not None and pending > last:
            return now - last >= max(self.period, SWEEP_NET)
        return now - last >= self.period

    def due_now(self, now: float) -> list[str]:
        """Hosts whose due time has come since their last tick (taken as sent now)."""
        hosts = [h for h, at in self.next.items() if at <= now and self.last.get(h, -1.0) < at]
        for h in hosts:
            self.last[h] = now
        return hosts


def _open(row: Any) -> bool:
    # A packed row's first record value is the state (absent: the default, idle).
    if isinstance(row, list) and len(row) > 1 and row[0] == ROW_VERSION:
        values = row[1]
        return bool(values) and values[0] is not None and values[0] not in _CLOSED
    return wants_tick(row)


def tick(row: Any, now: float) -> HostSignal:
    """A tick for this row's host."""
    return HostSignal(
        kind="tick", host=HostRef(**_unpacked(row)[1]), at=now, source="timer", clock=CLOCK_ID
    )


def apply(
    row: Any,
    item: HostInput,
    key: str,
    policy: Policy,
    settings: FencerSettings,
    topics: Any,
    position: tuple[int, int] | None = None,
) -> tuple[list[Any] | None, list[Out]]:
    """Step the host's record with one event; the new row and the records to send.

    `position` is the (partition, offset) of a host signal: one at or before the row's
    recorded position is a record read again after a restart, and changes nothing
    (`streams.codec.row_position`)."""
    seen = row_position(row)
    if position is not None and seen is not None and position[0] == seen[0]:
        if position[1] <= seen[1]:
            log.info(
                "host %s: %s at offset %d read again (the row has host signals up to %d): skipped",
                key,
                type(item.event).__name__,
                position[1],
                seen[1],
            )
            return row, []
    old_record, old_host = _unpacked(row) if row else (None, None)
    record = core.HostRecord.from_dict(old_record) if old_record else core.HostRecord(host=key)
    old_ref = HostRef(**old_host) if old_host else None
    ref = _merge_ref(old_ref, item.ref) or HostRef(host_uuid=key)
    policy = policy_for(settings, ref.cluster_uuid)  # the live settings, cluster overrides applied
    try:
        new, actions = core.step(record, item.event, policy)
    except core.CoreError as exc:
        log.warning("host %s: %s ignored: %s", ref.host_name or key, type(item.event).__name__, exc)
        new, actions = record, ()
    if row is None and new == record and not actions:
        return None, []  # nothing worth remembering about a host we never saw in trouble
    # Most events (ticks, repeated poll signals) change nothing: the row is not packed again.
    unchanged = isinstance(row, list) and new == record and ref == old_ref
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
            fence = fence_action(settings, key, ref.cluster_uuid)
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
    if unchanged:
        return row, out
    packed = pack_row(new.to_dict(), ref.model_dump())
    if row is not None and packed == row_content(row):
        return row, out  # unchanged (the caller does not write it again)
    position = position or seen
    return (packed if position is None else with_position(packed, position)), out


def judged_check(before: Any, row: Any) -> str | None:
    """The evidence of the check the core just judged, if this row change judged one."""
    new, old = _unpacked(row)[0], (_unpacked(before)[0] if before else {})
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


def host_state(row: Any) -> bytes:
    """The host-states record of a hosts-table row (the record in HostRecord.to_dict() form)."""
    record, host = _unpacked(row)
    return dump(HostStateRecord(host=HostRef(**host), record=record, updated_at=time.time()))


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
