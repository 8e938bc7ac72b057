"""BMC identity (system GUID pinned per host) and the IPMI details, against real BMCs on
loopback: the lab's pyghmi BMC and OpenIPMI's ipmi_sim (an independent implementation), the
embedded Kafka broker for the pins topic, and the `fencer` CLI as operators run it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiokafka import ConsumerRecord
from pydantic import SecretStr
from pyghmi.ipmi.private import session as ipmisession

from fencing.actuator import Actuator, check_host
from fencing.drivers import ipmi as ipmidriver
from fencing.drivers.base import BmcRefused, DriverConfigError
from fencing.drivers.fake import FakeDriver
from fencing.drivers.ipmi import IpmiDriver
from fencing.drivers.redfish import RedfishDriver
from fencing.drivers.template import TemplateDriver
from fencing.engine import Engine
from fencing.events import FenceAction, NoticeKind
from fencing.identity import (
    DAY,
    IdentityCheck,
    MemoryPinStore,
    daily_slot,
    identity_notice,
    verify_identity,
)
from fencing.records import BmcPin, EvidenceSummary, FenceDecision, HostRef, Notice
from fencing.settings import (
    ActuatorSettings,
    FencerSettings,
    HostSettings,
    IpmiOverrides,
    IpmiSettings,
    RestartVia,
    SettingsError,
    load_settings,
)
from lab import openipmi
from lab.bmc import BmcSimulator
from streams.bmc_pins import BmcPinStore
from streams.topic_reader import TopicReader

from .conftest import BMC_PASSWORD, Cloud, Redfish, ipmitool_template
from .test_actuator import make_settings

# ipmi_sim comes from the Debian package openipmi (Makefile DEBS): never skipped.
pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]
GUID_A = "6f1c0e2a-8a51-4d3e-9b1f-0a6c3d2e1f01"
GUID_B = "0b9e8d7c-6a5f-4e3d-8c2b-1a0f9e8d7c02"
HOST = "11111111-2222-3333-4444-555555555555"


@pytest.fixture
def sim_bmc() -> Iterator[BmcSimulator]:
    """The lab's BMC, reporting GUID_A."""
    with BmcSimulator("admin", BMC_PASSWORD, guid=GUID_A) as sim:
        yield sim


@pytest.fixture
def ipmi_sim() -> Iterator[openipmi.IpmiSim]:
    """OpenIPMI's ipmi_sim, powered on, reporting GUID_A."""
    with openipmi.IpmiSim(guid=GUID_A) as sim:
        yield sim


def settings_for(port: int, user: str = "admin", password: str = BMC_PASSWORD, **kw: Any) -> Any:
    """Settings that fence HOST through the BMC on 127.0.0.1:port (no CloudStack call)."""
    base: FencerSettings = kw.pop("base", None) or FencerSettings()
    return base.model_copy(
        update={
            "defaults": IpmiSettings(
                action=FenceAction.STOP, username=user, restart_via=RestartVia.NONE
            ),
            "hosts": {
                HOST: HostSettings(
                    ipmi=IpmiOverrides(address="127.0.0.1", port=port, password=SecretStr(password))
                )
            },
            "actuator": ActuatorSettings(
                power_timeout=5, poll_interval=0.1, retries=1, retry_backoff=0.1
            ),
            **kw,
        }
    )


def decision(n: int = 1) -> FenceDecision:
    return FenceDecision(
        decision_id=f"{HOST}/{n}/1",
        host=HostRef(host_uuid=HOST, host_name="hv1", cluster_uuid="c1"),
        episode=n,
        action=FenceAction.STOP,
        approved=True,
        evidence=EvidenceSummary(suspect_since=1.0, stale_checks=3),
        decided_at=time.time(),
    )


def fencer_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run the `fencer` command as an operator would (this worktree's code)."""
    return subprocess.run(
        [sys.executable, "-m", "streams.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


class Notices:
    """Notices the actuator announced."""

    def __init__(self) -> None:
        self.sent: list[Notice] = []

    async def __call__(self, notice: Notice) -> None:
        self.sent.append(notice)


# -- GUID read and pinned -------------------------------------------------------------------


async def test_both_bmcs_report_their_configured_system_guid(
    sim_bmc: BmcSimulator, ipmi_sim: openipmi.IpmiSim
) -> None:
    lab = IpmiDriver("127.0.0.1", "admin", SecretStr(BMC_PASSWORD), sim_bmc.port, timeout=5)
    assert await lab.system_guid() == GUID_A
    await lab.aclose()
    assert sim_bmc.count("get_system_guid") == 1
    # ipmi_sim sends lan.conf's 16 bytes as they are; pyghmi decodes the first three fields
    # little-endian as SMBIOS does: one fixed reading per board, which is all a pin needs.
    sim = IpmiDriver(
        "127.0.0.1", ipmi_sim.username, SecretStr(ipmi_sim.password), ipmi_sim.port, timeout=5
    )
    first = await sim.system_guid()
    assert first == await sim.system_guid()
    assert uuid.UUID(first).bytes_le == uuid.UUID(GUID_A).bytes
    await sim.aclose()


async def test_lab_bmc_guid_is_pinned_at_first_fence_on_the_pins_topic(
    sim_bmc: BmcSimulator, fencer_settings: Any
) -> None:
    settings = settings_for(sim_bmc.port, base=fencer_settings(isolated_topics=True))
    pins = BmcPinStore(settings)
    await pins.start()
    try:
        outcome = await Actuator(settings, pins=pins).handle(decision())
        assert outcome is not None and outcome.success and outcome.verified, outcome
        assert (outcome.power_before, outcome.power_after) == ("on", "off")
    finally:
        await pins.stop()
    assert sim_bmc.power == "off"
    again = BmcPinStore(settings)  # another process reading the compacted topic
    await again.start()
    try:
        pin = again.get(HOST)
        assert pin is not None
        assert (pin.guid, pin.pinned_by, pin.address) == (GUID_A, "first-fence", "127.0.0.1")
    finally:
        await again.stop()


async def test_ipmi_sim_guid_is_pinned_by_the_preflight(ipmi_sim: openipmi.IpmiSim) -> None:
    settings = settings_for(ipmi_sim.port, ipmi_sim.username, ipmi_sim.password)
    pins = MemoryPinStore()
    first = await check_host(settings, HOST, None, pins=pins)
    assert first.ok and first.identity == "pinned" and first.power == "on"
    pin = pins.get(HOST)
    assert pin is not None and pin.guid == first.guid and pin.pinned_by == "preflight"
    second = await check_host(settings, HOST, None, pins=pins)
    assert second.ok and second.identity == "matches"
    assert ipmi_sim.power_commands == []


# -- a BMC whose GUID changed ---------------------------------------------------------------


async def _notices_on(settings: FencerSettings, within: float = 10) -> list[Notice]:
    got: list[Notice] = []

    def on(record: ConsumerRecord[bytes, bytes]) -> None:
        got.append(Notice.model_validate_json(record.value or b""))

    reader = TopicReader(settings, [settings.kafka.topics.notices], on, client_id="test-notices")
    await reader.start(within)
    await reader.stop()
    return got


async def test_changed_guid_no_power_action_notice_then_operator_pin_and_fence(
    sim_bmc: BmcSimulator, fencer_settings: Any, tmp_path: Path
) -> None:
    from fencing.settings import SigningSettings
    from fencing.signing import write_keys_file

    keys = write_keys_file(tmp_path / "signing.keys", "test")
    base = fencer_settings(isolated_topics=True, signing=SigningSettings(keys_file=keys))
    settings = settings_for(sim_bmc.port, base=base)
    pins = BmcPinStore(settings)
    await pins.start()
    try:
        assert (await check_host(settings, HOST, None, pins=pins)).identity == "pinned"
        sim_bmc.guid = GUID_B  # a swapped board (or another machine behind the address)

        preflight = await check_host(settings, HOST, None, pins=pins)
        assert not preflight.ok and preflight.identity == "changed" and preflight.guid == GUID_B
        assert "BMC identity changed" in (preflight.error or "")

        actuator = Actuator(settings, pins=pins, announce=pins.send_notice)
        reads_before = sim_bmc.count("get_power")
        refused = await actuator.handle(decision(1))
        assert refused is not None and not refused.success and not refused.verified
        assert GUID_B in (refused.error or "") and GUID_A in (refused.error or "")
        assert f"fencer ipmi pin {HOST}" in (refused.error or "")
        assert sim_bmc.power == "on"
        # Refused before any power command, even a read: only the GUID was asked.
        assert sim_bmc.count("power_off") == 0 and sim_bmc.count("get_power") == reads_before
        pin = pins.get(HOST)
        assert pin is not None and pin.guid == GUID_A and pin.seen_guid == GUID_B
    finally:
        await pins.stop()

    notices = [n for n in await _notices_on(settings) if n.host.host_uuid == HOST]
    assert [n.kind for n in notices] == [NoticeKind.BMC_IDENTITY_CHANGED]
    assert GUID_B in (notices[0].reason or "") and notices[0].host.host_name == "hv1"

    # The operator confirms the new board through the CLI, as documented.
    conf = tmp_path / "fencer.yaml"
    conf.write_text(
        yaml.safe_dump(
            {
                "kafka": settings.kafka.model_dump(mode="json"),
                "signing": {"keys_file": str(keys)},
                "defaults": {"action": "stop", "username": "admin", "restart_via": "none"},
                "hosts": {
                    HOST: {
                        "ipmi": {
                            "address": "127.0.0.1",
                            "port": sim_bmc.port,
                            "password": BMC_PASSWORD,
                        }
                    }
                },
            }
        )
    )
    r = fencer_cli(
        "ipmi", "pin", HOST, "--cluster", "c1", "--expect", GUID_B, "--by", "alice", "-c", str(conf)
    )
    assert r.returncode == 0, r.stderr
    assert BMC_PASSWORD not in r.stdout + r.stderr
    printed = json.loads(r.stdout)
    assert printed["guid"] == GUID_B and printed["previous_guid"] == GUID_A
    assert printed["changed"] and printed["pinned_by"] == "operator alice"

    pins = BmcPinStore(settings)
    await pins.start()
    try:
        fenced = await Actuator(settings, pins=pins).handle(decision(2))
        assert fenced is not None and fenced.success and fenced.verified, fenced
    finally:
        await pins.stop()
    assert sim_bmc.power == "off" and sim_bmc.count("power_off") == 1


def test_cli_pin_refuses_a_guid_other_than_the_expected_one(
    sim_bmc: BmcSimulator, fencer_settings: Any, tmp_path: Path
) -> None:
    from fencing.signing import write_keys_file

    settings = fencer_settings(isolated_topics=True)
    conf = tmp_path / "fencer.yaml"
    conf.write_text(
        yaml.safe_dump(
            {
                "kafka": settings.kafka.model_dump(mode="json"),
                "signing": {"keys_file": str(write_keys_file(tmp_path / "k", "test"))},
                "hosts": {
                    HOST: {
                        "ipmi": {
                            "address": "127.0.0.1",
                            "port": sim_bmc.port,
                            "password": BMC_PASSWORD,
                        }
                    }
                },
            }
        )
    )
    r = fencer_cli("ipmi", "pin", HOST, "--cluster", "c1", "--expect", GUID_B, "-c", str(conf))
    assert r.returncode == 1
    assert f"reports system GUID {GUID_A}, not {GUID_B}" in r.stderr
    assert BMC_PASSWORD not in r.stderr + r.stdout
    assert sim_bmc.count("get_system_guid") == 1


async def test_ipmi_sim_of_another_board_behind_the_address_is_not_powered_off() -> None:
    # Pinned through board A; the settings now reach board B (an address typo, a DHCP lease
    # handed to another machine): B is never powered off until an operator pins it.
    with openipmi.IpmiSim(guid=GUID_A) as a, openipmi.IpmiSim(guid=GUID_B) as b:
        pins = MemoryPinStore()
        first = settings_for(a.port, a.username, a.password)
        assert (await check_host(first, HOST, None, pins=pins)).identity == "pinned"
        moved = settings_for(b.port, b.username, b.password)
        notices = Notices()
        outcome = await Actuator(moved, pins=pins, announce=notices).handle(decision())
        assert outcome is not None and not outcome.success
        assert "BMC identity changed" in (outcome.error or "")
        assert b.power == "on" and b.power_commands == [] and a.power_commands == []
        assert [n.kind for n in notices.sent] == [NoticeKind.BMC_IDENTITY_CHANGED]


async def test_unreadable_pins_refuse_the_fence(sim_bmc: BmcSimulator) -> None:
    class Broken(MemoryPinStore):
        def get(self, host_uuid: str) -> Any:
            raise OSError("broker gone")

    outcome = await Actuator(settings_for(sim_bmc.port), pins=Broken()).handle(decision())
    assert outcome is not None and not outcome.success
    assert "cannot read or write the BMC pin" in (outcome.error or "")
    assert sim_bmc.power == "on" and sim_bmc.count("power_off") == 0


# -- IPMI details ---------------------------------------------------------------------------


def test_config_check_refuses_long_ipmi_user_and_password_naming_each(tmp_path: Path) -> None:
    long_pw = "p" * 21
    conf = tmp_path / "fencer.yaml"
    conf.write_text(
        yaml.safe_dump(
            {
                "defaults": {"driver": "ipmi"},
                "clusters": {"c1": {"ipmi": {"username": "u" * 17}}},
                "hosts": {HOST: {"ipmi": {"address": "10.0.0.9", "password": long_pw}}},
            }
        )
    )
    r = fencer_cli("config", "check", str(conf))
    assert r.returncode == 1
    assert (
        f"hosts.{HOST}.ipmi.password: password is 21 bytes; IPMI 2.0 carries at most 20" in r.stderr
    )
    assert (
        "clusters.c1.ipmi.username: username is 17 bytes; IPMI 2.0 carries at most 16" in r.stderr
    )
    assert long_pw not in r.stderr + r.stdout
    # 20 bytes (multi-byte characters count as bytes) and 16 are fine; Redfish has no such limit.
    ok = {"hosts": {HOST: {"ipmi": {"password": "é" * 10, "username": "u" * 16}}}}
    assert load_settings(None, **ok).hosts[HOST].ipmi.username == "u" * 16
    with pytest.raises(SettingsError, match="password is 22 bytes"):
        load_settings(None, hosts={HOST: {"ipmi": {"password": "é" * 11}}})
    redfish = {"defaults": {"driver": "redfish"}, "hosts": {HOST: {"ipmi": {"password": long_pw}}}}
    assert load_settings(None, **redfish)


@pytest.mark.parametrize("bmc_kind", ["lab", "ipmi_sim"])
async def test_driver_refuses_long_credentials_before_any_packet(
    bmc_kind: str, sim_bmc: BmcSimulator, ipmi_sim: openipmi.IpmiSim
) -> None:
    port = sim_bmc.port if bmc_kind == "lab" else ipmi_sim.port
    with pytest.raises(DriverConfigError, match="password is 21 bytes"):
        IpmiDriver("127.0.0.1", "admin", SecretStr("x" * 21), port)
    with pytest.raises(DriverConfigError, match="username is 17 bytes"):
        IpmiDriver("127.0.0.1", "u" * 17, SecretStr("x"), port)
    # Settings changed at run time (the UI's store) skip the file's check: the actuator's
    # outcome still says why, and the BMC saw nothing.
    settings = settings_for(port)
    host = settings.hosts[HOST].model_copy(
        update={
            "ipmi": settings.hosts[HOST].ipmi.model_copy(
                update={"password": SecretStr("secret-" * 3)}
            )
        }
    )
    settings = settings.model_copy(update={"hosts": {HOST: host}})
    outcome = await Actuator(settings, pins=MemoryPinStore()).handle(decision())
    assert outcome is not None and not outcome.success
    assert "password is 21 bytes" in (outcome.error or "")
    assert "secret-" not in (outcome.error or "")
    if bmc_kind == "lab":
        assert sim_bmc.count() == 0
    else:
        assert ipmi_sim.power_commands == []


async def test_power_before_is_the_first_attempts_reading(ipmi_sim: openipmi.IpmiSim) -> None:
    # The BMC accepts the off at once but shows it late: attempt 1 times out polling, attempt 2
    # reads off ("already off"). The outcome must say on -> off, not off -> off.
    ipmi_sim.delay_power_off(1.0)
    engine = Engine(power_timeout=0.6, poll_interval=0.1, retries=2, retry_backoff=0.8)
    driver = IpmiDriver(
        "127.0.0.1", ipmi_sim.username, SecretStr(ipmi_sim.password), ipmi_sim.port, timeout=5
    )
    r = await engine.run(HOST, driver, FenceAction.STOP)
    assert r.success and r.verified and r.attempts == 2, r
    assert (r.power_before, r.power_after) == ("on", "off")
    assert r.steps[0] == "power on" and "power off" in r.steps
    assert ipmi_sim.power_commands == ["set 0"]  # the retry saw it off and sent nothing


async def test_errors_name_the_ipmi_command_that_failed(ipmi_sim: openipmi.IpmiSim) -> None:
    driver = IpmiDriver(
        "127.0.0.1", ipmi_sim.username, SecretStr(ipmi_sim.password), ipmi_sim.port, timeout=5
    )
    try:
        with pytest.raises(BmcRefused, match=r"Chassis Identify \(netfn 0x00 cmd 0x04\) failed"):
            await driver.identify(True)  # ipmi_sim has no identify LED
        ipmi_sim.refuse_power_control()
        with pytest.raises(BmcRefused, match=r"Chassis Control \(netfn 0x00 cmd 0x02\) failed"):
            await driver.set_power("off")
        assert await driver.get_power() == "on"
    finally:
        await driver.aclose()
    wrong = IpmiDriver("127.0.0.1", ipmi_sim.username, SecretStr("not-the-pw"), ipmi_sim.port)
    with pytest.raises(Exception, match=r"refused the credentials in session login"):
        await wrong.get_power()


def test_ipmi_test_cli_prints_the_error_once_and_never_the_password(
    ipmi_sim: openipmi.IpmiSim, tmp_path: Path
) -> None:
    conf = tmp_path / "fencer.yaml"
    conf.write_text(
        yaml.safe_dump(
            {
                "defaults": {"username": ipmi_sim.username},
                "hosts": {
                    HOST: {
                        "ipmi": {
                            "address": "127.0.0.1",
                            "port": ipmi_sim.port,
                            "password": "wrong-sim-pw",
                        }
                    }
                },
                "actuator": {"retries": 2, "retry_backoff": 0.1},
            }
        )
    )
    r = fencer_cli("ipmi", "test", "--host", HOST, "--cluster", "c1", "-c", str(conf))
    assert r.returncode == 1
    assert r.stderr.count("refused the credentials") == 1, r.stderr
    assert "wrong-sim-pw" not in r.stderr + r.stdout
    out = json.loads(r.stdout)
    assert not out["ok"] and "session login" in out["error"]


def test_operators_guide_templates_pass_a_cipher_suite() -> None:
    guide = (ROOT / "docs" / "operators-guide.md").read_text()
    templates = [ln for ln in guide.splitlines() if "-I lanplus" in ln]
    assert templates, "the guide shows ipmitool templates"
    assert all(" -C 17" in ln or " -C 3" in ln for ln in templates), templates


# -- pyghmi's reply race (figures: benchmarks/pyghmi_stall.py) ------------------------------


def test_a_reply_queued_before_the_wait_wakes_it_at_once() -> None:
    # The situation the race leaves: the IO thread already read the reply into the session's
    # queue before the caller registered its wait. pyghmi's own _io_wait would sleep until
    # its timeout (here 30 s, the test's failure); the workaround returns at once.
    assert ipmisession._io_wait is ipmidriver._io_wait_seeing_queued_replies
    addr = ("::ffff:127.0.0.9", 6230, 0, 0)

    class Queued:
        pktqueue = [b"reply"]

    ipmisession.Session.bmc_handlers[addr] = {1: Queued()}
    done = threading.Event()
    try:
        t = threading.Thread(target=lambda: (ipmisession._io_wait(30, addr), done.set()))
        t.start()
        assert done.wait(10), "the wait did not see the queued reply"
    finally:
        ipmisession.Session.bmc_handlers.pop(addr, None)
    t.join(1)


async def test_reply_race_workaround_keeps_every_call_working(sim_bmc: BmcSimulator) -> None:
    driver = IpmiDriver("127.0.0.1", "admin", SecretStr(BMC_PASSWORD), sim_bmc.port, timeout=5)
    try:
        results = [await driver.get_power() for _ in range(30)]
    finally:
        await driver.aclose()
    assert results == ["on"] * 30 and sim_bmc.count("get_power") == 30


# -- the worker's runtime: pre-flight pins, then the actuate path refuses ------------------


async def test_worker_runtime_preflight_pins_then_notices_and_refuses_a_changed_bmc(
    cloud: Cloud, fencer_settings: Any
) -> None:
    from streams.actuating import preflight
    from streams.runtime import Runtime

    with BmcSimulator("admin", BMC_PASSWORD, guid=GUID_A) as bmc:
        base = fencer_settings(isolated_topics=True)
        from fencing.settings import SigningSettings
        from fencing.signing import write_keys_file

        keys = write_keys_file(base.data_dir / "signing.keys", "test")
        settings = make_settings(cloud, bmc.port).model_copy(
            update={
                "kafka": base.kafka,
                "data_dir": base.data_dir,
                "signing": SigningSettings(keys_file=keys),
            }
        )
        runtime = Runtime(settings=settings, started_at=time.time())
        try:
            assert await preflight(runtime) == []  # GUID_A pinned, BMC fine
            pins = await runtime.bmc_pins()
            assert pins.get(cloud.host.uuid).guid == GUID_A
            assert pins.get(cloud.host.uuid).pinned_by == "preflight"

            bmc.guid = GUID_B
            slot = daily_slot(time.monotonic())
            notices = await preflight(runtime)
            slots = {slot, daily_slot(time.monotonic())}
            assert [n.kind for n in notices] == [NoticeKind.BMC_IDENTITY_CHANGED]
            assert GUID_B in (notices[0].reason or "")
            assert notices[0].notice_id in {
                f"{cloud.host.uuid}/bmc-identity/{GUID_B}/{runtime.reminder_tag}/{s}" for s in slots
            }  # the process's tag and its monotonic day, never the wall clock's day

            d = FenceDecision(
                decision_id=str(uuid.uuid4()),
                host=HostRef(host_uuid=cloud.host.uuid, cluster_uuid=cloud.cluster_uuid),
                episode=1,
                action=FenceAction.STOP,
                approved=True,
                evidence=EvidenceSummary(suspect_since=time.time() - 300, stale_checks=3),
                decided_at=time.time(),
            )
            # The actuator as the runtime builds it once a decision passed its last-moment
            # checks (tests/e2e/test_bmc_identity.py plays the whole path with a worker).
            from fencing.actuator import Actuator

            act = Actuator(settings, pins=pins, announce=getattr(pins, "send_notice", None))
            outcome = await act.handle(d)
            assert outcome is not None and not outcome.success
            assert "BMC identity changed" in (outcome.error or "")
            assert bmc.power == "on" and bmc.count("power_off") == 0
            assert not any(c == "declareHostAsDegraded" for c, _ in cloud.cloud.calls)
        finally:
            await runtime.close()
    sent = [n for n in await _notices_on(settings) if n.host.host_uuid == cloud.host.uuid]
    assert [n.kind for n in sent] == [NoticeKind.BMC_IDENTITY_CHANGED]  # from the actuator


async def test_unanswered_guid_read_is_retried_then_the_fence_goes_on(
    sim_bmc: BmcSimulator,
) -> None:
    # The BMC misses the whole first GUID read (5 s call deadline), answers the retry: fenced.
    sim_bmc.pause()
    threading.Timer(6.0, sim_bmc.resume).start()
    pins = MemoryPinStore()
    outcome = await Actuator(settings_for(sim_bmc.port), pins=pins).handle(decision())
    assert outcome is not None and outcome.success and outcome.verified, outcome
    assert outcome.finished_at - outcome.started_at > 5  # the first read did time out
    assert pins.get(HOST) is not None and pins.get(HOST).guid == GUID_A
    assert sim_bmc.power == "off" and sim_bmc.count("power_off") == 1


# -- the identity rules, through the other drivers -----------------------------------------


async def test_redfish_guid_is_the_systems_uuid(redfish: Redfish) -> None:
    driver = RedfishDriver(
        redfish.url,
        redfish.username,
        SecretStr(redfish.password),
        system=redfish.system,
        allow_insecure=True,  # the emulator's plain http on loopback
    )
    try:
        assert await driver.system_guid() == redfish.system.lower()
    finally:
        await driver.aclose()


async def test_command_template_cannot_read_a_guid_and_says_identity_is_unchecked(
    sim_bmc: BmcSimulator,
) -> None:
    settings = IpmiSettings(**ipmitool_template(sim_bmc.port))
    check = await verify_identity(
        HOST, TemplateDriver(settings, "127.0.0.1"), MemoryPinStore(), address="127.0.0.1"
    )
    assert check.ok and check.verdict == "unsupported"
    assert "cannot read a system GUID: identity not checked" in (check.reason or "")


async def test_back_to_the_pinned_board_clears_the_other_guid() -> None:
    pins, fake = MemoryPinStore(), FakeDriver()
    fake.guid = GUID_A
    assert (await verify_identity(HOST, fake, pins, address="10.0.0.1")).verdict == "pinned"
    fake.guid = GUID_B  # the address had a typo: another machine answered
    changed = await verify_identity(HOST, fake, pins, address="10.0.0.2")
    assert changed.verdict == "changed" and not changed.ok
    assert pins.pins[HOST].seen_guid == GUID_B and pins.pins[HOST].seen_address == "10.0.0.2"
    fake.guid = GUID_A  # typo fixed
    back = await verify_identity(HOST, fake, pins, address="10.0.0.1")
    assert back.verdict == "matches" and back.ok
    assert pins.pins[HOST].seen_guid is None and pins.pins[HOST].guid == GUID_A


def test_daily_notice_ids_never_repeat_when_the_wall_clock_steps_back() -> None:
    """BMC_IDENTITY_CHANGED (and PREFLIGHT_FAILED) repeat at most once a day with an id of the
    day: it was the wall clock's day, so a wall clock stepped back a day computed again the id
    sent the day before, which the notify table drops as a duplicate: a day of silence (a week
    back: a week). The day is now of the process's monotonic clock, which never goes back, and
    the id carries the process's tag (another process, a restart: other ids)."""
    check = IdentityCheck(HOST, "changed", guid=GUID_B, reason="BMC identity changed")
    host = HostRef(host_uuid=HOST)
    wall = 1_800_000_000.0
    mono = 5_000.0
    # a day apart on the monotonic clock; before the third, the wall clock was set back a day
    walls = (wall, wall + DAY, wall + DAY)
    ids = []
    for day, at in enumerate(walls):
        n = identity_notice(check, host, at, tag="p1", mono=mono + day * DAY)
        assert n.kind is NoticeKind.BMC_IDENTITY_CHANGED and n.at == at
        ids.append(n.notice_id)
    assert len(set(ids)) == 3, ids  # the wall clock's day: the third repeated the second's
    # within one day of one process: one id (a receiver drops the repeats); another process:
    # another id
    again = identity_notice(check, host, wall + 3600, tag="p1", mono=mono + 2 * DAY + 60)
    assert again.notice_id == ids[2]
    other = identity_notice(check, host, wall, tag="p2", mono=mono)
    assert other.notice_id != ids[0]
    assert daily_slot(DAY - 0.5) == 0 and daily_slot(DAY) == 1


# -- a BMC address that reaches another host's BMC, a BMC off while CloudStack says Up ------

HOST2 = "99999999-8888-7777-6666-555555555555"


def two_hosts_one_bmc(port: int, user: str, password: str, **kw: Any) -> Any:
    """HOST and HOST2 configured with the same BMC address (HOST2's a copy-paste typo)."""
    base = settings_for(port, user, password, **kw)
    return base.model_copy(update={"hosts": {HOST: base.hosts[HOST], HOST2: base.hosts[HOST]}})


def decision_for(host_uuid: str, name: str) -> FenceDecision:
    d = decision()
    return d.model_copy(
        update={
            "decision_id": f"{host_uuid}/1/1",
            "host": HostRef(host_uuid=host_uuid, host_name=name, cluster_uuid="c1"),
        }
    )


async def test_address_of_another_hosts_bmc_is_never_pinned_nor_fenced(
    ipmi_sim: openipmi.IpmiSim,
) -> None:
    settings = two_hosts_one_bmc(ipmi_sim.port, ipmi_sim.username, ipmi_sim.password)
    pins = MemoryPinStore()
    first = await check_host(settings, HOST, None, pins=pins)
    assert first.ok and first.identity == "pinned"

    # The pre-flight of HOST2 reaches HOST's BMC: no pin, not ok, both hosts named.
    typo = await check_host(settings, HOST2, None, pins=pins)
    assert not typo.ok and typo.identity == "elsewhere" and typo.guid == first.guid
    assert HOST in (typo.error or "") and HOST2 in (typo.error or "")
    assert pins.get(HOST2) is None

    # Its first fence: refused before any power command, a BMC_IDENTITY_CHANGED notice.
    notices = Notices()
    outcome = await Actuator(settings, pins=pins, announce=notices).handle(
        decision_for(HOST2, "hv2")
    )
    assert outcome is not None and not outcome.success and not outcome.verified
    assert HOST in (outcome.error or "") and HOST2 in (outcome.error or "")
    assert ipmi_sim.power == "on" and ipmi_sim.power_commands == []
    assert pins.get(HOST2) is None
    assert [n.kind for n in notices.sent] == [NoticeKind.BMC_IDENTITY_CHANGED]
    (n,) = notices.sent
    assert n.host.host_uuid == HOST2 and HOST in (n.reason or "")
    assert ipmi_sim.password not in n.model_dump_json()
    # HOST itself still fences through its own BMC.
    own = await Actuator(settings, pins=pins).handle(decision_for(HOST, "hv1"))
    assert own is not None and own.success and own.verified, own
    assert ipmi_sim.power == "off"
    assert pins.holders(first.guid or "") == [HOST]  # the reverse lookup


async def test_pins_topic_answers_which_hosts_a_guid_is_pinned_for(
    sim_bmc: BmcSimulator, fencer_settings: Any
) -> None:
    settings = two_hosts_one_bmc(
        sim_bmc.port, "admin", BMC_PASSWORD, base=fencer_settings(isolated_topics=True)
    )
    pins = BmcPinStore(settings)
    await pins.start()
    try:
        assert (await check_host(settings, HOST, None, pins=pins)).identity == "pinned"
        outcome = await Actuator(settings, pins=pins, announce=pins.send_notice).handle(
            decision_for(HOST2, "hv2")
        )
        assert outcome is not None and not outcome.success
        assert HOST in (outcome.error or "")
        assert sim_bmc.power == "on" and sim_bmc.count("power_off") == 0
    finally:
        await pins.stop()
    again = BmcPinStore(settings)  # another process: the reverse lookup reads the topic too
    await again.start()
    try:
        assert again.holders(GUID_A) == [HOST] and again.get(HOST2) is None
        assert again.holders(GUID_B) == []
    finally:
        await again.stop()
    sent = [n for n in await _notices_on(settings) if n.host.host_uuid == HOST2]
    assert [n.kind for n in sent] == [NoticeKind.BMC_IDENTITY_CHANGED]
    assert HOST in (sent[0].reason or "") and BMC_PASSWORD not in (sent[0].reason or "")


async def test_operator_pin_refuses_a_guid_pinned_for_another_host(sim_bmc: BmcSimulator) -> None:
    from fencing.identity import pin_current

    settings = two_hosts_one_bmc(sim_bmc.port, "admin", BMC_PASSWORD)
    pins = MemoryPinStore()
    assert (await check_host(settings, HOST, None, pins=pins)).identity == "pinned"
    driver = IpmiDriver("127.0.0.1", "admin", SecretStr(BMC_PASSWORD), sim_bmc.port, timeout=5)
    try:
        with pytest.raises(ValueError, match=f"pinned for another host, {HOST}"):
            await pin_current(HOST2, driver, pins, address="127.0.0.1", by="operator bob")
    finally:
        await driver.aclose()
    assert pins.get(HOST2) is None


@pytest.mark.parametrize("state", ["Up", "Alert", None])
async def test_preflight_does_not_pin_a_bmc_that_is_off_while_cloudstack_shows_the_host_up(
    state: str | None,
) -> None:
    from fencing.preflight import preflight

    with openipmi.IpmiSim(guid=GUID_A, power="off") as sim:
        settings = settings_for(sim.port, sim.username, sim.password)
        pins = MemoryPinStore()
        ref = HostRef(host_uuid=HOST, cluster_uuid="c1")
        states = {HOST: state} if state else None
        (r,) = await preflight(settings, [ref], pins=pins, states=states)
        assert r.power == "off"
        if state == "Up":
            # Its agent is connected, so the host runs: this BMC is not the host's.
            assert not r.ok and r.identity == "refused" and pins.get(HOST) is None
            assert "CloudStack shows the host Up" in (r.error or "")
            assert "off" in (r.error or "") and sim.password not in (r.error or "")
        else:  # the host may really be off: trusted on first use as before
            assert r.ok and r.identity == "pinned" and pins.get(HOST) is not None
        assert sim.power_commands == []


async def test_worker_preflight_tells_of_a_bmc_that_is_off_while_its_host_is_up(
    cloud: Cloud, fencer_settings: Any
) -> None:
    from streams.actuating import preflight
    from streams.runtime import Runtime

    cloud.host.state = "Up"  # the agent is connected
    with BmcSimulator("admin", BMC_PASSWORD, guid=GUID_A, power="off") as bmc:
        from fencing.settings import SigningSettings
        from fencing.signing import write_keys_file

        base = fencer_settings(isolated_topics=True)
        keys = write_keys_file(base.data_dir / "signing.keys", "test")
        settings = make_settings(cloud, bmc.port).model_copy(
            update={
                "kafka": base.kafka,
                "data_dir": base.data_dir,
                "signing": SigningSettings(keys_file=keys),
            }
        )
        runtime = Runtime(settings=settings, started_at=time.time())
        try:
            notices = await preflight(runtime)
            assert [n.kind for n in notices] == [NoticeKind.PREFLIGHT_FAILED]
            assert "CloudStack shows the host Up" in (notices[0].reason or "")
            assert notices[0].host.host_uuid == cloud.host.uuid
            pins = await runtime.bmc_pins()
            assert pins.get(cloud.host.uuid) is None
            assert bmc.count("power_off") == 0 and bmc.power == "off"
            cloud.host.state = "Down"  # CloudStack agrees the host is off: pinned
            assert await preflight(runtime) == []
            assert pins.get(cloud.host.uuid).guid == GUID_A
        finally:
            await runtime.close()


async def test_two_hosts_first_read_through_one_bmc_in_one_preflight_fence_neither() -> None:
    # The first pre-flight of a cloud reads every host at once: two hosts whose addresses reach
    # one BMC both read its GUID; the first to pin only won a race, nothing tells whose address
    # is right. Neither is trusted: both hold the GUID, neither fences, both results say why.
    from fencing.identity import pin_current
    from fencing.preflight import preflight

    with openipmi.IpmiSim(guid=GUID_A) as sim:
        settings = two_hosts_one_bmc(sim.port, sim.username, sim.password)
        pins = MemoryPinStore()
        refs = [HostRef(host_uuid=HOST), HostRef(host_uuid=HOST2)]
        results = await preflight(settings, refs, pins=pins)
        assert [r.identity for r in results] == ["elsewhere", "elsewhere"]
        assert not any(r.ok for r in results)
        for r, other in zip(results, (HOST2, HOST), strict=True):
            assert other in (r.error or "") and sim.password not in (r.error or "")
        guid = results[0].guid or ""
        assert guid and results[1].guid == guid
        assert pins.holders(guid) == sorted([HOST, HOST2])
        assert {pins.get(h).pinned_by for h in (HOST, HOST2)} == {"preflight"}  # type: ignore[union-attr]
        for me in (HOST, HOST2):
            outcome = await Actuator(settings, pins=pins, announce=Notices()).handle(
                decision_for(me, "hv")
            )
            assert outcome is not None and not outcome.success
        assert sim.power == "on" and sim.power_commands == []
        # The next run says the same (a GUID two first reads hold consents for neither).
        again = await preflight(settings, refs, pins=pins)
        assert [r.identity for r in again] == ["elsewhere", "elsewhere"]

        # HOST2's address is corrected (its own BMC, another GUID) and an operator pins it:
        # HOST alone holds the GUID and fences again.
        with openipmi.IpmiSim(guid=GUID_B) as own:
            fixed = settings.model_copy(
                update={
                    "hosts": {
                        **settings.hosts,
                        HOST2: HostSettings(
                            ipmi=IpmiOverrides(
                                address="127.0.0.1",
                                port=own.port,
                                password=SecretStr(own.password),
                            )
                        ),
                    },
                    "defaults": settings.defaults.model_copy(update={"username": own.username}),
                }
            )
            driver = IpmiDriver(
                "127.0.0.1", own.username, SecretStr(own.password), own.port, timeout=5
            )
            try:
                await pin_current(HOST2, driver, pins, address="127.0.0.1", by="operator bob")
            finally:
                await driver.aclose()
            assert pins.holders(guid) == [HOST]
            outcome = await Actuator(fixed, pins=pins, announce=Notices()).handle(
                decision_for(HOST, "hv1")
            )
            assert outcome is not None and outcome.success, outcome.error
            assert sim.power == "off"


async def test_a_host_pinned_on_an_earlier_run_keeps_its_pin_against_a_newcomer() -> None:
    # A host added later with a copy of another host's BMC address is the newcomer: refused,
    # not pinned; the host pinned before keeps fencing through its own BMC.
    from fencing.preflight import preflight

    with openipmi.IpmiSim(guid=GUID_A) as sim:
        settings = two_hosts_one_bmc(sim.port, sim.username, sim.password)
        pins = MemoryPinStore()
        (first,) = await preflight(settings, [HostRef(host_uuid=HOST)], pins=pins)
        assert first.ok and first.identity == "pinned"
        refs = [HostRef(host_uuid=HOST), HostRef(host_uuid=HOST2)]
        results = await preflight(settings, refs, pins=pins)
        assert [r.identity for r in results] == ["matches", "elsewhere"]
        assert results[0].ok and pins.holders(first.guid or "") == [HOST]
        assert pins.get(HOST2) is None


async def test_a_guid_pinned_for_two_hosts_fences_neither(ipmi_sim: openipmi.IpmiSim) -> None:
    # Pins an older fencer left (the second host's first fence pinned the first host's BMC):
    # one of them is wrong, so neither consents until an operator re-pins the wrong one.
    settings = two_hosts_one_bmc(ipmi_sim.port, ipmi_sim.username, ipmi_sim.password)
    pins = MemoryPinStore()
    assert (await check_host(settings, HOST, None, pins=pins)).identity == "pinned"
    first = pins.get(HOST)
    assert first is not None
    await pins.put(first.model_copy(update={"host_uuid": HOST2}))
    for me, other in ((HOST, HOST2), (HOST2, HOST)):
        notices = Notices()
        outcome = await Actuator(settings, pins=pins, announce=notices).handle(
            decision_for(me, "hv")
        )
        assert outcome is not None and not outcome.success
        assert f"pinned for another host, {other}" in (outcome.error or "")
        assert [n.kind for n in notices.sent] == [NoticeKind.BMC_IDENTITY_CHANGED]
    assert ipmi_sim.power == "on" and ipmi_sim.power_commands == []


async def test_boards_that_all_report_one_guid_fence_again_once_a_person_confirms_each_host(
    ipmi_sim: openipmi.IpmiSim,
) -> None:
    """Boards whose GUID is unset (or a vendor's placeholder) all report one GUID: the second
    host's first read is refused as another host's BMC. An operator who confirms it BY NAME
    (--expect, the UI's confirm of the GUID it shows) pins it; once each host holding it was
    confirmed by a person, each consents again (a pin a first read made still does not)."""
    from fencing.identity import pin_current

    settings = two_hosts_one_bmc(ipmi_sim.port, ipmi_sim.username, ipmi_sim.password)
    pins = MemoryPinStore()
    assert (await check_host(settings, HOST, None, pins=pins)).identity == "pinned"
    first = pins.get(HOST)
    assert first is not None and first.pinned_by == "preflight"
    driver = IpmiDriver(
        "127.0.0.1", ipmi_sim.username, SecretStr(ipmi_sim.password), ipmi_sim.port, timeout=5
    )
    try:
        with pytest.raises(ValueError, match=f"--expect {first.guid}"):
            await pin_current(HOST2, driver, pins, address="127.0.0.1", by="operator bob")
        await pin_current(
            HOST2, driver, pins, address="127.0.0.1", by="operator bob", expect=first.guid
        )
    finally:
        await driver.aclose()
    # HOST's pin came from a first read: still not consent while another host holds its GUID
    outcome = await Actuator(settings, pins=pins, announce=Notices()).handle(
        decision_for(HOST, "hv")
    )
    assert outcome is not None and not outcome.success
    assert f"pinned for another host, {HOST2}" in (outcome.error or "")
    assert ipmi_sim.power_commands == []
    # HOST2 was confirmed by a person: its fence goes through the shared GUID
    outcome = await Actuator(settings, pins=pins, announce=Notices()).handle(
        decision_for(HOST2, "hv")
    )
    assert outcome is not None and outcome.success, outcome.error
    assert ipmi_sim.power == "off"


# -- the pre-flight is on by default: hosts are pinned while Up, new ones within minutes ----


def test_preflight_is_on_by_default_and_runs_at_once_then_every_interval() -> None:
    from fencing.preflight import RETRY_AFTER, PreflightSchedule

    interval = FencerSettings().actuator.preflight_interval
    assert interval > 0  # an operator expects it, as CloudStack's own OOBM syncs power
    s = PreflightSchedule(interval)
    assert s.tick <= 5.0
    assert s.due(1000.0) == "all"  # at the first tick as leader, not one interval later
    s.ran("all", 1000.0, [(HOST, "10.0.0.1")])
    assert s.due(1000.0 + s.tick) is None
    assert s.due(1000.0 + s.new_hosts_every) == "new"
    assert s.is_new("other", "10.0.0.2") and not s.is_new(HOST, "10.0.0.1")
    assert s.is_new(HOST, "10.0.0.9")  # its address changed: read again within minutes
    s.ran("new", 1000.0 + s.new_hosts_every, [("other", "10.0.0.2")])
    assert not s.is_new("other", "10.0.0.2")
    assert s.due(1000.0 + s.new_hosts_every + 1) is None
    assert s.due(1000.0 + interval) == "all"
    s.failed(1000.0 + interval)  # listHosts did not answer: not asked again at every tick
    assert s.due(1000.0 + interval + s.tick) is None
    assert s.due(1000.0 + interval + RETRY_AFTER) == "all"
    short = PreflightSchedule(1.0)
    assert short.tick == 1.0 and short.new_hosts_every == 1.0
    with pytest.raises(ValueError, match=r"actuator\.preflight_interval"):
        PreflightSchedule(0)


async def test_worker_preflight_schedule_pins_every_host_at_once_then_new_hosts_only(
    cloud: Cloud, fencer_settings: Any
) -> None:
    """The leader's first run pins every host while it is Up; a later look reads only the host
    that appeared in listHosts since (not every BMC again), and pins it."""
    from fencing.preflight import PreflightSchedule
    from fencing.settings import SigningSettings
    from fencing.signing import write_keys_file
    from streams.actuating import preflight
    from streams.runtime import Runtime

    new_host = str(uuid.uuid4())
    with (
        BmcSimulator("admin", BMC_PASSWORD, guid=GUID_A) as bmc,
        BmcSimulator("admin", BMC_PASSWORD, guid=GUID_B) as bmc_new,
    ):
        base = fencer_settings(isolated_topics=True)
        keys = write_keys_file(base.data_dir / "signing.keys", "test")
        settings = make_settings(cloud, bmc.port)
        hosts = {
            **settings.hosts,
            new_host: HostSettings(
                ipmi=IpmiOverrides(
                    address="127.0.0.1",
                    port=bmc_new.port,
                    username="admin",
                    password=SecretStr(BMC_PASSWORD),
                )
            ),
        }
        settings = settings.model_copy(
            update={
                "kafka": base.kafka,
                "data_dir": base.data_dir,
                "signing": SigningSettings(keys_file=keys),
                "hosts": hosts,
            }
        )
        cloud.host.state = "Up"
        runtime = Runtime(settings=settings, started_at=time.time())
        schedule = PreflightSchedule(3600.0, new_hosts_every=0.5)
        try:
            assert await preflight(runtime, schedule) == []
            pins = await runtime.bmc_pins()
            first = pins.get(cloud.host.uuid)
            assert first is not None and first.guid == GUID_A and first.pinned_by == "preflight"
            reads = bmc.count()
            assert reads > 0 and bmc_new.count() == 0  # not in listHosts yet
            assert await preflight(runtime, schedule) == []  # nothing due yet: no BMC read
            assert bmc.count() == reads

            cluster = cloud.cloud.clusters[cloud.cluster_uuid]
            cloud.cloud.add_host(cluster, "hv3", "10.0.0.13", uuid=new_host)
            await asyncio.sleep(0.6)
            assert await preflight(runtime, schedule) == []
            pin = pins.get(new_host)
            assert pin is not None and pin.guid == GUID_B and pin.pinned_by == "preflight"
            assert bmc.count() == reads  # the pinned host's BMC was not read again
            assert pins.get(cloud.host.uuid) == first
            assert bmc.power == "on" and bmc_new.power == "on"
            assert bmc.count("power_off") == 0 and bmc_new.count("power_off") == 0
        finally:
            await runtime.close()


# -- `fencer ipmi unpin`: the null record, then the next pre-flight pins anew ---------------


async def test_cli_unpin_writes_the_null_record_then_the_next_preflight_pins_anew(
    sim_bmc: BmcSimulator, fencer_settings: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A board moved from a host removed from CloudStack (HOST) to a new one (HOST2): HOST's
    pin holds its GUID, so HOST2's pre-flight refuses it as another host's BMC. `fencer ipmi
    unpin HOST` writes HOST's null record; a running worker's pin store forgets the pin, and
    the next pre-flight pins the board for HOST2."""
    from fencing.settings import SigningSettings
    from fencing.signing import BMC_UNPIN, load_keyring, verify_bytes, write_keys_file

    keys = write_keys_file(tmp_path / "signing.keys", "test")
    settings = two_hosts_one_bmc(
        sim_bmc.port,
        "admin",
        BMC_PASSWORD,
        base=fencer_settings(isolated_topics=True, signing=SigningSettings(keys_file=keys)),
    )
    conf = tmp_path / "fencer.yaml"
    conf.write_text(
        yaml.safe_dump(
            {
                "kafka": settings.kafka.model_dump(mode="json"),
                "signing": {"keys_file": str(keys)},
            }
        )
    )
    worker = BmcPinStore(settings, client_id="test-worker-pins")
    await worker.start()
    try:
        assert (await check_host(settings, HOST, None, pins=worker)).identity == "pinned"
        moved = await check_host(settings, HOST2, None, pins=worker)
        assert not moved.ok and moved.identity == "elsewhere" and HOST in (moved.error or "")

        typo = await asyncio.to_thread(fencer_cli, "ipmi", "unpin", HOST2, "-c", str(conf))
        assert typo.returncode == 1 and typo.stdout == ""
        assert f"BMC pin of host {HOST2} not removed" in typo.stderr
        assert "has no BMC pin" in typo.stderr

        r = await asyncio.to_thread(
            fencer_cli, "ipmi", "unpin", HOST, "--by", "alice", "-c", str(conf)
        )
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["host_uuid"] == HOST and out["removed_guid"] == GUID_A
        assert out["pinned_by"] == "preflight" and out["removed_by"] == "operator alice"
        assert f"host {HOST}: BMC pin removed by operator alice" in r.stderr  # the log says who
        assert BMC_PASSWORD not in r.stderr + r.stdout

        deadline = time.monotonic() + 15
        while worker.get(HOST) is not None:  # the running worker reads the null record
            assert time.monotonic() < deadline, "the worker's pin store kept the removed pin"
            await asyncio.sleep(0.1)
        # the worker's log says whose removal it applied
        assert f"host {HOST}: BMC pin (system GUID {GUID_A}) removed by operator alice" in (
            caplog.text
        )
        again = await check_host(settings, HOST2, None, pins=worker)
        assert again.ok and again.identity == "pinned", again.error
        pin = worker.get(HOST2)
        assert pin is not None and pin.guid == GUID_A and pin.pinned_by == "preflight"
    finally:
        await worker.stop()

    records: list[ConsumerRecord[bytes, bytes]] = []
    reader = TopicReader(settings, [settings.kafka.topics.bmc_pins], records.append)
    await reader.start(10)
    await reader.stop()
    of_host = [r for r in records if r.key == HOST.encode()]
    assert [r.value is None for r in of_host] == [False, True]
    assert [r.value is None for r in records if r.key == HOST2.encode()] == [False]
    # the tombstone carries the signed removal of that pin, and who removed it
    removal = verify_bytes(
        load_keyring(settings), BMC_UNPIN, dict(of_host[1].headers)["fencer-unpin"]
    )
    assert removal["guid"] == GUID_A and removal["removed_by"] == "operator alice"
    assert sim_bmc.count("power_off") == 0 and sim_bmc.power == "on"


# -- signed pins: a record fencer's keys did not sign is never a pin -------------------------


def signed_settings(base: FencerSettings, tmp_path: Path, *ports: int) -> FencerSettings:
    """HOST (and HOST2) fenced through the lab BMCs on `ports`, with the signing keys."""
    from fencing.settings import SigningSettings
    from fencing.signing import write_keys_file

    keys = write_keys_file(tmp_path / "signing.keys", "test")
    settings = settings_for(
        ports[0], base=base.model_copy(update={"signing": SigningSettings(keys_file=keys)})
    )
    hosts = {
        h: HostSettings(
            ipmi=IpmiOverrides(address="127.0.0.1", port=port, password=SecretStr(BMC_PASSWORD))
        )
        for h, port in zip((HOST, HOST2), ports, strict=False)
    }
    return settings.model_copy(update={"hosts": hosts})


async def _raw_send(settings: FencerSettings, key: str, value: bytes | None) -> None:
    """Write a record on bmc-pins as anyone with write access could, without fencer's keys."""
    from aiokafka import AIOKafkaProducer

    from streams.kafka import aiokafka_kwargs

    producer = AIOKafkaProducer(acks="all", **aiokafka_kwargs(settings))
    await producer.start()
    try:
        await producer.send_and_wait(settings.kafka.topics.bmc_pins, key=key.encode(), value=value)
    finally:
        await producer.stop()


async def _until(what: str, predicate: Any, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_pins_are_signed_and_a_record_fencer_did_not_sign_is_never_a_pin(
    sim_bmc: BmcSimulator, fencer_settings: Any, tmp_path: Path
) -> None:
    from fencing.signing import BMC_PIN, load_keyring, parse_keys, sign, verify_bytes

    settings = signed_settings(fencer_settings(isolated_topics=True), tmp_path, sim_bmc.port)
    worker = BmcPinStore(settings, client_id="test-worker-pins")
    await worker.start()
    try:
        assert (await check_host(settings, HOST, None, pins=worker)).identity == "pinned"
        pinned = worker.get(HOST)
        assert pinned is not None and pinned.guid == GUID_A

        # Unsigned, naming another board and a person: not a pin, the signed one stays.
        forged = pinned.model_copy(update={"guid": GUID_B, "pinned_by": "operator mallory"})
        await _raw_send(settings, HOST, forged.model_dump_json().encode())
        # Signed with keys fencer does not hold (twice): ignored, told once for the host.
        other = parse_keys("mallory " + "m" * 40, "test")
        alien = sign(other, BMC_PIN, forged.model_dump(mode="json") | {"host_uuid": HOST2})
        for _ in range(2):
            await _raw_send(settings, HOST2, json.dumps(alien).encode())
        # A genuine signed pin of HOST written under HOST2's key: signed for another host.
        records: list[ConsumerRecord[bytes, bytes]] = []
        reader = TopicReader(settings, [settings.kafka.topics.bmc_pins], records.append)
        await reader.start(10)
        await reader.stop()
        genuine = next(r for r in records if r.key == HOST.encode() and r.value)
        assert verify_bytes(load_keyring(settings), BMC_PIN, genuine.value)["guid"] == GUID_A
        await _raw_send(settings, HOST2, genuine.value)
        # A bare tombstone (no signed removal): removes nothing.
        await _raw_send(settings, HOST, None)

        await _until(
            "the worker to read the records",
            lambda: worker.ignored.get(HOST) == 2 and worker.ignored.get(HOST2) == 3,
        )
        assert worker.get(HOST) == pinned and worker.get(HOST2) is None
        assert worker.holders(GUID_B) == [] and worker.holders(GUID_A) == [HOST]

        fresh = BmcPinStore(settings, client_id="test-fresh-pins", tell_forged=False)
        await fresh.start()  # a worker started later reads the same pins
        try:
            assert fresh.get(HOST) == pinned and fresh.get(HOST2) is None
        finally:
            await fresh.stop()
        outcome = await Actuator(settings, pins=worker, announce=Notices()).handle(decision())
        assert outcome is not None and outcome.success, outcome.error  # through GUID_A
    finally:
        await worker.stop()
    forged_notices = [n for n in await _notices_on(settings) if n.kind is NoticeKind.FORGED_RECORD]
    assert sorted(n.host.host_uuid for n in forged_notices) == sorted([HOST, HOST2])
    (bare,) = [n for n in forged_notices if n.host.host_uuid == HOST]
    assert "bare tombstone" in (bare.reason or "")
    (alien_notice,) = [n for n in forged_notices if n.host.host_uuid == HOST2]
    assert "unknown key id 'mallory'" in (alien_notice.reason or "")


async def test_upgrade_from_unsigned_pins_repins_the_same_board_never_a_changed_one(
    sim_bmc: BmcSimulator, fencer_settings: Any, tmp_path: Path
) -> None:
    """Pins an older fencer wrote unsigned: the first pre-flight after the upgrade pins a host
    anew (signed, as a first read: never as the person the record names) only when its BMC
    reports the GUID the record names; a board changed meanwhile is refused until an operator
    pins it, and its GUID stays held against other hosts meanwhile."""
    from fencing.identity import pin_current

    with BmcSimulator("admin", BMC_PASSWORD, guid=GUID_B) as changed:
        settings = signed_settings(
            fencer_settings(isolated_topics=True), tmp_path, sim_bmc.port, changed.port
        )
        old = BmcPinStore(settings, client_id="old-fencer", keyring=None)  # before signing
        await old.start()
        try:
            for host, guid in ((HOST, GUID_A), (HOST2, "6a8c1f33-0000-4000-8000-00000000c0de")):
                await old.put(
                    BmcPin(
                        host_uuid=host,
                        guid=guid,
                        address="127.0.0.1",
                        driver="ipmi",
                        pinned_at=1.0,
                        pinned_by="operator bob",
                    )
                )
        finally:
            await old.stop()

        worker = BmcPinStore(settings, client_id="test-worker-pins")
        await worker.start()
        try:
            assert worker.get(HOST) is None and worker.get(HOST2) is None
            assert worker.unsigned(HOST) is not None
            assert worker.holders("6a8c1f33-0000-4000-8000-00000000c0de") == [HOST2]

            same = await check_host(settings, HOST, None, pins=worker, cloud_state="Up")
            assert same.ok and same.identity == "pinned"
            pin = worker.get(HOST)
            assert pin is not None and pin.guid == GUID_A
            assert pin.pinned_by == "preflight"  # a first read, never "operator bob"

            moved = await check_host(settings, HOST2, None, pins=worker, cloud_state="Up")
            assert not moved.ok and moved.identity == "changed" and moved.guid == GUID_B
            assert "did not sign" in (moved.error or "") and worker.get(HOST2) is None
            asked = changed.count("get_power")
            notices = Notices()
            d2 = decision_for(HOST2, "hv2")
            outcome = await Actuator(settings, pins=worker, announce=notices).handle(d2)
            assert outcome is not None and not outcome.success
            assert "did not sign" in (outcome.error or "")
            assert [n.kind for n in notices.sent] == [NoticeKind.BMC_IDENTITY_CHANGED]
            assert changed.power == "on" and changed.count("power_off") == 0
            assert changed.count("get_power") == asked  # the fence read no power

            driver = IpmiDriver(
                "127.0.0.1", "admin", SecretStr(BMC_PASSWORD), changed.port, timeout=5
            )
            try:  # the operator checked the machine and confirms the new board
                await pin_current(HOST2, driver, worker, address="127.0.0.1", by="operator al")
            finally:
                await driver.aclose()
            assert worker.get(HOST2) is not None and worker.unsigned(HOST2) is None
            again = await check_host(settings, HOST2, None, pins=worker)
            assert again.ok and again.identity == "matches"
        finally:
            await worker.stop()


def test_cli_pin_and_unpin_refuse_without_the_signing_keys(
    sim_bmc: BmcSimulator, fencer_settings: Any, tmp_path: Path
) -> None:
    # The workers ignore a pin their keys did not sign: writing one would only look done.
    settings = fencer_settings(isolated_topics=True)
    conf = tmp_path / "fencer.yaml"
    conf.write_text(yaml.safe_dump({"kafka": settings.kafka.model_dump(mode="json")}))
    for argv in (("pin", HOST, "--cluster", "c1"), ("unpin", HOST)):
        r = fencer_cli("ipmi", *argv, "-c", str(conf))
        assert r.returncode == 1 and r.stdout == "", r.stderr
        assert "signing.keys_file (or signing.keys) is not set" in r.stderr
    assert sim_bmc.count() == 0


async def test_worker_preflight_reads_a_silent_bmc_again_before_telling(
    cloud: Cloud, fencer_settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Rule 5, retries then notifies: a BMC that does not answer the pre-flight is read again
    a little later; only one that fails again is told (PREFLIGHT_FAILED)."""
    import logging

    from fencing.settings import SigningSettings
    from fencing.signing import write_keys_file
    from streams.actuating import preflight
    from streams.runtime import Runtime

    caplog.set_level(logging.INFO, logger="fencer.streams")
    with BmcSimulator("admin", BMC_PASSWORD, guid=GUID_A) as bmc:
        base = fencer_settings(isolated_topics=True)
        keys = write_keys_file(base.data_dir / "signing.keys", "test")
        settings = make_settings(cloud, bmc.port).model_copy(
            update={
                "kafka": base.kafka,
                "data_dir": base.data_dir,
                "signing": SigningSettings(keys_file=keys),
            }
        )
        runtime = Runtime(settings=settings, started_at=time.time())
        try:
            bmc.pause()  # busy, or a lost packet: the first read gets no answer
            run = asyncio.create_task(preflight(runtime, retry_after=10.0))
            await _until(
                "the pre-flight to read it again", lambda: "read again in" in caplog.text, 30
            )
            bmc.resume()
            assert await asyncio.wait_for(run, 60) == []  # answered the second time: no notice
            pins = await runtime.bmc_pins()
            assert pins.get(cloud.host.uuid).guid == GUID_A

            bmc.pause()  # silent for good: told after the second read
            notices = await preflight(runtime, retry_after=0.5)
            assert [n.kind for n in notices] == [NoticeKind.PREFLIGHT_FAILED]
            assert caplog.text.count("read again in") == 2
        finally:
            bmc.resume()
            await runtime.close()
