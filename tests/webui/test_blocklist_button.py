"""The "Lift blocklist" button shows only where a Ceph blocklist means something, in a real
headless Chromium against `fencer api`: on an RBD host (its storage_fence blocklists it, and
fencer's storage fence recorded an entry for it) and on a host whose blocklist fencer recorded,
until a lift of that entry is notified; never on an NFS host (storage_fence none, no entry).

The records are the workers' own: the storage fence's notice is fencing.outcome.storage_notice
of a StorageFenceResult, the lift's is streams.actuating.lift_notice, published on the API's
notices topic as the actuate worker publishes them (tests/webui/test_rbd_lift.py runs that
worker against a real Ceph)."""

from __future__ import annotations

import asyncio
import time

import pytest
from playwright.async_api import async_playwright, expect

from fencing.events import FenceAction
from fencing.outcome import storage_notice
from fencing.records import EvidenceSummary, FenceDecision, HostRef, OperatorAction
from fencing.storage_fence import StorageFenceResult
from streams.actuating import lift_notice
from tests.webui.conftest import ApiProcess, Lab
from tests.webui.test_browser import ARGS, CHROMIUM

pytestmark = pytest.mark.timeout(120)


async def _blocklist_fence(api: ApiProcess, ref: HostRef, entry: str, decision_id: str) -> None:
    """The notice the actuator sends after its storage fence blocklisted `entry`."""
    now = time.time()
    decision = FenceDecision(
        decision_id=decision_id,
        host=ref,
        episode=1,
        action=FenceAction.STOP,
        approved=True,
        evidence=EvidenceSummary(suspect_since=now - 300, stale_checks=3),
        decided_at=now - 60,
    )
    storage = StorageFenceResult(
        ref.host_uuid, entry.split(":")[0], entry, True, True, f"blocklist {entry} verified"
    )
    notice = storage_notice(decision, storage, True, None, now - 50)
    assert notice.blocklist_entry == entry
    await api.publish(api.topics.notices, ref.host_uuid, notice)


async def _host(api: ApiProcess, uuid: str, until, what: str) -> dict:
    """GET /api/hosts/<uuid> until `until(body)` (the API folds the topics as they come)."""
    deadline = time.monotonic() + 30
    async with api.aclient() as c:
        while True:
            r = await c.get(f"/api/hosts/{uuid}")
            assert r.status_code == 200, r.text
            if until(r.json()) or time.monotonic() > deadline:
                assert until(r.json()), f"{what}: {r.json()['blocklist']}"
                return r.json()
            await asyncio.sleep(0.3)


async def test_lift_blocklist_shows_on_an_rbd_host_and_not_on_an_nfs_host(
    api: ApiProcess, lab: Lab
) -> None:
    rbd, nfs, other = lab.host_a1, lab.host_a2, lab.host_b1
    async with api.aclient() as c:
        r = await c.put(f"/api/hosts/{rbd}/settings", json={"ipmi": {"storage_fence": "before"}})
        assert r.status_code == 200, r.text
    await _blocklist_fence(
        api, HostRef(host_uuid=rbd, host_name="kvm-a1"), "10.1.0.11:0/0", "dec-rbd-1"
    )
    # A host fenced by a blocklist under settings since changed to none: the entry still counts.
    b1 = HostRef(host_uuid=other, host_name="kvm-b1")
    await _blocklist_fence(api, b1, "10.2.0.11:0/0", "dec-b1-1")

    x = await _host(api, rbd, lambda b: b["blocklist"]["entries"], "the RBD host's entry")
    assert x["blocklist"]["storage_fence"] == "before" and x["blocklist"]["liftable"] is True
    assert [e["entry"] for e in x["blocklist"]["entries"]] == ["10.1.0.11:0/0"]
    assert x["blocklist"]["entries"][0]["decision_id"] == "dec-rbd-1"
    x = await _host(api, nfs, lambda b: True, "the NFS host")
    assert x["blocklist"] == {"entries": [], "storage_fence": "none", "liftable": False}
    x = await _host(api, other, lambda b: b["blocklist"]["entries"], "the other host's entry")
    assert x["blocklist"]["storage_fence"] == "none" and x["blocklist"]["liftable"] is True

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(15000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(f"{api.url}/ui/")
            await page.fill("#token", api.token)
            await page.click("#login-form button[type=submit]")
            await expect(page.locator("#hosts")).to_be_visible()

            # The RBD host: the button and the entry fencer's storage fence recorded.
            await page.goto(f"{api.url}/ui/#/host/{rbd}")
            await expect(page.locator("#blocklist-lift")).to_be_visible()
            await expect(page.locator("#blocklist-entries")).to_contain_text("10.1.0.11:0/0")

            # The NFS host: its page is drawn (the IPMI form), without a blocklist section.
            await page.goto(f"{api.url}/ui/#/host/{nfs}")
            await expect(page.locator("#host-form")).to_be_visible()
            await expect(page.locator("h1")).to_contain_text("kvm-a2")
            assert await page.locator("#blocklist-lift").count() == 0
            assert await page.locator("#blocklist").count() == 0

            # A recorded entry shows the button until its lift is notified.
            await page.goto(f"{api.url}/ui/#/host/{other}")
            await expect(page.locator("#blocklist-lift")).to_be_visible()
            lifted = lift_notice(
                OperatorAction(
                    kind="lift_blocklist", host_uuid=other, by="api:ops", at=time.time()
                ),
                b1,
                "10.2.0.11:0/0",
                None,
                time.time(),
            )
            await api.publish(api.topics.notices, other, lifted)
            await _host(api, other, lambda b: not b["blocklist"]["liftable"], "after the lift")
            await page.goto(f"{api.url}/ui/#/host/{nfs}")  # leave, then draw the page again
            await expect(page.locator("h1")).to_contain_text("kvm-a2")
            await page.goto(f"{api.url}/ui/#/host/{other}")
            await expect(page.locator("h1")).to_contain_text("kvm-b1")
            await expect(page.locator("#host-form")).to_be_visible()
            assert await page.locator("#blocklist-lift").count() == 0
            assert errors == []
        finally:
            await browser.close()
