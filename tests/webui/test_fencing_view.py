"""The UI's view of a host is the core's record on fencer.host-states, shown as it is: signals,
probes, decisions and outcomes without a record derive no state."""

from __future__ import annotations

import time
from dataclasses import dataclass

from fencing.events import FenceAction, HostStatus
from fencing.records import (
    EvidenceSummary,
    FenceDecision,
    FenceOutcome,
    HostRef,
    HostSignal,
    HostStateRecord,
    ProbeResult,
)
from fencing.settings import TopicNames
from webui.fencing_view import FencingView

T = TopicNames()
REF = HostRef(host_uuid="h-1", host_name="kvm01", cluster_uuid="c-1")


@dataclass
class Rec:
    """What FencingView reads of a Kafka record."""

    topic: str
    value: bytes


def feed(view: FencingView, topic: str, record: object) -> None:
    view.on_record(Rec(topic, record.model_dump_json().encode()))  # type: ignore[arg-type, attr-defined]


def the_story(view: FencingView, now: float) -> None:
    """A disconnect, a stale probe, an approved stop and its success: everything but a record."""
    feed(
        view,
        T.host_signals,
        HostSignal(kind="disconnected", host=REF, at=now - 300, status=HostStatus.DISCONNECTED),
    )
    feed(
        view,
        T.probe_results,
        ProbeResult(
            host=REF,
            episode=1,
            check=1,
            suspect_since=now - 300,
            finished_at=now - 240,
            complete=True,
        ),
    )
    summary = EvidenceSummary(suspect_since=now - 300, stale_checks=2, files_checked=4)
    feed(
        view,
        T.fence_decisions,
        FenceDecision(
            decision_id="d-1",
            host=REF,
            episode=1,
            action=FenceAction.STOP,
            approved=True,
            evidence=summary,
            decided_at=now - 100,
            budget_used=1,
            budget_cap=3,
        ),
    )
    feed(
        view,
        T.fence_outcomes,
        FenceOutcome(
            decision_id="d-1",
            host=REF,
            episode=1,
            action=FenceAction.STOP,
            driver="ipmi",
            success=True,
            verified=True,
            power_before="on",
            power_after="off",
            started_at=now - 99,
            finished_at=now - 95,
        ),
    )


def test_a_host_without_a_record_shows_no_record_yet_whatever_else_the_topics_say():
    view, now = FencingView(T), time.time()
    assert view.host("never-seen", REF).state == "no_record"
    the_story(view, now)
    shown = view.host(REF.host_uuid)
    # Before: derived "fenced" from the outcome. Now: nothing without the core's record.
    assert shown.state == "no_record"
    assert (shown.episode, shown.suspect_since, shown.stale_checks, shown.evidence) == (
        None,
        None,
        0,
        [],
    )
    # What is displayed as a fact stays: the last signal's status and the latest decision.
    assert shown.status is HostStatus.DISCONNECTED and shown.last_decision_id == "d-1"


def test_the_record_is_shown_as_the_core_left_it():
    view, now = FencingView(T), time.time()
    the_story(view, now)
    record = {
        "host": REF.host_uuid,
        "state": "withheld",  # not what the outcome would suggest: the record wins
        "episode": 1,
        "suspect_since": now - 300,
        "last_check": 1,
        "last_probe_at": now - 240,
        "last_evidence": "stale",
        "stale_count": 1,
    }
    feed(view, T.host_states, HostStateRecord(host=REF, record=record, updated_at=now - 240))
    shown = view.host(REF.host_uuid)
    assert (shown.state, shown.episode, shown.suspect_since, shown.stale_checks) == (
        "withheld",
        1,
        now - 300,
        1,
    )
    assert shown.record == record and [c.check for c in shown.evidence] == [1]
    feed(
        view,
        T.host_states,
        HostStateRecord(host=REF, record={**record, "state": "failed"}, updated_at=now),
    )
    assert view.host(REF.host_uuid).state == "fence_failed"


def test_the_budget_is_counted_as_the_gate_counts_its_decision_log():
    """The UI and the gate count with one function (fencing.gate.logged_grants): a repeated
    approval is one fence at its first stamp, and a stamp after the UI's clock (the gate's clock
    runs ahead) still counts, as at the gate."""
    view, now = FencingView(T), 1_800_000_000.0
    summary = EvidenceSummary(suspect_since=now - 300, stale_checks=2)

    def decided(did: str, at: float, approved: bool = True, **more: object) -> None:
        fields: dict[str, object] = {
            "decision_id": did,
            "host": REF,
            "episode": 1,
            "action": FenceAction.STOP,
            "approved": approved,
            "evidence": summary,
            "decided_at": at,
            **more,
        }
        feed(view, T.fence_decisions, FenceDecision.model_validate(fields))

    decided("d-1", now - 100)
    decided("d-1", now - 10)  # the same decision repeated: one fence
    decided("d-2", now - 50, approved=False)
    decided("d-3", now - 40, action=FenceAction.BLINK)
    decided("d-4", now - 30, host=REF.model_copy(update={"cluster_uuid": "c-2"}))
    decided("d-5", now - 4000)  # left the window
    decided("d-6", now + 30)  # the gate's clock ahead of the UI's
    shown = view.budget("c-1", now=now, window=3600.0, cap=3)
    assert (shown.used, shown.cap, shown.resets_at) == (2, 3, now - 100 + 3600.0)
    assert view.budget("c-2", now=now, window=3600.0, cap=3).used == 1
    assert view.budget("c-3", now=now, window=3600.0, cap=3).resets_at is None
