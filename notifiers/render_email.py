"""A `Message` as an email: subject, plain-text body and HTML body. Pure: no I/O, no clock, no
SMTP library (notifiers.email sends it)."""

from __future__ import annotations

import html

from fencing.events import NoticeKind
from notifiers.render import SUBJECT_PREFIX, EmailContent, Message, _one_line, iso_utc


def _subject(m: Message) -> str:
    # Host first after the prefix so a mailbox sorted by subject groups each host's story.
    parts = [SUBJECT_PREFIX, m.host_label]
    if m.action is not None:
        parts.append(m.action.value)
    parts.append(m.result + (f": {m.reason}" if m.reason else ""))
    if m.cluster:
        parts.append(f"(cluster {m.cluster})")
    return _one_line(" ".join(parts))


def _rows(m: Message) -> list[tuple[str, str]]:
    rows = [
        ("Host", m.host_label),
        ("Host uuid", m.host_uuid),
        ("Cluster", m.cluster or ""),
        ("Cluster uuid", m.cluster_uuid or ""),
        ("Zone", m.zone or ""),
        ("Action", m.action.value if m.action else ""),
        ("Result", m.result),
        ("Reason", m.reason or ""),
        ("Severity", m.severity.value),
        ("Time", iso_utc(m.at)),
        ("Decision id", m.decision_id or ""),
        ("Notice id", m.record_id),
        ("Suspect since", iso_utc(m.suspect_since)),
        ("Stale checks", "" if m.stale_checks is None else str(m.stale_checks)),
        ("Files checked", "" if m.files_checked is None else str(m.files_checked)),
        ("Newest write", iso_utc(m.newest_write) or ("none seen" if m.files_checked else "")),
        *m.details,
    ]
    return [(k, v) for k, v in rows if v != ""]


_LEADS: dict[NoticeKind, str] = {
    NoticeKind.FENCE_DECIDED: "A fence of this host was approved; the action follows.",
    NoticeKind.FENCE_WITHHELD: (
        "The evidence asked for a fence, but it was withheld. A person must decide."
    ),
    NoticeKind.FENCE_SUCCEEDED: "The fencing action was carried out.",
    NoticeKind.FENCE_FAILED: "The fencing action failed. A person must look at this host.",
    NoticeKind.CANNOT_VERIFY: (
        "Repeated checks could not tell whether this host still writes to shared storage. "
        "Unknown evidence never leads to a fence."
    ),
    NoticeKind.PREFLIGHT_FAILED: "A pre-flight check of this host's BMC failed.",
    NoticeKind.HOST_RECOVERED: "CloudStack reports this host Up again.",
    NoticeKind.CLOCK_SKEW: (
        "A clock was found off by more than its tolerance: a check measured a neighbour or file "
        "server clock offset (shown only: no verdict compares two machines' clocks). "
        "Fix the clock (NTP) of the machine named."
    ),
    NoticeKind.VMS_NOT_RESTARTED: (
        "The host was fenced, but some of its VMs are still not running. A person must look."
    ),
    NoticeKind.SUSPECT_TOO_LONG: (
        "This host has been suspect for a long time without a fencing decision. "
        "Its VMs may be down: a person must look at it."
    ),
    NoticeKind.FORGED_RECORD: (
        "A record fencer did not sign was refused: something other than fencer writes to its "
        "topics. Nothing was done to the host it names."
    ),
    NoticeKind.FENCE_REFUSED: (
        "The actuator refused an approved fence at the last moment; the host was not touched."
    ),
    NoticeKind.LOGIN_BURST: (
        "Someone failed to log in to the fencer API many times in a row: they are refused for "
        "a while. If it was not one of you, someone is guessing the API token."
    ),
    NoticeKind.BMC_IDENTITY_CHANGED: (
        "This host's BMC reports another system GUID than the one pinned for it: it is not used "
        "for fencing until an operator confirms it (fencer ipmi pin, or the UI)."
    ),
    NoticeKind.BLOCKLIST_LIFTED: (
        "An operator lifted this host's Ceph blocklist: the host can write to Ceph again. If "
        "the host was not repaired, or nobody of you asked, blocklist it again at once."
    ),
    NoticeKind.BLOCKLIST_NOT_LIFTED: (
        "An operator asked to lift this host's Ceph blocklist, but it was NOT lifted: the host "
        "still cannot write to Ceph. Retry, or lift it where the fence key is."
    ),
    NoticeKind.DECISION_LOG_UNREAD: (
        "The gate cannot read fencer's decision log: a fence a stalled former gate owner "
        "approved late does not count toward the caps, so more hosts than the cap may be "
        "fenced. Fix the gate worker's access to Kafka (broker, ACLs, TLS)."
    ),
}


def render_email(m: Message) -> EmailContent:
    """Subject, plain-text body and HTML body of the message."""
    rows = _rows(m)
    width = max(len(k) for k, _ in rows)
    lead = _LEADS[m.kind]
    text = (
        "\n".join([lead, "", *(f"{k + ':':<{width + 1}} {v}" for k, v in rows)])
        + "\n\n-- \nfencer\n"
    )
    cells = "\n".join(
        f'<tr><th style="text-align:left;padding-right:1em">{html.escape(k)}</th>'
        f"<td>{html.escape(v)}</td></tr>"
        for k, v in rows
    )
    body = (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>{html.escape(_subject(m))}</title></head>\n<body>\n"
        f"<p>{html.escape(lead)}</p>\n<table>\n{cells}\n</table>\n"
        "<p>-- fencer</p>\n</body></html>\n"
    )
    return EmailContent(subject=_subject(m), text=text, html=body)
