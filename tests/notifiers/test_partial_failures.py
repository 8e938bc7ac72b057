"""review4: the notify path under partial failures, against real aiosmtpd servers on loopback:
credentials refused while the worker delivers (kept, not lost), one recipient of several
refused (told, not silent), a server that takes the envelope and then fails the DATA (retried,
never marked before it took the mail)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from notifier_peers import SMTP_PASSWORD, SMTP_USER, Mailbox, SmtpFactory, Tls, free_port
from pydantic import SecretStr

from fencing.records import FenceDecision
from fencing.settings import EmailSettings
from notifiers.email import EmailChannel
from notifiers.service import Notifier

pytestmark = pytest.mark.timeout(30)


def starttls(port: int, tls: Tls, password: str) -> EmailChannel:
    return EmailChannel(
        EmailSettings(
            port=port,
            security="starttls",
            username=SMTP_USER,
            password=SecretStr(password),
            ca_file=tls.cert,
            to=["ops@example.org"],
            timeout=2,
        )
    )


async def test_refused_credentials_keep_the_notification_until_a_sender_is_let_in(
    smtp_server: SmtpFactory, tls: Tls, decision: FenceDecision, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's delivery (forever: the offset is committed when it returns) ended on a
    refused login, unmarked: the agent moved on and the notification was never sent, even
    after the password was fixed and the worker restarted. Now it keeps trying (an error each
    time), so the record is consumed again after a restart with the right password."""
    srv = smtp_server("starttls", tls)
    wrong = "Wrong-Secret-77"
    store: dict[str, float] = {}
    caplog.set_level(logging.WARNING, "fencer.notifiers")
    refused = Notifier([starttls(srv.port, tls, wrong)], retries=0, backoff=0.05, max_backoff=0.1)
    task = asyncio.create_task(refused.deliver(decision, store, forever=True))
    await asyncio.sleep(1.5)
    assert not task.done(), f"gave up: {task.result()}"
    task.cancel()
    assert store == {} and srv.mailbox.envelopes == []
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) >= 2 and all("authentication failed" in e for e in errors)
    assert wrong not in caplog.text
    # the worker restarted with the right password: the record comes again and is delivered
    fixed = Notifier([starttls(srv.port, tls, SMTP_PASSWORD)], retries=0, backoff=0.05)
    assert await fixed.deliver(decision, store, forever=True)
    assert list(store) == ["decision:dec-0001:fence_decided"]
    assert len(srv.mailbox.envelopes) == 1


class Picky(Mailbox):
    """Refuses one recipient; fails the first DATA after taking the envelope."""

    def __init__(self, fail_data: int = 0) -> None:
        super().__init__()
        self.fail_data = fail_data

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if address.startswith("nobody@"):
            return "550 5.1.1 no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.fail_data > 0:
            self.fail_data -= 1
            return "451 4.3.0 queue write failed, try later"
        return await super().handle_DATA(server, session, envelope)


def picky_server(box: Picky) -> tuple[Controller, int]:
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    return controller, port


def plain(port: int, to: list[str]) -> EmailChannel:
    return EmailChannel(EmailSettings(port=port, to=to, timeout=2))


async def test_a_refused_recipient_among_others_is_told_not_dropped_silently(
    decision: FenceDecision, caplog: pytest.LogCaptureFixture
) -> None:
    box = Picky()
    controller, port = picky_server(box)
    try:
        caplog.set_level(logging.WARNING, "fencer.notifiers")
        ch = plain(port, ["ops@example.org", "nobody@example.org"])
        store: dict[str, float] = {}
        assert await Notifier([ch], retries=0, backoff=0.05).deliver(decision, store)
        assert [e.rcpt_tos for e in box.envelopes] == [["ops@example.org"]]
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("nobody@example.org" in e and "550" in e for e in errors), errors
    finally:
        controller.stop()


async def test_a_server_that_fails_the_data_is_retried_and_marked_only_after_it_took_it(
    decision: FenceDecision,
) -> None:
    box = Picky(fail_data=2)
    controller, port = picky_server(box)
    try:
        store: dict[str, float] = {}
        notifier = Notifier([plain(port, ["ops@example.org"])], retries=0, backoff=0.05)
        assert not await notifier.deliver(decision, store)  # one try, refused mid-DATA
        assert store == {} and box.envelopes == []
        assert await notifier.deliver(decision, store, forever=True)
        assert len(box.envelopes) == 1 and list(store) == ["decision:dec-0001:fence_decided"]
    finally:
        controller.stop()


async def test_notifications_held_by_a_server_that_was_down_arrive_in_the_order_they_came(
    decision: FenceDecision,
) -> None:
    """The worker delivers up to four records at once (agent concurrency), each retrying a
    server that is down on its own backoff: when the server came back, the record that came
    last (shortest backoff) was mailed first. One sender per channel at a time keeps the order
    the records came in."""
    port = free_port()
    notifier = Notifier([plain(port, ["ops@example.org"])], retries=0, backoff=0.05)
    notifier.max_backoff = 0.8
    stores: list[dict[str, float]] = [{}, {}, {}]
    records = [decision.model_copy(update={"decision_id": f"dec-{n}"}) for n in range(3)]
    tasks = []
    for record, store in zip(records, stores, strict=True):
        tasks.append(asyncio.create_task(notifier.deliver(record, store, forever=True)))
        await asyncio.sleep(0.5)  # the first one's backoff has grown meanwhile
    box = Mailbox()
    smtp = Controller(box, hostname="127.0.0.1", port=port)
    smtp.start()
    try:
        assert all(await asyncio.wait_for(asyncio.gather(*tasks), 10))
    finally:
        smtp.stop()
    ids = [e.original_content.split(b"X-Fencer-Decision-Id: ")[1][:5] for e in box.envelopes]
    assert ids == [b"dec-0", b"dec-1", b"dec-2"]
