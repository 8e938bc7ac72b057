"""Email channel: one multipart/alternative mail (plain text + HTML) per notification, sent with
aiosmtplib over plain SMTP, STARTTLS or SMTPS (implicit TLS), with optional AUTH.

Every failure becomes one `NotifyError` line that names the SMTP server; the password is only
read at the call into aiosmtplib and never appears in an error or a log.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Sequence
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

import aiosmtplib

from fencing.redaction import Redactor
from fencing.settings import EmailSettings
from notifiers.channel import AuthenticationFailed, DeliveryFailed, NotifyError
from notifiers.render import EmailContent, Message
from notifiers.render_email import render_email

log = logging.getLogger("fencer.notifiers")


def build_email(
    content: EmailContent, message: Message, sender: str, to: Sequence[str]
) -> EmailMessage:
    """The MIME message: plain text first, HTML as the preferred alternative."""
    mail = EmailMessage()
    mail["Subject"] = content.subject
    mail["From"] = sender
    mail["To"] = ", ".join(to)
    mail["Date"] = formatdate(localtime=False)
    mail["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    # Headers for mail filters and for finding every mail of one fence.
    mail["X-Fencer-Kind"] = message.kind.value
    mail["X-Fencer-Severity"] = message.severity.value
    mail["X-Fencer-Host"] = message.host_uuid
    # Stable across re-deliveries (at least once): receivers drop a second mail with this id.
    mail["X-Fencer-Notice-Id"] = message.record_id
    if message.decision_id:
        mail["X-Fencer-Decision-Id"] = message.decision_id
    mail.set_content(content.text)
    mail.add_alternative(content.html, subtype="html")
    return mail


class EmailChannel:
    """Sends each notification to the cluster's recipients (or the global list)."""

    name = "email"

    def __init__(
        self,
        settings: EmailSettings,
        recipients_for: Callable[[str | None], list[str]] | None = None,
    ) -> None:
        self.settings = settings
        self._recipients_for = recipients_for or (lambda _cluster: list(settings.to))

    @property
    def peer(self) -> str:
        """The SMTP server as host:port, for messages."""
        return f"{self.settings.host}:{self.settings.port}"

    def recipients(self, message: Message) -> list[str]:
        """Who gets this message: the cluster's list, else the global one."""
        return self._recipients_for(message.cluster_uuid)

    async def send(self, message: Message) -> None:
        """Render and send one mail; raise `NotifyError` on any failure."""
        to = self.recipients(message)
        if not to:
            raise NotifyError(
                f"email: no recipients for cluster {message.cluster_uuid or '(none)'}"
                " (set email.to or clusters.<uuid>.email_to)"
            )
        mail = build_email(render_email(message), message, self.settings.sender, to)
        await self.deliver(mail, to)

    async def deliver(self, mail: EmailMessage, to: Sequence[str]) -> None:
        """Hand a built mail to the SMTP server."""
        s = self.settings
        tls: ssl.SSLContext | None = None
        if s.security != "plain":
            tls = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
        password = s.password.get_secret_value() if s.password is not None else None
        try:
            refused, _ = await aiosmtplib.send(
                mail,
                sender=s.sender,
                recipients=list(to),
                hostname=s.host,
                port=s.port,
                username=s.username or None,
                password=password if s.username else None,
                use_tls=s.security == "smtps",
                # False, not None: "plain" must not upgrade opportunistically either.
                start_tls=s.security == "starttls",
                tls_context=tls,
                timeout=s.timeout,
            )
        except Exception as exc:
            raise self._error(exc, password) from None
        if refused:
            # The server took the mail for the others (sending again would duplicate it for
            # them, forever): not retried, but never silent (review4).
            log.error(
                "email: SMTP server %s refused %d of %d recipient(s): %s; the others got it",
                self.peer,
                len(refused),
                len(to),
                "; ".join(
                    f"{who}: {r.code} {' '.join(r.message.split())}" for who, r in refused.items()
                ),
            )

    def _error(self, exc: Exception, password: str | None) -> NotifyError:
        where = f"email: SMTP server {self.peer}"
        if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
            user = self.settings.username
            return AuthenticationFailed(f"{where}: authentication failed for user {user!r}")
        if isinstance(exc, aiosmtplib.SMTPTimeoutError):
            return DeliveryFailed(f"{where}: timed out after {self.settings.timeout:g} s")
        cause: BaseException = exc
        while cause.__cause__ is not None and not isinstance(cause, ssl.SSLError):
            cause = cause.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            return DeliveryFailed(
                f"{where}: TLS certificate not trusted ({cause.verify_message}); set email.ca_file"
            )
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            text = f"{where}: refused: {exc.code} {exc.message}"
        elif isinstance(exc, aiosmtplib.SMTPConnectError | ConnectionError | OSError):
            text = f"{where}: cannot connect: {exc}"
        else:
            text = f"{where}: {type(exc).__name__}: {exc}"
        text = " ".join(text.split())
        text = Redactor([password])(text)
        return DeliveryFailed(text)
