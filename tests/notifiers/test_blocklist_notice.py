"""An operator's blocklist lift is told to people like every other operator-visible event: the
actuate worker's notice (streams.actuating.lift_notice) goes through the notifiers to a real
SMTP server (STARTTLS + AUTH) and to snmptrapd (v3 inform), read back by FENCER-MIB name. It
says who asked, what was lifted (or why not) and when, and carries no secret."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

import pytest
from notifier_peers import (
    SENDER_ENGINE_ID,
    SMTP_PASSWORD,
    SMTP_USER,
    V3_AUTH,
    V3_PRIV,
    V3_USER,
    SmtpFactory,
    Tls,
    TrapReceiver,
    parse_trap,
)
from pydantic import SecretStr

from fencing.events import NoticeKind
from fencing.records import HostRef, OperatorAction
from fencing.settings import EmailSettings, FencerSettings, SnmpReceiver, SnmpSettings
from notifiers.service import Notifier
from streams.actuating import lift_notice

pytestmark = pytest.mark.timeout(30)

ASKED = 1736935445.0  # 2025-01-15T10:04:05Z
LIFTED = 1736935450.0  # 2025-01-15T10:04:10Z


def _settings(smtp_port: int, tls: Tls, trap_port: int) -> FencerSettings:
    return FencerSettings(
        email=EmailSettings(
            enabled=True,
            port=smtp_port,
            security="starttls",
            username=SMTP_USER,
            password=SecretStr(SMTP_PASSWORD),
            ca_file=tls.cert,
            to=["ops@example.org"],
        ),
        snmp=SnmpSettings(
            enabled=True,
            engine_id=SENDER_ENGINE_ID,
            receivers=[
                SnmpReceiver(
                    host="127.0.0.1",
                    port=trap_port,
                    version="v3",
                    notify_type="inform",
                    user=V3_USER,
                    auth_key=SecretStr(V3_AUTH),
                    priv_key=SecretStr(V3_PRIV),
                )
            ],
        ),
    )


def _action(host: HostRef) -> OperatorAction:
    return OperatorAction(
        kind="lift_blocklist",
        host_uuid=host.host_uuid,
        by="api:ops-anna",
        note="board replaced, ticket 4711",
        at=ASKED,
    )


def _mail(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


async def test_a_lifted_and_a_failed_lift_reach_mail_and_snmp_with_who_what_when(
    smtp_server: SmtpFactory, tls: Tls, snmptrapd: TrapReceiver, host: HostRef
) -> None:
    srv = smtp_server("starttls", tls)
    notifier = Notifier.from_settings(_settings(srv.port, tls, snmptrapd.port))
    action = _action(host)
    lifted = lift_notice(action, host, "10.0.0.3:0/0", None, LIFTED)
    failed = lift_notice(
        action.model_copy(update={"at": ASKED + 60}),
        host,
        None,
        "ceph osd blocklist rm: exit 13: permission denied",
        LIFTED + 60,
    )
    assert lifted.kind is NoticeKind.BLOCKLIST_LIFTED
    assert failed.kind is NoticeKind.BLOCKLIST_NOT_LIFTED
    store: dict[str, float] = {}
    for n in (lifted, failed, lifted):  # a redelivered request is notified once
        assert await notifier.deliver(n, store)

    mails = [_mail(e.original_content or b"") for e in srv.mailbox.envelopes]
    assert sorted(m["Subject"] for m in mails) == [
        "[fencer] kvm03 BLOCKLIST-LIFTED: blocklist 10.0.0.3:0/0 lifted by api:ops-anna "
        "(cluster c1)",
        "[fencer] kvm03 BLOCKLIST-NOT-LIFTED: blocklist NOT lifted (asked by api:ops-anna): "
        "ceph osd blocklist rm: exit 13: permission denied (cluster c1)",
    ]
    by_kind = {m["X-Fencer-Kind"]: m for m in mails}
    text = by_kind["blocklist_lifted"].get_body(("plain",)).get_content()
    assert "can write to Ceph again" in text
    assert "Time:" in text and "2025-01-15T10:04:10Z" in text  # when it was lifted
    assert "asked 2025-01-15T10:04:05Z; note: board replaced, ticket 4711" in text
    assert by_kind["blocklist_lifted"]["X-Fencer-Severity"] == "warning"
    assert by_kind["blocklist_not_lifted"]["X-Fencer-Severity"] == "critical"
    bad = by_kind["blocklist_not_lifted"].get_body(("plain",)).get_content()
    assert "still cannot write to Ceph" in bad

    traps = sorted(
        (parse_trap(t) for t in snmptrapd.wait_for(2)),
        key=lambda t: t.value("SNMPv2-MIB::snmpTrapOID.0"),
    )
    assert len(traps) == 2, snmptrapd.lines()
    ok, nok = traps
    assert ok.value("SNMPv2-MIB::snmpTrapOID.0") == "FENCER-MIB::fencerBlocklistLifted"
    assert nok.value("SNMPv2-MIB::snmpTrapOID.0") == "FENCER-MIB::fencerBlocklistNotLifted"
    assert ok.value("FENCER-MIB::fencerHostName.0") == "kvm03"
    assert ok.value("FENCER-MIB::fencerResult.0") == "BLOCKLIST-LIFTED"
    assert "10.0.0.3:0/0 lifted by api:ops-anna" in ok.value("FENCER-MIB::fencerReason.0")
    assert ok.value("FENCER-MIB::fencerEventTime.0") == "2025-01-15T10:04:10Z"
    assert ok.value("FENCER-MIB::fencerSeverity.0") == "warning(2)"
    assert nok.value("FENCER-MIB::fencerSeverity.0") == "critical(3)"
    assert "permission denied" in nok.value("FENCER-MIB::fencerReason.0")

    raw = b"".join(e.original_content or b"" for e in srv.mailbox.envelopes)
    raw += "".join(snmptrapd.lines()).encode()
    for secret in (SMTP_PASSWORD, V3_AUTH, V3_PRIV):
        assert secret.encode() not in raw
