"""Kafka client TLS: mutual TLS end to end through Debian's stunnel4 in front of the embedded
broker (Tansu speaks plaintext only), the settings each SASL mechanism produces, the PLAINTEXT
warning and the missing-file errors.

The broker listens on loopback port B and advertises stunnel's port A; stunnel accepts TLS on A,
requires a client certificate signed by the test CA (`verifyChain = yes`) and forwards to B.
A `fencer worker` (role notify, mailing through aiosmtpd) and `fencer api` run with
`security_protocol: SSL` and client certificates against A; a plaintext client and a TLS client
without a certificate are refused. SASL cannot be tested against a broker here (Tansu has no
SASL): its client settings are checked as aiokafka and Faust receive them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email import message_from_bytes
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import SecretStr

from fencing.events import NoticeKind
from fencing.records import HostRef, Notice
from fencing.settings import (
    FencerSettings,
    KafkaSettings,
    SaslSettings,
    SettingsError,
    TopicNames,
    settings_warnings,
)
from lab.cloudstack_sim import CloudStackSimulator, SimCloud
from streams.broker import EmbeddedBroker, free_port, tansu_binary
from streams.kafka import aiokafka_kwargs, ensure_topics, faust_app_kwargs, ssl_context

REPO = Path(__file__).resolve().parents[2]
STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel")

pytestmark = pytest.mark.timeout(180)


# -- a small PKI --------------------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate the CA never signed
    rogue_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    elif server:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        b = b.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return b.sign(issuer_key, hashes.SHA256())


def make_pki(d: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1, a client certificate, and a rogue one."""
    pem = serialization.Encoding.PEM
    ca_key = _key()
    ca = _cert("fencer test CA", ca_key, None, ca_key, ca=True)
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    out: dict[str, Path] = {"ca": d / "ca.pem"}
    for name, server in (("server", True), ("client", False)):
        k = _key()
        c = _cert(f"fencer-{name}", k, ca.subject, ca_key, server=server)
        (d / f"{name}.pem").write_bytes(c.public_bytes(pem))
        out[f"{name}_cert"], out[f"{name}_key"] = (
            d / f"{name}.pem",
            _write_key(k, d / f"{name}.key"),
        )
    rk = _key()
    rogue = _cert("fencer-rogue", rk, None, rk)
    (d / "rogue.pem").write_bytes(rogue.public_bytes(pem))
    out["rogue_cert"], out["rogue_key"] = d / "rogue.pem", _write_key(rk, d / "rogue.key")
    return Pki(**out)


# -- the broker behind stunnel ------------------------------------------------------------------


class BrokerBehindTls(EmbeddedBroker):
    """The embedded Tansu on plaintext port B, advertising stunnel's TLS port A."""

    def __init__(self, advertised_port: int) -> None:
        super().__init__(create_topics=False)
        self.advertised_port = advertised_port

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RUST_", "TANSU_"))}
        env["RUST_LOG"] = self.log_level
        argv = [
            str(tansu_binary()),
            "broker",
            "--cluster-id",
            self.cluster_id,
            "--listener-url",
            f"tcp://127.0.0.1:{port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{self.advertised_port}",
            "--storage-engine",
            "memory://tansu/",
        ]
        return subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=2, start_new_session=True
        )

    async def _await_ready(self) -> bool:
        # Its metadata names the TLS port: a plaintext admin client cannot follow it. Ready is
        # "accepts connections"; the tests then talk through stunnel.
        assert self.port is not None and self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            w.close()
            return True
        return False


@dataclass
class TlsKafka:
    pki: Pki
    tls_port: int
    broker: BrokerBehindTls
    log: Path

    def kafka(self, **update: Any) -> KafkaSettings:
        """Client settings for stunnel's port: mutual TLS with the CA-signed certificate."""
        prefix = f"tls-{os.getpid()}-{time.monotonic_ns() % 10**9}"
        topics = TopicNames(**{k: f"{prefix}.{v}" for k, v in TopicNames().model_dump().items()})
        base = {
            "bootstrap_servers": f"127.0.0.1:{self.tls_port}",
            "embedded": True,
            "security_protocol": "SSL",
            "ssl_cafile": self.pki.ca,
            "ssl_certfile": self.pki.client_cert,
            "ssl_keyfile": self.pki.client_key,
            "topics": topics,
        }
        return KafkaSettings(**{**base, **update})


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("stunnel exited: " + log.read_text()[-800:])
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("stunnel did not listen: " + log.read_text()[-800:])


@pytest.fixture(scope="module")
def tls_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsKafka]:
    assert STUNNEL is not None, "Debian's stunnel4 is missing (make debs installs it)"
    d = tmp_path_factory.mktemp("kafka-tls")
    pki = make_pki(d)
    tls_port = free_port()
    broker = BrokerBehindTls(tls_port)
    broker.start()
    log = d / "stunnel.log"
    conf = d / "stunnel.conf"
    conf.write_text(
        "foreground = yes\n"
        "pid =\n"
        f"output = {log}\n"
        "debug = 5\n"
        "[kafka]\n"
        f"accept = 127.0.0.1:{tls_port}\n"
        f"connect = 127.0.0.1:{broker.port}\n"
        f"cert = {pki.server_cert}\n"
        f"key = {pki.server_key}\n"
        f"CAfile = {pki.ca}\n"
        "verifyChain = yes\n"
    )
    proc = subprocess.Popen([STUNNEL, str(conf)], stdout=subprocess.DEVNULL, stderr=2)
    try:
        _wait_port(tls_port, proc, log)
        yield TlsKafka(pki, tls_port, broker, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        broker.stop()


async def _ensure(settings: FencerSettings) -> None:
    for _ in range(50):
        try:
            await asyncio.wait_for(ensure_topics(settings), 10)
            return
        except (KafkaError, OSError, TimeoutError):
            await asyncio.sleep(0.2)
    await ensure_topics(settings)


# -- mutual TLS end to end ----------------------------------------------------------------------


async def test_clients_with_the_ca_signed_certificate_produce_and_consume(tls_kafka: TlsKafka):
    settings = FencerSettings(kafka=tls_kafka.kafka())
    await _ensure(settings)
    topic = settings.kafka.topics.notices
    producer = AIOKafkaProducer(**aiokafka_kwargs(settings))
    await producer.start()
    try:
        await producer.send_and_wait(topic, key=b"k", value=b"over-mtls")
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
    assert [r.value for rs in batch.values() for r in rs] == [b"over-mtls"]
    # stunnel saw a verified client certificate.
    assert "fencer-client" in tls_kafka.log.read_text()


@pytest.mark.parametrize("who", ["plaintext", "no-certificate", "rogue-certificate"])
async def test_a_client_without_a_ca_signed_certificate_is_refused(tls_kafka: TlsKafka, who):
    update: dict[str, Any] = {
        "plaintext": {"security_protocol": "PLAINTEXT"},
        "no-certificate": {"ssl_certfile": None, "ssl_keyfile": None},
        "rogue-certificate": {
            "ssl_certfile": tls_kafka.pki.rogue_cert,
            "ssl_keyfile": tls_kafka.pki.rogue_key,
        },
    }[who]
    settings = FencerSettings(kafka=tls_kafka.kafka(**update))
    producer = AIOKafkaProducer(request_timeout_ms=3000, **aiokafka_kwargs(settings))
    with pytest.raises((KafkaConnectionError, KafkaError, OSError, TimeoutError)):
        try:
            await asyncio.wait_for(producer.start(), 10)
            # A handshake may complete before the server's verdict: a request must fail.
            await asyncio.wait_for(producer.send_and_wait(settings.kafka.topics.notices, b"x"), 10)
        finally:
            await producer.stop()


class _Mailbox:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server: object, session: object, envelope: Envelope) -> str:
        self.messages.append(bytes(envelope.content))  # type: ignore[arg-type]
        return "250 OK"


def _popen(args: list[str], cfg: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FENCER_")}
    return subprocess.Popen(
        [sys.executable, "-m", "streams.cli", *args, "-c", str(cfg)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate(timeout=5)
        return out or ""
    return proc.communicate()[0] or ""


async def test_a_worker_and_the_api_run_over_mutual_tls(tls_kafka: TlsKafka, tmp_path: Path):
    """`fencer worker --roles notify` mails a notice it read over mTLS; `fencer api` reads and
    writes its topics over mTLS (a pause lands on the settings topic)."""
    sim = await CloudStackSimulator(SimCloud()).start()
    mailbox = _Mailbox()
    smtp_port = free_port()
    smtp = Controller(mailbox, hostname="127.0.0.1", port=smtp_port)
    smtp.start()
    kafka = tls_kafka.kafka(session_timeout=6.0)
    data: dict[str, Any] = {
        "kafka": kafka.model_dump(mode="json"),
        "cloudstack": {
            "endpoint": sim.url,
            "api_key": sim.api_key,
            "secret_key": sim.secret_key,
            "timeout": 5,
        },
        "email": {
            "enabled": True,
            "host": "127.0.0.1",
            "port": smtp_port,
            "sender": "fencer@test",
            "to": ["ops@test"],
        },
        "api": {"listen": "127.0.0.1", "port": free_port(), "token": "mtls-test-token-123456"},
        "data_dir": str(tmp_path / "var"),
        "log_level": "INFO",
    }
    cfg = tmp_path / "fencer.yaml"
    cfg.write_text(yaml.safe_dump(data))
    settings = FencerSettings(**data)
    await _ensure(settings)
    worker = _popen(["worker", "--roles", "notify"], cfg)
    api = _popen(["api"], cfg)
    try:
        # The API: starts (reads settings, pins, audit and view topics over mTLS), then writes.
        url = f"http://127.0.0.1:{data['api']['port']}"
        headers = {"Authorization": "Bearer mtls-test-token-123456"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=20) as c:
            for _ in range(300):
                try:
                    if (await c.get("/api/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert api.poll() is None, _stop(api)
                await asyncio.sleep(0.1)
            r = await c.post("/api/pause", json={"reason": "over mtls"})
            assert r.status_code == 200, r.text
            assert r.json()["global_pause"]["paused"] is True
        consumer = AIOKafkaConsumer(
            kafka.topics.settings,
            group_id=None,
            auto_offset_reset="earliest",
            **aiokafka_kwargs(settings),
        )
        await consumer.start()
        try:
            batch = await consumer.getmany(timeout_ms=5000)
        finally:
            await consumer.stop()
        keys = [r.key for rs in batch.values() for r in rs]
        assert b"pause:global" in keys

        # The worker: a notice published over mTLS comes out as a mail.
        notice = Notice(
            notice_id="mtls-notice-1",
            kind=NoticeKind.PREFLIGHT_FAILED,
            host=HostRef(host_uuid="h-mtls", host_name="kvm-mtls"),
            at=time.time(),
            reason="sent over mutual TLS",
        )
        producer = AIOKafkaProducer(**aiokafka_kwargs(settings))
        await producer.start()
        try:
            await producer.send_and_wait(
                kafka.topics.notices, key=b"h-mtls", value=notice.model_dump_json().encode()
            )
        finally:
            await producer.stop()
        deadline = time.monotonic() + 120
        while not mailbox.messages and time.monotonic() < deadline:
            assert worker.poll() is None, _stop(worker)
            await asyncio.sleep(0.5)
        assert mailbox.messages, "no mail: " + _stop(worker)[-3000:]
        mail = message_from_bytes(mailbox.messages[0])
        assert "kvm-mtls" in str(mail["Subject"])
    finally:
        worker_out = _stop(worker)
        api_out = _stop(api)
        smtp.stop()
        await sim.stop()
    assert "Traceback" not in worker_out, worker_out[-3000:]
    assert "Traceback" not in api_out, api_out[-3000:]


# -- settings -----------------------------------------------------------------------------------


def test_the_client_certificate_reaches_aiokafka_and_faust(tls_kafka: TlsKafka, tmp_path):
    settings = FencerSettings(kafka=tls_kafka.kafka(), data_dir=tmp_path)
    ctx = aiokafka_kwargs(settings)["ssl_context"]
    assert ctx.verify_mode.name == "CERT_REQUIRED"
    creds = faust_app_kwargs(settings)["broker_credentials"]
    assert creds.context is not None  # faust.SSLCredentials with the same kind of context
    # The context really holds the client certificate: a handshake with stunnel succeeds.
    with socket.create_connection(("127.0.0.1", tls_kafka.tls_port), 5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() is not None


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
@pytest.mark.parametrize("protocol", ["SASL_SSL", "SASL_PLAINTEXT"])
def test_each_sasl_mechanism_reaches_aiokafka_and_faust(tmp_path, mechanism, protocol):
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    pki = make_pki(tmp_path)
    kafka = KafkaSettings(
        bootstrap_servers="kafka.example.com:9093",
        security_protocol=protocol,
        ssl_cafile=pki.ca,
        ssl_certfile=pki.client_cert,
        ssl_keyfile=pki.client_key,
        sasl=SaslSettings(mechanism=mechanism, username="fencer-gate", password=SecretStr("pw!")),
    )
    settings = FencerSettings(kafka=kafka, data_dir=tmp_path)
    kw = aiokafka_kwargs(settings)
    assert kw["security_protocol"] == protocol
    assert kw["sasl_mechanism"] == mechanism
    assert kw["sasl_plain_username"] == "fencer-gate" and kw["sasl_plain_password"] == "pw!"
    assert ("ssl_context" in kw) is (protocol == "SASL_SSL")
    creds = faust_app_kwargs(settings)["broker_credentials"]
    auth = credentials_to_aiokafka_auth(creds)
    assert auth["security_protocol"] == ("SASL_SSL" if protocol == "SASL_SSL" else "SASL_PLAINTEXT")
    assert auth["sasl_mechanism"] == mechanism
    assert auth["sasl_plain_username"] == "fencer-gate"
    assert auth["sasl_plain_password"] == "pw!"
    assert (auth.get("ssl_context") is not None) is (protocol == "SASL_SSL")


@pytest.mark.parametrize("name", ["ssl_cafile", "ssl_certfile", "ssl_keyfile"])
def test_a_missing_or_unreadable_tls_file_names_the_setting_and_path(tmp_path, name):
    pki = make_pki(tmp_path)
    files = {"ssl_cafile": pki.ca, "ssl_certfile": pki.client_cert, "ssl_keyfile": pki.client_key}
    missing = tmp_path / "nowhere" / f"{name}.pem"
    files[name] = missing
    kafka = KafkaSettings(security_protocol="SSL", **files)
    with pytest.raises(SettingsError) as err:
        ssl_context(kafka)
    assert f"kafka.{name}: {missing}: no such file" in str(err.value)
    # `fencer worker` says the same in one line and exits (before any retry loop).
    cfg = tmp_path / "fencer.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"kafka": {"security_protocol": "SSL", **{k: str(v) for k, v in files.items()}}}
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "streams.cli", "worker", "--roles", "notify", "-c", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"fencer: kafka.{name}: {missing}: no such file"
    check = subprocess.run(
        [sys.executable, "-m", "streams.cli", "config", "check", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 1 and f"kafka.{name}: {missing}: no such file" in check.stderr


def test_an_unreadable_key_is_named(tmp_path):
    if os.geteuid() == 0:
        # root reads any file: make the path a directory instead (also unreadable as PEM).
        key = tmp_path / "key-dir"
        key.mkdir()
        expect = "is a directory"
    else:
        key = tmp_path / "key.pem"
        key.write_text("x")
        key.chmod(0)
        expect = "cannot read it"
    pki = make_pki(tmp_path)
    kafka = KafkaSettings(
        security_protocol="SSL", ssl_cafile=pki.ca, ssl_certfile=pki.client_cert, ssl_keyfile=key
    )
    with pytest.raises(SettingsError, match=f"kafka.ssl_keyfile: {key}: {expect}"):
        ssl_context(kafka)
    # A readable file that is no key: every file involved is named.
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    kafka = kafka.model_copy(update={"ssl_keyfile": bad})
    with pytest.raises(SettingsError, match=r"kafka\.ssl_keyfile"):
        ssl_context(kafka)


def test_config_check_warns_about_plaintext_beyond_loopback():
    remote = FencerSettings(kafka=KafkaSettings(bootstrap_servers="10.0.0.5:9092"))
    (w,) = [w for w in settings_warnings(remote) if w.startswith("kafka.")]
    assert "PLAINTEXT to 10.0.0.5:9092" in w and "SSL" in w
    sasl_plain = FencerSettings(
        kafka=KafkaSettings(
            bootstrap_servers="127.0.0.1:9092,kafka.example.com:9092",
            security_protocol="SASL_PLAINTEXT",
            sasl=SaslSettings(),
        )
    )
    assert any("kafka.example.com:9092" in w for w in settings_warnings(sasl_plain))
    for local in ("127.0.0.1:9092", "localhost:9092", "[::1]:9092"):
        s = FencerSettings(kafka=KafkaSettings(bootstrap_servers=local))
        assert not [w for w in settings_warnings(s) if w.startswith("kafka.")], local
    tls = FencerSettings(
        kafka=KafkaSettings(bootstrap_servers="10.0.0.5:9093", security_protocol="SSL")
    )
    assert not [w for w in settings_warnings(tls) if w.startswith("kafka.")]
