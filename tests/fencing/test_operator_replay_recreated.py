"""An operator's retry on a deleted and recreated operator-actions topic (offsets from 0 again),
against the lab's pyghmi BMC and the CloudStack simulator: the new retry record, at or below
the old retry's mark, is carried out; the old record read again (same place and timestamp) is
not (streams.actuating.read_again)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from fencing.records import OperatorAction
from lab.bmc import BmcSimulator
from streams import actuating, tables

from .conftest import Cloud
from .test_retries import actuator, decision, patient_driver, settings_for, shell

pytestmark = pytest.mark.timeout(60)

T = 1_796_013_066_997  # the Kafka timestamp (ms) of the old retry record at offset 3


async def test_a_retry_on_a_recreated_topic_runs_and_the_old_one_read_again_does_not(
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
    again = await actuating.operator_action(rt, retry, done, host, (0, 3), T)
    assert again is not None and not again.success  # the BMC is still down
    assert done[host][d.decision_id]["retry"] == [0, 3, "done", T]
    bmc.resume()
    act.driver_factory = patient_driver
    rt.settings = settings_for(cloud, {host: bmc.port})
    # Read again after a restart: the very record, and one before it, are not run again.
    assert await actuating.operator_action(rt, retry, done, host, (0, 3), T) is None
    assert await actuating.operator_action(rt, retry, done, host, (0, 1), T - 900) is None
    assert bmc.count() == 0 and bmc.power == "on"
    # operator-actions was deleted and recreated: the operator's retry lands at offset 0 again,
    # written later. It is a new request: carried out.
    out = await actuating.operator_action(rt, retry, done, host, (0, 0), T + 60_000)
    assert out is not None and out.success, out.error
    assert bmc.count("power_off") == 1 and bmc.power == "off"
    assert done[host][d.decision_id]["retry"] == [0, 0, "done", T + 60_000]
