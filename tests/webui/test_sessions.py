"""Sessions and the audit log against a real `fencer api`: tokens kept hashed, the Secure
cookie over TLS and behind a trusted proxy only, the failed-login limit per client with its
burst reported, and every settings change audited with secrets masked."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer

from fencing.events import NoticeKind
from fencing.records import Notice
from tests.fencing.conftest import self_signed_cert

from .conftest import api_settings, start_api, stop_api

pytestmark = pytest.mark.timeout(120)


def _session_cookie(r: httpx.Response) -> str:
    return next(c for c in r.headers.get_list("set-cookie") if c.startswith("fencer_session="))


@pytest.fixture(scope="module")
def proxied(webui_broker, lab, secrets_key_file, tmp_path_factory):
    """An API behind a 'proxy' on 127.0.0.1, with only a hashed token and a limit of 3."""
    token = secrets.token_urlsafe(24)
    data = api_settings(webui_broker, lab, secrets_key_file)
    data["api"]["token"] = None
    data["api"]["tokens"] = {"ops": "sha256:" + hashlib.sha256(token.encode()).hexdigest()}
    data["api"]["trusted_proxies"] = ["127.0.0.1/32"]
    data["api"]["login_max_failures"] = 3
    data["api"]["login_window"] = 60
    tmp = tmp_path_factory.mktemp("proxied")
    proc = start_api(tmp, data)
    try:
        yield proc, token, tmp
    finally:
        stop_api(proc.proc)


def test_the_token_is_kept_hashed_and_names_who_acts(proxied, lab):
    proc, token, tmp = proxied
    assert token not in "".join(p.read_text() for p in tmp.glob("*.yaml"))
    with httpx.Client(base_url=proc.url, timeout=20) as c:
        ok = c.get("/api/clusters", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200
        # One character changed (never to itself: a token ending in "x" made this the token)
        wrong = token[:-1] + ("y" if token.endswith("x") else "x")
        bad = c.get("/api/clusters", headers={"Authorization": f"Bearer {wrong}"})
        assert bad.status_code == 401


def test_cookie_is_secure_only_over_tls_or_from_a_trusted_proxy(proxied, api):
    proc, token, _ = proxied
    with httpx.Client(base_url=proc.url, timeout=20) as c:
        r = c.post("/api/login", json={"token": token}, headers={"X-Forwarded-Proto": "https"})
        assert r.status_code == 200 and "Secure" in _session_cookie(r)
        r = c.post("/api/login", json={"token": token})  # the proxy says nothing: plain http
        assert r.status_code == 200 and "Secure" not in _session_cookie(r)
    # An API that trusts no proxy ignores the header (anyone could send it).
    with httpx.Client(base_url=api.url, timeout=20) as c:
        r = c.post("/api/login", json={"token": api.token}, headers={"X-Forwarded-Proto": "https"})
        assert r.status_code == 200 and "Secure" not in _session_cookie(r)


def test_cookie_is_secure_when_the_api_serves_tls(webui_broker, lab, secrets_key_file, tmp_path):
    cert, key = self_signed_cert(tmp_path)
    data = api_settings(webui_broker, lab, secrets_key_file)
    data["api"]["tls_certfile"], data["api"]["tls_keyfile"] = str(cert), str(key)
    proc = start_api(tmp_path, data)
    try:
        url = f"https://127.0.0.1:{data['api']['port']}"
        with httpx.Client(base_url=url, verify=str(cert), timeout=20) as c:
            r = c.post("/api/login", json={"token": data["api"]["token"]})
            assert r.status_code == 200 and "Secure" in _session_cookie(r)
        with pytest.raises(httpx.HTTPError):  # no plain http on the TLS port
            httpx.get(f"http://127.0.0.1:{data['api']['port']}/api/health", timeout=5)
    finally:
        stop_api(proc.proc)


def test_a_login_burst_is_limited_per_client_and_audited(proxied):
    proc, token, _ = proxied
    attacker = {"X-Forwarded-For": "203.0.113.7"}
    other = {"X-Forwarded-For": "198.51.100.9"}
    with httpx.Client(base_url=proc.url, timeout=20) as c:
        for _ in range(3):
            assert (
                c.post("/api/login", json={"token": "guess"}, headers=attacker).status_code == 401
            )
        r = c.post("/api/login", json={"token": token}, headers=attacker)
        assert r.status_code == 429 and "203.0.113.7" in r.json()["error"]
        # Wrong bearer tokens count too, and the limit holds for them.
        r = c.get("/api/clusters", headers={**attacker, "Authorization": f"Bearer {token}"})
        assert r.status_code == 429
        # Another client is not punished for it.
        assert c.post("/api/login", json={"token": token}, headers=other).status_code == 200
        audit = c.get(
            "/api/audit",
            params={"target": "client:203.0.113.7"},
            headers={"Authorization": f"Bearer {token}"},
        ).json()
        assert [e["action"] for e in audit] == ["login_burst"]  # reported once per burst
    # ... and told to people: one login_burst notice on the notices topic.
    notices = asyncio.run(_read(proc.settings, proc.topics.notices))
    bursts = [Notice.model_validate_json(v) for v in notices]
    bursts = [n for n in bursts if n.kind is NoticeKind.LOGIN_BURST]
    assert len(bursts) == 1 and bursts[0].host.host_uuid == "client:203.0.113.7"
    assert token not in notices[0].decode()


async def _read(settings, topic: str) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        group_id=None,
    )
    await consumer.start()
    try:
        batch = await consumer.getmany(timeout_ms=3000)
    finally:
        await consumer.stop()
    return [r.value for rs in batch.values() for r in rs]


async def test_every_settings_change_is_audited_with_secrets_masked(proxied, lab):
    proc, token, _ = proxied
    secret_pw = "audit-Secret-99"
    headers = {"Authorization": f"Bearer {token}", "X-Forwarded-For": "192.0.2.44"}
    with httpx.Client(base_url=proc.url, headers=headers, timeout=20) as c:
        r = c.put(
            f"/api/clusters/{lab.cluster_b}/settings",
            json={"ipmi": {"username": "auditor", "password": secret_pw}, "fence_cap": 2},
        )
        assert r.status_code == 200, r.text
        assert c.post(f"/api/clusters/{lab.cluster_b}/pause", json={"reason": "x"}).is_success
        assert c.post(f"/api/clusters/{lab.cluster_b}/resume").is_success
        entries = c.get("/api/audit", params={"target": f"cluster:{lab.cluster_b}"}).json()
        pauses = c.get("/api/audit", params={"target": f"pause:cluster:{lab.cluster_b}"}).json()
        raw = c.get("/api/audit").text
    assert secret_pw not in raw
    (put,) = entries
    assert put["who"] == "ops" and put["client"] == "192.0.2.44"
    assert put["action"] == "put_cluster_settings" and put["at"] > 0
    changes = {ch["field"]: (ch["old"], ch["new"]) for ch in put["changes"]}
    assert changes["ipmi.username"] == (None, "auditor")
    assert changes["fence_cap"] == (None, 2)
    assert changes["ipmi.password"] == (None, "**********")
    assert [p["action"] for p in pauses] == ["resume", "pause"]
    # The topic itself: compacted, and no secret in any record.
    consumer = AIOKafkaConsumer(
        proc.topics.audit,
        bootstrap_servers=proc.settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        group_id=None,
    )
    await consumer.start()
    try:
        batch = await consumer.getmany(timeout_ms=3000)
        values = [r.value for rs in batch.values() for r in rs]
    finally:
        await consumer.stop()
    assert values and all(secret_pw.encode() not in v for v in values)


def test_the_audit_page_is_in_the_ui():
    js = (Path(__file__).resolve().parents[2] / "webui" / "static" / "app.js").read_text()
    assert "/audit" in js
