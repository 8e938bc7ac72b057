"""Crash to verified power-off, against the ideal `check_interval x (1 + extra_checks)`.

Rule: M hosts (one per cluster of four) crash: for each, the clock starts just before the
benchmark hands CloudStack's "Host disconnected" alert to the producer. A real
`fencer worker --roles ingest,actuate` does all the rest: ingest, watch, gate (signs), and the
actuate role with its last-moment checks (signature, age, fencer's host record, CloudStack asked
now, the claim on fence-claims, the BMC pin) and the power-off through the host's own lab BMC
(pyghmi, loopback), verified. The benchmark only plays the prober (every probe answered at once
with an unchanged reading, so stale after the baseline). The clock stops when the verified
outcome is read from `fence-outcomes`; the BMC's own "power off" time is reported beside it.

The ideal is what the evidence rule itself costs: the baseline check at once, then 1 +
extra_checks stale checks, each requested `check_interval` after the previous result arrived.
`overhead = measured - ideal` is what fencer adds (Kafka hops, the tick cadence, the gate, the
last-moment checks, the fence). Baselines from the same run: the ideal, and the BMC action
alone (the outcome's own started -> finished: read power, power off, verify).

    python -m benchmarks.crash_to_off --json [--hosts M]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pydantic import SecretStr

from benchmarks.decision_latency import summary
from benchmarks.ingest_rate import isolated_settings
from fencing.events import FenceAction
from fencing.records import FenceDecision, FenceOutcome, ProbeRequest, ProbeResult
from fencing.settings import (
    ActuatorSettings,
    CloudStackSettings,
    FencerSettings,
    HostSettings,
    IpmiOverrides,
    IpmiSettings,
    PolicySettings,
)
from lab.bmc import BmcSimulator
from lab.cloudstack_sim import CloudStackSimulator, SimCloud
from lab.pipeline import WorkerProcess, write_settings
from streams.broker import EmbeddedBroker
from streams.kafka import aiokafka_kwargs

TARGET_OVERHEAD_P99_S = 1.0


def _powered(into: dict[str, float], host: str, state: str, cause: str) -> None:
    """The lab BMC's power callback: when the host went off (first time only)."""
    if state == "off":
        into.setdefault(host, time.time())


PASSWORD = "bench-throwaway"


class Crashes:
    """Plays the prober; times each host from its crash to the verified outcome."""

    def __init__(self, settings: FencerSettings, bmc_off: dict[str, float]) -> None:
        self.settings = settings
        self.topics = settings.kafka.topics
        self.crashed: dict[str, float] = {}
        self.decided: dict[str, float] = {}  # CreateTime of the decision
        self.off: dict[str, float] = {}  # the verified outcome read
        self.bmc_off = bmc_off  # the BMC powered the host off (its callback's thread)
        self.fence_s: list[float] = []  # the outcome's own started -> finished
        self.failed: list[str] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        kw = aiokafka_kwargs(self.settings)
        self.producer = AIOKafkaProducer(**kw)
        self.consumer = AIOKafkaConsumer(
            self.topics.probe_requests,
            self.topics.fence_decisions,
            self.topics.fence_outcomes,
            group_id=None,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=20,
            **kw,
        )
        await self.producer.start()
        await self.consumer.start()
        self.loop = asyncio.create_task(self._tail())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _tail(self) -> None:
        async for msg in self.consumer:
            if msg.topic == self.topics.probe_requests:
                self._spawn(self._answer(ProbeRequest.model_validate_json(msg.value)))
            elif msg.topic == self.topics.fence_decisions:
                decision = FenceDecision.model_validate_json(msg.value)
                host = decision.host.host_uuid
                if decision.approved and host not in self.decided:
                    self.decided[host] = msg.timestamp / 1000
            else:
                outcome = FenceOutcome.model_validate_json(msg.value)
                host = outcome.host.host_uuid
                if host in self.off:
                    continue
                if outcome.success and outcome.verified:
                    self.off[host] = time.time()
                    self.fence_s.append(outcome.finished_at - outcome.started_at)
                else:
                    self.failed.append(f"{host}: {outcome.error or 'not verified'}")

    async def _answer(self, req: ProbeRequest) -> None:
        result = ProbeResult(
            host=req.host,
            episode=req.episode,
            check=req.check,
            suspect_since=req.suspect_since,
            finished_at=time.time(),
            mtimes={"/mnt/pool/disk-1": 1_000.0},
            complete=True,
            files_wanted=1,
            neighbour="kvm-n",
        )
        await self.producer.send_and_wait(
            self.topics.probe_results,
            result.model_dump_json().encode(),
            key=req.host.host_uuid.encode(),
        )

    async def stop(self) -> None:
        self.loop.cancel()
        for t in [self.loop, *self.tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.consumer.stop()
        await self.producer.stop()


async def run(hosts: int, check: float, extra: int, timeout: float) -> dict[str, Any]:
    """Broker, simulator, BMCs, worker; the figures."""
    cloud = SimCloud()
    zone = cloud.add_zone("zone1")
    suspects = []
    for c in range(hosts):
        cluster = cloud.add_cluster(zone, f"cluster{c:02d}")
        members = [cloud.add_host(cluster, f"kvm{c:02d}{i}", f"10.3.{c}.{i + 1}") for i in range(4)]
        suspects.append(members[0])
    bmc_off: dict[str, float] = {}
    bmcs = [
        BmcSimulator("admin", PASSWORD, on_power_change=partial(_powered, bmc_off, h.uuid))
        for h in suspects
    ]
    with (
        contextlib.ExitStack() as stack,
        tempfile.TemporaryDirectory(prefix="fencer-bench-") as tmp,
    ):
        for b in bmcs:
            stack.enter_context(b)
        async with EmbeddedBroker() as broker, CloudStackSimulator(cloud) as sim:
            settings = await isolated_settings(
                broker,
                Path(tmp),
                policy=PolicySettings(
                    check_interval=check,
                    extra_checks=extra,
                    startup_quiet=0,
                    probe_timeout=30,
                    global_cap=hosts + 10,
                ),
                defaults=IpmiSettings(action=FenceAction.STOP),
                cloudstack=CloudStackSettings(
                    endpoint=sim.url,
                    api_key=sim.api_key,
                    secret_key=sim.secret_key,
                    poll_interval=5.0,
                ),
                hosts={
                    h.uuid: HostSettings(
                        ipmi=IpmiOverrides(
                            address="127.0.0.1",
                            port=b.port,
                            username="admin",
                            password=SecretStr(PASSWORD),
                            action="stop",
                            restart_via="none",
                        )
                    )
                    for h, b in zip(suspects, bmcs, strict=True)
                },
                actuator=ActuatorSettings(power_timeout=20, poll_interval=0.05, retries=0),
            )
            crashes = Crashes(settings, bmc_off)
            await crashes.start()
            worker = WorkerProcess(
                write_settings(settings, Path(tmp) / "fencer.yaml"),
                "ingest,actuate",
                Path(tmp) / "worker.log",
            ).start()
            producer = AIOKafkaProducer(**aiokafka_kwargs(settings))
            await producer.start()
            try:
                await asyncio.sleep(15.0)  # the worker's groups settle before anything crashes
                for h in suspects:
                    cloud.set_host_state(h.uuid, "Disconnected")
                    key, value = cloud.events.pop()
                    cloud.events.clear()
                    crashes.crashed[h.uuid] = time.time()
                    await producer.send_and_wait(
                        settings.kafka.topics.cloudstack,
                        value.encode(),
                        key=key.encode() if key else None,
                    )
                    await asyncio.sleep(check / hosts)  # crashes spread over the tick phases
                deadline = time.monotonic() + timeout
                wanted = {h.uuid for h in suspects}
                while not wanted <= set(crashes.off):
                    if crashes.failed:
                        raise RuntimeError(f"a fence failed: {crashes.failed[0]}")
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"{len(wanted - set(crashes.off))} of {hosts} hosts not off after "
                            f"{timeout:g} s (see {worker.log_file})"
                        )
                    if worker.proc is not None and worker.proc.poll() is not None:
                        raise RuntimeError(f"the worker exited ({worker.log_file})")
                    await asyncio.sleep(0.1)
            finally:
                worker.stop()
                await producer.stop()
                await crashes.stop()
    ideal = check * (1 + extra)
    total = [crashes.off[h] - crashes.crashed[h] for h in wanted]
    overhead = [t - ideal for t in total]
    to_decision = [crashes.decided[h] - crashes.crashed[h] for h in wanted]
    to_bmc_off = [crashes.bmc_off[h] - crashes.crashed[h] for h in wanted if h in crashes.bmc_off]
    decision_to_off = [crashes.off[h] - crashes.decided[h] for h in wanted]
    return {
        "benchmark": "crash_to_off",
        "hosts": hosts,
        "check_interval_s": check,
        "extra_checks": extra,
        "fencer": {
            "crash_to_verified_off": summary(total),
            "overhead_over_ideal": summary(overhead),
            "crash_to_decision": summary(to_decision),
            "crash_to_bmc_power_off": summary(to_bmc_off),
            "decision_to_verified_outcome": summary(decision_to_off),
        },
        "baseline": {
            "ideal_s": ideal,
            "bmc_action_alone_read_off_verify": summary(crashes.fence_s),
        },
        "targets_met": {
            "overhead_p99_under_1s": summary(overhead)["p99_ms"] < TARGET_OVERHEAD_P99_S * 1000
        },
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hosts", type=int, default=10)
    p.add_argument("--check-interval", type=float, default=5.0)
    p.add_argument("--extra-checks", type=int, default=2)
    p.add_argument("--timeout", type=float, default=180.0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    result = asyncio.run(run(args.hosts, args.check_interval, args.extra_checks, args.timeout))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
