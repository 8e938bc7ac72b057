"""The CloudStack simulator: signatures as ApiServer.verifyRequest checks them, JSON shapes,
async jobs and the event-bus records."""

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from cs import AIOCloudStack, CloudStackApiException

from lab.cloudstack_sim import CloudStackSimulator, SimCloud, compute_signature

pytestmark = pytest.mark.timeout(20)


def test_signature_vector_computed_by_hand():
    params = {"command": "listHosts", "apiKey": "AbC-1", "response": "json", "name": "a b*c~é/+"}
    # Sorted names (apiKey < command < name < response, case-sensitive), URLEncoder values
    # ('~' -> %7E, ' ' -> + -> %20, '*' kept, é -> %C3%A9), then the whole string lower-cased.
    unsigned = "apikey=abc-1&command=listhosts&name=a%20b*c%7e%c3%a9%2f%2b&response=json"
    expected = base64.b64encode(
        hmac.new(b"s3cr3t", unsigned.encode(), hashlib.sha1).digest()
    ).decode()
    assert compute_signature(params, "s3cr3t") == expected


@pytest.fixture
async def sim():
    cloud = SimCloud()
    z = cloud.add_zone()
    c = cloud.add_cluster(z)
    cloud.add_host(c, "kvm01", "10.0.0.11")
    cloud.add_host(c, "kvm02", "10.0.0.12")
    async with CloudStackSimulator(cloud, api_key="KEY", secret_key="s3cr3t") as s:
        yield s


async def raw(sim, params: dict[str, str], secret: str = "s3cr3t"):
    params = {**params, "signature": compute_signature(params, secret)}
    async with aiohttp.ClientSession() as http, http.get(sim.url, params=params) as r:
        return r.status, await r.json()


async def test_hand_signed_request_is_answered_in_cloudstack_shape(sim):
    status, body = await raw(
        sim, {"command": "listHosts", "apiKey": "KEY", "response": "json", "name": "kvm01"}
    )
    assert status == 200 and body["listhostsresponse"]["count"] == 1
    assert body["listhostsresponse"]["host"][0]["ipaddress"] == "10.0.0.11"
    status, body = await raw(
        sim, {"command": "listHosts", "apiKey": "KEY", "response": "json", "name": "nope"}
    )
    assert (status, body) == (200, {"listhostsresponse": {}})


async def test_bad_secret_and_expired_requests_get_the_401_error(sim):
    status, body = await raw(
        sim, {"command": "listHosts", "apiKey": "KEY", "response": "json"}, "wrong"
    )
    assert status == 401
    assert body == {
        "listhostsresponse": {
            "uuidList": [],
            "errorcode": 401,
            "errortext": "unable to verify user credentials and/or request signature",
        }
    }
    past = (datetime.now(UTC) - timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%S%z")
    base = {"command": "listZones", "apiKey": "KEY", "response": "json", "signatureVersion": "3"}
    assert (await raw(sim, {**base, "expires": past}))[0] == 401
    assert (await raw(sim, base))[0] == 401  # version 3 without expires
    future = (datetime.now(UTC) + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%S%z")
    assert (await raw(sim, {**base, "expires": future}))[0] == 200


async def test_pages_follow_page_and_pagesize(sim):
    p = {"command": "listHosts", "apiKey": "KEY", "response": "json", "pagesize": "1"}
    one = (await raw(sim, {**p, "page": "1"}))[1]["listhostsresponse"]
    two = (await raw(sim, {**p, "page": "2"}))[1]["listhostsresponse"]
    assert one["count"] == two["count"] == 2
    assert [one["host"][0]["name"], two["host"][0]["name"]] == ["kvm01", "kvm02"]


async def test_declare_degraded_needs_a_disconnected_host_and_moves_its_vms(sim):
    cloud = sim.cloud
    h1, h2 = list(cloud.hosts.values())
    vm = cloud.add_vm(h1, "web01")
    async with AIOCloudStack(
        sim.url, "KEY", "s3cr3t", fetch_result=True, poll_interval=0.02
    ) as api:
        with pytest.raises(CloudStackApiException) as err:
            await api.declareHostAsDegraded(id=h1.uuid)
        assert err.value.error["errorcode"] == 431 and "Up status" in err.value.error["errortext"]
        cloud.set_host_state(h1.uuid, "Disconnected")
        done = await api.declareHostAsDegraded(id=h1.uuid)
    assert done["host"]["resourcestate"] == "Degraded"
    assert (vm.host_uuid, vm.state) == (h2.uuid, "Running")
    keys = [k for k, _ in cloud.events]
    values = [json.loads(v) for _, v in cloud.events]
    assert keys[0] is None and values[0]["subject"].startswith("Host disconnected, name: kvm01")
    vm_moves = [
        (v["old-state"], v["new-state"], v["status"][:4])
        for k, v in zip(keys, values)
        if k == vm.uuid
    ]
    assert vm_moves == [
        ("Running", "Stopped", "preS"),
        ("Running", "Stopped", "post"),
        ("Stopped", "Starting", "preS"),
        ("Stopped", "Starting", "post"),
        ("Starting", "Running", "preS"),
        ("Starting", "Running", "post"),
    ]


async def test_maintenance_jobs_publish_action_events_and_can_be_made_to_fail(sim):
    cloud = sim.cloud
    h1 = next(iter(cloud.hosts.values()))
    async with AIOCloudStack(
        sim.url, "KEY", "s3cr3t", fetch_result=True, poll_interval=0.02
    ) as api:
        await api.prepareHostForMaintenance(id=h1.uuid)
        assert h1.resourcestate == "Maintenance"
        cloud.fail_jobs["cancelHostMaintenance"] = "simulated failure"
        with pytest.raises(CloudStackApiException) as err:
            await api.cancelHostMaintenance(id=h1.uuid)
        assert err.value.error == {"errorcode": 530, "errortext": "simulated failure"}
        cloud.fail_jobs.clear()
        job = await api.cancelHostMaintenance(id=h1.uuid, fetch_result=False)
        status = await api.queryAsyncJobResult(jobid=job["jobid"], fetch_result=False)
        assert status["jobstatus"] in (0, 1)
    maint = [json.loads(v) for k, v in cloud.events if k == h1.uuid]
    assert [(m["event"], m["status"]) for m in maint][:3] == [
        ("MAINT.PREPARE", "Scheduled"),
        ("MAINT.PREPARE", "Started"),
        ("MAINT.PREPARE", "Completed"),
    ]
    assert maint[2]["description"] == f"completed maintenance for host {h1.numeric_id}"
    assert list(maint[2]) == [
        "eventDateTime",
        "entityuuid",
        "description",
        "Host",
        "event",
        "user",
        "account",
        "entity",
        "status",
    ]
