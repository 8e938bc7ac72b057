"""The web UI's "Lift blocklist" button, end to end: a real Chromium clicks it on the host's
page of `fencer api`; the API (session cookie + CSRF header) writes a `lift_blocklist` record
to the operator-actions topic and audits it; a real `fencer worker --roles actuate` reads it and
removes the host's entry from a real Ceph's blocklist with its fence key (the same path as
`fencer rbd lift HOST`) and tells people: a BLOCKLIST-LIFTED notice (who, what, when; no
secret) on the notices topic, which the notifiers mail and trap (tests/notifiers). A cookie
request without the CSRF header is refused and lifts nothing. `fencer rbd lift` itself writes
the same record, which the same worker carries out; a lift that fails is notified as
BLOCKLIST-NOT-LIFTED.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from playwright.async_api import async_playwright, expect

from fencing.blocklist import parse_ls
from fencing.events import NoticeKind
from fencing.records import Notice
from fencing.signing import write_keys_file
from lab.pipeline import WorkerProcess
from streams.broker import EmbeddedBroker
from tests.conftest import Ceph
from tests.webui.conftest import ApiProcess, Lab, api_settings, read_topic, start_api, stop_api
from tests.webui.test_browser import ARGS, CHROMIUM

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def rbd_api(
    webui_broker: EmbeddedBroker,
    lab: Lab,
    secrets_key_file: Path,
    ceph_clean: Ceph,
    tmp_path: Path,
) -> Iterator[tuple[ApiProcess, WorkerProcess]]:
    """`fencer api` and one actuate worker on the same settings, whose `rbd` section reaches
    the session's Ceph (the worker holds the fence key; the API has no use for it)."""
    data = api_settings(webui_broker, lab, secrets_key_file)
    data["kafka"]["group_id"] = f"fencer-rbd-lift-{uuid.uuid4().hex[:8]}"
    data["rbd"] = ceph_clean.rbd_settings()
    data["signing"] = {"keys_file": str(write_keys_file(tmp_path / "signing.keys", "t"))}
    api = start_api(tmp_path, data)
    cfg = tmp_path / "worker.yaml"
    cfg.write_text(yaml.safe_dump({**data, "log_level": "INFO"}))  # it says when it listens
    worker = WorkerProcess(cfg, "actuate", tmp_path / "worker.log").start()
    try:
        # A lift naming no entry (these entries were added by hand, not by fencer's storage
        # fence) is carried out only if written while an actuator listens (streams.actuating).
        listening = f"actuator listening: {api.topics.operator_actions} "
        deadline = time.monotonic() + 90
        while listening not in (tmp_path / "worker.log").read_text(errors="replace"):
            assert time.monotonic() < deadline, "the actuate worker never began listening"
            time.sleep(0.2)
        yield api, worker
    finally:
        worker.stop(10)
        stop_api(api.proc)


async def _lift_notices(api: ApiProcess, host_uuid: str, count: int) -> list[Notice]:
    """The blocklist lift notices of a host on the notices topic, once `count` are there."""
    kinds = (NoticeKind.BLOCKLIST_LIFTED, NoticeKind.BLOCKLIST_NOT_LIFTED)
    found: list[Notice] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        raw = await read_topic(api.settings, api.topics.notices)
        found = [
            n
            for n in map(Notice.model_validate_json, raw)
            if n.kind in kinds and n.host.host_uuid == host_uuid
        ]
        if len(found) >= count:
            break
        await asyncio.sleep(0.5)
    return found


def _listed(ceph: Ceph) -> list[str]:
    out = ceph.cluster.run("ceph", "osd", "blocklist", "ls", "--format", "json").stdout
    return [str(e.get("addr")) for e in parse_ls(out)]


async def test_lift_blocklist_button_reaches_the_worker_and_ceph(
    rbd_api: tuple[ApiProcess, WorkerProcess], lab: Lab, ceph_clean: Ceph, tmp_path: Path
) -> None:
    api, worker = rbd_api
    host = lab.cloud.hosts[lab.host_a1]
    entry = f"{host.ip}:0/0"  # no storage_ip set: CloudStack's address of the host
    other = "10.9.9.9:0/0"  # another host's blocklist: nobody asked to lift it
    for e in (entry, other):
        ceph_clean.cluster.run("ceph", "osd", "blocklist", "add", e, "3600")
    assert {entry, other} <= set(_listed(ceph_clean))
    # An RBD host: fencer blocklists it when it fences it, so its page offers the lift.
    async with api.aclient() as c:
        r = await c.put(
            f"/api/hosts/{lab.host_a1}/settings", json={"ipmi": {"storage_fence": "before"}}
        )
        assert r.status_code == 200, r.text

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
            await page.goto(f"{api.url}/ui/#/host/{lab.host_a1}")
            await expect(page.locator("#blocklist-lift")).to_be_visible()

            # CSRF: the session cookie alone (no X-CSRF-Token header) is refused.
            status = await page.evaluate(
                """async (path) => (await fetch(path, {method: "POST",
                     headers: {"Content-Type": "application/json"}, body: "{}"})).status""",
                f"/api/hosts/{lab.host_a1}/blocklist/lift",
            )
            assert status == 403

            # A bad address is refused, naming the field; nothing is sent.
            await page.fill("#f-blocklist-address", "not-an-ip")
            page.once("dialog", lambda d: asyncio.ensure_future(d.accept()))
            await page.click("#blocklist-lift")
            await expect(page.locator("#blocklist-lift-result")).to_contain_text("address")

            # The operator confirms; the button sends the lift.
            await page.fill("#f-blocklist-address", "")
            page.once("dialog", lambda d: asyncio.ensure_future(d.accept()))
            await page.click("#blocklist-lift")
            await expect(page.locator("#blocklist-lift-result")).to_contain_text("Lift sent")
            assert errors == []
        finally:
            await browser.close()

    # The actuate worker lifted exactly that entry in Ceph.
    deadline = time.monotonic() + 90
    while entry in _listed(ceph_clean) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    lifted = entry not in _listed(ceph_clean)
    notices = await _lift_notices(api, lab.host_a1, 1) if lifted else []
    worker.stop(10)  # its log is complete once it exited
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert lifted, log[-3000:]
    assert other in _listed(ceph_clean)
    assert f"blocklist {entry} of host {lab.host_a1} lifted by api:" in log, log[-3000:]

    # ... and told people: one BLOCKLIST-LIFTED notice saying who, what and when.
    assert len(notices) == 1, log[-3000:]
    (n,) = notices
    assert n.kind is NoticeKind.BLOCKLIST_LIFTED
    assert n.reason is not None and n.reason.startswith(f"blocklist {entry} lifted by api:")
    assert n.host.host_name == host.name and n.host.cluster_uuid == lab.cluster_a
    assert n.result is not None and n.result.startswith("asked 20")
    assert abs(n.at - time.time()) < 120
    key = ceph_clean.fence_keyring.read_text().split("key = ", 1)[1].split()[0]
    assert key not in n.model_dump_json()

    # Audited like the other operator actions.
    async with api.aclient() as c:
        r = await c.get("/api/audit", params={"target": f"host:{lab.host_a1}"})
    assert r.status_code == 200, r.text
    actions = [a["action"] for a in r.json()]
    assert actions.count("blocklist_lift") == 1, r.json()


async def test_fencer_rbd_lift_goes_the_same_way(
    rbd_api: tuple[ApiProcess, WorkerProcess], lab: Lab, ceph_clean: Ceph, tmp_path: Path
) -> None:
    # `fencer rbd lift HOST` writes the same record; the same worker lifts it in Ceph.
    _api, worker = rbd_api
    entry = "10.30.0.13:0/0"
    ceph_clean.cluster.run("ceph", "osd", "blocklist", "add", entry, "3600")
    cli = [sys.executable, "-m", "streams.cli", "rbd", "lift", lab.host_a2]
    cli += ["--address", "10.30.0.13", "-c", str(tmp_path / "worker.yaml"), "--by", "ops-anna"]
    done = await asyncio.to_thread(
        subprocess.run, cli, capture_output=True, text=True, timeout=60, env=_env()
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sent: lift of host" in done.stdout
    deadline = time.monotonic() + 90
    while entry in _listed(ceph_clean) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    lifted = entry not in _listed(ceph_clean)
    # A host CloudStack does not know and no address: nothing to lift, and people are told.
    ghost = str(uuid.uuid4())
    cli = [sys.executable, "-m", "streams.cli", "rbd", "lift", ghost]
    cli += ["-c", str(tmp_path / "worker.yaml"), "--by", "ops-anna"]
    done = await asyncio.to_thread(
        subprocess.run, cli, capture_output=True, text=True, timeout=60, env=_env()
    )
    assert done.returncode == 0, done.stderr[-2000:]
    failed = await _lift_notices(_api, ghost, 1)
    notices = await _lift_notices(_api, lab.host_a2, 1)
    worker.stop(10)
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert lifted, log[-3000:]
    assert f"blocklist {entry} of host {lab.host_a2} lifted by ops-anna" in log, log[-3000:]
    assert [(n.kind, n.reason) for n in notices] == [
        (NoticeKind.BLOCKLIST_LIFTED, f"blocklist {entry} lifted by ops-anna")
    ]
    assert [n.kind for n in failed] == [NoticeKind.BLOCKLIST_NOT_LIFTED], log[-3000:]
    assert failed[0].reason is not None
    assert failed[0].reason.startswith("blocklist NOT lifted (asked by ops-anna): ")


async def test_fencer_rbd_lift_direct_notifies_too(
    rbd_api: tuple[ApiProcess, WorkerProcess], lab: Lab, ceph_clean: Ceph, tmp_path: Path
) -> None:
    # `--direct` lifts here with the fence key (no worker involved) and tells people the same way.
    api, _worker = rbd_api
    entry = "10.30.0.14:0/0"
    ceph_clean.cluster.run("ceph", "osd", "blocklist", "add", entry, "3600")
    cli = [sys.executable, "-m", "streams.cli", "rbd", "lift", lab.host_b1, "--direct"]
    cli += ["--address", "10.30.0.14", "-c", str(tmp_path / "worker.yaml"), "--by", "ops-bo"]
    done = await asyncio.to_thread(
        subprocess.run, cli, capture_output=True, text=True, timeout=60, env=_env()
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"blocklist {entry} lifted" in done.stdout and "NOT sent" not in done.stderr
    assert entry not in _listed(ceph_clean)
    notices = await _lift_notices(api, lab.host_b1, 1)
    assert [(n.kind, n.reason, n.blocklist_entry) for n in notices] == [
        (NoticeKind.BLOCKLIST_LIFTED, f"blocklist {entry} lifted by ops-bo", entry)
    ]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FENCER_")}
