"""An operator's retry read again after a worker restart (operator-actions is at least once) is
not run twice, against the lab's pyghmi BMC and the CloudStack simulator: a retry that ran is
skipped, one cut short by the restart is taken over with the power read first (a reboot is never
repeated blindly), and a new retry record still runs."""

from __future__ import annotations

import time
from typing import Any

import pytest

from fencing.events import FenceAction
from fencing.records import OperatorAction
from lab.bmc import BmcSimulator
from streams import actuating, tables

from .conftest import Cloud
from .test_retries import actuator, decision, patient_driver, settings_for, shell

pytestmark = pytest.mark.timeout(60)


def power_changes(bmc: BmcSimulator) -> int:
    return sum(bmc.count(c) for c in ("power_off", "power_on", "power_cycle", "power_reset"))


async def test_a_failed_retry_read_again_is_not_run_again_and_a_new_one_runs(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    bmc.pause()
    settings = settings_for(cloud, {cloud.host.uuid: bmc.port}, deadline=1.0)
    act, _ = actuator(settings)
    rt = shell(settings, act)
    host = cloud.host.uuid
    d = decision(host, cloud.cluster_uuid)
    failed = await act.handle(d)
    assert failed is not None and not failed.success
    done: dict[str, Any] = {host: {d.decision_id: tables.done_entry(d, failed)}}
    retry = OperatorAction(kind="retry", host_uuid=host, by="ops", at=time.time())
    again = await actuating.operator_action(rt, retry, done, host, (0, 3))
    assert again is not None and not again.success  # the BMC is still down
    assert done[host][d.decision_id]["retry"] == [0, 3, "done"]
    bmc.resume()
    act.driver_factory = patient_driver
    # The same record read again after a restart: it ran, it is not run again.
    assert await actuating.operator_action(rt, retry, done, host, (0, 3)) is None
    # An older record (overtaken by the one at offset 3) neither.
    assert await actuating.operator_action(rt, retry, done, host, (0, 2)) is None
    assert bmc.count() == 0 and bmc.power == "on"
    # The operator retries again: a new record, it runs.
    rt.settings = settings_for(cloud, {host: bmc.port})
    out = await actuating.operator_action(rt, retry, done, host, (0, 4))
    assert out is not None and out.success, out.error
    assert bmc.count("power_off") == 1 and bmc.power == "off"


async def test_a_reboot_retry_cut_short_by_a_restart_is_taken_over_never_repeated_blindly(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    settings = settings_for(cloud, {cloud.host.uuid: bmc.port}, deadline=1.0)
    act, _ = actuator(settings)
    rt = shell(settings, act)
    host = cloud.host.uuid
    d = decision(host, cloud.cluster_uuid).model_copy(update={"action": FenceAction.REBOOT})
    bmc.pause()
    failed = await act.handle(d)
    assert failed is not None and not failed.success
    bmc.resume()
    # The dead worker marked the retry at offset 5 started, rebooted the host, and died before
    # it stored the outcome; the host is on again.
    entry = {**tables.done_entry(d, failed), "retry": [0, 5, "started"]}
    done: dict[str, Any] = {host: {d.decision_id: entry}}
    retry = OperatorAction(kind="retry", host_uuid=host, by="ops", at=time.time())
    out = await actuating.operator_action(rt, retry, done, host, (0, 5))
    assert out is not None and not out.success
    assert "never repeated blindly" in (out.error or "")
    assert power_changes(bmc) == 0 and bmc.power == "on"
    assert done[host][d.decision_id]["retry"] == [0, 5, "done"]
    assert await actuating.operator_action(rt, retry, done, host, (0, 5)) is None
    assert power_changes(bmc) == 0


async def test_a_stop_retry_cut_short_finds_the_host_off_and_calls_it_fenced(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    settings = settings_for(cloud, {cloud.host.uuid: bmc.port}, deadline=1.0)
    act, _ = actuator(settings)
    rt = shell(settings, act)
    host = cloud.host.uuid
    d = decision(host, cloud.cluster_uuid)
    bmc.pause()
    failed = await act.handle(d)
    assert failed is not None and not failed.success
    bmc.resume()
    rt.settings = settings_for(cloud, {host: bmc.port})  # a longer deadline now
    act.driver_factory = patient_driver
    bmc.power = "off"  # what the dead worker's retry did before it died
    offs = bmc.count("power_off")
    entry = {**tables.done_entry(d, failed), "retry": [0, 5, "started"]}
    done: dict[str, Any] = {host: {d.decision_id: entry}}
    retry = OperatorAction(kind="retry", host_uuid=host, by="ops", at=time.time())
    out = await actuating.operator_action(rt, retry, done, host, (0, 5))
    assert out is not None and out.success and out.power_before == "off", out
    assert bmc.count("power_off") == offs == 0  # already off: not powered off again


async def test_a_retry_refused_mid_way_because_the_host_came_back_is_not_run_after_a_restart(
    cloud: Cloud, bmc: BmcSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator's retry passes CloudStack's check, then the BMC does not answer for a while;
    meanwhile the host comes back Up. Before the power command CloudStack is asked again: the
    retry is refused, the BMC untouched, and the record is marked done: read again after a
    restart it is not carried out as a takeover of a retry cut short."""
    import asyncio

    from streams import actuation

    monkeypatch.setattr(actuation, "RECHECK_AFTER", 0.5)  # (5 s in production)
    settings = settings_for(cloud, {cloud.host.uuid: bmc.port}, deadline=10.0)
    act, _ = actuator(settings)
    rt = shell(settings, act)
    host = cloud.host.uuid
    d = decision(host, cloud.cluster_uuid)
    bmc.pause()
    failed = await act.handle(d)
    assert failed is not None and not failed.success
    done: dict[str, Any] = {host: {d.decision_id: tables.done_entry(d, failed)}}
    retry = OperatorAction(kind="retry", host_uuid=host, by="ops", at=time.time())

    async def back_up() -> None:
        await asyncio.sleep(1.0)
        cloud.cloud.set_host_state(host, "Up")
        bmc.resume()

    task = asyncio.create_task(back_up())
    out = await actuating.operator_action(rt, retry, done, host, (0, 7))
    await task
    assert out is not None and out.refused and "Up now" in (out.error or "")
    assert power_changes(bmc) == 0 and bmc.power == "on"
    assert done[host][d.decision_id]["retry"] == [0, 7, "done"]
    assert await actuating.operator_action(rt, retry, done, host, (0, 7)) is None
