"""Nothing stalls silently on the actuation path (rule 5): a fence whose own action hangs is
cut in its process and told as failed; outcome sends that fail are retried in place.

Real peers: the embedded broker, a pyghmi BMC of the lab, the CloudStack simulator."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from fencing.events import FenceAction
from fencing.records import EvidenceSummary, FenceDecision, FenceOutcome, HostRef
from fencing.signing import DECISION, parse_keys, sign

pytestmark = pytest.mark.timeout(180)

KEYS = "k1 " + "s" * 40
RING = parse_keys(KEYS, "test")


def signed(d: FenceDecision) -> bytes:
    import json

    body = sign(RING, DECISION, d.model_dump(mode="json", exclude={"signature"}))
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass
class Lab:
    """A fenceable host (hv1, Disconnected, one VM) behind a lab BMC and the CloudStack
    simulator, and an actuate runtime listening on isolated topics."""

    settings: Any
    runtime: Any
    producer: Any
    sc: Any
    hv: Any
    vm: Any
    bmc: Any
    host: HostRef

    async def decide(self, n: int = 1, action: FenceAction = FenceAction.STOP) -> Any:
        """Back a decision with fencer's host record and write it: the message to actuate."""
        from fencing.records import HostStateRecord

        t = self.settings.kafka.topics
        d = FenceDecision(
            decision_id=f"{self.hv.uuid}/{n}",
            host=self.host,
            episode=n,
            action=action,
            approved=True,
            evidence=EvidenceSummary(suspect_since=900.0, stale_checks=3),
            decided_at=time.time(),
        )
        record = {
            "decision_id": d.decision_id,
            "episode": n,
            "state": "fencing",
            "last_evidence": "stale",
        }
        row = HostStateRecord(host=self.host, record=record, updated_at=time.time())
        key = self.hv.uuid.encode()
        await self.producer.send_and_wait(
            t.host_states, key=key, value=row.model_dump_json().encode()
        )
        meta = await self.producer.send_and_wait(t.fence_decisions, key=key, value=signed(d))
        return SimpleNamespace(
            key=key,
            value=signed(d),
            topic=t.fence_decisions,
            partition=meta.partition,
            offset=meta.offset,
        )


@contextlib.asynccontextmanager
async def lab(fencer_settings: Any, **actuator: Any) -> AsyncIterator[Lab]:
    from aiokafka import AIOKafkaProducer
    from pydantic import SecretStr

    from fencing.settings import (
        ActuatorSettings,
        CloudStackSettings,
        HostSettings,
        IpmiOverrides,
        IpmiSettings,
        SigningSettings,
    )
    from lab.bmc import BmcSimulator
    from lab.cloudstack_sim import CloudStackSimulator, SimCloud
    from streams.kafka import aiokafka_kwargs
    from streams.runtime import Runtime

    job_timeout = actuator.pop("job_timeout", 2)
    sc = SimCloud()
    cluster = sc.add_cluster(sc.add_zone())
    hv = sc.add_host(cluster, "hv1", "10.0.0.11", state="Disconnected")
    sc.add_host(cluster, "hv2", "10.0.0.12")
    vm = sc.add_vm(hv, "vm1")
    sim = CloudStackSimulator(sc)
    await sim.start()
    host = HostRef(host_uuid=hv.uuid, host_name="hv1", cluster_uuid=cluster.uuid)
    with BmcSimulator(password="pw", power="on") as bmc:
        settings = fencer_settings(
            isolated_topics=True,
            signing=SigningSettings(keys=SecretStr(KEYS)),
            cloudstack=CloudStackSettings(
                endpoint=sim.url,
                api_key=SecretStr(sim.api_key),
                secret_key=SecretStr(sim.secret_key),
                job_timeout=job_timeout,
                timeout=2,
            ),
            # The host's action is what the tests' decisions say (a live action gentler than
            # the decision's wins: fencing/actuator.py).
            defaults=IpmiSettings(password=SecretStr("pw"), port=bmc.port, action="stop"),
            hosts={hv.uuid: HostSettings(ipmi=IpmiOverrides(address="127.0.0.1"))},
            actuator=ActuatorSettings(
                **{
                    "claim_lease": 3.0,
                    "decision_max_age": 60.0,
                    "power_timeout": 5,
                    "poll_interval": 0.2,
                    **actuator,
                }
            ),
        )
        runtime = Runtime(settings=settings, started_at=0.0)
        producer = AIOKafkaProducer(acks="all", **aiokafka_kwargs(settings))
        await producer.start()
        try:
            await runtime.start_actuation()  # listening before the decision comes
            yield Lab(settings, runtime, producer, sc, hv, vm, bmc, host)
        finally:
            await producer.stop()
            await runtime.close()
            await sim.stop()


def outcome_in(out: list[Any], topic: str) -> FenceOutcome:
    return FenceOutcome.model_validate_json(next(v for t, _, v in out if t == topic))


# ---------------------------------------------------------------------------------------------
# 1. A claimant whose own action hangs is cut in its process


async def test_a_fence_whose_cloudstack_job_hangs_is_cut_at_its_bound_and_told_failed(
    fencer_settings: Any,
) -> None:
    """The BMC powers the host off (verified), then CloudStack's declareHostAsDegraded job
    never ends. Uncut, the claimant held its claim (renewals alive) for the job's retries and
    beyond; now the whole fence ends at actuator.fence_deadline + cloudstack.job_timeout in
    a failed outcome "timed out" (a fence_failed notice, then reminders), its claim `done`
    with it (a redelivery is answered, never run again), its entry marked so a retry reads the
    power first; no VM restarted by the cut run."""
    from streams.actuating import actuate

    async with lab(fencer_settings, fence_deadline=2.0, job_timeout=2) as s:
        s.sc.job_delay = 3600.0  # the job is accepted and never finishes
        msg = await s.decide()
        table: dict[str, Any] = {}
        started = time.monotonic()
        out = await actuate(s.runtime, msg, table)
        took = time.monotonic() - started
        t = s.settings.kafka.topics
        outcome = outcome_in(out, t.fence_outcomes)
        assert s.bmc.power == "off" and s.bmc.count("power_off") == 1  # the off was sent
        assert s.sc.vms[s.vm.uuid].host_uuid == s.hv.uuid  # no VM moved
        act = await s.runtime.actuation()
        done = act.claims.done(outcome.decision_id)
        # Redelivered: answered from the table, the BMC not driven again.
        again = await actuate(s.runtime, msg, table)
    assert not outcome.success and (outcome.error or "").startswith("timed out")
    assert "reads the power first" in (outcome.error or "")
    assert took < 4.0 + 5.0 + 3.0  # the bound, the cancel's grace, the checks around it
    assert table[s.hv.uuid][outcome.decision_id]["timed_out"] is True
    assert done is not None and done.outcome is not None and not done.outcome["success"]
    assert outcome_in(again, t.fence_outcomes) == outcome


async def test_an_operator_retry_of_a_timed_out_reboot_reads_the_power_first(
    fencer_settings: Any,
) -> None:
    """A reboot cut at its bound (here in its restart call's job, after off and on: the
    power may have been cut or not, as far as the outcome knows): the operator's retry reads
    the power and never sends a reboot blindly (the host is on); it fails, saying so."""
    from fencing.records import OperatorAction
    from streams.actuating import actuate, operator_action

    async with lab(fencer_settings, fence_deadline=3.0, job_timeout=2) as s:
        s.sc.job_delay = 3600.0
        msg = await s.decide(action=FenceAction.REBOOT)
        table: dict[str, Any] = {}
        out = await actuate(s.runtime, msg, table)
        outcome = outcome_in(out, s.settings.kafka.topics.fence_outcomes)
        assert (outcome.error or "").startswith("timed out")
        assert s.bmc.power == "on"
        offs = s.bmc.count("power_off")
        action = OperatorAction(
            kind="retry", host_uuid=s.hv.uuid, decision_id=outcome.decision_id, at=time.time()
        )
        retried = await operator_action(s.runtime, action, table, s.hv.uuid)
        assert s.bmc.count("power_off") == offs and s.bmc.count("power_reset") == 0
    assert retried is not None and not retried.success
    assert "never repeated blindly" in (retried.error or "")


# ---------------------------------------------------------------------------------------------
# 2. Outcome and notice sends that fail are retried in place, never raised out of the agent


class FlakyProducer:
    """Sends through a real producer to the embedded broker; the first `fail` sends raise as
    a producer that lost the broker does."""

    def __init__(self, producer: Any, fail: int) -> None:
        self.producer, self.fail, self.calls = producer, fail, 0

    async def send(self, topic: str, key: bytes, value: bytes) -> Any:
        from aiokafka.errors import KafkaConnectionError

        self.calls += 1
        if self.calls <= self.fail:
            raise KafkaConnectionError("the broker went away (injected)")
        return await self.producer.send_and_wait(topic, key=key, value=value)


async def _read_all(settings: Any, topic: str, want: int) -> list[tuple[bytes, bytes]]:
    from streams.topic_reader import TopicReader

    got: list[tuple[bytes, bytes]] = []
    reader = TopicReader(settings, [topic], lambda r: got.append((r.key, r.value)))
    await reader.start(30.0)
    try:
        for _ in range(100):
            if len(got) >= want:
                break
            await asyncio.sleep(0.1)
    finally:
        await reader.stop()
    return got


async def test_an_outcome_send_that_fails_is_retried_in_place_until_the_broker_takes_it(
    fencer_settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The actuate agent's sends raised out of its loop (Faust logs the crash; the outcome
    waited for a restart). Now each send is tried again at a growing pause, in order, and the
    record reaches the topic once the producer works again; nothing is re-run."""
    from aiokafka import AIOKafkaProducer

    from streams.actuating import send_out
    from streams.kafka import aiokafka_kwargs

    settings = fencer_settings(isolated_topics=True)
    t = settings.kafka.topics
    producer = AIOKafkaProducer(acks="all", **aiokafka_kwargs(settings))
    await producer.start()
    try:
        flaky = FlakyProducer(producer, fail=3)
        out = [(t.fence_outcomes, b"h1", b'{"o":1}'), (t.notices, b"h1", b'{"n":1}')]
        with caplog.at_level("WARNING", logger="fencer.streams"):
            started = time.monotonic()
            lost = await send_out(out, flaky.send, backoff=0.1)
            took = time.monotonic() - started
    finally:
        await producer.stop()
    assert lost == [] and flaky.calls == 5  # 3 failures, then each record once
    assert 0.1 + 0.2 + 0.4 - 0.05 <= took < 10  # the pauses doubled
    assert await _read_all(settings, t.fence_outcomes, 1) == [(b"h1", b'{"o":1}')]
    assert await _read_all(settings, t.notices, 1) == [(b"h1", b'{"n":1}')]
    lines = [r.getMessage() for r in caplog.records]
    assert sum("not sent (attempt" in line for line in lines) == 3
    assert any("sent at attempt 4" in line for line in lines)


async def test_a_send_that_keeps_failing_is_logged_as_an_error_and_the_rest_still_go(
    fencer_settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from aiokafka import AIOKafkaProducer

    from streams.actuating import send_out
    from streams.kafka import aiokafka_kwargs

    settings = fencer_settings(isolated_topics=True)
    t = settings.kafka.topics
    producer = AIOKafkaProducer(acks="all", **aiokafka_kwargs(settings))
    await producer.start()
    try:
        flaky = FlakyProducer(producer, fail=4)
        out = [(t.fence_outcomes, b"h1", b'{"o":1}'), (t.notices, b"h1", b'{"n":1}')]
        with caplog.at_level("WARNING", logger="fencer.streams"):
            lost = await send_out(out, flaky.send, tries=4, backoff=0.05)
    finally:
        await producer.stop()
    assert lost == [out[0]]
    assert await _read_all(settings, t.notices, 1) == [(b"h1", b'{"n":1}')]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "NOT sent after 4 attempts" in errors[0]
    assert t.fence_outcomes in errors[0] and '{"o":1}' not in errors[0]


class ProducerTopic:
    """A topic as Faust's `Topic.send` hands it to the agent: the record enqueued on a real
    producer, the delivery's future returned (it fails later if the broker never takes it)."""

    def __init__(self, producer: Any, name: str) -> None:
        self.producer, self.name = producer, name

    async def send(self, *, key: bytes, value: bytes) -> Any:
        return await self.producer.send(self.name, value, key=key)


async def test_an_outcome_the_broker_does_not_take_is_sent_again_not_lost(
    fencer_settings: Any,
) -> None:
    """The broker stops taking records (a proxy drops every Produce request; metadata passes):
    the agent's send only enqueued the outcome, its delivery failed (the connection closed, or
    the producer's request timed out) and the outcome was lost with a log line. Now each send
    waits for the broker's acknowledgement and is sent again: once the broker takes records
    again, the outcome is on the topic."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    from streams.actuating import send_out, topic_sender
    from streams.kafka import aiokafka_kwargs
    from tests.streams.kafka_proxy import PRODUCE, KafkaProxy, ProxiedBroker

    proxy = KafkaProxy()
    await proxy.start()
    try:
        async with ProxiedBroker(proxy) as broker:
            settings = broker.fencer_settings()
            name = settings.kafka.topics.fence_outcomes
            producer = AIOKafkaProducer(
                acks="all", request_timeout_ms=1500, **aiokafka_kwargs(settings)
            )
            await producer.start()
            try:
                topic = ProducerTopic(producer, name)
                await (await topic.send(key=b"h0", value=b"warm"))  # metadata, a connection
                proxy.drop.add(PRODUCE)
                # What the agent did: enqueued, never delivered.
                before = await topic.send(key=b"h1", value=b"lost")
                with pytest.raises(KafkaError):
                    await asyncio.wait_for(before, 20)
                sending = asyncio.create_task(
                    send_out([(name, b"h2", b"kept")], topic_sender({name: topic}), backoff=0.5)
                )
                await asyncio.sleep(4.0)
                assert not sending.done() and proxy.dropped >= 2
                proxy.drop.clear()
                assert await asyncio.wait_for(sending, 30) == []
            finally:
                await producer.stop()
            got = await _read_all(settings, name, 2)
    finally:
        await proxy.stop()
    values = [v for _, v in got]
    assert b"kept" in values and b"lost" not in values


# ---------------------------------------------------------------------------------------------
# 4. The VMs of a fenced host are followed again after an actuator restart


async def test_the_vms_of_a_fenced_host_are_followed_again_after_the_actuator_restarts(
    fencer_settings: Any,
) -> None:
    """Worker A fences the host (verified off, declareHostAsDegraded done) and follows its VM,
    which CloudStack's HA never restarts; A dies before the first vms_not_restarted notice is
    due. Before, the following ended with A: nobody was told. Now the outcome keeps the VMs
    (`vms`, in the `actuated` entry) and the restarted worker's reminder timer follows them
    again while fencer's host record shows the host fenced by that decision: the VM is told.
    Once per process; a host whose record moved on (back Up: idle) is not followed again."""
    from fencing.events import NoticeKind
    from fencing.records import HostStateRecord, Notice
    from streams.actuating import actuate, resume_follows
    from streams.runtime import Runtime

    async with lab(fencer_settings, fence_deadline=10.0, job_timeout=2) as s:
        s.sc.ha_delay = 3600.0  # the job ends, the VM is never restarted elsewhere
        told_a: list[Notice] = []

        async def sink_a(n: Notice) -> None:
            told_a.append(n)

        s.runtime.notice_sink = sink_a
        msg = await s.decide()
        table: dict[str, Any] = {}
        out = await actuate(s.runtime, msg, table)
        outcome = outcome_in(out, s.settings.kafka.topics.fence_outcomes)
        assert outcome.success and outcome.vms == {s.vm.uuid: "vm1"}
        entry = table[s.hv.uuid][outcome.decision_id]
        assert entry["vms"] == {s.vm.uuid: "vm1"}
        # The core takes the outcome: the host is fenced by this decision (host-states).
        fenced = {
            "decision_id": outcome.decision_id,
            "episode": 1,
            "state": "fenced",
            "last_evidence": "stale",
        }
        row = HostStateRecord(host=s.host, record=fenced, updated_at=time.time())
        await s.producer.send_and_wait(
            s.settings.kafka.topics.host_states,
            key=s.hv.uuid.encode(),
            value=row.model_dump_json().encode(),
        )
        # Worker A dies mid-follow: its following ends with it, nothing told yet.
        a = s.runtime.actuator()
        for task in list(a._following):
            task.cancel()
        await asyncio.sleep(0.1)
        assert not a._following and not [n for n in told_a if n.kind == "vms_not_restarted"]

        b = Runtime(settings=s.settings, started_at=0.0)
        told: list[Notice] = []

        async def sink_b(n: Notice) -> None:
            told.append(n)

        b.notice_sink = sink_b
        try:
            loop = asyncio.get_running_loop()
            end = loop.time() + 20
            started = 0
            while started == 0:  # the timer's ticks, until B's view of host-states has the row
                assert loop.time() < end, "B never followed the VMs again"
                started = await resume_follows(b, list(table.items()))
                await asyncio.sleep(0.2)
            assert await resume_follows(b, list(table.items())) == 0  # once per process
            end = loop.time() + 20
            while not told:
                assert loop.time() < end, "the VM that never restarted was not told"
                await asyncio.sleep(0.2)
            # A host whose record moved on is not followed again (a third process).
            idle = HostStateRecord(host=s.host, record={"state": "idle"}, updated_at=time.time())
            await s.producer.send_and_wait(
                s.settings.kafka.topics.host_states,
                key=s.hv.uuid.encode(),
                value=idle.model_dump_json().encode(),
            )
            c = Runtime(settings=s.settings, started_at=0.0)
            try:
                act_c = await c.actuation()
                while (act_c.states.rows.get(s.hv.uuid) or {}).get("record", {}).get(
                    "state"
                ) != "idle":
                    assert loop.time() < end + 20
                    await asyncio.sleep(0.1)
                assert await resume_follows(c, list(table.items())) == 0
            finally:
                await c.close()
        finally:
            for task in list(b.actuator()._following):
                task.cancel()  # it would follow for vms_follow_for
            await b.close()
    notice = told[0]
    assert notice.kind is NoticeKind.VMS_NOT_RESTARTED
    assert notice.decision_id == outcome.decision_id and "vm1" in (notice.reason or "")
    assert "followed again after an actuator restart" in (notice.reason or "")


# ---------------------------------------------------------------------------------------------
# 5. A host removed from CloudStack: one last notice, and its reminders end


async def test_a_failed_fence_of_a_host_removed_from_cloudstack_ends_with_one_last_notice(
    fencer_settings: Any,
) -> None:
    """A failed fence is reminded of every renotify_interval until an operator acts: for a
    host force-removed from CloudStack mid-episode, for ever. Now, when a reminder is due and
    CloudStack's listHosts no longer lists the host (while it lists the others), a last
    notice says so instead and fencer marks the failed fence handled (an operator-actions
    record): the reminders end. CloudStack failing to answer is not "removed": the reminder
    goes out as before (unknown is never gone)."""
    from fencing.events import NoticeKind
    from fencing.records import OperatorAction
    from streams.actuating import REMOVED_BY, operator_action, reminders_of_listed_hosts
    from streams.actuation import read_decision
    from streams.tables import done_entry, failed_runs

    async with lab(fencer_settings) as s:
        rt = s.runtime
        t = s.settings.kafka.topics
        msg = await s.decide()
        d = read_decision((await rt.actuation()).ring, msg)
        assert isinstance(d, FenceDecision)
        now = time.time()
        failed = FenceOutcome(
            decision_id=d.decision_id,
            host=d.host,
            episode=d.episode,
            action=d.action,
            driver="ipmi",
            success=False,
            started_at=now,
            finished_at=now,
            error="the BMC did not answer",
        )
        # Written by another process (a restart): reminded at once.
        table = {s.hv.uuid: {d.decision_id: {**done_entry(d, failed), "written_by": "other"}}}
        due = rt.due_reminders(list(table.items()), now, mono=1000.0)
        assert len(due) == 1 and due[0].kind is NoticeKind.FENCE_FAILED
        assert await reminders_of_listed_hosts(rt, due) == due  # listed: reminded
        s.sc.fail_next_calls["listhosts"] = 10  # CloudStack answers 530: unknown
        assert await reminders_of_listed_hosts(rt, due) == due
        assert s.sc.fail_next_calls["listhosts"] < 10  # it was asked, and failed
        s.sc.fail_next_calls.clear()
        del s.sc.hosts[s.hv.uuid]  # force-removed from CloudStack
        (last,) = await reminders_of_listed_hosts(rt, due)
        from streams.topic_reader import TopicReader

        actions: list[OperatorAction] = []
        reader = TopicReader(
            s.settings,
            [t.operator_actions],
            lambda r: actions.append(OperatorAction.model_validate_json(r.value)),
        )
        await reader.start(30.0)
        await reader.stop()
        (handled,) = actions
        assert handled.kind == "handled" and handled.by == REMOVED_BY
        assert handled.decision_id == d.decision_id and handled.host_uuid == s.hv.uuid
        # The operator agent stores it: no reminder any more.
        assert await operator_action(rt, handled, table, s.hv.uuid) is None
        assert failed_runs(table.items()) == []
        assert rt.due_reminders(list(table.items()), now, mono=1000.0 + 7200) == []
    assert last.kind is NoticeKind.FENCE_FAILED
    assert last.notice_id == f"{d.decision_id}/host-removed"
    assert "no longer exists in CloudStack" in (last.result or "")
    assert "no further reminder" in (last.reason or "")
