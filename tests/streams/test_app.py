"""The Faust topology on the embedded broker with real `fencer worker` processes.

The test plays the prober: it answers each probe request on `probe-requests` with a result of
its choosing, so what is checked is the topology (ingest, watch, timer, gate, tables, changelog
recovery, rebalancing, dead letters), not the probes."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from fencing.events import Evidence, FenceAction
from fencing.records import HostRef, ProbeRequest, ProbeResult
from fencing.settings import CloudStackSettings, IpmiSettings, PolicySettings, SigningSettings
from fencing.signing import write_keys_file
from lab.cloudstack_sim import CloudStackSimulator, SimCloud
from lab.pipeline import Tap, WorkerProcess, write_settings

pytestmark = pytest.mark.timeout(240)

CHECK = 1.0  # check_interval in these tests
EXTRA = 2  # extra_checks


class Cloud:
    """A simulated cloud, one worker settings file, a tap on the topics and a scripted prober."""

    def __init__(self, sim: CloudStackSimulator, settings: Any, tmp: Path) -> None:
        self.sim, self.settings, self.tmp = sim, settings, tmp
        self.topics = settings.kafka.topics
        self.file = write_settings(settings, tmp / "fencer.yaml")
        self.tap = Tap(settings)
        self.answer: Evidence | None = Evidence.STALE  # None: leave requests unanswered
        self.workers: list[WorkerProcess] = []
        self.answered: list[ProbeRequest] = []
        self.unanswered: list[ProbeRequest] = []

    async def start(self) -> None:
        t = self.topics
        self.tap.on_record = self._on_record
        await self.tap.start(
            [t.probe_requests, t.fence_decisions, t.dead_letter, t.notices, t.host_signals]
        )

    async def _on_record(self, topic: str, key: str | None, value: dict[str, Any]) -> None:
        if topic != self.topics.probe_requests:
            return
        req = ProbeRequest.model_validate(value)
        if self.answer is None:
            self.unanswered.append(req)
            return
        await self._answer(req)

    async def answer_pending(self) -> None:
        """Answer what came in while answering was off (a probe worker catching up)."""
        pending, self.unanswered = self.unanswered, []
        for req in pending:
            await self._answer(req)

    async def _answer(self, req: ProbeRequest) -> None:
        """A reading that the core will judge as `self.answer` (after the baseline check)."""
        key = req.host.host_uuid
        self.answered.append(req)
        disk = "/mnt/pool/disk-1"
        written = {
            Evidence.STALE: 1_000.0,  # the same mtime at every check: nothing was written
            Evidence.ALIVE: 1_000.0 + req.check,  # a new mtime at every check
        }.get(self.answer)  # type: ignore[arg-type]
        result = ProbeResult(
            host=req.host,
            episode=req.episode,
            check=req.check,
            suspect_since=req.suspect_since,
            finished_at=time.time(),
            mtimes={disk: written} if written is not None else {},
            complete=written is not None,
            reason=None if written is not None else "scripted: cannot look",
            files_wanted=1,
            neighbour="kvm-n",
        )
        await self.tap.send(self.topics.probe_results, key, result)

    def worker(self, roles: str = "ingest") -> WorkerProcess:
        w = WorkerProcess(self.file, roles, self.tmp / f"worker{len(self.workers)}.log").start()
        self.workers.append(w)
        return w

    async def publish_events(self) -> None:
        """Send what the simulated management server published to the event bus topic."""
        while self.sim.cloud.events:
            key, value = self.sim.cloud.events.pop(0)
            await self.tap.send(self.topics.cloudstack, key, value)

    def decisions(self, host: str | None = None) -> list[dict[str, Any]]:
        return [v for k, v in self.tap.of(self.topics.fence_decisions) if host in (None, k)]

    def requests(self, host: str) -> list[dict[str, Any]]:
        return [v for k, v in self.tap.of(self.topics.probe_requests) if k == host]

    def logs(self) -> str:
        return "\n".join(
            (w.log_file.read_text() if w.log_file and w.log_file.exists() else "")
            for w in self.workers
        )

    async def stop(self) -> None:
        for w in self.workers:
            w.stop()
        await self.tap.stop()


@pytest.fixture
async def cloud(fencer_settings: Any, tmp_path: Path) -> AsyncIterator[Cloud]:
    sim_cloud = SimCloud()
    sim_cloud.events = []
    zone = sim_cloud.add_zone("zone1")
    cluster = sim_cloud.add_cluster(zone, "cluster1")
    for i in range(1, 9):
        sim_cloud.add_host(cluster, f"kvm{i:02d}", f"10.1.0.{i}")
    sim = await CloudStackSimulator(sim_cloud).start()
    settings = fencer_settings(
        isolated_topics=True,
        policy=PolicySettings(
            check_interval=CHECK, extra_checks=EXTRA, startup_quiet=0, probe_timeout=30
        ),
        defaults=IpmiSettings(action=FenceAction.STOP),
        cloudstack=CloudStackSettings(
            endpoint=sim.url, api_key=sim.api_key, secret_key=sim.secret_key, poll_interval=1.0
        ),
        # The gate (ingest role) signs its decisions: it does not start without a key.
        signing=SigningSettings(keys_file=write_keys_file(tmp_path / "signing.keys")),
    )
    c = Cloud(sim, settings, tmp_path)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()
        await sim.stop()


def host_named(cloud: Cloud, name: str) -> Any:
    return next(h for h in cloud.sim.cloud.hosts.values() if h.name == name)


async def disconnect(cloud: Cloud, name: str) -> str:
    h = host_named(cloud, name)
    cloud.sim.cloud.set_host_state(h.uuid, "Disconnected")
    await cloud.publish_events()
    return h.uuid


async def test_stale_evidence_gives_exactly_one_decision_at_the_expected_check(cloud: Cloud):
    cloud.worker()
    host = await disconnect(cloud, "kvm01")
    await cloud.tap.wait_for(lambda: cloud.decisions(host), 60, "a fence decision")
    decision = cloud.decisions(host)[0]
    # The baseline, 1 + extra_checks stale results, then the decision; no probe after it.
    assert decision["approved"] is True
    assert decision["action"] == "stop"
    assert decision["evidence"]["stale_checks"] == 1 + EXTRA
    assert [r["check"] for r in cloud.requests(host)] == [1, 2, 3, 4]
    assert decision["host"]["cluster_uuid"] == host_named(cloud, "kvm01").cluster_uuid
    await _quiet(cloud, 3 * CHECK)
    assert len(cloud.decisions(host)) == 1
    assert [r["check"] for r in cloud.requests(host)] == [1, 2, 3, 4]


async def test_alive_evidence_never_fences(cloud: Cloud):
    cloud.answer = Evidence.ALIVE
    cloud.worker()
    host = await disconnect(cloud, "kvm02")
    await cloud.tap.wait_for(lambda: len(cloud.requests(host)) >= 5, 60, "five checks")
    assert cloud.decisions(host) == []


async def test_worker_restart_mid_episode_recovers_the_record_and_decides_once(cloud: Cloud):
    w = cloud.worker()
    host = await disconnect(cloud, "kvm03")
    await cloud.tap.wait_for(lambda: len(cloud.answered) >= 3, 60, "baseline and two stale")
    cloud.answer = None  # the fourth check is answered only after the restart
    w.kill()
    first = cloud.requests(host)
    suspect_since = first[0]["suspect_since"]
    assert [r["check"] for r in first][:3] == [1, 2, 3]
    assert cloud.decisions(host) == []
    cloud.answer = Evidence.STALE
    cloud.worker()
    await cloud.answer_pending()
    await cloud.tap.wait_for(lambda: cloud.decisions(host), 90, "a decision after restart")
    reqs = cloud.requests(host)
    # The restarted worker went on from the recovered record: same suspect time, check 4. A
    # check the new worker requested is on its own clock, not the reference's (the reading
    # that arrived before the kill): it is a new reference, and one more check decides
    # (fencing.decision: an interval is measured on one worker clock only). Which of the two
    # happens depends on whether check 4 went out before the kill.
    assert [r["check"] for r in reqs] in ([1, 2, 3, 4], [1, 2, 3, 4, 5])
    assert {r["suspect_since"] for r in reqs} == {suspect_since}
    await _quiet(cloud, 3 * CHECK)
    assert len(cloud.decisions(host)) == 1
    assert cloud.decisions(host)[0]["evidence"]["suspect_since"] == suspect_since


async def _rewind(cloud: Cloud, topic: str) -> None:
    """Commit offset 0 of every partition of `topic` for the dead worker's consumer group, as
    if it had never committed: joined as a member of the group (the broker refuses a commit
    from outside while the group has members), once every partition is assigned to it."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
    from aiokafka.structs import OffsetAndMetadata, TopicPartition

    from streams.kafka import aiokafka_kwargs

    class AsFaust(RoundRobinPartitionAssignor):  # type: ignore[misc]
        name = "faust"  # the group's protocol: the dead worker's Faust assignor

    group = cloud.settings.group_for(["ingest"], ())  # the group of `cloud.worker()`
    consumer = AIOKafkaConsumer(
        group_id=group,
        enable_auto_commit=False,
        partition_assignment_strategy=(AsFaust,),
        **aiokafka_kwargs(cloud.settings),
    )
    await consumer.start()
    try:
        consumer.subscribe([topic])
        tps = {TopicPartition(topic, p) for p in range(cloud.settings.kafka.partitions)}
        deadline = time.monotonic() + 90
        while consumer.assignment() != tps:
            assert time.monotonic() < deadline, "the partitions were never assigned"
            await consumer.getmany(timeout_ms=500)
        await consumer.commit({tp: OffsetAndMetadata(0, "") for tp in tps})
        assert {await consumer.committed(tp) for tp in tps} == {0}
    finally:
        await consumer.stop()


async def test_host_signals_read_again_after_a_restart_neither_end_nor_reopen_an_episode(
    cloud: Cloud,
):
    """A worker killed before its consumer committed: the next one reads host-signals again from
    the last commit, here from the very start: episode 1 opened and ended by "the host is Up",
    then episode 2 opened. The recovered row has applied them all: the old "Up" does not end
    episode 2, nothing reopens, and episode 2 goes on to its one decision."""
    w = cloud.worker()
    cloud.answer = None  # episode 1 gathers no evidence: it only opens and ends
    host = await disconnect(cloud, "kvm06")
    await cloud.tap.wait_for(lambda: cloud.requests(host), 60, "episode 1's baseline request")
    cloud.sim.cloud.set_host_state(host, "Up")

    def recovered() -> int:
        kinds = [v["kind"] for k, v in cloud.tap.of(cloud.topics.notices) if k == host]
        return kinds.count("host_recovered")

    await cloud.tap.wait_for(lambda: recovered() == 1, 60, "episode 1 to end")
    cloud.unanswered.clear()
    cloud.answer = Evidence.STALE
    await disconnect(cloud, "kvm06")
    await cloud.tap.wait_for(lambda: len(cloud.answered) >= 3, 60, "baseline and two stale")
    cloud.answer = None
    w.kill()
    await _rewind(cloud, cloud.topics.host_signals)
    cloud.answer = Evidence.STALE
    cloud.worker()
    await cloud.answer_pending()
    await cloud.tap.wait_for(lambda: cloud.decisions(host), 90, "a decision after restart")
    await _quiet(cloud, 3 * CHECK)
    reqs = cloud.requests(host)
    assert {r["episode"] for r in reqs} == {1, 2}, reqs
    # (Check 5 when check 4 was requested after the restart: a new reference, as above.)
    assert [r["check"] for r in reqs if r["episode"] == 2] in ([1, 2, 3, 4], [1, 2, 3, 4, 5])
    assert recovered() == 1
    assert [d["episode"] for d in cloud.decisions(host)] == [2]
    assert "read again" in cloud.logs()


async def test_two_workers_split_hosts_and_the_survivor_takes_over_with_state(cloud: Cloud):
    from aiokafka.partitioner import murmur2

    cloud.answer = Evidence.UNKNOWN  # keep every host suspect, checks counting up
    a, b = cloud.worker(), cloud.worker()
    # Both in the group before any host is suspect (a late joiner would move hosts mid-run).
    await cloud.tap.wait_for(
        lambda: all(
            w.log_file is not None
            and w.log_file.exists()
            and "Worker]: Ready" in w.log_file.read_text()
            for w in (a, b)
        ),
        90,
        "both workers ready",
    )
    # One suspect host on every partition of host-signals (keys go by murmur2, as aiokafka's
    # producer sends them): whichever partitions each worker owns, both own suspect hosts.
    n = cloud.settings.kafka.partitions
    sim = cloud.sim.cloud
    cluster = next(iter(sim.clusters.values()))
    by_partition: dict[int, str] = {}
    extra = 0
    while len(by_partition) < n:
        for h in list(sim.hosts.values()):
            if h.name not in ("kvm01", "kvm02", "kvm03", "kvm08"):  # other tests' hosts
                by_partition.setdefault((murmur2(h.uuid.encode()) & 0x7FFFFFFF) % n, h.name)
        if len(by_partition) < n:
            extra += 1
            sim.add_host(cluster, f"kvm{20 + extra}", f"10.1.1.{extra}")
    hosts = [await disconnect(cloud, name) for name in by_partition.values()]
    await cloud.tap.wait_for(
        lambda: all(len(cloud.requests(h)) >= 3 for h in hosts), 90, "three checks per host"
    )
    owners = {h: {r["requested_by"] for r in cloud.requests(h)} for h in hosts}
    assert all(len(o) == 1 for o in owners.values()), owners  # one worker per host
    by_pid = {w.pid: w for w in (a, b)}
    used = {next(iter(o)).split(":")[1] for o in owners.values()}
    assert len(used) == 2, owners  # every partition has a host, and both workers own some
    victim = by_pid[int(next(iter(owners[hosts[0]])).split(":")[1])]
    moved = [h for h in hosts if next(iter(owners[h])).endswith(f":{victim.pid}")]
    counts = {h: len(cloud.requests(h)) for h in moved}
    victim.kill()
    await cloud.tap.wait_for(
        lambda: all(len(cloud.requests(h)) >= counts[h] + 2 for h in moved), 90, "takeover"
    )
    for h in moved:
        reqs = cloud.requests(h)
        checks = [r["check"] for r in reqs]
        # State intact: check numbers go on from where the dead worker left them.
        assert checks == sorted(set(checks)) and checks[0] == 1, checks
        assert {r["suspect_since"] for r in reqs} == {reqs[0]["suspect_since"]}
        assert len({r["requested_by"] for r in reqs}) == 2


async def test_junk_goes_to_dead_letter_and_good_events_still_flow(cloud: Cloud):
    cloud.worker()
    t = cloud.topics
    await cloud.tap.send(t.cloudstack, None, b"\xff\xfe not json")
    await cloud.tap.send(t.cloudstack, None, json.dumps({"event": 5}))
    await cloud.tap.send(t.host_signals, "h-x", b"{broken")
    host = await disconnect(cloud, "kvm08")
    await cloud.tap.wait_for(lambda: cloud.decisions(host), 60, "a decision after junk")
    dead = [v for _k, v in cloud.tap.of(t.dead_letter)]
    await cloud.tap.wait_for(lambda: len(cloud.tap.of(t.dead_letter)) >= 3, 10, "dead letters")
    dead = [v for _k, v in cloud.tap.of(t.dead_letter)]
    assert {d["topic"] for d in dead} == {t.cloudstack, t.host_signals}
    assert all(d["reason"] for d in dead)
    import base64

    originals = {base64.b64decode(d["value_b64"]) for d in dead}
    assert {b"\xff\xfe not json", b"{broken"} <= originals


async def test_duplicate_alerts_and_an_old_poll_never_double_count_or_reopen(cloud: Cloud):
    cloud.worker()
    h = host_named(cloud, "kvm05")
    cloud.sim.cloud.set_host_state(h.uuid, "Disconnected")
    alert = cloud.sim.cloud.events[0]
    await cloud.publish_events()
    await cloud.tap.send(cloud.topics.cloudstack, alert[0], alert[1])  # the same alert twice
    await cloud.tap.wait_for(lambda: cloud.decisions(h.uuid), 60, "a decision")
    assert [r["check"] for r in cloud.requests(h.uuid)] == [1, 2, 3, 4]
    episode = cloud.decisions(h.uuid)[0]["episode"]
    # The host comes back; then an old "Disconnected" (from before it came back) arrives late.
    cloud.sim.cloud.set_host_state(h.uuid, "Up")
    await cloud.tap.wait_for(
        lambda: any(
            v["kind"] == "host_recovered"
            for k, v in cloud.tap.of(cloud.topics.notices)
            if k == h.uuid
        ),
        30,
        "the episode to end",
    )
    old = json.loads(alert[1])
    await cloud.tap.send(cloud.topics.cloudstack, None, json.dumps(old))
    await _quiet(cloud, 3 * CHECK)
    reqs = cloud.requests(h.uuid)
    assert {r["episode"] for r in reqs} == {episode}
    assert len(cloud.decisions(h.uuid)) == 1


async def _quiet(cloud: Cloud, seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)
    _ = HostRef  # keep the import for type readers


async def test_no_configured_secret_appears_in_any_worker_log_line(cloud: Cloud):
    """Every log line of a whole episode (all roles, DEBUG level) is free of every secret."""
    from fencing.settings import EmailSettings, IpmiOverrides, SnmpReceiver, SnmpSettings

    ipmi_pw, smtp_pw, community = "ipmi-S3cret-pw", "smtp-S3cret-pw", "snmp-S3cret-community"
    s = cloud.settings.model_copy(
        update={
            "log_level": "DEBUG",
            "defaults": IpmiSettings(action=FenceAction.NOTHING, password=ipmi_pw),
            "email": EmailSettings(
                enabled=True, port=1, password=smtp_pw, username="u", to=["ops@example.com"]
            ),
            "snmp": SnmpSettings(
                enabled=True,
                receivers=[SnmpReceiver(host="127.0.0.1", port=1, community=community)],
            ),
        }
    )
    s.clusters = {}
    s.hosts = {
        h.uuid: {"ipmi": IpmiOverrides(address="127.0.0.1", password=ipmi_pw)}
        for h in cloud.sim.cloud.hosts.values()
    }
    cloud.file = write_settings(s, cloud.tmp / "fencer-secrets.yaml")
    # Every role but probe (the test is the prober: these hosts' addresses are not on loopback).
    cloud.worker("ingest,actuate,notify")
    host = await disconnect(cloud, "kvm06")
    await cloud.tap.wait_for(lambda: cloud.decisions(host), 60, "a decision")
    await _quiet(cloud, 2)
    for w in cloud.workers:
        w.stop()
    text = cloud.logs()
    assert "decision" in text  # the log really was collected
    signing_secret = (cloud.tmp / "signing.keys").read_text().split()[1]
    for secret in (
        ipmi_pw,
        smtp_pw,
        community,
        cloud.sim.api_key,
        cloud.sim.secret_key,
        signing_secret,
    ):
        assert secret not in text, f"a secret leaked into the worker log ({len(text)} bytes)"


async def test_preflight_reports_a_bmc_that_would_fail_a_fence(cloud: Cloud):
    """The periodic pre-flight reads each host's BMC (here: a lab BMC with another password)."""
    from fencing.settings import ActuatorSettings, IpmiOverrides
    from lab.bmc import BmcSimulator

    with BmcSimulator(password="the-real-one") as bmc:
        s = cloud.settings.model_copy(
            update={"actuator": ActuatorSettings(preflight_interval=1.0, power_timeout=5)}
        )
        h = host_named(cloud, "kvm01")
        s.hosts = {
            h.uuid: {
                "ipmi": IpmiOverrides(address="127.0.0.1", port=bmc.port, password="a-wrong-one")
            }
        }
        cloud.file = write_settings(s, cloud.tmp / "fencer-preflight.yaml")
        cloud.worker("actuate")
        notices = cloud.topics.notices
        got = await cloud.tap.wait_for(
            lambda: [
                v
                for k, v in cloud.tap.of(notices)
                if k == h.uuid and v["kind"] == "preflight_failed"
            ],
            60,
            "a pre-flight failure notice",
        )
        assert "a-wrong-one" not in json.dumps(got)
        assert bmc.power == "on"  # a pre-flight never changes power
