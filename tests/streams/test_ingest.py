"""The event bus shortcuts of streams.ingest: the byte check never skips a record that matters,
and the batched consumer delivers every signal, in partition order, before it commits, also
across a consumer that dies mid-batch. Against the embedded broker and the CloudStack simulator.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.ingest_rate import noise
from lab.cloudstack_sim import SimCloud, gson_description
from streams import codec, parser
from streams.ingest import EventBusConsumer, Ingest, may_matter
from streams.kafka import aiokafka_kwargs, prepare_kafka
from streams.poller import HostDirectory

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "cloudstack-events.jsonl"
# What Ingest.signal turns into a host signal (or a dead letter: Rejected).
MATTERS = (
    parser.HostDisconnectedAlert,
    parser.HostDownAlert,
    parser.HostAlertStateAlert,
    parser.MaintenancePrepare,
    parser.MaintenanceCancel,
    parser.Rejected,
)


def _cloud() -> tuple[SimCloud, list[Any]]:
    cloud = SimCloud()
    cluster = cloud.add_cluster(cloud.add_zone("zone1"), "cluster1")
    hosts = [cloud.add_host(cluster, f"kvm{i:02d}", f"10.1.0.{i + 1}") for i in range(3)]
    return cloud, hosts


def _host_records(cloud: SimCloud, hosts: list[Any]) -> list[tuple[str | None, str]]:
    """Every kind of record the simulator publishes about a host's trouble or maintenance."""
    for h in hosts:
        for state in ("Disconnected", "Up", "Down", "Up", "Alert", "Up"):
            cloud.set_host_state(h.uuid, state)
        cloud.run_prepare_maintenance(cloud.hosts[h.uuid])
        cloud.run_cancel_maintenance(cloud.hosts[h.uuid])
    return list(cloud.events)


def test_cloudstack_noise_is_skipped_on_its_bytes_and_would_have_given_nothing() -> None:
    rng = random.Random(7)
    vms = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(20)]
    seen = set()
    for _ in range(500):
        kind, records = noise(rng, "zone-uuid", "account-uuid", vms, vms)
        for key, value in records:
            seen.add(kind)
            assert not may_matter(value.encode()), value
            assert not isinstance(parser.parse_record(key, value), MATTERS)
    assert seen == {"vm", "volume", "usage"}


def test_every_host_record_the_simulator_publishes_passes_the_byte_check() -> None:
    cloud, hosts = _cloud()
    records = _host_records(cloud, hosts)
    kinds = {type(parser.parse_record(k, v)) for k, v in records}
    assert {parser.HostDisconnectedAlert, parser.HostDownAlert, parser.MaintenancePrepare} <= kinds
    for key, value in records:
        if isinstance(parser.parse_record(key, value), MATTERS):
            assert may_matter(value.encode()), value


def test_every_shipped_sample_that_matters_passes_the_byte_check() -> None:
    checked = 0
    for line in SAMPLES.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        value = rec["value"]
        raw = value.encode() if isinstance(value, str) else value
        if isinstance(parser.parse_record(rec["key"], value), MATTERS):
            checked += 1
            assert raw is None or may_matter(raw), value
    assert checked >= 3  # the shipped alerts and maintenance events


@pytest.mark.parametrize(
    "value",
    [
        b"\xff\xfe not json",
        b'{"event": 5}',
        b'{"resource":"VirtualMachine","id":1}',
        b'{"resource":"VirtualMachine","x":{"y":"z"}}',
        b'{"resource":"VirtualMachine","x":["y"]}',
        b'{"resource":"Host","event":"\\u0041LERT.COMPUTE.HOST"}',
        b'{"foo":"bar"}',  # no resource: not noise fencer knows, parsed (and dead-lettered)
        b"",
        None,
        "a str, not bytes",
    ],
)
def test_anything_but_known_flat_noise_is_parsed(value: Any) -> None:
    assert may_matter(value)


_words = st.sampled_from(
    ["ALERT.COMPUTE.HOST", "ALERT.", "MAINT.PREPARE", "MAINT.CANCEL", "Host disconnected, ", "x"]
)
_text = st.lists(
    st.text(alphabet=list('abAL.ERTCOMPUHSMINP{}[]":,\\u0 '), max_size=8) | _words, max_size=4
).map("".join)


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["event", "subject", "status", "resource", "id", "new-state", "entity"])
        | _text,
        _text,
        max_size=6,
    )
)
def test_a_skipped_record_never_parses_to_a_host_signal(d: dict[str, str]) -> None:
    for value in (json.dumps(d, separators=(",", ":")), gson_description(dict(d))):
        if not may_matter(value.encode()):
            got = parser.parse_record(None, value)
            assert not isinstance(got, MATTERS[:-1]), (value, got)


# -- the batched consumer against the embedded broker -------------------------------------


class _Out:
    """Records the consumer hands to the producer; optionally fails one send (a dying worker)."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, fail_at: int | None = None) -> None:
        self.producer, self.topic, self.fail_at = producer, topic, fail_at
        self.sent: list[tuple[str, bytes | None, bytes]] = []

    async def send(self, kind: str, key: bytes | None, value: bytes) -> Any:
        if self.fail_at is not None and len(self.sent) == self.fail_at:
            raise ConnectionError("the worker died here")
        self.sent.append((kind, key, value))
        return await self.producer.send(self.topic, value, key=key)


async def _fill(settings: Any, topic: str, cloud: SimCloud, hosts: list[Any]) -> list[str]:
    """Noise with the hosts' alerts in between; the alerts' host uuids in produced order."""
    rng = random.Random(3)
    vms = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(50)]
    producer = AIOKafkaProducer(**aiokafka_kwargs(settings))
    await producer.start()
    order: list[str] = []
    try:
        for i in range(600):
            for key, value in noise(rng, "z", "a", vms, vms)[1]:
                await producer.send(topic, value.encode(), key=key.encode(), partition=i % 2)
            if i % 50 == 0:
                h = hosts[(i // 50) % len(hosts)]
                cloud.set_host_state(h.uuid, "Disconnected")
                cloud.set_host_state(h.uuid, "Up")
                _, value = cloud.events.pop()
                await producer.send(topic, value.encode(), partition=0)
                order.append(h.uuid)
        await producer.send(topic, b"\xff not json", partition=1)
        await producer.flush()
    finally:
        await producer.stop()
    return order


def _consumer(settings: Any, out: _Out, group: str, topic: str, hosts: list[Any]) -> Any:
    directory = HostDirectory(placed={h.uuid: (h.cluster_uuid, h.ip) for h in hosts})

    def no_inventory() -> Any:
        raise AssertionError("every host is in the directory")

    return EventBusConsumer(
        ingest=Ingest(no_inventory, directory),
        topic=topic,
        group_id=group,
        send=out.send,
        make_consumer=lambda **kw: AIOKafkaConsumer(**aiokafka_kwargs(settings), **kw),
        dead_letter=codec.dead_letter,
        encode_signal=codec.dump,
        max_records=300,
    )


async def _run_until(bus: EventBusConsumer, done: Any, timeout: float = 60.0) -> None:
    task = asyncio.create_task(bus.run())
    try:
        async with asyncio.timeout(timeout):
            while not done():
                if task.done():
                    task.result()
                    return
                await asyncio.sleep(0.05)
    finally:
        await bus.stop()
        await asyncio.wait_for(task, 30)


async def _committed(settings: Any, group: str, topic: str) -> dict[int, int | None]:
    c = AIOKafkaConsumer(group_id=group, enable_auto_commit=False, **aiokafka_kwargs(settings))
    await c.start()
    try:
        return {p: await c.committed(TopicPartition(topic, p)) for p in (0, 1)}
    finally:
        await c.stop()


async def test_batched_ingest_keeps_host_order_and_rereads_a_batch_that_died(fencer_settings):
    s = fencer_settings(isolated_topics=True)
    prepare_kafka(s)  # Tansu's end offsets, corrected (streams.tansu_compat)
    topic = s.kafka.topics.cloudstack
    cloud, hosts = _cloud()
    order = await _fill(s, topic, cloud, hosts)
    group = f"{s.kafka.group_id}.event-bus"
    producer = AIOKafkaProducer(**aiokafka_kwargs(s))
    await producer.start()
    try:
        # First consumer dies at its third signal: the batch holding it is never committed.
        first = _Out(producer, s.kafka.topics.host_signals, fail_at=2)
        bus = _consumer(s, first, group, topic, hosts)
        died = asyncio.create_task(bus.run())
        async with asyncio.timeout(60):
            while len(first.sent) < 2:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the failed batch is logged and read again (and fails again)
        await bus.stop()
        await asyncio.wait_for(died, 30)
        committed = await _committed(s, group, topic)
        ends = await _ends(s, topic)
        assert committed[0] is None or committed[0] < ends[0]  # the alerts' batch: not committed

        # The next owner of the group reads on from the committed offsets: every alert arrives,
        # in order, and the junk record reaches the dead letters.
        second = _Out(producer, s.kafka.topics.host_signals)
        bus2 = _consumer(s, second, group, topic, hosts)

        async def all_committed() -> bool:
            return await _committed(s, group, topic) == ends

        state = {"done": False}

        def done() -> bool:
            return state["done"]

        async def watch() -> None:
            while not await all_committed():
                await asyncio.sleep(0.2)
            state["done"] = True

        watcher = asyncio.create_task(watch())
        await _run_until(bus2, done)
        await watcher
    finally:
        await producer.stop()

    def hosts_of(out: _Out) -> list[str]:
        return [json.loads(v)["host"]["host_uuid"] for kind, _, v in out.sent if kind == "signal"]

    # At least once, in order: the next owner starts at or before the batch that died, and
    # nothing after it is missing.
    before = hosts_of(first)
    assert before == order[: len(before)] and len(before) <= 2
    resumed_at = len(order) - len(hosts_of(second))
    assert 0 <= resumed_at <= len(before) and hosts_of(second) == order[resumed_at:]
    dead = [json.loads(v) for kind, _, v in first.sent + second.sent if kind == "dead"]
    assert {d["reason"] for d in dead} == {"value is not UTF-8 text"}
    c = bus2.counts
    assert c["skipped"] > 500 and c["skipped"] == c["records"] - c["signals"] - c["dead"]


async def _ends(settings: Any, topic: str) -> dict[int, int]:
    c = AIOKafkaConsumer(group_id=None, **aiokafka_kwargs(settings))
    await c.start()
    try:
        tps = [TopicPartition(topic, p) for p in (0, 1)]
        return {tp.partition: off for tp, off in (await c.end_offsets(tps)).items()}
    finally:
        await c.stop()
