"""A worker whose tables live in memory (`kafka.table_store: memory`) ticks only the hosts whose
partition it holds (streams.tables.HeldKeys).

Faust's memory store keeps the rows a worker wrote after their partition moved to another
worker; the tick timer walked them and sent ticks on its own clock next to the new owner's,
each reopening the episode's age on the other clock and, when its tick requested the check,
making every reading a new baseline (found by review3). Against the embedded broker, the
CloudStack simulator (real signing) and two real `fencer worker` processes."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from fencing.settings import CloudStackSettings, PolicySettings, SigningSettings
from fencing.signing import write_keys_file
from lab.cloudstack_sim import CloudStackSimulator, SimCloud
from lab.pipeline import Tap, WorkerProcess, write_settings

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
async def sim() -> Any:
    sc = SimCloud()
    cluster = sc.add_cluster(sc.add_zone("zone1"), "cluster1")
    hosts = [sc.add_host(cluster, f"kvm{i:02d}", f"10.1.0.{i}") for i in range(1, 13)]
    s = await CloudStackSimulator(sc).start()
    s.hosts = hosts  # type: ignore[attr-defined]
    try:
        yield s
    finally:
        await s.stop()


async def test_a_worker_on_the_memory_store_ticks_only_the_hosts_it_holds(
    fencer_settings: Any, sim: CloudStackSimulator, tmp_path: Path
) -> None:
    hosts = sim.hosts  # type: ignore[attr-defined]
    settings = fencer_settings(
        isolated_topics=True,
        policy=PolicySettings(check_interval=1.0, extra_checks=2, startup_quiet=0),
        cloudstack=CloudStackSettings(
            endpoint=sim.url, api_key=sim.api_key, secret_key=sim.secret_key, poll_interval=1.0
        ),
        signing=SigningSettings(keys_file=write_keys_file(tmp_path / "signing.keys")),
    )
    settings = settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"table_store": "memory"})}
    )
    topics = settings.kafka.topics
    tap = await Tap(settings).start([topics.host_signals])
    workers: list[WorkerProcess] = []

    def ticks(since: int = 0) -> list[tuple[str, str]]:
        """(host, clock) of each tick after the first `since` host signals."""
        return [
            (k, v["clock"])
            for k, v in tap.of(topics.host_signals)[since:]
            if k is not None and v.get("kind") == "tick"
        ]

    try:
        for h in hosts:
            sim.cloud.set_host_state(h.uuid, "Disconnected")
        # One worker opens every episode (its probe requests are never answered: lost, then
        # requested again, and ticked all along).
        conf = write_settings(settings, tmp_path / "fencer.yaml")
        workers.append(WorkerProcess(conf, "ingest", tmp_path / "worker1.log").start())
        await tap.wait_for(
            lambda: {k for k, _ in ticks()} == {h.uuid for h in hosts}, 90, "every host ticked"
        )
        first = {c for _, c in ticks()}
        assert len(first) == 1
        # A second worker joins the group: some partitions move to it.
        workers.append(WorkerProcess(conf, "ingest", tmp_path / "worker2.log").start())
        await tap.wait_for(lambda: any(c not in first for _, c in ticks()), 90, "the new owner")
        await asyncio.sleep(3.0)  # the rebalance settles (both workers tick their own hosts)
        mark = len(tap.of(topics.host_signals))
        settled = time.monotonic()
        while time.monotonic() - settled < 6.0:
            await asyncio.sleep(0.5)
        clocks: dict[str, set[str]] = defaultdict(set)
        for host, clock in ticks(mark):
            clocks[host].add(clock)
        moved = {h for h, c in clocks.items() if c - first}
        assert moved, "no host moved to the second worker: the test shows nothing"
        assert set(clocks) == {h.uuid for h in hosts}, "every open host is still ticked"
        both = {h: sorted(c) for h, c in clocks.items() if len(c) > 1}
        assert not both, f"hosts ticked on two workers' clocks: {both}"
    finally:
        for w in workers:
            w.stop()
        await tap.stop()
