"""The UI in headless Chromium: the file-only fields are shown read-only and never sent, a
save still works, and the change appears on the Audit page with who and the old and new value."""

from __future__ import annotations

import pytest
from playwright.async_api import async_playwright, expect

from .test_browser import ARGS, CHROMIUM, SHOTS

pytestmark = pytest.mark.timeout(90)


async def test_file_only_fields_are_read_only_and_changes_are_audited(api, lab):
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

            await page.goto(f"{api.url}/ui/#/cluster/{lab.cluster_b}")
            await expect(page.locator("#ipmi-form")).to_be_visible()
            for name in ("exec", "execution_syntax", "password_via", "action_stop", "verify_tls"):
                await expect(page.locator(f"#f-{name}")).to_be_disabled()
                await expect(page.locator(f"#inh-{name}")).to_contain_text("configuration file")
            await expect(page.locator("#f-username")).to_be_enabled()
            await expect(page.locator("#f-driver option[value=template]")).to_be_disabled()
            await page.fill("#f-username", "audited-op")
            await page.click("#save")
            await expect(page.locator("#banner")).to_contain_text("saved")

            await page.click("a[data-nav=audit]")
            await expect(page.locator("#audit")).to_be_visible()
            row = page.locator("#audit tbody tr", has_text="ipmi.username").first
            await expect(row).to_contain_text("audited-op")
            await expect(row).to_contain_text("api.token")
            await expect(row).to_contain_text("put_cluster_settings")
            await page.screenshot(path=SHOTS / "audit.png")
            assert errors == []
        finally:
            await browser.close()
