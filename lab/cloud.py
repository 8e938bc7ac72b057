"""The whole simulated cloud a scenario runs against, started and stopped as one.

Rule: only CloudStack is simulated; everything fencer touches is a real peer on loopback. The
management server is `CloudStackSimulator` (real HTTP API, signatures checked) over a `SimCloud`
whose event-bus records are produced to Kafka's `cloudstack` topic exactly as CloudStack's
KafkaEventBus would (key = resource uuid or none, value = the description JSON); the hypervisors
are `KvmLab` hosts (real SSH, real files whose mtimes move while the host lives); each host has
its own pyghmi BMC whose power-off really stops the host; mail and traps land in in-process
receivers. Every `LabCloud` uses its own topic prefix and consumer group, so several clouds can
share one broker without seeing each other's records.

With `ceph` (a running lab.ceph.CephCluster), the RBD pool is real: CloudStack lists it as
type RBD (ipaddress = the monitor, path = the Ceph pool, each volume's path = its image), every
volume on it has an image, and each Running VM's qemu is a librbd client with the image open,
bound to its host's address (lab.ceph.LabRbd): a crash or a power-off SIGKILLs the host's
clients (their watches linger `osd client watch timeout`, then expire), an agent that dies
leaves them (qemu lives on), a VM CloudStack restarts elsewhere opens its image from the new
host. The workers get an `rbd` section with the cluster's probe key and blocklist key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from pydantic import SecretStr

from fencing.events import FenceAction
from fencing.settings import (
    ActuatorSettings,
    CloudStackSettings,
    Driver,
    EmailSettings,
    FencerSettings,
    HostSettings,
    IpmiOverrides,
    IpmiSettings,
    PolicySettings,
    RbdSettings,
    SigningSettings,
    SnmpReceiver,
    SnmpSettings,
    SshSettings,
    StorageFence,
    TopicNames,
)
from fencing.signing import write_keys_file
from lab.bmc import BmcSimulator
from lab.ceph import CephCluster, LabRbd
from lab.cloudstack_sim import CloudStackSimulator, SimCloud, StoragePool
from lab.kvm_hosts import KvmLab, LabKvmHost
from lab.receivers import MailReceiver, TrapReceiver
from streams.broker import EmbeddedBroker
from streams.kafka import aiokafka_kwargs, ensure_topics, prepare_kafka

log = logging.getLogger("fencer.lab")

BMC_USER = "admin"


class LabCloud:
    """A zone, one KVM cluster of `hosts` lab hosts with BMCs, NFS pools, VMs, receivers.

    `async with LabCloud(broker) as lab:` then `lab.settings(...)` for the workers and the fault
    helpers (`agent_dies`, `agent_recovers`, `crash`, `storage_outage`, `neighbours_unreachable`,
    `recovers`, `vms_go_idle`, `set_filer_offset`, `vms_restarted_elsewhere`).

    Options: `idle_hosts` (those hosts' VMs never write their disks), `filer_offset` (seconds
    the NFS filer's clock is ahead, negative behind: every mtime a neighbour stats is on it,
    heartbeat contents stay on the hosts' clock), `rbd_hosts` (each of those hosts' first VM
    has its ROOT volume on a Ceph RBD pool: without `ceph` no probe can read it),
    `rbd_only_hosts` (every VM of those hosts is on the RBD pool: no NFS disk; its agent still
    heartbeats on the cluster's NFS pools, as CloudStack's KVMHAMonitor does on every NFS pool),
    `ceph` (the real cluster behind the RBD pool, see the module docstring), `storage_fence`
    (host name -> none|before|fallback: the Ceph blocklist rung of that host's fencing ladder),
    `cloudstack_fsm` (default on: CloudStack's host agent state machine, times scaled so one
    ping.interval is one check interval: hosts move Up -> Disconnected/Alert/Down by themselves,
    a crash is noticed at the ping timeout, an agent back is Connecting first; see
    lab.cloudstack_sim), `investigator` (default off: CloudStack's KVM investigator finds a host
    whose NFS heartbeat went stale Down and restarts its VMs itself, without a fence).
    """

    def __init__(
        self,
        broker: EmbeddedBroker | None = None,
        *,
        hosts: int = 10,
        vms_per_host: int = 2,
        hosts_without_vms: tuple[str, ...] = (),
        idle_hosts: tuple[str, ...] = (),
        rbd_hosts: tuple[str, ...] = (),
        rbd_only_hosts: tuple[str, ...] = (),
        ceph: CephCluster | None = None,
        storage_fence: dict[str, str] | None = None,
        filer_offset: float = 0.0,
        pools: int = 1,
        interval: float = 1.0,
        root: Path | None = None,
        name: str | None = None,
        cloudstack_fsm: bool = True,
        investigator: bool = False,
    ) -> None:
        self.broker = broker
        self._own_broker = broker is None
        self.host_count = hosts
        self.vms_per_host = vms_per_host
        self.hosts_without_vms = set(hosts_without_vms)
        self.idle_hosts = set(idle_hosts)
        self.rbd_hosts = set(rbd_hosts)
        self.rbd_only_hosts = set(rbd_only_hosts)
        self.ceph = ceph
        self.storage_fence = dict(storage_fence or {})
        self.rbd: LabRbd | None = None
        # LabRbd's clients die with the thread that started them: one thread for all of them.
        self._rbd_thread: ThreadPoolExecutor | None = None
        self._rbd_sync: asyncio.Task[None] | None = None
        self.pool_count = pools
        self.interval = interval
        self._own_root = root is None
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="fencer-labcloud-"))
        self.name = name or uuid.uuid4().hex[:8]
        self.topics = TopicNames(
            **{f: f"lab{self.name}.{n}" for f, n in TopicNames().model_dump().items()}
        )
        self.cloud = SimCloud(on_event=self._on_event)
        self._monitor: asyncio.Task[None] | None = None
        self.zone = self.cloud.add_zone("zone1")
        self.cluster = self.cloud.add_cluster(self.zone, "cluster1")
        self.pools: list[StoragePool] = []
        self.rbd_pool: StoragePool | None = None
        self.kvm = KvmLab(self.cloud, self.root / "kvm", interval=interval)
        self.kvm.set_filer_offset(filer_offset)
        self._configure_cloudstack(cloudstack_fsm, investigator)
        self.sim: CloudStackSimulator | None = None
        self.bmcs: dict[str, BmcSimulator] = {}  # host name -> BMC
        self.bmc_passwords: dict[str, str] = {}
        self.power_offs: list[tuple[float, str]] = []  # (time, host name) seen on a BMC
        self.mail = MailReceiver()
        self.traps = TrapReceiver()
        self.forwarded: list[tuple[float, str | None, str]] = []
        self.home: dict[str, str] = {}  # vm uuid -> the host name it first ran on
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[tuple[str | None, str]] = asyncio.Queue()
        self._producer: AIOKafkaProducer | None = None
        self._forwarder: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._base: FencerSettings | None = None
        self._build()

    # -- building -------------------------------------------------------------------------------

    def _build(self) -> None:
        for i in range(1, self.pool_count + 1):
            self.pools.append(
                self.cloud.add_pool(self.cluster, f"nfs{i}", "10.0.0.5", path=f"/export/pri{i}")
            )
        if self.rbd_hosts or self.rbd_only_hosts:
            # CloudStack lists an RBD pool with its monitor as ipaddress and the Ceph pool name
            # as path; KVM hosts mount nothing for it and KVMHAMonitor writes no heartbeat there.
            self.rbd_pool = self.cloud.add_pool(
                self.cluster,
                "rbd1",
                "127.0.0.1" if self.ceph is not None else "10.0.0.7",
                path="rbd",
                type="RBD",
            )
            if self.ceph is not None:
                self.rbd = LabRbd(self.ceph, self.cloud, self.kvm, self.rbd_pool)
        for i in range(1, self.host_count + 1):
            h = self.kvm.add_host(self.cluster, f"kvm{i:02d}")
            h.idle = h.name in self.idle_hosts
            if h.name in self.hosts_without_vms:
                continue
            for j in range(1, self.vms_per_host + 1):
                vm = self.cloud.add_vm(h.cloud_host, f"vm-{h.name}-{j}")
                self.home[vm.uuid] = h.name
                on_rbd = h.name in self.rbd_only_hosts or (j == 1 and h.name in self.rbd_hosts)
                if on_rbd and self.rbd_pool is not None:
                    self.cloud.add_volume(vm, self.rbd_pool)
                else:
                    self.cloud.add_volume(vm, self.pools[(i + j) % len(self.pools)])

    def _configure_cloudstack(self, fsm: bool, investigator: bool) -> None:
        """CloudStack's host state machine, its times scaled so that one CloudStack minute
        (ping.interval) is one lab check interval (60 s, fencer's default check_interval)."""
        minute = self.default_check_interval(self.interval)
        c = self.cloud
        c.host_fsm = fsm
        c.ping_interval = minute  # ping.interval 60 s
        c.ping_timeout = 2.5  # x ping.interval: 150 s behind on ping
        c.alert_wait = 30 * minute  # alert.wait 1800 s
        c.connect_delay = 0.0  # Up at the monitor's next pass
        c.investigator = investigator
        c.hb_timeout = 2 * minute  # a heartbeat older than 120 s is "DEAD" to a neighbour
        c.vm_ha_delay = minute / 2  # the HA workers restart the VMs about 30 s later
        c.heartbeat_age = self.kvm.heartbeat_age
        c.vm_ha = self._cloudstack_vm_ha

    def _cloudstack_vm_ha(self, host_uuid: str) -> None:
        """CloudStack's own VM-HA for a host it found Down: the VMs restart elsewhere, and a host
        that still runs keeps running them (split brain, #2890)."""
        h = self.kvm.hosts[host_uuid]
        moved = h.vms_restarted_elsewhere()
        log.info("lab: CloudStack's VM-HA restarted %d VM(s) of %s elsewhere", len(moved), h.name)

    async def _cloudstack_monitor(self) -> None:
        """AgentManagerImpl's MonitorTask: one pass every ping.interval."""
        while True:
            await asyncio.sleep(self.cloud.ping_interval)
            try:
                self.cloud.monitor()
            except Exception as exc:  # a lab that stops moving hosts on must say so
                log.warning("lab: CloudStack's host monitor failed: %s", exc)

    def host(self, name: str) -> LabKvmHost:
        """A lab host by name (kvm01, kvm02, ...)."""
        return self.kvm.by_name(name)

    def names(self) -> list[str]:
        """Every host name, in order."""
        return sorted(h.name for h in self.kvm.hosts.values())

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> LabCloud:
        """Start the broker (unless given), the API, hosts, BMCs, receivers and the forwarder."""
        self._loop = asyncio.get_running_loop()
        try:
            if self.broker is None:
                self.broker = await EmbeddedBroker(create_topics=False).astart()
            self.sim = await CloudStackSimulator(self.cloud).start()
            await self.kvm.start()
            if self.cloud.host_fsm:
                self._monitor = asyncio.create_task(self._cloudstack_monitor())
            if self.rbd is not None:
                self._rbd_thread = ThreadPoolExecutor(1, thread_name_prefix="lab-rbd")
                await self._in_rbd_thread(self.rbd.create_images)
                await self._in_rbd_thread(self.rbd.sync)
                self._rbd_sync = asyncio.create_task(self._follow_rbd())
            await asyncio.gather(*(asyncio.to_thread(self._start_bmc, n) for n in self.names()))
            self.mail.start()
            await self.traps.start()
            self._base = self._base_settings()
            await ensure_topics(self._base)
            self._producer = AIOKafkaProducer(**aiokafka_kwargs(self._base))
            await self._producer.start()
            self._forwarder = asyncio.create_task(self._forward())
        except BaseException:
            await self.stop()
            raise
        return self

    def _start_bmc(self, name: str) -> None:
        password = uuid.uuid4().hex[:16]  # IPMI 2.0 passwords are at most 20 bytes
        bmc = BmcSimulator(
            BMC_USER,
            password,
            on_power_change=lambda state, cause: self._power_changed(name, state),
        )
        bmc.start()
        self.bmcs[name] = bmc
        self.bmc_passwords[name] = password

    async def stop(self) -> None:
        """Stop everything this cloud started; safe to call twice."""
        if self._forwarder is not None:
            # Let queued events reach the topic first (a scenario may end right after a fault).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), 2)
            self._forwarder.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._forwarder
            self._forwarder = None
        for t in list(self._tasks):
            t.cancel()
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._monitor
            self._monitor = None
        if self._rbd_sync is not None:
            self._rbd_sync.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._rbd_sync
            self._rbd_sync = None
        if self._rbd_thread is not None and self.rbd is not None:
            with contextlib.suppress(Exception):
                await self._in_rbd_thread(self.rbd.close)
            self._rbd_thread.shutdown(wait=True)
            self._rbd_thread = None
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
            self._producer = None
        bmcs, self.bmcs = list(self.bmcs.values()), {}
        await asyncio.gather(*(asyncio.to_thread(b.stop) for b in bmcs), return_exceptions=True)
        self.traps.stop()
        self.mail.stop()
        with contextlib.suppress(Exception):
            await self.kvm.stop()
        if self.sim is not None:
            await self.sim.stop()
            self.sim = None
        if self._own_broker and self.broker is not None:
            await self.broker.astop()
            self.broker = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    async def __aenter__(self) -> LabCloud:
        return await self.start()

    # -- Ceph: the VMs' librbd clients follow the cloud -------------------------------------------

    async def _in_rbd_thread(self, fn: Any, *args: Any) -> Any:
        assert self._rbd_thread is not None
        return await asyncio.get_running_loop().run_in_executor(self._rbd_thread, fn, *args)

    async def _follow_rbd(self) -> None:
        # VMs that CloudStack restarts elsewhere open their images there; a host that lost power
        # loses its clients (LabRbd.sync). Crashes kill at once (`crash`), this catches the rest.
        assert self.rbd is not None
        while True:
            await asyncio.sleep(min(0.5, self.interval))
            try:
                await self._in_rbd_thread(self.rbd.sync)
            except Exception as exc:  # a lab that stops following must say so, and keep trying
                log.warning("lab: cannot sync the VMs' RBD clients: %s", exc)

    def rbd_watchers(self, name: str) -> list[str]:
        """`pool/image address` of every watch host `name` holds on the lab's RBD images."""
        assert self.rbd is not None, "the lab cloud has no Ceph"
        return self.rbd.watchers_of(self.host(name).ip)

    async def ceph_unreachable(self) -> None:
        """The Ceph monitor stops: nothing can ask the cluster (the OSD and the VMs' open
        images stay; `ceph_restored` starts the monitor again)."""
        assert self.ceph is not None, "the lab cloud has no Ceph"
        await asyncio.to_thread(self.ceph.stop_mon)

    def ceph_restored(self) -> None:
        """The monitor runs again (started from the calling thread, which must outlive it)."""
        assert self.ceph is not None, "the lab cloud has no Ceph"
        self.ceph.start_mon()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the event bus forwarder ------------------------------------------------------------------

    def _on_event(self, key: str | None, value: str) -> None:
        # SimCloud calls this from the loop (API jobs, faults) or a BMC listener thread.
        loop = self._loop
        if loop is None:
            return
        if _in_loop(loop):
            self._queue.put_nowait((key, value))
        else:
            loop.call_soon_threadsafe(self._queue.put_nowait, (key, value))

    async def _forward(self) -> None:
        assert self._producer is not None
        while True:
            key, value = await self._queue.get()
            try:
                await self._producer.send_and_wait(
                    self.topics.cloudstack,
                    key=key.encode() if key else None,
                    value=value.encode(),
                )
                self.forwarded.append((time.time(), key, value))
            except Exception as exc:  # a lost event is a lab failure: say so, keep going
                log.warning("lab: cannot forward a CloudStack event: %s", exc)
            finally:
                self._queue.task_done()

    async def flush(self) -> None:
        """Wait until every event published so far is on the `cloudstack` topic."""
        await asyncio.wait_for(self._queue.join(), 10)

    # -- BMC power -> the host ------------------------------------------------------------------

    def _power_changed(self, name: str, state: str) -> None:
        # The BMC's listener thread: hand over to the loop, where the lab's state lives.
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._spawn, self._apply_power(name, state))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _apply_power(self, name: str, state: str) -> None:
        h = self.host(name)
        if state == "off":
            self.power_offs.append((time.time(), name))
            await h.power_off()
            await self._rbd_host_died(h)
            if not self.cloud.host_fsm and self.cloud.hosts[h.uuid].state == "Up":
                # Without the host FSM the agent's connection drops with the power (with it,
                # CloudStack notices when the agent is behind on ping).
                self.cloud.set_host_state(h.uuid, "Disconnected")
        else:
            await h.power_on(reconnect=True)

    # -- settings -------------------------------------------------------------------------------

    def _base_settings(self) -> FencerSettings:
        assert self.broker is not None and self.sim is not None
        kafka = self.broker.kafka_settings().model_copy(
            update={
                "topics": self.topics,
                "group_id": f"fencer-lab-{self.name}",
                # Tansu's join waits half the session timeout (in whole seconds: 3 s -> 2 s,
                # 2 s -> 1 s), and a killed member is dropped one session timeout after it
                # stopped (a restart took 7.1 s at 3 s, 4.1 s at 2 s). Tansu 0.6 drops a member
                # that missed heartbeats only when another joins: a single worker stalled 4 s
                # with 2 s kept its partitions (measured); loopback never loses heartbeats.
                "session_timeout": 2.0,
                "heartbeat_interval": 0.5,
            }
        )
        data_dir = self.root / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        hosts = {
            h.uuid: HostSettings(
                name=h.name,
                ipmi=IpmiOverrides(
                    address=self.bmcs[h.name].address,
                    port=self.bmcs[h.name].port,
                    password=SecretStr(self.bmc_passwords[h.name]),
                    storage_fence=StorageFence(self.storage_fence[h.name])
                    if h.name in self.storage_fence
                    else None,
                ),
            )
            for h in self.kvm.hosts.values()
        }
        settings = self.broker.fencer_settings(
            kafka=kafka,
            data_dir=data_dir,
            defaults=IpmiSettings(action=FenceAction.STOP, driver=Driver.IPMI, username=BMC_USER),
            hosts=hosts,
            cloudstack=CloudStackSettings(
                endpoint=self.sim.url,
                api_key=SecretStr(self.sim.api_key),
                secret_key=SecretStr(self.sim.secret_key),
                poll_interval=1.0,
                timeout=5.0,
                job_timeout=30.0,
            ),
            ssh=SshSettings(**self.kvm.ssh_settings()),  # type: ignore[arg-type]
            email=EmailSettings(
                enabled=True,
                host="127.0.0.1",
                port=self.mail.port,
                sender="fencer@lab.example",
                to=["ops@lab.example"],
                timeout=5.0,
            ),
            snmp=SnmpSettings(
                enabled=True,
                receivers=[SnmpReceiver(host="127.0.0.1", port=self.traps.port, version="v2c")],
            ),
            actuator=ActuatorSettings(
                power_timeout=5.0,
                poll_interval=0.5,
                retries=1,
                retry_backoff=0.5,
                # The lab checks every second: 2 x check_interval would refuse a decision that
                # waited for a worker to start.
                decision_max_age=15.0,
                claim_lease=20.0,
                fence_deadline=15.0,
            ),
            log_level="INFO",
            # The lab's own signing key (the gate signs, the actuator verifies) and the flag
            # that allows driver fake.
            signing=SigningSettings(keys_file=write_keys_file(self.root / "signing.keys", "lab")),
            lab=True,
        )
        if self.ceph is not None:
            settings = settings.model_copy(
                update={"rbd": RbdSettings.model_validate(self.ceph.rbd_settings())}
            )
        prepare_kafka(settings)
        return settings

    @staticmethod
    def default_check_interval(interval: float) -> float:
        """The lab policy's check_interval for hosts writing every `interval` seconds."""
        return max(1.0, 2 * interval)

    def settings(self, **policy: Any) -> FencerSettings:
        """The workers' settings; `policy` overrides the lab policy (e.g. fence_cap=3)."""
        assert self._base is not None, "start the LabCloud first"
        values: dict[str, Any] = {
            "check_interval": self.default_check_interval(self.interval),
            "extra_checks": 2,
            "startup_quiet": 0.0,
            "probe_timeout": 20.0,
            "unknown_alert_after": 3,
        }
        values.update(policy)
        return self._base.model_copy(update={"policy": PolicySettings(**values)})

    # -- faults ---------------------------------------------------------------------------------

    def agent_dies(self, name: str) -> None:
        """The host's agent dies: CloudStack sees it Disconnected and its heartbeat stops (the
        heartbeat writer lives in the agent); the host and its VMs keep running and writing."""
        self.host(name).agent_dies("Disconnected")

    def agent_recovers(self, name: str) -> None:
        """The agent is restarted: Up again (CloudStack publishes nothing), heartbeat resumes."""
        self.host(name).agent_recovers()

    def vms_go_idle(self, name: str, idle: bool = True) -> None:
        """Every VM on host `name` stops (or resumes) writing its disks."""
        self.host(name).idle = idle

    def set_filer_offset(self, seconds: float) -> None:
        """The NFS filer's clock runs `seconds` ahead of the hosts' (negative: behind)."""
        self.kvm.set_filer_offset(seconds)

    def vms_restarted_elsewhere(self, name: str, vms: list[str] | None = None) -> dict[str, str]:
        """CloudStack's own HA restarts the VMs of disconnected host `name` (or `vms` of it) on
        another Up host; {vm uuid: new host name}. The new host writes their disks."""
        moved = self.host(name).vms_restarted_elsewhere(vms)
        return {u: self.cloud.hosts[h].name for u, h in moved.items()}

    async def crash(self, name: str) -> None:
        """The host dies: writes stop, SSH is gone. With the host FSM (the default) CloudStack
        notices when the agent is behind on ping (ping.interval x ping.timeout later): then
        Disconnected, Alert after alert.wait; with `investigator` Down, and CloudStack's own
        VM-HA restarts its VMs elsewhere. Without it, Disconnected at once."""
        await self.host(name).crash("Disconnected")
        await self._rbd_host_died(self.host(name))

    async def _rbd_host_died(self, h: LabKvmHost) -> None:
        """Its qemu processes died with it: their watches linger, then expire."""
        if self.rbd is not None and self._rbd_thread is not None:
            await self._in_rbd_thread(self.rbd.kill_host, h.ip)

    def storage_outage(self) -> None:
        """Every pool's mount point vanishes for every host."""
        self.kvm.storage_outage()

    def storage_restored(self) -> None:
        """The pools come back."""
        self.kvm.storage_restored()

    async def neighbours_unreachable(self, *suspects: str) -> None:
        """Every host except `suspects` refuses SSH (CloudStack still sees them Up)."""
        for h in self.kvm.hosts.values():
            if h.name not in suspects:
                await h.ssh_unreachable("refuse")

    async def recovers(self, name: str) -> None:
        """The host is back: powered, writing, SSH up, agent Up."""
        await self.host(name).recover()

    def bmc_unreachable(self, name: str) -> None:
        """The host's BMC drops every packet."""
        self.bmcs[name].pause()

    # -- what happened --------------------------------------------------------------------------

    def vms_of(self, name: str) -> list[str]:
        """VM uuids that first ran on host `name`."""
        return [vm for vm, home in self.home.items() if home == name]

    def restarted_elsewhere(self, name: str) -> list[str]:
        """VMs of host `name` now Running on another host."""
        h = self.host(name)
        return [
            u
            for u in self.vms_of(name)
            if self.cloud.vms[u].state == "Running" and self.cloud.vms[u].host_uuid != h.uuid
        ]

    def degraded_calls(self, name: str) -> list[dict[str, str]]:
        """declareHostAsDegraded calls the API received for host `name`."""
        uuid_ = self.host(name).uuid
        return [
            p
            for c, p in self.cloud.calls
            if c.lower() == "declarehostasdegraded" and p.get("id") == uuid_
        ]

    def bmc_power_offs(self, name: str) -> int:
        """Power-off commands the host's BMC received."""
        return self.bmcs[name].count("power_off")


def _in_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
