"""Host signals carry the ingesting worker's clock, never CloudStack's (rule 1); whether an
alert still holds is asked of CloudStack's state now, never decided by comparing its time with
the time fencer saw the host come back.

Against the CloudStack simulator (real request signing) and the real parser and core."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace
from typing import Any

from pydantic import SecretStr

from fencing.decision import HostRecord, Trigger, classify, step
from fencing.policy import Policy
from fencing.settings import CloudStackSettings, FencerSettings
from lab.cloudstack_sim import CloudStackSimulator, SimCloud
from probes.inventory import Inventory
from streams.codec import _signal_event
from streams.ingest import Ingest
from streams.poller import HostDirectory, Poller


def alert(host_uuid: str, name: str, when: str) -> SimpleNamespace:
    """CloudStack's "Host disconnected" alert as its event bus writes it (key null), stamped
    `when` by the management server's clock."""
    where = f"name: {name} (id:{host_uuid}), availability zone: zone1, pod: pod1"
    value = {
        "eventDateTime": when,
        "subject": f"Host disconnected, {where}",
        "dataCenterId": "a7f3e0b2-3c41-4f0e-8d6b-2a9b1c0d4e55",
        "event": "ALERT.COMPUTE.HOST",
        "body": f"If the agent for host [{where}] is not restarted within alert.wait seconds, "
        "host will go to Alert state",
        "podId": "0e4d2c1b-77aa-4b6e-9f00-5d3c2b1a0f99",
    }
    return SimpleNamespace(key=None, value=json.dumps(value).encode(), timestamp=None)


async def test_a_lagging_management_server_clock_neither_hides_a_new_disconnection() -> None:
    sc = SimCloud()
    cluster = sc.add_cluster(sc.add_zone())
    hv1 = sc.add_host(cluster, "hv1", "10.0.0.11")
    sc.add_host(cluster, "hv2", "10.0.0.12")
    sim = await CloudStackSimulator(sc).start()
    try:
        settings = FencerSettings(
            cloudstack=CloudStackSettings(
                endpoint=sim.url,
                api_key=SecretStr(sim.api_key),
                secret_key=SecretStr(sim.secret_key),
            )
        )
        inventory = Inventory(settings)
        directory = HostDirectory()
        poller, ingest = Poller(lambda: inventory, directory), Ingest(lambda: inventory, directory)
        policy = Policy()

        record = HostRecord(hv1.uuid)
        sc.set_host_state(hv1.uuid, "Disconnected")
        signals, _ = await poller.poll()  # episode 1...
        down = next(s for s in signals if s.host.host_uuid == hv1.uuid and s.kind == "disconnected")
        record, _ = step(record, _signal_event(down), policy)
        assert record.state.value == "suspect" and record.episode == 1
        sc.set_host_state(hv1.uuid, "Up")
        signals, _ = await poller.poll()  # ...ends: the host came back
        up = next(s for s in signals if s.host.host_uuid == hv1.uuid and s.kind == "up")
        record, _ = step(record, _signal_event(up), policy)
        assert record.state.value == "idle" and record.since == up.at

        # The host dies after it came back; the management server's clock is ten minutes
        # behind, so its alert says "ten minutes ago": before the return on CloudStack's clock.
        sc.set_host_state(hv1.uuid, "Disconnected")
        lagging = time.strftime("%Y-%m-%d %H:%M:%S +0000", time.gmtime(time.time() - 600))
        signal, reason = await ingest.signal(alert(hv1.uuid, "hv1", lagging))
        assert reason is None and signal is not None and signal.kind == "disconnected"
        assert signal.reported_at is not None and signal.reported_at < record.since  # shown only
        assert signal.at >= record.since  # the worker's clock on arrival
        assert classify(record, _signal_event(signal), policy) is Trigger.DISCONNECTED

        # An alert from before the return, processed late (a lagging ingest, a redelivery):
        # CloudStack reports the host up now, so it opens nothing.
        sc.set_host_state(hv1.uuid, "Up")
        directory.recheck.clear()
        assert await ingest.signal(alert(hv1.uuid, "hv1", lagging)) == (None, None)
        assert not directory.recheck

        # CloudStack cannot be asked: the alert is reported (unknown is never "up"), and the
        # next poll reports the host again whatever its state then.
        port = int(sim.url.split(":")[2].split("/")[0])
        await sim.stop()
        signal, _ = await ingest.signal(alert(hv1.uuid, "hv1", lagging))
        assert signal is not None and signal.kind == "disconnected"
        assert hv1.uuid in directory.recheck
        sim._port = port  # the same address again
        await sim.start()
        signals, _ = await poller.poll()
        ups = [s for s in signals if s.host.host_uuid == hv1.uuid and s.kind == "up"]
        assert len(ups) == 1, "an unchanged Up host is reported again after an alert named it"
        signals, _ = await poller.poll()  # and only once
        assert not [s for s in signals if s.host.host_uuid == hv1.uuid]
    finally:
        await inventory.close()
        await sim.stop()


async def test_a_reporter_whose_clock_is_behind_the_returns_stamp_still_opens_an_episode() -> None:
    """The poll leader P whose clock is ten minutes ahead saw the host Up; the host dies, and
    the alert is read on worker E, whose clock is right: E's stamp is earlier than P's stamp of
    the return. Compared, the dead host was "late" news, ignored until E's clock passed P's (ten
    minutes unwatched, every poll of a new leader too). Different clocks are never compared;
    only a stamp of P's own clock from before its return is late."""
    sc = SimCloud()
    cluster = sc.add_cluster(sc.add_zone())
    hv1 = sc.add_host(cluster, "hv1", "10.0.0.11")
    sc.add_host(cluster, "hv2", "10.0.0.12")
    sim = await CloudStackSimulator(sc).start()
    try:
        settings = FencerSettings(
            cloudstack=CloudStackSettings(
                endpoint=sim.url,
                api_key=SecretStr(sim.api_key),
                secret_key=SecretStr(sim.secret_key),
            )
        )
        inventory = Inventory(settings)
        directory = HostDirectory()
        poller = Poller(lambda: inventory, directory, clock_id="P")
        ingest = Ingest(lambda: inventory, directory, clock_id="E")
        policy = Policy()
        record = HostRecord(hv1.uuid)
        sc.set_host_state(hv1.uuid, "Disconnected")
        signals, _ = await poller.poll()
        down = next(s for s in signals if s.host.host_uuid == hv1.uuid and s.kind == "disconnected")
        record, _ = step(record, _signal_event(down), policy)
        sc.set_host_state(hv1.uuid, "Up")
        signals, _ = await poller.poll()
        up = next(s for s in signals if s.host.host_uuid == hv1.uuid and s.kind == "up")
        assert up.clock == "P"
        up = up.model_copy(update={"at": up.at + 600})  # P's clock runs ten minutes ahead
        record, _ = step(record, _signal_event(up), policy)
        assert (record.state.value, record.since_clock) == ("idle", "P")

        sc.set_host_state(hv1.uuid, "Disconnected")
        now = time.strftime("%Y-%m-%d %H:%M:%S +0000", time.gmtime())
        signal, reason = await ingest.signal(alert(hv1.uuid, "hv1", now))
        assert reason is None and signal is not None and signal.clock == "E"
        assert signal.at < record.since  # E's right clock is behind P's stamp
        opened, actions = step(record, _signal_event(signal), policy)
        assert (opened.state.value, opened.episode) == ("suspect", 2) and actions
        # The same report stamped by P's own clock before its return is a late one.
        own = signal.model_copy(update={"clock": "P"})
        assert classify(record, _signal_event(own), policy) is Trigger.LATE
    finally:
        await inventory.close()
        await sim.stop()


async def test_a_wall_clock_step_back_on_the_reporter_never_hides_the_next_disconnection(
    monkeypatch: Any,
) -> None:
    """One worker polls and reads the bus. It saw the host come back; then NTP steps its wall
    clock back an hour and the host dies. Stamped with the wall clock under the worker's own
    clock name, its reports of the dead host were "earlier than the return" on one clock:
    ignored as late for an hour (a missed fence). The stamps are the worker's never-stepped
    clock (streams.worker_clock), so the step changes nothing."""
    sc = SimCloud()
    cluster = sc.add_cluster(sc.add_zone())
    hv1 = sc.add_host(cluster, "hv1", "10.0.0.11")
    sc.add_host(cluster, "hv2", "10.0.0.12")
    sim = await CloudStackSimulator(sc).start()
    real = time.time
    try:
        settings = FencerSettings(
            cloudstack=CloudStackSettings(
                endpoint=sim.url,
                api_key=SecretStr(sim.api_key),
                secret_key=SecretStr(sim.secret_key),
            )
        )
        inventory = Inventory(settings)
        directory = HostDirectory()
        poller, ingest = Poller(lambda: inventory, directory), Ingest(lambda: inventory, directory)
        assert poller.clock_id == ingest.clock_id  # one worker: one clock name
        policy = Policy()
        record = HostRecord(hv1.uuid)
        sc.set_host_state(hv1.uuid, "Disconnected")
        signals, _ = await poller.poll()
        down = next(s for s in signals if s.host.host_uuid == hv1.uuid and s.kind == "disconnected")
        record, _ = step(record, _signal_event(down), policy)
        sc.set_host_state(hv1.uuid, "Up")
        signals, _ = await poller.poll()
        up = next(s for s in signals if s.host.host_uuid == hv1.uuid and s.kind == "up")
        record, _ = step(record, _signal_event(up), policy)
        assert record.state.value == "idle" and record.since_clock == poller.clock_id

        monkeypatch.setattr(time, "time", lambda: real() - 3600.0)  # the step back
        sc.set_host_state(hv1.uuid, "Disconnected")
        when = time.strftime("%Y-%m-%d %H:%M:%S +0000", time.gmtime(real()))
        signal, reason = await ingest.signal(alert(hv1.uuid, "hv1", when))
        assert reason is None and signal is not None and signal.kind == "disconnected"
        assert classify(record, _signal_event(signal), policy) is Trigger.DISCONNECTED
        signals, _ = await poller.poll()
        down = next(s for s in signals if s.host.host_uuid == hv1.uuid and s.kind == "disconnected")
        opened, actions = step(record, _signal_event(down), policy)
        assert (opened.state.value, opened.episode) == ("suspect", 2) and actions
    finally:
        monkeypatch.undo()
        await inventory.close()
        await sim.stop()


async def test_a_poll_answer_older_than_an_alert_that_came_during_the_poll_ends_nothing() -> None:
    """listHosts answered "Up" (its page made before the host died), the answer arrived late;
    meanwhile the host's "Host disconnected" alert was ingested in this process (the same
    clock, stamped later). The poll's "up" (stamped when the poll began: earlier) must not end
    the episode the alert opened (a false host_recovered, the checks started again a poll
    later): the host is reported by the next poll instead, as CloudStack then sees it."""
    sc = SimCloud()
    cluster = sc.add_cluster(sc.add_zone())
    hv1 = sc.add_host(cluster, "hv1", "10.0.0.11")
    sc.add_host(cluster, "hv2", "10.0.0.12")
    sim = await CloudStackSimulator(sc).start()
    inventory: Inventory | None = None
    try:
        settings = FencerSettings(
            cloudstack=CloudStackSettings(
                endpoint=sim.url,
                api_key=SecretStr(sim.api_key),
                secret_key=SecretStr(sim.secret_key),
            )
        )
        inventory = Inventory(settings)
        directory = HostDirectory()
        poller = Poller(lambda: inventory, directory)
        ingest = Ingest(lambda: inventory, directory)
        policy = Policy()
        await poller.poll()  # both hosts known Up
        record = HostRecord(hv1.uuid)

        sc.api_stall, sc.stall_next_calls["listhosts"] = 1.0, 1
        polling = asyncio.create_task(poller.poll())  # its answer says Up, and arrives late
        await asyncio.sleep(0.3)
        sc.set_host_state(hv1.uuid, "Disconnected")
        down, reason = await ingest.signal(
            alert(hv1.uuid, "hv1", time.strftime("%Y-%m-%d %H:%M:%S +0000", time.gmtime()))
        )
        assert reason is None and down is not None and down.kind == "disconnected"
        record, _ = step(record, _signal_event(down), policy)
        assert record.state.value == "suspect"
        signals, _ = await polling
        late = [s for s in signals if s.host.host_uuid == hv1.uuid]
        assert late == [], f"a poll answer older than the alert ended the episode: {late}"
        signals, _ = await poller.poll()  # the next poll reports the host as it is now
        now = [s.kind for s in signals if s.host.host_uuid == hv1.uuid]
        assert "disconnected" in now and "up" not in now
    finally:
        if inventory is not None:
            await inventory.close()
        await sim.stop()
