"""A simulated BMC that speaks real IPMI 2.0 (RMCP+, lanplus) on loopback, built on pyghmi.

Rule: the simulator tracks power and identify state exactly as a client would observe it and
never lies about it; faults (unreachable, wrong password) are injected by the lab, not faked
by the client. It binds 127.0.0.1 on a free UDP port, so ipmitool, fence_ipmilan and the pyghmi
client all talk to the same state.

`BmcSimulator` serves the BMC from a child process and mirrors its state in a thread of the
caller. It is a separate process, like a real BMC, because pyghmi runs client and server
sessions on one process-wide event loop: with a server thread and a client thread pumping it
together, a client login occasionally waits forever (seen about once in 50 logins). The
processes fork from one zygote per caller process that imported pyghmi once (see
`_serve_zygote`), a fresh interpreter each if the zygote cannot start or died.

Two patches to pyghmi's server side, applied once on import:
- pyghmi's server only implements cipher suite 3 (HMAC-SHA1) but answers OK to any proposal,
  so pyghmi's own client (which proposes suite 17, SHA-256 first) fails in RAKP 2 with
  `struct.error`. Refusing non-SHA1 proposals (status 0x11, "invalid integrity algorithm")
  makes the client fall back to suite 3; ipmitool works either way.
- pyghmi's server stays silent when RAKP 1 names an unknown user; real BMCs answer RAKP 2 with
  status 0x0D (unauthorized name), and pyghmi's client waits forever on the silence.
- a paused or stopped simulator must drop every packet, including those of sessions it
  already opened, so a client sees a dead BMC rather than a half-answering one.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from typing import Any

import pyghmi.ipmi.bmc as ipmibmc
import pyghmi.ipmi.private.constants as constants
import pyghmi.ipmi.private.serversession as serversession
import pyghmi.ipmi.private.session as ipmisession

log = logging.getLogger(__name__)

PowerCallback = Callable[[str, str], None]
"""Called as callback(new_state, cause) after every power change ('on'/'off'; cause names
the IPMI directive: 'off', 'on', 'cycle', 'reset', 'shutdown')."""

_original_open_session_response = serversession.ServerSession.create_open_session_response
_original_process_pktqueue = serversession.ServerSession.process_pktqueue
_original_got_rakp1 = serversession.ServerSession._got_rakp1


def _sha1_only_open_session_response(self: Any, request: bytearray) -> bytearray:
    # Byte 12 is the authentication algorithm, byte 20 the integrity algorithm of the RMCP+
    # open session request; 1 = HMAC-SHA1 / HMAC-SHA1-96, the only ones pyghmi's server does.
    if request[12] != 1 or request[20] != 1:
        return bytearray([request[0], 0x11, 0, 0]) + request[4:8]
    response: bytearray = _original_open_session_response(self, request)
    return response


def _got_rakp1_refusing_unknown_users(self: Any, data: bytearray) -> None:
    name = bytes(data[28:]).decode("utf-8", "replace") if len(data) > 27 and data[27] else ""
    if self.authdata.get(name) is None:
        self.clientsessionid = getattr(self, "clientsessionid", bytearray(4))
        refusal = bytearray([data[0], 0x0D, 0, 0]) + self.clientsessionid
        self.send_payload(refusal, constants.payload_types["rakp2"], retry=False)
        return
    _original_got_rakp1(self, data)


def _process_pktqueue_unless_down(self: Any) -> None:
    bmc = getattr(self, "bmc", None)
    if isinstance(bmc, SimBmc) and not bmc.reachable:
        self.pktqueue.clear()
        return
    _original_process_pktqueue(self)


serversession.ServerSession.create_open_session_response = _sha1_only_open_session_response
serversession.ServerSession.process_pktqueue = _process_pktqueue_unless_down
serversession.ServerSession._got_rakp1 = _got_rakp1_refusing_unknown_users

_DIRECTIVES = {0: "off", 1: "on", 2: "cycle", 3: "reset", 4: "diag", 5: "shutdown"}


class SimBmc(ipmibmc.Bmc):
    """One simulated BMC: power, identify and boot device state, plus a command log."""

    def __init__(
        self,
        users: Mapping[str, str],
        port: int = 0,
        address: str = "127.0.0.1",
        power: str = "on",
        on_power_change: PowerCallback | None = None,
        on_record: Callable[[str], None] | None = None,
        guid: str | None = None,
    ) -> None:
        super().__init__(
            dict(users), port=port, address=address, bmcuuid=uuid.UUID(guid) if guid else None
        )
        self.on_record = on_record
        # pyghmi routes session packets by the server socket's real port, so a port-0 bind must
        # record the port the kernel chose.
        self.port = self.serversocket.getsockname()[1]
        self.address = address
        self.powerstate = power
        self.identify: str | None = None
        self.bootdevice = "default"
        self.on_power_change = on_power_change
        self.reachable = True
        self.resets = 0  # power resets and cycles seen while on
        self.commands: Counter[str] = Counter()
        self.history: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        # Faults (`BmcSimulator.set_power_faults`): an off or on lands `power_lag` seconds after
        # the BMC acknowledged it (a real chassis takes seconds; the status shows the old state
        # meanwhile), and with `power_obeys` False it never lands (acknowledged, not done).
        self.power_lag = 0.0
        self.power_obeys = True

    # -- state the lab reads --------------------------------------------------------------

    def _record(self, name: str) -> None:
        with self._lock:
            self.commands[name] += 1
            self.history.append((time.time(), name))
        if self.on_record is not None:
            self.on_record(name)

    def _set_power(self, state: str, cause: str) -> None:
        changed = state != self.powerstate
        self.powerstate = state
        if self.on_power_change is not None and (changed or cause in ("reset", "cycle")):
            self.on_power_change(state, cause)

    # -- pyghmi Bmc hooks ----------------------------------------------------------------

    def get_power_state(self) -> str:
        self._record("get_power")
        return self.powerstate

    def is_active(self) -> bool:
        return self.powerstate == "on"

    def _land(self, state: str, cause: str) -> None:
        if not self.power_obeys:
            return
        if self.power_lag > 0:
            timer = threading.Timer(self.power_lag, self._set_power, (state, cause))
            timer.daemon = True
            timer.start()
            return
        self._set_power(state, cause)

    def power_off(self) -> None:
        self._record("power_off")
        self._land("off", "off")

    def power_on(self) -> None:
        self._record("power_on")
        self._land("on", "on")

    def power_shutdown(self) -> None:
        self._record("power_shutdown")
        self._set_power("off", "shutdown")

    def power_cycle(self) -> int | None:
        self._record("power_cycle")
        if self.powerstate == "off":
            return 0xD5  # "not supported in present state", as real BMCs answer
        self.resets += 1
        self._set_power("on", "cycle")
        return None

    def power_reset(self) -> int | None:
        self._record("power_reset")
        if self.powerstate == "off":
            return 0xD5
        self.resets += 1
        self._set_power("on", "reset")
        return None

    def get_boot_device(self) -> str:
        return self.bootdevice

    def set_boot_device(self, bootdevice: str) -> None:
        self._record("set_boot_device")
        self.bootdevice = bootdevice

    def get_system_guid(self) -> Any:
        self._record("get_system_guid")
        return self.uuid

    def handle_raw_request(self, request: dict[str, Any], session: Any) -> Any:
        self._record(f"netfn{request['netfn']:#x}/cmd{request['command']:#x}")
        if request["netfn"] == 0 and request["command"] == 4:  # Chassis Identify
            data = list(request["data"])
            force = len(data) > 1 and data[1] & 1
            interval = data[0] if data else 15
            self.identify = "on" if (force or interval) else "off"
            self._record(f"identify_{self.identify}")
            return session.send_ipmi_response()
        return super().handle_raw_request(request, session)

    def sessionless_data(self, data: bytes, sockaddr: Any) -> None:
        if not self.reachable:
            return
        self._record("sessionless")
        super().sessionless_data(data, sockaddr)

    # -- lab controls --------------------------------------------------------------------

    def pause(self) -> None:
        """Drop every packet from now on: the BMC looks dead on the network."""
        self.reachable = False

    def resume(self) -> None:
        """Answer again."""
        self.reachable = True

    def close(self) -> None:
        """Stop serving and release the UDP port."""
        self.reachable = False
        sock = self.serversocket
        with contextlib.suppress(ValueError):
            ipmisession.iosockets.remove(sock)
        ipmisession.Session.bmc_handlers.pop(sock, None)
        # Wake pyghmi's IO thread so its next select() no longer includes this socket.
        with contextlib.suppress(Exception):
            wake = ipmisession.iosockets[0]
            wake.sendto(b"\x01", (ipmisession.myself, wake.getsockname()[1]))
        sock.close()


class BmcSimulator:
    """A SimBmc in a child process, its state mirrored here: `with BmcSimulator() as sim:`.

    `on_power_change(state, cause)` runs in this process's listener thread after each change.
    """

    def __init__(
        self,
        username: str = "admin",
        password: str = "password",
        power: str = "on",
        on_power_change: PowerCallback | None = None,
        address: str = "127.0.0.1",
        port: int = 0,
        guid: str | None = None,
    ) -> None:
        # The system GUID the BMC reports (Get System GUID); a board of its own by default.
        self._guid = str(uuid.UUID(guid)) if guid else str(uuid.uuid4())
        self.username = username
        self.password = password
        self.address = address
        self.on_power_change = on_power_change
        self._requested_port = port
        self.port = 0
        self._power = power
        self._identify: str | None = None
        self._resets = 0
        self._commands: Counter[str] = Counter()
        self._cond = threading.Condition()
        self._synced = 0
        self._sync_seq = 0
        self._proc: Any = None
        self._conn: Any = None
        self._listener: threading.Thread | None = None
        self._send_lock = threading.Lock()

    # -- state, read through the child so no event is still in flight --------------------

    def _sync(self) -> None:
        if self._conn is None:
            return
        with self._cond:
            self._sync_seq += 1
            seq = self._sync_seq
        self._send(("sync", seq))
        with self._cond:
            if not self._cond.wait_for(lambda: self._synced >= seq, timeout=5):
                raise RuntimeError("the BMC simulator process does not answer")

    @property
    def power(self) -> str:
        """'on' or 'off' as the BMC would report it."""
        self._sync()
        return self._power

    @power.setter
    def power(self, state: str) -> None:
        self._send(("power", state))
        self._sync()
        with self._cond:
            self._power = state

    @property
    def identify(self) -> str | None:
        """'on'/'off' after a Chassis Identify, None if never asked."""
        self._sync()
        return self._identify

    @property
    def resets(self) -> int:
        """Resets and cycles applied while the host was on."""
        self._sync()
        return self._resets

    @property
    def commands(self) -> Counter[str]:
        """How many of each command the BMC received (power_off, get_power, identify_on, ...)."""
        self._sync()
        with self._cond:
            return Counter(self._commands)

    @property
    def guid(self) -> str:
        """The system GUID the BMC reports."""
        return self._guid

    @guid.setter
    def guid(self, value: str) -> None:
        """Another board behind the same address: the BMC reports this GUID from now on."""
        self._guid = str(uuid.UUID(value))
        if self._conn is not None:
            self._send(("guid", self._guid))
            self._sync()

    def count(self, name: str | None = None) -> int:
        """Commands received, of one name or in total."""
        c = self.commands
        return c[name] if name else sum(c.values())

    # -- lifecycle and faults ------------------------------------------------------------

    def start(self) -> BmcSimulator:
        """Start the BMC process, wait until it listens, and start the listener thread."""
        # A plain child process with a socketpair, not multiprocessing's spawn, so the caller's
        # __main__ is never re-imported; the password travels over the pipe, not argv.
        # The zygote forks it from a process that imported pyghmi once (saves ~0.2-1 s of CPU
        # per BMC); without a zygote, a fresh interpreter.
        ours, theirs = socket.socketpair()
        self._proc = _zygote_fork(theirs)
        if self._proc is None:
            # A fresh pair: a zygote that failed mid-request may have handed this one on.
            ours.close()
            theirs.close()
            ours, theirs = socket.socketpair()
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "lab.bmc", "--child-fd", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
            )
        theirs.close()
        self._conn = Connection(ours.detach())
        self._send(
            (
                "init",
                {self.username: self.password},
                self.address,
                self._requested_port,
                self._power,
                self._guid,
            )
        )
        if not self._conn.poll(15):
            self.stop()
            raise RuntimeError("the BMC simulator process did not start")
        kind, port = self._conn.recv()
        if kind != "ready":
            self.stop()
            raise RuntimeError(f"the BMC simulator process failed: {port}")
        self.port = port
        self._listener = threading.Thread(target=self._listen, name=f"bmc-{port}", daemon=True)
        self._listener.start()
        return self

    def _send(self, message: tuple[Any, ...]) -> None:
        if self._conn is None:
            raise RuntimeError("the BMC simulator is not started")
        with self._send_lock:
            self._conn.send(message)

    def _listen(self) -> None:
        conn = self._conn
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return
            kind = message[0]
            callback = None
            with self._cond:
                if kind == "cmd":
                    name = message[1]
                    self._commands[name] += 1
                    if name.startswith("identify_"):
                        self._identify = name.removeprefix("identify_")
                elif kind == "power":
                    _, state, cause = message
                    self._power = state
                    if cause in ("reset", "cycle"):
                        self._resets += 1
                    callback = self.on_power_change
                elif kind == "synced":
                    self._synced = max(self._synced, message[1])
                self._cond.notify_all()
            if callback is not None:
                callback(message[1], message[2])

    def pause(self) -> None:
        """Make the BMC unreachable (drops every packet, keeps its state)."""
        self._send(("pause",))
        self._sync()

    def resume(self) -> None:
        """Make it reachable again."""
        self._send(("resume",))
        self._sync()

    def set_power_faults(self, lag: float = 0.0, obeys: bool = True) -> None:
        """Power off and on land `lag` seconds after they were acknowledged (the status reads
        the old state meanwhile); `obeys=False`: acknowledged, never done (a broken chassis
        control, a BMC of another board: the host stays on)."""
        self._send(("faults", float(lag), bool(obeys)))
        self._sync()

    def stop(self) -> None:
        """Stop the BMC process and free its port; idempotent."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._send(("stop",))
        if self._proc is not None:
            try:
                self._proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=3)
            if isinstance(self._proc, _ForkedBmc):
                self._proc.close()
            self._proc = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._listener is not None:
            self._listener.join(timeout=3)
            self._listener = None

    def __enter__(self) -> BmcSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _serve_child(conn: Any) -> None:
    """The BMC process: serve IPMI, obey the lab's controls, report every change."""
    _, users, address, port, power, guid = conn.recv()
    send_lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with send_lock:
            conn.send(message)

    try:
        bmc = SimBmc(
            users,
            port=port,
            address=address,
            power=power,
            on_power_change=lambda state, cause: send(("power", state, cause)),
            on_record=lambda name: send(("cmd", name)),
            guid=guid,
        )
    except OSError as exc:
        conn.send(("error", str(exc)))
        return
    stopping = threading.Event()

    def controls() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                stopping.set()
                return
            kind = message[0]
            if kind == "pause":
                bmc.pause()
            elif kind == "resume":
                bmc.resume()
            elif kind == "power":
                bmc.powerstate = message[1]
            elif kind == "guid":
                bmc.uuid = uuid.UUID(message[1])
            elif kind == "faults":
                bmc.power_lag, bmc.power_obeys = message[1], message[2]
            elif kind == "sync":
                send(("synced", message[1]))
            elif kind == "stop":
                stopping.set()
                return

    conn.send(("ready", bmc.port))
    threading.Thread(target=controls, daemon=True).start()
    while not stopping.is_set():
        ipmisession.Session.wait_for_rsp(0.2)
    bmc.reachable = False
    conn.close()
    # The process ends here and the OS frees the port. Closing the socket first races with
    # pyghmi's IO thread, which may still be in select() on it: an EBADF traceback on stderr.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# -- the zygote: one process that imported pyghmi, forking every BMC process -----------------
#
# Importing pyghmi costs 0.2-1.4 s of CPU (its OEM plugin scan runs at import), and a lab
# starts ~10 BMCs. The zygote (`python -m lab.bmc --zygote-fd N`, one per process that starts
# BMCs, started on first use) imports it once, stays single-threaded, and forks a BMC process
# per request: the caller sends the child's end of its socketpair over a unix socket, the
# zygote forks, the child serves `_serve_child` on it, and the zygote answers the child's pid
# and a pidfd of it (so the caller can wait for and kill exactly that process, never a reused
# pid). The zygote reaps its children and exits at EOF on its socket (its parent is gone).
# If it cannot start or dies, BMCs start as fresh interpreters again (logged).

_ZYGOTE_TIMEOUT = 30.0  # its first answer includes importing pyghmi on a busy machine
_zygote_lock = threading.Lock()
_zygote: tuple[subprocess.Popen[bytes], socket.socket, int] | None = None  # proc, socket, owner
_zygote_broken = False


class _ForkedBmc:
    """A BMC process forked by the zygote (not our child): wait and kill it through a pidfd."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self._pidfd = pidfd

    def poll(self) -> int | None:
        """0 once the process has ended (its exit code belongs to the zygote), else None."""
        ready, _, _ = select.select([self._pidfd], [], [], 0)
        return 0 if ready else None

    def wait(self, timeout: float | None = None) -> int:
        ready, _, _ = select.select([self._pidfd], [], [], timeout)
        if not ready:
            raise subprocess.TimeoutExpired(f"bmc pid {self.pid}", timeout or 0)
        return 0

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("the BMC zygote closed its socket")
        data += chunk
    return data


def _start_zygote() -> tuple[subprocess.Popen[bytes], socket.socket, int]:
    ours, theirs = socket.socketpair()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lab.bmc", "--zygote-fd", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    ours.settimeout(_ZYGOTE_TIMEOUT)
    try:
        if _recv_exact(ours, 1) != b"R":
            raise OSError("the BMC zygote did not say it is ready")
    except BaseException:
        ours.close()
        proc.kill()
        proc.wait()
        raise
    return proc, ours, os.getpid()


def _zygote_fork(child_end: socket.socket) -> _ForkedBmc | None:
    """A BMC process forked by this process's zygote, serving on `child_end`; None if there is
    no working zygote (the caller starts a fresh interpreter instead)."""
    global _zygote, _zygote_broken
    with _zygote_lock:
        if _zygote is not None and _zygote[2] != os.getpid():
            _zygote = None  # a forked copy of the process that started it: start our own
        if _zygote_broken:
            return None
        if _zygote is None:
            try:
                _zygote = _start_zygote()
            except (OSError, EOFError, subprocess.SubprocessError) as exc:
                _zygote_broken = True
                log.warning("cannot start the BMC zygote (%s): BMCs start as new processes", exc)
                return None
        proc, sock, _owner = _zygote
        try:
            socket.send_fds(sock, [b"F"], [child_end.fileno()])
            reply, fds, _flags, _addr = socket.recv_fds(sock, 8, 1)
            if len(reply) < 8:
                reply += _recv_exact(sock, 8 - len(reply))
            (pid,) = struct.unpack("!q", reply)
            if pid <= 0 or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise OSError(f"the BMC zygote could not fork (errno {-pid})")
        except (OSError, EOFError, struct.error) as exc:
            _zygote_broken = True
            _zygote = None
            log.warning("the BMC zygote failed (%s): BMCs start as new processes", exc)
            sock.close()
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(subprocess.SubprocessError):
                proc.wait(timeout=3)
            return None
        return _ForkedBmc(pid, fds[0])


def _shutdown_zygote() -> None:
    """Close this process's zygote and wait for it to exit (at exit; tests, benchmarks)."""
    global _zygote
    with _zygote_lock:
        zygote, _zygote = _zygote, None
    if zygote is None or zygote[2] != os.getpid():
        return
    proc, sock, _owner = zygote
    sock.close()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


atexit.register(_shutdown_zygote)


def _reap_children() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _serve_zygote(fd: int) -> None:
    """The zygote: fork a BMC process per request until its parent closes the socket."""
    # Ctrl-C in a terminal reaches the whole process group; the zygote ends with its parent.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    sock.sendall(b"R")
    while True:
        _reap_children()
        ready, _, _ = select.select([sock], [], [], 1.0)
        if not ready:
            continue
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, 1, 1)
        except OSError:
            return
        if not msg:
            return  # the parent is gone
        if len(fds) != 1:
            for extra in fds:
                os.close(extra)
            sock.sendall(struct.pack("!q", -22))  # EINVAL
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(fds[0])
            sock.sendall(struct.pack("!q", -(exc.errno or 1)))
            continue
        if pid == 0:
            code = 1
            try:
                sock.close()
                signal.signal(signal.SIGINT, signal.default_int_handler)
                random.seed()  # not the zygote's sequence, shared by every sibling
                _serve_child(Connection(fds[0]))
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(fds[0])
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:  # no pidfds here: the caller cannot wait for it safely
            os.kill(pid, signal.SIGKILL)
            sock.sendall(struct.pack("!q", -(exc.errno or 1)))
            continue
        try:
            socket.send_fds(sock, [struct.pack("!q", pid)], [pidfd])
        except OSError:
            return
        finally:
            os.close(pidfd)


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 nothing listens on (for 'unreachable BMC' cases)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="serve a simulated IPMI BMC on loopback")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--username", default="admin")
    ap.add_argument("--password", default="password")
    ap.add_argument("--child-fd", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--zygote-fd", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.zygote_fd is not None:
        _serve_zygote(a.zygote_fd)
        sys.exit(0)
    if a.child_fd is not None:
        _serve_child(Connection(a.child_fd))
        sys.exit(0)
    with BmcSimulator(a.username, a.password, port=a.port) as sim:
        print(f"BMC simulator on 127.0.0.1:{sim.port} ({a.username})", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
