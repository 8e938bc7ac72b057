"""A notification channel whose peer is down holds back that channel only (rule 5).

The notify role delivers each record before its offset is committed. With one agent for every
channel, a mail server that was down held the agent's four actors, each retrying the mail of
one record, and nothing more was read: no trap went out either while the mail path was down
(found by review4). Each channel now has its own agent reading every record. Against a real
`fencer worker --roles notify`, the embedded broker, Debian's snmptrapd, and a mail port where
nothing listens (then an SMTP server started on it: every held mail goes out)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from notifier_peers import SmtpFactory, TrapReceiver, free_port

from fencing.events import NoticeKind
from fencing.records import HostRef, Notice
from fencing.settings import CloudStackSettings, EmailSettings, SnmpReceiver, SnmpSettings
from lab.cloudstack_sim import CloudStackSimulator, SimCloud
from lab.pipeline import Tap, WorkerProcess, write_settings
from streams.app import create_app

pytestmark = pytest.mark.timeout(180)

ID_VARBIND = "FENCER-MIB::fencerNoticeId.0"


def _notice(host: HostRef, i: int) -> Notice:
    return Notice(
        notice_id=f"n-{i:04d}",
        kind=NoticeKind.CANNOT_VERIFY,
        host=host,
        at=1736935700.0 + i,
        reason=f"ssh to kvm02 timed out ({i})",
    )


def test_the_notify_role_has_one_agent_per_channel(fencer_settings: Any) -> None:
    settings = fencer_settings(
        email=EmailSettings(enabled=True, port=free_port(), to=["ops@example.org"]),
        snmp=SnmpSettings(
            enabled=True,
            receivers=[
                SnmpReceiver(host="127.0.0.1", port=free_port()),
                SnmpReceiver(host="127.0.0.1", port=free_port()),
            ],
        ),
    )
    app = create_app(settings, ("notify",))
    names = sorted(a.name for a in app.agents.values() if "notify" in a.name)
    assert len(names) == 3, names


async def test_a_mail_server_down_holds_back_no_trap(
    fencer_settings: Any,
    smtp_server: SmtpFactory,
    snmptrapd: TrapReceiver,
    host: HostRef,
    tmp_path: Path,
) -> None:
    mail_port = free_port()  # nothing listens here yet
    mailbox_started = False
    sim = await CloudStackSimulator(SimCloud()).start()  # a worker starts once it answers
    settings = fencer_settings(
        isolated_topics=True,
        cloudstack=CloudStackSettings(
            endpoint=sim.url, api_key=sim.api_key, secret_key=sim.secret_key
        ),
        email=EmailSettings(enabled=True, port=mail_port, to=["ops@example.org"], timeout=1),
        snmp=SnmpSettings(
            enabled=True, receivers=[SnmpReceiver(host="127.0.0.1", port=snmptrapd.port)]
        ),
    )
    topics = settings.kafka.topics
    tap = await Tap(settings).start([topics.notices])
    worker = WorkerProcess(
        write_settings(settings, tmp_path / "fencer.yaml"), "notify", tmp_path / "worker.log"
    ).start()
    try:
        notices = [_notice(host, i) for i in range(10)]
        for n in notices:
            await tap.send(topics.notices, host.host_uuid, n)
        # Every trap arrives while the mail server is still down (before: 4, then nothing).
        deadline = time.monotonic() + 90
        while len(snmptrapd.traps()) < len(notices) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        ids = {t.value(ID_VARBIND) for t in snmptrapd.received()}
        assert len(ids) == len(notices), sorted(ids)
        assert not mailbox_started, "the mail server was not up yet"
        # The mail server comes up on its port: every held mail goes out, none lost.
        srv = smtp_server("plain", port=mail_port)
        deadline = time.monotonic() + 90
        while len(srv.mailbox.envelopes) < len(notices) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert len(srv.mailbox.envelopes) == len(notices)
    finally:
        worker.stop()
        await tap.stop()
        await sim.stop()
