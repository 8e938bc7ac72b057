"""Lab KVM hosts: real SSH servers over real files, whose disks and heartbeats move while the
host is alive.

Rule: each host is what a neighbour's probe would meet on a real hypervisor. It has its own
loopback address (127.0.2.N, so CloudStack's `ipaddress`, the heartbeat file name
`KVMHA/hb-<ip>` and the SSH endpoint agree, all hosts on one port as real hosts use 22), its own
host key, and an asyncssh server that runs exec requests in a real `bash` subprocess. All hosts
share one mount root (`<root>/mnt/<pool uuid>/`, the NFS pools' "exports"), where a writer task
per host touches the disk files of the VMs that SimCloud says run on it (its qemu processes) and,
while its CloudStack agent runs, writes epoch seconds into its heartbeat file on every NFS pool
every `interval` seconds: in CloudStack the heartbeat writer (KVMHAMonitor) lives inside the
agent, so an agent that dies stops the heartbeat while the VMs keep writing their disks.

Clocks: heartbeat CONTENT is the host's clock (`date +%s`); every mtime is stamped by the filer,
so `KvmLab.filer_offset` seconds (either sign) are added to each mtime the lab writes, and `stat`
on any neighbour reports the filer's clock, as on NFS. Pools of other types (RBD, ...) have no
mount point and no heartbeat; their volumes are written by no file a probe could stat.

Faults: `agent_dies` (CloudStack loses the agent; its heartbeat stops, the VMs keep writing),
`heartbeat_age` (what CloudStack's investigator reads through a neighbour),
`agent_recovers`, `crash` (every write stops, SSH is gone), `power_off`/`power_on` (for the BMC
simulator), idle VMs (`KvmLab.set_vm_idle`, `LabKvmHost.idle`: disks not written),
`vms_restarted_elsewhere` (a still-running host keeps writing the VMs CloudStack restarted
elsewhere: split brain, as on a real cloud), `storage_outage` (the pool's mount point disappears
for everyone), `ssh_unreachable` (refused, or accepted and never answered), `slow_exec` (commands
hang after partial output), `recover`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncssh

from lab.cloudstack_sim import Cluster, Host, SimCloud

LAB_NET = "127.0.2."
# Pool types a KVM host mounts as a directory (`/mnt/<pool uuid>`) and heartbeats on.
MOUNTED_POOL_TYPES = {"NetworkFilesystem"}


def _run_bash(command: str, stdin: str) -> tuple[int, bytes, bytes]:
    # Blocking, in the lab's thread pool: Python 3.11's asyncio child watcher starts a thread
    # per process, which made the lab, not the probe, the bottleneck of a 500-check round.
    p = subprocess.run(["bash", "-c", command], input=stdin.encode(), capture_output=True)
    return p.returncode, p.stdout, p.stderr


class _Session(asyncssh.SSHServer):
    def __init__(self, lab_host: LabKvmHost) -> None:
        self.lab_host = lab_host

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.lab_host._conns.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lab_host._conns = {c for c in self.lab_host._conns if not c.is_closed()}


class LabKvmHost:
    """One simulated hypervisor: SSH endpoint, writer task, faults."""

    def __init__(self, lab: KvmLab, cloud_host: Host) -> None:
        self.lab = lab
        self.cloud_host = cloud_host
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.powered = True
        self.writing = True
        self.agent_running = True  # the CloudStack agent, and KVMHAMonitor inside it
        self.idle = False  # every VM here is idle: its disks are not written
        # VMs CloudStack restarted elsewhere while this host still ran them (split brain).
        self.lingering: set[str] = set()
        self.ssh_mode = "up"  # up | refuse | hang
        self.exec_delay: float | None = None  # slow_exec: seconds to hang after partial output
        self.execs = 0
        self._server: asyncssh.SSHAcceptor | None = None
        self._hang: asyncio.Server | None = None
        self._writer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: set[asyncssh.SSHServerConnection] = set()

    @property
    def ip(self) -> str:
        """The host's address (CloudStack's ipaddress)."""
        return self.cloud_host.ip

    @property
    def uuid(self) -> str:
        """The CloudStack host uuid."""
        return self.cloud_host.uuid

    @property
    def name(self) -> str:
        """The CloudStack host name."""
        return self.cloud_host.name

    # --- SSH ----------------------------------------------------------------------------------

    async def _handle(self, proc: asyncssh.SSHServerProcess[str]) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            self.execs += 1
            if not proc.command:
                proc.stderr.write("lab host: exec requests only\n")
                proc.exit(1)
                return
            data = await proc.stdin.read() if proc.stdin else ""
            loop = asyncio.get_running_loop()
            done = await loop.run_in_executor(self.lab.executor, _run_bash, proc.command, data)
            code, out, err = done
            text = out.decode(errors="replace")
            if self.exec_delay is not None:
                # A hung NFS mount: part of the answer, then nothing until the client gives up.
                proc.stdout.write(text[: len(text) // 2])
                await asyncio.sleep(self.exec_delay)
            proc.stdout.write(text)
            proc.stderr.write(err.decode(errors="replace"))
            proc.exit(code)
        except (asyncssh.Error, BrokenPipeError, ConnectionError):
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def start_ssh(self) -> None:
        """Listen for SSH (or, in `hang` mode, accept TCP and never speak)."""
        await self.stop_ssh()
        if self.ssh_mode == "up":
            self._server = await asyncssh.create_server(
                lambda: _Session(self),
                self.ip,
                self.lab.port,
                server_host_keys=[self.host_key],
                authorized_client_keys=self.lab.authorized_keys,
                process_factory=self._handle,
                encoding="utf-8",
                keepalive_interval=0,
                reuse_address=True,
            )
        elif self.ssh_mode == "hang":

            async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                with contextlib.suppress(Exception):
                    await r.read()
                w.close()

            self._hang = await asyncio.start_server(
                silent, self.ip, self.lab.port, reuse_address=True
            )

    async def stop_ssh(self) -> None:
        """Stop listening and drop every session (a powered-off host answers nothing)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for conn in list(self._conns):
            conn.abort()
        self._conns.clear()
        for t in list(self._tasks):
            t.cancel()
        if self._hang is not None:
            self._hang.close()
            if hasattr(self._hang, "close_clients"):
                self._hang.close_clients()
            await self._hang.wait_closed()
            self._hang = None

    # --- writes -------------------------------------------------------------------------------

    def pools(self) -> list[str]:
        """The pools this host mounts (its cluster's and the zone-wide NFS pools)."""
        cloud = self.lab.cloud
        zone = cloud.clusters[self.cloud_host.cluster_uuid].zone_uuid
        return [
            p.uuid
            for p in cloud.pools.values()
            if p.type in MOUNTED_POOL_TYPES
            and (
                p.cluster_uuid == self.cloud_host.cluster_uuid
                or (p.scope == "ZONE" and p.zone_uuid == zone)
            )
        ]

    def vms(self) -> list[str]:
        """VMs whose qemu runs here now: CloudStack's Running VMs of this host, plus any it
        restarted elsewhere while this host kept running them."""
        cloud = self.lab.cloud
        here = [
            vm.uuid
            for vm in cloud.vms.values()
            if vm.host_uuid == self.uuid and vm.state == "Running"
        ]
        return here + sorted(self.lingering - set(here))

    def disk_files(self, vms: Iterable[str] | None = None) -> list[Path]:
        """Disk files (on mounted pools) of the VMs that run here now (or of `vms`)."""
        cloud = self.lab.cloud
        running = set(self.vms() if vms is None else vms)
        return [
            self.lab.mount_root / v.storage_uuid / v.path
            for v in cloud.volumes.values()
            if v.vm_uuid in running and cloud.pools[v.storage_uuid].type in MOUNTED_POOL_TYPES
        ]

    def written_disks(self) -> list[Path]:
        """Disk files the host writes on its next round (busy VMs only)."""
        if self.idle:
            return []
        return self.disk_files(v for v in self.vms() if v not in self.lab.idle_vms)

    def heartbeat_file(self, pool_uuid: str) -> Path:
        """CloudStack's heartbeat file for this host on a pool."""
        return self.lab.mount_root / pool_uuid / "KVMHA" / f"hb-{self.ip}"

    def write_once(self) -> None:
        """One round of the host's writes: heartbeats (while the agent runs), then the disks of
        every busy VM. Content is the host's clock; every mtime is the filer's."""
        now = time.time()
        if self.agent_running:
            for pool in self.pools():
                with contextlib.suppress(OSError):  # storage outage: the write fails, as on NFS
                    self.lab.write_stamped(self.heartbeat_file(pool), f"{int(now)}\n", now)
        for disk in self.written_disks():
            with contextlib.suppress(OSError):
                self.lab.stamp(disk, now)

    async def _write_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lab.interval)  # start() has just written once
            if self.powered and self.writing:
                await asyncio.to_thread(self.write_once)

    # --- faults -------------------------------------------------------------------------------

    def agent_dies(self, state: str = "Disconnected") -> None:
        """The agent dies: its connection closes (CloudStack investigates at once: see
        SimCloud.agent_lost) and its heartbeat writes stop; the host and its VMs keep running
        (their disks keep being written), SSH still answers. Without the simulator's host FSM,
        CloudStack shows `state` at once."""
        self.agent_running = False
        self.lab.cloud.agent_lost(self.uuid)
        if not self.lab.cloud.host_fsm and state != "Disconnected":
            self.lab.cloud.set_host_state(self.uuid, state)

    def agent_recovers(self) -> None:
        """The agent is restarted: it reconnects (Connecting, then Up with the simulator's host
        FSM; Up at once without) and its heartbeat resumes at once."""
        self.agent_running = True
        self.lab.cloud.agent_connected(self.uuid)
        if self.powered:
            self.write_once()

    async def crash(self, state: str | None = "Disconnected") -> None:
        """The host dies: every write stops, SSH is gone (its BMC stays up elsewhere). Its
        agent's connection does not close: with the simulator's host FSM CloudStack notices
        only when the agent is behind on ping (`state` is not used); without it, CloudStack
        shows `state` at once (None: not yet)."""
        self.powered = False
        self.agent_running = False
        self.lingering.clear()  # its qemu processes died with it
        await self.stop_ssh()
        self.lab.cloud.agent_silent(self.uuid)
        if state is not None and not self.lab.cloud.host_fsm:
            self.lab.cloud.set_host_state(self.uuid, state)

    async def power_off(self) -> None:
        """The BMC cut the power."""
        await self.crash(state=None)

    async def power_on(self, reconnect: bool = True) -> None:
        """The BMC powered the host on: it boots, writes and (optionally) its agent starts,
        reconnects and heartbeats again."""
        self.powered = True
        self.ssh_mode = "up"
        await self.start_ssh()
        if reconnect:
            self.agent_running = True
            self.lab.cloud.agent_connected(self.uuid)

    def vms_restarted_elsewhere(
        self, vms: Iterable[str] | None = None, target: str | None = None
    ) -> dict[str, str]:
        """CloudStack's own VM-HA restarts VMs of this host (all its Running ones by default)
        on another Up host (`target` uuid, or the cluster's first): listVirtualMachines shows
        the new hostid and the new host writes their disks from its next round. CloudStack
        does this only for a host it no longer reaches; if this host still runs, its qemu
        keeps writing them too (split brain). Returns {vm uuid: new host uuid}; a VM no host
        could take stays Stopped and is not in it."""
        cloud = self.lab.cloud
        state = cloud.hosts[self.uuid].state
        if state not in ("Disconnected", "Alert", "Down"):
            raise ValueError(f"host {self.name} is {state}: CloudStack HA restarts no VM of it")
        ours = [
            vm.uuid
            for vm in cloud.vms.values()
            if vm.host_uuid == self.uuid and vm.state == "Running"
        ]
        chosen = ours if vms is None else list(vms)
        for u in chosen:
            if u not in ours:
                raise ValueError(f"VM {u} does not run on {self.name} for CloudStack")
        moved: dict[str, str] = {}
        for u in chosen:
            if self.powered:
                self.lingering.add(u)
            new = cloud.restart_vm_elsewhere(u, target)
            if new is not None:
                moved[u] = new
        return moved

    async def ssh_unreachable(self, mode: str = "refuse") -> None:
        """The neighbour cannot be reached over SSH: `refuse` (port closed) or `hang`."""
        self.ssh_mode = mode
        await self.start_ssh()

    def slow_exec(self, seconds: float | None) -> None:
        """Commands write half their output, then hang for `seconds` (None: normal again)."""
        self.exec_delay = seconds

    async def recover(self) -> None:
        """Back to normal: powered, writing, SSH up, agent Up."""
        self.writing = True
        self.exec_delay = None
        await self.power_on(reconnect=True)


class KvmLab:
    """Every lab KVM host of a SimCloud, their shared storage and the client's SSH identity."""

    def __init__(
        self, cloud: SimCloud, root: str | os.PathLike[str] | None = None, interval: float = 2.0
    ) -> None:
        self.cloud = cloud
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="fencer-lab-"))
        self.mount_root = self.root / "mnt"
        self.interval = interval
        self.port = 0
        self.client_key = asyncssh.generate_private_key("ssh-ed25519")
        self.authorized_keys = asyncssh.import_authorized_keys(
            self.client_key.export_public_key().decode()
        )
        self.client_key_file = self.root / "id_ed25519"
        self.known_hosts_file = self.root / "known_hosts"
        self.hosts: dict[str, LabKvmHost] = {}
        self.filer_offset = 0.0  # seconds the filer's clock is ahead (negative: behind)
        self.idle_vms: set[str] = set()  # VMs whose disks are not written, wherever they run
        self._next_ip = 11
        self.executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="lab-exec")

    def add_host(self, cluster: Cluster, name: str) -> LabKvmHost:
        """A CloudStack host plus its lab machine (address 127.0.2.N)."""
        ip = f"{LAB_NET}{self._next_ip}"
        self._next_ip += 1
        h = LabKvmHost(self, self.cloud.add_host(cluster, name, ip))
        self.hosts[h.uuid] = h
        return h

    def by_name(self, name: str) -> LabKvmHost:
        """A lab host by CloudStack name."""
        return next(h for h in self.hosts.values() if h.name == name)

    def ensure_files(self) -> None:
        """Create every NFS pool directory, KVMHA directory and volume file CloudStack knows of
        (volumes on other pool types have no file)."""
        now = time.time()
        for pool in self.cloud.pools.values():
            if pool.type in MOUNTED_POOL_TYPES:
                (self.mount_root / pool.uuid / "KVMHA").mkdir(parents=True, exist_ok=True)
        for v in self.cloud.volumes.values():
            if self.cloud.pools[v.storage_uuid].type not in MOUNTED_POOL_TYPES:
                continue
            f = self.mount_root / v.storage_uuid / v.path
            if f.parent.is_dir() and not f.exists():
                f.write_bytes(b"QFI\xfb")
                self.stamp(f, now)

    # --- the filer's clock --------------------------------------------------------------------

    def stamp(self, path: Path, at: float) -> None:
        """Set `path`'s mtime as the filer stamps a write made at `at` (host clock)."""
        t = at + self.filer_offset
        os.utime(path, (t, t))

    def write_stamped(self, path: Path, text: str, at: float) -> None:
        """Write `text` into `path` (replaced whole, so a reader never sees half of it) with the
        filer's mtime for a write made at `at`."""
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        self.stamp(tmp, at)
        os.replace(tmp, path)

    def set_filer_offset(self, seconds: float) -> None:
        """The filer's clock runs `seconds` ahead of the hosts' (negative: behind)."""
        self.filer_offset = float(seconds)

    def set_vm_idle(self, vm_uuid: str, idle: bool = True) -> None:
        """The VM stops (or resumes) writing its disks, wherever it runs."""
        if vm_uuid not in self.cloud.vms:
            raise KeyError(f"no VM {vm_uuid} in the simulated cloud")
        if idle:
            self.idle_vms.add(vm_uuid)
        else:
            self.idle_vms.discard(vm_uuid)

    def heartbeat_age(self, host: Host, neighbour: Host) -> float | None:
        """What CloudStack's investigator learns from `neighbour` (kvmheartbeat.sh -r): the
        neighbour's clock minus the newest heartbeat content of `host` on the NFS pools it
        mounts (as CloudStack compares them: two machines' clocks); None when it reads none
        (no NFS pool, storage out, the neighbour powered off)."""
        lab_host = self.hosts.get(host.uuid)
        near = self.hosts.get(neighbour.uuid)
        if lab_host is None or near is None or not near.powered:
            return None
        beats: list[int] = []
        for pool in lab_host.pools():
            try:
                beats.append(int(lab_host.heartbeat_file(pool).read_text().strip()))
            except (OSError, ValueError):
                continue
        # kvmheartbeat.sh -r: `expr $(date +%s) - $(cat hb-<ip>)`, whole seconds.
        return float(int(time.time()) - max(beats)) if beats else None

    def write_identity(self) -> None:
        """The client key and a known_hosts file naming every host's key at its address."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.client_key.write_private_key(str(self.client_key_file))
        os.chmod(self.client_key_file, 0o600)
        lines = [
            f"[{h.ip}]:{self.port} {h.host_key.export_public_key().decode().strip()}"
            for h in self.hosts.values()
        ]
        self.known_hosts_file.write_text("\n".join(lines) + "\n")

    async def start(self, hosts: Iterable[LabKvmHost] | None = None) -> KvmLab:
        """Files, SSH servers on one shared port, writers."""
        self.ensure_files()
        chosen = list(hosts) if hosts is not None else list(self.hosts.values())
        for _ in range(10):
            try:
                for h in chosen:
                    await h.start_ssh()
                    if self.port == 0 and h._server is not None:
                        self.port = h._server.sockets[0].getsockname()[1]
                break
            except OSError:
                for h in chosen:
                    await h.stop_ssh()
                self.port = 0
        else:
            raise RuntimeError("lab: no port free on every lab address")
        self.write_identity()
        for h in chosen:
            h.write_once()
            h._writer = asyncio.create_task(h._write_loop())
        return self

    async def stop(self) -> None:
        """Stop every writer and server; remove the temp root if the lab made it."""
        for h in self.hosts.values():
            if h._writer is not None:
                h._writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await h._writer
                h._writer = None
            await h.stop_ssh()
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    async def __aenter__(self) -> KvmLab:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def storage_outage(self, pool_uuid: str | None = None) -> None:
        """The pool's mount point vanishes for every host (all pools when None)."""
        for p in [pool_uuid] if pool_uuid else list(self.cloud.pools):
            src = self.mount_root / p
            if src.exists():
                src.rename(self.mount_root / f".{p}.offline")

    def storage_restored(self, pool_uuid: str | None = None) -> None:
        """The pool comes back."""
        for p in [pool_uuid] if pool_uuid else list(self.cloud.pools):
            off = self.mount_root / f".{p}.offline"
            if off.exists():
                off.rename(self.mount_root / p)

    def ssh_settings(self) -> dict[str, object]:
        """The `ssh` section of FencerSettings that reaches these hosts."""
        return {
            "user": "root",
            "key_file": str(self.client_key_file),
            "known_hosts": str(self.known_hosts_file),
            "port": self.port,
            "mount_root": str(self.mount_root),
            "connect_timeout": 2.0,
            "command_timeout": 5.0,
        }
