"""Ingest rate of CloudStack's event bus when more than 99% of it is noise: a real
`fencer worker --roles ingest` process against a plain aiokafka consumer (getmany, no parsing)
reading the same topic on the same embedded broker, in the same run.

Rule: the topic (isolated, unique prefix) holds N records in CloudStack's exact formats (Gson
descriptions): VM pre/post state transitions, volume state changes, usage events
(`UsageEventUtils.publishUsageEvent`: account, zone, event, resource, id, eventDateTime), and a
few "Host disconnected" alerts of hosts the CloudStack simulator knows: one at the head and one
at the tail of every partition, a few in between. Fencer's time is measured two ways, both
reported as measured:
- `signal_span`: from the first to the last host signal the worker wrote on host-signals
  (their CreateTime, stamped by the worker when it produced them): the head/tail alerts make
  this the time to ingest everything in between;
- `commit_detected`: from the first host signal until the worker's committed offsets for its
  consumer group reach the end offsets (Faust commits every ~2.8 s: nothing is subtracted).
The raw consumer is run before and after the worker; the faster of the two is the baseline of
the ratio (the choice least flattering to fencer).

    python -m benchmarks.ingest_rate --json [--records N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from fencing.settings import (
    CloudStackSettings,
    FencerSettings,
    PolicySettings,
    SigningSettings,
    TopicNames,
)
from fencing.signing import write_keys_file
from lab.cloudstack_sim import CloudStackSimulator, SimCloud, event_time, gson_description
from lab.pipeline import WorkerProcess, write_settings
from streams.broker import EmbeddedBroker
from streams.kafka import aiokafka_kwargs, ensure_topics, prepare_kafka

TARGET_RATIO = 0.25
VM_STATES = [("Stopped", "Starting"), ("Starting", "Running"), ("Running", "Stopping")]
VOLUME_STATES = [("Allocated", "Creating"), ("Creating", "Ready"), ("Ready", "Migrating")]
USAGE_TYPES = ["VM.START", "VM.STOP", "VOLUME.CREATE", "NETWORK.OFFERING.ASSIGN"]


async def isolated_settings(
    broker: EmbeddedBroker, data_dir: Path, **update: Any
) -> FencerSettings:
    """Settings on `broker` with a unique topic prefix and group id; the topics are created."""
    unique = uuid.uuid4().hex[:8]
    names = {f: f"b{unique}.{name}" for f, name in TopicNames().model_dump().items()}
    kafka = broker.kafka_settings().model_copy(
        update={"group_id": f"fencer-bench-{unique}", "topics": TopicNames(**names)}
    )
    # The ingest role runs the gate, which signs its decisions: it needs a key.
    keys = write_keys_file(data_dir / "signing.keys")
    update = {"signing": SigningSettings(keys_file=keys), **update}
    settings = FencerSettings().model_copy(update={"kafka": kafka, "data_dir": data_dir, **update})
    prepare_kafka(settings)
    await ensure_topics(settings)
    return settings


def noise(
    rng: random.Random, zone: str, account: str, vms: list[str], vols: list[str]
) -> tuple[str, list[tuple[str, str]]]:
    """A few irrelevant records: a VM transition (pre + post), a volume change or a usage event."""
    when = event_time(time.time())
    pick = rng.random()
    if pick < 0.6:
        vm = rng.choice(vms)
        old, new = rng.choice(VM_STATES)
        return "vm", [
            (
                vm,
                gson_description(
                    {
                        "eventDateTime": when,
                        "old-state": old,
                        "resource": "VirtualMachine",
                        "id": vm,
                        "new-state": new,
                        "status": status,
                    }
                ),
            )
            for status in ("preStateTransitionEvent", "postStateTransitionEvent")
        ]
    if pick < 0.85:
        vol = rng.choice(vols)
        old, new = rng.choice(VOLUME_STATES)
        return "volume", [
            (
                vol,
                gson_description(
                    {
                        "eventDateTime": when,
                        "old-state": old,
                        "resource": "Volume",
                        "id": vol,
                        "new-state": new,
                    }
                ),
            )
        ]
    vm = rng.choice(vms)
    usage = {
        "account": account,
        "zone": zone,
        "event": rng.choice(USAGE_TYPES),
        "resource": "VirtualMachine",
        "id": vm,
        "eventDateTime": when,
    }
    return "usage", [(vm, gson_description(usage))]


async def _end_offsets(settings: FencerSettings, topic: str) -> dict[TopicPartition, int]:
    c = AIOKafkaConsumer(group_id=None, **aiokafka_kwargs(settings))
    await c.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or [])]
        if not tps:
            await c.topics()
            tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or [])]
        return dict(await c.end_offsets(tps))
    finally:
        await c.stop()


async def produce(
    settings: FencerSettings, records: int, sim: SimCloud, seed: int
) -> dict[str, Any]:
    """Fill the cloudstack topic; return what was produced."""
    rng = random.Random(seed)
    topic = settings.kafka.topics.cloudstack
    zone = next(iter(sim.zones.values())).uuid
    account = sim.account_uuid
    vms = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(2000)]
    vols = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(3000)]
    hosts = list(sim.hosts.values())

    def alert(i: int) -> tuple[str | None, str]:
        h = hosts[i % len(hosts)]
        sim.set_host_state(h.uuid, "Disconnected")
        sim.set_host_state(h.uuid, "Up")  # an agent reconnect publishes nothing
        return sim.events.pop()

    producer = AIOKafkaProducer(linger_ms=5, max_batch_size=256 * 1024, **aiokafka_kwargs(settings))
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(topic))
        n_alerts = 0
        futures = []
        for p in partitions:  # head of every partition
            key, value = alert(n_alerts)
            n_alerts += 1
            futures.append(await producer.send(topic, value.encode(), partition=p))
        body = records - 2 * len(partitions) - 4
        middle = sorted(body * k // 5 for k in range(1, 5))
        sent = 0
        kinds = {"vm": 0, "volume": 0, "usage": 0}
        while sent < body:
            if middle and sent >= middle[0]:
                key, value = alert(n_alerts)
                n_alerts += 1
                futures.append(await producer.send(topic, value.encode()))
                middle.pop(0)
            kind, batch = noise(rng, zone, account, vms, vols)
            for key, value in batch:
                kinds[kind] += 1
                futures.append(await producer.send(topic, value.encode(), key=key.encode()))
                sent += 1
        for p in partitions:  # tail of every partition
            key, value = alert(n_alerts)
            n_alerts += 1
            futures.append(await producer.send(topic, value.encode(), partition=p))
        await producer.flush()
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    total = sum((await _end_offsets(settings, topic)).values())
    return {"records": total, "host_alerts": n_alerts, "irrelevant": total - n_alerts, **kinds}


async def raw_consumer(settings: FencerSettings) -> dict[str, Any]:
    """A plain aiokafka consumer reading the whole topic with getmany, no parsing."""
    topic = settings.kafka.topics.cloudstack
    ends = await _end_offsets(settings, topic)
    c = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **aiokafka_kwargs(settings))
    await c.start()
    try:
        c.assign(list(ends))
        await c.seek_to_beginning()
        count = 0
        t0 = time.perf_counter()
        while True:
            batch = await c.getmany(timeout_ms=500, max_records=10_000)
            count += sum(len(v) for v in batch.values())
            positions = {tp: await c.position(tp) for tp in ends}
            if all(positions[tp] >= end for tp, end in ends.items()):
                break
        wall = time.perf_counter() - t0
    finally:
        await c.stop()
    return {"records": count, "seconds": round(wall, 3), "records_per_s": round(count / wall)}


async def _committed(
    reader: AIOKafkaConsumer, tps: list[TopicPartition]
) -> dict[TopicPartition, int]:
    # An OffsetFetch through a consumer of the group that never joins it (manual assignment):
    # the admin client's ListConsumerGroupOffsets does not decode against Tansu.
    return {tp: (await reader.committed(tp)) or -1 for tp in tps}


def _alert_signals(batch: dict[Any, list[Any]]) -> list[float]:
    """CreateTimes (s) of the host signals made from event-bus records (not polls or ticks)."""
    return [
        m.timestamp / 1000
        for msgs in batch.values()
        for m in msgs
        if json.loads(m.value).get("source", "event-bus") == "event-bus"
    ]


async def fencer_ingest(settings: FencerSettings, workdir: Path, timeout: float) -> dict[str, Any]:
    """Run a real ingest worker over the topic from its beginning; time it."""
    names = settings.kafka.topics
    ends = await _end_offsets(settings, names.cloudstack)
    # streams.app: the event bus consumer group of a partial worker (app id + ".event-bus")
    group = f"{settings.kafka.group_id}-ingest.event-bus"
    tail = AIOKafkaConsumer(
        names.host_signals, group_id=None, auto_offset_reset="earliest", **aiokafka_kwargs(settings)
    )
    await tail.start()
    reader = AIOKafkaConsumer(group_id=group, enable_auto_commit=False, **aiokafka_kwargs(settings))
    await reader.start()
    reader.assign(list(ends))
    signals: list[float] = []  # CreateTime of each host signal, seconds
    worker = WorkerProcess(
        write_settings(settings, workdir / "fencer.yaml"), "ingest", workdir / "worker.log"
    )
    started = time.time()
    worker.start()
    try:
        done_at = None
        deadline = time.monotonic() + timeout
        while done_at is None:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the ingest worker did not finish in {timeout:g} s (see {worker.log_file})"
                )
            if worker.proc is not None and worker.proc.poll() is not None:
                raise RuntimeError(f"the ingest worker exited ({worker.log_file})")
            batch = await tail.getmany(timeout_ms=100)
            signals += _alert_signals(batch)
            committed = await _committed(reader, list(ends))
            if all(committed.get(tp, -1) >= end for tp, end in ends.items()):
                done_at = time.time()
        # Host signals the worker wrote just before the commit may still be on their way.
        batch = await tail.getmany(timeout_ms=1000)
        signals += _alert_signals(batch)
    finally:
        worker.stop()
        await reader.stop()
        await tail.stop()
    records = sum(ends.values())
    first, last = min(signals), max(signals)
    span, committed_span = last - first, done_at - first
    return {
        "records": records,
        "host_signals": len(signals),
        "signal_span": {"seconds": round(span, 3), "records_per_s": round(records / span)},
        "commit_detected": {
            "seconds": round(committed_span, 3),
            "records_per_s": round(records / committed_span),
        },
        "worker_start_to_first_signal_s": round(first - started, 3),
    }


async def run(records: int, seed: int = 1, timeout: float = 300.0) -> dict[str, Any]:
    """Broker, simulator, topic; both consumers; the figures."""
    cloud = SimCloud()
    cluster = cloud.add_cluster(cloud.add_zone("zone1"), "cluster1")
    for i in range(12):
        cloud.add_host(cluster, f"kvm{i:02d}", f"10.1.0.{i + 1}")
    with tempfile.TemporaryDirectory(prefix="fencer-bench-") as tmp:
        async with EmbeddedBroker() as broker, CloudStackSimulator(cloud) as sim:
            settings = await isolated_settings(
                broker,
                Path(tmp),
                # No polls, no startup quiet: only the topic's alerts make host signals.
                policy=PolicySettings(startup_quiet=0),
                cloudstack=CloudStackSettings(
                    endpoint=sim.url,
                    api_key=sim.api_key,
                    secret_key=sim.secret_key,
                    poll_interval=3600.0,
                ),
            )
            t0 = time.perf_counter()
            produced = await produce(settings, records, cloud, seed)
            produce_s = time.perf_counter() - t0
            # CloudStack shows the alerted hosts disconnected: a started leader polls listHosts at
            # once (since 2026-11-30), and an alert for a host CloudStack reports Up is ignored.
            for host in cloud.hosts.values():
                cloud.set_host_state(host.uuid, "Disconnected")
            before = await raw_consumer(settings)
            ours = await fencer_ingest(settings, Path(tmp), timeout)
            after = await raw_consumer(settings)
            dead = sum((await _end_offsets(settings, settings.kafka.topics.dead_letter)).values())
    base = max(before, after, key=lambda r: r["records_per_s"])
    ratio = ours["signal_span"]["records_per_s"] / base["records_per_s"]
    ratio_commit = ours["commit_detected"]["records_per_s"] / base["records_per_s"]
    return {
        "benchmark": "ingest_rate",
        "produced": {
            **produced,
            "relevant_share": round(produced["host_alerts"] / produced["records"], 5),
            "produce_seconds": round(produce_s, 2),
        },
        "fencer": {**ours, "dead_letters": dead},
        "baseline_raw_consumer": {"before": before, "after": after},
        "baseline_used": "the faster raw run",
        "ratio_signal_span": round(ratio, 3),
        "ratio_commit_detected": round(ratio_commit, 3),
        "targets_met": {"at_least_25pct_of_raw": ratio >= TARGET_RATIO},
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=50_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the worker")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    result = asyncio.run(run(args.records, args.seed, args.timeout))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
