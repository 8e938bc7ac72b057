"""The RBD probe: ask a neighbour, over SSH, what Ceph says of the suspect host's RBD images, in
ONE exec per (neighbour, suspect host) check.

Rule: only reads, with a key that can only read (`rbd.user`, caps `mon 'allow r' osd 'profile
rbd-read-only'`: `profile rbd` on the monitor would also allow `osd blocklist`). The neighbour
runs `ceph health`, then `rbd status` and `rbd info` per image, and this module turns the answer
into a reading: per image, the watchers whose address is the suspect's storage-network IP are
*live signs* (a running VM's librbd holds a watch on its disk), and `modify_timestamp` (the OSD's
clock) is the image's mtime, which the core compares only with its own earlier value. Nothing
here says alive or stale.

A dead client's watch lingers for the cluster's `osd_client_watch_timeout`, so every outcome
carries `min_gap = rbd.watch_timeout + rbd.watch_margin`: the core never calls a host stale on
a window shorter than that. The reading is incomplete (unknown) when Ceph cannot be asked
(monitor unreachable, keyring refused, `HEALTH_ERR`) or any image's status or info cannot be
read; an image that no longer exists is simply absent, as a deleted file is for NFS.

The remote side is a POSIX shell script with the Ceph CLI (`ceph-common`) on the neighbour:
options go in the script's arguments, image specs (`pool/image`) on stdin, and a last `D` line
marks complete output. `TZ=UTC` makes `rbd info` print its timestamps in UTC.
"""

from __future__ import annotations

import calendar
import json
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from fencing.settings import FencerSettings
from probes.base import Neighbour, ProbeOutcome, ProbeTarget, Reason
from probes.nfs_ssh import MAX_SESSIONS_PER_CONNECTION, SshPool, _connect_failure

PREFIX = "rbd:"  # disk keys of RBD images: "rbd:<pool>/<image>"

# Reasons of an incomplete RBD reading (first words of ProbeOutcome.reason).
CEPH_UNREACHABLE = "ceph unreachable"
KEYRING_REFUSED = "keyring refused"
CEPH_HEALTH = "ceph health"
IMAGE_UNREADABLE = "image unreadable"

# `N` the neighbour's clock; `H <rc> <ceph health json or error>`; per image i, `status i <rc>
# <json or error>` and `info i <rc> <json or error>` (newlines folded); `D` marks the end.
REMOTE_SCRIPT = r"""
export TZ=UTC
conf=$1 id=$2 keyring=$3 t=$4
one() { tr '\n' ' '; }
printf 'N %s\n' "$(date +%s)"
h=$(ceph --conf "$conf" --id "$id" --keyring "$keyring" --connect-timeout "$t" \
  health --format json 2>&1); rc=$?
printf 'H %s %s\n' "$rc" "$(printf '%s' "$h" | one)"
if [ "$rc" -ne 0 ]; then exit 0; fi
i=0
while IFS= read -r img; do
  for what in status info; do
    o=$(rbd --conf "$conf" --id "$id" --keyring "$keyring" --client_mount_timeout "$t" \
      --rados_mon_op_timeout "$t" --rados_osd_op_timeout "$t" $what --format json "$img" 2>&1)
    rc=$?
    printf '%s %s %s %s\n' "$what" "$i" "$rc" "$(printf '%s' "$o" | one)"
  done
  i=$((i+1))
done
echo D
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
    return host.strip("[]")


def parse_timestamp(text: str) -> float | None:
    """`rbd info`'s `Sun Nov 29 17:29:57 2026` (printed under TZ=UTC) -> epoch seconds."""
    try:
        return float(calendar.timegm(time.strptime(" ".join(text.split()), "%a %b %d %H:%M:%S %Y")))
    except (ValueError, TypeError):
        return None


def _failure(detail: str) -> str:
    """What a failed Ceph command means, from its error text."""
    low = detail.lower()
    if any(
        s in low
        for s in ("permission denied", "operation not permitted", "auth", "(13)", "(1)", "eacces")
    ):
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
            elif kind == "H":
                rc, _, text = rest.partition(" ")
                if rc != "0":
                    problems.append(_failure(" ".join(text.split())))
                    continue
                health = json.loads(text)
                r.health = str(health.get("status"))
                checks = health.get("checks") or {}
                r.health_detail = ", ".join(sorted(checks))
            elif kind in ("status", "info"):
                idx, rc, text = rest.split(" ", 2)
                spec = specs[int(idx)]
                pool, _, image = spec.partition("/")
                if rc != "0":
                    detail = " ".join(text.split())
                    if "no such file" in detail.lower():
                        continue  # the image is gone: absent, like a deleted disk file
                    problems.append(f"{IMAGE_UNREADABLE}: {kind} {spec}: {_failure(detail)}")
                    continue
                doc: dict[str, Any] = json.loads(text)
                if kind == "status":
                    r.watchers[spec] = [str(w.get("address", "")) for w in doc.get("watchers", [])]
                else:
                    stamp = parse_timestamp(str(doc.get("modify_timestamp", "")))
                    if stamp is None:
                        problems.append(f"{IMAGE_UNREADABLE}: {spec} has no modify_timestamp")
                    else:
                        r.mtimes[image_key(pool, image)] = stamp
            elif kind == "D":
                r.done = True
        except (ValueError, IndexError, AttributeError, TypeError):
            continue  # a garbled line (cut mid-way) is as good as absent
    if problems:
        r.problem = "; ".join(problems[:3]) + (
            f" (+{len(problems) - 3} more)" * (len(problems) > 3)
        )
    elif r.health == "HEALTH_ERR":
        r.problem = f"{CEPH_HEALTH}: HEALTH_ERR ({r.health_detail or 'no detail'})"
    elif r.health is None and r.done:
        r.problem = f"{CEPH_UNREACHABLE}: no health answer"
    return r


def build_command(settings: FencerSettings, specs: list[str]) -> tuple[str, str]:
    """The exec command line and its stdin for one check."""
    rbd = settings.rbd
    args = [rbd.conf, rbd.user, rbd.keyring, f"{rbd.connect_timeout:g}"]
    command = "set -- " + " ".join(shlex.quote(a) for a in args) + "\n" + REMOTE_SCRIPT
    return command, "".join(f"{s}\n" for s in specs)


class RbdProbe:
    """Storage probe for RBD pools: the Ceph CLI on a neighbour, over SSH."""

    name = "rbd"

    def __init__(
        self,
        settings: FencerSettings,
        *,
        pool: SshPool | None = None,
        port: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._own_pool = pool is None
        self.pool = pool or SshPool(settings.ssh)
        self.port = port
        self.clock = clock
        self.round_trips = 0

    @property
    def min_gap(self) -> float:
        """The floor of a stale window: a dead client's watch must have expired."""
        return self.settings.rbd.watch_timeout + self.settings.rbd.watch_margin

    async def close(self) -> None:
        """Close pooled connections (only if this probe opened the pool)."""
        if self._own_pool:
            await self.pool.close()

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
        ssh = self.settings.ssh
        if not ssh.insecure_skip_host_key_check and ssh.known_hosts is None:
            return self._unknown(
                f"{Reason.CONFIG}: ssh.known_hosts is not set, host keys cannot be verified",
                target,
                started,
            )
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
        for n in target.neighbours:
            got = await self._read(n, specs)
            if isinstance(got, str):
                reasons.append(f"{got} [{n.name}]")
                continue
            reading, local_now = got
            outcome = self._outcome(target, specs, reading, local_now, n.name, started)
            if outcome.complete:
                return outcome
            reasons.append(f"{outcome.reason} [{n.name}]")
        return self._unknown("; ".join(reasons), target, started)

    def _outcome(
        self,
        target: ProbeTarget,
        specs: list[str],
        r: RbdReading,
        local_now: float,
        neighbour: str,
        started: float,
    ) -> ProbeOutcome:
        ip = target.host_ip or ""
        signs = tuple(
            f"watcher {a} of {ip} on {spec}"
            for spec in specs
            for a in r.watchers.get(spec, [])
            if watcher_ip(a) == ip
        )
        reason = r.problem
        if reason is None and not r.done:
            reason = Reason.PARTIAL
        if reason is None and not r.mtimes:
            reason = f"{Reason.NO_FILES}: none of the host's {len(specs)} RBD images exists"
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
        )

    async def _read(self, n: Neighbour, specs: list[str]) -> tuple[RbdReading, float] | str:
        """One exec on the neighbour: the parsed answer, or the reason there is none."""
        command, stdin = build_command(self.settings, specs)
        timeout = self.settings.ssh.command_timeout
        for attempt in (1, 2):
            try:
                entry = await self.pool.get(n.address, self.port)
            except Exception as exc:  # every connect failure is an unknown with a reason
                return _connect_failure(exc)
            try:
                async with entry.sessions:
                    self.round_trips += 1
                    result = await entry.conn.run(
                        command, check=False, timeout=timeout, input=stdin
                    )
            except asyncssh.TimeoutError as exc:
                partial = parse_output(specs, str(exc.stdout or ""))
                partial.problem = partial.problem or (
                    f"{Reason.TIMEOUT}: no complete answer within {timeout:g} s"
                )
                partial.done = False
                return partial, self.clock()
            except (
                asyncssh.ChannelOpenError,
                asyncssh.ConnectionLost,
                asyncssh.DisconnectError,
                BrokenPipeError,
                ConnectionResetError,
            ) as exc:
                self.pool.discard(n.address, self.port)
                if attempt == 2:
                    return _connect_failure(exc)
                continue
            reading = parse_output(specs, str(result.stdout or ""))
            if not reading.done and reading.problem is None:
                err = str(result.stderr or "").strip().splitlines()
                detail = f": {err[0][:200]}" if err else ""
                reading.problem = f"{Reason.COMMAND_FAILED}: exit {result.exit_status}{detail}"
            return reading, self.clock()
        return f"{Reason.SSH_ERROR}: unreachable"  # pragma: no cover - the loop always returns


__all__ = ["MAX_SESSIONS_PER_CONNECTION", "RbdProbe", "image_key", "parse_output", "watcher_ip"]
