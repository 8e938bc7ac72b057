"""Secrets nowhere, over a whole end-to-end run (issue #15).

Every secret fencer can be given is configured with a distinctive value: the BMC passwords
(one per host, and one stored again through the API, Fernet-encrypted), the SSH key's passphrase
(the probe's key is encrypted), the SMTP login (the mail receiver requires it), the SNMP v2c
community and v3 auth/priv keys, CloudStack's API and secret keys (the simulator requires them),
the HMAC signing key, the Fernet key and the API token. Then a host crashes and is fenced through
the real pipeline (`fencer worker`, all roles; `fencer api`; OpenSSH-speaking lab hosts; pyghmi
BMCs; ipmitool runs of a command-template BMC read by the actuator's pre-flight and by the UI's
"Test IPMI"; a wrong BMC password stored through the API, whose failures are logged, notified,
mailed and trapped), and the test searches for each secret:

- every log line of every process (the worker's and the API's output);
- every process's argv, /proc/*/cmdline sampled every few milliseconds during the run
  (the ipmitool template runs included: at least one is seen, or the test fails);
- every record (key and value) on every topic of the broker after the run;
- every response (headers and body) of the API requests the web UI makes.

Zero hits. Encrypted or hashed forms are fine (they do not contain the value). The settings
file itself holds the secrets (that is where they belong), and the test checks that it does:
the search really looks for what is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import asyncssh
import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography.fernet import Fernet
from pydantic import SecretStr

from fencing.settings import (
    ApiSettings,
    Driver,
    IpmiOverrides,
    PasswordVia,
    SigningSettings,
    SnmpReceiver,
    load_settings,
)
from lab.bmc import BmcSimulator
from lab.cloud import BMC_USER, LabCloud
from lab.demo import Run, _host_crash
from lab.receivers import MailReceiver, TrapReceiver, _free_port, _Handler
from streams.broker import EmbeddedBroker, free_port
from streams.kafka import aiokafka_kwargs

pytestmark = pytest.mark.timeout(170)

ROOT = Path(__file__).resolve().parents[2]

CS_API_KEY = "cs-apikey-Tq81Vx27Lm"
CS_SECRET_KEY = "cs-secretkey-Wd64Nr05Zp"
SSH_PASSPHRASE = "ssh-passphrase-Kh39Fy72"
SMTP_USER = "fencer-smtp"
SMTP_PASSWORD = "smtp-password-Bc58Jq41"
SNMP_COMMUNITY = "snmp-community-Rm26Ht93"
SNMP_AUTH_KEY = "snmp-authkey-Gv17Ps84"
SNMP_PRIV_KEY = "snmp-privkey-Yn42Dw60"
SIGNING_SECRET = "signing-secret-Xe93Lb27Qa58Mv14Tc86Rk30"
API_TOKEN = "api-token-Pf75Uz38Jn"
TEMPLATE_HOST = "kvm01"  # read by ipmitool (command template) at every pre-flight
STORED_HOST = "kvm02"  # its BMC password is stored again through the API (Fernet)
CRASH_HOST = "kvm03"
WRONG_HOST = "kvm05"  # given a wrong BMC password through the API
WRONG_BMC_PASSWORD = "bmc-wrong-Nd47Ks"


def bmc_password(name: str) -> str:
    return f"bmc-{name}-Hs62Wq"  # IPMI 2.0: at most 20 bytes


class SecretLab(LabCloud):
    """The lab cloud with distinctive BMC passwords."""

    def _start_bmc(self, name: str) -> None:
        bmc = BmcSimulator(
            BMC_USER,
            bmc_password(name),
            on_power_change=lambda state, cause: self._power_changed(name, state),
        )
        bmc.start()
        self.bmcs[name] = bmc
        self.bmc_passwords[name] = bmc_password(name)


class AuthMail(MailReceiver):
    """The lab's mail receiver, requiring an SMTP login (so fencer must send its password)."""

    def start(self) -> AuthMail:
        self.logins: list[bool] = []

        def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any):
            ok = (
                isinstance(data, LoginPassword)
                and data.login == SMTP_USER.encode()
                and data.password == SMTP_PASSWORD.encode()
            )
            self.logins.append(ok)
            return AuthResult(success=ok)

        self.port = _free_port()
        self._controller = Controller(
            _Handler(self),
            hostname="127.0.0.1",
            port=self.port,
            authenticator=authenticate,
            auth_require_tls=False,
            auth_required=True,
        )
        self._controller.start()
        return self


class ArgvSampler:
    """Every distinct /proc/*/cmdline seen while running (new processes read at once)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.seen: set[str] = set()
        self._young: dict[str, float] = {}  # pid -> first seen (re-read while under 1 s old)
        self._old: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.rounds = 0

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or pid in self._old:
                    continue
                first = self._young.setdefault(pid, now)
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        raw = f.read()
                except OSError:
                    continue
                if raw:
                    self.seen.add(raw.replace(b"\0", b" ").decode("utf-8", "replace"))
                if now - first > 1.0:
                    self._old.add(pid)  # a long-running process's argv is read already
            self.rounds += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> ArgvSampler:
        # Processes older than the run are read once (their argv is searched too).
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


async def read_every_topic(settings: Any) -> list[tuple[str, bytes]]:
    """(topic, key + value) of every record on every topic of the broker."""
    admin = AIOKafkaAdminClient(**aiokafka_kwargs(settings))
    await admin.start()
    try:
        topics = [t for t in await admin.list_topics() if not t.startswith("__")]
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(
        group_id=None, enable_auto_commit=False, **aiokafka_kwargs(settings)
    )
    await consumer.start()
    out: list[tuple[str, bytes]] = []
    try:
        parts = []
        for t in topics:
            for p in consumer.partitions_for_topic(t) or await _partitions(consumer, t):
                parts.append(TopicPartition(t, p))
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        # Until two polls in a row bring nothing (Tansu's end offsets are not to be trusted).
        deadline, empty = time.monotonic() + 30, 0
        while time.monotonic() < deadline and empty < 2:
            batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
            empty = 0 if batch else empty + 1
            for tp, records in batch.items():
                for r in records:
                    out.append((tp.topic, (r.key or b"") + b"\n" + (r.value or b"")))
    finally:
        await consumer.stop()
    return out


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer._client.force_metadata_update()  # a topic made meanwhile
    return consumer.partitions_for_topic(topic) or {0}


async def test_no_secret_in_logs_argv_topics_or_api_responses(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    lab = SecretLab(broker, root=tmp_path / "lab", interval=0.5)
    lab.mail = AuthMail()
    v3_traps = TrapReceiver()
    api_proc: subprocess.Popen[bytes] | None = None
    api_log = tmp_path / "api.log"
    responses: list[str] = []
    with ArgvSampler() as sampler:
        await lab.start()
        try:
            await v3_traps.start()
            # CloudStack's keys: the simulator checks every request's signature with them.
            assert lab.sim is not None
            lab.sim.api_key, lab.sim.secret_key = CS_API_KEY, CS_SECRET_KEY
            base = lab._base
            assert base is not None
            # The probe's key, encrypted with a passphrase (written without any command line).
            key = asyncssh.read_private_key(base.ssh.key_file)
            encrypted = tmp_path / "probe_key"
            key.write_private_key(str(encrypted), passphrase=SSH_PASSPHRASE)
            encrypted.chmod(0o600)
            fernet_key = Fernet.generate_key().decode()
            (tmp_path / "secrets.key").write_text(fernet_key + "\n")
            (tmp_path / "secrets.key").chmod(0o600)
            uuids = {h.name: h.uuid for h in lab.kvm.hosts.values()}
            hosts = dict(base.hosts)
            t = hosts[uuids[TEMPLATE_HOST]]
            hosts[uuids[TEMPLATE_HOST]] = t.model_copy(
                update={
                    "ipmi": IpmiOverrides(
                        **t.ipmi.model_dump(exclude_unset=True),
                        driver=Driver.TEMPLATE,
                        exec="ipmitool",
                        execution_syntax=(
                            "$IPMI_EXEC -I lanplus -R 1 -N 1 -H $IPMI_HOST -p $IPMI_PORT "
                            "-U $IPMI_USERNAME -E chassis $IPMI_ACTION"
                        ),
                        password_via=PasswordVia.ENV,
                    )
                }
            )
            api_port = free_port()
            lab._base = base.model_copy(
                update={
                    "cloudstack": base.cloudstack.model_copy(
                        update={
                            "api_key": SecretStr(CS_API_KEY),
                            "secret_key": SecretStr(CS_SECRET_KEY),
                        }
                    ),
                    "ssh": base.ssh.model_copy(
                        update={
                            "key_file": encrypted,
                            "key_passphrase": SecretStr(SSH_PASSPHRASE),
                        }
                    ),
                    "email": base.email.model_copy(
                        update={"username": SMTP_USER, "password": SecretStr(SMTP_PASSWORD)}
                    ),
                    "snmp": base.snmp.model_copy(
                        update={
                            "receivers": [
                                SnmpReceiver(
                                    host="127.0.0.1",
                                    port=lab.traps.port,
                                    community=SecretStr(SNMP_COMMUNITY),
                                ),
                                SnmpReceiver(
                                    host="127.0.0.1",
                                    port=v3_traps.port,
                                    version="v3",
                                    user="fencer-v3",
                                    auth_key=SecretStr(SNMP_AUTH_KEY),
                                    priv_key=SecretStr(SNMP_PRIV_KEY),
                                ),
                            ]
                        }
                    ),
                    "signing": SigningSettings(keys=SecretStr(f"e2e {SIGNING_SECRET}")),
                    "api": ApiSettings(
                        listen="127.0.0.1",
                        port=api_port,
                        token=SecretStr(API_TOKEN),
                        secrets_key_file=tmp_path / "secrets.key",
                    ),
                    "actuator": base.actuator.model_copy(update={"preflight_interval": 3.0}),
                    "hosts": hosts,
                }
            )
            secrets = {
                CS_API_KEY,
                CS_SECRET_KEY,
                SSH_PASSPHRASE,
                SMTP_PASSWORD,
                SNMP_COMMUNITY,
                SNMP_AUTH_KEY,
                SNMP_PRIV_KEY,
                SIGNING_SECRET,
                API_TOKEN,
                fernet_key,
                WRONG_BMC_PASSWORD,
                *(bmc_password(n) for n in lab.names()),
            }

            run = Run("secrets", lab, tmp_path, True, None)
            await run.start()
            assert run.file is not None
            settings_text = run.file.read_text()
            # The file holds every secret (it is where they belong): the search below is real.
            assert {s for s in secrets if s not in settings_text} == {
                fernet_key,
                WRONG_BMC_PASSWORD,  # only ever given through the API
            }
            load_settings(run.file)  # and it is valid
            try:
                api_proc = subprocess.Popen(
                    [sys.executable, "-m", "streams.cli", "api", "-c", str(run.file)],
                    stdin=subprocess.DEVNULL,
                    stdout=api_log.open("wb"),
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
                url = f"http://127.0.0.1:{api_port}"
                async with httpx.AsyncClient(base_url=url, timeout=20) as ui:
                    await _wait_for_api(ui, api_proc, api_log)
                    await _ui_requests(ui, responses, uuids, lab, before_fence=True)
                    await _host_crash(run)
                    assert lab.mail.logins and all(lab.mail.logins)  # type: ignore[attr-defined]
                    await _wait_for_template_run(sampler)
                    await _ui_requests(ui, responses, uuids, lab, before_fence=False)
            finally:
                if api_proc is not None:
                    api_proc.terminate()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        api_proc.wait(15)
                await run.stop()
            records = await read_every_topic(run.settings)
        finally:
            v3_traps.stop()
            await lab.stop()

    # What happened, so that a search of empty places cannot pass.
    assert lab.power_offs and lab.power_offs[0][1] == CRASH_HOST
    logs = {p.name: p.read_text(errors="replace") for p in tmp_path.glob("*.log")}
    assert "fencer worker starting" in logs["secrets-worker0.log"], logs.keys()
    assert api_log.name in logs and logs[api_log.name].strip()
    assert any("ipmitool" in a and "lanplus" in a for a in sampler.seen)
    assert any(t == run.settings.kafka.topics.fence_decisions for t, _ in records)
    assert any(t == run.settings.kafka.topics.settings for t, _ in records)
    assert any(CRASH_HOST in r for r in responses)
    # The workers decrypted the stored passwords (Fernet): the right one works, the wrong one
    # fails the pre-flight and is told.
    notices = [
        json.loads(r.split(b"\n", 1)[1])
        for t, r in records
        if t == run.settings.kafka.topics.notices
    ]
    preflight = {n["host"]["host_name"] for n in notices if n["kind"] == "preflight_failed"}
    assert WRONG_HOST in preflight and STORED_HOST not in preflight, preflight

    hits = []
    for secret in sorted(secrets):
        for name, text in logs.items():
            hits += [f"log {name}: {ln.strip()[:200]}" for ln in text.splitlines() if secret in ln]
        hits += [f"argv: {a[:200]}" for a in sampler.seen if secret in a]
        hits += [f"topic {t}: {r[:200]!r}" for t, r in records if secret.encode() in r]
        hits += [f"api response: {r[:200]}" for r in responses if secret in r]
    assert not hits, "\n".join(hits)


async def _wait_for_template_run(sampler: ArgvSampler) -> None:
    """The actuator's pre-flight reads the template host's BMC with ipmitool every 3 s."""
    for _ in range(150):
        if any("ipmitool" in a and "lanplus" in a for a in sampler.seen):
            return
        await asyncio.sleep(0.1)


async def _wait_for_api(ui: httpx.AsyncClient, proc: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(600):
        with contextlib.suppress(httpx.TransportError):
            if (await ui.get("/api/health")).status_code == 200:
                return
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        await asyncio.sleep(0.1)
    raise AssertionError("the API did not start: " + log.read_text(errors="replace")[-3000:])


def _keep(responses: list[str], r: httpx.Response) -> httpx.Response:
    headers = "\n".join(f"{k}: {v}" for k, v in r.headers.items())
    responses.append(
        f"{r.request.method} {r.request.url.path} {r.status_code}\n{headers}\n{r.text}"
    )
    return r


def _form(lab: LabCloud, name: str, password: str | None = None) -> dict[str, Any]:
    """The IPMI form the UI submits for a host: its shown fields and the password typed in."""
    bmc = lab.bmcs[name]
    return {
        "address": bmc.address,
        "port": bmc.port,
        "password": password if password is not None else bmc_password(name),
    }


async def _ui_requests(
    ui: httpx.AsyncClient,
    responses: list[str],
    uuids: dict[str, str],
    lab: LabCloud,
    *,
    before_fence: bool,
) -> None:
    """The requests the web UI makes (webui/static/app.js), logged in like the UI."""
    keep = lambda r: _keep(responses, r)  # noqa: E731
    if before_fence:
        bad = keep(await ui.post("/api/login", json={"token": "not-the-token"}))
        assert bad.status_code == 401
        r = keep(await ui.post("/api/login", json={"token": API_TOKEN}))
        assert r.status_code == 200, r.text
    # The UI's double-submit CSRF header: the value of the cookie the login set.
    csrf = {"X-CSRF-Token": ui.cookies.get("fencer_csrf") or ""}
    cluster = lab.cluster.uuid
    for path in (
        "/api/health",
        "/api/openapi.json",
        "/api/pause",
        "/api/hosts",
        "/api/clusters",
        f"/api/clusters/{cluster}",
        f"/api/hosts?cluster={cluster}",
        "/api/budget",
        "/api/audit?limit=200",
        "/api/fences",
    ):
        assert keep(await ui.get(path)).status_code == 200, path
    for name, uuid in uuids.items():
        assert keep(await ui.get(f"/api/hosts/{uuid}")).status_code == 200
        keep(await ui.get(f"/api/hosts/{uuid}/bmc-pin"))
    if before_fence:
        # The UI stores a BMC password again (encrypted with the Fernet key on the topic).
        r = keep(
            await ui.put(
                f"/api/hosts/{uuids[STORED_HOST]}/settings",
                json={"name": STORED_HOST, "ipmi": _form(lab, STORED_HOST)},
                headers=csrf,
            )
        )
        assert r.status_code == 200, r.text
        # The UI's "Test IPMI" button: ipmitool (template) and pyghmi read the BMCs.
        for host in (TEMPLATE_HOST, STORED_HOST):
            r = keep(await ui.post(f"/api/hosts/{uuids[host]}/ipmi-test", json={}, headers=csrf))
            assert r.status_code == 200 and r.json()["success"] is True, r.text
        # A wrong password stored through the UI: the failed test and the pre-flight failures
        # it causes (notices, mails, traps, logs) must not show it either.
        r = keep(
            await ui.put(
                f"/api/hosts/{uuids[WRONG_HOST]}/settings",
                json={"name": WRONG_HOST, "ipmi": _form(lab, WRONG_HOST, WRONG_BMC_PASSWORD)},
                headers=csrf,
            )
        )
        assert r.status_code == 200, r.text
        r = keep(await ui.post(f"/api/hosts/{uuids[WRONG_HOST]}/ipmi-test", json={}, headers=csrf))
        assert r.status_code == 200 and r.json()["success"] is False, r.text
        # And a write of a file-only field is refused (naming it, not echoing a secret).
        r = keep(
            await ui.put(
                f"/api/hosts/{uuids[STORED_HOST]}/settings",
                json={"ipmi": {"exec": "/bin/sh", "password": bmc_password(STORED_HOST)}},
                headers=csrf,
            )
        )
        assert r.status_code == 403, r.text
    else:
        fences = keep(await ui.get("/api/fences")).json()
        items = (
            fences
            if isinstance(fences, list)
            else next((v for v in fences.values() if isinstance(v, list)), [])
        )
        assert items, fences
        for item in items[:5]:
            did = item.get("decision_id") or item.get("id")
            if did:
                keep(await ui.get(f"/api/fences/{did}"))
        keep(await ui.post("/api/logout", headers=csrf))
