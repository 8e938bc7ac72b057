"""The REST API against a real `fencer api` process, the embedded broker and the CloudStack
simulator: auth and CSRF, settings with inheritance, write-only passwords, pause, fences."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from fencing.events import Evidence, FenceAction, HostStatus, NoticeKind
from fencing.records import (
    EvidenceSummary,
    FenceDecision,
    FenceOutcome,
    HostRef,
    HostSignal,
    HostStateRecord,
    Notice,
    ProbeResult,
)
from streams.settings_store import SettingsStore
from tests.webui.conftest import read_topic

pytestmark = pytest.mark.timeout(60)


def test_health_is_public_and_everything_else_needs_the_token(api):
    with httpx.Client(base_url=api.url) as anon:
        assert anon.get("/api/health").json()["status"] == "ok"
        for path in ("/api/clusters", "/api/hosts", "/api/fences", "/api/openapi.json"):
            r = anon.get(path)
            assert r.status_code == 401, path
            assert "authentication required" in r.json()["error"]
        r = anon.put("/api/clusters/x/settings", json={})
        assert r.status_code == 401
        r = anon.get("/api/clusters", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"] == "authentication failed: wrong token"


def test_cookie_session_needs_the_csrf_header_on_writes(api, lab):
    with httpx.Client(base_url=api.url) as browser:
        assert browser.post("/api/login", json={"token": "nope"}).status_code == 401
        r = browser.post("/api/login", json={"token": api.token})
        assert r.status_code == 200
        csrf = r.json()["csrf_token"]
        cookies = r.headers.get_list("set-cookie")
        session = next(c for c in cookies if c.startswith("fencer_session="))
        assert "HttpOnly" in session and "SameSite=Strict" in session
        assert any(c.startswith("fencer_csrf=") and "HttpOnly" not in c for c in cookies)
        assert browser.get("/api/clusters").status_code == 200
        url = f"/api/clusters/{lab.cluster_b}/pause"
        r = browser.post(url, json={})
        assert r.status_code == 403 and "X-CSRF-Token" in r.json()["error"]
        assert browser.post(url, json={}, headers={"X-CSRF-Token": "forged"}).status_code == 403
        r = browser.post(url, json={"reason": "csrf test"}, headers={"X-CSRF-Token": csrf})
        assert r.status_code == 200 and r.json()["paused"] is True
        r = browser.post(f"/api/clusters/{lab.cluster_b}/resume", headers={"X-CSRF-Token": csrf})
        assert r.json()["paused"] is False
        browser.post("/api/logout", headers={"X-CSRF-Token": csrf})
        assert browser.get("/api/clusters").status_code == 401


def test_host_inherits_the_cluster_setting_until_it_overrides_it(api, lab):
    with api.client() as c:
        r = c.put(
            f"/api/clusters/{lab.cluster_a}/settings",
            json={"ipmi": {"action": "reboot", "username": "ops"}},
        )
        assert r.status_code == 200, r.text
        view = r.json()
        assert view["effective"]["action"] == "reboot" and view["sources"]["action"] == "cluster"
        assert view["sources"]["driver"] == "default"

        host = c.get(f"/api/hosts/{lab.host_a1}").json()["settings"]
        assert host["effective"]["username"] == "ops" and host["sources"]["username"] == "cluster"
        assert host["inherited"]["action"] == "reboot"

        r = c.put(
            f"/api/hosts/{lab.host_a1}/settings",
            json={"ipmi": {"username": "root", "address": "127.0.0.1"}},
        )
        assert r.status_code == 200, r.text
        host = c.get(f"/api/hosts/{lab.host_a1}").json()["settings"]
        assert host["effective"]["username"] == "root" and host["sources"]["username"] == "host"
        assert host["inherited"]["username"] == "ops"  # shown beside the override
        assert host["address"] == "127.0.0.1"
        assert host["sources"]["action"] == "cluster"

        other = c.get(f"/api/hosts/{lab.host_a2}").json()["settings"]
        assert other["effective"]["username"] == "ops"
        elsewhere = c.get(f"/api/hosts/{lab.host_b1}").json()["settings"]
        assert elsewhere["sources"]["username"] == "default"


def test_validation_errors_name_the_field(api, lab):
    with api.client() as c:
        r = c.put(f"/api/clusters/{lab.cluster_a}/settings", json={"ipmi": {"port": 70000}})
        assert r.status_code == 422
        assert r.json()["fields"][0]["field"] == "ipmi.port"
        assert r.json()["error"].startswith("invalid cluster settings: ipmi.port:")
        r = c.put(f"/api/hosts/{lab.host_a1}/settings", json={"ipmi": {"action": "start"}})
        assert r.status_code == 422 and r.json()["fields"][0]["field"] == "ipmi.action"
        r = c.put(f"/api/clusters/{lab.cluster_a}/settings", json={"ipmi": {"address": "x"}})
        assert r.status_code == 422 and r.json()["fields"][0]["field"] == "ipmi"
        r = c.put(f"/api/clusters/{lab.cluster_a}/settings", json={"colour": "red"})
        assert r.status_code == 422 and r.json()["fields"][0]["field"] == "colour"
        r = c.put(
            f"/api/clusters/{lab.cluster_a}/settings",
            content=b"{not json",
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 400
        assert c.get("/api/clusters/no-such-cluster").status_code == 404
        assert c.get("/api/fences", params={"limit": "0"}).json()["fields"][0]["field"] == "limit"


async def test_password_is_write_only_and_encrypted_in_the_topic(api, lab):
    async with api.aclient() as c:
        r = await c.put(
            f"/api/clusters/{lab.cluster_b}/settings",
            json={"ipmi": {"password": lab.bmc.password, "username": "fencer"}},
        )
        assert r.status_code == 200, r.text
        assert r.json()["password_set"] is True and r.json()["password_source"] == "cluster"
        bodies = [r.text]
        for path in (
            f"/api/clusters/{lab.cluster_b}",
            f"/api/hosts/{lab.host_b1}",
            "/api/clusters",
            "/api/hosts",
        ):
            bodies.append((await c.get(path)).text)
        assert all(lab.bmc.password not in b for b in bodies)
        # A PUT without a password keeps it.
        r = await c.put(f"/api/clusters/{lab.cluster_b}/settings", json={"ipmi": {}})
        assert r.json()["password_set"] is True

    raw = await read_topic(api.settings, api.topics.settings)
    assert raw and all(lab.bmc.password.encode() not in v for v in raw)
    assert any(b"ipmi_password" in v for v in raw)

    # Another process with the key (a worker) decrypts it.
    worker = SettingsStore(api.settings)
    await worker.start()
    try:
        eff = worker.effective(lab.host_b1, lab.cluster_b)
        assert eff.values.password.get_secret_value() == lab.bmc.password
        assert eff.sources["password"] == "cluster"
    finally:
        await worker.stop()

    async with api.aclient() as c:
        r = await c.put(
            f"/api/clusters/{lab.cluster_b}/settings", json={"ipmi": {"clear_password": True}}
        )
        assert r.json()["password_set"] is False


async def test_pause_is_seen_by_every_worker(api, lab):
    async with api.aclient() as c:
        r = await c.post("/api/pause", json={"reason": "storage maintenance"})
        assert r.status_code == 200 and r.json()["global_pause"]["paused"] is True
        assert r.json()["global_pause"]["reason"] == "storage maintenance"
        worker = SettingsStore(api.settings)
        await worker.start()
        try:
            assert worker.is_paused(lab.cluster_a) and worker.is_paused(None)
            await c.post("/api/resume")
            await c.post(f"/api/clusters/{lab.cluster_a}/pause", json={})
            # Different keys may sit on different partitions: wait for both records.
            await _until(lambda: worker.is_paused(lab.cluster_a) and not worker.is_paused(None))
            assert not worker.is_paused(lab.cluster_b)
            await c.post(f"/api/clusters/{lab.cluster_a}/resume")
            await _until(lambda: not worker.is_paused(lab.cluster_a))
        finally:
            await worker.stop()
        overview = (await c.get("/api/pause")).json()
        assert overview["global_pause"]["paused"] is False
        assert set(overview["clusters"]) == {lab.cluster_a, lab.cluster_b}


async def test_fence_history_state_and_budget_come_from_the_topics(api, lab):
    t = api.topics
    now = time.time()
    ref = HostRef(host_uuid=lab.host_a2, host_name="kvm-a2", cluster_uuid=lab.cluster_a)
    other = HostRef(host_uuid=lab.host_b1, host_name="kvm-b1", cluster_uuid=lab.cluster_b)
    suspect = now - 300
    await api.publish(
        t.host_signals,
        lab.host_a2,
        HostSignal(kind="disconnected", host=ref, at=suspect, status=HostStatus.ALERT),
    )
    stale_run = 0
    for check, evidence in enumerate([Evidence.STALE, Evidence.UNKNOWN, Evidence.STALE], 1):
        await api.publish(
            t.probe_results,
            lab.host_a2,
            ProbeResult(
                host=ref,
                episode=1,
                check=check,
                suspect_since=suspect,
                finished_at=suspect + 60 * check,
                mtimes={f"/mnt/p/d{i}": 1_000.0 for i in range(4)},
                complete=evidence is not Evidence.UNKNOWN,
                neighbour="kvm-a1",
            ),
        )
        stale_run += evidence is Evidence.STALE
        # The core's judgement of each check, as the watch agent publishes it.
        await api.publish(
            t.host_states,
            lab.host_a2,
            HostStateRecord(
                host=ref,
                record={
                    "host": lab.host_a2,
                    "state": "suspect",
                    "episode": 1,
                    "suspect_since": suspect,
                    "last_check": check,
                    "last_probe_at": suspect + 60 * check,
                    "last_evidence": evidence.value,
                    "stale_count": stale_run,
                    "files_checked": 4,
                    "neighbour": "kvm-a1",
                },
                updated_at=suspect + 60 * check,
            ),
        )
    summary = EvidenceSummary(suspect_since=suspect, stale_checks=2, files_checked=4)
    await api.publish(
        t.fence_decisions,
        lab.host_a2,
        FenceDecision(
            decision_id="d-a2-1",
            host=ref,
            episode=1,
            action=FenceAction.STOP,
            approved=True,
            evidence=summary,
            decided_at=now - 100,
            budget_used=1,
            budget_cap=3,
        ),
    )
    await api.publish(
        t.fence_outcomes,
        lab.host_a2,
        FenceOutcome(
            decision_id="d-a2-1",
            host=ref,
            episode=1,
            action=FenceAction.STOP,
            driver="ipmi",
            success=True,
            verified=True,
            power_before="on",
            power_after="off",
            started_at=now - 99,
            finished_at=now - 95,
        ),
    )
    await api.publish(
        t.host_states,
        lab.host_a2,
        HostStateRecord(
            host=ref,
            record={
                "host": lab.host_a2,
                "state": "fenced",
                "episode": 1,
                "suspect_since": suspect,
                "last_check": 3,
                "last_probe_at": suspect + 180,
                "last_evidence": "stale",
                "stale_count": 2,
                "decision_id": "d-a2-1",
            },
            updated_at=now - 95,
        ),
    )
    await api.publish(
        t.notices,
        lab.host_a2,
        Notice(
            notice_id="n1",
            kind=NoticeKind.FENCE_SUCCEEDED,
            host=ref,
            at=now - 94,
            decision_id="d-a2-1",
        ),
    )
    await api.publish(
        t.fence_decisions,
        lab.host_b1,
        FenceDecision(
            decision_id="d-b1-1",
            host=other,
            episode=3,
            action=FenceAction.REBOOT,
            approved=False,
            withheld_reason="storm_guard",
            evidence=summary,
            decided_at=now - 7200,
        ),
    )
    async with api.aclient() as c:

        async def fences(**params):
            return (await c.get("/api/fences", params=params)).json()

        await _until_async(lambda: fences(), lambda v: len(v) == 2)
        [rec] = await fences(cluster=lab.cluster_a)
        assert rec["result"] == "succeeded" and rec["outcome"]["power_after"] == "off"
        kinds = [e["kind"] for e in rec["timeline"]]
        assert kinds == ["signal", "probe", "probe", "probe", "decision", "outcome", "notice"]
        assert [e["at"] for e in rec["timeline"]] == sorted(e["at"] for e in rec["timeline"])
        assert [r["decision_id"] for r in await fences(result="withheld")] == ["d-b1-1"]
        assert [r["decision_id"] for r in await fences(host=lab.host_b1)] == ["d-b1-1"]
        assert [r["decision_id"] for r in await fences(since=now - 3600)] == ["d-a2-1"]
        assert [r["decision_id"] for r in await fences(until=now - 3600)] == ["d-b1-1"]
        assert await fences(result="failed") == []
        one = (await c.get("/api/fences/d-a2-1")).json()
        assert one["decision_id"] == "d-a2-1" and len(one["timeline"]) == 7

        host = (await c.get(f"/api/hosts/{lab.host_a2}")).json()["fencing"]
        assert host["state"] == "fenced" and host["episode"] == 1
        assert host["stale_checks"] == 2 and len(host["evidence"]) == 3
        assert host["last_probe"]["check"] == 3

        budgets = {b["cluster_uuid"]: b for b in (await c.get("/api/budget")).json()}
        assert budgets[lab.cluster_a]["used"] == 1 and budgets[lab.cluster_a]["cap"] == 3
        assert budgets[lab.cluster_b]["used"] == 0  # withheld, and outside the window


async def _until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def _until_async(get, cond, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = await get()
        if cond(value):
            return value
        assert time.monotonic() < deadline, f"condition not met in time: {value!r}"
        await asyncio.sleep(0.1)


async def test_ipmi_test_needs_a_bmc_address(api, lab):
    # The test itself runs in an actuate worker: tests/webui/test_ipmi_test_worker.py.
    async with api.aclient() as c:
        r = await c.post(f"/api/hosts/{lab.host_a2}/ipmi-test")
        assert r.status_code == 422 and r.json()["fields"][0]["field"] == "ipmi.address"
        r = await c.get("/api/ipmi-tests/never-asked")
        assert r.status_code == 404 and "never-asked" in r.json()["error"]


async def test_confirm_bmc_identity_needs_a_bmc_address_and_a_valid_expect(api, lab):
    # The pin itself is read and written by an actuate worker (the API has no BMC password):
    # tests/webui/test_bmc_pin_worker.py. What the API checks before it asks one:
    async with api.aclient() as c:
        r = await c.get(f"/api/hosts/{lab.host_a2}/bmc-pin")
        assert r.status_code == 200 and r.json()["pinned"] is False, r.text
        r = await c.post(f"/api/hosts/{lab.host_a2}/bmc-pin")
        assert r.status_code == 422 and r.json()["fields"][0]["field"] == "ipmi.address"
        r = await c.post(f"/api/hosts/{lab.host_a2}/bmc-pin", json={"expect": ""})
        assert r.status_code == 422 and r.json()["fields"][0]["field"] == "expect", r.text
        r = await c.post(f"/api/hosts/{lab.host_a2}/bmc-pin", json={"guid": "x"})
        assert r.status_code == 422 and r.json()["fields"][0]["field"] == "guid", r.text


async def test_ipmi_user_and_password_over_the_ipmi_limits_are_refused_naming_the_field(api, lab):
    async with api.aclient() as c:
        r = await c.put(
            f"/api/hosts/{lab.host_b1}/settings",
            json={"ipmi": {"address": "127.0.0.1", "password": "p" * 21}},
        )
        assert r.status_code == 422, r.text
        assert r.json()["fields"] == [
            {
                "field": "ipmi.password",
                "message": "password is 21 bytes; IPMI 2.0 carries at most 20 "
                "(the BMC would answer 'incorrect password')",
            }
        ]
        assert "p" * 21 not in r.text
        r = await c.put(
            f"/api/clusters/{lab.cluster_b}/settings", json={"ipmi": {"username": "u" * 17}}
        )
        assert r.status_code == 422 and r.json()["fields"][0]["field"] == "ipmi.username"
        # Redfish has no such limit.
        r = await c.put(
            f"/api/hosts/{lab.host_b1}/settings",
            json={"ipmi": {"driver": "redfish", "password": "p" * 21}},
        )
        assert r.status_code == 200, r.text
        await c.delete(f"/api/hosts/{lab.host_b1}/settings")
