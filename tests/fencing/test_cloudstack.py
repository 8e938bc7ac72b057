"""fencer's one CloudStack client against the lab's management-server simulator: real request
signatures, every page, the TTL cache, one TLS convention, and errors that never carry the
signed URL or a key."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from pydantic import SecretStr

from fencing.cloudstack import (
    CloudStack,
    CloudStackApiError,
    CloudStackError,
    CloudStackUnreachable,
    host_from_api,
)
from fencing.records import HostRef
from fencing.settings import CloudStackSettings
from lab.cloudstack_sim import CloudStackSimulator, SimCloud
from tests.fencing.conftest import self_signed_cert

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def sim() -> AsyncIterator[CloudStackSimulator]:
    cloud = SimCloud()
    zone = cloud.add_zone()
    cluster = cloud.add_cluster(zone, "c1")
    cloud.add_host(cluster, "kvm01", "10.0.0.1")
    cloud.add_host(cluster, "kvm02", "10.0.0.2")
    async with CloudStackSimulator(cloud) as s:
        yield s


def settings_of(sim: CloudStackSimulator, **kw: object) -> CloudStackSettings:
    return CloudStackSettings(
        endpoint=sim.url, api_key=sim.api_key, secret_key=sim.secret_key, **kw
    )


def assert_no_secret(text: str, sim: CloudStackSimulator) -> None:
    low = text.lower()
    assert sim.api_key not in text and sim.secret_key not in text
    assert "apikey" not in low and "signature=" not in low and "command=" not in low
    assert "/client/api" not in text  # no URL at all, signed or not


async def test_list_reads_every_page_with_signed_requests(sim):
    cluster = next(iter(sim.cloud.clusters.values()))
    for i in range(510):
        sim.cloud.add_host(cluster, f"extra{i:03d}", f"10.9.{i // 250}.{i % 250}")
    async with CloudStack(settings_of(sim)) as cs:
        rows = await cs.list("listHosts", type="Routing")
    assert len(rows) == 512
    assert [p.get("page") for c, p in sim.cloud.calls if c == "listHosts"] == ["1", "2"]


def _moving_hosts(sim: CloudStackSimulator, times: int) -> list[str]:
    """After answering page 1 of listHosts (up to `times` times), remove a host of that page,
    as CloudStack does when a host is deleted while a client pages: every later row moves up
    one place, and the first row of page 2 slips onto page 1, already read."""
    answer = sim._cmd_listhosts
    removed: list[str] = []

    def moving(p: dict[str, str]) -> dict[str, object]:
        body = answer(p)
        if p.get("page") == "1" and len(removed) < times:
            uuid = next(iter(sim.cloud.hosts))
            del sim.cloud.hosts[uuid]
            removed.append(uuid)
        return body

    sim._cmd_listhosts = moving  # type: ignore[method-assign]
    return removed


async def test_rows_moved_between_pages_are_listed_again_whole(sim):
    """A naive reading (the `cs` client's own paging) returns 511 rows for 511 hosts, one of
    them the removed host and one live host missing: a host never polled, or a VM whose disk
    is never read. The list is read again, and is whole."""
    cluster = next(iter(sim.cloud.clusters.values()))
    for i in range(510):
        sim.cloud.add_host(cluster, f"extra{i:03d}", f"10.9.{i // 250}.{i % 250}")
    removed = _moving_hosts(sim, times=1)
    async with CloudStack(settings_of(sim)) as cs:
        rows = await cs.list("listHosts", type="Routing")
    assert len(removed) == 1
    assert sorted(r["id"] for r in rows) == sorted(sim.cloud.hosts)
    pages = [p.get("page") for c, p in sim.cloud.calls if c == "listHosts"]
    assert pages == ["1", "2", "1", "2"]


async def test_a_list_that_never_holds_still_is_an_error_naming_the_command(sim):
    cluster = next(iter(sim.cloud.clusters.values()))
    for i in range(510):
        sim.cloud.add_host(cluster, f"extra{i:03d}", f"10.9.{i // 250}.{i % 250}")
    _moving_hosts(sim, times=10)
    async with CloudStack(settings_of(sim)) as cs:
        with pytest.raises(CloudStackError) as err:
            await cs.list("listHosts", type="Routing")
    assert str(err.value).startswith("CloudStack listHosts: no whole list in 3 readings")
    assert "the count changed from" in str(err.value)
    assert_no_secret(str(err.value), sim)


async def test_host_from_api_maps_a_real_listhosts_row(sim):
    async with CloudStack(settings_of(sim)) as cs:
        rows = await cs.list("listHosts", name="kvm01")
    h = next(iter(h for h in sim.cloud.hosts.values() if h.name == "kvm01"))
    cluster = sim.cloud.clusters[h.cluster_uuid]
    assert host_from_api(rows[0]) == HostRef(
        host_uuid=h.uuid,
        host_name="kvm01",
        cluster_uuid=cluster.uuid,
        cluster_name="c1",
        zone_uuid=rows[0]["zoneid"],
        zone_name=rows[0]["zonename"],
        ip_address="10.0.0.1",
    )
    # Empty strings are absent, and a row without an id is an error naming it.
    assert host_from_api({"id": "x", "clusterid": "", "ipaddress": ""}) == HostRef(host_uuid="x")
    with pytest.raises(CloudStackError, match="a host row has no id"):
        host_from_api({"name": "kvm09"})


async def test_call_returns_the_job_without_following_it(sim):
    h = next(iter(sim.cloud.hosts.values()))
    sim.cloud.set_host_state(h.uuid, "Disconnected")
    async with CloudStack(settings_of(sim)) as cs:
        started = await cs.call("declareHostAsDegraded", id=h.uuid)
        assert set(started) == {"jobid"}
        for _ in range(100):
            job = await cs.call("queryAsyncJobResult", jobid=started["jobid"])
            if job["jobstatus"] != 0:
                break
            await asyncio.sleep(0.05)
    assert job["jobstatus"] == 1


async def test_a_wrong_secret_is_cloudstacks_401_without_the_url_or_a_key(sim):
    cs = CloudStack(settings_of(sim).model_copy(update={"secret_key": SecretStr("not-the-secret")}))
    with pytest.raises(CloudStackApiError) as err:
        await cs.list("listHosts")
    await cs.close()
    assert err.value.code == 401 and err.value.command == "listHosts"
    assert str(err.value) == (
        "CloudStack listHosts failed (401): "
        "unable to verify user credentials and/or request signature"
    )
    assert_no_secret(str(err.value), sim)
    assert err.value.__cause__ is None and err.value.__suppress_context__


async def test_a_cloudstack_error_answer_names_code_and_text(sim):
    async with CloudStack(settings_of(sim)) as cs:
        with pytest.raises(CloudStackApiError) as err:
            await cs.call("declareHostAsDegraded", id="no-such-host")
    assert err.value.code == 431 and "Invalid parameter id value=no-such-host" in err.value.text


async def test_an_unreachable_endpoint_names_host_and_port_only(sim):
    settings = settings_of(sim).model_copy(update={"endpoint": "http://127.0.0.1:9/client/api"})
    async with CloudStack(settings) as cs:
        with pytest.raises(CloudStackUnreachable) as err:
            await cs.list("listZones")
    assert str(err.value) == "CloudStack listZones: cannot reach 127.0.0.1:9 (ClientConnectorError)"
    assert_no_secret(str(err.value), sim)


async def test_a_silent_endpoint_times_out_with_the_setting_named(sim):
    release = asyncio.Event()  # set once the client gave up, so the server stops at once

    async def hang(request: web.Request) -> web.Response:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), 30)
        return web.Response(text="{}")

    app = web.Application()
    app.router.add_get("/client/api", hang)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    settings = settings_of(sim).model_copy(
        update={"endpoint": f"http://127.0.0.1:{port}/client/api", "timeout": 0.2}
    )
    try:
        async with CloudStack(settings) as cs:
            with pytest.raises(CloudStackUnreachable, match=r"cloudstack\.timeout") as err:
                await cs.list("listHosts")
    finally:
        release.set()
        await runner.cleanup()
    assert f"127.0.0.1:{port}" in str(err.value)
    assert_no_secret(str(err.value), sim)


async def test_the_ttl_cache_answers_repeats_and_keys_on_the_parameters(sim):
    now = [100.0]
    async with CloudStack(settings_of(sim), ttl=3.0, clock=lambda: now[0]) as cs:

        def asked() -> int:
            return sum(1 for c, _ in sim.cloud.calls if c == "listHosts")

        first = await cs.list("listHosts", type="Routing")
        again = await cs.list("listHosts", type="Routing")
        assert (asked(), again) == (1, first)
        await cs.list("listHosts", name="kvm01")  # other parameters: another entry
        assert asked() == 2
        sim.cloud.add_host(next(iter(sim.cloud.clusters.values())), "kvm03", "10.0.0.3")
        assert len(await cs.list("listHosts", type="Routing")) == 2  # still cached
        now[0] += 3.0
        assert len(await cs.list("listHosts", type="Routing")) == 3
        assert asked() == 3
    uncached = CloudStack(settings_of(sim))
    await uncached.list("listZones")
    await uncached.list("listZones")
    await uncached.close()
    assert sum(1 for c, _ in sim.cloud.calls if c == "listZones") == 2


@pytest.fixture
async def https_sim(sim: CloudStackSimulator, tmp_path: Path) -> AsyncIterator[str]:
    """The simulator's API behind a TLS listener with a self-signed certificate."""
    cert, key = self_signed_cert(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    app = web.Application()
    app.router.add_route("*", "/client/api", sim._handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"https://127.0.0.1:{port}/client/api"
    await runner.cleanup()


async def test_tls_is_verified_unless_the_file_says_verify_tls_false(sim, https_sim):
    checked = settings_of(sim).model_copy(update={"endpoint": https_sim})
    async with CloudStack(checked) as cs:
        with pytest.raises(CloudStackUnreachable, match=r"cloudstack\.verify_tls") as err:
            await cs.list("listZones")
    assert_no_secret(str(err.value), sim)
    unchecked = checked.model_copy(update={"verify_tls": False})
    async with CloudStack(unchecked) as cs:
        assert len(await cs.list("listZones")) == 1
