"""The Notifier: one record in, one notification per channel out, in the background, retried
with backoff, logged, and never twice for a redelivered record."""

from __future__ import annotations

import asyncio
import email
import itertools
import logging
import socket
import time

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
    free_port,
    parse_trap,
)
from pydantic import SecretStr

from fencing.records import FenceDecision, FenceOutcome, Notice
from fencing.settings import EmailSettings, FencerSettings, SnmpReceiver, SnmpSettings
from notifiers.email import EmailChannel
from notifiers.render import Message
from notifiers.service import Channel, Notifier, channels_from_settings
from notifiers.snmp import SnmpChannel

pytestmark = pytest.mark.timeout(30)


def settings_for(smtp_port: int, tls: Tls, trap_port: int) -> FencerSettings:
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


async def test_every_record_reaches_every_channel(
    smtp_server: SmtpFactory,
    tls: Tls,
    snmptrapd: TrapReceiver,
    decision: FenceDecision,
    outcome: FenceOutcome,
    notice: Notice,
) -> None:
    srv = smtp_server("starttls", tls)
    notifier = Notifier.from_settings(settings_for(srv.port, tls, snmptrapd.port))
    assert [ch.name for ch in notifier.channels] == [
        "email",
        f"snmp v3 inform 127.0.0.1:{snmptrapd.port}",
    ]
    store: dict[str, float] = {}
    for record in (decision, outcome, notice):
        assert await notifier.deliver(record, store)

    subjects = sorted(
        email.message_from_bytes(e.original_content or b"")["Subject"]
        for e in srv.mailbox.envelopes
    )
    assert subjects == [
        "[fencer] kvm03 CANNOT-VERIFY: ssh to kvm02 timed out (cluster c1)",
        "[fencer] kvm03 stop DECIDED (cluster c1)",
        "[fencer] kvm03 stop SUCCEEDED (cluster c1)",
    ]
    kinds = sorted(parse_trap(t).value("SNMPv2-MIB::snmpTrapOID.0") for t in snmptrapd.wait_for(3))
    assert kinds == [
        "FENCER-MIB::fencerCannotVerify",
        "FENCER-MIB::fencerFenceDecided",
        "FENCER-MIB::fencerFenceSucceeded",
    ]
    assert set(store) == {
        "decision:dec-0001:fence_decided",
        "outcome:dec-0001:1736935626",
        "notice:n-0001",
    }


async def test_a_redelivered_record_is_notified_once(
    smtp_server: SmtpFactory,
    tls: Tls,
    snmptrapd: TrapReceiver,
    decision: FenceDecision,
    withheld: FenceDecision,
) -> None:
    srv = smtp_server("starttls", tls)
    settings = settings_for(srv.port, tls, snmptrapd.port)
    store: dict[str, float] = {}  # the Faust `notified` table
    notifier = Notifier.from_settings(settings)
    assert await notifier.deliver(decision, store)
    assert await notifier.deliver(decision.model_copy(), store)  # redelivered after it was sent
    restarted = Notifier.from_settings(settings)  # a restarted worker, the same table
    assert await restarted.deliver(decision, store)
    assert len(srv.mailbox.envelopes) == 1
    assert len(snmptrapd.wait_for(2, timeout=0.5)) == 1
    # The same decision id withheld is a different notification, not a redelivery.
    assert await restarted.deliver(withheld, store)
    assert len(srv.mailbox.envelopes) == 2
    assert len(snmptrapd.wait_for(2)) == 2


async def test_a_receiver_that_is_down_is_retried_and_logged_while_fencing_goes_on(
    smtp_server: SmtpFactory, decision: FenceDecision, caplog: pytest.LogCaptureFixture
) -> None:
    good = smtp_server("plain")
    dead_smtp = free_port()
    dead_snmp = free_port(socket.SOCK_DGRAM)
    notifier = Notifier(
        [
            EmailChannel(EmailSettings(port=good.port, to=["ops@example.org"])),
            EmailChannel(EmailSettings(port=dead_smtp, to=["ops@example.org"], timeout=1)),
            SnmpChannel(
                SnmpReceiver(host="127.0.0.1", port=dead_snmp, notify_type="inform"),
                SENDER_ENGINE_ID,
                timeout=0.2,
                retries=0,
            ),
        ],
        retries=2,
        backoff=0.05,
    )
    caplog.set_level(logging.INFO, logger="fencer.notifiers")
    store: dict[str, float] = {}
    assert not await notifier.deliver(decision, store)

    assert len(good.mailbox.envelopes) == 1
    # at least once: only the channel that accepted is marked, the record is not (a
    # redelivery sends it again on the two that failed)
    assert store.keys() == {f"decision:dec-0001:fence_decided@email 127.0.0.1:{good.port}"}
    for peer in (f"SMTP server 127.0.0.1:{dead_smtp}", f"receiver 127.0.0.1:{dead_snmp}"):
        lines = [r.getMessage() for r in caplog.records if peer in r.getMessage()]
        assert len(lines) == 3, lines
        assert "(attempt 1 of 3), retrying in 0.05 s" in lines[0]
        assert "(attempt 2 of 3), retrying in 0.1 s" in lines[1]
        assert "given up after 3 attempt(s)" in lines[2]
        assert [r.levelname for r in caplog.records if peer in r.getMessage()] == [
            "WARNING",
            "WARNING",
            "ERROR",
        ]


async def test_receivers_that_never_answer_do_not_stall_the_event_loop(
    decision: FenceDecision,
) -> None:
    # Peers that are up but silent: a TCP listener that never accepts (the kernel completes the
    # handshake, the SMTP greeting never comes) and a UDP socket that never acknowledges an inform.
    wait = 3.0
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent_smtp,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent_snmp,
    ):
        silent_smtp.bind(("127.0.0.1", 0))
        silent_smtp.listen(8)
        silent_snmp.bind(("127.0.0.1", 0))
        notifier = Notifier(
            [
                EmailChannel(
                    EmailSettings(
                        port=silent_smtp.getsockname()[1], to=["ops@example.org"], timeout=wait
                    )
                ),
                SnmpChannel(
                    SnmpReceiver(
                        host="127.0.0.1", port=silent_snmp.getsockname()[1], notify_type="inform"
                    ),
                    SENDER_ENGINE_ID,
                    timeout=wait,
                    retries=0,
                ),
            ],
            retries=0,
        )
        # "Fencing": a loop beating every 10 ms while both notifications wait on their peers.
        beats = [time.perf_counter()]
        stop = asyncio.Event()

        async def fencing() -> None:
            while not stop.is_set():
                await asyncio.sleep(0.01)
                beats.append(time.perf_counter())

        beat = asyncio.create_task(fencing())
        started = time.perf_counter()
        assert not await notifier.deliver(decision, {})
        took = time.perf_counter() - started
        stop.set()
        await beat

    # Both peers were really waited on for their whole timeout ...
    assert took >= wait, took
    # ... and the loop went on beating meanwhile. A notifier that waited in the loop's thread would
    # leave one gap of at least `wait`; the margin is for a loaded CI machine, which has been seen
    # to pause a healthy loop for about 1 s.
    gap = max(b - a for a, b in itertools.pairwise(beats))
    assert gap < wait - 1.0, f"the loop stalled for {gap:.3f} s"
    assert len(beats) > 50


async def test_wrong_password_is_not_retried_and_never_logged(
    smtp_server: SmtpFactory, tls: Tls, decision: FenceDecision, caplog: pytest.LogCaptureFixture
) -> None:
    srv = smtp_server("starttls", tls)
    wrong = "Wrong-Secret-77"
    ch = EmailChannel(
        EmailSettings(
            port=srv.port,
            security="starttls",
            username=SMTP_USER,
            password=SecretStr(wrong),
            ca_file=tls.cert,
            to=["ops@example.org"],
        )
    )
    notifier = Notifier([ch], retries=3, backoff=0.05)
    caplog.set_level(logging.DEBUG)
    assert not await notifier.deliver(decision, {})
    (line,) = [r.getMessage() for r in caplog.records if r.name == "fencer.notifiers"]
    assert "given up after 1 attempt(s)" in line
    assert f"SMTP server 127.0.0.1:{srv.port}: authentication failed" in line
    assert wrong not in caplog.text


class Broken:
    """A channel with a bug: the notifier must contain it."""

    name = "broken"

    def __init__(self) -> None:
        self.calls = 0

    async def send(self, message: Message) -> None:
        self.calls += 1
        raise RuntimeError("boom")


class Stuck:
    """A channel whose peer never answers."""

    name = "stuck"

    async def send(self, message: Message) -> None:
        await asyncio.sleep(3600)


async def test_a_broken_or_stuck_channel_never_reaches_the_caller(
    decision: FenceDecision, caplog: pytest.LogCaptureFixture
) -> None:
    broken = Broken()
    assert isinstance(broken, Channel) and isinstance(Stuck(), Channel)
    notifier = Notifier([broken, Stuck()], retries=1, backoff=0.01, send_timeout=0.1)
    assert not await notifier.deliver(decision, {})
    assert broken.calls == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("broken: unexpected RuntimeError: boom" in e for e in errors)
    assert any("stuck: no answer within 0.1 s" in e for e in errors)


def test_channels_follow_the_settings(tls: Tls) -> None:
    assert channels_from_settings(FencerSettings()) == []
    names = [ch.name for ch in channels_from_settings(settings_for(2525, tls, 1162))]
    assert names == ["email", "snmp v3 inform 127.0.0.1:1162"]
