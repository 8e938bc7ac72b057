"""The host directory log (streams.directory): the listHosts poller's memory shared through Kafka.

A new leader resumes from what the last one saw: an unchanged Up host costs no signal, a host
that went down or came back while no leader polled is still reported; a recheck written by
another worker (ingest, the watch) makes the next poll report the host; an ingest worker that
never polled places hosts from the directory and still asks CloudStack whether the host is down.
Against the embedded broker, the CloudStack simulator (real signing) and real `fencer worker`
processes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from fencing.settings import CloudStackSettings, FencerSettings, PolicySettings, SigningSettings
from fencing.signing import write_keys_file
from lab.cloudstack_sim import CloudStackSimulator, SimCloud
from lab.pipeline import Tap, WorkerProcess, write_settings
from probes.inventory import Inventory
from streams.app import ROLES
from streams.directory import DirectoryLog, decode_entry, encode_entry, topic_name
from streams.ingest import Ingest
from streams.poller import HostDirectory, Poller
from tests.streams.test_signal_clocks import alert

pytestmark = pytest.mark.timeout(240)


def _cloud(n: int = 8) -> tuple[SimCloud, list[Any]]:
    sc = SimCloud()
    cluster = sc.add_cluster(sc.add_zone("zone1"), "cluster1")
    return sc, [sc.add_host(cluster, f"kvm{i:02d}", f"10.1.0.{i}") for i in range(1, n + 1)]


class Leader:
    """One worker's poller, ingest and directory log (a fresh process's view)."""

    def __init__(self, settings: FencerSettings, topic: str) -> None:
        self.inventory = Inventory(settings)
        self.directory = HostDirectory()
        self.log = DirectoryLog(settings, topic, self.directory)
        self.poller = Poller(lambda: self.inventory, self.directory, log=self.log)
        self.ingest = Ingest(lambda: self.inventory, self.directory, log=self.log)

    async def poll(self) -> dict[str, list[str]]:
        """One poll as the worker does it (signals, then remember): host uuid -> kinds."""
        signals, _ = await self.poller.poll()
        await self.poller.remember()
        out: dict[str, list[str]] = {}
        for s in signals:
            out.setdefault(s.host.host_uuid, []).append(s.kind)
        return out

    async def close(self) -> None:
        await self.log.stop()
        await self.inventory.close()


async def _wait(predicate: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


@pytest.fixture
async def sim() -> Any:
    sc, hosts = _cloud()
    s = await CloudStackSimulator(sc).start()
    s.hosts = hosts  # type: ignore[attr-defined]
    try:
        yield s
    finally:
        await s.stop()


def _settings(fencer_settings: Any, sim: CloudStackSimulator, **kw: Any) -> FencerSettings:
    settings: FencerSettings = fencer_settings(
        cloudstack=CloudStackSettings(
            endpoint=sim.url,
            api_key=SecretStr(sim.api_key),
            secret_key=SecretStr(sim.secret_key),
            **kw,
        )
    )
    return settings


def test_an_entry_round_trips_and_a_bad_one_names_its_field() -> None:
    entry = {"s": "Up/Enabled", "c": "c1", "i": "10.0.0.1", "n": "kvm01", "z": "z1"}
    assert decode_entry(encode_entry(entry)) == entry
    assert decode_entry(encode_entry({"s": None})) == {"s": None}
    assert decode_entry(None) is None
    with pytest.raises(ValueError, match="field 'c'"):
        decode_entry(b'{"v":1,"s":"Up/Enabled","c":7}')
    with pytest.raises(ValueError, match="unknown version 9"):
        decode_entry(b'{"v":9}')
    with pytest.raises(ValueError, match="not JSON"):
        decode_entry(b"{")


async def test_a_new_leader_resumes_unchanged_up_hosts_cost_nothing(
    fencer_settings: Any, sim: CloudStackSimulator
) -> None:
    sc, hosts = sim.cloud, sim.hosts  # type: ignore[attr-defined]
    settings = _settings(fencer_settings, sim)
    topic = topic_name(settings.group_for(("ingest",), ROLES))
    sc.set_host_state(hosts[1].uuid, "Disconnected")
    first = Leader(settings, topic)
    try:
        seen = await first.poll()
        # A first poll ever: no Up host is news; the down host is (as on every poll).
        assert seen == {hosts[1].uuid: ["maintenance_ended", "disconnected"]}
        assert first.directory.memory_ready and len(first.directory.entries) == 8
        assert await first.poll() == {hosts[1].uuid: ["maintenance_ended", "disconnected"]}
    finally:
        await first.close()  # the leader dies; while no leader polls:
    sc.set_host_state(hosts[1].uuid, "Up")  # one comes back,
    sc.set_host_state(hosts[4].uuid, "Disconnected")  # another goes down
    second = Leader(settings, topic)
    try:
        seen = await second.poll()
        assert seen == {
            hosts[1].uuid: ["maintenance_ended", "up"],
            hosts[4].uuid: ["maintenance_ended", "disconnected"],
        }, "the new leader reports exactly the hosts that changed while no leader polled"
        assert second.poller.stats["shared_memory"] == 1
        assert await second.poll() == {hosts[4].uuid: ["maintenance_ended", "disconnected"]}
    finally:
        await second.close()


async def test_a_recheck_from_another_worker_reports_an_up_host_once(
    fencer_settings: Any, sim: CloudStackSimulator
) -> None:
    sc, hosts = sim.cloud, sim.hosts  # type: ignore[attr-defined]
    settings = _settings(fencer_settings, sim)
    topic = topic_name(settings.group_for(("ingest",), ROLES))
    leader, other = Leader(settings, topic), Leader(settings, topic)
    try:
        assert await leader.poll() == {}
        assert await other.log.start()
        # The other worker's ingest: an alert while CloudStack reports the host down...
        sc.set_host_state(hosts[2].uuid, "Disconnected")
        signal, _ = await other.ingest.signal(alert(hosts[2].uuid, "kvm03", "2026-01-01"))
        assert signal is not None and signal.kind == "disconnected"
        # ...placed from the directory (cluster, address): only the state was asked
        assert signal.host.cluster_uuid == hosts[2].cluster_uuid
        assert signal.host.ip_address == hosts[2].ip
        asked = [c for c, p in sc.calls if c == "listHosts" and p.get("id") == hosts[2].uuid]
        assert len(asked) == 1
        # ...and the host is back before the leader's next poll: the poll still reports it.
        sc.set_host_state(hosts[2].uuid, "Up")
        await _wait(lambda: leader.directory.seen.get(hosts[2].uuid, "") is None, "recheck read")
        assert await leader.poll() == {hosts[2].uuid: ["maintenance_ended", "up"]}
        assert await leader.poll() == {}, "and only once"
        # The watch asks the same for the hosts it holds open.
        assert await other.log.recheck({hosts[5].uuid, hosts[6].uuid})
        await _wait(lambda: leader.directory.seen.get(hosts[6].uuid, "") is None, "rechecks")
        assert set(await leader.poll()) == {hosts[5].uuid, hosts[6].uuid}
    finally:
        await leader.close()
        await other.close()


async def test_the_directory_never_replaces_cloudstacks_state_now(
    fencer_settings: Any, sim: CloudStackSimulator
) -> None:
    sc, hosts = sim.cloud, sim.hosts  # type: ignore[attr-defined]
    settings = _settings(fencer_settings, sim)
    topic = topic_name(settings.group_for(("ingest",), ROLES))
    leader = Leader(settings, topic)
    try:
        sc.set_host_state(hosts[3].uuid, "Disconnected")
        await leader.poll()
        assert leader.directory.seen[hosts[3].uuid] == "Disconnected/Enabled"
        sc.set_host_state(hosts[3].uuid, "Up")  # back, and no poll since
        assert await leader.ingest.signal(alert(hosts[3].uuid, "kvm04", "2026-01-01")) == (
            None,
            None,
        )
    finally:
        await leader.close()


async def test_without_a_readable_directory_the_poller_reports_every_host(
    fencer_settings: Any, sim: CloudStackSimulator
) -> None:
    settings = _settings(fencer_settings, sim)
    dead = settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"bootstrap_servers": "127.0.0.1:1"})}
    )
    leader = Leader(settings, "unused")
    leader.log = DirectoryLog(dead, "fencer-x-host-directory", leader.directory)
    leader.poller.log, leader.poller.log_timeout = leader.log, 2.0
    try:
        seen = await leader.poll()
        assert len(seen) == 8 and all(k == ["maintenance_ended", "up"] for k in seen.values())
        assert not leader.directory.memory_ready and leader.log.failures == 1
        assert await leader.poll() == {}  # its own memory, as before
    finally:
        await leader.close()


async def test_a_restarted_worker_resumes_the_last_leaders_memory(
    fencer_settings: Any, sim: CloudStackSimulator, tmp_path: Path
) -> None:
    """Real workers: the first leader's polls never report an Up host; after it is killed,
    one host comes back and another goes down; the next leader's polls report those two and no
    signal at all for the six unchanged Up hosts."""
    sc, hosts = sim.cloud, sim.hosts  # type: ignore[attr-defined]
    settings = fencer_settings(
        isolated_topics=True,
        policy=PolicySettings(check_interval=1.0, extra_checks=2, startup_quiet=0),
        cloudstack=CloudStackSettings(
            endpoint=sim.url, api_key=sim.api_key, secret_key=sim.secret_key, poll_interval=1.0
        ),
        signing=SigningSettings(keys_file=write_keys_file(tmp_path / "signing.keys")),
    )
    topic = topic_name(settings.group_for(("ingest",), ROLES))
    conf = write_settings(settings, tmp_path / "fencer.yaml")
    tap = await Tap(settings).start([settings.kafka.topics.host_signals])
    workers: list[WorkerProcess] = []

    def poller_signals(since: float) -> list[tuple[str | None, str]]:
        return [
            (k, v["kind"])
            for k, v in tap.of(settings.kafka.topics.host_signals)
            if v.get("source") == "poller" and v["at"] >= since
        ]

    try:
        sc.set_host_state(hosts[1].uuid, "Disconnected")
        directory = HostDirectory()
        reader = DirectoryLog(settings, topic, directory)
        workers.append(WorkerProcess(conf, "ingest", tmp_path / "worker1.log").start())
        await tap.wait_for(
            lambda: "disconnected" in [k for _, k in poller_signals(0)], 90, "a first poll"
        )
        assert await reader.start()
        await _wait(lambda: len(directory.entries) == 8, "eight entries", 30)
        await tap.wait_for(lambda: len(poller_signals(0)) >= 6, 30, "three polls")
        assert {k for k, _ in poller_signals(0)} == {hosts[1].uuid}, "no Up host is news"
        workers[0].kill()
        sc.set_host_state(hosts[1].uuid, "Up")
        sc.set_host_state(hosts[4].uuid, "Disconnected")
        restarted = time.time()
        workers.append(WorkerProcess(conf, "ingest", tmp_path / "worker2.log").start())
        await tap.wait_for(
            lambda: (hosts[1].uuid, "up") in poller_signals(restarted), 90, "the host came back"
        )
        await tap.wait_for(lambda: len(poller_signals(restarted)) >= 2 + 6, 30, "three polls")
        after = poller_signals(restarted)
        assert {k for k, _ in after} == {hosts[1].uuid, hosts[4].uuid}
        # (once, or again if the watch's recheck of its open row landed after that poll)
        assert {kind for k, kind in after if k == hosts[1].uuid} == {"maintenance_ended", "up"}
        assert "disconnected" in [kind for k, kind in after if k == hosts[4].uuid]
        await _wait(
            lambda: (
                directory.seen.get(hosts[1].uuid) == "Up/Enabled"
                and directory.seen.get(hosts[4].uuid) == "Disconnected/Enabled"
            ),
            "the new leader remembered",
        )
        await reader.stop()
    finally:
        for w in workers:
            w.stop()
        await tap.stop()


async def test_a_worker_asks_again_for_the_open_hosts_it_recovers(
    fencer_settings: Any, sim: CloudStackSimulator, tmp_path: Path
) -> None:
    """The watch's side: an open episode whose host the directory already calls Up (a lost
    recheck, or a directory younger than the episode) still ends once a worker holding the row
    starts: its tick sweep writes a recheck, and the leader's next poll reports the host Up."""
    sc, hosts = sim.cloud, sim.hosts  # type: ignore[attr-defined]
    settings = fencer_settings(
        isolated_topics=True,
        policy=PolicySettings(check_interval=1.0, extra_checks=2, startup_quiet=0),
        cloudstack=CloudStackSettings(
            endpoint=sim.url, api_key=sim.api_key, secret_key=sim.secret_key, poll_interval=1.0
        ),
        signing=SigningSettings(keys_file=write_keys_file(tmp_path / "signing.keys")),
    )
    topics = settings.kafka.topics
    topic = topic_name(settings.group_for(("ingest",), ROLES))
    conf = write_settings(settings, tmp_path / "fencer.yaml")
    tap = await Tap(settings).start([topics.host_signals, topics.probe_requests])
    workers: list[WorkerProcess] = []
    host = hosts[2].uuid
    writer = DirectoryLog(settings, topic, HostDirectory())
    try:
        sc.set_host_state(host, "Disconnected")
        workers.append(WorkerProcess(conf, "ingest", tmp_path / "worker1.log").start())
        # The poller reports it, the row opens: a probe request (never answered here).
        await tap.wait_for(
            lambda: any(k == host for k, _ in tap.of(topics.probe_requests)), 90, "an episode"
        )
        workers[0].kill()
        assert await writer.start()
        await _wait(lambda: host in writer.directory.entries, "the host's entry")
        stale = {**writer.directory.entries[host], "s": "Up/Enabled"}
        await writer.write([(host, stale)])
        sc.set_host_state(host, "Up")  # back, and the directory already says so
        restarted = time.time()
        workers.append(WorkerProcess(conf, "ingest", tmp_path / "worker2.log").start())
        await tap.wait_for(
            lambda: any(
                k == host and v.get("source") == "poller" and v["kind"] == "up"
                for k, v in tap.of(topics.host_signals)
                if v["at"] >= restarted
            ),
            90,
            "the poller reporting the open host Up",
        )
        await _wait(lambda: writer.directory.seen.get(host) == "Up/Enabled", "remembered", 30)
    finally:
        await writer.stop()
        for w in workers:
            w.stop()
        await tap.stop()
