"""Rendering: a wire record becomes one `Message`, and a `Message` becomes an email or an SNMP
notification. Pure: no I/O, no clock, no SNMP or SMTP library; the senders do the sending.

The project's SNMP subtree is `FENCER_OID`, defined here and nowhere else in the code (the MIB,
`notifiers/mibs/FENCER-MIB.txt`, states the same number). 99999 is a PLACEHOLDER enterprise
number, not registered to fencer: production needs an IANA Private Enterprise Number, changed
here and in the MIB together.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

from fencing.events import FenceAction, NoticeKind
from fencing.records import EvidenceSummary, FenceDecision, FenceOutcome, HostRef, Notice

# enterprises.99999: a placeholder PEN (see the module docstring).
FENCER_OID: tuple[int, ...] = (1, 3, 6, 1, 4, 1, 99999)
NOTIFICATIONS_OID = (*FENCER_OID, 0)
OBJECTS_OID = (*FENCER_OID, 1)

SUBJECT_PREFIX = "[fencer]"


class Severity(StrEnum):
    """How urgently a person should look (FENCER-MIB FencerSeverityLevel)."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


# Per kind: the one-word result used in subjects and fencerResult, the severity, and the
# NOTIFICATION-TYPE number under fencerNotifications. Kept as data so the MIB test can check it.
KINDS: dict[NoticeKind, tuple[str, Severity, int]] = {
    NoticeKind.FENCE_DECIDED: ("DECIDED", Severity.WARNING, 1),
    NoticeKind.FENCE_WITHHELD: ("WITHHELD", Severity.CRITICAL, 2),
    NoticeKind.FENCE_SUCCEEDED: ("SUCCEEDED", Severity.WARNING, 3),
    NoticeKind.FENCE_FAILED: ("FAILED", Severity.CRITICAL, 4),
    NoticeKind.CANNOT_VERIFY: ("CANNOT-VERIFY", Severity.WARNING, 5),
    NoticeKind.PREFLIGHT_FAILED: ("PREFLIGHT-FAILED", Severity.WARNING, 6),
    NoticeKind.HOST_RECOVERED: ("RECOVERED", Severity.INFO, 7),
    NoticeKind.CLOCK_SKEW: ("CLOCK-SKEW", Severity.WARNING, 8),  # no verdict depends on it
    NoticeKind.VMS_NOT_RESTARTED: ("VMS-DOWN", Severity.CRITICAL, 9),
    NoticeKind.SUSPECT_TOO_LONG: ("SUSPECT-TOO-LONG", Severity.CRITICAL, 10),
    NoticeKind.FORGED_RECORD: ("FORGED-RECORD", Severity.CRITICAL, 20),
    NoticeKind.FENCE_REFUSED: ("REFUSED", Severity.WARNING, 21),
    NoticeKind.BMC_IDENTITY_CHANGED: ("BMC-IDENTITY-CHANGED", Severity.CRITICAL, 22),
    NoticeKind.LOGIN_BURST: ("LOGIN-BURST", Severity.WARNING, 23),
    NoticeKind.BLOCKLIST_LIFTED: ("BLOCKLIST-LIFTED", Severity.WARNING, 24),
    NoticeKind.BLOCKLIST_NOT_LIFTED: ("BLOCKLIST-NOT-LIFTED", Severity.CRITICAL, 25),
    NoticeKind.DECISION_LOG_UNREAD: ("DECISION-LOG-UNREAD", Severity.CRITICAL, 26),
}

# FENCER-MIB FencerActionKind; none(0) when the notification concerns no action.
ACTION_NUMBERS: dict[FenceAction | None, int] = {
    None: 0,
    FenceAction.NOTHING: 1,
    FenceAction.STOP: 2,
    FenceAction.REBOOT: 3,
    FenceAction.BLINK: 4,
    FenceAction.START: 5,
    FenceAction.TEST: 6,
}
SEVERITY_NUMBERS = {Severity.INFO: 1, Severity.WARNING: 2, Severity.CRITICAL: 3}

# Column numbers under fencerObjects, in the order every notification carries them.
OBJECT_NUMBERS: dict[str, int] = {
    "fencerHostName": 1,
    "fencerHostUuid": 2,
    "fencerCluster": 3,
    "fencerClusterUuid": 4,
    "fencerZone": 5,
    "fencerAction": 6,
    "fencerResult": 7,
    "fencerReason": 8,
    "fencerDecisionId": 9,
    "fencerFilesChecked": 10,
    "fencerNewestWrite": 11,
    "fencerSuspectTime": 12,
    "fencerStaleChecks": 13,
    "fencerSeverity": 14,
    "fencerEventTime": 15,
    "fencerNoticeId": 16,
}

# SNMP OCTET STRING sizes in the MIB (FencerText 0..255, FencerUtcTime 0..32).
_TEXT_MAX = 255


@dataclass(frozen=True)
class Message:
    """One normalised notification: everything any channel needs, from any record."""

    record_id: str  # the stable notice id: a re-delivery carries the same one (receivers dedupe)
    kind: NoticeKind
    severity: Severity
    at: float
    host_name: str | None
    host_uuid: str
    cluster: str | None
    cluster_uuid: str | None
    zone: str | None
    action: FenceAction | None
    result: str
    reason: str | None
    decision_id: str | None
    files_checked: int | None = None
    newest_write: float | None = None
    suspect_since: float | None = None
    stale_checks: int | None = None
    details: tuple[tuple[str, str], ...] = ()  # extra lines for people, e.g. power states

    @property
    def host_label(self) -> str:
        """The host's name, else its uuid."""
        return self.host_name or self.host_uuid


@dataclass(frozen=True)
class EmailContent:
    """A rendered email, before any MIME or SMTP."""

    subject: str
    text: str
    html: str


@dataclass(frozen=True)
class Varbind:
    """One SNMP variable binding, library-neutral: the sender maps `syntax` to SNMP types."""

    oid: tuple[int, ...]
    syntax: Literal["octets", "unsigned", "integer"]
    value: str | int


@dataclass(frozen=True)
class SnmpContent:
    """A rendered SNMP notification: its NOTIFICATION-TYPE OID and its varbinds in MIB order."""

    notification_oid: tuple[int, ...]
    varbinds: tuple[Varbind, ...]


# ---------------------------------------------------------------------------------------------
# record -> Message


def record_id(record: FenceDecision | FenceOutcome | Notice) -> str:
    """The idempotency key of a record: a redelivered record has the same key."""
    if isinstance(record, FenceDecision):
        return f"decision:{record.decision_id}:{_decision_kind(record).value}"
    if isinstance(record, FenceOutcome):
        # A refusal is not the decision's outcome: a later fence of it is notified too; an
        # operator's retry of the same decision is a new outcome: a new notification.
        refused = ":refused" if record.refused else ""
        return f"outcome:{record.decision_id}:{record.started_at:.0f}{refused}"
    return f"notice:{record.notice_id}"


def _decision_kind(d: FenceDecision) -> NoticeKind:
    return NoticeKind.FENCE_DECIDED if d.approved else NoticeKind.FENCE_WITHHELD


def to_message(record: FenceDecision | FenceOutcome | Notice) -> Message:
    """Normalise a decision, outcome or notice into one `Message`."""
    if isinstance(record, FenceDecision):
        return _from_decision(record)
    if isinstance(record, FenceOutcome):
        return _from_outcome(record)
    return _from_notice(record)


def _message(
    rid: str,
    kind: NoticeKind,
    host: HostRef,
    at: float,
    evidence: EvidenceSummary | None,
    *,
    action: FenceAction | None,
    reason: str | None,
    decision_id: str | None,
    details: tuple[tuple[str, str], ...] = (),
) -> Message:
    word, severity, _ = KINDS[kind]
    return Message(
        record_id=rid,
        kind=kind,
        severity=severity,
        at=at,
        host_name=host.host_name,
        host_uuid=host.host_uuid,
        cluster=host.cluster_name or host.cluster_uuid,
        cluster_uuid=host.cluster_uuid,
        zone=host.zone_name or host.zone_uuid,
        action=action,
        result=word,
        reason=reason,
        decision_id=decision_id,
        files_checked=evidence.files_checked if evidence else None,
        newest_write=evidence.newest_write if evidence else None,
        suspect_since=evidence.suspect_since if evidence else None,
        stale_checks=evidence.stale_checks if evidence else None,
        details=details,
    )


def _from_decision(d: FenceDecision) -> Message:
    details: list[tuple[str, str]] = [("Episode", str(d.episode))]
    if d.budget_cap:
        details.append(("Fence budget", f"{d.budget_used} of {d.budget_cap} used"))
    if d.evidence.last_neighbour:
        details.append(("Checked from", d.evidence.last_neighbour))
    return _message(
        record_id(d),
        _decision_kind(d),
        d.host,
        d.decided_at,
        d.evidence,
        action=d.action,
        reason=d.withheld_reason.value if d.withheld_reason else None,
        decision_id=d.decision_id,
        details=tuple(details),
    )


def _from_outcome(o: FenceOutcome) -> Message:
    details: list[tuple[str, str]] = [
        ("Episode", str(o.episode)),
        ("Driver", o.driver),
        ("Verified", "yes" if o.verified else "no"),
        ("Attempts", str(o.attempts)),
        ("Started", iso_utc(o.started_at)),
    ]
    if o.power_before is not None:
        details.append(("Power before", o.power_before))
    if o.power_after is not None:
        details.append(("Power after", o.power_after))
    if o.cloudstack_call:
        cs = o.cloudstack_call + (f" -> {o.cloudstack_result}" if o.cloudstack_result else "")
        details.append(("CloudStack", cs))
    return _message(
        record_id(o),
        NoticeKind.FENCE_SUCCEEDED if o.success else NoticeKind.FENCE_FAILED,
        o.host,
        o.finished_at,
        None,
        action=o.action,
        reason=o.error,
        decision_id=o.decision_id,
        details=tuple(details),
    )


def _from_notice(n: Notice) -> Message:
    return _message(
        record_id(n),
        n.kind,
        n.host,
        n.at,
        n.evidence,
        action=n.action,
        reason=n.reason,
        decision_id=n.decision_id,
        details=_notice_details(n),
    )


def _notice_details(n: Notice) -> tuple[tuple[str, str], ...]:
    rows = [("Detail", n.result or "")]
    if n.topic is not None:
        rows.append(("Record", f"{n.topic} partition {n.partition} offset {n.offset}"))
    if n.claimed_host is not None:
        rows.append(("Host named", n.claimed_host))
    if n.blocklist_entry is not None:
        rows.append(("Blocklist entry", n.blocklist_entry))
    return tuple((k, v) for k, v in rows if v)


# ---------------------------------------------------------------------------------------------
# Shared by the email (notifiers.render_email) and SNMP renderings


def iso_utc(t: float | None) -> str:
    """Epoch seconds as UTC ISO 8601 (`2025-01-15T10:04:05Z`); empty when unknown."""
    if t is None:
        return ""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _one_line(s: str) -> str:
    # Header injection and folded subjects: a reason may carry a peer's multi-line error.
    return " ".join(s.split())


# ---------------------------------------------------------------------------------------------
# Message -> SNMP


def _text(s: str | None, limit: int = _TEXT_MAX) -> str:
    # FencerText is at most 255 octets of UTF-8: cut on a character boundary.
    raw = _one_line(s or "").encode()[:limit]
    return raw.decode(errors="ignore")


def render_snmp(m: Message) -> SnmpContent:
    """The NOTIFICATION-TYPE OID and the varbinds, every object of FENCER-MIB in order."""
    values: dict[str, tuple[Literal["octets", "unsigned", "integer"], str | int]] = {
        "fencerHostName": ("octets", _text(m.host_label)),
        "fencerHostUuid": ("octets", _text(m.host_uuid)),
        "fencerCluster": ("octets", _text(m.cluster)),
        "fencerClusterUuid": ("octets", _text(m.cluster_uuid)),
        "fencerZone": ("octets", _text(m.zone)),
        "fencerAction": ("integer", ACTION_NUMBERS[m.action]),
        "fencerResult": ("octets", _text(m.result)),
        "fencerReason": ("octets", _text(m.reason)),
        "fencerDecisionId": ("octets", _text(m.decision_id)),
        "fencerFilesChecked": ("unsigned", max(0, m.files_checked or 0)),
        "fencerNewestWrite": ("octets", iso_utc(m.newest_write)),
        "fencerSuspectTime": ("octets", iso_utc(m.suspect_since)),
        "fencerStaleChecks": ("unsigned", max(0, m.stale_checks or 0)),
        "fencerSeverity": ("integer", SEVERITY_NUMBERS[m.severity]),
        "fencerEventTime": ("octets", iso_utc(m.at)),
        "fencerNoticeId": ("octets", _text(m.record_id)),
    }
    # accessible-for-notify scalars are sent as instance .0, as net-snmp expects.
    varbinds = tuple(
        Varbind((*OBJECTS_OID, OBJECT_NUMBERS[name], 0), syntax, value)
        for name, (syntax, value) in values.items()
    )
    return SnmpContent((*NOTIFICATIONS_OID, KINDS[m.kind][2]), varbinds)
