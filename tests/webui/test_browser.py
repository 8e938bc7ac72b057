"""The UI in a real headless Chromium (Debian's, driven by Playwright) against `fencer api`
with the lab: log in, change a cluster setting, see a host inherit it, override it on the host,
test the host's lab BMC, and see a fence published to the topics appear in the history with
its evidence timeline. Screenshots of the pages go to docs/screenshots/."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from playwright.async_api import async_playwright, expect

from fencing.events import Evidence, FenceAction, HostStatus
from fencing.records import (
    EvidenceSummary,
    FenceDecision,
    FenceOutcome,
    HostRef,
    HostSignal,
    HostStateRecord,
    ProbeResult,
)

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"

pytestmark = pytest.mark.timeout(90)


async def _publish_fence(api, lab) -> str:
    t, now = api.topics, time.time()
    ref = HostRef(
        host_uuid=lab.host_a2, host_name="kvm-a2", cluster_uuid=lab.cluster_a, cluster_name="kvm-a"
    )
    suspect = now - 240
    await api.publish(
        t.host_signals,
        lab.host_a2,
        HostSignal(kind="disconnected", host=ref, at=suspect, status=HostStatus.ALERT),
    )
    for check in (1, 2, 3, 4):
        await api.publish(
            t.probe_results,
            lab.host_a2,
            ProbeResult(
                host=ref,
                episode=1,
                check=check,
                suspect_since=suspect,
                finished_at=suspect + 60 * check,
                mtimes={f"/mnt/p/d{i}": 1_000.0 for i in range(6)},
                complete=True,
                neighbour="kvm-a1",
            ),
        )
        evidence_of = Evidence.BASELINE if check == 1 else Evidence.STALE
        await api.publish(
            t.host_states,
            lab.host_a2,
            HostStateRecord(
                host=ref,
                record={
                    "host": lab.host_a2,
                    "state": "suspect" if check < 4 else "fence_proposed",
                    "episode": 1,
                    "suspect_since": suspect,
                    "last_check": check,
                    "last_probe_at": suspect + 60 * check - 30,
                    "last_evidence": evidence_of.value,
                    "stale_count": check - 1,
                    "files_checked": 6,
                    "neighbour": "kvm-a1",
                },
                updated_at=suspect + 60 * check - 30,
            ),
        )
    evidence = EvidenceSummary(
        suspect_since=suspect, stale_checks=3, files_checked=6, last_neighbour="kvm-a1"
    )
    await api.publish(
        t.fence_decisions,
        lab.host_a2,
        FenceDecision(
            decision_id="ui-demo-fence",
            host=ref,
            episode=1,
            action=FenceAction.STOP,
            approved=True,
            evidence=evidence,
            decided_at=now - 50,
            budget_used=1,
            budget_cap=3,
        ),
    )
    await api.publish(
        t.fence_outcomes,
        lab.host_a2,
        FenceOutcome(
            decision_id="ui-demo-fence",
            host=ref,
            episode=1,
            action=FenceAction.STOP,
            driver="ipmi",
            success=True,
            verified=True,
            power_before="on",
            power_after="off",
            started_at=now - 49,
            finished_at=now - 45,
            cloudstack_call="declareHostAsDegraded",
            cloudstack_result="ok",
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
                "last_check": 4,
                "last_probe_at": suspect + 210,
                "last_evidence": "stale",
                "stale_count": 3,
                "files_checked": 6,
                "neighbour": "kvm-a1",
                "decision_id": "ui-demo-fence",
            },
            updated_at=now - 45,
        ),
    )
    return "ui-demo-fence"


async def test_operator_changes_settings_tests_the_bmc_and_sees_a_fence(api, lab, actuate_worker):
    SHOTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(15000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))

            # Log in with the API token.
            await page.goto(f"{api.url}/ui/")
            await page.fill("#token", "wrong")
            await page.click("#login-form button[type=submit]")
            await expect(page.locator("#login-error")).to_contain_text("wrong token")
            await page.screenshot(path=SHOTS / "login.png")
            await page.fill("#token", api.token)
            await page.click("#login-form button[type=submit]")
            await expect(page.locator("#hosts")).to_be_visible()

            # The cluster's IPMI tab: a validation message names the field, then a change.
            await page.goto(f"{api.url}/ui/#/cluster/{lab.cluster_a}")
            await expect(page.locator("#ipmi-form")).to_be_visible()
            await page.fill("#f-port", "70000")
            await page.click("#save")
            await expect(page.locator("#err-port")).to_contain_text("less than or equal to 65535")
            await expect(page.locator("#form-error")).to_contain_text("ipmi.port")
            await page.fill("#f-port", "")
            await page.fill("#f-username", lab.bmc.username)
            await page.fill("#f-password", lab.bmc.password)
            await page.select_option("#f-action", "reboot")
            await page.click("#save")
            await expect(page.locator("#banner")).to_contain_text("Cluster settings saved")
            await expect(page.locator("#src-username")).to_have_text("cluster")
            await expect(page.locator("#inh-password")).to_contain_text("a password is set")
            await page.screenshot(path=SHOTS / "cluster-ipmi-tab.png", full_page=True)

            # The host inherits it, shown beside the field; then overrides it.
            await page.goto(f"{api.url}/ui/#/host/{lab.host_a1}")
            await expect(page.locator("#host-form")).to_be_visible()
            await expect(page.locator("#inh-username")).to_have_text(
                f"inherits: {lab.bmc.username}"
            )
            await expect(page.locator("#src-username")).to_have_text("cluster")
            await expect(page.locator("#inh-action")).to_have_text("inherits: reboot")
            await page.fill("#f-address", "127.0.0.1")
            await page.select_option("#f-action", "stop")
            await page.click("#save")
            await expect(page.locator("#banner")).to_contain_text("Host overrides saved")
            await expect(page.locator("#src-action")).to_have_text("host")
            await expect(page.locator("#inh-action")).to_have_text("inherits: reboot")

            # The test button reads the lab BMC through an actuate worker (not the API).
            await page.click("#ipmi-test")
            await expect(page.locator("#test-result")).to_contain_text(
                "test passed", timeout=120_000
            )
            await expect(page.locator("#test-result")).to_contain_text("power on")
            assert "null" not in await page.inner_text("main")

            # Confirm the BMC's identity: its system GUID is pinned for the host.
            await expect(page.locator("#bmc-identity")).to_contain_text("No GUID pinned yet")
            page.once("dialog", lambda dialog: dialog.accept())
            await page.click("#confirm-bmc")
            await expect(page.locator("#bmc-guid")).to_have_text(lab.bmc.guid)
            # Pinned by an actuate worker for the operator who asked through the API.
            await expect(page.locator("#bmc-identity")).to_contain_text("by operator ")
            await expect(page.locator("#bmc-identity")).to_contain_text("(api)")
            await page.screenshot(path=SHOTS / "host-overrides.png", full_page=True)

            # A fence published by the workers shows up in the history, with its timeline.
            decision = await _publish_fence(api, lab)
            await page.goto(f"{api.url}/ui/#/fences")
            row = page.locator(f"tr.fence[data-decision='{decision}']")
            for _ in range(40):
                if await row.count():
                    break
                await page.wait_for_timeout(250)
                await page.goto(f"{api.url}/ui/#/fences?result=succeeded")
            await expect(row).to_contain_text("succeeded")
            timeline = page.locator("tr.timeline-row ul.timeline")
            await expect(timeline).to_contain_text("check 3: stale via kvm-a1")
            await expect(timeline).to_contain_text("stop via ipmi succeeded")
            await page.screenshot(path=SHOTS / "fence-history.png", full_page=True)

            # The live host list shows the fenced host.
            await page.goto(f"{api.url}/ui/#/hosts")
            await expect(page.locator(f"tr[data-host='{lab.host_a2}']")).to_contain_text("fenced")
            await page.screenshot(path=SHOTS / "hosts.png", full_page=True)

            # Pause the cluster from its page.
            await page.goto(f"{api.url}/ui/#/cluster/{lab.cluster_a}")
            await page.click("#cluster-pause")
            await expect(page.locator("#cluster-state")).to_have_text("paused")
            await page.click("#cluster-pause")
            await expect(page.locator("#cluster-state")).to_have_text("active")

            assert lab.bmc.password not in await page.content()
            assert errors == []
        finally:
            await browser.close()
