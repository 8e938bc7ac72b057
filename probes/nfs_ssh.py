"""The NFS probe: ask a neighbour over SSH for the mtimes of the suspect host's disks and the
content of its heartbeat files, in ONE exec per (neighbour, suspect host) check.

Rule: host keys are always verified against `ssh.known_hosts` (the bypass exists only for the
lab, behind `insecure_skip_host_key_check`); key authentication only; one pooled connection per
neighbour, reused across checks with keepalives. Every failure is an unknown outcome whose reason
names it (auth failed, host key mismatch, timeout, unreachable, storage not mounted, no files),
and the next neighbour is tried; so is it after a complete reading that lacks files (a stat or a
heartbeat read that failed: another neighbour may read them). What the reading means is decided
by the core (`fencing.decision.judge`), against the previous reading of the same files.

The remote side is a POSIX shell script (bash, dash) plus GNU `xargs` and `stat`: pool mount
points and heartbeat files go in the script's arguments (a few per host), file paths go on stdin
(a thousand paths would overflow one argv string), and the stat of `/` as the last line marks
complete output.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import asyncssh

from fencing.settings import FencerSettings, SshSettings
from probes.base import Neighbour, ProbeOutcome, ProbeTarget, Reading, Reason, outcome_of

# `N` the neighbour's clock, `M i ok|no` pool mount i usable, `H i <content>` heartbeat i, then
# `S <mtime> <path>` per file that exists and, last, `S <mtime> /`: stat of "/" marks complete
# output. A path whose stat fails (gone, ESTALE, EIO, a directory it cannot search) prints
# nothing (the error goes to /dev/null): `outcome_of` lists it as `missing` and the core calls
# the reading unknown when the file was read before in the episode. Under bash, EPOCHSECONDS,
# mapfile and `exec stat` make a check cost one process image (the shell becomes stat); other
# shells fall back to date and xargs (one sh + stat per batch).
# Every file is opened (and closed, no data read) before its stat: on an NFS mount with the
# default `cto` the open makes the client revalidate the file's attributes with the server
# (close-to-open), so the stat reports the server's mtime, not one from the attribute cache
# (up to acregmax, 60 s, old). `true <file` is a builtin with a redirection: no process per
# file; a failed open (no read permission, a socket) changes nothing, the stat still runs
# (`true`, not `:`: a failed redirection on a special builtin exits a POSIX shell).
# The end marker counts only as a whole line (an answer cut after the "/" of a file's line ends
# in the same characters), and xargs' status 124 and up (its command died of a signal, or could
# not run; 123 is a stat that failed for some file) ends the script before the marker: a stat
# killed part-way is an incomplete reading under dash as under bash (`exec stat`).
REMOTE_SCRIPT = r"""
printf 'N %s\n' "${EPOCHSECONDS:-$(date +%s)}"
i=0
for a in "$@"; do
  p=${a#?:}
  case $a in
    m:*) s=no; if [ -d "$p" ] && [ -r "$p" ] && [ -x "$p" ]; then s=ok; fi; echo "M $i $s" ;;
    h:*) v=; { read -r v < "$p"; } 2>/dev/null; echo "H $i $v" ;;
  esac
  i=$((i+1))
done
if [ -n "$BASH_VERSION" ]; then
  eval 'mapfile -t f; for p in "${f[@]}"; do true <"$p"; done 2>/dev/null
  exec stat -c "S %Y %n" -- "${f[@]}" / 2>/dev/null'
fi
xargs -r -d '\n' sh -c 'for p in "$@"; do true <"$p"; done; exec stat -c "S %Y %n" -- "$@"' sh \
  2>/dev/null
s=$?; [ "$s" -lt 124 ] || exit "$s"
exec stat -c 'S %Y %n' /
"""

# AES-GCM first: hardware-accelerated everywhere fencer runs, and asyncssh's chacha20-poly1305
# sets up a cipher context per packet (a third of a probe round's CPU in the benchmark).
PREFERRED_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
)

# OpenSSH's sshd allows 10 sessions per connection (MaxSessions); stay under it.
MAX_SESSIONS_PER_CONNECTION = 8


def build_command(target: ProbeTarget) -> tuple[str, str]:
    """The exec command line and its stdin for one check."""
    args = []
    for pool in target.pools:
        args.append(f"m:{pool.mount_point}")
        if pool.heartbeat:
            args.append(f"h:{pool.heartbeat}")
    command = "set -- " + " ".join(shlex.quote(a) for a in args) + "\n" + REMOTE_SCRIPT
    stdin = "".join(f"{p}\n" for p in (*target.files, *target.heartbeats))
    return command, stdin


def parse_output(target: ProbeTarget, stdout: str, local_now: float) -> Reading:
    """Turn the script's output (possibly cut short) into a Reading."""
    args: list[tuple[str, str]] = []
    for pool in target.pools:
        args.append(("m", pool.mount_point))
        if pool.heartbeat:
            args.append(("h", pool.heartbeat))
    now: float | None = None
    mtimes: dict[str, float] = {}
    beats: dict[str, str] = {}
    mounted: dict[str, bool] = {}
    complete = False
    lines = stdout.splitlines()
    if lines and not stdout.endswith("\n"):
        # The last line was cut mid-way: "S <mtime> /" may be the start of any file's line.
        lines.pop()
    for line in lines:
        kind, _, rest = line.partition(" ")
        try:
            if kind == "N":
                now = float(rest)
            elif kind == "M":
                idx, _, state = rest.partition(" ")
                mounted[args[int(idx)][1]] = state == "ok"
            elif kind == "H":
                idx, _, value = rest.partition(" ")
                if value:
                    beats[args[int(idx)][1]] = value
            elif kind == "S":
                mtime, _, path = rest.partition(" ")
                stamp = float(mtime)
                if path == "/":
                    complete = True
                else:
                    mtimes[path] = stamp
        except (ValueError, IndexError):
            continue  # a garbled line (cut mid-way) is as good as absent
    return Reading(
        now=now if now is not None else local_now,
        mtimes=mtimes,
        heartbeat_values=beats,
        mounted=mounted,
        complete=complete,
        local_now=local_now if now is not None else None,  # no offset without the clock line
    )


@dataclass
class _Conn:
    conn: asyncssh.SSHClientConnection
    sessions: asyncio.Semaphore


class SshPool:
    """One SSH connection per neighbour address, opened on demand and reused."""

    def __init__(self, ssh: SshSettings, keepalive_interval: float = 15.0) -> None:
        self.ssh = ssh
        self.keepalive_interval = keepalive_interval
        self._conns: dict[tuple[str, int], _Conn] = {}
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}
        self.connects = 0  # how many connections were opened (for tests and benchmarks)

    def _known_hosts(self) -> str | None:
        if self.ssh.insecure_skip_host_key_check:
            return None
        assert self.ssh.known_hosts is not None
        return str(self.ssh.known_hosts)

    async def get(self, address: str, port: int | None = None) -> _Conn:
        """A live connection to `address` (raises asyncssh / OS errors)."""
        key = (address, port or self.ssh.port)
        async with self._locks.setdefault(key, asyncio.Lock()):
            entry = self._conns.get(key)
            if entry is not None and not entry.conn.is_closed():
                return entry
            client_keys = [str(self.ssh.key_file)] if self.ssh.key_file else ()
            conn = await asyncssh.connect(
                key[0],
                key[1],
                username=self.ssh.user,
                client_keys=client_keys or None,
                passphrase=(
                    self.ssh.key_passphrase.get_secret_value()
                    if self.ssh.key_passphrase is not None
                    else None
                ),
                known_hosts=self._known_hosts(),
                agent_path=None,
                preferred_auth="publickey",
                password=None,
                connect_timeout=self.ssh.connect_timeout,
                keepalive_interval=self.keepalive_interval,
                keepalive_count_max=3,
                encryption_algs=PREFERRED_CIPHERS,
            )
            self.connects += 1
            entry = _Conn(conn, asyncio.Semaphore(MAX_SESSIONS_PER_CONNECTION))
            self._conns[key] = entry
            return entry

    def discard(self, address: str, port: int | None = None) -> None:
        """Forget (and close) a connection that failed."""
        entry = self._conns.pop((address, port or self.ssh.port), None)
        if entry is not None:
            entry.conn.close()

    async def close(self) -> None:
        """Close every connection."""
        entries, self._conns = list(self._conns.values()), {}
        for e in entries:
            e.conn.close()
        for e in entries:
            await e.conn.wait_closed()


def _connect_failure(exc: BaseException) -> str:
    if isinstance(exc, asyncssh.PermissionDenied):
        return f"{Reason.AUTH_FAILED}: the neighbour refused the key"
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return f"{Reason.HOST_KEY}: {exc.reason} (not in ssh.known_hosts)"
    if isinstance(exc, TimeoutError):
        return f"{Reason.TIMEOUT}: connecting took too long"
    if isinstance(exc, asyncssh.Error):
        return f"{Reason.SSH_ERROR}: {exc.reason}"
    if isinstance(exc, OSError):
        return f"{Reason.UNREACHABLE}: {exc.strerror or type(exc).__name__}"
    return f"{Reason.SSH_ERROR}: {type(exc).__name__}"


class SshProbe:
    """What the probes that look through a neighbour over SSH share (NFS here, RBD in
    probes.rbd): settings, the pooled connections, the clock, and one exec on a neighbour."""

    name = "ssh"

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
        self.round_trips = 0  # execs issued (for benchmarks)

    async def close(self) -> None:
        """Close pooled connections (only if this probe opened the pool: RBD shares NFS's)."""
        if self._own_pool:
            await self.pool.close()

    def config_problem(self) -> str | None:
        """Why no neighbour may be asked at all (host keys that cannot be verified), or None."""
        ssh = self.settings.ssh
        if not ssh.insecure_skip_host_key_check and ssh.known_hosts is None:
            return f"{Reason.CONFIG}: ssh.known_hosts is not set, host keys cannot be verified"
        return None

    async def _exec(
        self, n: Neighbour, command: str, stdin: str
    ) -> asyncssh.SSHCompletedProcess | str:
        """One exec on the neighbour: what it answered, or why there is no answer. A pooled
        connection that died since its last use is reconnected once. Raises
        asyncssh.TimeoutError (its stdout: what came before the timeout)."""
        timeout = self.settings.ssh.command_timeout
        for attempt in (1, 2):
            try:
                entry = await self.pool.get(n.address, self.port)
            except Exception as exc:  # every connect failure is an unknown with a reason
                return _connect_failure(exc)
            try:
                async with entry.sessions:
                    self.round_trips += 1
                    # Empty input would send no EOF and leave the remote shell waiting.
                    feed = {"input": stdin} if stdin else {"stdin": asyncssh.DEVNULL}
                    return await entry.conn.run(command, check=False, timeout=timeout, **feed)
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
        return f"{Reason.SSH_ERROR}: unreachable"  # pragma: no cover - the loop always returns


class NfsSshProbe(SshProbe):
    """Storage probe for NFS pools, looking through a neighbour over SSH."""

    name = "nfs"

    async def check(self, target: ProbeTarget) -> ProbeOutcome:
        """Try each neighbour until one gives a complete reading that lacks no file; else the
        first complete one (lacking files), else the reasons of each. One neighbour's reading,
        never a mix; the neighbours passed over are named (`ProbeOutcome.passed_over`)."""
        started = time.monotonic()
        problem = self.config_problem()
        if problem is not None:
            return ProbeOutcome.unknown(problem, self.name)
        if not target.neighbours:
            return ProbeOutcome.unknown(
                f"{Reason.NO_NEIGHBOUR}: no Up, Enabled KVM host in the cluster", self.name
            )
        reasons: list[str] = []
        passed: list[str] = []
        last = None
        lacking = None  # the first complete reading that lacks files
        for n in target.neighbours:
            got = await self._read(n, target)
            passed.append(n.name)
            if isinstance(got, str):
                reasons.append(f"{got} [{n.name}]")
                continue
            outcome = outcome_of(target, got, self.name, n.name, time.monotonic() - started)
            if outcome.complete and not outcome.lacks_files:
                return replace(outcome, passed_over=tuple(passed[:-1]))
            if outcome.complete:
                # Another neighbour may read what this one cannot (a busy disk it cannot stat).
                lacking = lacking or outcome
                continue
            reasons.append(f"{outcome.reason} [{n.name}]")
            last = outcome
        if lacking is not None:
            return replace(lacking, duration=time.monotonic() - started, passed_over=tuple(passed))
        reason = "; ".join(reasons)
        if last is not None:
            return replace(
                last, reason=reason, duration=time.monotonic() - started, passed_over=tuple(passed)
            )
        return ProbeOutcome.unknown(
            reason,
            self.name,
            duration=time.monotonic() - started,
            files_wanted=len(target.files) + len(target.heartbeats),
            unreadable=target.unreadable,
            passed_over=tuple(passed),
        )

    async def _read(self, n: Neighbour, target: ProbeTarget) -> Reading | str:
        """One exec on the neighbour; a Reading, or the reason it could not be had."""
        command, stdin = build_command(target)
        timeout = self.settings.ssh.command_timeout
        try:
            result = await self._exec(n, command, stdin)
        except asyncssh.TimeoutError as exc:
            partial = parse_output(target, str(exc.stdout or ""), self.clock())
            return replace(
                partial,
                complete=False,
                incomplete_reason=f"{Reason.TIMEOUT}: no complete answer within {timeout:g} s",
            )
        if isinstance(result, str):
            return result
        reading = parse_output(target, str(result.stdout or ""), self.clock())
        if not reading.complete:
            err = str(result.stderr or "").strip().splitlines()
            detail = f": {err[0][:200]}" if err else ""
            status = result.exit_status if result.exit_status is not None else result.exit_signal
            return replace(
                reading,
                complete=False,
                incomplete_reason=f"{Reason.COMMAND_FAILED}: exit {status}{detail}",
            )
        return reading
