"""Fixtures for the API and UI tests: the embedded broker, the CloudStack simulator and a lab
BMC (served from a background thread, so sync tests such as schemathesis can call them too),
and `fencer api` itself as a real subprocess on a free loopback port.

Every API process gets its own topic names, so tests sharing the session's broker never see
each other's settings or fences.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiokafka import AIOKafkaProducer
from pydantic import BaseModel

from fencing.settings import FencerSettings, TopicNames
from lab.bmc import BmcSimulator
from lab.cloudstack_sim import CloudStackSimulator, SimCloud
from lab.pipeline import WorkerProcess
from streams.broker import EmbeddedBroker, free_port
from streams.settings_store import generate_secrets_key

REPO = Path(__file__).resolve().parents[2]
BMC_PASSWORD = "bmc-Secret-4711"  # a known secret: no response may ever contain it
_ids = itertools.count(1)


class LabThread:
    """An event loop in a thread that serves the simulators while tests block or await."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 20.0) -> Any:
        """Run `coro` on the lab loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Stop the loop and join the thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@dataclass
class Lab:
    """The simulated cloud: two KVM clusters, hosts, and a BMC for the first host."""

    cloud: SimCloud
    sim: CloudStackSimulator
    bmc: BmcSimulator
    cluster_a: str
    cluster_b: str
    host_a1: str
    host_a2: str
    host_b1: str


@pytest.fixture(scope="session")
def lab_thread() -> Iterator[LabThread]:
    thread = LabThread()
    try:
        yield thread
    finally:
        thread.close()


@pytest.fixture(scope="session")
def webui_broker() -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker(create_topics=False)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def lab(lab_thread: LabThread) -> Iterator[Lab]:
    cloud = SimCloud()
    zone = cloud.add_zone("zone1")
    ca = cloud.add_cluster(zone, "kvm-a")
    cb = cloud.add_cluster(zone, "kvm-b")
    a1 = cloud.add_host(ca, "kvm-a1", "10.1.0.11")
    a2 = cloud.add_host(ca, "kvm-a2", "10.1.0.12")
    cloud.add_host(ca, "kvm-a3", "10.1.0.13")
    b1 = cloud.add_host(cb, "kvm-b1", "10.2.0.11")
    sim = CloudStackSimulator(cloud)
    lab_thread.run(sim.start())
    bmc = BmcSimulator(username="fencer", password=BMC_PASSWORD).start()
    try:
        yield Lab(cloud, sim, bmc, ca.uuid, cb.uuid, a1.uuid, a2.uuid, b1.uuid)
    finally:
        bmc.stop()
        lab_thread.run(sim.stop())


@dataclass
class ApiProcess:
    """A running `fencer api`."""

    url: str
    token: str
    settings: FencerSettings
    proc: subprocess.Popen[str]
    data: dict[str, Any] | None = None  # the YAML settings it was started with

    @property
    def topics(self) -> TopicNames:
        return self.settings.kafka.topics

    def client(self, **kw: Any) -> httpx.Client:
        """A bearer-authenticated client."""
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=20,
            **kw,
        )

    def aclient(self, **kw: Any) -> httpx.AsyncClient:
        """A bearer-authenticated async client."""
        return httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=20,
            **kw,
        )

    async def publish(self, topic: str, key: str, record: BaseModel) -> None:
        """Send one wire record, as a worker would."""
        producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka.bootstrap_servers)
        await producer.start()
        try:
            await producer.send_and_wait(
                topic, key=key.encode(), value=record.model_dump_json().encode()
            )
        finally:
            await producer.stop()


def api_settings(broker: EmbeddedBroker, lab: Lab, secrets_key_file: Path | None) -> dict:
    """The YAML settings of one API process, with its own topic names."""
    prefix = f"w{os.getpid()}-{next(_ids)}-{secrets.token_hex(3)}"
    topics = {k: f"{prefix}.{v}" for k, v in TopicNames().model_dump().items()}
    return {
        "kafka": {
            "bootstrap_servers": broker.bootstrap_servers,
            "embedded": True,
            "topics": topics,
            # As tests/conftest.py and the lab: a worker joins in 1 s on Tansu, not 3 s.
            "session_timeout": 2.0,
            "heartbeat_interval": 0.5,
        },
        "cloudstack": {
            "endpoint": lab.sim.url,
            "api_key": lab.sim.api_key,
            "secret_key": lab.sim.secret_key,
            "timeout": 5,
        },
        "api": {
            "listen": "127.0.0.1",
            "port": free_port(),
            "token": secrets.token_urlsafe(24),
            "secrets_key_file": str(secrets_key_file) if secrets_key_file else None,
        },
        "defaults": {"username": "fencer", "port": lab.bmc.port},
        "log_level": "WARNING",
        # An actuate worker of the same fencer (start_actuate_worker) needs a signing key.
        "signing": {"keys": f"k1 {secrets.token_urlsafe(32)}"},
    }


def start_actuate_worker(data: dict[str, Any], tmp: Path) -> WorkerProcess:
    """A `fencer worker --roles actuate` with the API's settings (the IPMI test runs there);
    no pre-flight, so no GUID is pinned behind a test's back. Its log: tmp/worker.log."""
    cfg = tmp / "worker.yaml"
    # Its own table store: the `actuated` table it writes must not outlive the session's broker.
    own = {"actuator": {"preflight_interval": 0}, "data_dir": str(tmp / "data")}
    cfg.write_text(yaml.safe_dump({**data, **own}))
    return WorkerProcess(cfg, roles="actuate", log_file=tmp / "worker.log").start()


@pytest.fixture(scope="module")
def actuate_worker(api: ApiProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An actuate worker beside the module's API; yields its log file."""
    assert api.data is not None
    tmp = tmp_path_factory.mktemp("worker")
    worker = start_actuate_worker(api.data, tmp)
    try:
        yield tmp / "worker.log"
    finally:
        worker.stop()


def start_api(tmp: Path, data: dict) -> ApiProcess:
    """Run `fencer api -c FILE` and wait until it listens."""
    cfg = tmp / f"fencer-{data['api']['port']}.yaml"
    cfg.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FENCER_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "api", "-c", str(cfg)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 30
    lines = []
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "listening on" in line:
            url = f"http://127.0.0.1:{data['api']['port']}"
            threading.Thread(target=_drain, args=(proc,), daemon=True).start()
            return ApiProcess(url, data["api"]["token"], FencerSettings(**data), proc, data)
    stop_api(proc)
    raise RuntimeError("fencer api did not start:\n" + "".join(lines))


def _drain(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stderr.write(f"[fencer api] {line}")


def stop_api(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL if it does not exit."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def read_topic(settings: FencerSettings, topic: str) -> list[bytes]:
    """Every record value of a topic, from its beginning."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        out: list[bytes] = []
        for _ in range(5):
            batch = await consumer.getmany(timeout_ms=300)
            out += [r.value for rs in batch.values() for r in rs if r.value]
        return out
    finally:
        await consumer.stop()


@pytest.fixture(scope="session")
def secrets_key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "secrets.key"
    path.write_text(generate_secrets_key())
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def api(
    webui_broker: EmbeddedBroker,
    lab: Lab,
    secrets_key_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ApiProcess]:
    """One `fencer api` per test module, with its own topics."""
    data = api_settings(webui_broker, lab, secrets_key_file)
    proc = start_api(tmp_path_factory.mktemp("api"), data)
    try:
        yield proc
    finally:
        stop_api(proc.proc)
