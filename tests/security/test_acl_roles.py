"""The per-role Kafka table (streams/kafka_acl.py, which generates the compose ACLs) at run time:
a host crashes and is fenced by four `fencer worker` processes, one per role, and `fencer api`,
each authenticating as its own principal (SCRAM-SHA-512 over TLS with its make-pki.sh
certificate) through a gate in front of the embedded broker that refuses every Produce and Fetch
the table does not allow (tests/security/sasl_gate.py). The fence must happen with zero refusals,
and a role writing outside its table is refused.

This checks the table against what the code really reads and writes, on the topics that move
records; it is not Kafka's authorizer (no Describe, group or Create checks).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shutil
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import SecretStr
from sasl_gate import SaslGate  # type: ignore[import-not-found]

from fencing.settings import ApiSettings, FencerSettings, KafkaSettings, SaslSettings
from lab.cloud import LabCloud
from lab.demo import Run, _host_crash, _judge_host_crash
from lab.pipeline import WorkerProcess, write_settings
from streams.app import ROLES
from streams.broker import free_port
from streams.kafka import aiokafka_kwargs
from streams.kafka_acl import ADMIN, PRINCIPALS, grants

pytestmark = pytest.mark.timeout(360)  # 118 s seen on a loaded CI run: 3x

ROOT = Path(__file__).resolve().parents[2]
MAKE_PKI = ROOT / "compose" / "kafka" / "make-pki.sh"
BY_ROLE = {p.roles[0]: p for p in PRINCIPALS if p.roles}
PASSWORDS = {name: f"pw-{name}-Zx3" for name in [ADMIN, *(p.name for p in PRINCIPALS)]}


def _tls_module() -> Any:
    path = ROOT / "tests" / "streams" / "test_kafka_tls.py"
    spec = importlib.util.spec_from_file_location("_kafka_tls_helpers", path)
    assert spec is not None and spec.loader is not None
    if spec.name in sys.modules:
        return sys.modules[spec.name]
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def client(pki: Path, port: int, name: str, base: KafkaSettings | None = None) -> KafkaSettings:
    d = pki / name
    update = {
        "bootstrap_servers": f"127.0.0.1:{port}",
        "embedded": True,
        "security_protocol": "SASL_SSL",
        "ssl_cafile": d / "ca.pem",
        "ssl_certfile": d / "client.pem",
        "ssl_keyfile": d / "client.key",
        "sasl": SaslSettings(
            mechanism="SCRAM-SHA-512", username=name, password=SecretStr(PASSWORDS[name])
        ),
    }
    return (base or KafkaSettings()).model_copy(update=update)


class RoleRun(Run):
    """A demo run whose workers are one `fencer worker` per role, each its own principal."""

    pki: Path
    port: int

    @property
    def fence_deadline(self) -> float:
        """Four worker processes and the API behind the test's TLS + SASL gate, beside three
        other test processes on two cores: this test judges who may write what, the
        scenarios in tests/e2e judge the timing (with one worker process)."""
        return super().fence_deadline + 15.0

    async def start_worker(self) -> WorkerProcess:
        assert self.tap is not None
        seen = len(self.sizes())
        for role in ROLES:
            p = BY_ROLE[role]
            kafka = client(self.pki, self.port, p.name, self.settings.kafka)
            f = write_settings(
                self.settings.model_copy(update={"kafka": kafka}), self.workdir / f"{role}.yaml"
            )
            w = WorkerProcess(f, role, self.workdir / f"{self.name}-{role}.log").start()
            self.workers.append(w)
        await self.tap.wait_for(lambda: len(self.sizes()) > seen, 120, "the role workers")
        return self.workers[0]


async def test_a_fence_through_one_principal_per_role_stays_inside_the_table(
    tmp_path: Path,
) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed (Debian package openssl)")
    subprocess.run(
        ["bash", str(MAKE_PKI)],
        env={
            **os.environ,
            "FENCER_PKI_DIR": str(tmp_path / "pki"),
            "FENCER_SECRETS_OUT": str(tmp_path / "s"),
            "FENCER_KAFKA_EXTERNAL_HOST": "127.0.0.1",
        },
        check=True,
        capture_output=True,
        timeout=60,
    )
    pki = tmp_path / "pki"
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "kafka" / "ca.pem"))
    tls.load_cert_chain(pki / "kafka" / "keystore.pem")
    tls.verify_mode = ssl.CERT_REQUIRED
    port = free_port()
    admin_kafka = client(pki, port, ADMIN)

    class GatedBroker(_tls_module().BrokerBehindTls):  # type: ignore[misc]
        def kafka_settings(self) -> KafkaSettings:
            return admin_kafka  # the lab's own clients (tap, event bus) are the super user

    broker = GatedBroker(port)
    await broker.astart()
    allowed: set[Any] = set()
    gate = await SaslGate(port, broker.port, dict(PASSWORDS), tls).start()

    def allow(user: str, op: str, topic: str) -> bool:
        if user == ADMIN:
            return True
        return any(
            g.principal == user
            and g.operation == op
            and (g.name == topic if g.pattern == "literal" else topic.startswith(g.name))
            for g in allowed
        )

    api_proc: subprocess.Popen[bytes] | None = None
    try:
        async with LabCloud(broker, root=tmp_path / "lab", interval=0.5) as lab:
            assert lab._base is not None
            allowed.update(grants(lab._base))  # the lab's topic names and consumer groups
            gate.allow = allow
            run = RoleRun("acl", lab, tmp_path, True, None)
            run.pki, run.port = pki, port
            try:
                await run.start()
                # The API as fencer-api: a pause and a resume write settings and the audit log.
                api_port = free_port()
                api_settings: FencerSettings = run.settings.model_copy(
                    update={
                        "kafka": client(pki, port, "fencer-api", run.settings.kafka),
                        "api": ApiSettings(
                            listen="127.0.0.1", port=api_port, token=SecretStr("acl-token-12345")
                        ),
                    }
                )
                api_file = write_settings(api_settings, tmp_path / "api.yaml")
                api_log = tmp_path / "acl-api.log"
                api_proc = subprocess.Popen(
                    [sys.executable, "-m", "streams.cli", "api", "-c", str(api_file)],
                    cwd=ROOT,
                    stdin=subprocess.DEVNULL,
                    stdout=api_log.open("wb"),
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
                headers = {"Authorization": "Bearer acl-token-12345"}
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{api_port}", headers=headers, timeout=20
                ) as api:
                    for _ in range(900):
                        with contextlib.suppress(httpx.TransportError):
                            if (await api.get("/api/health")).status_code == 200:
                                break
                        assert api_proc.poll() is None, api_log.read_text()[-3000:]
                        await asyncio.sleep(0.1)
                    assert (await api.post("/api/pause", json={"reason": "acl"})).status_code == 200
                    assert (await api.post("/api/resume", json={})).status_code == 200
                    # Confirm BMC identity: the API asks, an actuate worker pins (the API
                    # has no write grant on bmc-pins).
                    kvm01 = next(u for u, h in lab.cloud.hosts.items() if h.name == "kvm01")
                    r = await api.post(f"/api/hosts/{kvm01}/bmc-pin", json={}, timeout=90)
                    request_id = r.json().get("request_id") if r.status_code == 202 else None
                    for _ in range(120):  # 202: a worker still starting answers later
                        if r.status_code != 202:
                            break
                        await asyncio.sleep(1)
                        r = await api.get(f"/api/ipmi-tests/{request_id}")
                    assert r.status_code == 200, r.text
                    pinned = r.json()
                    assert pinned.get("pinned") is True or pinned.get("pinned_guid"), pinned
                await _host_crash(run)
            finally:
                if api_proc is not None:
                    api_proc.terminate()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        api_proc.wait(15)
                await run.stop()
            failures = _judge_host_crash(run)
            t = lab._base.kafka.topics

            # A role writing outside its table is refused (the gate is not a rubber stamp).
            probe = FencerSettings(
                kafka=client(pki, port, "fencer-probe", lab._base.kafka), data_dir=tmp_path
            )
            producer = AIOKafkaProducer(request_timeout_ms=3000, **aiokafka_kwargs(probe))
            await producer.start()
            with pytest.raises((KafkaError, TimeoutError)):
                await asyncio.wait_for(
                    producer.send_and_wait(t.fence_decisions, key=b"forged", value=b"{}"), 20
                )
            with contextlib.suppress(Exception):
                await producer.stop()
    finally:
        await gate.stop()
        await broker.astop()

    logs = "".join(p.read_text(errors="replace")[-2000:] for p in tmp_path.glob("acl-*.log"))
    assert failures == [], f"{failures}\n{logs}"
    # The only refusals: the forged write and its retries; the whole fence needed none.
    assert set(gate.violations) == {("fencer-probe", "Write", t.fence_decisions)}
    assert gate.undecoded == []
    who = {u for u, _m, _cn in gate.authenticated}
    assert {p.name for p in PRINCIPALS if p.service} <= who, who
    # What the fence really moved, each through its own principal.
    for access in (
        ("fencer-ingest", "Read", t.cloudstack),
        ("fencer-ingest", "Write", t.fence_decisions),
        ("fencer-probe", "Read", t.probe_requests),
        ("fencer-probe", "Write", t.probe_results),
        ("fencer-actuate", "Read", t.fence_decisions),
        ("fencer-actuate", "Write", t.fence_outcomes),
        ("fencer-actuate", "Write", t.fence_claims),
        ("fencer-notify", "Read", t.notices),
        ("fencer-api", "Write", t.settings),
        ("fencer-api", "Write", t.audit),
        ("fencer-api", "Write", t.operator_actions),
        ("fencer-actuate", "Write", t.bmc_pins),
    ):
        assert access in gate.accesses, access
    assert ("fencer-api", "Write", t.bmc_pins) not in gate.accesses
