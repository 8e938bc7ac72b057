"""A CloudStack management-server simulator: the API fencer calls, over real HTTP, with real
request signatures, in CloudStack's JSON shapes, and the event-bus records CloudStack would
publish when the simulated cloud changes.

Rule: every request is verified exactly as `ApiServer.verifyRequest` does (parameter names sorted
case-sensitively, `name=URLEncoder.encode(value)` with `+` -> `%20`, the whole string lower-cased,
HMAC-SHA1, base64; `signatureVersion=3` requires an unexpired `expires`). A request that fails
gets CloudStack's 401 error, never data. The cloud itself (`SimCloud`) is a plain object that
tests and the lab mutate directly; every change that CloudStack would publish on its Kafka event
bus calls `SimCloud.on_event(key, value)` with CloudStack's exact record (value = the Gson
description JSON, key = the resource uuid or None for alerts).

Asynchronous commands return a `jobid` at once and run their effect `SimCloud.job_delay` seconds
later, as CloudStack's job executor does; a failing precondition (e.g. declaring an Up host
degraded) therefore fails the job with the error code CloudStack would use, and
`SimCloud.fail_jobs` makes any async command fail on purpose; `SimCloud.fail_next_jobs` makes
the next N jobs of a command fail, then work again. API faults: `SimCloud.fail_next_calls`
answers the next N calls of a command with CloudStack's 530, `stall_next_calls` holds their
answers `api_stall` seconds (made, then late: the cloud may have changed before they arrive; a
management server under load, or a request that times out).

The host agent state machine (`SimCloud.host_fsm`, off for a bare SimCloud, on in the lab
cloud): a host's state then moves on by itself as AgentManagerImpl moves it. The agent pings
every `ping_interval` (listHosts `lastpinged` moves); an agent whose connection closes (it died)
is investigated at once (`agent_lost`), one that just goes silent (the host crashed, the network
dropped) when the monitor finds it behind on ping by `ping_interval x ping_timeout`
(`agent_silent`, then `monitor`). The investigator (`investigator`, off by default: KVM's
CheckOnHostCommand to the Up neighbours, which read the host's NFS heartbeat through
`heartbeat_age`) finds a host Down when its heartbeat is older than `hb_timeout`, and CloudStack
then starts its own VM-HA (`vm_ha`, after `vm_ha_delay`): "Host down" alerts, the VMs restarted
elsewhere without any fence. Undetermined, the host is Disconnected ("Host disconnected"
alert), and Alert once `alert_wait` passed since it last pinged (WaitedTooLong: no alert). An
agent that comes back is Connecting (`agent_connected`) for `connect_delay`, then Up with a new
`lastpinged`; nothing is published. `lastpinged` is shown as CloudStack shows it: the HostVO
stores `currentTimeMillis() >> 10` and the API formats it as milliseconds (a date in 1970).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import secrets
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

EventCallback = Callable[[str | None, str], None]

# ApiErrorCode values (api/src/main/java/org/apache/cloudstack/api/ApiErrorCode.java).
UNAUTHORIZED = 401
PARAM_ERROR = 431
UNSUPPORTED_ACTION_ERROR = 432
INTERNAL_ERROR = 530
# CSExceptionErrorCode: ServerApiException's own code.
CS_SERVER_API_ERROR = 9999
CS_INVALID_PARAMETER = 4350

SIGNATURE_ERROR = "unable to verify user credentials and/or request signature"
DEFAULT_PAGE_SIZE = 500

ALERT_TYPE_HOST = "ALERT.COMPUTE.HOST"
# Status.lostConnection() among the states the simulator shows.
LOST_CONNECTION = frozenset({"Disconnected", "Alert", "Down"})
MAINTENANCE_STATES = {
    "PrepareForMaintenance",
    "ErrorInPrepareForMaintenance",
    "ErrorInMaintenance",
    "Maintenance",
}


# ---------------------------------------------------------------------------------------------
# Signing, as the Java side does it


def java_urlencode(value: str) -> str:
    """`java.net.URLEncoder.encode(value, "UTF-8")`: only [A-Za-z0-9.*_-] stay, space -> '+'."""
    out: list[str] = []
    for byte in value.encode("utf-8"):
        ch = chr(byte)
        if ch.isascii() and (ch.isalnum() or ch in ".-*_"):
            out.append(ch)
        elif ch == " ":
            out.append("+")
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def unsigned_request(params: dict[str, str]) -> str:
    """The string CloudStack signs: sorted names (Java order), encoded values, lower-cased."""
    # Java's String.compareTo orders by UTF-16 code unit; Python's str order matches for the
    # BMP, which is all a parameter name can sensibly hold.
    names = sorted(n for n in params if n.lower() != "signature")
    pairs = [f"{n}={java_urlencode(params[n]).replace('+', '%20')}" for n in names]
    return "&".join(pairs).lower()


def compute_signature(params: dict[str, str], secret_key: str) -> str:
    """HMAC-SHA1 of the unsigned request with the secret key, base64 (what the client sends)."""
    digest = hmac.new(secret_key.encode(), unsigned_request(params).encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def _parse_expires(value: str) -> datetime | None:
    # ApiServer parses with SimpleDateFormat("yyyy-MM-dd'T'HH:mm:ssZ"): 2025-03-14T10:22:31+0000
    for fmt in ("%Y-%m-%dT%H:%M:%S%z",):
        try:
            return datetime.strptime(value, fmt)
        except ValueError:
            continue
    return None


# ---------------------------------------------------------------------------------------------
# Event-bus records, as Gson and java.util.HashMap produce them


def _java_string_hash(s: str) -> int:
    h = 0
    for unit in s.encode("utf-16-be").hex(" ", 2).split():
        h = (31 * h + int(unit, 16)) & 0xFFFFFFFF
    return h


def java_hashmap_order(keys: list[str]) -> list[str]:
    """The iteration order of a `java.util.HashMap<String, ...>` filled with `keys` in order."""
    capacity = 16
    while len(keys) > capacity * 0.75:
        capacity *= 2

    def bucket(k: str) -> int:
        h = _java_string_hash(k)
        return (h ^ (h >> 16)) & (capacity - 1)

    # Within a bucket HashMap keeps insertion order (resizes split buckets stably).
    return [k for _, _, k in sorted((bucket(k), i, k) for i, k in enumerate(keys))]


_GSON_HTML_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "=": "\\u003d",
    "'": "\\u0027",
}


def gson_description(fields: dict[str, str | None]) -> str:
    """`new Gson().toJson(hashMap)`: HashMap key order, nulls dropped, HTML-safe escaping."""
    present = {k: v for k, v in fields.items() if v is not None}
    ordered = {k: present[k] for k in java_hashmap_order(list(present))}
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False)
    for raw, escaped in _GSON_HTML_ESCAPES.items():
        text = text.replace(raw, escaped)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def event_time(at: float) -> str:
    """CloudStack's `eventDateTime` format: yyyy-MM-dd HH:mm:ss Z."""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S +0000")


def api_time(at: float | None) -> str | None:
    """The API's date format, e.g. 2025-03-14T10:22:31+0000."""
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S+0000")


def lastpinged_shown(at: float) -> float:
    """listHosts' `lastpinged`: HostVO keeps `System.currentTimeMillis() >> 10` (about seconds)
    and the API formats it as milliseconds, so CloudStack shows a date in January 1970 that
    moves by about a second per 17 minutes."""
    return (int(at * 1000) >> 10) / 1000.0


# ---------------------------------------------------------------------------------------------
# The cloud model


def _uuid() -> str:
    return str(uuidlib.uuid4())


@dataclass
class Zone:
    """A CloudStack zone."""

    name: str
    uuid: str = field(default_factory=_uuid)
    pod_uuid: str = field(default_factory=_uuid)
    pod_name: str = "pod1"


@dataclass
class Cluster:
    """A KVM cluster in a zone's pod."""

    name: str
    zone_uuid: str
    uuid: str = field(default_factory=_uuid)


@dataclass
class Host:
    """A hypervisor host as `listHosts` shows it."""

    name: str
    ip: str
    cluster_uuid: str
    numeric_id: int
    uuid: str = field(default_factory=_uuid)
    state: str = "Up"
    resourcestate: str = "Enabled"
    hypervisor: str = "KVM"
    type: str = "Routing"
    disconnected: float | None = None
    lastpinged: float = field(default_factory=time.time)
    created: float = field(default_factory=time.time)
    # The agent's connection (host_fsm): it pings while True; `connecting_since` is when an
    # agent that came back connected (Connecting until `SimCloud.connect_delay` passed).
    agent: bool = True
    connecting_since: float | None = None


@dataclass
class VirtualMachine:
    """A user VM and the host it runs on."""

    name: str
    host_uuid: str | None
    uuid: str = field(default_factory=_uuid)
    state: str = "Running"
    account: str = "admin"
    project_uuid: str | None = None
    haenable: bool = True


@dataclass
class Volume:
    """A VM disk: `path` is the file name under the pool's mount point."""

    vm_uuid: str | None
    storage_uuid: str
    path: str = field(default_factory=_uuid)
    uuid: str = field(default_factory=_uuid)
    name: str = "ROOT"
    type: str = "ROOT"
    state: str = "Ready"
    size: int = 8 * 2**30


@dataclass
class StoragePool:
    """An NFS primary storage pool (mounted by KVM hosts at <mount root>/<uuid>)."""

    name: str
    ipaddress: str
    path: str
    cluster_uuid: str | None
    zone_uuid: str
    uuid: str = field(default_factory=_uuid)
    type: str = "NetworkFilesystem"
    state: str = "Up"
    scope: str = "CLUSTER"


@dataclass
class Job:
    """An async job as queryAsyncJobResult reports it."""

    id: str
    command: str
    cmd_class: str
    instance_uuid: str | None
    created: float
    status: int = 0
    resultcode: int = 0
    result: dict[str, Any] | None = None
    completed: float | None = None


class ApiError(Exception):
    """An error CloudStack answers with (errorcode, cserrorcode, errortext)."""

    def __init__(self, code: int, text: str, cs_code: int = CS_SERVER_API_ERROR) -> None:
        super().__init__(text)
        self.code, self.text, self.cs_code = code, text, cs_code


_CMD_PACKAGE = "org.apache.cloudstack.api.command.admin.host."
_CMD_CLASSES = {
    "declarehostasdegraded": _CMD_PACKAGE + "DeclareHostAsDegradedCmd",
    "cancelhostasdegraded": _CMD_PACKAGE + "CancelHostAsDegradedCmd",
    "preparehostformaintenance": _CMD_PACKAGE + "PrepareForMaintenanceCmd",
    "cancelhostmaintenance": _CMD_PACKAGE + "CancelMaintenanceCmd",
}


class SimCloud:
    """The simulated cloud's state; mutate it directly, the API and the events follow."""

    def __init__(self, on_event: EventCallback | None = None) -> None:
        self.on_event = on_event
        self.zones: dict[str, Zone] = {}
        self.clusters: dict[str, Cluster] = {}
        self.hosts: dict[str, Host] = {}
        self.vms: dict[str, VirtualMachine] = {}
        self.volumes: dict[str, Volume] = {}
        self.pools: dict[str, StoragePool] = {}
        self.jobs: dict[str, Job] = {}
        self.job_delay = 0.05
        # Seconds after a declareHostAsDegraded job ends before VM-HA restarts the host's VMs
        # (0: within the job, as before). CloudStack's job only schedules the HA work
        # (HighAvailabilityManager.scheduleRestartForVmsOnHost); its workers stop and restart
        # the VMs later, so right after the job they still show Running on the fenced host.
        self.ha_delay = 0.0
        # API faults, command name (lower case) -> how many of its next calls: answered with
        # CloudStack's 530 internal error (a database or management-server failure), or their
        # answer, made at once, held `api_stall` seconds (a management server under load).
        self.fail_next_calls: dict[str, int] = {}
        self.stall_next_calls: dict[str, int] = {}
        self.api_stall = 0.0
        # command name (case-insensitive) -> error text: that async command's jobs fail.
        self.fail_jobs: dict[str, str] = {}
        # command name (lower case) -> how many of its next jobs fail, then they work again.
        self.fail_next_jobs: dict[str, int] = {}
        self.user_uuid = _uuid()
        self.account_uuid = _uuid()
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.events: list[tuple[str | None, str]] = []
        self._ids = itertools.count(1)
        self.clock: Callable[[], float] = time.time
        # The host agent state machine (see the module docstring); CloudStack's defaults, which
        # the lab scales down (lab.cloud.LabCloud).
        self.host_fsm = False
        self.ping_interval = 60.0  # ping.interval
        self.ping_timeout = 2.5  # ping.timeout (x ping.interval)
        self.alert_wait = 1800.0  # alert.wait
        self.connect_delay = 5.0  # an agent's Connecting -> Up (its startup commands)
        self.investigator = False  # KVMInvestigator: CheckOnHostCommand through the neighbours
        self.hb_timeout = 120.0  # kvmheartbeat.sh -r -t: older is "DEAD" to a neighbour
        self.vm_ha_delay = 0.0  # from the Down to VM-HA restarting the VMs
        # (host, neighbour) -> seconds since the host's last heartbeat as that neighbour reads
        # it (its clock minus the content), None when it cannot read it (no NFS, storage out).
        self.heartbeat_age: Callable[[Host, Host], float | None] | None = None
        # VM-HA for a host CloudStack found Down: host uuid -> restarts its VMs elsewhere (the
        # lab's keeps a still-running host running them: split brain).
        self.vm_ha: Callable[[str], Any] | None = None
        self.investigations: list[tuple[str, str]] = []  # (host name, determined state)

    # --- building -----------------------------------------------------------------------------

    def add_zone(self, name: str = "zone1") -> Zone:
        """A zone with one pod."""
        z = Zone(name)
        self.zones[z.uuid] = z
        return z

    def add_cluster(self, zone: Zone, name: str = "cluster1") -> Cluster:
        """A KVM cluster."""
        c = Cluster(name, zone.uuid)
        self.clusters[c.uuid] = c
        return c

    def add_host(self, cluster: Cluster, name: str, ip: str, **kw: Any) -> Host:
        """An Up, Enabled KVM routing host."""
        h = Host(name, ip, cluster.uuid, next(self._ids), **kw)
        self.hosts[h.uuid] = h
        return h

    def add_pool(
        self, cluster: Cluster | None, name: str, ipaddress: str = "10.0.0.5", **kw: Any
    ) -> StoragePool:
        """An NFS primary pool, cluster-scoped (or zone-scoped when cluster is None)."""
        zone_uuid = cluster.zone_uuid if cluster else next(iter(self.zones))
        p = StoragePool(
            name,
            ipaddress,
            kw.pop("path", f"/export/{name}"),
            cluster.uuid if cluster else None,
            zone_uuid,
            **kw,
        )
        if cluster is None:
            p.scope = "ZONE"
        self.pools[p.uuid] = p
        return p

    def add_vm(self, host: Host | None, name: str, **kw: Any) -> VirtualMachine:
        """A VM, Running on `host`."""
        vm = VirtualMachine(name, host.uuid if host else None, **kw)
        self.vms[vm.uuid] = vm
        return vm

    def add_volume(self, vm: VirtualMachine | None, pool: StoragePool, **kw: Any) -> Volume:
        """A disk of `vm` on `pool`."""
        v = Volume(vm.uuid if vm else None, pool.uuid, **kw)
        self.volumes[v.uuid] = v
        return v

    # --- event bus ----------------------------------------------------------------------------

    def publish(self, key: str | None, fields: dict[str, str | None]) -> None:
        """Hand one event-bus record (key, Gson value) to on_event."""
        value = gson_description(fields)
        self.events.append((key, value))
        if self.on_event is not None:
            self.on_event(key, value)

    def _host_desc(self, h: Host) -> str:
        c = self.clusters[h.cluster_uuid]
        z = self.zones[c.zone_uuid]
        return f"name: {h.name} (id:{h.uuid}), availability zone: {z.name}, pod: {z.pod_name}"

    def _alert(self, h: Host, subject: str, body: str, alert: str = ALERT_TYPE_HOST) -> None:
        z = self.zones[self.clusters[h.cluster_uuid].zone_uuid]
        # AlertGenerator.publishAlertOnEventBus puts these keys in a HashMap in this order.
        self.publish(
            None,
            {
                "event": alert,
                "dataCenterId": z.uuid,
                "podId": z.pod_uuid,
                "subject": subject,
                "body": body,
                "eventDateTime": event_time(self.clock()),
            },
        )

    def _action_event(self, h: Host, event: str, status: str, description: str) -> None:
        self.publish(
            h.uuid,
            {
                "user": self.user_uuid,
                "account": self.account_uuid,
                "event": event,
                "status": status,
                "entity": "Host",
                "entityuuid": h.uuid,
                "Host": h.uuid,
                "description": description,
                "eventDateTime": event_time(self.clock()),
            },
        )

    def _java_host(self, h: Host) -> str:
        """HostVO.toString(): `Host {"id":12,"name":"kvm03","type":"Routing","uuid":"..."}`."""
        fields = {"id": h.numeric_id, "name": h.name, "type": h.type, "uuid": h.uuid}
        return "Host " + json.dumps(fields, separators=(",", ":"))

    def set_host_state(self, host_uuid: str, state: str) -> None:
        """Change a host's agent status; publish the alert AgentManagerImpl would send."""
        h = self.hosts[host_uuid]
        old, h.state = h.state, state
        now = self.clock()
        if state == old:
            return
        if state in LOST_CONNECTION:
            # AgentManagerImpl.disconnectAgent stamps disconnectedOn at every disconnection it
            # handles; nothing clears it (an Up host shows its last one).
            h.disconnected = now
        if state == "Up":
            h.lastpinged = now
            return  # an agent reconnect publishes nothing
        desc = self._host_desc(h)
        if state == "Disconnected":
            self._alert(
                h,
                f"Host disconnected, {desc}",
                f"If the agent for host [{desc}] is not restarted within alert.wait seconds, "
                "host will go to Alert state",
            )
        elif state == "Alert":
            z = self.zones[self.clusters[h.cluster_uuid].zone_uuid]
            self._alert(
                h,
                f"Host in ALERT state, {desc}",
                f"In availability zone {z.name}, host is in alert state: {h.numeric_id}-{h.name}",
            )
        elif state == "Down":
            self._alert(
                h,
                f"Host down, {h.numeric_id}",
                f"Host {self._java_host(h)} is down. Starting HA on the VMs",
            )
            names = " ".join(
                vm.name
                for vm in self.vms.values()
                if vm.host_uuid == h.uuid and vm.state == "Running"
            )
            c = self.clusters[h.cluster_uuid]
            z = self.zones[c.zone_uuid]
            hd = (
                f"name: {h.name} (id:{h.numeric_id}), availability zone: {z.name}, "
                f"pod: {z.pod_name}"
            )
            self._alert(
                h,
                f"Host is down, {hd}",
                f"Host [{hd}] is down.  Starting HA on the following VMs: {names}",
            )

    # --- the host agent state machine (host_fsm) -----------------------------------------------

    # Status.java's transitions for the events the simulator raises.
    TRANSITIONS: dict[tuple[str, str], str] = {
        ("Up", "PingTimeout"): "Alert",
        ("Up", "AgentDisconnected"): "Alert",
        ("Up", "HostDown"): "Down",
        ("Up", "ShutdownRequested"): "Disconnected",
        ("Connecting", "PingTimeout"): "Alert",
        ("Connecting", "AgentDisconnected"): "Alert",
        ("Connecting", "HostDown"): "Down",
        ("Disconnected", "PingTimeout"): "Alert",
        ("Disconnected", "HostDown"): "Down",
        ("Disconnected", "WaitedTooLong"): "Alert",
        ("Disconnected", "AgentDisconnected"): "Disconnected",
        ("Alert", "HostDown"): "Down",
        ("Alert", "AgentDisconnected"): "Alert",
        ("Down", "AgentDisconnected"): "Down",
        ("Down", "PingTimeout"): "Down",
    }

    def agent_lost(self, host_uuid: str) -> None:
        """The agent's connection closed (the agent died): AgentDisconnected, investigated now.
        Without host_fsm: Disconnected at once, as before."""
        h = self.hosts[host_uuid]
        h.agent, h.connecting_since = False, None
        if not self.host_fsm:
            self.set_host_state(host_uuid, "Disconnected")
            return
        self._disconnect_with_investigation(h, "AgentDisconnected")

    def agent_silent(self, host_uuid: str) -> None:
        """The agent stops pinging without closing its connection (the host crashed or lost
        power): nothing now; the monitor finds it behind on ping. Without host_fsm: nothing."""
        h = self.hosts[host_uuid]
        h.agent, h.connecting_since = False, None

    def agent_connected(self, host_uuid: str) -> None:
        """The agent (re)connects: Connecting, then Up after `connect_delay` (`monitor`).
        Nothing is published. Without host_fsm: Up at once, as before."""
        h = self.hosts[host_uuid]
        h.agent = True
        if not self.host_fsm:
            self.set_host_state(host_uuid, "Up")
            return
        if h.state != "Up":
            h.state, h.connecting_since = "Connecting", self.clock()

    def monitor(self) -> None:
        """One pass of AgentManagerImpl's MonitorTask (every ping_interval): pings recorded,
        connecting agents made Up, hosts behind on ping investigated."""
        now = self.clock()
        for h in list(self.hosts.values()):
            if h.agent:
                if h.state == "Connecting":
                    if now - (h.connecting_since or now) >= self.connect_delay:
                        h.connecting_since = None
                        h.lastpinged = now
                        self.set_host_state(h.uuid, "Up")
                elif h.state == "Up" and now - h.lastpinged >= self.ping_interval:
                    h.lastpinged = now
                continue
            if now - h.lastpinged <= self.ping_interval * self.ping_timeout:
                continue
            if h.resourcestate in ("Disabled", "Maintenance", "ErrorInMaintenance"):
                # No investigation for a host out of operation: ShutdownRequested.
                if h.state == "Up":
                    self._move(h, "Disconnected")
                continue
            self._disconnect_with_investigation(h, "PingTimeout")

    def investigate(self, h: Host) -> str:
        """KVMInvestigator.isAgentAlive for a host whose agent does not answer: Down when an Up
        neighbour finds its heartbeat older than hb_timeout, Disconnected when one finds it
        fresh or none can tell (or the investigator is off)."""
        if not self.investigator:
            return "Disconnected"
        if h.agent:
            return "Up"
        neighbour_says: str | None = None
        for n in self.hosts.values():
            if n.uuid == h.uuid or n.cluster_uuid != h.cluster_uuid or n.state != "Up":
                continue
            if n.hypervisor != "KVM" or self.heartbeat_age is None:
                continue
            age = self.heartbeat_age(h, n)
            if age is None:
                continue  # no answer from this neighbour
            neighbour_says = "Down" if age > self.hb_timeout else "Up"
            if neighbour_says == "Up":
                break
        return "Down" if neighbour_says == "Down" else "Disconnected"

    def _disconnect_with_investigation(self, h: Host, event: str) -> None:
        """AgentManagerImpl.handleDisconnectWithInvestigation."""
        nxt = self.TRANSITIONS.get((h.state, event))
        if nxt != "Alert":
            if nxt is not None and nxt != h.state:
                self._move(h, nxt)
            return
        determined = self.investigate(h)
        self.investigations.append((h.name, determined))
        now = self.clock()
        if determined == "Down":
            self.set_host_state(h.uuid, "Down")  # the "Host down" alerts
            self._start_vm_ha(h)
        elif determined == "Up":
            h.lastpinged = now
            self.set_host_state(h.uuid, "Up")
        elif h.state == "Disconnected":
            if now - h.lastpinged > self.alert_wait:
                self._move(h, "Alert")  # WaitedTooLong: no alert is sent
        else:
            # Determined Disconnected, the host was Up: the "Host disconnected" alert.
            self.set_host_state(h.uuid, "Disconnected")

    def _move(self, h: Host, state: str) -> None:
        """A state change CloudStack publishes nothing for."""
        if state in LOST_CONNECTION:
            h.disconnected = self.clock()
        h.state = state

    def _start_vm_ha(self, h: Host) -> None:
        """HighAvailabilityManagerImpl.scheduleRestartForVmsOnHost: its HA workers restart the
        host's VMs elsewhere, `vm_ha_delay` later (no fence: CloudStack trusts the Down)."""

        def run() -> None:
            if self.hosts[h.uuid].state != "Down":
                return
            if self.vm_ha is not None:
                self.vm_ha(h.uuid)
            else:
                self.restart_vms_elsewhere(h.uuid)

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            run()
            return
        loop.call_later(self.vm_ha_delay, run)

    def set_vm_state(self, vm_uuid: str, new_state: str, host_uuid: str | None = None) -> None:
        """Change a VM's state (and host); publish UserVmStateListener's pre and post records."""
        vm = self.vms[vm_uuid]
        old = vm.state
        for status in ("preStateTransitionEvent", "postStateTransitionEvent"):
            if status == "postStateTransitionEvent":
                vm.state = new_state
                if host_uuid is not None or new_state == "Stopped":
                    vm.host_uuid = host_uuid
            self.publish(
                vm.uuid,
                {
                    "resource": "VirtualMachine",
                    "id": vm.uuid,
                    "old-state": old,
                    "new-state": new_state,
                    "status": status,
                    "eventDateTime": event_time(self.clock()),
                },
            )

    def _other_up_host(self, h: Host) -> Host | None:
        for other in self.hosts.values():
            if (
                other.uuid != h.uuid
                and other.cluster_uuid == h.cluster_uuid
                and other.state == "Up"
                and other.resourcestate == "Enabled"
            ):
                return other
        return None

    def restart_vms_elsewhere(self, host_uuid: str) -> list[str]:
        """VM-HA: stop the host's running VMs and start them on another Up host of the cluster."""
        h = self.hosts[host_uuid]
        moved = []
        for vm in list(self.vms.values()):
            if vm.host_uuid != h.uuid or vm.state not in ("Running", "Starting", "Stopping"):
                continue
            if self.restart_vm_elsewhere(vm.uuid):
                moved.append(vm.uuid)
        return moved

    def restart_vm_elsewhere(self, vm_uuid: str, target_uuid: str | None = None) -> str | None:
        """VM-HA for one VM: Stopped, then Starting and Running on `target_uuid` (default: the
        first other Up, Enabled host of its cluster). Returns the new host's uuid, or None when
        no host could take it (the VM stays Stopped, as CloudStack leaves it)."""
        vm = self.vms[vm_uuid]
        h = self.hosts[vm.host_uuid or ""]
        target = self.hosts[target_uuid] if target_uuid else self._other_up_host(h)
        self.set_vm_state(vm.uuid, "Stopped")
        if target is None:
            return None
        self.set_vm_state(vm.uuid, "Starting", target.uuid)
        self.set_vm_state(vm.uuid, "Running", target.uuid)
        return target.uuid

    # --- async commands -----------------------------------------------------------------------

    def _host_arg(self, params: dict[str, str]) -> Host:
        hid = params.get("id")
        if not hid:
            raise ApiError(PARAM_ERROR, "Unable to execute API command due to missing parameter id")
        h = self.hosts.get(hid)
        if h is None:
            raise ApiError(
                PARAM_ERROR,
                f"Unable to execute API command due to invalid value. Invalid parameter id "
                f"value={hid} due to incorrect long value format, or entity does not exist or "
                "due to incorrect parameter annotation for the field in api cmd class.",
                CS_INVALID_PARAMETER,
            )
        return h

    def run_declare_degraded(self, h: Host) -> None:
        """ResourceManagerImpl.declareHostAsDegraded, as the job runs it."""
        if h.resourcestate == "Degraded":
            raise ApiError(PARAM_ERROR, f"Host [id:{h.uuid}] was already marked as Degraded.")
        if h.state not in ("Alert", "Disconnected"):
            raise ApiError(
                PARAM_ERROR,
                f"Cannot perform declare host [id={h.uuid}, name={h.name}] as 'Degraded' when "
                f"host is in {h.state} status",
                CS_INVALID_PARAMETER,
            )
        self._action_event(
            h, "HOST.DECLARE.DEGRADED", "Started", f"declaring host: {h.uuid} as Degraded"
        )
        h.resourcestate = "Degraded"
        if self.ha_delay > 0:
            asyncio.get_running_loop().call_later(self.ha_delay, self.restart_vms_elsewhere, h.uuid)
        else:
            self.restart_vms_elsewhere(h.uuid)
        self._action_event(
            h, "HOST.DECLARE.DEGRADED", "Completed", f"declaring host: {h.uuid} as Degraded"
        )

    def run_cancel_degraded(self, h: Host) -> None:
        """Revert Degraded to Enabled."""
        if h.resourcestate != "Degraded":
            raise ApiError(
                PARAM_ERROR,
                f"Cannot perform cancelHostAsDegraded on host [id={h.uuid}, name={h.name}] "
                f"when host is in {h.resourcestate} resource state",
                CS_INVALID_PARAMETER,
            )
        h.resourcestate = "Enabled"

    def run_prepare_maintenance(self, h: Host) -> None:
        """Enabled -> PrepareForMaintenance -> Maintenance, VMs moved off."""
        if h.resourcestate in MAINTENANCE_STATES:
            raise ApiError(PARAM_ERROR, f"Host {h.uuid} is already in {h.resourcestate} state")
        self._action_event(
            h, "MAINT.PREPARE", "Started", f"preparing host: {h.numeric_id} for maintenance"
        )
        h.resourcestate = "PrepareForMaintenance"
        if h.state == "Up":
            for vm in list(self.vms.values()):
                target = self._other_up_host(h)
                if vm.host_uuid == h.uuid and vm.state == "Running" and target:
                    self.set_vm_state(vm.uuid, "Migrating", h.uuid)
                    self.set_vm_state(vm.uuid, "Running", target.uuid)
        else:
            self.restart_vms_elsewhere(h.uuid)
        h.resourcestate = "Maintenance"
        self._action_event(
            h, "MAINT.PREPARE", "Completed", f"completed maintenance for host {h.numeric_id}"
        )

    def run_cancel_maintenance(self, h: Host) -> None:
        """Maintenance (or preparing) -> Enabled."""
        if h.resourcestate not in MAINTENANCE_STATES:
            raise ApiError(
                PARAM_ERROR,
                f"Cannot perform cancelMaintenance when resource state is {h.resourcestate}, "
                f"hostId = {h.numeric_id}",
                CS_INVALID_PARAMETER,
            )
        self._action_event(
            h, "MAINT.CANCEL", "Started", f"canceling maintenance for host: {h.numeric_id}"
        )
        h.resourcestate = "Enabled"
        self._action_event(
            h, "MAINT.CANCEL", "Completed", f"canceling maintenance for host: {h.numeric_id}"
        )

    def start_job(self, command: str, params: dict[str, str]) -> Job:
        """Validate the synchronous part of an async command and queue its job."""
        h = self._host_arg(params)
        job = Job(_uuid(), command, _CMD_CLASSES[command.lower()], h.uuid, self.clock())
        self.jobs[job.id] = job
        if command.lower() == "preparehostformaintenance":
            self._action_event(
                h, "MAINT.PREPARE", "Scheduled", f"preparing host: {h.numeric_id} for maintenance"
            )
        elif command.lower() == "cancelhostmaintenance":
            self._action_event(
                h, "MAINT.CANCEL", "Scheduled", f"canceling maintenance for host: {h.numeric_id}"
            )
        return job

    def finish_job(self, job: Job) -> None:
        """Run the job's effect and record the result as queryAsyncJobResult reports it."""
        h = self.hosts[job.instance_uuid or ""]
        runner = {
            "declarehostasdegraded": self.run_declare_degraded,
            "cancelhostasdegraded": self.run_cancel_degraded,
            "preparehostformaintenance": self.run_prepare_maintenance,
            "cancelhostmaintenance": self.run_cancel_maintenance,
        }[job.command.lower()]
        forced = {k.lower(): v for k, v in self.fail_jobs.items()}.get(job.command.lower())
        if forced is None and self.fail_next_jobs.get(job.command.lower(), 0) > 0:
            self.fail_next_jobs[job.command.lower()] -= 1
            forced = f"Failed to run {job.command}: management server busy (injected fault)"
        try:
            if forced is not None:
                raise ApiError(INTERNAL_ERROR, forced)
            runner(h)
        except ApiError as exc:
            job.status, job.resultcode = 2, exc.code
            job.result = {"errorcode": exc.code, "errortext": exc.text}
        else:
            job.status, job.resultcode = 1, 0
            job.result = {"host": self.host_response(h)}
        job.completed = self.clock()

    # --- API views ----------------------------------------------------------------------------

    def host_response(self, h: Host) -> dict[str, Any]:
        """HostResponse fields fencer reads."""
        c = self.clusters[h.cluster_uuid]
        z = self.zones[c.zone_uuid]
        r: dict[str, Any] = {
            "id": h.uuid,
            "name": h.name,
            "state": h.state,
            "disconnected": api_time(h.disconnected),
            "type": h.type,
            "ipaddress": h.ip,
            "zoneid": z.uuid,
            "zonename": z.name,
            "podid": z.pod_uuid,
            "podname": z.pod_name,
            "version": "4.20.0.0",
            "hypervisor": h.hypervisor,
            "lastpinged": api_time(lastpinged_shown(h.lastpinged)),
            # HostDaoImpl.updateState clears the management server of a host that lost its
            # connection: the field is then absent.
            "managementserverid": None
            if h.state in LOST_CONNECTION
            else "5e1d8b5a-7c1e-4c55-9f3b-2b9c1d0e2f11",
            "clusterid": c.uuid,
            "clustername": c.name,
            "clustertype": "CloudManaged",
            "islocalstorageactive": False,
            "created": api_time(h.created),
            "resourcestate": h.resourcestate,
            "hahost": False,
            "outofbandmanagement": {"powerstate": "Disabled", "enabled": False},
            "hostha": {"haenable": False, "hastate": "Disabled"},
        }
        return {k: v for k, v in r.items() if v is not None}

    def vm_response(self, vm: VirtualMachine) -> dict[str, Any]:
        """UserVmResponse fields fencer reads."""
        h = self.hosts.get(vm.host_uuid or "")
        r: dict[str, Any] = {
            "id": vm.uuid,
            "name": vm.name,
            "displayname": vm.name,
            "account": vm.account,
            "state": vm.state,
            "haenable": vm.haenable,
            "instancename": f"i-2-{abs(hash(vm.uuid)) % 10000}-VM",
        }
        if vm.project_uuid:
            r["projectid"] = vm.project_uuid
            r["project"] = f"project-{vm.project_uuid[:8]}"
        if h is not None:
            c = self.clusters[h.cluster_uuid]
            r.update(
                hostid=h.uuid,
                hostname=h.name,
                zoneid=c.zone_uuid,
                zonename=self.zones[c.zone_uuid].name,
            )
        return r

    def volume_response(self, v: Volume) -> dict[str, Any]:
        """VolumeResponse fields fencer reads."""
        p = self.pools[v.storage_uuid]
        vm = self.vms.get(v.vm_uuid or "")
        r: dict[str, Any] = {
            "id": v.uuid,
            "name": v.name,
            "zoneid": p.zone_uuid,
            "type": v.type,
            "size": v.size,
            "state": v.state,
            "path": v.path,
            "storage": p.name,
            "storageid": p.uuid,
        }
        if vm is not None:
            r.update(virtualmachineid=vm.uuid, vmname=vm.name, vmstate=vm.state)
            if vm.project_uuid:
                r["projectid"] = vm.project_uuid
        return r

    def pool_response(self, p: StoragePool) -> dict[str, Any]:
        """StoragePoolResponse fields fencer reads."""
        z = self.zones[p.zone_uuid]
        r: dict[str, Any] = {
            "id": p.uuid,
            "zoneid": z.uuid,
            "zonename": z.name,
            "podid": z.pod_uuid,
            "name": p.name,
            "ipaddress": p.ipaddress,
            "path": p.path,
            "type": p.type,
            "state": p.state,
            "scope": p.scope,
            "hypervisor": "KVM",
        }
        if p.cluster_uuid:
            r.update(clusterid=p.cluster_uuid, clustername=self.clusters[p.cluster_uuid].name)
        return r


# ---------------------------------------------------------------------------------------------
# The HTTP server


def _truthy(v: str | None) -> bool:
    return (v or "").lower() == "true"


def _project_visible(project_uuid: str | None, params: dict[str, str]) -> bool:
    """CloudStack's root-admin project rule: no projectid lists only non-project resources,
    projectid=-1 lists only project resources, a project uuid lists that project's."""
    want = params.get("projectid")
    if want is None:
        return project_uuid is None
    if want == "-1":
        return project_uuid is not None
    return project_uuid == want


class CloudStackSimulator:
    """The management server's HTTP API over a SimCloud, on 127.0.0.1, a free port."""

    def __init__(
        self,
        cloud: SimCloud | None = None,
        api_key: str | None = None,
        secret_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.cloud = cloud if cloud is not None else SimCloud()
        self.api_key = api_key or secrets.token_urlsafe(32)
        self.secret_key = secret_key or secrets.token_urlsafe(32)
        self._host, self._port = host, port
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.url = ""

    async def start(self) -> CloudStackSimulator:
        """Listen; `self.url` is the API endpoint afterwards."""
        app = web.Application()
        app.router.add_route("*", "/client/api", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.url = f"http://{self._host}:{port}/client/api"
        return self

    async def stop(self) -> None:
        """Stop listening and cancel pending jobs."""
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> CloudStackSimulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- request handling ---------------------------------------------------------------------

    @staticmethod
    def _reply(name: str, body: dict[str, Any], status: int = 200) -> web.Response:
        return web.Response(
            status=status,
            text=json.dumps({name: body}),
            content_type="application/json",
            charset="UTF-8",
        )

    def _error(self, name: str, err: ApiError) -> web.Response:
        body: dict[str, Any] = {"uuidList": [], "errorcode": err.code}
        if err.code != UNAUTHORIZED:
            body["cserrorcode"] = err.cs_code
        body["errortext"] = err.text
        return self._reply(name, body, err.code)

    def verify(self, params: dict[str, str]) -> bool:
        """ApiServer.verifyRequest over the request's parameters."""
        api_key = signature = version = expires = None
        for name, value in params.items():
            low = name.lower()
            if low == "signature":
                signature = value
            elif low == "apikey":
                api_key = value
            elif low == "signatureversion":
                version = value
            elif low == "expires":
                expires = value
        if signature is None or api_key is None:
            return False
        if version == "3":
            if expires is None:
                return False
            ts = _parse_expires(expires)
            if ts is None or ts.timestamp() < self.cloud.clock():
                return False
        if not hmac.compare_digest(api_key, self.api_key):
            return False
        expected = compute_signature(params, self.secret_key)
        return hmac.compare_digest(signature, expected)

    async def _handle(self, request: web.Request) -> web.Response:
        params: dict[str, str] = {}
        for k, v in request.query.items():
            params.setdefault(k, v)
        if request.method == "POST":
            for k, v in (await request.post()).items():
                if isinstance(v, str):
                    params.setdefault(k, v)
        command = params.get("command", "")
        name = f"{command.lower()}response" if command else "errorresponse"
        handler = getattr(self, f"_cmd_{command.lower()}", None) if command else None
        if handler is None:
            return self._error(
                "errorresponse",
                ApiError(
                    UNSUPPORTED_ACTION_ERROR,
                    "The given command does not exist or it is not available for user",
                ),
            )
        if not self.verify(params):
            return self._error(name, ApiError(UNAUTHORIZED, SIGNATURE_ERROR))
        self.cloud.calls.append((command, {k: v for k, v in params.items() if k != "signature"}))
        low = command.lower()
        if self.cloud.fail_next_calls.get(low, 0) > 0:
            self.cloud.fail_next_calls[low] -= 1
            return self._error(
                name, ApiError(INTERNAL_ERROR, f"Internal error executing command {command}")
            )
        try:
            body = handler(params)
        except ApiError as err:
            return self._error(name, err)
        if self.cloud.stall_next_calls.get(low, 0) > 0:
            # The answer is made now and arrives late: the cloud may have changed meanwhile.
            self.cloud.stall_next_calls[low] -= 1
            await asyncio.sleep(self.cloud.api_stall)
        return self._reply(name, body)

    def _page(
        self,
        key: str,
        items: list[Any],
        params: dict[str, str],
        render: Callable[[Any], dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """One page of `items` as CloudStack answers it (`render` turns the page's items into
        responses: only those of the asked page are built)."""
        if not items:
            return {}
        try:
            page = int(params.get("page", "1"))
            size = int(params.get("pagesize", str(DEFAULT_PAGE_SIZE)))
        except ValueError as exc:
            raise ApiError(
                PARAM_ERROR, f"Unable to execute API command due to invalid value: {exc}"
            ) from None
        if "page" in params and "pagesize" not in params:
            raise ApiError(PARAM_ERROR, '"pagesize" parameter is required when "page" is specified')
        if size == -1:
            chunk = items
        else:
            if page < 1 or size < 1:
                raise ApiError(PARAM_ERROR, "Invalid page/pagesize")
            chunk = items[(page - 1) * size : page * size]
        if not chunk:
            return {"count": len(items)}
        return {"count": len(items), key: [render(i) for i in chunk] if render else chunk}

    def _cmd_listzones(self, p: dict[str, str]) -> dict[str, Any]:
        zones = [
            {"id": z.uuid, "name": z.name, "allocationstate": "Enabled", "networktype": "Advanced"}
            for z in self.cloud.zones.values()
            if p.get("id") in (None, z.uuid)
        ]
        return self._page("zone", zones, p)

    def _cmd_listclusters(self, p: dict[str, str]) -> dict[str, Any]:
        out = []
        for c in self.cloud.clusters.values():
            if p.get("id") not in (None, c.uuid) or p.get("zoneid") not in (None, c.zone_uuid):
                continue
            z = self.cloud.zones[c.zone_uuid]
            out.append(
                {
                    "id": c.uuid,
                    "name": c.name,
                    "podid": z.pod_uuid,
                    "podname": z.pod_name,
                    "zoneid": z.uuid,
                    "zonename": z.name,
                    "hypervisortype": "KVM",
                    "clustertype": "CloudManaged",
                    "allocationstate": "Enabled",
                    "managedstate": "Managed",
                }
            )
        return self._page("cluster", out, p)

    def _cmd_listhosts(self, p: dict[str, str]) -> dict[str, Any]:
        out = []
        hosts: Iterable[Host] = self.cloud.hosts.values()
        if p.get("id") is not None:  # (an index, not a scan: 10,000 hosts in the scale run)
            one = self.cloud.hosts.get(p["id"]) or self.cloud.hosts.get(p["id"].lower())
            hosts = [one] if one is not None else []
        for h in hosts:
            c = self.cloud.clusters[h.cluster_uuid]
            checks = {
                "id": h.uuid,
                "type": h.type,
                "hypervisor": h.hypervisor,
                "clusterid": c.uuid,
                "zoneid": c.zone_uuid,
                "state": h.state,
                "resourcestate": h.resourcestate,
                "name": h.name,
            }
            if all(p.get(k) is None or p[k].lower() == v.lower() for k, v in checks.items()):
                out.append(h)
        return self._page("host", out, p, self.cloud.host_response)

    def _cmd_listvirtualmachines(self, p: dict[str, str]) -> dict[str, Any]:
        listall = _truthy(p.get("listall"))
        out = []
        for vm in self.cloud.vms.values():
            if not _project_visible(vm.project_uuid, p):
                continue
            if not listall and vm.account != "admin" and "projectid" not in p:
                continue
            if p.get("hostid") not in (None, vm.host_uuid) or p.get("id") not in (None, vm.uuid):
                continue
            if p.get("state") is not None and p["state"].lower() != vm.state.lower():
                continue
            out.append(self.cloud.vm_response(vm))
        return self._page("virtualmachine", out, p)

    def _cmd_listvolumes(self, p: dict[str, str]) -> dict[str, Any]:
        listall = _truthy(p.get("listall"))
        out = []
        for v in self.cloud.volumes.values():
            vm = self.cloud.vms.get(v.vm_uuid or "")
            if not _project_visible(vm.project_uuid if vm else None, p):
                continue
            if not listall and vm is not None and vm.account != "admin" and "projectid" not in p:
                continue
            if p.get("virtualmachineid") not in (None, v.vm_uuid) or p.get("id") not in (
                None,
                v.uuid,
            ):
                continue
            if p.get("storageid") not in (None, v.storage_uuid):
                continue
            out.append(self.cloud.volume_response(v))
        return self._page("volume", out, p)

    def _cmd_liststoragepools(self, p: dict[str, str]) -> dict[str, Any]:
        out = [
            self.cloud.pool_response(pool)
            for pool in self.cloud.pools.values()
            if p.get("id") in (None, pool.uuid)
            and p.get("clusterid") in (None, pool.cluster_uuid)
            and p.get("zoneid") in (None, pool.zone_uuid)
        ]
        return self._page("storagepool", out, p)

    def _async(self, command: str, p: dict[str, str]) -> dict[str, Any]:
        job = self.cloud.start_job(command, p)

        async def run() -> None:
            await asyncio.sleep(self.cloud.job_delay)
            self.cloud.finish_job(job)

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return {"jobid": job.id}

    def _cmd_declarehostasdegraded(self, p: dict[str, str]) -> dict[str, Any]:
        return self._async("declareHostAsDegraded", p)

    def _cmd_cancelhostasdegraded(self, p: dict[str, str]) -> dict[str, Any]:
        return self._async("cancelHostAsDegraded", p)

    def _cmd_preparehostformaintenance(self, p: dict[str, str]) -> dict[str, Any]:
        return self._async("prepareHostForMaintenance", p)

    def _cmd_cancelhostmaintenance(self, p: dict[str, str]) -> dict[str, Any]:
        return self._async("cancelHostMaintenance", p)

    def _cmd_queryasyncjobresult(self, p: dict[str, str]) -> dict[str, Any]:
        job = self.cloud.jobs.get(p.get("jobid", ""))
        if job is None:
            raise ApiError(PARAM_ERROR, f"Unable to find a job by id {p.get('jobid')}")
        r: dict[str, Any] = {
            "accountid": self.cloud.account_uuid,
            "userid": self.cloud.user_uuid,
            "cmd": job.cmd_class,
            "jobstatus": job.status,
            "jobprocstatus": 0,
            "jobresultcode": job.resultcode,
            "jobinstancetype": "Host",
            "jobinstanceid": job.instance_uuid,
            "created": api_time(job.created),
            "jobid": job.id,
        }
        if job.status != 0:
            r["jobresulttype"] = "object"
            r["jobresult"] = job.result
            r["completed"] = api_time(job.completed)
        return r
