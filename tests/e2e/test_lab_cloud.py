"""The lab cloud itself, without fencer: the event bus forwarder sends CloudStack's exact records,
a BMC power-off (through Debian's ipmitool) really stops the host, and the receivers record
what a real SNMP sender and SMTP client deliver."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import aiosmtplib
import pytest
from pysnmp.hlapi.v3arch.asyncio import (
    CommunityData,
    ContextData,
    NotificationType,
    ObjectIdentity,
    ObjectType,
    SnmpEngine,
    UdpTransportTarget,
    send_notification,
)
from pysnmp.proto.rfc1902 import OctetString

from lab.cloud import BMC_USER, LabCloud
from lab.pipeline import Tap
from notifiers.render import NOTIFICATIONS_OID, OBJECTS_OID
from streams.broker import EmbeddedBroker

pytestmark = pytest.mark.timeout(90)


async def test_forwarder_sends_cloudstacks_exact_records(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    async with LabCloud(broker, hosts=4, root=tmp_path / "lab", interval=0.5) as lab:
        settings = lab.settings()
        tap = await Tap(settings).start([settings.kafka.topics.cloudstack])
        try:
            lab.agent_dies("kvm02")
            await lab.flush()
            published = list(lab.cloud.events)
            assert published, "the simulator published nothing"
            got = await tap.wait_for(
                lambda: len(tap.of(settings.kafka.topics.cloudstack)) >= len(published),
                15,
                "the forwarded records",
            )
            assert got
            received = tap.of(settings.kafka.topics.cloudstack)
            assert [(k, v) for k, v in received] == [(k, json.loads(v)) for k, v in published]
            assert received[0][0] is None  # alerts carry no key, as in CloudStack
            assert "Host disconnected" in received[0][1]["subject"]
        finally:
            await tap.stop()


async def test_bmc_power_off_stops_the_host(broker: EmbeddedBroker, tmp_path: Path) -> None:
    async with LabCloud(broker, hosts=3, root=tmp_path / "lab", interval=0.2) as lab:
        h = lab.host("kvm02")
        pool = lab.pools[0].uuid
        hb = h.heartbeat_file(pool)
        bmc = lab.bmcs["kvm02"]
        env = {**os.environ, "IPMI_PASSWORD": lab.bmc_passwords["kvm02"]}
        cmd = ["ipmitool", "-I", "lanplus", "-H", bmc.address, "-p", str(bmc.port)]
        cmd += ["-U", BMC_USER, "-E", "chassis", "power", "off"]
        done = await asyncio.to_thread(
            subprocess.run, cmd, env=env, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 5
        while h.powered and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not h.powered
        assert lab.power_offs and lab.power_offs[0][1] == "kvm02"
        assert lab.cloud.hosts[h.uuid].state == "Disconnected"
        before = hb.stat().st_mtime
        await asyncio.sleep(1.0)
        assert hb.stat().st_mtime == before, "a powered-off host still writes its heartbeat"
        other = lab.host("kvm01").heartbeat_file(pool)
        assert time.time() - other.stat().st_mtime < 1.0, "the other hosts stopped writing"
        assert lab.bmc_power_offs("kvm02") == 1


async def test_receivers_record_mail_and_traps(broker: EmbeddedBroker, tmp_path: Path) -> None:
    async with LabCloud(broker, hosts=2, root=tmp_path / "lab") as lab:
        await aiosmtplib.send(
            "From: fencer@lab\r\nTo: ops@lab\r\nSubject: [fencer] hello\r\n\r\nbody\r\n",
            sender="fencer@lab",
            recipients=["ops@lab"],
            hostname="127.0.0.1",
            port=lab.mail.port,
        )
        engine = SnmpEngine()
        try:
            err, *_ = await send_notification(
                engine,
                CommunityData("public", mpModel=1),
                await UdpTransportTarget.create(("127.0.0.1", lab.traps.port)),
                ContextData(),
                "trap",
                NotificationType(ObjectIdentity((*NOTIFICATIONS_OID, 3))).add_varbinds(
                    ObjectType(ObjectIdentity((*OBJECTS_OID, 1, 0)), OctetString("kvm09"))
                ),
            )
        finally:
            engine.close_dispatcher()
        assert err is None
        deadline = time.monotonic() + 5
        while not lab.traps.traps and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert [m.subject for m in lab.mail.mails] == ["[fencer] hello"]
        assert lab.mail.mails[0].to == ("ops@lab",)
        (trap,) = lab.traps.traps
        assert trap.kind == "fence_succeeded" and trap.version == "v2c"
        assert trap.varbinds["fencerHostName"] == "kvm09"
        assert lab.traps.errors == []
