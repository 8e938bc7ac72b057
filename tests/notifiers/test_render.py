"""Rendering is pure: records become one Message, then subjects, bodies and varbinds."""

from __future__ import annotations

from fencing.events import FenceAction, NoticeKind
from fencing.records import FenceDecision, FenceOutcome, HostRef, Notice
from notifiers.render import (
    FENCER_OID,
    KINDS,
    OBJECT_NUMBERS,
    Severity,
    iso_utc,
    record_id,
    render_snmp,
    to_message,
)
from notifiers.render_email import render_email


def test_subjects_lead_with_host_then_action_and_result(
    decision: FenceDecision, withheld: FenceDecision, outcome: FenceOutcome, notice: Notice
) -> None:
    failed = outcome.model_copy(update={"success": False, "error": "BMC timed out"})
    subjects = [
        render_email(to_message(r)).subject for r in (decision, withheld, outcome, failed, notice)
    ]
    assert subjects == [
        "[fencer] kvm03 stop DECIDED (cluster c1)",
        "[fencer] kvm03 stop WITHHELD: cap_reached (cluster c1)",
        "[fencer] kvm03 stop SUCCEEDED (cluster c1)",
        "[fencer] kvm03 stop FAILED: BMC timed out (cluster c1)",
        "[fencer] kvm03 CANNOT-VERIFY: ssh to kvm02 timed out (cluster c1)",
    ]


def test_message_carries_host_cluster_zone_and_evidence(withheld: FenceDecision) -> None:
    m = to_message(withheld)
    assert (m.kind, m.severity, m.action) == (
        NoticeKind.FENCE_WITHHELD,
        Severity.CRITICAL,
        FenceAction.STOP,
    )
    assert (m.host_name, m.cluster, m.cluster_uuid, m.zone) == ("kvm03", "c1", "c1-uuid", "zone1")
    assert (m.files_checked, m.stale_checks, m.decision_id) == (7, 3, "dec-0001")
    assert (m.suspect_since, m.newest_write) == (1736935445.0, 1736935000.0)
    text = render_email(m).text
    assert "Suspect since: 2025-01-15T10:04:05Z" in text
    assert "Newest write:  2025-01-15T09:56:40Z" in text
    assert "Fence budget:  1 of 3 used" in text


def test_record_ids_identify_redeliveries(
    decision: FenceDecision, withheld: FenceDecision, outcome: FenceOutcome, notice: Notice
) -> None:
    assert record_id(decision) == "decision:dec-0001:fence_decided"
    assert record_id(decision.model_copy()) == record_id(decision)
    assert record_id(withheld) == "decision:dec-0001:fence_withheld"
    assert record_id(outcome) == "outcome:dec-0001:1736935626"
    assert record_id(outcome.model_copy()) == record_id(outcome)
    # an operator's retry of the same decision is another run: another notification
    retried = outcome.model_copy(update={"started_at": outcome.started_at + 600})
    assert record_id(retried) == "outcome:dec-0001:1736936226"
    assert record_id(notice) == "notice:n-0001"


def test_html_is_escaped_and_subject_is_one_line(decision: FenceDecision) -> None:
    evil = decision.model_copy(
        update={
            "host": HostRef(host_uuid="u<1>", host_name='<script>alert("x")</script>'),
            "withheld_reason": None,
        }
    )
    out = render_email(to_message(evil))
    assert "<script>" not in out.html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in out.html
    assert "u&lt;1&gt;" in out.html
    failed = to_message(
        FenceOutcome(
            decision_id="d",
            host=HostRef(host_uuid="u", host_name="kvm09"),
            episode=1,
            action=FenceAction.REBOOT,
            driver="command",
            success=False,
            started_at=0,
            finished_at=1,
            error="line one\r\nBcc: victim@example.org",
        )
    )
    subject = render_email(failed).subject
    assert "\n" not in subject and "\r" not in subject
    assert subject == "[fencer] kvm09 reboot FAILED: line one Bcc: victim@example.org"


def test_timestamps_are_utc_iso() -> None:
    assert iso_utc(0) == "1970-01-01T00:00:00Z"
    assert iso_utc(1736935445.9) == "2025-01-15T10:04:05Z"
    assert iso_utc(None) == ""


def test_snmp_has_every_object_in_mib_order_and_the_kind_oid(outcome: FenceOutcome) -> None:
    content = render_snmp(to_message(outcome))
    assert content.notification_oid == (*FENCER_OID, 0, KINDS[NoticeKind.FENCE_SUCCEEDED][2])
    assert [vb.oid for vb in content.varbinds] == [
        (*FENCER_OID, 1, n, 0) for n in OBJECT_NUMBERS.values()
    ]
    by_column = {vb.oid[-2]: vb.value for vb in content.varbinds}
    assert by_column[OBJECT_NUMBERS["fencerHostName"]] == "kvm03"
    assert by_column[OBJECT_NUMBERS["fencerAction"]] == 2  # stop(2)
    assert by_column[OBJECT_NUMBERS["fencerSeverity"]] == 2  # warning(2)
    assert by_column[OBJECT_NUMBERS["fencerNewestWrite"]] == ""  # outcomes carry no evidence


def test_snmp_text_is_cut_to_255_octets_on_a_character_boundary(notice: Notice) -> None:
    long = notice.model_copy(update={"reason": "é" * 300})
    (reason,) = [
        vb.value
        for vb in render_snmp(to_message(long)).varbinds
        if vb.oid[-2] == OBJECT_NUMBERS["fencerReason"]
    ]
    assert isinstance(reason, str)
    assert reason == "é" * 127 and len(reason.encode()) == 254


def test_every_notice_kind_renders(host: HostRef) -> None:
    for kind in NoticeKind:
        n = Notice(notice_id=f"n-{kind.value}", kind=kind, host=host, at=1.0)
        m = to_message(n)
        assert m.result == KINDS[kind][0]
        assert render_email(m).subject.startswith(f"[fencer] kvm03 {KINDS[kind][0]}")
        assert render_snmp(m).notification_oid[-1] == KINDS[kind][2]
