"""Drivers and engine against real peers on loopback: the lab's pyghmi BMC (pyghmi client),
Debian's ipmitool through the command template, sushy-tools' Redfish emulator; the engine's
rules against the shipped fake driver."""

from __future__ import annotations

import asyncio
import json
import stat
import sys
import time
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from pyghmi.ipmi.private import session as ipmisession

from fencing.drivers.base import (
    BmcAuthError,
    BmcUnreachable,
    DriverConfigError,
    DriverError,
    PowerDriver,
)
from fencing.drivers.fake import FakeDriver
from fencing.drivers.ipmi import IpmiDriver
from fencing.drivers.redfish import RedfishDriver
from fencing.drivers.template import TemplateDriver, render
from fencing.engine import Engine
from fencing.events import FenceAction
from fencing.redaction import MASK
from fencing.settings import IpmiSettings
from lab.bmc import BmcSimulator

from .conftest import BMC_PASSWORD, Redfish, ipmitool_template

pytestmark = pytest.mark.timeout(60)


def ipmi(sim: BmcSimulator, password: str = BMC_PASSWORD, timeout: float = 10) -> IpmiDriver:
    return IpmiDriver("127.0.0.1", "admin", SecretStr(password), sim.port, timeout=timeout)


# -- native IPMI (pyghmi) --------------------------------------------------------------------


async def test_ipmi_driver_reads_and_sets_power_and_identify(bmc: BmcSimulator) -> None:
    d = ipmi(bmc)
    assert isinstance(d, PowerDriver)
    assert await d.get_power() == "on"
    await d.set_power("off")
    assert await d.get_power() == "off"
    assert bmc.power == "off"
    await d.set_power("on")
    await d.identify(True)
    assert bmc.identify == "on"
    await d.identify(False)
    assert bmc.identify == "off"
    assert await d.test() == "Chassis Power is on"
    await d.aclose()
    assert bmc.count("power_off") == 1 and bmc.count("power_on") == 1


async def test_second_command_for_the_same_bmc_does_not_hang(bmc: BmcSimulator) -> None:
    # pyghmi leaves a finished login in Session.initting_sessions (str key, bytes delete); a
    # second Command for the same BMC and credentials would join it and wait forever.
    key = ("127.0.0.1", "admin", BMC_PASSWORD, bmc.port, None)
    for expected in ("on", "off", "on"):
        # A driver that joined the finished login would wait its whole 20 s and fail; a working
        # one needs well under a second, and the 8 s bound leaves room for a loaded CI machine.
        d = ipmi(bmc, timeout=20)
        started = time.monotonic()
        assert await d.get_power() == expected
        await d.set_power("off" if expected == "on" else "on")
        await d.aclose()
        assert time.monotonic() - started < 8
        assert key in ipmisession.Session.initting_sessions  # the defect is still there...
    assert bmc.count("power_off") == 2  # ...and the driver still got through every time


async def test_ipmi_wrong_password_is_an_auth_error_without_the_password(
    bmc: BmcSimulator,
) -> None:
    d = ipmi(bmc, password="not-the-password")
    with pytest.raises(BmcAuthError) as e:
        await d.get_power()
    assert "not-the-password" not in str(e.value)
    assert bmc.count("get_power") == 0


async def test_ipmi_unknown_user_is_an_auth_error(bmc: BmcSimulator) -> None:
    d = IpmiDriver("127.0.0.1", "mallory", SecretStr(BMC_PASSWORD), bmc.port, timeout=5)
    with pytest.raises(BmcAuthError):
        await d.get_power()


async def test_ipmi_dead_bmc_is_unreachable_within_the_deadline(bmc: BmcSimulator) -> None:
    bmc.pause()
    d = ipmi(bmc, timeout=2)
    started = time.monotonic()
    with pytest.raises(BmcUnreachable):
        await d.get_power()
    # 2 s and room for a loaded CI machine: far below pyghmi's own 40 s of retries
    assert time.monotonic() - started < 10
    bmc.resume()
    d2 = ipmi(bmc)
    assert await d2.get_power() == "on"
    await d2.aclose()


async def test_a_bmc_that_dies_mid_session_neither_freezes_the_loop_nor_the_next_driver(
    bmc: BmcSimulator,
) -> None:
    # pyghmi shares one session per BMC and user between drivers, and its own way to end a
    # session sends a logout through the lock a stuck call holds: giving up on a call froze the
    # event loop, and the next driver after the BMC came back queued behind the stuck thread.
    d = ipmi(bmc, timeout=1)
    assert await d.get_power() == "on"  # logged in: the session exists
    bmc.pause()
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.1)  # the ticker beats before the first call (or it misses its stall)
    try:
        started = time.monotonic()
        with pytest.raises(BmcUnreachable):
            await d.set_power("off")  # sent into the void: no reply, the call is abandoned
        with pytest.raises(BmcUnreachable):
            await d.get_power()  # again, on a new login that cannot finish
        await d.aclose()
        # two 1 s deadlines and a 1 s logout, and room for a loaded CI machine: far below
        # pyghmi's own 40 s of retries
        assert time.monotonic() - started < 12
        # the 50 ms ticker went on; a loaded CI machine has been seen to pause a healthy loop
        # for about 1 s, a frozen one waits on pyghmi's lock for seconds
        assert max(gaps) < 1.5, f"the event loop stalled {max(gaps):.2f} s"
    finally:
        tick.cancel()
    bmc.resume()
    d2 = ipmi(bmc, timeout=5)
    started = time.monotonic()
    assert await d2.get_power() == "on"
    await d2.set_power("off")
    assert await d2.get_power() == "off"
    await d2.aclose()
    assert time.monotonic() - started < 10  # not behind pyghmi's 40 s of retries
    assert bmc.count("power_off") == 1  # the abandoned power-off was never sent later


# -- command template (Debian's ipmitool against the simulator) ------------------------------


async def test_ipmitool_template_powers_off_and_reads_state(bmc: BmcSimulator) -> None:
    d = TemplateDriver(IpmiSettings(**ipmitool_template(bmc.port)), "127.0.0.1", timeout=15)
    assert await d.get_power() == "on"
    await d.set_power("off")
    assert bmc.power == "off"
    assert await d.get_power() == "off"
    assert await d.test() == "Chassis Power is off"
    await d.identify(True)
    assert bmc.identify == "on"
    # env mode: the password is nowhere in argv
    assert BMC_PASSWORD not in d.render("off").argv
    assert d.last is not None and BMC_PASSWORD not in " ".join(d.last.redacted_argv)


async def test_ipmitool_template_password_file_mode(bmc: BmcSimulator) -> None:
    fields = ipmitool_template(
        bmc.port,
        password_via="file",
        execution_syntax=(
            "$IPMI_EXEC -I lanplus -R 1 -N 1 -H $IPMI_HOST -p $IPMI_PORT -U $IPMI_USERNAME "
            "-f $IPMI_PASSWORD_FILE chassis $IPMI_ACTION"
        ),
    )
    d = TemplateDriver(IpmiSettings(**fields), "127.0.0.1", timeout=15)
    assert await d.get_power() == "on"
    assert d.last is not None
    pwfile = d.last.redacted_argv[d.last.redacted_argv.index("-f") + 1]
    assert not Path(pwfile).exists()  # removed after the run


async def test_ipmitool_wrong_password_fails_and_hides_it(bmc: BmcSimulator) -> None:
    fields = ipmitool_template(bmc.port, password="wrong; rm -rf /", password_via="argv")
    fields["execution_syntax"] = fields["execution_syntax"].replace("-E", "-P $IPMI_PASSWORD")
    d = TemplateDriver(IpmiSettings(**fields), "127.0.0.1", timeout=15)
    with pytest.raises(DriverError) as e:
        await d.get_power()
    assert "wrong; rm -rf /" not in str(e.value)
    assert "ipmitool exited 1" in str(e.value)
    assert d.render("test").redacted_argv[d.render("test").redacted_argv.index("-P") + 1] == MASK
    assert bmc.power == "on"


def _argv_printer(tmp_path: Path) -> Path:
    script = tmp_path / "print-argv"
    script.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'pw': os.environ.get('IPMI_PASSWORD')}))\n"
        "print('Chassis Power is on')\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


async def test_template_values_with_shell_syntax_stay_one_argument(tmp_path: Path) -> None:
    evil = "; rm -rf / #"
    canary = tmp_path / "canary"
    canary.write_text("still here")
    settings = IpmiSettings(
        driver="template",
        exec=str(_argv_printer(tmp_path)),
        username=f"admin{evil}",
        password=SecretStr(f"pw $(touch {canary}.pwned) {evil}"),
        execution_syntax=(
            "$IPMI_EXEC --username $IPMI_USERNAME --password $IPMI_PASSWORD "
            "--command $IPMI_ACTION --host $IPMI_HOST"
        ),
        action_test="power status",
    )
    d = TemplateDriver(settings, f"bmc.example{evil}")
    await d.test()
    assert d.last is not None
    printed = json.loads(d.last.stdout.splitlines()[0])
    assert printed["argv"] == [
        "--username",
        f"admin{evil}",
        "--password",
        f"pw $(touch {canary}.pwned) {evil}",
        "--command",
        "power",
        "status",  # $IPMI_ACTION alone expands to the action's words
        "--host",
        f"bmc.example{evil}",
    ]
    assert canary.read_text() == "still here"
    assert not Path(f"{canary}.pwned").exists()
    assert MASK in d.last.redacted_argv and "pw $(touch" not in " ".join(d.last.redacted_argv)


def test_template_variables_match_the_feature_design_spelling() -> None:
    s = IpmiSettings(
        driver="template",
        exec="tool",
        username="u",
        password=SecretStr("p"),
        execution_syntax="$IPMI_EXEC --username $IPMI_Username --password $IPMI_password "
        "--command=$IPMI_ACTION --host $IPMI_HOST",
        action_stop="power off",
    )
    r = render(s, "10.0.0.9", "off")
    assert r.argv == [
        "tool",
        "--username",
        "u",
        "--password",
        "p",
        "--command=power off",
        "--host",
        "10.0.0.9",
    ]
    assert r.redacted_argv[4] == MASK


def test_template_refuses_password_in_argv_when_env_is_configured() -> None:
    s = IpmiSettings(driver="template", password_via="env", password=SecretStr("p"))
    with pytest.raises(DriverConfigError, match="password_via"):
        render(s, "h", "off")


async def test_template_env_mode_hands_the_password_in_the_environment(tmp_path: Path) -> None:
    s = IpmiSettings(
        driver="template",
        exec=str(_argv_printer(tmp_path)),
        password=SecretStr("env-secret"),
        password_via="env",
        execution_syntax="$IPMI_EXEC -E $IPMI_ACTION",
    )
    d = TemplateDriver(s, "h")
    await d.test()
    assert d.last is not None
    assert json.loads(d.last.stdout.splitlines()[0]) == {
        "argv": ["-E", "power", "status"],
        "pw": "env-secret",
    }


# -- Redfish (sushy-tools emulator) ----------------------------------------------------------


def redfish_driver(rf: Redfish, password: str | None = None) -> RedfishDriver:
    # The emulator speaks plain http on loopback: allowed here as the file would allow it.
    return RedfishDriver(
        rf.url, rf.username, SecretStr(password or rf.password), timeout=5, allow_insecure=True
    )


async def test_redfish_force_off_then_poll_until_off(redfish: Redfish) -> None:
    d = redfish_driver(redfish)
    assert await d.get_power() == "on"
    result = await Engine(power_timeout=20, poll_interval=0.3).run("hv1", d, FenceAction.STOP)
    assert result.success and result.verified, result.error
    assert result.power_after == "off"
    body = httpx.get(
        f"{redfish.url}/redfish/v1/Systems/{redfish.system}",
        auth=(redfish.username, redfish.password),
    ).json()
    assert body["PowerState"] == "Off"


async def test_redfish_blink_and_wrong_password(redfish: Redfish) -> None:
    d = redfish_driver(redfish)
    await d.identify(True)
    body = httpx.get(
        f"{redfish.url}/redfish/v1/Systems/{redfish.system}",
        auth=(redfish.username, redfish.password),
    ).json()
    assert body["IndicatorLED"] == "Blinking"
    await d.aclose()
    bad = redfish_driver(redfish, password="nope")
    with pytest.raises(BmcAuthError):
        await bad.get_power()
    await bad.aclose()


async def test_redfish_closed_port_is_unreachable() -> None:
    d = RedfishDriver("https://127.0.0.1:1", "a", SecretStr("b"), timeout=2)
    with pytest.raises(BmcUnreachable):
        await d.get_power()
    await d.aclose()


# -- the engine's rules, on the fake driver ----------------------------------------------------


async def test_engine_stop_polls_until_off() -> None:
    d = FakeDriver(settle_polls=2)
    r = await Engine(power_timeout=5, poll_interval=0.01).run("h", d, FenceAction.STOP)
    assert (r.success, r.verified, r.power_before, r.power_after) == (True, True, "on", "off")
    assert d.calls == ["get_power", "set_power:off", "get_power", "get_power", "get_power"]
    assert d.closed


async def test_engine_already_off_sends_nothing() -> None:
    d = FakeDriver(power="off")
    r = await Engine().run("h", d, FenceAction.STOP)
    assert (r.success, r.verified, r.detail) == (True, True, "already off")
    assert d.calls == ["get_power"]


async def test_engine_power_that_never_drops_is_a_failure() -> None:
    d = FakeDriver()
    d.ignore_off = True
    r = await Engine(power_timeout=0.2, poll_interval=0.05, retries=1, retry_backoff=0).run(
        "h", d, FenceAction.STOP
    )
    assert not r.success and not r.verified
    assert r.attempts == 2 and "did not read off" in (r.error or "")
    assert r.power_after == "on"


async def test_engine_retries_unreachable_but_not_auth() -> None:
    flaky = FakeDriver(fail_first=2)
    r = await Engine(retries=2, retry_backoff=0.01).run("h", flaky, FenceAction.STOP)
    assert r.success and r.attempts == 3
    locked = FakeDriver()
    locked.wrong_password = True
    r2 = await Engine(retries=5, retry_backoff=0.01).run("h", locked, FenceAction.STOP)
    assert not r2.success and r2.attempts == 1


async def test_engine_scrubs_secrets_from_errors() -> None:
    class Leaky(FakeDriver):
        async def get_power(self):  # type: ignore[override]
            raise RuntimeError("login failed for admin:hunter2 at bmc")

    r = await Engine(retries=0).run("h", Leaky(), FenceAction.STOP, secrets=["hunter2"])
    assert not r.success
    assert r.error == f"RuntimeError: login failed for admin:{MASK} at bmc"


async def test_engine_reboot_sees_off_then_on_and_blink_and_nothing() -> None:
    d = FakeDriver()
    r = await Engine(poll_interval=0.01).run("h", d, FenceAction.REBOOT)
    assert r.success and r.verified and r.power_after == "on"
    assert d.calls == ["get_power", "set_power:off", "get_power", "set_power:on", "get_power"]
    b = FakeDriver()
    rb = await Engine().run("h", b, FenceAction.BLINK)
    assert rb.success and not rb.verified and b.identify_on and b.power == "on"
    n = FakeDriver()
    rn = await Engine().run("h", n, FenceAction.NOTHING)
    assert rn.success and n.calls == []


async def test_engine_reboot_cycle_method_on_the_simulator(bmc: BmcSimulator) -> None:
    r = await Engine(reboot_method="cycle", poll_interval=0.05).run(
        "h", ipmi(bmc), FenceAction.REBOOT
    )
    assert r.success and r.verified and r.power_after == "on"
    assert bmc.resets == 1 and bmc.count("power_off") == 0
