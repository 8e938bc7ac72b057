"""The email channel against real aiosmtpd servers on loopback: plain, STARTTLS + AUTH, SMTPS."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

import pytest
from notifier_peers import SMTP_PASSWORD, SMTP_USER, SmtpFactory, Tls, free_port
from pydantic import SecretStr

from fencing.records import FenceDecision, FenceOutcome
from fencing.settings import ClusterSettings, EmailSettings, FencerSettings
from notifiers.channel import AuthenticationFailed, DeliveryFailed, NotifyError
from notifiers.email import EmailChannel
from notifiers.render import to_message

pytestmark = pytest.mark.timeout(30)


def parse(raw: bytes | str) -> EmailMessage:
    data = raw if isinstance(raw, bytes) else raw.encode()
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


async def test_plain_smtp_delivers_multipart_with_text_and_html(
    smtp_server: SmtpFactory, outcome: FenceOutcome
) -> None:
    srv = smtp_server("plain")
    ch = EmailChannel(
        EmailSettings(port=srv.port, sender="fencer@example.org", to=["ops@example.org"])
    )
    await ch.send(to_message(outcome))

    (env,) = srv.mailbox.envelopes
    assert env.mail_from == "fencer@example.org"
    assert env.rcpt_tos == ["ops@example.org"]
    mail = parse(env.original_content or env.content)
    assert mail["Subject"] == "[fencer] kvm03 stop SUCCEEDED (cluster c1)"
    assert mail["X-Fencer-Decision-Id"] == "dec-0001"
    assert mail.get_content_type() == "multipart/alternative"
    parts = [p.get_content_type() for p in mail.iter_parts()]
    assert parts == ["text/plain", "text/html"]
    text = mail.get_body(("plain",)).get_content()
    page = mail.get_body(("html",)).get_content()
    for needle in ("kvm03", "0b5e0b3a-1111-4c1e-9a57-000000000003", "dec-0001", "ipmi"):
        assert needle in text and needle in page
    assert "Power after:  off" in text
    assert "2025-01-15T10:07:11Z" in text  # finished_at, UTC ISO


async def test_starttls_with_self_signed_cert_and_auth(
    smtp_server: SmtpFactory, tls: Tls, withheld: FenceDecision
) -> None:
    srv = smtp_server("starttls", tls)
    ch = EmailChannel(
        EmailSettings(
            port=srv.port,
            security="starttls",
            username=SMTP_USER,
            password=SecretStr(SMTP_PASSWORD),
            ca_file=tls.cert,
            to=["ops@example.org"],
        )
    )
    await ch.send(to_message(withheld))

    assert srv.mailbox.logins == [SMTP_USER]
    mail = parse(srv.mailbox.envelopes[0].content)
    assert mail["Subject"] == "[fencer] kvm03 stop WITHHELD: cap_reached (cluster c1)"
    assert "cap_reached" in mail.get_body(("plain",)).get_content()


async def test_starttls_without_the_ca_names_the_server_and_the_fix(
    smtp_server: SmtpFactory, tls: Tls, decision: FenceDecision
) -> None:
    srv = smtp_server("starttls", tls)
    ch = EmailChannel(EmailSettings(port=srv.port, security="starttls", to=["ops@example.org"]))
    with pytest.raises(DeliveryFailed) as info:
        await ch.send(to_message(decision))
    assert f"127.0.0.1:{srv.port}" in str(info.value)
    assert "email.ca_file" in str(info.value)
    assert srv.mailbox.envelopes == []


async def test_smtps_implicit_tls_with_auth(
    smtp_server: SmtpFactory, tls: Tls, decision: FenceDecision
) -> None:
    srv = smtp_server("smtps", tls)
    ch = EmailChannel(
        EmailSettings(
            port=srv.port,
            security="smtps",
            username=SMTP_USER,
            password=SecretStr(SMTP_PASSWORD),
            ca_file=tls.cert,
            to=["ops@example.org"],
        )
    )
    await ch.send(to_message(decision))
    assert srv.mailbox.logins == [SMTP_USER]
    assert parse(srv.mailbox.envelopes[0].content)["Subject"] == (
        "[fencer] kvm03 stop DECIDED (cluster c1)"
    )


async def test_wrong_password_is_one_clear_line_without_the_password(
    smtp_server: SmtpFactory, tls: Tls, decision: FenceDecision
) -> None:
    srv = smtp_server("starttls", tls)
    wrong = "not-the-Password-42"
    ch = EmailChannel(
        EmailSettings(
            port=srv.port,
            security="starttls",
            username=SMTP_USER,
            password=SecretStr(wrong),
            ca_file=tls.cert,
            to=["ops@example.org"],
            timeout=5,
        )
    )
    with pytest.raises(AuthenticationFailed) as info:
        await ch.send(to_message(decision))
    text = str(info.value)
    assert text == (
        f"email: SMTP server 127.0.0.1:{srv.port}: authentication failed for user 'fencer'"
    )
    assert wrong not in text and "\n" not in text
    assert info.value.retryable is False
    assert srv.mailbox.envelopes == []


async def test_closed_port_is_a_retryable_delivery_failure(decision: FenceDecision) -> None:
    port = free_port()
    ch = EmailChannel(EmailSettings(port=port, to=["ops@example.org"], timeout=2))
    with pytest.raises(DeliveryFailed) as info:
        await ch.send(to_message(decision))
    assert f"127.0.0.1:{port}" in str(info.value)
    assert info.value.retryable is True


async def test_recipients_per_cluster_with_global_default(
    smtp_server: SmtpFactory, decision: FenceDecision
) -> None:
    srv = smtp_server("plain")
    settings = FencerSettings(
        email=EmailSettings(port=srv.port, to=["ops@example.org"]),
        clusters={"c1-uuid": ClusterSettings(email_to=["c1-team@example.org"])},
    )
    ch = EmailChannel(settings.email, settings.email_to_for)
    await ch.send(to_message(decision))
    other = decision.model_copy(
        update={"host": decision.host.model_copy(update={"cluster_uuid": "c2-uuid"})}
    )
    await ch.send(to_message(other))
    assert [e.rcpt_tos for e in srv.mailbox.envelopes] == [
        ["c1-team@example.org"],
        ["ops@example.org"],
    ]


async def test_no_recipients_is_an_error_not_a_silent_drop(decision: FenceDecision) -> None:
    ch = EmailChannel(EmailSettings(port=free_port(), to=[]))
    with pytest.raises(NotifyError, match="no recipients"):
        await ch.send(to_message(decision))
