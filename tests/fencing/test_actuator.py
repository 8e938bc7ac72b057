"""The actuator end to end on loopback: decisions in, the lab's pyghmi BMC (and ipmitool through
the command template) fenced and verified, CloudStack's simulator told to restart the VMs."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from fencing.actuator import Actuator, preflight
from fencing.events import FenceAction
from fencing.records import EvidenceSummary, FenceDecision, HostRef
from fencing.settings import (
    ActuatorSettings,
    CloudStackSettings,
    FencerSettings,
    HostSettings,
    IpmiOverrides,
)
from lab.bmc import BmcSimulator, free_udp_port
from streams.ipmi_cli import cli_ipmi_test

from .conftest import BMC_PASSWORD, Cloud, ipmitool_template

pytestmark = pytest.mark.timeout(60)


def make_settings(cloud: Cloud, port: int, **ipmi: Any) -> FencerSettings:
    fields: dict[str, Any] = {
        "address": "127.0.0.1",
        "port": port,
        "username": "admin",
        "password": SecretStr(BMC_PASSWORD),
        "action": "stop",
    }
    fields.update(ipmi)
    return FencerSettings(
        cloudstack=CloudStackSettings(
            endpoint=cloud.sim.url,
            api_key=SecretStr(cloud.sim.api_key),
            secret_key=SecretStr(cloud.sim.secret_key),
            job_timeout=10,
        ),
        hosts={cloud.host.uuid: HostSettings(ipmi=IpmiOverrides(**fields))},
        actuator=ActuatorSettings(power_timeout=5, poll_interval=0.05, retries=0, fence_deadline=6),
    )


def decision(cloud: Cloud, action: FenceAction = FenceAction.STOP, **kw: Any) -> FenceDecision:
    fields: dict[str, Any] = {
        "decision_id": str(uuid.uuid4()),
        "host": HostRef(host_uuid=cloud.host.uuid, cluster_uuid=cloud.cluster_uuid),
        "episode": 1,
        "action": action,
        "approved": True,
        "evidence": EvidenceSummary(suspect_since=time.time() - 300, stale_checks=3),
        "decided_at": time.time(),
    }
    fields.update(kw)
    return FenceDecision(**fields)


def actuator(settings: FencerSettings) -> Actuator:
    return Actuator(settings, job_poll_interval=0.05)


def restart_calls(cloud: Cloud) -> list[str]:
    return [
        c
        for c, _ in cloud.cloud.calls
        if c in ("declareHostAsDegraded", "prepareHostForMaintenance")
    ]


async def test_stop_is_verified_then_cloudstack_restarts_the_vms(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    out = await actuator(make_settings(cloud, bmc.port)).handle(decision(cloud))
    assert out is not None
    assert (out.success, out.verified, out.power_before, out.power_after) == (
        True,
        True,
        "on",
        "off",
    )
    assert out.driver == "ipmi" and out.error is None
    assert out.cloudstack_call == "declareHostAsDegraded"
    assert out.cloudstack_result == "succeeded" and out.cloudstack_job in cloud.cloud.jobs
    assert bmc.power == "off" and bmc.count("power_off") == 1
    assert cloud.cloud.hosts[cloud.host.uuid].resourcestate == "Degraded"
    assert cloud.cloud.vms[cloud.vm_uuid].host_uuid != cloud.host.uuid
    assert BMC_PASSWORD not in out.model_dump_json()


async def test_already_off_is_fenced_without_a_power_command(cloud: Cloud) -> None:
    with BmcSimulator("admin", BMC_PASSWORD, power="off") as bmc:
        out = await actuator(make_settings(cloud, bmc.port)).handle(decision(cloud))
        assert out is not None and out.success and out.verified
        assert out.power_before == "off" and out.power_after == "off"
        assert bmc.count("power_off") == 0 and bmc.count("power_shutdown") == 0
    assert restart_calls(cloud) == ["declareHostAsDegraded"]


async def test_unreachable_bmc_fails_and_vms_are_not_restarted(cloud: Cloud) -> None:
    out = await actuator(make_settings(cloud, free_udp_port())).handle(decision(cloud))
    assert out is not None
    assert not out.success and not out.verified
    assert "no answer" in (out.error or "")
    assert out.cloudstack_call is None and restart_calls(cloud) == []
    assert cloud.cloud.vms[cloud.vm_uuid].host_uuid == cloud.host.uuid


async def test_wrong_password_fails_fast_and_never_shows_it(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    settings = make_settings(cloud, bmc.port, password=SecretStr("Wr0ng-pass"))
    started = time.monotonic()
    out = await actuator(settings).handle(decision(cloud))
    assert out is not None and not out.success
    assert out.attempts == 1  # a refusal is not retried ...
    assert time.monotonic() - started < 5  # ... nor waited on up to the 6 s fence deadline
    assert "refused the credentials" in (out.error or "")
    assert "Wr0ng-pass" not in out.model_dump_json()
    assert restart_calls(cloud) == [] and bmc.power == "on"


async def test_reboot_through_ipmitool_template(cloud: Cloud, bmc: BmcSimulator) -> None:
    fields = ipmitool_template(bmc.port)
    del fields["port"]
    settings = make_settings(cloud, bmc.port, **fields)
    out = await actuator(settings).handle(decision(cloud, FenceAction.REBOOT))
    assert out is not None and out.success and out.verified, out.error
    assert out.driver == "template"
    assert (out.power_before, out.power_after) == ("on", "on")
    assert bmc.count("power_off") == 1 and bmc.count("power_on") == 1
    assert restart_calls(cloud) == ["declareHostAsDegraded"]


async def test_power_change_callback_lets_the_lab_stop_the_host(cloud: Cloud) -> None:
    seen: list[tuple[str, str]] = []
    with BmcSimulator("admin", BMC_PASSWORD, on_power_change=lambda s, c: seen.append((s, c))) as b:
        out = await actuator(make_settings(cloud, b.port)).handle(decision(cloud))
        assert out is not None and out.success
        assert b.power == "off"
    assert seen == [("off", "off")]


async def test_blink_lights_the_led_and_does_not_restart_vms(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    out = await actuator(make_settings(cloud, bmc.port)).handle(decision(cloud, FenceAction.BLINK))
    assert out is not None and out.success and not out.verified
    assert bmc.identify == "on" and bmc.power == "on"
    assert out.cloudstack_call is None and restart_calls(cloud) == []


async def test_blink_restarts_vms_only_when_the_cluster_allows_it(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    settings = make_settings(
        cloud, bmc.port, restart_without_fence=True, restart_via="prepareHostForMaintenance"
    )
    out = await actuator(settings).handle(decision(cloud, FenceAction.BLINK))
    assert out is not None and out.success
    assert out.cloudstack_call == "prepareHostForMaintenance"
    assert cloud.cloud.hosts[cloud.host.uuid].resourcestate == "Maintenance"


async def test_nothing_touches_neither_bmc_nor_cloudstack(cloud: Cloud, bmc: BmcSimulator) -> None:
    out = await actuator(make_settings(cloud, bmc.port)).handle(
        decision(cloud, FenceAction.NOTHING)
    )
    assert out is not None and out.success and out.power_before is None
    assert bmc.count() == 0 and restart_calls(cloud) == []


async def test_withheld_decision_is_skipped(cloud: Cloud, bmc: BmcSimulator) -> None:
    out = await actuator(make_settings(cloud, bmc.port)).handle(
        decision(cloud, approved=False, withheld_reason="cap_reached")
    )
    assert out is None and bmc.count() == 0


async def test_two_decisions_for_one_host_never_act_at_once(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    act = actuator(make_settings(cloud, bmc.port))
    a, b = await asyncio.gather(act.handle(decision(cloud)), act.handle(decision(cloud)))
    assert a is not None and b is not None and a.success and b.success
    assert sorted([a.power_before, b.power_before]) == ["off", "on"]
    assert bmc.count("power_off") == 1
    first, second = sorted([a, b], key=lambda o: o.started_at)
    assert second.started_at >= first.finished_at
    assert second.cloudstack_result is not None
    assert second.cloudstack_result.startswith("already done")


async def test_cloudstack_job_failure_is_reported(cloud: Cloud, bmc: BmcSimulator) -> None:
    cloud.cloud.fail_jobs["declareHostAsDegraded"] = "HA is disabled for this host"
    out = await actuator(make_settings(cloud, bmc.port)).handle(decision(cloud))
    assert out is not None
    assert out.verified and not out.success
    assert out.cloudstack_job and "HA is disabled for this host" in (out.cloudstack_result or "")
    assert "declareHostAsDegraded failed" in (out.error or "")


async def test_cloudstack_refusing_the_call_is_reported(cloud: Cloud, bmc: BmcSimulator) -> None:
    settings = make_settings(cloud, bmc.port)
    settings.cloudstack.secret_key = SecretStr("not-the-secret")
    out = await actuator(settings).handle(decision(cloud))
    assert out is not None and out.verified and not out.success
    assert "401" in (out.cloudstack_result or "") and out.cloudstack_job is None
    assert "not-the-secret" not in out.model_dump_json()


async def test_preflight_reports_each_host(cloud: Cloud, bmc: BmcSimulator) -> None:
    settings = make_settings(cloud, bmc.port)
    settings.hosts["other"] = HostSettings(
        ipmi=IpmiOverrides(address="127.0.0.1", port=bmc.port, password=SecretStr("bad"))
    )
    results = await preflight(settings, [(cloud.host.uuid, cloud.cluster_uuid), ("other", None)])
    ok, bad = results
    assert ok.ok and ok.power == "on" and ok.detail == "Chassis Power is on"
    assert not bad.ok and "refused the credentials" in (bad.error or "")
    assert bmc.count("power_off") == 0


def test_cli_ipmi_test_reads_without_changing_power(
    cloud: Cloud, bmc: BmcSimulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "fencer.yaml"
    conf.write_text(
        yaml.safe_dump(
            {
                "hosts": {
                    cloud.host.uuid: {
                        "ipmi": {
                            "address": "127.0.0.1",
                            "port": bmc.port,
                            "password": BMC_PASSWORD,
                        }
                    }
                },
            }
        )
    )
    args = argparse.Namespace(host=cloud.host.uuid, cluster="c1", config=str(conf))
    assert cli_ipmi_test(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["power"] == "on" and out["sources"]["password"] == "host"
    assert BMC_PASSWORD not in json.dumps(out)
    conf.write_text(conf.read_text().replace(BMC_PASSWORD, "bad-pass"))
    assert cli_ipmi_test(args) == 1
    captured = capsys.readouterr()
    assert "refused the credentials" in captured.err and "bad-pass" not in captured.err
    assert bmc.power == "on" and bmc.count("power_off") == 0


# ---------------------------------------------------------------------------------------------
# A fence retried for minutes asks CloudStack again before each power-down command


async def _back_up_while_the_bmc_is_out(cloud: Cloud, bmc: BmcSimulator, after: float) -> None:
    await asyncio.sleep(after)
    cloud.cloud.set_host_state(cloud.host.uuid, "Up")  # the network healed: the agent is back
    await asyncio.sleep(0.3)
    bmc.resume()


def _cloudstack_recheck(cloud: Cloud, settings: FencerSettings) -> Any:
    """The shell's recheck, in miniature: raise Withdrawn unless the simulator (asked through
    fencer's own client) still shows the host Disconnected/Alert/Down."""
    from fencing.cloudstack import CloudStack
    from fencing.engine import Withdrawn

    asked: list[str] = []

    async def recheck() -> None:
        async with CloudStack(settings) as cs:
            (h,) = await cs.list("listHosts", id=cloud.host.uuid)
        asked.append(h["state"])
        if h["state"] not in ("Disconnected", "Alert", "Down"):
            raise Withdrawn(f"CloudStack says the host is {h['state']} now")

    recheck.asked = asked  # type: ignore[attr-defined]
    return recheck


async def test_a_host_back_up_during_the_bmc_retries_is_never_powered_off(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    from fencing.engine import Withdrawn

    settings = make_settings(cloud, bmc.port)
    settings.actuator.fence_deadline = 20
    settings.actuator.retry_backoff = 0.2
    settings.actuator.power_timeout = 1
    recheck = _cloudstack_recheck(cloud, settings)
    bmc.pause()  # the BMC does not answer at first: the fence retries
    back = asyncio.create_task(_back_up_while_the_bmc_is_out(cloud, bmc, 1.5))
    act = actuator(settings)
    with pytest.raises(Withdrawn, match="is Up now"):
        await act.handle(decision(cloud), recheck)
    await back
    assert bmc.power == "on" and bmc.count("power_off") == 0  # the live host kept its power
    assert restart_calls(cloud) == []
    assert recheck.asked[-1] == "Up"


async def test_a_recheck_failing_after_an_off_was_sent_fails_the_fence_without_a_restart(
    cloud: Cloud,
) -> None:
    from fencing.drivers.fake import FakeDriver
    from fencing.engine import Withdrawn

    drv = FakeDriver()
    drv.ignore_off = True  # the BMC takes the off, the host keeps running: verification fails
    settings = make_settings(cloud, 1)
    settings.actuator.fence_deadline = 10
    settings.actuator.retry_backoff = 0.1
    settings.actuator.power_timeout = 0.3
    calls = 0

    async def recheck() -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise Withdrawn("CloudStack says the host is Up now")

    act = Actuator(settings, job_poll_interval=0.05, driver_factory=lambda *_: drv)
    out = await act.handle(decision(cloud), recheck)
    assert out is not None and not out.success and not out.verified
    assert "stopped, not retried: CloudStack says the host is Up now" in (out.error or "")
    assert "set off" in (out.error or "")
    assert calls == 2 and drv.calls.count("set_power:off") == 1
    assert restart_calls(cloud) == [] and out.cloudstack_call is None


async def test_a_host_cloudstack_found_down_is_fenced_not_reported_failed(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    """CloudStack's investigators marked the host Down (its own HA restarts the HA-enabled VMs)
    and declareHostAsDegraded is refused for a Down host (Alert or Disconnected only): the
    verified power-off is a fenced host, not a fence_failed reminded every hour (the VMs are
    then followed, as after any restart call)."""
    cloud.cloud.set_host_state(cloud.host.uuid, "Down")
    out = await actuator(make_settings(cloud, bmc.port)).handle(decision(cloud))
    assert out is not None and out.success and out.verified and bmc.power == "off"
    assert (out.cloudstack_result or "").startswith("not needed: CloudStack marked the host Down")
    assert restart_calls(cloud) == ["declareHostAsDegraded"]  # once: not retried for 6 s


async def test_a_vm_whose_ha_restart_fails_after_the_degraded_job_is_told(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    """Real CloudStack: declareHostAsDegraded's job ends once the HA restarts are scheduled;
    the VMs still show Running on the fenced host until its HA workers stop and restart them.
    Here no other host can take the VM (hv2 is down too): it ends Stopped, and people must hear
    of it (vms_not_restarted), not take a VM Running on a powered-off host for a restarted one."""
    cloud.cloud.ha_delay = 0.5
    for h in cloud.cloud.hosts.values():
        if h.uuid != cloud.host.uuid:
            h.state = "Disconnected"  # no host left to restart the VM on
    notices: list[Any] = []

    async def notify(n: Any) -> None:
        notices.append(n)

    settings = make_settings(cloud, bmc.port)
    settings.cloudstack.job_timeout = 2
    settings.actuator.vms_follow_for = 3  # told at 2 s, and a last time at 3 s
    act = Actuator(settings, job_poll_interval=0.05, notify=notify)
    out = await act.handle(decision(cloud))
    await act.settle()
    assert out is not None and out.success and bmc.power == "off"
    assert cloud.cloud.vms[cloud.vm_uuid].state == "Stopped"  # HA found no host for it
    assert [n.kind.value for n in notices] == ["vms_not_restarted"] * 2
    assert "vm1 (Stopped)" in (notices[0].reason or "")


async def test_a_power_off_that_lands_late_is_verified_by_polling_the_real_bmc(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    """The lab BMC acknowledges the off and the chassis goes off 1.5 s later (the status reads
    on meanwhile): the engine polls until it reads off; only then are the VMs restarted."""
    bmc.set_power_faults(lag=1.5)
    out = await actuator(make_settings(cloud, bmc.port)).handle(decision(cloud))
    assert out is not None and out.success and out.verified and out.power_after == "off"
    assert bmc.count("power_off") == 1 and bmc.count("get_power") >= 3
    assert restart_calls(cloud) == ["declareHostAsDegraded"]


async def test_a_bmc_that_acknowledges_an_off_it_never_does_fails_without_a_restart(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    """Acknowledged, never done (the host stays on): no verified power-off, no VM restart."""
    bmc.set_power_faults(obeys=False)
    settings = make_settings(cloud, bmc.port)
    settings.actuator.power_timeout = 1
    settings.actuator.fence_deadline = 3
    out = await actuator(settings).handle(decision(cloud))
    assert out is not None and not out.success and not out.verified
    assert "did not read off" in (out.error or "") and bmc.power == "on"
    assert (
        restart_calls(cloud) == [] and cloud.cloud.vms[cloud.vm_uuid].host_uuid == cloud.host.uuid
    )
