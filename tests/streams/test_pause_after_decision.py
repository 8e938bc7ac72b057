"""review4: an operator pauses fencing after the gate signed a decision, before the actuator
acts on it. The gate honours a pause only for the decisions it makes after it; the actuator's
last-moment checks (streams/actuation.py `last_moment`, streams/actuating.py `actuate`) never
look at a pause, so the decision is carried out (within decision_max_age, and its BMC retries
go on for actuator.fence_deadline). An operator who pressed pause expects no power-off from
then on. Fixed: the last-moment checks refuse a decision whose cluster is paused now
(streams.actuation.check_not_paused), the actuate agent also a global pause (kept only by the
settings store: streams.actuating.pause_reason), and the CloudStack recheck asked before every
power-down command asks it again, so a pause pressed during a fence's BMC retries stops the
next command. On a real Actuation (embedded broker, CloudStack simulator)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr

from fencing.records import FenceDecision, HostRef, HostStateRecord
from fencing.settings import ActuatorSettings, CloudStackSettings, ClusterSettings
from lab.cloudstack_sim import CloudStackSimulator, SimCloud
from probes.inventory import Inventory
from streams.actuation import Actuation, NotNow, read_decision
from streams.kafka import aiokafka_kwargs
from streams.topic_reader import TopicReader

from .test_actuation import RING, decision, signed

pytestmark = pytest.mark.timeout(120)


async def test_a_pause_set_after_the_decision_stops_it_at_the_last_moment(
    fencer_settings: Any,
) -> None:
    sc = SimCloud()
    cluster = sc.add_cluster(sc.add_zone())
    hv = sc.add_host(cluster, "hv1", "10.0.0.11", state="Disconnected")
    sim = CloudStackSimulator(sc)
    await sim.start()
    settings = fencer_settings(
        isolated_topics=True,
        cloudstack=CloudStackSettings(
            endpoint=sim.url, api_key=SecretStr(sim.api_key), secret_key=SecretStr(sim.secret_key)
        ),
        actuator=ActuatorSettings(decision_max_age=30.0),
    )
    t = settings.kafka.topics
    host = HostRef(host_uuid=hv.uuid, host_name="hv1", cluster_uuid=cluster.uuid)
    d = decision(at=time.time(), decision_id=f"{hv.uuid}/1", host=host, episode=1)
    producer = AIOKafkaProducer(acks="all", **aiokafka_kwargs(settings))
    await producer.start()
    read: dict[tuple[int, int], FenceDecision] = {}

    def on_record(r: Any) -> None:
        parsed = read_decision(RING, r)
        assert isinstance(parsed, FenceDecision)
        read[(r.partition, r.offset)] = parsed

    inventory = Inventory(settings)
    act = Actuation(settings, RING, "w", inventory.host, clock=time.monotonic)
    reader = TopicReader(settings, [t.fence_decisions], on_record)
    try:
        await act.start()
        record = {
            "decision_id": d.decision_id,
            "episode": 1,
            "state": "fencing",
            "last_evidence": "stale",
        }
        state = HostStateRecord(host=host, record=record, updated_at=time.time())
        await producer.send_and_wait(
            t.host_states, key=hv.uuid.encode(), value=state.model_dump_json().encode()
        )
        meta = await producer.send_and_wait(
            t.fence_decisions, key=hv.uuid.encode(), value=signed(d)
        )
        at = (meta.partition, meta.offset)
        await reader.start()
        # the operator paused the host's cluster after the gate signed the decision
        paused = settings.model_copy(
            update={"clusters": {cluster.uuid: ClusterSettings(paused=True)}}
        )
        with pytest.raises(NotNow, match="paus"):
            await act.last_moment(read[at], paused, position=at)
    finally:
        await reader.stop()
        await act.stop()
        await inventory.close()
        await producer.stop()
        await sim.stop()


async def test_a_pause_pressed_during_the_bmc_retries_stops_the_next_power_command() -> None:
    """The recheck before each power-down command (retries included) asks the pause first, even
    within the seconds a CloudStack "down" is taken as now."""
    from streams.actuation import CloudStackRecheck

    asked: list[str] = []

    async def ask(uuid: str) -> Any:
        asked.append(uuid)
        raise AssertionError("CloudStack must not be needed: the pause answers first")

    host = HostRef(host_uuid="h1", host_name="hv1", cluster_uuid="c1")
    d = decision(at=time.time(), decision_id="h1/1", host=host, episode=1)
    again = CloudStackRecheck(d, ask, time.monotonic)
    again.confirmed()  # CloudStack said "down" a moment ago
    await again()  # not paused: no question needed within RECHECK_AFTER
    again.paused = lambda: "fencing is paused for every cluster (paused after the decision)"
    with pytest.raises(NotNow, match="paused for every cluster"):
        await again()
    assert asked == []
