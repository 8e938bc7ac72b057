"""Lab KVM hosts: real SSH servers over real files, whose disks and heartbeats move while the
host is alive.

Rule: each host is what a neighbour's probe would meet on a real hypervisor. It has its own
loopback address (127.0.2.N, so CloudStack's `ipaddress`, the heartbeat file name
`KVMHA/hb-<ip>` and the SSH endpoint agree, all hosts on one port as real hosts use 22), its own
host key, and an asyncssh server that runs exec requests in a real `bash` subprocess. All hosts
share one mount root (`<root>/mnt/<pool uuid>/`, the pools' "NFS exports"), where a writer task
per host touches the disk files of the VMs that SimCloud says run on it and writes epoch seconds
into its heartbeat file every `interval` seconds, as KVMHAMonitor does.

Faults: `agent_dies` (CloudStack loses the agent, the host keeps writing), `crash` (writes stop,
SSH is gone), `power_off`/`power_on` (for the BMC simulator), `storage_outage` (the pool's mount
point disappears for everyone), `ssh_unreachable` (refused, or accepted and never answered),
`slow_exec` (commands hang after partial output), `recover`.
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
        """The pools this host mounts (its cluster's and the zone-wide ones)."""
        cloud = self.lab.cloud
        zone = cloud.clusters[self.cloud_host.cluster_uuid].zone_uuid
        return [
            p.uuid
            for p in cloud.pools.values()
            if p.cluster_uuid == self.cloud_host.cluster_uuid
            or (p.scope == "ZONE" and p.zone_uuid == zone)
        ]

    def disk_files(self) -> list[Path]:
        """Disk files of the VMs that run here now."""
        cloud = self.lab.cloud
        running = {
            vm.uuid
            for vm in cloud.vms.values()
            if vm.host_uuid == self.uuid and vm.state == "Running"
        }
        return [
            self.lab.mount_root / v.storage_uuid / v.path
            for v in cloud.volumes.values()
            if v.vm_uuid in running
        ]

    def heartbeat_file(self, pool_uuid: str) -> Path:
        """CloudStack's heartbeat file for this host on a pool."""
        return self.lab.mount_root / pool_uuid / "KVMHA" / f"hb-{self.ip}"

    def write_once(self) -> None:
        """One round of the host's writes: heartbeats, then every running VM's disks."""
        now = time.time()
        for pool in self.pools():
            hb = self.heartbeat_file(pool)
            with contextlib.suppress(OSError):  # storage outage: the write fails, as on NFS
                hb.write_text(f"{int(now)}\n")
        for disk in self.disk_files():
            with contextlib.suppress(OSError):
                os.utime(disk, (now, now))

    async def _write_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lab.interval)  # start() has just written once
            if self.powered and self.writing:
                await asyncio.to_thread(self.write_once)

    # --- faults -------------------------------------------------------------------------------

    def agent_dies(self, state: str = "Disconnected") -> None:
        """CloudStack loses the agent; the host keeps running and writing."""
        self.lab.cloud.set_host_state(self.uuid, state)

    async def crash(self, state: str | None = "Disconnected") -> None:
        """The host dies: writes stop, SSH is gone (its BMC stays up elsewhere)."""
        self.powered = False
        await self.stop_ssh()
        if state is not None:
            self.lab.cloud.set_host_state(self.uuid, state)

    async def power_off(self) -> None:
        """The BMC cut the power."""
        await self.crash(state=None)

    async def power_on(self, reconnect: bool = True) -> None:
        """The BMC powered the host on: it boots, writes and (optionally) its agent reconnects."""
        self.powered = True
        self.ssh_mode = "up"
        await self.start_ssh()
        if reconnect:
            self.lab.cloud.set_host_state(self.uuid, "Up")

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
        """Create every pool directory, KVMHA directory and volume file CloudStack knows of."""
        for pool in self.cloud.pools.values():
            (self.mount_root / pool.uuid / "KVMHA").mkdir(parents=True, exist_ok=True)
        for v in self.cloud.volumes.values():
            f = self.mount_root / v.storage_uuid / v.path
            if f.parent.is_dir() and not f.exists():
                f.write_bytes(b"QFI\xfb")

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
