"""fencer at the size of a large cloud: two real workers splitting the partitions, the CloudStack
simulator with H hosts in C clusters and V VMs, the event bus at a steady rate, and many hosts
suspect at once; then one worker is killed.

Rule: two `fencer worker --roles ingest` processes (one consumer group: they split the
partitions) run against the embedded broker and the simulator. The benchmark produces event bus
noise at `--rate` records/s all along (VM and volume state changes, usage events), plays the
prober (every probe request answered at once) and crashes hosts through the simulator:
- `decide`: one host per cluster (up to `--suspects`) crashes at once; their probes read an
  unchanged disk (stale after the baseline): decision lag = crash -> decision record
  (CreateTime), beside the ideal check_interval x (1 + extra_checks) of the evidence rule;
- `checked`: as many other hosts crash with a disk that changes on every probe (alive: checked
  forever). After the decisions, the worker that sent the latest probe request of most of them
  is killed (SIGKILL); for each host it was checking, the time from the kill to the next probe
  request (sent by the survivor) is the takeover time.
Also reported: per worker CPU seconds (user + system) and peak RSS (VmHWM) just before the kill,
the probe round (first to last request of one check number across the `decide` hosts), and the
listHosts poll as the worker does it (`streams.poller.Poller.poll`: wall time, pages, page
size) timed here against the same simulator. The baseline of the same run: the ideal, and the
raw listHosts page fetch.

    python -m benchmarks.scale --json [--hosts H --clusters C --vms V --suspects S --rate R]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from benchmarks.decision_latency import summary
from benchmarks.ingest_rate import isolated_settings, noise
from fencing.events import FenceAction
from fencing.records import FenceDecision, ProbeRequest, ProbeResult
from fencing.settings import CloudStackSettings, FencerSettings, IpmiSettings, PolicySettings
from lab.cloudstack_sim import DEFAULT_PAGE_SIZE, CloudStackSimulator, SimCloud
from lab.pipeline import WorkerProcess, write_settings
from streams.broker import EmbeddedBroker
from streams.kafka import aiokafka_kwargs

CHECK = 5.0
EXTRA = 2
POLL_S = 30.0


def _proc(pid: int) -> dict[str, float]:
    """CPU seconds and peak RSS (MiB) of a process, from /proc."""
    import os

    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return {"cpu_seconds": round(cpu, 2), "peak_rss_mib": round(hwm / 1024, 1)}


def _polls(log_file: Path | None) -> list[tuple[float, int, int, int]]:
    """The worker's polls from its log: (time, hosts, signals, directory entries written)."""
    import re
    from datetime import datetime

    line = re.compile(
        r"^(\S+ \S+) INFO .*listHosts poll: (\d+) hosts, (\d+) host signals, (\d+) directory"
    )
    out = []
    text = log_file.read_text(errors="replace") if log_file and log_file.exists() else ""
    for m in (line.match(x) for x in text.splitlines()):
        if m:
            at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((at, int(m.group(2)), int(m.group(3)), int(m.group(4))))
    return out


class Cloud:
    """Plays the prober; records requests and decisions."""

    def __init__(self, settings: FencerSettings, alive: set[str]) -> None:
        self.settings, self.alive = settings, alive
        self.topics = settings.kafka.topics
        self.crashed: dict[str, float] = {}
        self.decided: dict[str, float] = {}
        self.requests: dict[str, list[tuple[float, int, str]]] = {}  # host -> (time, check, by)
        self.poller_signals: list[float] = []  # CreateTime of each host signal of a poll
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        kw = aiokafka_kwargs(self.settings)
        self.producer = AIOKafkaProducer(linger_ms=5, **kw)
        self.consumer = AIOKafkaConsumer(
            self.topics.probe_requests,
            self.topics.fence_decisions,
            self.topics.host_signals,
            group_id=None,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=20,
            **kw,
        )
        await self.producer.start()
        await self.consumer.start()
        self.loop = asyncio.create_task(self._tail())

    async def _tail(self) -> None:
        async for msg in self.consumer:
            if msg.topic == self.topics.host_signals:
                if b'"source":"poller"' in msg.value:  # (codec.dump's compact JSON)
                    self.poller_signals.append(msg.timestamp / 1000)
                continue
            if msg.topic == self.topics.probe_requests:
                req = ProbeRequest.model_validate_json(msg.value)
                self.requests.setdefault(req.host.host_uuid, []).append(
                    (msg.timestamp / 1000, req.check, req.requested_by or "")
                )
                task = asyncio.create_task(self._answer(req))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
                continue
            d = FenceDecision.model_validate_json(msg.value)
            if d.approved:
                self.decided.setdefault(d.host.host_uuid, msg.timestamp / 1000)

    async def _answer(self, req: ProbeRequest) -> None:
        host = req.host.host_uuid
        mtime = time.time() if host in self.alive else 1_000.0  # alive: the disk is written
        result = ProbeResult(
            host=req.host,
            episode=req.episode,
            check=req.check,
            suspect_since=req.suspect_since,
            finished_at=time.time(),
            mtimes={"/mnt/pool/disk-1": mtime},
            complete=True,
            files_wanted=1,
            neighbour="kvm-n",
        )
        await self.producer.send(
            self.topics.probe_results, result.model_dump_json().encode(), key=host.encode()
        )

    async def stop(self) -> None:
        self.loop.cancel()
        for t in [self.loop, *self.tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.consumer.stop()
        await self.producer.stop()


async def _bus_noise(settings: FencerSettings, rate: float, stop: asyncio.Event) -> int:
    """Event bus noise at `rate` records/s until `stop`; the number sent."""
    rng = random.Random(5)
    vms = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(5000)]
    producer = AIOKafkaProducer(linger_ms=20, **aiokafka_kwargs(settings))
    await producer.start()
    sent = 0
    started = time.monotonic()
    try:
        while not stop.is_set():
            due = int((time.monotonic() - started) * rate)
            while sent < due:
                for key, value in noise(rng, "z", "a", vms, vms)[1]:
                    await producer.send(
                        settings.kafka.topics.cloudstack, value.encode(), key=key.encode()
                    )
                    sent += 1
            await asyncio.sleep(0.05)
    finally:
        await producer.stop()
    return sent


async def _poll_cost(settings: FencerSettings, sim: CloudStackSimulator) -> dict[str, Any]:
    """One listHosts poll as the worker's poller does it, timed, with its page count: without
    the host directory log (a poller with no memory: the baseline), then as a first leader
    ever and as a new leader that reads the log the first one wrote (streams.directory)."""
    from streams.directory import DirectoryLog
    from streams.runtime import Runtime

    runtime = Runtime(settings=settings, started_at=time.time())
    try:
        calls = len(sim.cloud.calls)
        t0 = time.perf_counter()
        signals, sizes = await runtime.poller.poll()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        await runtime.poller.poll()
        second = time.perf_counter() - t0
        pages = sum(1 for c, _ in sim.cloud.calls[calls:] if c.lower() == "listhosts") // 2
    finally:
        await runtime.close()
    topic = f"bench-{uuid.uuid4().hex[:8]}-host-directory"
    shared: dict[str, Any] = {}
    for leader in ("first_leader_ever", "next_leader"):
        rt = Runtime(settings=settings, started_at=time.time())
        rt.poller.log = DirectoryLog(settings, topic, rt.directory)
        try:
            t0 = time.perf_counter()
            await rt.poller.log.start()
            read = time.perf_counter() - t0
            t0 = time.perf_counter()
            got, _ = await rt.poller.poll()
            polled = time.perf_counter() - t0
            t0 = time.perf_counter()
            written = await rt.poller.remember()
            shared[leader] = {
                "directory_read_s": round(read, 3),
                "hosts_in_directory_before": len(rt.directory.entries) - written,
                "poll_s": round(polled, 3),
                "signals": len(got),
                "entries_written": written,
                "write_s": round(time.perf_counter() - t0, 3),
            }
        finally:
            await rt.poller.log.stop()
            await rt.close()
    return {
        "first_poll_s": round(first, 3),
        "steady_poll_s": round(second, 3),
        "signals_of_first_poll_without_directory": len(signals),
        "clusters": len(sizes),
        "pages": pages,
        "page_size": DEFAULT_PAGE_SIZE,
        "with_directory": shared,
    }


async def run(
    hosts: int, clusters: int, vms: int, suspects: int, rate: float, timeout: float
) -> dict[str, Any]:
    """Simulator, broker, two workers, crashes, a kill; the figures."""
    t_setup = time.perf_counter()
    cloud = SimCloud()
    zone = cloud.add_zone("zone1")
    per = max(1, hosts // clusters)
    members: list[list[Any]] = []
    for c in range(clusters):
        cluster = cloud.add_cluster(zone, f"c{c:03d}")
        members.append(
            [cloud.add_host(cluster, f"kvm{c:03d}-{i:03d}", f"10.{c // 250}.{c % 250}.{i + 1}")
             for i in range(per)]
        )  # fmt: skip
    all_hosts = [h for m in members for h in m]
    for i in range(vms):
        cloud.add_vm(all_hosts[i % len(all_hosts)], f"vm{i:06d}")
    decide = [m[0] for m in members][:suspects]
    checked = [m[1] for m in members if len(m) > 1][:suspects]
    setup_s = time.perf_counter() - t_setup
    with tempfile.TemporaryDirectory(prefix="fencer-bench-") as tmp:
        async with EmbeddedBroker() as broker, CloudStackSimulator(cloud) as sim:
            settings = await isolated_settings(
                broker,
                Path(tmp),
                policy=PolicySettings(
                    check_interval=CHECK,
                    extra_checks=EXTRA,
                    startup_quiet=0,
                    probe_timeout=60,
                    global_cap=2 * suspects + 10,
                ),
                defaults=IpmiSettings(action=FenceAction.STOP),
                cloudstack=CloudStackSettings(
                    endpoint=sim.url,
                    api_key=sim.api_key,
                    secret_key=sim.secret_key,
                    # The storm guard needs the cluster sizes of a first poll; each poll of 10,000
                    # hosts also costs the simulator (in this process) ~0.4 s of CPU.
                    poll_interval=POLL_S,
                ),
            )
            poll = await _poll_cost(settings, sim)
            bench = Cloud(settings, alive={h.uuid for h in checked})
            await bench.start()
            conf = write_settings(settings, Path(tmp) / "fencer.yaml")
            workers = [
                WorkerProcess(conf, "ingest", Path(tmp) / f"worker{i}.log").start() for i in (1, 2)
            ]
            stop_noise = asyncio.Event()
            noise_task = asyncio.create_task(_bus_noise(settings, rate, stop_noise))
            producer = AIOKafkaProducer(**aiokafka_kwargs(settings))
            await producer.start()
            kill: dict[str, Any] = {}
            try:
                # Both workers joined, the partitions split, the first polls done (as before
                # the host directory, when a first poll sent two signals per host: the figures
                # stay comparable).
                await asyncio.sleep(POLL_S + 45.0)
                crash_at = time.time()
                calls_at_crash = len(cloud.calls)
                for h in decide + checked:
                    cloud.set_host_state(h.uuid, "Disconnected")
                    key, value = cloud.events.pop()
                    bench.crashed[h.uuid] = time.time()
                    await producer.send(
                        settings.kafka.topics.cloudstack,
                        value.encode(),
                        key=key.encode() if key else None,
                    )
                cloud.events.clear()
                await producer.flush()
                deadline = time.monotonic() + timeout
                wanted = {h.uuid for h in decide}
                while not wanted <= set(bench.decided):
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"{len(wanted - set(bench.decided))} of {len(wanted)} decisions "
                            f"missing after {timeout:g} s (see {tmp}/worker*.log)"
                        )
                    await asyncio.sleep(0.2)
                usage = {f"worker{i}": _proc(w.pid) for i, w in enumerate(workers, 1)}
                by_id = [p for c, p in cloud.calls[calls_at_crash:] if c == "listHosts"]
                lookups = {
                    "listhosts_calls": len(by_id),
                    "by_id": sum(1 for p in by_id if "id" in p),
                    "alerts": len(decide) + len(checked),
                }
                # Kill the worker that sent the latest request of most `checked` hosts.
                by = [bench.requests[h.uuid][-1][2] for h in checked if h.uuid in bench.requests]
                victim_id = max(set(by), key=by.count)
                victim = next(w for w in workers if victim_id.endswith(f":{w.pid}"))
                theirs = [
                    h.uuid
                    for h in checked
                    if bench.requests.get(h.uuid) and bench.requests[h.uuid][-1][2] == victim_id
                ]
                killed_at = time.time()
                victim.kill()
                while time.monotonic() < deadline:
                    again = {
                        h: next((t for t, _, b in bench.requests[h] if t > killed_at), None)
                        for h in theirs
                    }
                    if all(v is not None for v in again.values()):
                        break
                    await asyncio.sleep(0.2)
                took = [v - killed_at for v in again.values() if v is not None]
                # A poll of the survivor after the kill (its first as leader if the victim led).
                while time.time() < killed_at + POLL_S + 5.0 and time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                kill = {
                    "killed": f"worker{workers.index(victim) + 1}",
                    "hosts_of_the_killed_worker": len(theirs),
                    "checked_again": len(took),
                    "kill_to_next_check": summary(took) if took else None,
                }
            finally:
                stop_noise.set()
                bus_records = await noise_task
                for w in workers:
                    w.stop()
                polls = {f"worker{i}": _polls(w.log_file) for i, w in enumerate(workers, 1)}
                await producer.stop()
                await bench.stop()
    ideal = CHECK * (1 + EXTRA)
    lag = [bench.decided[h.uuid] - bench.crashed[h.uuid] for h in decide]
    rounds = []
    for check in range(1, 2 + EXTRA + 1):
        times = [t for h in decide for t, c, _ in bench.requests.get(h.uuid, []) if c == check]
        if times:
            rounds.append(round(max(times) - min(times), 3))
    return {
        "benchmark": "scale",
        "cloud": {
            "hosts": len(all_hosts),
            "clusters": clusters,
            "vms": vms,
            "suspect_at_once": len(decide) + len(checked),
            "setup_seconds": round(setup_s, 1),
        },
        "event_bus": {"rate_per_s": rate, "records": bus_records},
        "fencer": {
            "workers": usage,
            "decision_lag": summary(lag),
            "decision_lag_over_ideal": summary([x - ideal for x in lag]),
            # where the lag goes: the alert's way to the first check (ingest, the watch), then
            # the checks (ideal: check_interval x (1 + extra_checks) from the first request)
            "crash_to_first_probe_request": summary(
                [bench.requests[h.uuid][0][0] - bench.crashed[h.uuid] for h in decide]
            ),
            "first_probe_request_to_decision": summary(
                [bench.decided[h.uuid] - bench.requests[h.uuid][0][0] for h in decide]
            ),
            "probe_round_spread_s": rounds,
            "listhosts_poll": poll,
            "polls_of_the_workers": {
                w: {
                    "polls": len(ps),
                    "signals_per_poll": [n for _, _, n, _ in ps],
                    "entries_written_per_poll": [e for _, _, _, e in ps],
                    "first_poll_after": (
                        round(ps[0][0] - crash_at, 1) if ps else None
                    ),  # seconds after the crashes (negative: before)
                }
                for w, ps in polls.items()
            },
            "poller_signals_before_the_crashes": sum(
                1 for t in bench.poller_signals if t < crash_at
            ),
            "ingest_listhosts_calls_during_the_crashes": lookups,
            "kill_one_worker": kill,
        },
        "baseline": {"ideal_decision_s": ideal, "check_interval_s": CHECK, "poll_s": POLL_S},
        "targets_met": {
            # the issue's: the whole run on 2 cores in under 5 minutes
            "under_5_minutes": time.perf_counter() - t_setup < 300.0,
            # and what the run must show to count: each crashed host decided, no host whose
            # disk kept changing decided, every host of the killed worker checked again
            "every_crashed_host_decided": len(lag) == len(decide),
            "no_live_host_decided": not any(h.uuid in bench.decided for h in checked),
            "orphans_checked_again": bool(kill)
            and kill.get("checked_again") == kill.get("hosts_of_the_killed_worker"),
        },
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hosts", type=int, default=10_000)
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--vms", type=int, default=20_000)
    p.add_argument("--suspects", type=int, default=50, help="per kind: decide and checked")
    p.add_argument("--rate", type=float, default=500.0, help="event bus records per second")
    p.add_argument("--timeout", type=float, default=180.0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    result = asyncio.run(
        run(args.hosts, args.clusters, args.vms, args.suspects, args.rate, args.timeout)
    )
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
