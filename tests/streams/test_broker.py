"""The embedded broker starts, serves, stops without leftovers, and Faust tables survive restarts.

The Faust recovery tests are the reason `streams.tansu_compat` exists: with the workaround a
restarted worker recovers its table exactly; with plain aiokafka (settings say the broker is a
real Kafka) the same scenario loses rows, because Tansu reports too low an end offset.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.structs import TopicPartition

from fencing.settings import FencerSettings, TopicNames
from streams.broker import BrokerError, EmbeddedBroker, die_with_parent, free_port
from streams.kafka import aiokafka_kwargs, ensure_topics, faust_app_kwargs, topic_specs
from streams.tansu_compat import (
    apply_tansu_workarounds,
    remove_tansu_workarounds,
    tansu_workarounds_applied,
)

HERE = Path(__file__).parent
COUNTER = HERE / "faust_counter.py"


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


async def _until(condition: Any, timeout: float = 10.0) -> None:
    """Poll `condition` until true or `timeout` (the caller asserts it afterwards)."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return False


# -- the broker ------------------------------------------------------------------------------


async def test_broker_has_every_topic_with_its_partition_count(broker: EmbeddedBroker) -> None:
    settings = broker.fencer_settings()
    admin = AIOKafkaAdminClient(**aiokafka_kwargs(settings))
    await admin.start()
    try:
        names = TopicNames().model_dump().values()
        described = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(names)}
        configs = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, "fencer.settings")]
        )
    finally:
        await admin.close()
    assert described == {s.name: s.partitions for s in topic_specs(settings)}
    assert described["fencer.fence-proposals"] == 1
    assert described["cloudstack"] == settings.kafka.partitions == 4
    entries = {c[0]: c[1] for c in configs[0].resources[0][4]}
    assert entries.get("cleanup.policy") == "compact"


async def test_produce_consume_round_trip(fencer_settings: Any) -> None:
    settings = fencer_settings(isolated_topics=True)
    topic = settings.kafka.topics.notices
    producer = AIOKafkaProducer(**aiokafka_kwargs(settings))
    await producer.start()
    try:
        sent = {f"k{i}".encode(): f"v{i}".encode() for i in range(40)}
        await asyncio.gather(*[await producer.send(topic, v, key=k) for k, v in sent.items()])
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic, auto_offset_reset="earliest", enable_auto_commit=False, **aiokafka_kwargs(settings)
    )
    await consumer.start()
    got: dict[bytes, bytes] = {}
    partitions: set[int] = set()
    try:
        async with asyncio.timeout(15):
            while len(got) < len(sent):
                for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                    partitions.add(tp.partition)
                    got.update((r.key, r.value) for r in records)
    finally:
        await consumer.stop()
    assert got == sent
    assert partitions == {0, 1, 2, 3}


async def test_ensure_topics_creates_only_what_is_missing(fencer_settings: Any) -> None:
    settings = fencer_settings(isolated_topics=True)  # the factory already created them
    assert await ensure_topics(settings) == []
    renamed = settings.kafka.topics.model_copy(update={"dead_letter": "x" + os.urandom(4).hex()})
    more = settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"topics": renamed})}
    )
    assert await ensure_topics(more) == [renamed.dead_letter]


def test_stop_leaves_no_process_and_a_taken_port_is_refused() -> None:
    with EmbeddedBroker(create_topics=False) as b:
        pid = b.pid
        assert pid is not None and pid_alive(pid)
        # Tansu exits with AddrInUse; the answer on the port is not ours, so start must fail.
        with pytest.raises(BrokerError, match=str(b.port)):
            EmbeddedBroker(b.port, create_topics=False, start_timeout=5).start()
    assert not pid_alive(pid)
    assert not b.running()


async def test_async_start_and_stop() -> None:
    async with EmbeddedBroker(create_topics=False) as b:
        pid = b.pid
        assert pid is not None
        admin = AIOKafkaAdminClient(bootstrap_servers=b.bootstrap_servers)
        await admin.start()
        assert (await admin.describe_cluster())["cluster_id"] == b.cluster_id
        await admin.close()
    assert not pid_alive(pid)


def test_broker_dies_with_its_owner_even_when_killed(tmp_path: Path) -> None:
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import sys, time
                from streams.broker import EmbeddedBroker
                b = EmbeddedBroker(create_topics=False).start()
                print(b.pid, flush=True)
                time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        tansu_pid = int(owner.stdout.readline())
        assert pid_alive(tansu_pid)
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        assert wait_gone(tansu_pid), "tansu outlived its SIGKILLed owner"
    finally:
        owner.kill()
        owner.wait()


def test_cli_broker_prints_address_and_stops_on_sigterm() -> None:
    port = free_port()
    cli = subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "broker", "--port", str(port), "--no-topics"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert cli.stdout is not None
        lines = []
        while not any("bootstrap servers" in line for line in lines):
            line = cli.stdout.readline()
            assert line, f"fencer broker exited early: {lines}"
            lines.append(line)
        assert f"127.0.0.1:{port}" in lines[-1]
        tansu_pid = int(lines[-1].split("tansu pid ")[1].rstrip(")\n"))
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(10) == 0
        assert not pid_alive(tansu_pid)
    finally:
        cli.kill()
        cli.wait()


# -- the workaround ------------------------------------------------------------------------


async def test_workaround_is_idempotent_and_removable() -> None:
    from aiokafka.consumer.fetcher import Fetcher

    was = tansu_workarounds_applied()
    try:
        remove_tansu_workarounds()
        plain = AIOKafkaConsumer.end_offsets
        plain_fetch = (Fetcher._get_actions_per_node, Fetcher._proc_fetch_request)
        apply_tansu_workarounds()
        patched = AIOKafkaConsumer.end_offsets
        apply_tansu_workarounds()
        assert AIOKafkaConsumer.end_offsets is patched is not plain
        assert Fetcher._get_actions_per_node is not plain_fetch[0]
        remove_tansu_workarounds()
        assert AIOKafkaConsumer.end_offsets is plain
        assert (Fetcher._get_actions_per_node, Fetcher._proc_fetch_request) == plain_fetch
    finally:
        (apply_tansu_workarounds if was else remove_tansu_workarounds)()


class _TableManagerDouble:
    """What `TableManager.on_start` touches: its sleep, the stop flag, the channels, the
    recovery."""

    def __init__(self, should_stop: bool = False) -> None:
        self.should_stop = should_stop
        self.calls: list[str] = []
        self.recovery = self

    async def sleep(self, seconds: float) -> None:  # mode's Service.sleep
        await asyncio.sleep(seconds)

    async def _update_channels(self) -> None:
        self.calls.append("channels")

    async def start(self) -> None:
        self.calls.append("recovery")


async def test_faust_tables_register_without_the_one_second_sleep() -> None:
    from faust.tables.manager import TableManager

    from streams.kafka import apply_faust_start_settings, remove_faust_start_settings

    apply_faust_start_settings()
    patched = TableManager.on_start
    apply_faust_start_settings()  # idempotent
    assert TableManager.on_start is patched
    try:
        remove_faust_start_settings()
        plain = TableManager.on_start
        assert plain is not patched
        started = time.monotonic()
        await plain(_TableManagerDouble())  # type: ignore[arg-type]
        assert time.monotonic() - started >= 1.0  # Faust's own sleep
    finally:
        apply_faust_start_settings()  # as every fencer process has it (prepare_kafka)
    assert TableManager.on_start is patched
    manager = _TableManagerDouble()
    started = time.monotonic()
    await TableManager.on_start(manager)  # type: ignore[arg-type]
    assert time.monotonic() - started < 0.5
    assert manager.calls == ["channels", "recovery"]  # Faust's order, nothing left out
    stopping = _TableManagerDouble(should_stop=True)
    await TableManager.on_start(stopping)  # type: ignore[arg-type]
    assert stopping.calls == []


async def test_consumers_fetch_wait_is_capped_only_while_patched() -> None:
    from streams.tansu_compat import CONSUMER_FETCH_MAX_WAIT_MS

    was = tansu_workarounds_applied()
    try:
        remove_tansu_workarounds()
        plain = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:9", fetch_max_wait_ms=1500)
        assert plain._fetch_max_wait_ms == 1500
        apply_tansu_workarounds()
        capped = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:9", fetch_max_wait_ms=1500)
        default = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:9")
        assert capped._fetch_max_wait_ms == default._fetch_max_wait_ms
        assert capped._fetch_max_wait_ms == CONSUMER_FETCH_MAX_WAIT_MS < 500
    finally:
        (apply_tansu_workarounds if was else remove_tansu_workarounds)()


def test_fetch_wait_is_short_only_while_records_flow() -> None:
    from streams.tansu_compat import ACTIVE_WINDOW_S, fetch_wait_for

    assert fetch_wait_for(40, 10, None, now=100.0) == 40  # never a record: idle
    assert fetch_wait_for(40, 10, 99.0, now=100.0) == 10
    assert fetch_wait_for(40, 10, 100.0 - ACTIVE_WINDOW_S, now=100.0) == 40
    assert fetch_wait_for(5, 10, 99.0, now=100.0) == 5  # a consumer that asked for less keeps it


def test_fetch_wait_overrides_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from streams.tansu_compat import (
        ACTIVE_FETCH_MAX_WAIT_MS,
        ACTIVE_FETCH_WAIT_ENV,
        FETCH_WAIT_ENV,
        active_fetch_max_wait_ms,
        consumer_fetch_max_wait_ms,
    )

    monkeypatch.delenv(ACTIVE_FETCH_WAIT_ENV, raising=False)
    assert active_fetch_max_wait_ms() == ACTIVE_FETCH_MAX_WAIT_MS
    monkeypatch.setenv(FETCH_WAIT_ENV, "25")
    assert consumer_fetch_max_wait_ms() == 25
    for bad in ("0", "ten"):
        monkeypatch.setenv(ACTIVE_FETCH_WAIT_ENV, bad)
        with pytest.raises(ValueError, match=ACTIVE_FETCH_WAIT_ENV):
            active_fetch_max_wait_ms()


async def test_a_consumer_fetches_briefly_while_records_flow_and_slowly_when_idle(
    fencer_settings: Any,
) -> None:
    from streams.tansu_compat import (
        ACTIVE_FETCH_MAX_WAIT_MS,
        ACTIVE_WINDOW_S,
        CONSUMER_FETCH_MAX_WAIT_MS,
    )

    settings = fencer_settings(isolated_topics=True)
    topic = settings.kafka.topics.notices
    was = tansu_workarounds_applied()
    apply_tansu_workarounds()
    consumer = AIOKafkaConsumer(
        topic, auto_offset_reset="earliest", fetch_max_wait_ms=1500, **aiokafka_kwargs(settings)
    )
    producer = AIOKafkaProducer(**aiokafka_kwargs(settings))
    await consumer.start()
    await producer.start()
    try:
        fetcher = consumer._fetcher
        assert await consumer.getmany(timeout_ms=300) == {}  # several empty fetches
        assert fetcher._fetch_max_wait_ms == CONSUMER_FETCH_MAX_WAIT_MS
        await producer.send_and_wait(topic, b"v", key=b"k")
        async with asyncio.timeout(10):
            record = await consumer.getone()
        assert record.value == b"v"
        # the next fetches of the now empty partitions (waited for: seconds under load)
        await _until(lambda: fetcher._fetch_max_wait_ms == ACTIVE_FETCH_MAX_WAIT_MS)
        assert fetcher._fetch_max_wait_ms == ACTIVE_FETCH_MAX_WAIT_MS
        # The last record as if it came a whole window ago: the consumer is idle again.
        fetcher._tansu_record_at -= ACTIVE_WINDOW_S
        await _until(lambda: fetcher._fetch_max_wait_ms == CONSUMER_FETCH_MAX_WAIT_MS)
        assert fetcher._fetch_max_wait_ms == CONSUMER_FETCH_MAX_WAIT_MS
    finally:
        await producer.stop()
        await consumer.stop()
        (apply_tansu_workarounds if was else remove_tansu_workarounds)()


async def test_a_background_tail_keeps_the_idle_wait_while_records_flow(
    fencer_settings: Any,
) -> None:
    from streams.tansu_compat import (
        ACTIVE_FETCH_MAX_WAIT_MS,
        CONSUMER_FETCH_MAX_WAIT_MS,
        IDLE_WAIT_CLIENT_IDS,
    )

    settings = fencer_settings(isolated_topics=True)
    topic = settings.kafka.topics.notices
    was = tansu_workarounds_applied()
    apply_tansu_workarounds()
    kw = aiokafka_kwargs(settings)
    tail = AIOKafkaConsumer(
        topic, auto_offset_reset="earliest", client_id="fencer-host-directory", **kw
    )
    stream = AIOKafkaConsumer(topic, auto_offset_reset="earliest", client_id="fencer-x", **kw)
    producer = AIOKafkaProducer(**kw)
    assert "fencer-host-directory" in IDLE_WAIT_CLIENT_IDS
    await tail.start()
    await stream.start()
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"v", key=b"k")
        async with asyncio.timeout(10):
            assert (await tail.getone()).value == b"v"
            assert (await stream.getone()).value == b"v"
        # both fetched a record; only the stream's consumer fetches briefly now
        await _until(lambda: stream._fetcher._fetch_max_wait_ms == ACTIVE_FETCH_MAX_WAIT_MS)
        assert stream._fetcher._fetch_max_wait_ms == ACTIVE_FETCH_MAX_WAIT_MS
        assert tail._fetcher._tansu_record_at is not None
        assert await tail.getmany(timeout_ms=300) == {}  # several fetches since the record
        assert tail._fetcher._fetch_max_wait_ms == CONSUMER_FETCH_MAX_WAIT_MS
    finally:
        await producer.stop()
        await stream.stop()
        await tail.stop()
        (apply_tansu_workarounds if was else remove_tansu_workarounds)()


def test_prepare_kafka_never_patches_for_a_real_kafka() -> None:
    from streams.kafka import prepare_kafka

    was = tansu_workarounds_applied()
    remove_tansu_workarounds()
    try:
        prepare_kafka(FencerSettings())  # embedded defaults to False
        assert not tansu_workarounds_applied()
        prepare_kafka(FencerSettings(kafka={"embedded": True}))
        assert tansu_workarounds_applied()
    finally:
        (apply_tansu_workarounds if was else remove_tansu_workarounds)()


def test_faust_app_kwargs_carry_the_settings(tmp_path: Path) -> None:
    settings = FencerSettings(
        kafka={
            "bootstrap_servers": "a:9092,b:9093",
            "security_protocol": "SASL_PLAINTEXT",
            "sasl": {"mechanism": "SCRAM-SHA-256", "username": "u", "password": "pw-secret"},
            "table_store": "memory",
        },
        data_dir=tmp_path,
    )
    kw = faust_app_kwargs(settings)
    assert kw["broker"] == "kafka://a:9092;kafka://b:9093"
    assert kw["broker_session_timeout"] == 6.0
    assert kw["store"] == "memory://"
    assert kw["web_enabled"] is False
    assert kw["datadir"].startswith(str(tmp_path))
    assert kw["broker_credentials"].password == "pw-secret"
    assert "pw-secret" not in repr(kw["broker_credentials"])
    assert aiokafka_kwargs(settings)["sasl_plain_password"] == "pw-secret"


async def produce_batches(settings: FencerSettings, topic: str, n: int, keys: int) -> dict:
    """Send n keyed events in bursts (multi-record batches) and return the expected counts."""
    producer = AIOKafkaProducer(linger_ms=20, **aiokafka_kwargs(settings))
    await producer.start()
    expected: dict[str, int] = {}
    try:
        futures = []
        for i in range(n):
            key = f"host-{i % keys}"
            expected[key] = expected.get(key, 0) + 1
            futures.append(await producer.send(topic, b"x", key=key.encode()))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return expected


async def test_tansu_end_offsets_are_too_low_without_the_workaround(fencer_settings: Any) -> None:
    settings = fencer_settings(isolated_topics=True)
    topic = settings.kafka.topics.host_signals
    await produce_batches(settings, topic, 200, 8)
    tps = [TopicPartition(topic, p) for p in range(4)]
    was = tansu_workarounds_applied()
    consumer = AIOKafkaConsumer(**aiokafka_kwargs(settings))
    await consumer.start()
    try:
        remove_tansu_workarounds()
        plain = await consumer.end_offsets(tps)
        apply_tansu_workarounds()
        fixed = await consumer.end_offsets(tps)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        counted = dict.fromkeys(tps, 0)
        async with asyncio.timeout(15):
            while sum(counted.values()) < 200:
                for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                    counted[tp] += len(records)
    finally:
        await consumer.stop()
        (apply_tansu_workarounds if was else remove_tansu_workarounds)()
    assert fixed == counted
    assert sum(plain.values()) < sum(counted.values())


# -- Faust table recovery across a worker restart ---------------------------------------------


class CounterWorker:
    """One `faust_counter.py` worker process and the table it reports."""

    def __init__(self, settings_file: Path, out: Path) -> None:
        self.out = out
        out.unlink(missing_ok=True)
        parent = os.getpid()
        self.proc = subprocess.Popen(
            [sys.executable, str(COUNTER), str(settings_file), str(out)],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            # If pytest itself is killed, the worker must not keep running.
            preexec_fn=lambda: die_with_parent(parent),
        )

    def table(self) -> dict[str, int] | None:
        try:
            report = json.loads(self.out.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return report["counts"] if report["pid"] == self.proc.pid else None

    async def wait_table(self, done: Any, timeout: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"worker exited with {self.proc.returncode}"
            table = self.table()
            if table is not None and done(table):
                return table
            await asyncio.sleep(0.1)
        raise AssertionError(f"worker table not ready in {timeout} s: {self.table()}")

    async def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(self.proc.wait), 15)
            except TimeoutError:
                os.killpg(self.proc.pid, signal.SIGKILL)
                await asyncio.to_thread(self.proc.wait)


async def restart_scenario(settings: FencerSettings, work: Path) -> tuple[dict, dict, dict]:
    """Count events, restart the worker, and return (expected, before, recovered) tables."""
    settings_file = work / "settings.json"
    settings_file.write_text(settings.model_dump_json())
    topic = settings.kafka.topics.cloudstack
    first = CounterWorker(settings_file, work / "table.json")
    second = None
    try:
        await first.wait_table(lambda t: True, 40)  # up and recovered (nothing to recover)
        expected = await produce_batches(settings, topic, 400, 24)
        before = await first.wait_table(lambda t: t == expected, 60)
        await first.stop()
        second = CounterWorker(settings_file, work / "table.json")
        recovered = await second.wait_table(lambda t: True, 40)
        # Let a reprocessing bug, if any, show up before judging.
        await asyncio.sleep(1.0)
        recovered_later = second.table()
        assert recovered_later == recovered, "the table changed after recovery"
        return expected, before, recovered
    finally:
        await first.stop()
        if second is not None:
            await second.stop()


@pytest.mark.timeout(120)
async def test_faust_table_recovers_exactly_after_restart(
    fencer_settings: Any, tmp_path: Path
) -> None:
    # Both runs at once: each spends most of its time in Tansu's group-join wait.
    def scenario(embedded: bool) -> Any:
        settings = fencer_settings(isolated_topics=True)
        kafka = settings.kafka.model_copy(update={"embedded": embedded, "table_store": "memory"})
        work = tmp_path / ("with" if embedded else "without")
        work.mkdir()
        return restart_scenario(settings.model_copy(update={"kafka": kafka}), work)

    with_fix, without_fix = await asyncio.gather(scenario(True), scenario(False))

    expected, before, recovered = with_fix
    assert before == expected
    assert recovered == expected, "the restarted worker did not recover the table exactly"

    # The same scenario with plain aiokafka (as for a real Kafka): Tansu's too-low end
    # offsets stop changelog recovery early. If this starts passing, Tansu was fixed.
    expected, before, recovered = without_fix
    wrong = sum(recovered.get(k, 0) != v for k, v in expected.items())
    print(
        f"without the workaround: recovered {sum(recovered.values())} of "
        f"{sum(expected.values())} counts, {wrong} of {len(expected)} keys wrong"
    )
    assert before == expected
    assert recovered != expected
    assert sum(recovered.values()) < sum(expected.values())
