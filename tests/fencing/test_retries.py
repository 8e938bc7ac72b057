"""The actuator never gives up silently, against the lab's pyghmi BMC and the CloudStack
simulator: a BMC that is down for two attempts and back is fenced; one that stays down fails at
the fence deadline; declareHostAsDegraded failing twice is retried until the VMs are restarted;
VMs still down afterwards are reported; one host's retries never hold up another host."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from pydantic import SecretStr

from fencing.actuator import Actuator
from fencing.drivers import build_driver
from fencing.drivers.base import PowerDriver
from fencing.engine import Engine
from fencing.events import FenceAction, NoticeKind
from fencing.identity import MemoryPinStore
from fencing.records import EvidenceSummary, FenceDecision, HostRef, Notice, OperatorAction
from fencing.redaction import Redactor
from fencing.settings import (
    ActuatorSettings,
    CloudStackSettings,
    FencerSettings,
    HostSettings,
    IpmiOverrides,
    IpmiSettings,
)
from lab.bmc import BmcSimulator
from streams import actuating, tables
from streams.runtime import Runtime

from .conftest import BMC_PASSWORD, Cloud

pytestmark = pytest.mark.timeout(60)


def settings_for(cloud: Cloud, ports: dict[str, int], deadline: float = 20.0) -> FencerSettings:
    hosts = {
        uuid_: HostSettings(
            ipmi=IpmiOverrides(
                address="127.0.0.1",
                port=port,
                username="admin",
                password=SecretStr(BMC_PASSWORD),
                action=FenceAction.STOP,
            )
        )
        for uuid_, port in ports.items()
    }
    return FencerSettings(
        cloudstack=CloudStackSettings(
            endpoint=cloud.sim.url,
            api_key=SecretStr(cloud.sim.api_key),
            secret_key=SecretStr(cloud.sim.secret_key),
            job_timeout=3,
        ),
        hosts=hosts,
        actuator=ActuatorSettings(
            power_timeout=3, poll_interval=0.05, retry_backoff=0.1, fence_deadline=deadline
        ),
    )


def quick_driver(ipmi: IpmiSettings, address: str | None, _timeout: float) -> PowerDriver:
    # A BMC that does not answer costs 1 s per attempt instead of 5.
    return build_driver(ipmi, address, 1.0)


def patient_driver(ipmi: IpmiSettings, address: str | None, _timeout: float) -> PowerDriver:
    # Once the BMC answers again: 5 s per call, as in production, for a loaded test machine.
    return build_driver(ipmi, address, 5.0)


def decision(host: str, cluster: str) -> FenceDecision:
    return FenceDecision(
        decision_id=str(uuid.uuid4()),
        host=HostRef(host_uuid=host, cluster_uuid=cluster, host_name=host[:8]),
        episode=1,
        action=FenceAction.STOP,
        approved=True,
        evidence=EvidenceSummary(suspect_since=time.time() - 300, stale_checks=3),
        decided_at=time.time(),
    )


def actuator(settings: FencerSettings, **engine: Any) -> tuple[Actuator, list[Notice]]:
    notices: list[Notice] = []

    async def sink(n: Notice) -> None:
        notices.append(n)

    eng = Engine(power_timeout=3, poll_interval=0.05, retry_backoff=0.1, **engine)
    act = Actuator(
        settings,
        engine=eng,
        driver_factory=quick_driver,
        job_poll_interval=0.05,
        notify=sink,
    )
    return act, notices


def degraded_calls(cloud: Cloud) -> list[str]:
    return [c for c, _ in cloud.cloud.calls if c == "declareHostAsDegraded"]


async def test_a_bmc_down_for_two_attempts_then_back_is_fenced(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    failures: list[int] = []

    def failed(host: str, attempt: int, error: str) -> None:
        failures.append(attempt)
        if attempt == 2:
            bmc.resume()  # the BMC answers again from the third attempt on

    bmc.pause()
    act, notices = actuator(settings_for(cloud, {cloud.host.uuid: bmc.port}), on_failure=failed)
    out = await act.handle(decision(cloud.host.uuid, cloud.cluster_uuid))
    assert out is not None
    # (A resumed BMC process may miss the third attempt's call timeout on a loaded machine:
    # then the fourth reaches it; the CI run of 2026-11-30 saw 4.)
    assert (out.success, out.verified, out.error) == (True, True, None)
    assert out.attempts >= 3 and failures == list(range(1, out.attempts))
    assert bmc.power == "off" and bmc.count("power_off") == 1
    assert degraded_calls(cloud) == ["declareHostAsDegraded"]
    assert cloud.cloud.vms[cloud.vm_uuid].host_uuid != cloud.host.uuid
    assert cloud.cloud.vms[cloud.vm_uuid].state == "Running"
    await act.settle()
    assert notices == []  # every VM runs again: nothing to report


async def test_a_bmc_whose_identity_cannot_be_read_yet_is_retried_then_pinned_and_fenced(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    # With BMC identity pinning the first call reads the GUID: it shares the fence's deadline.
    failures: list[int] = []

    def failed(host: str, attempt: int, error: str) -> None:
        failures.append(attempt)
        if attempt == 2:
            bmc.resume()

    bmc.pause()
    act, _ = actuator(settings_for(cloud, {cloud.host.uuid: bmc.port}), on_failure=failed)
    act.pins = pins = MemoryPinStore()
    out = await act.handle(decision(cloud.host.uuid, cloud.cluster_uuid))
    assert out is not None and out.success and out.verified, out.error
    assert failures == [1, 2]
    assert pins.get(cloud.host.uuid) is not None  # pinned at this first fence
    assert bmc.power == "off" and bmc.count("power_off") == 1


async def test_a_bmc_whose_identity_stays_unreadable_fails_at_the_fence_deadline(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    bmc.pause()
    act, _ = actuator(settings_for(cloud, {cloud.host.uuid: bmc.port}, deadline=3.0))
    act.pins = MemoryPinStore()
    started = time.monotonic()
    out = await act.handle(decision(cloud.host.uuid, cloud.cluster_uuid))
    assert out is not None and not out.success
    # At least the deadline; at most the deadline plus one BMC call's own timeout (the engine
    # never cancels a call, see fencing/engine.py) plus room for a loaded CI machine. A fence
    # that ignored its deadline would retry until the test's timeout.
    assert 2.9 < time.monotonic() - started < 15
    assert "fence deadline of 3 s" in (out.error or "") and "BMC identity" in (out.error or "")
    assert bmc.count("power_off") == 0 and degraded_calls(cloud) == []


async def test_a_bmc_that_stays_down_fails_at_the_fence_deadline(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    bmc.pause()
    act, _ = actuator(settings_for(cloud, {cloud.host.uuid: bmc.port}, deadline=3.5))
    started = time.monotonic()
    out = await act.handle(decision(cloud.host.uuid, cloud.cluster_uuid))
    took = time.monotonic() - started
    assert out is not None and not out.success and not out.verified
    assert 3.4 < took < 15, took  # deadline + one call's overrun (3 s) + room for load
    assert out.attempts >= 2
    assert "fence deadline of 3.5 s" in (out.error or "")
    assert "no answer from BMC" in (out.error or "")
    assert degraded_calls(cloud) == [] and bmc.power == "on"


async def test_an_operator_retry_runs_a_failed_decision_again(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    bmc.pause()
    act, _ = actuator(settings_for(cloud, {cloud.host.uuid: bmc.port}, deadline=1.5))
    d = decision(cloud.host.uuid, cloud.cluster_uuid)
    first = await act.handle(d)
    assert first is not None and not first.success
    bmc.resume()
    act.settings = settings_for(cloud, {cloud.host.uuid: bmc.port})  # a longer deadline now
    act.driver_factory = patient_driver
    assert bmc.count("power_off") == 0
    # A redelivery is answered by the shell's table; an operator's retry reaches the actuator.
    again = await act.handle(d)
    assert again is not None and again.success and again.decision_id == d.decision_id
    assert bmc.power == "off" and bmc.count("power_off") == 1


async def test_declare_degraded_failing_twice_is_retried_and_the_vms_restart(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    cloud.cloud.fail_next_jobs["declarehostasdegraded"] = 2
    act, notices = actuator(settings_for(cloud, {cloud.host.uuid: bmc.port}))
    out = await act.handle(decision(cloud.host.uuid, cloud.cluster_uuid))
    assert out is not None and out.success, out.error
    assert out.cloudstack_call == "declareHostAsDegraded" and out.cloudstack_result == "succeeded"
    assert degraded_calls(cloud) == ["declareHostAsDegraded"] * 3
    assert bmc.count("power_off") == 1  # the BMC is not touched again
    vm = cloud.cloud.vms[cloud.vm_uuid]
    assert (vm.state, vm.host_uuid != cloud.host.uuid) == ("Running", True)
    assert cloud.cloud.hosts[cloud.host.uuid].resourcestate == "Degraded"
    await act.settle()
    assert notices == []


async def test_declare_degraded_failing_past_the_deadline_is_a_failed_outcome(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    cloud.cloud.fail_jobs["declareHostAsDegraded"] = "Unable to declare host degraded"
    act, _ = actuator(settings_for(cloud, {cloud.host.uuid: bmc.port}, deadline=2.0))
    out = await act.handle(decision(cloud.host.uuid, cloud.cluster_uuid))
    assert out is not None and not out.success and out.verified
    assert "declareHostAsDegraded failed" in (out.error or "")
    assert "gave up after" in (out.cloudstack_result or "")
    assert len(degraded_calls(cloud)) >= 3


def nowhere_to_restart(cloud: Cloud) -> None:
    for h in cloud.cloud.hosts.values():
        if h.uuid != cloud.host.uuid:
            h.state = "Disconnected"  # nowhere to restart the VM


async def test_vms_still_down_after_the_restart_call_are_reported_again_until_given_up(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    """Rule 5: the notice went out once, at job_timeout, and the actuator stopped following.
    Now: the first notice at job_timeout (its id as before), reminders at growing intervals
    (job_timeout, doubled, at most renotify_interval), each id new, and a last notice saying
    fencer stops following at actuator.vms_follow_for."""
    nowhere_to_restart(cloud)
    settings = settings_for(cloud, {cloud.host.uuid: bmc.port})
    # The VMs are watched for job_timeout: long enough that an outcome waiting for them could
    # never pass for one that did not, even on a loaded CI machine.
    cs = settings.cloudstack.model_copy(update={"job_timeout": 6})
    a = settings.actuator.model_copy(update={"renotify_interval": 8, "vms_follow_for": 30})
    act, notices = actuator(settings.model_copy(update={"cloudstack": cs, "actuator": a}))
    d = decision(cloud.host.uuid, cloud.cluster_uuid)
    started = time.monotonic()
    out = await act.handle(d)
    assert out is not None and out.success
    assert time.monotonic() - started < 5  # the outcome does not wait for the VMs (6 s)
    assert notices == []
    await act.settle()  # up to vms_follow_for (30 s here)
    took = time.monotonic() - started
    assert 29 < took < 40
    _, *reminders, last = notices
    # at 6 s, then 12 (gap 6), 20 (gap 8, capped), 28 (gap 8), last at 30
    assert len(reminders) == 3, [n.reason for n in notices]
    assert {n.kind for n in notices} == {NoticeKind.VMS_NOT_RESTARTED}
    assert {n.decision_id for n in notices} == {d.decision_id}
    series = f"{d.decision_id}/vms_not_restarted/{act.tag}/1"
    assert [n.notice_id for n in notices] == [f"{series}/{k}" for k in ("1", "2", "3", "4", "last")]
    for n in notices:
        assert "1 of 1 VM(s) not running" in (n.reason or "")
        assert "vm1 (Stopped)" in (n.reason or "")
    assert "reminder 1" in (reminders[0].reason or "")
    # the same decision followed again (an operator's retry): ids of its own, none already sent
    notices.clear()
    shorter = act.settings.actuator.model_copy(update={"vms_follow_for": 7})
    act.settings = act.settings.model_copy(update={"actuator": shorter})
    assert await act._follow_vms(d, {cloud.vm_uuid: "vm1"}, Redactor()) == ["vm1"]
    assert [n.notice_id for n in notices] == [
        f"{d.decision_id}/vms_not_restarted/{act.tag}/2/{k}" for k in ("1", "last")
    ]
    assert "stops following" in (last.reason or "")


async def test_vms_that_run_after_a_notice_end_the_reminders_with_a_log_line(
    cloud: Cloud, bmc: BmcSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    nowhere_to_restart(cloud)
    settings = settings_for(cloud, {cloud.host.uuid: bmc.port})
    cs = settings.cloudstack.model_copy(update={"job_timeout": 2})
    a = settings.actuator.model_copy(update={"renotify_interval": 2, "vms_follow_for": 40})
    act, notices = actuator(settings.model_copy(update={"cloudstack": cs, "actuator": a}))
    out = await act.handle(decision(cloud.host.uuid, cloud.cluster_uuid))
    assert out is not None and out.success
    end = time.monotonic() + 20
    while len(notices) < 2:
        assert time.monotonic() < end, notices
        await asyncio.sleep(0.1)
    cloud.cloud.vms[cloud.vm_uuid].state = "Running"  # an operator started it
    await asyncio.wait_for(act.settle(), 10)  # the next read sees it run
    assert len(notices) == 2
    assert "run again (or are gone) after 2 vms_not_restarted notice(s)" in caplog.text


async def test_one_hosts_retries_never_hold_up_another_host(cloud: Cloud) -> None:
    other = cloud.cloud.add_host(
        cloud.cloud.clusters[cloud.cluster_uuid], "hv3", "10.0.0.13", state="Disconnected"
    )
    with (
        BmcSimulator("admin", BMC_PASSWORD) as stuck,
        BmcSimulator("admin", BMC_PASSWORD) as fine,
    ):
        stuck.pause()
        settings = settings_for(cloud, {cloud.host.uuid: stuck.port, other.uuid: fine.port}, 4.0)
        act, _ = actuator(settings)
        done: dict[str, float] = {}
        started = time.monotonic()

        async def run(d: FenceDecision) -> None:
            out = await act.handle(d)
            assert out is not None
            done[d.host.host_uuid] = time.monotonic() - started

        await asyncio.gather(
            run(decision(cloud.host.uuid, cloud.cluster_uuid)),
            run(decision(other.uuid, cloud.cluster_uuid)),
        )
        # the stuck one (started first) takes its whole 4 s deadline; the other never waited for
        # it: done first, by an order a loaded machine cannot turn round
        assert 3.9 < done[cloud.host.uuid]
        assert done[other.uuid] < done[cloud.host.uuid] - 1.0, done
        assert fine.power == "off" and stuck.power == "on"


# -- the worker's shell: reminders until an operator retries or marks the fence handled -------


def shell(settings: FencerSettings, act: Actuator) -> Runtime:
    rt = Runtime(settings=settings, started_at=time.time())
    rt._store_failed = True  # no settings topic here: the file's settings are the live ones
    rt._actuator = act
    return rt


async def test_a_failed_fence_is_repeated_until_an_operator_retries_it(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    bmc.pause()
    settings = settings_for(cloud, {cloud.host.uuid: bmc.port}, deadline=1.5)
    act, _ = actuator(settings)
    rt = shell(settings, act)
    done: dict[str, Any] = {}
    host = cloud.host.uuid
    d = decision(host, cloud.cluster_uuid)
    failed = await act.handle(d)  # what the actuate agent stores once its checks passed
    done[host] = {d.decision_id: tables.done_entry(d, failed)}
    assert failed is not None and not failed.success
    rt.settings.actuator.renotify_interval = 60.0

    def due(mono: float) -> list[Notice]:
        return rt.due_reminders(done.items(), time.time(), mono)

    assert due(0.0) == []  # this process saw the failure (its notice went out): one interval
    assert due(59.0) == []
    (first,) = due(61.0)
    assert first.kind is NoticeKind.FENCE_FAILED and first.decision_id == d.decision_id
    assert first.notice_id.endswith("/1") and f"fencer fence retry {host}" in (first.reason or "")
    assert due(61.5) == []  # sent once
    (second,) = due(125.0)
    assert second.notice_id.endswith("/2") and second.notice_id != first.notice_id
    bmc.resume()
    rt.settings = settings_for(cloud, {host: bmc.port})  # a longer deadline now
    act.driver_factory = patient_driver
    retry = OperatorAction(kind="retry", host_uuid=host, by="ops", at=time.time())
    out = await actuating.operator_action(rt, retry, done, host)
    assert out is not None and out.success and out.decision_id == d.decision_id
    assert out.started_at > failed.started_at  # a new run: a new notification id
    assert bmc.power == "off" and bmc.count("power_off") == 1
    assert degraded_calls(cloud) == ["declareHostAsDegraded"]
    assert done[host][d.decision_id]["success"] and done[host][d.decision_id]["retried_by"] == "ops"
    assert due(1000.0) == [] and tables.failed_runs(done.items()) == []
    # a second retry of a fence that worked does nothing
    assert await actuating.operator_action(rt, retry, done, host) is None
    assert bmc.count("power_off") == 1


async def test_fence_failed_reminders_go_on_after_a_restart_that_follows_a_wall_clock_step_back(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    """Reminders were numbered by the reminding worker's wall clock minus the actuator's stamp
    of the failure, floored by an in-memory count: after a restart that follows an NTP step
    back of an hour (or on a worker whose clock is behind the actuator's), the numbers were
    ids already sent, which the notify table drops: an hour of silence about a failed fence.
    Timed on each process's own monotonic clock, with ids no other process computes, the
    reminders go on: at once on the restarted worker, then every interval."""
    bmc.pause()
    settings = settings_for(cloud, {cloud.host.uuid: bmc.port}, deadline=1.5)
    settings.actuator.renotify_interval = 60.0
    act, _ = actuator(settings)
    host = cloud.host.uuid
    d = decision(host, cloud.cluster_uuid)
    failed = await act.handle(d)
    assert failed is not None and not failed.success
    done = {host: {d.decision_id: tables.done_entry(d, failed)}}
    t0 = failed.finished_at
    sent: list[str] = []  # the notify table: an id already there is dropped

    def told(rt: Runtime, now: float, mono: float) -> list[str]:
        new = [n.notice_id for n in rt.due_reminders(done.items(), now, mono)]
        fresh = [i for i in new if i not in sent]
        sent.extend(fresh)
        return fresh

    before = shell(settings, act)
    assert told(before, t0 + 1, 1.0) == []
    assert len(told(before, t0 + 61, 61.0)) == 1
    assert len(told(before, t0 + 125, 125.0)) == 1
    for step_back in (3600.0, 0.0):  # a step back, then a plain restart
        after = shell(settings, act)  # the worker restarts: a new process, a new clock
        after.clock_id = f"{before.clock_id}, restarted after {step_back:.0f} s back"
        back = t0 + 130 - step_back
        assert len(told(after, back, 5.0)) == 1  # another process's failure: at once
        assert told(after, back + 59, 64.0) == []
        assert len(told(after, back + 60, 65.0)) == 1
        assert len(told(after, back + 120, 125.0)) == 1
    assert len(sent) == len(set(sent)) == 8
    bmc.resume()


async def test_fence_failed_reminders_go_on_when_the_partition_moves_away_and_back(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    """The partition with a failed run moves to another worker and back (a rebalance) while
    this process runs: its count for the run was forgotten with the rows, so it numbered its
    reminders from 1 again under its own tag: ids it had sent, dropped by the notify table:
    silence for as many intervals as it had reminded before the move. The numbers go on."""
    bmc.pause()
    settings = settings_for(cloud, {cloud.host.uuid: bmc.port}, deadline=1.5)
    settings.actuator.renotify_interval = 60.0
    act, _ = actuator(settings)
    host = cloud.host.uuid
    d = decision(host, cloud.cluster_uuid)
    failed = await act.handle(d)
    assert failed is not None and not failed.success
    done = {host: {d.decision_id: tables.done_entry(d, failed)}}
    t0 = failed.finished_at
    sent: list[str] = []  # the notify table: an id already there is dropped

    def told(rt: Runtime, rows: dict[str, Any], mono: float) -> list[str]:
        new = [n.notice_id for n in rt.due_reminders(rows.items(), t0 + mono, mono)]
        fresh = [i for i in new if i not in sent]
        sent.extend(fresh)
        return fresh

    rt = shell(settings, act)
    rt.clock_id = "another process"  # the failure was written elsewhere: reminded at once
    for mono in (1.0, 61.0, 121.0):
        assert len(told(rt, done, mono)) == 1, mono
    assert told(rt, {}, 150.0) == []  # the partition moved away
    assert len(told(rt, done, 181.0)) == 1  # back: its failure reminded (not an id sent)
    assert told(rt, done, 240.0) == []
    assert len(told(rt, done, 241.0)) == 1
    assert len(sent) == len(set(sent)) == 5
    bmc.resume()


async def test_the_latest_fence_is_the_last_one_stored_not_the_latest_stamp(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    """A host fenced once (decision A, by a worker whose clock was an hour ahead) came back and
    died again; the fence of its new episode (decision B, on a worker with the right clock)
    fails. Taken by the largest `finished_at`, A's success was the host's latest fence: no
    reminder and no operator retry for B's failure. The row's own order (one writer) says
    which came last."""
    bmc.pause()
    settings = settings_for(cloud, {cloud.host.uuid: bmc.port}, deadline=1.5)
    act, _ = actuator(settings)
    host = cloud.host.uuid
    a, b = decision(host, cloud.cluster_uuid), decision(host, cloud.cluster_uuid)
    failed = await act.handle(b)
    assert failed is not None and not failed.success
    ahead = failed.finished_at + 3600
    fenced = failed.model_copy(
        update={"decision_id": a.decision_id, "success": True, "finished_at": ahead, "error": None}
    )
    done: dict[str, Any] = {}
    tables.put_entry(done, host, a.decision_id, tables.done_entry(a, fenced))
    tables.put_entry(done, host, b.decision_id, tables.done_entry(b, failed))
    (run,) = tables.failed_runs(done.items())
    assert run.decision_id == b.decision_id
    target = tables.failed_fence(done[host])
    assert target is not None and target[0] == b.decision_id
    bmc.resume()


async def test_marking_a_failed_fence_handled_stops_the_reminders(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    bmc.pause()
    settings = settings_for(cloud, {cloud.host.uuid: bmc.port}, deadline=1.0)
    act, _ = actuator(settings)
    rt = shell(settings, act)
    done: dict[str, Any] = {}
    host = cloud.host.uuid
    d = decision(host, cloud.cluster_uuid)
    failed = await act.handle(d)
    done[host] = {d.decision_id: tables.done_entry(d, failed)}
    assert failed is not None and not failed.success
    assert len(tables.failed_runs(done.items())) == 1
    handled = OperatorAction(kind="handled", host_uuid=host, by="ops", at=time.time())
    assert await actuating.operator_action(rt, handled, done, host) is None
    assert tables.failed_runs(done.items()) == []
    assert bmc.count("power_off") == 0


async def test_two_decisions_for_one_host_never_act_at_once(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    """The actuator's per-host lock (the one lock: the engine has none): a second decision for
    the same host waits for the first and finds the host already off."""
    settings = settings_for(cloud, {cloud.host.uuid: bmc.port})
    act, _ = actuator(settings)
    first, second = await asyncio.gather(
        act.handle(decision(cloud.host.uuid, cloud.cluster_uuid)),
        act.handle(decision(cloud.host.uuid, cloud.cluster_uuid)),
    )
    assert first is not None and second is not None and first.success and second.success
    assert bmc.count("power_off") == 1
    # one of them found the host on and powered it off; the other, after it, found it off
    assert sorted([first.power_before or "", second.power_before or ""]) == ["off", "on"]
    assert first.finished_at <= second.started_at or second.finished_at <= first.started_at
