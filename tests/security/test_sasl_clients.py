"""fencer's Kafka clients over SASL_SSL, against a SASL-speaking gate in front of the embedded
broker (tests/security/sasl_gate.py; Tansu itself has no working SASL):

- each mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512): an aiokafka producer and consumer built
  by `streams.kafka.aiokafka_kwargs` authenticate, with the client certificate that
  compose/kafka/make-pki.sh made for their principal, and move a record; a wrong password, a
  mechanism the server does not offer, and a client without a certificate are refused;
- `fencer worker` (all roles: Faust, the settings store, BMC pins, claims, host states) and
  `fencer api` run over SASL_SSL with SCRAM-SHA-512 as the compose deployment configures them:
  the API writes a pause, the worker mails a notice it read.

Not Kafka's own authenticator and no ACLs: the guide says what that leaves untested.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import SecretStr
from sasl_gate import SaslGate  # type: ignore[import-not-found]

from fencing.events import NoticeKind
from fencing.records import HostRef, Notice
from fencing.settings import FencerSettings, KafkaSettings, SaslSettings, TopicNames
from fencing.signing import new_key_line
from lab.cloudstack_sim import CloudStackSimulator, SimCloud
from lab.receivers import MailReceiver
from streams.broker import free_port
from streams.kafka import aiokafka_kwargs, ensure_topics

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]
MAKE_PKI = ROOT / "compose" / "kafka" / "make-pki.sh"


def _load_tls_test_module() -> Any:
    """tests/streams/test_kafka_tls.py's broker that advertises another port (no duplicate)."""
    path = ROOT / "tests" / "streams" / "test_kafka_tls.py"
    spec = importlib.util.spec_from_file_location("_kafka_tls_helpers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


USERS = {
    "fencer-ingest": "sasl-pw-ingest-4Fq",
    "fencer-api": "sasl-pw-api-8Lm",
    "fencer-notify": "sasl-pw-notify-2Xc",
    "fencer-actuate": "sasl-pw-actuate-7Rb",
}


@dataclass
class SaslKafka:
    gate: SaslGate
    pki: Path

    def kafka(self, principal: str, mechanism: str, password: str | None = None, **kw: Any):
        prefix = f"sasl-{os.getpid()}-{time.monotonic_ns() % 10**9}"
        topics = TopicNames(**{k: f"{prefix}.{v}" for k, v in TopicNames().model_dump().items()})
        d = self.pki / principal
        base: dict[str, Any] = {
            "bootstrap_servers": f"127.0.0.1:{self.gate.port}",
            "embedded": True,
            "security_protocol": "SASL_SSL",
            "ssl_cafile": d / "ca.pem",
            "ssl_certfile": d / "client.pem",
            "ssl_keyfile": d / "client.key",
            "sasl": SaslSettings(
                mechanism=mechanism,
                username=principal,
                password=SecretStr(password if password is not None else USERS[principal]),
            ),
            "topics": topics,
        }
        return KafkaSettings(**{**base, **kw})


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sasl_kafka(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SaslKafka]:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed (Debian package openssl)")
    d = tmp_path_factory.mktemp("sasl")
    subprocess.run(
        ["bash", str(MAKE_PKI)],
        env={
            **os.environ,
            "FENCER_PKI_DIR": str(d / "pki"),
            "FENCER_SECRETS_OUT": str(d / "s"),
            # Tansu advertises 127.0.0.1: the broker certificate's external name (an IP SAN).
            "FENCER_KAFKA_EXTERNAL_HOST": "127.0.0.1",
        },
        check=True,
        capture_output=True,
        timeout=60,
    )
    pki = d / "pki"
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "kafka" / "ca.pem"))
    tls.load_cert_chain(pki / "kafka" / "keystore.pem")
    tls.verify_mode = ssl.CERT_REQUIRED
    port = free_port()
    broker = _load_tls_test_module().BrokerBehindTls(port)
    await broker.astart()
    gate = await SaslGate(port, broker.port, dict(USERS), tls).start()
    try:
        yield SaslKafka(gate, pki)
    finally:
        await gate.stop()
        await broker.astop()


async def _ensure(settings: FencerSettings) -> None:
    for _ in range(50):
        try:
            await asyncio.wait_for(ensure_topics(settings), 10)
            return
        except (KafkaError, OSError, TimeoutError):
            await asyncio.sleep(0.2)
    await ensure_topics(settings)


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_each_mechanism_authenticates_and_moves_a_record(
    sasl_kafka: SaslKafka, tmp_path: Path, mechanism: str
) -> None:
    kafka = sasl_kafka.kafka("fencer-ingest", mechanism)
    settings = FencerSettings(kafka=kafka, data_dir=tmp_path)
    before = len(sasl_kafka.gate.authenticated)
    await _ensure(settings)
    topic = kafka.topics.notices
    producer = AIOKafkaProducer(**aiokafka_kwargs(settings))
    await producer.start()
    try:
        await producer.send_and_wait(topic, key=b"k", value=mechanism.encode())
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic, group_id=None, auto_offset_reset="earliest", **aiokafka_kwargs(settings)
    )
    await consumer.start()
    try:
        batch = await consumer.getmany(timeout_ms=5000)
    finally:
        await consumer.stop()
    assert [r.value for rs in batch.values() for r in rs] == [mechanism.encode()]
    seen = sasl_kafka.gate.authenticated[before:]
    assert seen and set(seen) == {("fencer-ingest", mechanism, "fencer-ingest")}


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_a_wrong_password_is_refused(
    sasl_kafka: SaslKafka, tmp_path: Path, mechanism: str
) -> None:
    kafka = sasl_kafka.kafka("fencer-ingest", mechanism, password="not-the-password")
    settings = FencerSettings(kafka=kafka, data_dir=tmp_path)
    before = len(sasl_kafka.gate.refused)
    producer = AIOKafkaProducer(request_timeout_ms=5000, **aiokafka_kwargs(settings))
    with pytest.raises(KafkaError):
        await asyncio.wait_for(producer.start(), 20)
    await producer.stop()
    assert f"{mechanism} user fencer-ingest: wrong password" in sasl_kafka.gate.refused[before:]


@pytest.mark.asyncio(loop_scope="module")
async def test_no_certificate_or_an_unoffered_mechanism_is_refused(
    sasl_kafka: SaslKafka, tmp_path: Path
) -> None:
    gate = sasl_kafka.gate
    gate.mechanisms = ("SCRAM-SHA-512",)
    try:
        kafka = sasl_kafka.kafka("fencer-ingest", "PLAIN")
        settings = FencerSettings(kafka=kafka, data_dir=tmp_path)
        producer = AIOKafkaProducer(request_timeout_ms=5000, **aiokafka_kwargs(settings))
        with pytest.raises(KafkaError):
            await asyncio.wait_for(producer.start(), 20)
        await producer.stop()
        assert "mechanism PLAIN" in gate.refused
    finally:
        gate.mechanisms = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
    before = len(gate.authenticated)
    no_cert = sasl_kafka.kafka(
        "fencer-ingest", "SCRAM-SHA-512", ssl_certfile=None, ssl_keyfile=None
    )
    settings = FencerSettings(kafka=no_cert, data_dir=tmp_path)
    producer = AIOKafkaProducer(request_timeout_ms=5000, **aiokafka_kwargs(settings))
    with pytest.raises((KafkaError, OSError)):
        await asyncio.wait_for(producer.start(), 20)
    await producer.stop()
    assert len(gate.authenticated) == before


def _popen(args: list[str], cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "streams.cli", *args, "-c", str(cfg)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _stop(proc: subprocess.Popen[bytes], log: Path) -> str:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return log.read_text(errors="replace")


@pytest.mark.asyncio(loop_scope="module")
async def test_a_worker_of_every_role_and_the_api_run_over_sasl_ssl(
    sasl_kafka: SaslKafka, tmp_path: Path
) -> None:
    sim = await CloudStackSimulator(SimCloud()).start()
    mail = MailReceiver().start()
    try:
        api_port = free_port()
        common: dict[str, Any] = {
            "cloudstack": {
                "endpoint": sim.url,
                "api_key": sim.api_key,
                "secret_key": sim.secret_key,
                "timeout": 5,
            },
            "email": {
                "enabled": True,
                "host": "127.0.0.1",
                "port": mail.port,
                "sender": "fencer@test",
                "to": ["ops@test"],
            },
            "signing": {"keys": new_key_line("sasl")},
            "api": {"listen": "127.0.0.1", "port": api_port, "token": "sasl-test-token-12345"},
            "log_level": "INFO",
        }
        # The worker (all roles) as fencer-actuate, the API as fencer-api, this test's own
        # clients as fencer-ingest: the gate's log tells who authenticated.
        test_kafka = sasl_kafka.kafka("fencer-ingest", "SCRAM-SHA-512")
        topics = test_kafka.topics
        worker_kafka = sasl_kafka.kafka(
            "fencer-actuate", "SCRAM-SHA-512", session_timeout=6.0, topics=topics
        )
        api_kafka = sasl_kafka.kafka("fencer-api", "SCRAM-SHA-512", topics=topics)
        files = {}
        for name, kafka in (("worker", worker_kafka), ("api", api_kafka)):
            data = {
                **common,
                "kafka": kafka.model_dump(mode="json"),
                "data_dir": str(tmp_path / name),
            }
            data["kafka"]["sasl"]["password"] = kafka.sasl.password.get_secret_value()  # type: ignore[union-attr]
            files[name] = tmp_path / f"{name}.yaml"
            files[name].write_text(yaml.safe_dump(data))
        settings = FencerSettings(**{**common, "kafka": test_kafka, "data_dir": tmp_path})
        await _ensure(settings)
        worker_log, api_log = tmp_path / "worker.log", tmp_path / "api.log"
        worker = _popen(["worker"], files["worker"], worker_log)
        api = _popen(["api"], files["api"], api_log)
        try:
            url = f"http://127.0.0.1:{api_port}"
            headers = {"Authorization": "Bearer sasl-test-token-12345"}
            async with httpx.AsyncClient(base_url=url, headers=headers, timeout=20) as c:
                for _ in range(600):
                    try:
                        if (await c.get("/api/health")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert api.poll() is None, _stop(api, api_log)[-3000:]
                    await asyncio.sleep(0.1)
                r = await c.post("/api/pause", json={"reason": "over sasl"})
                assert r.status_code == 200, r.text
            notice = Notice(
                notice_id="sasl-notice-1",
                kind=NoticeKind.PREFLIGHT_FAILED,
                host=HostRef(host_uuid="h-sasl", host_name="kvm-sasl"),
                at=time.time(),
                reason="sent over SASL_SSL",
            )
            producer = AIOKafkaProducer(**aiokafka_kwargs(settings))
            await producer.start()
            try:
                await producer.send_and_wait(
                    topics.notices, key=b"h-sasl", value=notice.model_dump_json().encode()
                )
            finally:
                await producer.stop()
            deadline = time.monotonic() + 120
            while not mail.mails and time.monotonic() < deadline:
                assert worker.poll() is None, _stop(worker, worker_log)[-3000:]
                await asyncio.sleep(0.5)
            assert mail.mails, "no mail: " + _stop(worker, worker_log)[-3000:]
            assert "kvm-sasl" in mail.mails[0].subject
        finally:
            worker_out = _stop(worker, worker_log)
            api_out = _stop(api, api_log)
    finally:
        mail.stop()
        await sim.stop()
    assert "Traceback" not in worker_out, worker_out[-3000:]
    assert "Traceback" not in api_out, api_out[-3000:]
    users = {(u, cn) for u, m, cn in sasl_kafka.gate.authenticated if m == "SCRAM-SHA-512"}
    assert {("fencer-actuate", "fencer-actuate"), ("fencer-api", "fencer-api")} <= users
    assert "Authenticated as fencer-actuate via SCRAM-SHA-512" in worker_out
