"""A real single-node Ceph (Debian's 16.2 packages): one monitor and one memstore OSD, no
manager, no systemd, everything under one directory, for tests and the lab.

Rule: nothing here is simulated. `CephCluster.start()` builds the cluster from nothing as
/work/shared/research/ceph.md describes (keyrings, monmap, mon mkfs, OSD mkfs, pool `rbd`) on
free loopback ports; `stop()` ends the daemons it started, by PID. Clients that hold a watch on
an image (`RbdClient`, a librbd process under the system Python) can bind to a chosen loopback
address, so each lab host's watchers carry that host's own address, as on a storage network.

Quirks met on 16.2 (see ceph.md): `admin socket` only in the daemon sections (in [global] every
client fails); `ceph-osd --mkfs` needs `--no-mon-config`; without a manager `ceph -s` shows
nothing and `ceph pg stat` hangs, so only mon and OSD commands are used; a stopped daemon can
stay a zombie a few seconds. Clients ping their watches every `objecter tick interval`, so the
short watch timeout used here comes with a one-second tick.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

from streams.broker import die_with_parent

CEPH_PACKAGES = ("ceph-mon", "ceph-osd", "ceph-common")
# fencer's two Ceph keys (docs/operators-guide.md, "Ceph RBD"). The probe's key reads only: the
# monitor cap of `profile rbd` would also allow `osd blocklist`, so it gets `allow r`.
PROBE_CAPS = {"mon": "allow r", "osd": "profile rbd-read-only"}
# The actuator's key may blocklist (add, rm, ls) and read watchers, nothing else.
FENCE_CAPS = {"mon": 'allow r, allow command "osd blocklist"', "osd": "profile rbd-read-only"}
SYSTEM_PYTHON = "/usr/bin/python3"  # the interpreter python3-rbd (ceph-common) is built for
SOURCE_ADDR_ENV = "FENCER_LAB_SOURCE_ADDR"
# The lab's and the tests' osd_client_watch_timeout (Ceph's default is 30 s): a dead client's
# watch lingers this long, so an RBD host can be called stale that much sooner.
LAB_WATCH_TIMEOUT = 5

# Ceph clients take their address from the connection the monitor sees, and neither
# `public_addr` nor `ms_bind_before_connect` makes librados bind (checked on 16.2: the learned
# address stays 127.0.0.1). A lab host's clients must carry the host's own loopback address, as
# a hypervisor's clients carry its storage-network address, so this preloaded shim binds every
# IPv4 socket to $FENCER_LAB_SOURCE_ADDR before it connects. Only the lab's client processes
# load it; the daemons and the probe's CLI run as installed.
_BIND_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>

int connect(int fd, const struct sockaddr *addr, socklen_t len) {
    static int (*real)(int, const struct sockaddr *, socklen_t);
    if (!real) real = dlsym(RTLD_NEXT, "connect");
    const char *src = getenv("FENCER_LAB_SOURCE_ADDR");
    if (src && addr && addr->sa_family == AF_INET) {
        struct sockaddr_in b = {0};
        b.sin_family = AF_INET;
        if (inet_pton(AF_INET, src, &b.sin_addr) == 1)
            bind(fd, (struct sockaddr *)&b, sizeof b);
    }
    return real(fd, addr, len);
}
"""


class CephError(Exception):
    """The cluster could not be built or a command failed; the message names the step."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ceph_installed() -> str | None:
    """None when the Ceph tools are here, else what is missing."""
    missing = [
        t for t in ("ceph-mon", "ceph-osd", "ceph", "rbd", "monmaptool") if not shutil.which(t)
    ]
    return (
        f"missing {', '.join(missing)} (apt-get install {' '.join(CEPH_PACKAGES)})"
        if missing
        else None
    )


# A librbd client that opens one image (so it holds a watch, as QEMU does), then obeys stdin:
# `w` writes 4 KiB at offset 0 and flushes, answering `ok` or `err <errno>`; EOF closes.
_CLIENT = textwrap.dedent(
    """
    import sys, rados, rbd
    conf, user, keyring, pool, image, addr = sys.argv[1:7]
    c = rados.Rados(conffile=conf, rados_id=user, conf={"keyring": keyring})
    c.conf_set("rbd_mtime_update_interval", "1")
    c.connect(timeout=10)
    io = c.open_ioctx(pool)
    img = rbd.Image(io, image)
    print("open", flush=True)
    for line in sys.stdin:
        try:
            img.write(b"x" * 4096, 0)
            img.flush()
            print("ok", flush=True)
        except rbd.Error as e:
            print("err", getattr(e, "errno", "?"), flush=True)
    """
)


class RbdClient:
    """A process with an RBD image open (a watcher), bound to `address`."""

    def __init__(self, cluster: CephCluster, pool: str, image: str, address: str = "") -> None:
        self.cluster, self.pool, self.image, self.address = cluster, pool, image, address
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> RbdClient:
        """Open the image; returns once the watch is registered."""
        return self.spawn().wait_open()

    def spawn(self) -> RbdClient:
        """Start the process (it opens the image); `wait_open` waits for the watch. Several
        clients spawned first and waited for after open their images in parallel."""
        parent = os.getpid()
        self.proc = subprocess.Popen(
            [
                SYSTEM_PYTHON,
                "-c",
                _CLIENT,
                str(self.cluster.conf),
                "admin",
                str(self.cluster.admin_keyring),
                self.pool,
                self.image,
                self.address,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.cluster.env(self.address),
            preexec_fn=lambda: die_with_parent(parent),
        )
        return self

    def wait_open(self) -> RbdClient:
        """Wait until the spawned client holds its watch (it gives up after 10 s)."""
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "open":
            self.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            self.close()
            raise CephError(f"rbd client could not open {self.pool}/{self.image}: {err[-400:]}")
        return self

    @property
    def running(self) -> bool:
        """The process still runs (it holds its watch unless blocklisted)."""
        return self.proc is not None and self.proc.poll() is None

    def write(self) -> str:
        """One write through librbd: `ok` or `err <errno>`."""
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write("w\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def kill(self) -> None:
        """SIGKILL: the host died; its watch lingers until the OSD's watch timeout."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        """Close the image cleanly (the watch goes at once)."""
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
        for f in (self.proc.stdout, self.proc.stderr) if self.proc else ():
            if f is not None:
                f.close()

    def __enter__(self) -> RbdClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class CephCluster:
    """One monitor, one memstore OSD, pool `rbd`, under `base` (a temp dir if None)."""

    def __init__(self, base: str | os.PathLike[str] | None = None, watch_timeout: int = 5) -> None:
        self._own_base = base is None
        self.base = Path(base or tempfile.mkdtemp(prefix="fencer-ceph-"))
        self.watch_timeout = watch_timeout
        self.fsid = str(uuid.uuid4())
        self.v2_port = _free_port()
        self.v1_port = _free_port()
        self.mon: subprocess.Popen[bytes] | None = None
        self.osd: subprocess.Popen[bytes] | None = None
        self.started_in: float | None = None

    @property
    def conf(self) -> Path:
        return self.base / "ceph.conf"

    @property
    def admin_keyring(self) -> Path:
        return self.base / "ceph.client.admin.keyring"

    @property
    def mon_host(self) -> str:
        return f"[v2:127.0.0.1:{self.v2_port},v1:127.0.0.1:{self.v1_port}]"

    def env(self, source_addr: str = "") -> dict[str, str]:
        """The environment every command gets (CEPH_CONF points at this cluster); with
        `source_addr`, the client's connections come from that loopback address."""
        env = {**os.environ, "CEPH_CONF": str(self.conf)}
        env.pop("CEPH_ARGS", None)
        if source_addr:
            env.update(LD_PRELOAD=str(self._shim()), **{SOURCE_ADDR_ENV: source_addr})
        return env

    def _shim(self) -> Path:
        so = self.base / "bind_source.so"
        if not so.exists():
            src = self.base / "bind_source.c"
            src.write_text(_BIND_SHIM)
            cc = shutil.which("cc") or shutil.which("gcc")
            if cc is None:
                raise CephError("no C compiler (cc) to build the lab's source-address shim")
            self.run(cc, "-shared", "-fPIC", "-O2", "-o", str(so), str(src), "-ldl")
        return so

    def run(
        self, *argv: str, timeout: float = 30.0, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """One CLI command as client.admin."""
        try:
            p = subprocess.run(
                list(argv),
                capture_output=True,
                text=True,
                timeout=timeout,
                env=self.env(),
                input=input,
            )
        except subprocess.TimeoutExpired as exc:
            raise CephError(f"{' '.join(argv[:3])}: no answer within {timeout:g} s") from exc
        if check and p.returncode != 0:
            raise CephError(f"{' '.join(argv[:4])}: exit {p.returncode}: {p.stderr.strip()[-400:]}")
        return p

    def _write_conf(self) -> None:
        b = self.base
        self.conf.write_text(
            textwrap.dedent(
                f"""\
                [global]
                fsid = {self.fsid}
                mon initial members = a
                mon host = {self.mon_host}
                public addr = 127.0.0.1
                cluster addr = 127.0.0.1
                public network = 127.0.0.0/8
                auth cluster required = cephx
                auth service required = cephx
                auth client required = cephx
                run dir = {b}/run
                log file = {b}/log/$name.log
                keyring = {b}/$cluster.$name.keyring
                crash dir = {b}/crash
                osd pool default size = 1
                osd pool default min size = 1
                osd pool default pg autoscale mode = off
                osd crush chooseleaf type = 0
                mon allow pool size one = true
                mon allow pool delete = true
                mon warn on pool no redundancy = false
                mon data avail warn = 5
                auth allow insecure global id reclaim = false
                paxos propose interval = 0.05
                osd client watch timeout = {self.watch_timeout}
                objecter tick interval = 1
                mon mgr mkfs grace = 31536000
                [mon]
                admin socket = {b}/run/$name.asok
                pid file = {b}/run/$name.pid
                mon data = {b}/data/mon.$id
                keyring = {b}/data/mon.$id/keyring
                mon cluster log file = {b}/log/$cluster.log
                [osd]
                admin socket = {b}/run/$name.asok
                pid file = {b}/run/$name.pid
                osd data = {b}/data/osd.$id
                keyring = {b}/data/osd.$id/keyring
                osd objectstore = memstore
                memstore device bytes = 268435456
                """
            )
        )

    def start(self) -> CephCluster:
        """Build and start the cluster; returns once pool `rbd` is ready."""
        problem = ceph_installed()
        if problem:
            raise CephError(problem)
        began = time.monotonic()
        b = self.base
        for d in ("run", "log", "crash", "data/mon.a", "data/osd.0"):
            (b / d).mkdir(parents=True, exist_ok=True)
        self._write_conf()
        mon_keyring = b / "mon.keyring"
        self.run(
            "ceph-authtool",
            "--create-keyring",
            str(mon_keyring),
            "--gen-key",
            "-n",
            "mon.",
            "--cap",
            "mon",
            "allow *",
        )
        self.run(
            "ceph-authtool",
            "--create-keyring",
            str(self.admin_keyring),
            "--gen-key",
            "-n",
            "client.admin",
            "--cap",
            "mon",
            "allow *",
            "--cap",
            "osd",
            "allow *",
            "--cap",
            "mds",
            "allow *",
            "--cap",
            "mgr",
            "allow *",
        )
        self.run("ceph-authtool", str(mon_keyring), "--import-keyring", str(self.admin_keyring))
        monmap = b / "monmap"
        self.run(
            "monmaptool", "--create", "--addv", "a", self.mon_host, "--fsid", self.fsid, str(monmap)
        )
        self.run(
            "ceph-mon", "--mkfs", "-i", "a", "--monmap", str(monmap), "--keyring", str(mon_keyring)
        )
        self.start_mon()
        osd_uuid = str(uuid.uuid4())
        osd_id = self.run("ceph", "--connect-timeout", "30", "osd", "new", osd_uuid).stdout.strip()
        if osd_id != "0":
            raise CephError(f"ceph osd new: expected id 0, got {osd_id!r}")
        self.run(
            "ceph-osd", "-i", "0", "--mkfs", "--mkkey", "--osd-uuid", osd_uuid, "--no-mon-config"
        )
        self.run(
            "ceph",
            "auth",
            "add",
            "osd.0",
            "osd",
            "allow *",
            "mon",
            "allow profile osd",
            "mgr",
            "allow profile osd",
            "-i",
            str(b / "data/osd.0/keyring"),
        )
        self.osd = self._daemon("ceph-osd", "-f", "-i", "0")
        deadline = time.monotonic() + 60
        while True:
            stat = json.loads(self.run("ceph", "osd", "stat", "-f", "json").stdout)
            if stat.get("num_up_osds") == 1:
                break
            if time.monotonic() > deadline or self.osd.poll() is not None:
                raise CephError(f"osd.0 did not come up (see {b}/log/osd.0.log)")
            time.sleep(0.05)
        self.run("ceph", "osd", "pool", "create", "rbd", "8")
        self.run("rbd", "pool", "init", "rbd")
        self._shim()
        self.started_in = time.monotonic() - began
        return self

    def _daemon(self, *argv: str) -> subprocess.Popen[bytes]:
        # Killed by the kernel if the thread that started it dies (an interrupted test run).
        parent = os.getpid()
        return subprocess.Popen(
            list(argv),
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.base / "log" / f"{argv[0]}.stderr", "ab"),
            start_new_session=True,
            preexec_fn=lambda: die_with_parent(parent),
        )

    def start_mon(self) -> None:
        """Start (or restart) the monitor."""
        self.mon = self._daemon("ceph-mon", "-f", "-i", "a")
        deadline = time.monotonic() + 30
        while (
            self.run(
                "ceph", "--connect-timeout", "5", "mon", "stat", check=False, timeout=10
            ).returncode
            != 0
        ):
            if time.monotonic() > deadline or self.mon.poll() is not None:
                raise CephError(f"mon.a did not answer (see {self.base}/log/mon.a.log)")
            time.sleep(0.05)

    def stop_mon(self) -> None:
        """Stop the monitor: the cluster cannot be asked any more."""
        self._stop(self.mon)
        self.mon = None

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes] | None) -> None:
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        """Stop both daemons; remove the directory if the cluster made it."""
        self._stop(self.osd)
        self._stop(self.mon)
        self.osd = self.mon = None
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> CephCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what tests and the lab need ------------------------------------------------------------

    def create_image(self, name: str, pool: str = "rbd", size_mb: int = 16) -> str:
        """A new image; returns `pool/name`."""
        self.run("rbd", "create", "--size", str(size_mb), f"{pool}/{name}")
        return f"{pool}/{name}"

    def add_key(self, name: str, caps: dict[str, str]) -> Path:
        """A client key with `caps` (e.g. {"mon": "allow r"}), written to a keyring file."""
        argv = ["ceph", "auth", "get-or-create", f"client.{name}"]
        for kind, cap in caps.items():
            argv += [kind, cap]
        out = self.run(*argv).stdout
        path = self.base / f"ceph.client.{name}.keyring"
        path.write_text(out if out.endswith("\n") else out + "\n")
        path.chmod(0o600)
        return path

    def fencer_keys(self) -> tuple[Path, Path]:
        """The probe's read-only keyring and the actuator's blocklist keyring (made once)."""
        probe = self.base / "ceph.client.fencer-probe.keyring"
        fence = self.base / "ceph.client.fencer-fence.keyring"
        if not probe.exists():
            self.add_key("fencer-probe", PROBE_CAPS)
        if not fence.exists():
            self.add_key("fencer-fence", FENCE_CAPS)
        return probe, fence

    def rbd_settings(self, **kw: object) -> dict[str, object]:
        """fencer's `rbd` settings section for this cluster (neighbours and worker alike: all
        run on this machine), with its two keys."""
        probe, fence = self.fencer_keys()
        return {
            "conf": str(self.conf),
            "python": SYSTEM_PYTHON,
            "user": "fencer-probe",
            "keyring": str(probe),
            "connect_timeout": 3.0,
            "watch_timeout": float(self.watch_timeout),
            "watch_margin": 1.0,
            "fence_conf": str(self.conf),
            "fence_user": "fencer-fence",
            "fence_keyring": str(fence),
            **kw,
        }

    def reset(self) -> None:
        """The monitor running and the blocklist empty again (after a test or a scenario that
        stopped the monitor or blocklisted a lab address: lab addresses repeat)."""
        if self.mon is None or self.mon.poll() is not None:
            self.start_mon()
        self.run("ceph", "osd", "blocklist", "clear")

    def watchers(self, spec: str) -> list[str]:
        """Watcher addresses of an image (as client.admin)."""
        out = json.loads(self.run("rbd", "status", spec, "--format", "json").stdout)
        return [w["address"] for w in out.get("watchers", [])]

    def client(self, spec: str, address: str = "") -> RbdClient:
        """A librbd client process (not started) for `pool/image`, bound to `address`."""
        pool, _, image = spec.partition("/")
        return RbdClient(self, pool, image, address)


class LabRbd:
    """RBD disks for a lab cloud: an RBD pool in the SimCloud backed by `cluster`'s pool `rbd`,
    one image per volume (named by the volume's `path`, as CloudStack names RBD images), and one
    librbd client per Running VM's volume on its lab host's address (the hypervisor's qemu), so
    the host's watchers exist while it runs and, when it dies, linger for the watch timeout and
    vanish.

    `sync()` makes the clients follow the cloud: a VM that runs (or, split brain, still runs on
    a host CloudStack restarted it away from: `LabKvmHost.lingering`) holds a watch from that
    host; a VM that stopped or moved on a powered host closes its image (the watch goes at once);
    a client on a host that lost power is SIGKILLed (the watch lingers, as a dead hypervisor's
    does). An agent that dies changes nothing here: qemu keeps running. Clients are started in
    the calling thread (their PDEATHSIG binds to it): call every method from one thread that
    lives as long as the clients (LabCloud uses one executor thread)."""

    def __init__(self, cluster: CephCluster, cloud: Any, lab: Any, pool: Any = None) -> None:
        self.cluster, self.cloud, self.lab = cluster, cloud, lab
        self.clients: dict[tuple[str, str], RbdClient] = {}  # (volume uuid, host ip) -> client
        self.pool: Any = pool
        self.images: set[str] = set()  # images this lab created
        self.failures: list[str] = []  # clients that could not open (the next sync retries)

    def add_pool(self, cluster_obj: Any, name: str = "ceph1") -> Any:
        """The SimCloud pool (type RBD, ipaddress = the monitor, path = the Ceph pool `rbd`)."""
        self.pool = self.cloud.add_pool(cluster_obj, name, "127.0.0.1", path="rbd", type="RBD")
        return self.pool

    def add_disk(self, vm: Any, name: str | None = None) -> Any:
        """A volume of `vm` on the RBD pool, with its image created."""
        kw = {"path": name} if name else {}
        vol = self.cloud.add_volume(vm, self.pool, **kw)
        self.create_images()
        return vol

    def _volumes(self) -> list[Any]:
        pool = self.pool.uuid if self.pool is not None else None
        return [v for v in self.cloud.volumes.values() if v.storage_uuid == pool]

    def create_images(self) -> None:
        """An image for every volume on the pool that has none yet."""
        for v in self._volumes():
            if v.path not in self.images:
                self.cluster.create_image(v.path, self.pool.path)
                self.images.add(v.path)

    def _host_by_ip(self, ip: str) -> Any:
        return next((h for h in self.lab.hosts.values() if h.ip == ip), None)

    def sync(self) -> None:
        """Clients follow the cloud (see the class docstring); never raises for a client that
        cannot open its image (noted in `failures`, retried by the next sync)."""
        want: dict[tuple[str, str], str] = {}
        for v in self._volumes():
            vm = self.cloud.vms.get(v.vm_uuid or "")
            if vm is None:
                continue
            spec = f"{self.pool.path}/{v.path}"
            for h in self.lab.hosts.values():
                runs_here = vm.state == "Running" and vm.host_uuid == h.uuid
                if h.powered and (runs_here or vm.uuid in h.lingering):
                    want[(v.uuid, h.ip)] = spec
        for key, client in list(self.clients.items()):
            host = self._host_by_ip(client.address)
            if host is None or not host.powered:
                client.kill()  # the hypervisor is gone: no unwatch, the watch lingers
            elif key in want and client.running:
                continue
            client.close()
            del self.clients[key]
        spawned = [
            (key, self.cluster.client(spec, key[1]).spawn())
            for key, spec in want.items()
            if key not in self.clients
        ]
        for key, client in spawned:
            try:
                self.clients[key] = client.wait_open()
            except CephError as exc:
                self.failures.append(str(exc))

    def kill_host(self, ip: str) -> None:
        """SIGKILL every client of the host at `ip` (it crashed or lost power)."""
        for key, client in list(self.clients.items()):
            if client.address == ip:
                client.kill()
                client.close()
                del self.clients[key]

    def watchers_of(self, ip: str) -> list[str]:
        """`image address` of every watcher from `ip` on the lab's RBD images."""
        out = []
        for v in self._volumes():
            spec = f"{self.pool.path}/{v.path}"
            out += [f"{spec} {a}" for a in self.cluster.watchers(spec) if a.startswith(ip + ":")]
        return out

    async def crash(self, host: Any) -> None:
        """The lab host dies: SSH and writes stop, its VMs' librbd clients are killed."""
        await host.crash()
        self.kill_host(host.ip)

    def close(self) -> None:
        """Close every client."""
        for client in self.clients.values():
            client.close()
        self.clients.clear()


if __name__ == "__main__":  # pragma: no cover - manual check: python -m lab.ceph
    with CephCluster() as c:
        print(f"started in {c.started_in:.2f} s at {c.base}", file=sys.stderr)
        spec = c.create_image("probe-check")
        with c.client(spec, "127.0.2.11") as cl:
            print(c.watchers(spec), cl.write())
