"""Latency from the last required stale probe result to the fence decision record, through a
real `fencer worker --roles ingest` process (watch + gate) on the embedded broker; baseline: a
plain produce -> consume round trip of one record on the same broker, in the same run.

Rule: the benchmark plays the prober as tests/streams/test_app.py does: it answers every probe
request with a stale result at once. For each of M suspect hosts (one per cluster of four, so
the per-cluster budget and the storm guard approve every fence) the clock starts just before
the producer is handed check 2+extra_checks's stale result (check 1 is the baseline) and stops
when the decision record for that host is read from `fence-decisions` by a tailing consumer
(`seen`); `created` stops at the decision record's CreateTime (stamped by the worker). The
baseline consumer has the same configuration as the tail (aiokafka defaults), so both pay the
same fetch behaviour. Every consumer (worker and benchmark) has Tansu's fetch wait capped by
`streams.tansu_compat` (Patch C: 10 ms while records flow, 40 ms when idle); a second run in
the same process (`baseline_former_fetch_wait`, skipped with --no-former) keeps every consumer
at the former fixed 40 ms. `cpu_while_deciding`: the worker's and the broker's CPU seconds from
the first alert to the last decision; `records_per_host_in_decisive_window`: the records
written (CreateTime) on each topic of the way to a decision, the tables' changelogs included,
from the first final result sent to the last decision, per deciding host (read once the
decisions are in, so that no extra consumer loads the broker during the run; the mean over the
runs). The hosts go down 50 ms apart once the worker has polled
listHosts once (until 2026-11-30 the alerts were sent while the worker was still starting, so
all hosts were judged in one burst). `--together`: the worker started and polled, every host
goes down at once (a rack losing power): the burst without the worker's start-up in it.

The cost of the short fetch wait (`--idle-cost`, off by default): the CPU seconds an idle
`fencer worker --roles ingest` and the embedded broker spend per second with no traffic (no
suspect host, an empty simulated cloud), as fencer runs (idle: 40 ms), and with every consumer
held at the short wait (what a second inside the active window costs at most, with no record);
each on its own broker, one after the other, in the same run.

    python -m benchmarks.decision_latency --json [--hosts M] [--no-former] [--burst | --together]
        [--idle-cost]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from benchmarks.ingest_rate import isolated_settings
from fencing.events import FenceAction
from fencing.records import FenceProposal, GateSignal, ProbeRequest, ProbeResult
from fencing.settings import CloudStackSettings, FencerSettings, IpmiSettings, PolicySettings
from lab.cloudstack_sim import CloudStackSimulator, SimCloud
from lab.pipeline import WorkerProcess, write_settings
from streams.app import ROLES
from streams.broker import EmbeddedBroker
from streams.codec import gate_input
from streams.kafka import aiokafka_kwargs
from streams.tansu_compat import (
    ACTIVE_FETCH_WAIT_ENV,
    FETCH_WAIT_ENV,
    active_fetch_max_wait_ms,
    consumer_fetch_max_wait_ms,
)

TARGET_P99_S = 0.100
CHECK = 1.0
EXTRA = 2
FORMER_FETCH_WAIT_MS = 40  # Patch C's cap before issue 17
SETTLE_S = 2.0  # after the worker's first poll: its signals are worked through


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def summary(samples: list[float]) -> dict[str, Any]:
    """p50 / p99 / max in milliseconds."""
    return {
        "n": len(samples),
        "p50_ms": round(statistics.median(samples) * 1000, 1),
        "p99_ms": round(_pct(samples, 0.99) * 1000, 1),
        "max_ms": round(max(samples) * 1000, 1),
    }


async def round_trips(settings: FencerSettings, count: int, fetch_wait_ms: int) -> list[float]:
    """Produce one record, wait until a tailing consumer reads it; `count` times."""
    topic = settings.kafka.topics.fence_decisions
    kw = aiokafka_kwargs(settings)
    producer = AIOKafkaProducer(**kw)
    consumer = AIOKafkaConsumer(
        topic,
        group_id=None,
        auto_offset_reset="latest",
        fetch_max_wait_ms=fetch_wait_ms,
        **kw,
    )
    await producer.start()
    await consumer.start()
    try:
        await consumer.getmany(timeout_ms=1000)  # assignment and first fetch position
        samples = []
        for i in range(count):
            marker = f"ping-{i}".encode()
            t0 = time.perf_counter()
            await producer.send(topic, marker, key=marker)
            while True:
                msg = await consumer.getone()
                if msg.value == marker:
                    break
            samples.append(time.perf_counter() - t0)
        return samples
    finally:
        await consumer.stop()
        await producer.stop()


async def _baselines(settings: FencerSettings, pings: int) -> dict[str, list[float]]:
    # aiokafka's default fetch wait, and the one Faust's aiokafka driver hard-codes (1500 ms):
    # how long a broker holds an empty fetch matters on every hop of the topology.
    return {
        "fetch_max_wait_500ms_aiokafka_default": await round_trips(settings, pings, 500),
        "fetch_max_wait_1500ms_as_faust": await round_trips(settings, pings, 1500),
    }


class Prober:
    """Answers every probe request with a stale result; times the decisions."""

    def __init__(self, settings: FencerSettings) -> None:
        self.settings = settings
        self.topics = settings.kafka.topics
        self.last_sent: dict[str, float] = {}  # host -> time.time() before the final result
        self.seen: dict[str, float] = {}
        self.created: dict[str, float] = {}
        self.proposed: dict[str, float] = {}  # host -> CreateTime of its fence proposal
        self.polled = asyncio.Event()  # the worker's first listHosts poll reached the gate topic
        self.decisions: list[dict[str, Any]] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.created_at: list[tuple[str, float]] = []  # (topic, CreateTime) of every record

    def counted_topics(self) -> list[str]:
        """Every topic the worker writes on a host's way to its decision, its tables'
        changelogs included (their names follow Faust's `{app id}-{table}-changelog`)."""
        t = self.topics
        app_id = self.settings.group_for(("ingest",), ROLES)
        return [
            t.host_signals,
            t.probe_requests,
            t.probe_results,
            t.host_states,
            t.fence_proposals,
            t.fence_decisions,
            t.notices,
            f"{app_id}-hosts-changelog",
            f"{app_id}-gates-changelog",
        ]

    async def start(self) -> None:
        kw = aiokafka_kwargs(self.settings)
        self.producer = AIOKafkaProducer(**kw)
        self.consumer = AIOKafkaConsumer(
            self.topics.probe_requests,
            self.topics.fence_decisions,
            self.topics.fence_proposals,
            group_id=None,
            auto_offset_reset="earliest",
            **kw,
        )
        await self.producer.start()
        await self.consumer.start()
        self.loop = asyncio.create_task(self._tail())

    async def count(self, within: float = 10.0) -> None:
        """Read the CreateTime of every record of `counted_topics` so far, once the decisions
        are in (a tail during the run would be one more consumer for the broker to serve)."""
        kw = aiokafka_kwargs(self.settings)
        counter = AIOKafkaConsumer(group_id=None, auto_offset_reset="earliest", **kw)
        await counter.start()
        try:
            await counter.topics()  # the metadata of every topic (all of them exist by now)
            tps = [
                TopicPartition(t, p)
                for t in self.counted_topics()
                for p in counter.partitions_for_topic(t) or ()
            ]
            counter.assign(tps)
            await counter.seek_to_beginning(*tps)
            end = await counter.end_offsets(tps)
            deadline = time.monotonic() + within
            left = set(tps)
            while left:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the record count did not reach the end in {within:g} s")
                batch = await counter.getmany(timeout_ms=500)
                for msgs in batch.values():
                    self.created_at.extend((m.topic, m.timestamp / 1000) for m in msgs)
                left = {tp for tp in left if await counter.position(tp) < end[tp]}
        finally:
            await counter.stop()

    def records_per_host(self, start: float, end: float, hosts: int) -> dict[str, float]:
        """Records the worker (and the prober) wrote per deciding host with a CreateTime in
        [start, end], per topic (the topic prefix dropped) and in total."""
        prefix = self.settings.kafka.group_id + "-ingest-"
        names = {n: n.split(".")[-1].removeprefix(prefix) for n in self.counted_topics()}
        counts: dict[str, float] = dict.fromkeys(names.values(), 0)
        for topic, at in self.created_at:
            if start <= at <= end:
                counts[names[topic]] += 1
        out = {k: round(v / hosts, 2) for k, v in counts.items()}
        out["total"] = round(sum(counts.values()) / hosts, 2)
        return out

    async def _tail(self) -> None:
        async for msg in self.consumer:
            now = time.time()
            if msg.topic == self.topics.probe_requests:
                task = asyncio.create_task(
                    self._answer(ProbeRequest.model_validate_json(msg.value))
                )
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            elif msg.topic == self.topics.fence_proposals:
                record = gate_input(msg)
                if isinstance(record, FenceProposal):  # not a gate signal
                    self.proposed.setdefault(record.host.host_uuid, msg.timestamp / 1000)
                elif isinstance(record, GateSignal) and record.kind == "cluster_size":
                    self.polled.set()
            elif msg.key:
                host = msg.key.decode()
                self.decisions.append(json.loads(msg.value))
                self.seen.setdefault(host, now)
                self.created.setdefault(host, msg.timestamp / 1000)

    async def _answer(self, req: ProbeRequest) -> None:
        result = ProbeResult(
            host=req.host,
            episode=req.episode,
            check=req.check,
            suspect_since=req.suspect_since,
            finished_at=time.time(),
            mtimes={"/mnt/pool/disk-1": 1_000.0},  # never changes: stale after the baseline
            complete=True,
            files_wanted=1,
            neighbour="kvm-n",
        )
        value = result.model_dump_json().encode()
        key = req.host.host_uuid.encode()
        if req.check == 2 + EXTRA:  # the baseline, then 1 + EXTRA stale
            self.last_sent[req.host.host_uuid] = time.time()
        await self.producer.send_and_wait(self.topics.probe_results, value, key=key)

    async def stop(self) -> None:
        self.loop.cancel()
        for t in [self.loop, *self.tasks]:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        await self.consumer.stop()
        await self.producer.stop()


async def run(hosts: int, pings: int, timeout: float) -> dict[str, Any]:
    """One run: broker, simulator, worker, prober; the figures."""
    return (await run_once(hosts, pings, timeout))[0]


async def run_once(
    hosts: int, pings: int, timeout: float, burst: bool = False, together: bool = False
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """One run's figures, and its samples in seconds (seen, created, watch, gate). `burst`: the
    alerts are sent while the worker starts (it sees every host go down at once), listHosts
    every second: the benchmark as it ran until 2026-11-29. `together`: the worker started and
    polled, every host down at once."""
    cloud = SimCloud()
    zone = cloud.add_zone("zone1")
    suspects = []
    for c in range(hosts):
        cluster = cloud.add_cluster(zone, f"cluster{c:02d}")
        members = [cloud.add_host(cluster, f"kvm{c:02d}{i}", f"10.2.{c}.{i + 1}") for i in range(4)]
        suspects.append(members[0])
    with tempfile.TemporaryDirectory(prefix="fencer-bench-") as tmp:
        async with EmbeddedBroker() as broker, CloudStackSimulator(cloud) as sim:
            settings = await isolated_settings(
                broker,
                Path(tmp),
                policy=PolicySettings(
                    check_interval=CHECK,
                    extra_checks=EXTRA,
                    startup_quiet=0,
                    probe_timeout=30,
                    global_cap=hosts + 10,
                ),
                defaults=IpmiSettings(action=FenceAction.STOP),
                cloudstack=CloudStackSettings(
                    endpoint=sim.url,
                    api_key=sim.api_key,
                    secret_key=sim.secret_key,
                    # The benchmark waits for the first poll (cluster sizes); every poll sends
                    # a signal per down host (fencer's default interval is 30 s).
                    poll_interval=1.0 if burst else 5.0,
                ),
            )
            ping_settings = await isolated_settings(broker, Path(tmp))
            before = await _baselines(ping_settings, pings)
            prober = Prober(settings)
            await prober.start()
            worker = WorkerProcess(
                write_settings(settings, Path(tmp) / "fencer.yaml"),
                "ingest",
                Path(tmp) / "worker.log",
            ).start()
            producer = AIOKafkaProducer(**aiokafka_kwargs(settings))
            await producer.start()
            assert broker.pid is not None
            try:
                # The worker runs and has polled once (every host is new to its first poll: two
                # signals each); then the hosts go down 50 ms apart, as a started worker sees them.
                if not burst:
                    async with asyncio.timeout(timeout):
                        await prober.polled.wait()
                    await asyncio.sleep(SETTLE_S)
                cpu0 = cpu_seconds(broker.pid), time.monotonic(), cpu_seconds(worker.pid)
                for h in suspects:
                    cloud.set_host_state(h.uuid, "Disconnected")
                    while cloud.events:
                        key, value = cloud.events.pop(0)
                        await producer.send_and_wait(
                            settings.kafka.topics.cloudstack,
                            value.encode(),
                            key=key.encode() if key else None,
                        )
                    if not together:
                        await asyncio.sleep(0.05)  # spread the hosts over the tick phases
                deadline = time.monotonic() + timeout
                wanted = {h.uuid for h in suspects}
                while not wanted <= set(prober.seen):
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"{len(wanted - set(prober.seen))} of {hosts} decisions missing "
                            f"after {timeout:g} s (see {worker.log_file})"
                        )
                    if worker.proc is not None and worker.proc.poll() is not None:
                        raise RuntimeError(f"the worker exited ({worker.log_file})")
                    await asyncio.sleep(0.1)
                cpu = {
                    "seconds": round(time.monotonic() - cpu0[1], 1),
                    "worker_cpu_s": round(cpu_seconds(worker.pid) - cpu0[2], 2),
                    "broker_cpu_s": round(cpu_seconds(broker.pid) - cpu0[0], 2),
                }
                # The decisive window: the first final result sent -> the last decision, and
                # the decisions read back by the watch (its record written) just after.
                window = (min(prober.last_sent.values()), max(prober.created.values()))
                await asyncio.sleep(1.0)  # the decisions read back by the watch
                await prober.count()
                records = prober.records_per_host(*window, hosts)
            finally:
                worker.stop()
                await producer.stop()
                await prober.stop()
            after = await _baselines(ping_settings, pings)
    seen = [prober.seen[h] - prober.last_sent[h] for h in wanted]
    created = [prober.created[h] - prober.last_sent[h] for h in wanted]
    watch_hop = [prober.proposed[h] - prober.last_sent[h] for h in wanted]
    gate_hop = [prober.created[h] - prober.proposed[h] for h in wanted]
    approved = sum(1 for d in prober.decisions if d.get("approved"))
    result: dict[str, Any] = {
        "benchmark": "decision_latency",
        "hosts": hosts,
        "checks_to_decide": 2 + EXTRA,  # the baseline and 1 + extra_checks stale
        # Patch C's caps on every hop: while records flow / idle.
        "fetch_wait_ms": {
            "active": active_fetch_max_wait_ms(),
            "idle": consumer_fetch_max_wait_ms(),
        },
        "fencer": {
            "seen": summary(seen),
            "created": summary(created),
            "hops": {
                "result_to_proposal_created": summary(watch_hop),
                "proposal_to_decision_created": summary(gate_hop),
            },
            "decisions": len(prober.decisions),
            "approved": approved,
            "cpu_while_deciding": cpu,
            "records_per_host_in_decisive_window": records,
        },
        "baseline_produce_consume": {
            name: {"before": summary(before[name]), "after": summary(after[name])}
            for name in before
        },
        "burst": burst,
        "together": together,
        "targets_met": {"p99_under_100ms": _pct(seen, 0.99) < TARGET_P99_S},
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    samples = {"seen": seen, "created": created, "watch": watch_hop, "gate": gate_hop}
    return result, samples


def pooled(runs: list[tuple[dict[str, Any], dict[str, list[float]]]]) -> dict[str, Any]:
    """The figures of all samples of several runs, and each run's seen p50 / p99."""
    samples = {k: [x for _, s in runs for x in s[k]] for k in runs[0][1]}
    return {
        "seen": summary(samples["seen"]),
        "created": summary(samples["created"]),
        "hops": {
            "result_to_proposal_created": summary(samples["watch"]),
            "proposal_to_decision_created": summary(samples["gate"]),
        },
        "decisions": sum(r["fencer"]["decisions"] for r, _ in runs),
        "approved": sum(r["fencer"]["approved"] for r, _ in runs),
        "records_per_host_in_decisive_window": {
            k: round(
                statistics.mean(
                    r["fencer"]["records_per_host_in_decisive_window"][k] for r, _ in runs
                ),
                2,
            )
            for k in runs[0][0]["fencer"]["records_per_host_in_decisive_window"]
        },
        "runs": [
            {
                "seen_p50_ms": r["fencer"]["seen"]["p50_ms"],
                "seen_p99_ms": r["fencer"]["seen"]["p99_ms"],
                **r["fencer"]["cpu_while_deciding"],
                "records_per_host": r["fencer"]["records_per_host_in_decisive_window"]["total"],
                "load_average_1m": r["load_average_1m"],
            }
            for r, _ in runs
        ],
    }


async def measure(
    hosts: int,
    pings: int,
    timeout: float,
    repeat: int = 2,
    former: bool = True,
    burst: bool = False,
    together: bool = False,
) -> dict[str, Any]:
    """`repeat` runs as fencer runs, alternating with as many at the former fixed 40 ms fetch
    wait (every consumer of the benchmark and the worker), all in this process: the samples of
    each side pooled."""
    ours: list[tuple[dict[str, Any], dict[str, list[float]]]] = []
    theirs: list[tuple[dict[str, Any], dict[str, list[float]]]] = []
    for i in range(repeat):
        sides = [(ours, {}), (theirs, {ACTIVE_FETCH_WAIT_ENV: str(FORMER_FETCH_WAIT_MS)})]
        if i % 2:
            sides.reverse()  # alternate who goes first: the machine's load drifts
        for into, env in sides:
            if into is theirs and not former:
                continue
            with environment(**env):
                into.append(await run_once(hosts, pings, timeout, burst, together))
    result = ours[0][0]
    result["repeat"] = repeat
    result["fencer"] = pooled(ours)
    seen = [x for _, s in ours for x in s["seen"]]
    result["targets_met"] = {"p99_under_100ms": _pct(seen, 0.99) < TARGET_P99_S}
    if theirs:
        result["baseline_former_fetch_wait"] = {
            "fetch_wait_ms": theirs[0][0]["fetch_wait_ms"],
            **pooled(theirs),
        }
    return result


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables for what this process and the workers it starts do inside."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


async def idle_cpu(settle: float, seconds: float) -> dict[str, Any]:
    """CPU per second of an idle `fencer worker --roles ingest` and of its broker."""
    with tempfile.TemporaryDirectory(prefix="fencer-bench-idle-") as tmp:
        async with EmbeddedBroker() as broker, CloudStackSimulator(SimCloud()) as sim:
            settings = await isolated_settings(
                broker,
                Path(tmp),
                cloudstack=CloudStackSettings(
                    endpoint=sim.url,
                    api_key=sim.api_key,
                    secret_key=sim.secret_key,
                    poll_interval=3600.0,  # one poll at start, inside the settle time
                ),
            )
            worker = WorkerProcess(
                write_settings(settings, Path(tmp) / "fencer.yaml"),
                "ingest",
                Path(tmp) / "worker.log",
            ).start()
            try:
                await asyncio.sleep(settle)
                if worker.proc is None or worker.proc.poll() is not None:
                    raise RuntimeError(f"the idle worker exited ({worker.log_file})")
                assert broker.pid is not None
                w0, b0, t0 = cpu_seconds(worker.pid), cpu_seconds(broker.pid), time.monotonic()
                await asyncio.sleep(seconds)
                w1, b1, t1 = cpu_seconds(worker.pid), cpu_seconds(broker.pid), time.monotonic()
            finally:
                worker.stop()
    return {
        "fetch_wait_ms": consumer_fetch_max_wait_ms(),
        "seconds": round(t1 - t0, 1),
        "worker_cpu_per_s": round((w1 - w0) / (t1 - t0), 4),
        "broker_cpu_per_s": round((b1 - b0) / (t1 - t0), 4),
    }


async def idle_cost(settle: float, seconds: float) -> dict[str, Any]:
    """Idle CPU as fencer runs (its consumers at the idle wait), and with every consumer kept at
    the short wait (what each second inside the active window costs, at most), same run."""
    fencer = await idle_cpu(settle, seconds)
    with environment(**{FETCH_WAIT_ENV: str(active_fetch_max_wait_ms())}):
        short = await idle_cpu(settle, seconds)
    return {"fencer_idle": fencer, "short_wait_kept": short}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hosts", type=int, default=30)
    p.add_argument("--pings", type=int, default=100, help="baseline round trips, each side")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--idle-cost", action="store_true", help="also measure idle CPU at both fetch caps"
    )
    p.add_argument("--idle-seconds", type=float, default=15.0, help="each idle measurement")
    p.add_argument(
        "--no-former", action="store_true", help="skip the runs with the former 40 ms fetch wait"
    )
    p.add_argument("--repeat", type=int, default=2, help="runs of each side, alternating")
    p.add_argument(
        "--burst", action="store_true", help="every host down while the worker starts (as before)"
    )
    p.add_argument(
        "--together",
        action="store_true",
        help="every host down at once on a started worker (a rack losing power)",
    )
    args = p.parse_args(argv)
    result = asyncio.run(
        measure(
            args.hosts,
            args.pings,
            args.timeout,
            args.repeat,
            not args.no_former,
            args.burst,
            args.together,
        )
    )
    if args.idle_cost:
        result["idle_cost"] = asyncio.run(idle_cost(settle=12.0, seconds=args.idle_seconds))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
