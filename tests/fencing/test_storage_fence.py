"""The storage rung of the fencing ladder against a real single-node Ceph, the lab's pyghmi BMC
and the CloudStack simulator: `before` blocklists the host's storage address and then powers it
off; `fallback` with an unreachable BMC blocklists, verifies and restarts the VMs of an RBD-only
host (never those of a host with an NFS disk); a blocklist that does not verify (a watcher of the
host's image remains) restarts nothing; only an operator lifts it (`fencer rbd lift`)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

import pytest
from pydantic import SecretStr

from fencing.actuator import Actuator
from fencing.blocklist import Blocklister
from fencing.drivers import build_driver
from fencing.drivers.base import PowerDriver
from fencing.engine import Engine
from fencing.events import FenceAction, NoticeKind
from fencing.records import EvidenceSummary, FenceDecision, HostRef, Notice
from fencing.settings import (
    ActuatorSettings,
    CloudStackSettings,
    FencerSettings,
    HostSettings,
    IpmiOverrides,
    IpmiSettings,
    StorageFence,
)
from fencing.storage_fence import BLOCKLIST_MARGIN, StorageFencer, blocklist_expiry, lift_host
from lab.bmc import BmcSimulator
from lab.ceph import RbdClient
from lab.cloudstack_sim import CloudStackSimulator, Host, SimCloud
from probes.host_disks import host_disks, management_ip
from streams.cli import build_parser
from tests.conftest import Ceph

from .conftest import BMC_PASSWORD

pytestmark = pytest.mark.timeout(120)

HOST_IP = "127.0.2.51"  # the suspect's storage address: its VMs' librbd clients bind to it
DEADLINE = 3.0  # the BMC retry deadline (actuator.fence_deadline)


@dataclass
class RbdCloud:
    sim: CloudStackSimulator
    cloud: SimCloud
    host: Host
    cluster_uuid: str
    images: list[str]  # pool/image of the suspect's RBD disks
    vms: list[str]


@pytest.fixture
def bmc() -> Iterator[BmcSimulator]:
    with BmcSimulator("admin", BMC_PASSWORD) as sim:
        yield sim


async def _cloud(ceph: Ceph, nfs_disk: bool) -> AsyncIterator[RbdCloud]:
    sc = SimCloud()
    zone = sc.add_zone()
    cluster = sc.add_cluster(zone)
    hv1 = sc.add_host(cluster, "hv1", "10.0.0.11", state="Disconnected")
    sc.add_host(cluster, "hv2", "10.0.0.12")
    rbd = sc.add_pool(cluster, "ceph1", "127.0.0.1", path="rbd", type="RBD")
    images, vms = [], []
    for i in range(2):
        image = ceph.image("sfence")
        vm = sc.add_vm(hv1, f"rbd-vm{i}")
        sc.add_volume(vm, rbd, path=image)
        images.append(f"rbd/{image}")
        vms.append(vm.uuid)
    if nfs_disk:
        vm = sc.add_vm(hv1, "nfs-vm")
        sc.add_volume(vm, sc.add_pool(cluster, "nfs1"))
        vms.append(vm.uuid)
    sim = CloudStackSimulator(sc)
    await sim.start()
    try:
        yield RbdCloud(sim, sc, hv1, cluster.uuid, images, vms)
    finally:
        await sim.stop()


@pytest.fixture
async def rbd_only(ceph_clean: Ceph) -> AsyncIterator[RbdCloud]:
    """hv1 (Disconnected) runs two VMs whose disks are RBD images."""
    async for c in _cloud(ceph_clean, nfs_disk=False):
        yield c


@pytest.fixture
async def with_nfs(ceph_clean: Ceph) -> AsyncIterator[RbdCloud]:
    """hv1 runs two VMs on RBD and one on NFS."""
    async for c in _cloud(ceph_clean, nfs_disk=True):
        yield c


def settings_for(
    rc: RbdCloud,
    ceph: Ceph,
    port: int,
    mode: StorageFence,
    storage_ip: str = HOST_IP,
) -> FencerSettings:
    return FencerSettings(
        cloudstack=CloudStackSettings(
            endpoint=rc.sim.url,
            api_key=SecretStr(rc.sim.api_key),
            secret_key=SecretStr(rc.sim.secret_key),
            job_timeout=5,
        ),
        hosts={
            rc.host.uuid: HostSettings(
                ipmi=IpmiOverrides(
                    address="127.0.0.1",
                    port=port,
                    username="admin",
                    password=SecretStr(BMC_PASSWORD),
                    action=FenceAction.STOP,
                    storage_fence=mode,
                ),
                storage_ip=storage_ip,
            )
        },
        # A short blocklist_expire: the fence's expiry must still outlive the BMC retries.
        rbd=ceph.rbd_settings(blocklist_expire=10.0),
        actuator=ActuatorSettings(
            power_timeout=3, poll_interval=0.05, retry_backoff=0.1, fence_deadline=DEADLINE
        ),
    )


def decision(rc: RbdCloud) -> FenceDecision:
    return FenceDecision(
        decision_id=str(uuid.uuid4()),
        host=HostRef(host_uuid=rc.host.uuid, cluster_uuid=rc.cluster_uuid, host_name="hv1"),
        episode=1,
        action=FenceAction.STOP,
        approved=True,
        evidence=EvidenceSummary(suspect_since=time.time() - 300, stale_checks=3),
        decided_at=time.time(),
    )


def actuator(
    settings: FencerSettings, on_driver: Any = None, **kw: Any
) -> tuple[Actuator, list[Notice]]:
    notices: list[Notice] = []

    async def sink(n: Notice) -> None:
        notices.append(n)

    def driver(ipmi: IpmiSettings, address: str | None, _timeout: float) -> PowerDriver:
        if on_driver is not None:
            on_driver()
        return build_driver(ipmi, address, 1.0)  # an unanswered BMC costs 1 s per attempt

    kw.setdefault("storage_fencer", StorageFencer(settings, disks=partial(host_disks, settings)))
    act = Actuator(
        settings,
        engine=Engine(power_timeout=3, poll_interval=0.05, retry_backoff=0.1),
        driver_factory=driver,
        job_poll_interval=0.05,
        notify=sink,
        **kw,
    )
    return act, notices


def degraded_calls(rc: RbdCloud) -> list[str]:
    return [c for c, _ in rc.cloud.calls if c == "declareHostAsDegraded"]


def clients(stack: ExitStack, ceph: Ceph, rc: RbdCloud, ip: str = HOST_IP) -> list[RbdClient]:
    """The suspect's running VMs: one librbd client per RBD disk, bound to `ip`."""
    return [stack.enter_context(ceph.cluster.client(spec, ip)) for spec in rc.images]


async def entries(ceph: Ceph) -> dict[str, float]:
    """Blocklist entry -> seconds until it expires."""
    listed = await Blocklister(ceph_settings(ceph)).listed()
    return {e["addr"]: datetime.fromisoformat(e["until"]).timestamp() - time.time() for e in listed}


def ceph_settings(ceph: Ceph) -> Any:
    from fencing.settings import RbdSettings

    return RbdSettings(**ceph.rbd_settings())


async def test_before_blocklists_the_host_then_powers_it_off(
    rbd_only: RbdCloud,
    ceph_clean: Ceph,
    bmc: BmcSimulator,
) -> None:
    rc, ceph = rbd_only, ceph_clean
    settings = settings_for(rc, ceph, bmc.port, StorageFence.BEFORE)
    with ExitStack() as stack:
        vms = clients(stack, ceph, rc)
        assert all(vm.write() == "ok" for vm in vms)
        # Whether the host could still write at the moment the BMC driver was built.
        at_bmc: list[str] = []
        act, notices = actuator(settings, on_driver=lambda: at_bmc.append(vms[0].write()))
        out = await act.handle(decision(rc))
        assert out is not None
        assert at_bmc == ["err 108"]  # cut off from Ceph before the BMC was touched
        assert (out.success, out.verified) == (True, True)
        assert bmc.power == "off" and bmc.count("power_off") == 1
        assert out.error and f"blocklist {HOST_IP}:0/0 verified" in out.error
        assert f"fencer rbd lift {rc.host.uuid}" in out.error
        assert degraded_calls(rc) == ["declareHostAsDegraded"]
        assert all(ceph.cluster.watchers(spec) == [] for spec in rc.images)
    listed = await entries(ceph)
    # Its expiry outlives the BMC retry deadline by the margin (blocklist_expire is only 10 s).
    assert blocklist_expiry(settings) == DEADLINE + BLOCKLIST_MARGIN
    assert (
        DEADLINE + BLOCKLIST_MARGIN - 120 < listed[f"{HOST_IP}:0/0"] <= DEADLINE + BLOCKLIST_MARGIN
    )
    note = [n for n in notices if n.notice_id.endswith("/blocklist")]
    assert len(note) == 1 and note[0].kind is NoticeKind.FENCE_SUCCEEDED
    assert note[0].reason and f"ceph osd blocklist rm {HOST_IP}:0/0" in note[0].reason
    await act.settle()


async def test_fallback_with_an_unreachable_bmc_restarts_an_rbd_only_host_on_the_blocklist(
    rbd_only: RbdCloud,
    ceph_clean: Ceph,
    bmc: BmcSimulator,
) -> None:
    rc, ceph = rbd_only, ceph_clean
    settings = settings_for(rc, ceph, bmc.port, StorageFence.FALLBACK)
    bmc.pause()  # the BMC does not answer at all
    with ExitStack() as stack:
        vms = clients(stack, ceph, rc)
        at_bmc: list[str] = []
        act, notices = actuator(settings, on_driver=lambda: at_bmc.append(vms[0].write()))
        started = time.monotonic()
        out = await act.handle(decision(rc))
        took = time.monotonic() - started
        assert out is not None
        assert at_bmc == ["ok"]  # fallback: nothing blocklisted while the BMC was being tried
        assert took >= DEADLINE  # the BMC was retried until the engine's deadline
        assert (out.success, out.verified) == (True, False)
        assert out.error and "stop not verified" in out.error
        assert f"storage-fenced instead: blocklist {HOST_IP}:0/0 verified" in out.error
        assert out.cloudstack_call == "declareHostAsDegraded" and out.cloudstack_result
        assert degraded_calls(rc) == ["declareHostAsDegraded"]
        assert [vm.write() for vm in vms] == ["err 108", "err 108"]  # the host cannot write
        assert all(ceph.cluster.watchers(spec) == [] for spec in rc.images)
        await act.settle()
        for vm_uuid in rc.vms:
            assert rc.cloud.vms[vm_uuid].host_uuid != rc.host.uuid
            assert rc.cloud.vms[vm_uuid].state == "Running"
    assert bmc.count("power_off") == 0
    note = [n for n in notices if n.notice_id.endswith("/blocklist")]
    assert len(note) == 1 and note[0].kind is NoticeKind.FENCE_SUCCEEDED
    assert note[0].reason and f"fencer rbd lift {rc.host.uuid}" in note[0].reason
    assert note[0].result and note[0].result.startswith("declareHostAsDegraded")
    # Never lifted silently: the entry stays until an operator lifts it.
    assert f"{HOST_IP}:0/0" in await entries(ceph)
    lookup = partial(management_ip, settings)
    assert await lift_host(settings, rc.host.uuid, management_ip=lookup) == f"{HOST_IP}:0/0"
    assert f"{HOST_IP}:0/0" not in await entries(ceph)
    with ceph.cluster.client(rc.images[0], HOST_IP) as again:
        assert again.write() == "ok"


async def test_fallback_never_restarts_a_host_with_an_nfs_disk(
    with_nfs: RbdCloud,
    ceph_clean: Ceph,
    bmc: BmcSimulator,
) -> None:
    rc, ceph = with_nfs, ceph_clean
    settings = settings_for(rc, ceph, bmc.port, StorageFence.FALLBACK)
    bmc.pause()
    with ExitStack() as stack:
        vms = clients(stack, ceph, rc)
        act, notices = actuator(settings)
        out = await act.handle(decision(rc))
        assert out is not None
        assert (out.success, out.verified) == (False, False)
        assert out.error and f"blocklist {HOST_IP}:0/0 verified" in out.error
        assert "1 NFS disk(s)" in out.error and "not restarted" in out.error
        assert f"fencer rbd lift {rc.host.uuid}" in out.error
        assert degraded_calls(rc) == []
        assert out.cloudstack_call is None
        assert vms[0].write() == "err 108"  # the RBD disks are fenced all the same
    assert f"{HOST_IP}:0/0" in await entries(ceph)  # and the blocklist stays
    note = [n for n in notices if n.notice_id.endswith("/blocklist")]
    assert len(note) == 1 and note[0].kind is NoticeKind.FENCE_FAILED
    assert note[0].result and "NFS" in note[0].result


async def test_a_blocklist_that_does_not_verify_restarts_nothing(
    rbd_only: RbdCloud,
    ceph_clean: Ceph,
    bmc: BmcSimulator,
) -> None:
    """A wrong storage_ip: the entry is listed, but the host's VMs still watch their images
    from their real address, so the blocklist is not verified and no VM is restarted."""
    rc, ceph = rbd_only, ceph_clean
    settings = settings_for(rc, ceph, bmc.port, StorageFence.FALLBACK, storage_ip="127.0.2.59")
    bmc.pause()
    with ExitStack() as stack:
        vms = clients(stack, ceph, rc)
        act, notices = actuator(
            settings,
            storage_fencer=StorageFencer(
                settings, verify_timeout=2, disks=partial(host_disks, settings)
            ),
        )
        out = await act.handle(decision(rc))
        assert out is not None
        assert (out.success, out.verified) == (False, False)
        assert out.error and "blocklist 127.0.2.59:0/0 added but not verified" in out.error
        assert f"{rc.images[0]} {HOST_IP}:0/" in out.error and "storage_ip" in out.error
        assert degraded_calls(rc) == []
        assert vms[0].write() == "ok"  # indeed: the host still writes
    note = [n for n in notices if n.notice_id.endswith("/blocklist")]
    assert len(note) == 1 and note[0].kind is NoticeKind.FENCE_FAILED


def test_the_cli_has_rbd_lift() -> None:
    args = build_parser().parse_args(["rbd", "lift", "host-1", "--address", "10.0.0.5"])
    assert (args.host, args.address) == ("host-1", "10.0.0.5")
    assert callable(args.func)


def test_storage_fence_is_a_cluster_setting_a_host_overrides() -> None:
    s = FencerSettings(
        clusters={"c1": {"ipmi": {"storage_fence": "fallback"}}},
        hosts={"h2": {"ipmi": {"storage_fence": "none"}}},
    )
    assert s.effective_ipmi("h1", "c1").values.storage_fence is StorageFence.FALLBACK
    assert s.effective_ipmi("h2", "c1").values.storage_fence is StorageFence.NONE
    assert s.effective_ipmi("h3", None).values.storage_fence is StorageFence.NONE
    with pytest.raises(ValueError, match="storage_fence"):
        FencerSettings(clusters={"c1": {"ipmi": {"storage_fence": "always"}}})


async def test_before_with_an_unreachable_bmc_restarts_an_rbd_only_host_on_the_blocklist(
    rbd_only: RbdCloud,
    ceph_clean: Ceph,
    bmc: BmcSimulator,
) -> None:
    """`before`: blocklisted and verified first; the BMC then fails: the verified blocklist of an
    RBD-only host is what lets CloudStack restart its VMs (once)."""
    rc, ceph = rbd_only, ceph_clean
    settings = settings_for(rc, ceph, bmc.port, StorageFence.BEFORE)
    bmc.pause()
    with ExitStack() as stack:
        vms = clients(stack, ceph, rc)
        act, notices = actuator(settings)
        out = await act.handle(decision(rc))
        assert out is not None
        assert (out.success, out.verified) == (True, False)
        assert (
            out.error and f"storage-fenced instead: blocklist {HOST_IP}:0/0 verified" in out.error
        )
        assert degraded_calls(rc) == ["declareHostAsDegraded"]
        assert vms[1].write() == "err 108"
        await act.settle()
    assert bmc.count("power_off") == 0
    assert [n.kind for n in notices if n.notice_id.endswith("/blocklist")] == [
        NoticeKind.FENCE_SUCCEEDED
    ]
