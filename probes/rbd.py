"""The RBD probe: ask a neighbour, over SSH, what Ceph says of the suspect host's RBD images, in
ONE exec per (neighbour, suspect host) check.

Rule: only reads, with a key that can only read (`rbd.user`, caps `mon 'allow r' osd 'profile
rbd-read-only'`: `profile rbd` on the monitor would also allow `osd blocklist`). The neighbour
asks the monitor for `health`, then reads each image's watchers and `modify_timestamp` (what
`rbd status` and `rbd info` show), and this module turns the answer into a reading: per image,
the watchers whose address is the suspect's storage-network IP are *live signs* (a running VM's
librbd holds a watch on its disk), and `modify_timestamp` (the OSD's clock) is the image's
mtime, which the core compares only with its own earlier value. Nothing here says alive or
stale.

A dead client's watch lingers for the cluster's `osd_client_watch_timeout`, so every outcome
carries `min_gap = rbd.watch_timeout + rbd.watch_margin`: the core never calls a host stale on
a window shorter than that. The reading is incomplete (unknown) when Ceph cannot be asked
(monitor unreachable, keyring refused, `HEALTH_ERR`) or any image's status or info cannot be
read; an image that no longer exists is absent and listed as `missing`, as a deleted file is
for NFS (the core calls the reading unknown when the image was read before in the episode). A
watcher from any other address on one of the host's images also makes it incomplete (unless
`rbd.foreign_watchers` is `ignore`): the likeliest cause is the host itself on a storage network
that `hosts.<uuid>.storage_ip` does not name, and then its watches would go unrecognised.

The remote side is a short Python script run by the neighbour's `python3` with the
python3-rados and python3-rbd modules that `ceph-common` depends on (one cluster connection for
all of the host's images, where the CLI pays a connection per `rbd` command): options go in its
arguments, image specs (`pool/image`) on stdin, and a last `D` line marks complete output.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import time
from dataclasses import dataclass, field, replace
from typing import Any

import asyncssh

from fencing.settings import FencerSettings
from probes.base import Neighbour, ProbeOutcome, ProbeTarget, Reason
from probes.nfs_ssh import SshProbe

PREFIX = "rbd:"  # disk keys of RBD images: "rbd:<pool>/<image>"

# Reasons of an incomplete RBD reading (first words of ProbeOutcome.reason).
CEPH_UNREACHABLE = "ceph unreachable"
KEYRING_REFUSED = "keyring refused"
CEPH_HEALTH = "ceph health"
IMAGE_UNREADABLE = "image unreadable"
FOREIGN_WATCHER = "foreign watcher"

# The neighbour runs this with the system python3 and the python3-rados/python3-rbd modules that
# ceph-common depends on: ONE cluster connection for every image (the CLI costs ~0.28 s per image
# for `rbd status` + `rbd info`, 5.7 s for 20 images; this 0.33 s). Arguments: conf, user,
# keyring, timeout; image specs on stdin. Output lines: `N <clock>`; `H <health json>` or
# `E <errno> <error>` (connect or health failed: nothing else follows); per image i
# `W <i> <modify_timestamp epoch> <watcher addresses json>` or `X <i> <errno> <error>`; `D` last.
# Images open read-only: that adds no watcher (as `rbd status`).
REMOTE_PY = r"""
import json, os, sys, time
os.environ["TZ"] = "UTC"
time.tzset()
def out(*a):
    print(*a, flush=True)
def err(e):
    return " ".join(str(e).split())[:300] or type(e).__name__
out("N", int(time.time()))
try:
    import rados, rbd
except ImportError as e:
    out("E", -1, "no python3-rados/python3-rbd on the neighbour:", err(e))
    sys.exit(0)
conf, user, keyring, t = sys.argv[1:5]
opts = {"keyring": keyring, "client_mount_timeout": t, "rados_mon_op_timeout": t,
        "rados_osd_op_timeout": t}
try:
    c = rados.Rados(conffile=conf, rados_id=user, conf=opts)
    c.connect(timeout=float(t))
    ret, h, msg = c.mon_command(json.dumps({"prefix": "health", "format": "json"}), b"",
                                timeout=float(t))
except Exception as e:
    out("E", getattr(e, "errno", 0) or 0, err(e))
    sys.exit(0)
if ret != 0:
    out("E", -ret, "health:", err(msg))
    sys.exit(0)
out("H", json.dumps(json.loads(h or b"{}")))
ios = {}
for i, line in enumerate(sys.stdin):
    pool, _, name = line.strip().partition("/")
    try:
        if pool not in ios:
            ios[pool] = c.open_ioctx(pool)
        with rbd.Image(ios[pool], name, read_only=True) as img:
            w = [str(x.get("addr", "")) for x in img.watchers_list()]
            m = time.mktime(img.modify_timestamp().timetuple())
        out("W", i, int(m), json.dumps(w))
    except Exception as e:
        out("X", i, getattr(e, "errno", 0) or 0, err(e))
out("D")
c.shutdown()
"""

# Pool and image names fencer passes to the shell: what CloudStack and `rbd create` produce.
_SPEC = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*/[A-Za-z0-9_.][A-Za-z0-9_.-]*$")


def image_key(pool: str, image: str) -> str:
    """The mtime key of one image."""
    return f"{PREFIX}{pool}/{image}"


def spec_of(key: str) -> str | None:
    """`pool/image` of an mtime key, or None when the key is not a safe RBD image spec."""
    if not key.startswith(PREFIX):
        return None
    spec = key[len(PREFIX) :]
    return spec if _SPEC.match(spec) else None


def watcher_ip(address: str) -> str:
    """The IP of a watcher address: `1.2.3.4:0/123`, `v2:1.2.3.4:0/123`, `[::1]:0/123`."""
    addr = address.split("/", 1)[0]
    for proto in ("v1:", "v2:", "any:"):
        if addr.startswith(proto):
            addr = addr[len(proto) :]
    host = addr.rsplit(":", 1)[0] if ":" in addr else addr
    return _canonical(host.strip("[]"))


def _canonical(ip: str) -> str:
    """One spelling per address (`fd00:0::5` and `fd00::5` are the same host)."""
    try:
        return ipaddress.ip_address(ip).compressed
    except ValueError:
        return ip


# errno values of a refused key (EPERM, EACCES); anything else means Ceph could not be asked.
_REFUSED = {1, 13}
_ENOENT = 2


def _failure(errno: int, detail: str) -> str:
    """What a failed Ceph call means, from its errno."""
    if errno == -1:
        return f"{Reason.COMMAND_FAILED}: {detail[:200]}"
    if errno in _REFUSED:
        return f"{KEYRING_REFUSED}: {detail[:200]}"
    return f"{CEPH_UNREACHABLE}: {detail[:200]}"


@dataclass
class RbdReading:
    """What the neighbour's script printed, parsed."""

    now: float | None = None
    health: str | None = None  # HEALTH_OK / HEALTH_WARN / HEALTH_ERR
    health_detail: str = ""
    problem: str | None = None  # why the reading is incomplete
    watchers: dict[str, list[str]] = field(default_factory=dict)  # spec -> addresses
    mtimes: dict[str, float] = field(default_factory=dict)  # key -> modify_timestamp
    done: bool = False


def parse_output(specs: list[str], stdout: str) -> RbdReading:
    """Turn the script's output (possibly cut short) into an RbdReading."""
    r = RbdReading()
    problems: list[str] = []
    for line in stdout.splitlines():
        kind, _, rest = line.partition(" ")
        try:
            if kind == "N":
                r.now = float(rest)
            elif kind == "E":
                errno, _, text = rest.partition(" ")
                problems.append(_failure(int(errno), text))
            elif kind == "H":
                health: dict[str, Any] = json.loads(rest)
                r.health = str(health.get("status"))
                r.health_detail = ", ".join(sorted(health.get("checks") or {}))
            elif kind == "W":
                idx, stamp, addresses = rest.split(" ", 2)
                spec = specs[int(idx)]
                pool, _, image = spec.partition("/")
                watchers = json.loads(addresses)
                r.watchers[spec] = [str(a) for a in watchers]
                r.mtimes[image_key(pool, image)] = float(stamp)
            elif kind == "X":
                idx, errno, text = rest.split(" ", 2)
                if int(errno) == _ENOENT:
                    continue  # the image is gone: absent, like a deleted disk file
                spec = specs[int(idx)]
                problems.append(f"{IMAGE_UNREADABLE}: {spec}: {_failure(int(errno), text)}")
            elif kind == "D":
                r.done = True
        except (ValueError, IndexError, AttributeError, TypeError):
            continue  # a garbled line (cut mid-way) is as good as absent
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        r.problem = "; ".join(problems[:3]) + more
    elif r.health == "HEALTH_ERR":
        r.problem = f"{CEPH_HEALTH}: HEALTH_ERR ({r.health_detail or 'no detail'})"
    elif r.health is None and r.done:
        r.problem = f"{CEPH_UNREACHABLE}: no health answer"
    return r


def build_command(settings: FencerSettings, specs: list[str]) -> tuple[str, str]:
    """The exec command line and its stdin for one check."""
    rbd = settings.rbd
    args = [rbd.conf, rbd.user, rbd.keyring, f"{rbd.connect_timeout:g}"]
    command = f"exec {shlex.quote(rbd.python)} -c {shlex.quote(REMOTE_PY)} "
    command += " ".join(map(shlex.quote, args))
    return command, "".join(f"{s}\n" for s in specs)


class RbdProbe(SshProbe):
    """Storage probe for RBD pools: librbd on a neighbour, over SSH."""

    name = "rbd"

    @property
    def min_gap(self) -> float:
        """The floor of a stale window: a dead client's watch must have expired."""
        return self.settings.rbd.watch_timeout + self.settings.rbd.watch_margin

    def _unknown(self, reason: str, target: ProbeTarget, started: float, **kw: Any) -> ProbeOutcome:
        return ProbeOutcome.unknown(
            reason,
            self.name,
            duration=time.monotonic() - started,
            files_wanted=len(target.files),
            unreadable=target.unreadable,
            min_gap=self.min_gap,
            **kw,
        )

    async def check(self, target: ProbeTarget) -> ProbeOutcome:
        """Try each neighbour until one gives a complete reading; else the reasons of each."""
        started = time.monotonic()
        problem = self.config_problem()
        if problem is not None:
            return self._unknown(problem, target, started)
        specs = [s for s in (spec_of(k) for k in target.files) if s is not None]
        if len(specs) != len(target.files):
            bad = next(k for k in target.files if spec_of(k) is None)
            return self._unknown(
                f"{Reason.INVENTORY}: not an RBD image: {bad[:100]}", target, started
            )
        if not specs:
            return self._unknown(f"{Reason.NO_FILES}: no RBD image of the host", target, started)
        if not target.host_ip:
            return self._unknown(
                f"{Reason.INVENTORY}: no storage address for the host", target, started
            )
        if not target.neighbours:
            return self._unknown(
                f"{Reason.NO_NEIGHBOUR}: no Up, Enabled KVM host in the cluster", target, started
            )
        reasons: list[str] = []
        passed: list[str] = []  # neighbours that failed: asked after the others next time
        for n in target.neighbours:
            got = await self._read(n, specs)
            if isinstance(got, str):
                reasons.append(f"{got} [{n.name}]")
                passed.append(n.name)
                continue
            reading, local_now = got
            outcome = self._outcome(target, specs, reading, local_now, n.name, started)
            if outcome.complete:
                # (An image that is gone is gone for every neighbour: one Ceph cluster.)
                return replace(outcome, passed_over=tuple(passed))
            reasons.append(f"{outcome.reason} [{n.name}]")
            passed.append(n.name)
        unknown = self._unknown("; ".join(reasons), target, started)
        return replace(unknown, passed_over=tuple(passed))

    def _outcome(
        self,
        target: ProbeTarget,
        specs: list[str],
        r: RbdReading,
        local_now: float,
        neighbour: str,
        started: float,
    ) -> ProbeOutcome:
        ip = _canonical(target.host_ip or "")
        signs = tuple(
            f"watcher {a} of {ip} on {spec}"
            for spec in specs
            for a in r.watchers.get(spec, [])
            if watcher_ip(a) == ip
        )
        foreign = [
            (spec, a) for spec in specs for a in r.watchers.get(spec, []) if watcher_ip(a) != ip
        ]
        reason = r.problem
        if reason is None and not r.done:
            reason = Reason.PARTIAL
        if reason is None and foreign and self.settings.rbd.foreign_watchers == "unknown":
            # The host's running VMs hold watches; a watch from another address on its disk is
            # most likely the host itself on a storage network its `storage_ip` does not name.
            # Judging without it could call a live host with idle VMs stale: say so instead.
            spec, a = foreign[0]
            reason = (
                f"{FOREIGN_WATCHER}: {spec} watched from {watcher_ip(a)}, not the host's storage "
                f"address {ip} (set hosts.<uuid>.storage_ip, or rbd.foreign_watchers: ignore)"
            )
        if reason is None and not r.mtimes:
            reason = f"{Reason.NO_FILES}: none of the host's {len(specs)} RBD images exists"
        # Images the answer (read to its end) has no modify_timestamp for: gone (ENOENT), or a
        # line that came garbled. Any other failure of status or info already made it incomplete.
        keys = (f"{PREFIX}{spec}" for spec in specs)
        missing = tuple(k for k in keys if k not in r.mtimes) if r.done else ()
        return ProbeOutcome(
            mtimes=dict(r.mtimes),
            complete=reason is None,
            reason=reason,
            files_wanted=len(specs),
            unreadable=target.unreadable,
            neighbour=neighbour,
            duration=time.monotonic() - started,
            probe=self.name,
            neighbour_offset=round(r.now - local_now, 1) if r.now is not None else None,
            live_signs=signs,
            min_gap=self.min_gap,
            missing=missing,
        )

    async def _read(self, n: Neighbour, specs: list[str]) -> tuple[RbdReading, float] | str:
        """One exec on the neighbour: the parsed answer, or the reason there is none."""
        command, stdin = build_command(self.settings, specs)  # stdin: one spec a line
        timeout = self.settings.ssh.command_timeout
        try:
            result = await self._exec(n, command, stdin)
        except asyncssh.TimeoutError as exc:
            partial = parse_output(specs, str(exc.stdout or ""))
            partial.problem = partial.problem or (
                f"{Reason.TIMEOUT}: no complete answer within {timeout:g} s"
            )
            partial.done = False
            return partial, self.clock()
        if isinstance(result, str):
            return result
        reading = parse_output(specs, str(result.stdout or ""))
        if not reading.done and reading.problem is None:
            err = str(result.stderr or "").strip().splitlines()
            detail = f": {err[0][:200]}" if err else ""
            reading.problem = f"{Reason.COMMAND_FAILED}: exit {result.exit_status}{detail}"
        return reading, self.clock()
