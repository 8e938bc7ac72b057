"""The "test BMC" button runs in an actuate worker, not in the API process (issue #15): the API
asks on the operator-actions topic, the worker reads the lab's pyghmi BMC with the settings in
force there and answers on fencer.ipmi-tests; the API waits a bounded time, else says
"pending" and answers by request id later. No secret in the request, the answer or a reply."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from fencing.records import IpmiTestAnswer, OperatorAction
from tests.webui.conftest import (
    api_settings,
    read_topic,
    start_actuate_worker,
    start_api,
    stop_api,
)

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def api_and_config(webui_broker, lab, secrets_key_file, tmp_path_factory) -> Iterator[tuple]:
    """An API process, and the settings file an actuate worker of the same fencer reads."""
    data = api_settings(webui_broker, lab, secrets_key_file)
    tmp = tmp_path_factory.mktemp("ipmi-test")
    proc = start_api(tmp, data)
    try:
        yield proc, data, tmp
    finally:
        stop_api(proc.proc)


async def test_the_api_asks_a_worker_and_answers_pending_then_the_bmcs_answer(api_and_config, lab):
    api, data, tmp = api_and_config
    headers = {"Authorization": f"Bearer {api.token}"}
    async with httpx.AsyncClient(base_url=api.url, headers=headers, timeout=90) as c:
        r = await c.put(
            f"/api/hosts/{lab.host_a1}/settings",
            json={
                "ipmi": {
                    "address": "127.0.0.1",
                    "username": lab.bmc.username,
                    "password": lab.bmc.password,
                }
            },
        )
        assert r.status_code == 200, r.text
        # No actuate worker runs: the API does not read the BMC itself; it says "pending".
        started = time.monotonic()
        r = await c.post(f"/api/hosts/{lab.host_a1}/ipmi-test")
        waited = time.monotonic() - started
        assert r.status_code == 202, r.text
        pending = r.json()
        assert pending["status"] == "pending" and pending["host_uuid"] == lab.host_a1
        assert 10 <= waited < 45  # bounded: call_timeout + 10 s
        request_id = pending["request_id"]
        r = await c.get(f"/api/ipmi-tests/{request_id}")
        assert r.status_code == 202 and r.json()["request_id"] == request_id

        worker = start_actuate_worker(data, tmp)
        try:
            # The worker picks up the request written before it started and answers it.
            deadline = time.monotonic() + 150
            while True:
                r = await c.get(f"/api/ipmi-tests/{request_id}")
                if r.status_code == 200 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(1)
            assert r.status_code == 200, (tmp / "worker.log").read_text()[-3000:]
            result = r.json()
            assert result["success"] is True, result
            assert result["power_state"] == "on" and result["driver"] == "ipmi"
            assert result["request_id"] == request_id and result["host_uuid"] == lab.host_a1

            # With the worker up, the button answers directly; a wrong password fails cleanly.
            await c.put(
                f"/api/hosts/{lab.host_a1}/settings",
                json={"ipmi": {"address": "127.0.0.1", "password": "wrong-pw-0123"}},
            )
            r = await c.post(f"/api/hosts/{lab.host_a1}/ipmi-test")
            assert r.status_code == 200, r.text
            assert r.json()["success"] is False and r.json()["error"]
            assert lab.bmc.password not in r.text and "wrong-pw-0123" not in r.text
        finally:
            worker.stop()

    t = api.topics
    asked_raw = await read_topic(api.settings, t.operator_actions)
    answers_raw = await read_topic(api.settings, t.ipmi_tests)
    asked = [OperatorAction.model_validate_json(v) for v in asked_raw]
    answers = [IpmiTestAnswer.model_validate_json(v) for v in answers_raw]
    assert [a.kind for a in asked] == ["ipmi_test", "ipmi_test"]
    assert asked[0].request_id == request_id and asked[0].cluster_uuid == lab.cluster_a
    assert {a.request_id for a in answers} == {a.request_id for a in asked}
    # The API answers with the worker's record itself (one model: IpmiTestAnswer).
    (first,) = [a for a in answers if a.request_id == request_id]
    assert IpmiTestAnswer.model_validate(result) == first
    raw = b"".join(asked_raw + answers_raw)
    assert lab.bmc.password.encode() not in raw and b"wrong-pw-0123" not in raw
    log = (tmp / "worker.log").read_text()
    assert lab.bmc.password not in log and "wrong-pw-0123" not in log
