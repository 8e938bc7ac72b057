"""The "confirm BMC identity" button runs in an actuate worker, not in the API process (issue
#15): the API holds NO BMC password; it asks on the operator-actions topic, the worker (which has
the password in its settings file) reads the lab's pyghmi BMC's system GUID, pins it on the
bmc-pins topic through its own pin store and answers on fencer.ipmi-tests; the API answers with
the pin it then reads. A GUID other than the `expect`ed one is refused naming the field, and
nothing is pinned. No secret in the request, the answer, a reply or the worker's log."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Iterator

import httpx
import pytest

from fencing.identity import PinStoreError
from fencing.records import BmcPin, IpmiTestAnswer, OperatorAction
from streams.bmc_pins import BmcPinStore
from tests.webui.conftest import api_settings, read_topic, start_actuate_worker, start_api, stop_api

pytestmark = pytest.mark.timeout(240)


def _has_password(data: object) -> bool:
    if isinstance(data, dict):
        return any(k == "password" or _has_password(v) for k, v in data.items())
    if isinstance(data, list):
        return any(_has_password(v) for v in data)
    return False


@pytest.fixture(scope="module")
def api_and_worker(webui_broker, lab, secrets_key_file, tmp_path_factory) -> Iterator[tuple]:
    """An API process with no BMC password in its settings, and an actuate worker of the same
    fencer whose settings file has the lab BMC's user and password."""
    data = api_settings(webui_broker, lab, secrets_key_file)
    assert not _has_password(data)
    tmp = tmp_path_factory.mktemp("bmc-pin")
    api = start_api(tmp, data)
    worker_data = copy.deepcopy(data)
    worker_data["defaults"].update(username=lab.bmc.username, password=lab.bmc.password)
    worker = None
    try:
        worker = start_actuate_worker(worker_data, tmp)
        yield api, tmp
    finally:
        if worker is not None:
            worker.stop()
        stop_api(api.proc)


async def _answered(c: httpx.AsyncClient, r: httpx.Response, log) -> httpx.Response:
    """The final reply of a pin confirmation: follows a 202 "pending" (the worker may still be
    starting) by request id until the worker answered."""
    if r.status_code != 202:
        return r
    request_id = r.json()["request_id"]
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        g = await c.get(f"/api/ipmi-tests/{request_id}")
        if g.status_code != 202:
            return g
        await asyncio.sleep(1)
    raise AssertionError("no actuate worker answered:\n" + log.read_text()[-3000:])


async def test_the_worker_pins_the_guid_the_api_never_reads_the_bmc(api_and_worker, lab):
    api, tmp = api_and_worker
    log = tmp / "worker.log"
    headers = {"Authorization": f"Bearer {api.token}"}
    async with httpx.AsyncClient(base_url=api.url, headers=headers, timeout=90) as c:
        # Only the BMC's address goes through the API: no username, no password.
        r = await c.put(
            f"/api/hosts/{lab.host_a1}/settings", json={"ipmi": {"address": "127.0.0.1"}}
        )
        assert r.status_code == 200, r.text
        r = await c.get(f"/api/hosts/{lab.host_a1}/bmc-pin")
        assert r.status_code == 200 and r.json()["pinned"] is False, r.text

        # Not the board the operator expects: refused naming `expect`, nothing pinned. The first
        # request may find the worker still starting (202): it answers it once it runs.
        r = await c.post(f"/api/hosts/{lab.host_a1}/bmc-pin", json={"expect": "not-this-board"})
        r = await _answered(c, r, log)
        if r.status_code == 200:  # answered through GET /api/ipmi-tests/<id>
            result = r.json()
            assert result["kind"] == "bmc_pin_confirm" and result["refused"] == "expect", result
            assert result["success"] is False and lab.bmc.guid in result["error"]
        else:
            assert r.status_code == 422, r.text
            assert r.json()["fields"][0]["field"] == "expect", r.text
            assert lab.bmc.guid in r.json()["error"]
        r = await c.get(f"/api/hosts/{lab.host_a1}/bmc-pin")
        assert r.json()["pinned"] is False, r.text

        # The worker is up now: the button answers directly with the pin.
        r = await c.post(f"/api/hosts/{lab.host_a1}/bmc-pin", json={"expect": lab.bmc.guid})
        assert r.status_code == 200, r.text + log.read_text()[-3000:]
        pin = r.json()
        assert pin["pinned"] is True and pin["guid"] == lab.bmc.guid, pin
        assert pin["pinned_by"].startswith("operator ") and pin["seen_guid"] is None
        assert pin["address"] == "127.0.0.1"
        r = await c.get(f"/api/hosts/{lab.host_a1}/bmc-pin")
        assert r.json()["guid"] == lab.bmc.guid

        # The mismatch answered directly now the worker runs: 422 naming `expect`, pin kept.
        r = await c.post(f"/api/hosts/{lab.host_a1}/bmc-pin", json={"expect": "another-board"})
        assert r.status_code == 422, r.text
        assert r.json()["fields"][0]["field"] == "expect" and lab.bmc.guid in r.json()["error"]
        r = await c.get(f"/api/hosts/{lab.host_a1}/bmc-pin")
        assert r.json()["guid"] == lab.bmc.guid

        # A BMC the worker cannot read: 502, nothing pinned.
        r = await c.put(
            f"/api/hosts/{lab.host_a2}/settings", json={"ipmi": {"address": "127.0.0.1", "port": 9}}
        )
        assert r.status_code == 200, r.text
        r = await c.post(f"/api/hosts/{lab.host_a2}/bmc-pin", json={})
        assert r.status_code == 502, r.text
        assert "system GUID" in r.json()["error"]
        r = await c.get(f"/api/hosts/{lab.host_a2}/bmc-pin")
        assert r.json()["pinned"] is False

        audit = (await c.get("/api/audit")).json()
        confirmed = [a for a in audit if a["action"] == "confirm_bmc_pin"]
        assert len(confirmed) == 1 and confirmed[0]["target"] == f"host:{lab.host_a1}", audit

    t = api.topics
    asked_raw = await read_topic(api.settings, t.operator_actions)
    answers_raw = await read_topic(api.settings, t.ipmi_tests)
    pins_raw = await read_topic(api.settings, t.bmc_pins)
    # Two hosts' keys may land on two partitions: the API's order is its `at`.
    asked = sorted((OperatorAction.model_validate_json(v) for v in asked_raw), key=lambda a: a.at)
    by_id = {a.request_id: a for a in map(IpmiTestAnswer.model_validate_json, answers_raw)}
    pins = [BmcPin.model_validate_json(v) for v in pins_raw]
    assert [a.kind for a in asked] == ["bmc_pin_confirm"] * 4
    assert [a.expect for a in asked] == ["not-this-board", lab.bmc.guid, "another-board", None]
    assert {a.cluster_uuid for a in asked} == {lab.cluster_a}
    assert len(answers_raw) == 4 and set(by_id) == {a.request_id for a in asked}
    answers = [by_id[a.request_id] for a in asked]
    assert [(a.refused, a.pinned_guid) for a in answers] == [
        ("expect", None),
        (None, lab.bmc.guid),
        ("expect", None),
        ("bmc", None),
    ]
    # The worker wrote the one pin; the mismatches and the unreadable BMC wrote none.
    assert [(p.host_uuid, p.guid, p.address) for p in pins] == [
        (lab.host_a1, lab.bmc.guid, "127.0.0.1")
    ]
    assert pins[0].pinned_by.startswith("operator ")
    raw = b"".join(asked_raw + answers_raw + pins_raw)
    assert lab.bmc.password.encode() not in raw
    assert lab.bmc.password not in log.read_text()


async def test_the_api_pin_store_only_reads(api_and_worker, lab):
    """The API's pin store (read_only, as webui.lifecycle opens it) reads the pins the worker
    wrote and refuses to write one: its Kafka principal has no write grant on bmc-pins."""
    api, _tmp = api_and_worker
    store = BmcPinStore(api.settings, client_id="fencer-api-bmc-pins-test", read_only=True)
    await store.start()
    try:
        pins = store.all()
        with pytest.raises(PinStoreError, match="only reads"):
            await store.put(
                BmcPin(
                    host_uuid=lab.host_b1,
                    guid="forged",
                    driver="ipmi",
                    pinned_at=time.time(),
                    pinned_by="t",
                )
            )
    finally:
        await store.stop()
    assert lab.host_b1 not in pins
    raw = await read_topic(api.settings, api.topics.bmc_pins)
    assert all(BmcPin.model_validate_json(v).host_uuid != lab.host_b1 for v in raw)
