"""Native IPMI 2.0 (RMCP+, lanplus) through pyghmi.

Rule: every pyghmi call runs in a worker thread under a deadline, and a call that misses it
breaks its session so the thread ends too. pyghmi is blocking and keeps process-wide state;
three defects of pyghmi 1.6.19 are worked around here:

- A second `Command` for the same BMC, user, password and port in one process hangs (or
  returns a dead session): `Session.initting_sessions` is keyed with str user/password but
  deleted with bytes, so a finished login stays registered as "initting" and the next login
  joins it and waits for it forever. `_forget_finished_logins` drops such entries before every
  login (only entries whose login is over, so a login in progress in another thread is kept).
- With several threads driving pyghmi's loop, a failed login can surface as
  `AttributeError: ... 'errormsg'` before the error text is set; it is read back from the
  session and reported as what it was (wrong password, unknown user).
- A reply that arrives before its wait is registered is noticed only when pyghmi's retry timer
  fires, 0.5-1 s later (about 3 calls in 20 on loopback): `raw_command` sends, then
  `awaitresponse` queues its wait for the IO thread, which has already read the reply and
  matched it against the waits it knew. `_io_wait_seeing_queued_replies` (installed on import
  in place of `session._io_wait`) registers the wait, then wakes it at once when a reply for
  that BMC is already queued; pyghmi's callers loop until their reply is there, so an early
  wake costs nothing. `benchmarks/pyghmi_stall.py` measures the stall rate with and without.

Each pyghmi call is one named IPMI command sent with `raw_command` (Get Chassis Status, Chassis
Control, Chassis Identify, Get System GUID), so an error names the command that failed and its
completion code. User names over 16 bytes and passwords over 20 bytes are refused before any
packet is sent: IPMI 2.0 cannot carry them and a BMC answers "incorrect password".

A fourth defect is pyghmi's sharing: every `Command` for the same BMC and user joins the same
session, whichever thread made it. A call abandoned at its deadline keeps its thread waiting
inside pyghmi (up to 40 s of pyghmi's own retries) on that shared session, and the next driver's
call queues behind it on the session's lock, or takes its reply. And pyghmi's own way to end a
session (`_mark_broken`) sends a logout through that same lock, so calling it from the event
loop froze the loop. Hence:

- One call at a time per BMC in the whole process (`_BMC_LOCKS`), held by the worker thread;
  a call abandoned before it got the lock never sends anything (`_Call.abandoned`), so a
  power-off given up on is not sent later behind the operator's back.
- A call that misses its deadline has its session severed (`_sever`): flags set and registries
  cleared without a packet or a lock, so the stuck thread leaves pyghmi within about a second
  and the next login makes a new session.

One `Command` (one session) serves a driver's calls; `aclose()` logs it out. The actuator builds
a driver per fence, so no session outlives a fence and a restarted BMC never meets a stale one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from pydantic import SecretStr
from pyghmi.exceptions import IpmiException
from pyghmi.ipmi import command as ipmicommand
from pyghmi.ipmi.private import session as ipmisession
from pyghmi.ipmi.private import util as ipmiutil

from fencing.drivers.base import (
    BmcAuthError,
    BmcRefused,
    BmcUnreachable,
    DriverConfigError,
    DriverError,
    PowerRequest,
    PowerState,
)
from fencing.settings import ipmi_credentials_error

_BMC_LOCKS: dict[tuple[str, int], threading.Lock] = {}
_BMC_LOCKS_GUARD = threading.Lock()


def _bmc_lock(address: str, port: int) -> threading.Lock:
    """The process-wide lock of one BMC: one pyghmi call at a time (pyghmi shares sessions)."""
    with _BMC_LOCKS_GUARD:
        return _BMC_LOCKS.setdefault((address, port), threading.Lock())


def _sever(sess: Any, why: str) -> None:
    """End a pyghmi session at once, with no packet and no pyghmi lock (see the docstring).

    A thread waiting in `Session.__init__` (login), `_cmdwait` or `awaitresponse` sees the
    session neither logged in nor logging in and returns or raises at its next wake-up; pyghmi
    drops the session from `bmc_handlers` when the next `Command` for that BMC is made.
    """
    if sess is None:
        return
    sess.lastpayload = None
    sess.onlogpayload = None
    sess.incommand = False
    sess.logged = 0
    sess.logging = False
    sess.errormsg = why
    for registry in (ipmisession.Session.keepalive_sessions, ipmisession.Session.waiting_sessions):
        registry.pop(sess, None)
    for key, other in list(ipmisession.Session.initting_sessions.items()):
        if other is sess:
            ipmisession.Session.initting_sessions.pop(key, None)
    for handlers in list(ipmisession.Session.bmc_handlers.values()):
        for key, other in list(handlers.items()):
            if other is sess:
                handlers.pop(key, None)
    if not getattr(sess, "broken", False):
        sess.broken = True
        socket_ = getattr(sess, "socket", None)
        if socket_ is not None and socket_ in ipmisession.Session.socketpool:
            ipmisession.Session.socketpool[socket_] -= 1
    waiters = getattr(sess, "logonwaiters", None) or []
    while waiters:
        waiter = waiters.pop()
        try:
            waiter({"error": why})
        except Exception:  # noqa: S110 - pyghmi's callbacks, best effort
            pass


class _Call:
    """One call handed to a worker thread; `abandoned` once its caller stopped waiting."""

    __slots__ = ("abandoned",)

    def __init__(self) -> None:
        self.abandoned = False


_AUTH_MARKERS = ("password", "unauthorized name", "unauthorized role", "invalid session id")


def _forget_finished_logins(address: str, port: int) -> int:
    """Drop this BMC's stale `initting_sessions` entries (pyghmi defect); return how many."""
    stale = [
        key
        for key, sess in list(ipmisession.Session.initting_sessions.items())
        if key[0] == address
        and key[3] == port
        and (not getattr(sess, "logging", False) or getattr(sess, "broken", False))
    ]
    for key in stale:
        ipmisession.Session.initting_sessions.pop(key, None)
    return len(stale)


# -- the third defect: a reply queued before its wait was registered ------------------------

_original_io_wait = ipmisession._io_wait


def _reply_queued_for(address: Any) -> bool:
    """Whether a reply from the BMC at `address` (any BMC: None) already waits to be processed."""
    if address is None:
        # pyghmi's event loop (`_poller`, used while logging in) waits for any packet: the IO
        # thread queues the session of every packet it read in `sessionqueue`.
        return bool(ipmisession.sessionqueue)
    for sess in list(ipmisession.Session.bmc_handlers.get(address, {}).values()):
        if getattr(sess, "pktqueue", None) or (
            getattr(sess, "awaitingresponse", False)
            and getattr(sess, "lastresponse", None) is not None
        ):
            return True
    return False


def _io_wait_seeing_queued_replies(timeout: float, myaddr: Any = None, evq: Any = None) -> None:
    """pyghmi's `_io_wait`, which also returns at once when the reply is already queued."""
    evt = threading.Event()
    if evq is not None:
        evq.append(evt)
    deadline = timeout + ipmisession._monotonic_time()
    # Registered first, checked second: a reply read by the IO thread after the check finds
    # the wait registered; one read before it is in the session's queue, where the check sees it.
    ipmisession.ioqueue.append((deadline, evt, myaddr))
    if _reply_queued_for(myaddr):
        evt.set()
    elif deadline < ipmisession.selectdeadline:
        intsock = ipmisession.iosockets[0]
        intsock.sendto(b"\x01", (ipmisession.myself, intsock.getsockname()[1]))
    evt.wait()


def use_reply_race_workaround(enabled: bool = True) -> None:
    """Install (default, done on import) or remove the third workaround; for the benchmark."""
    ipmisession._io_wait = _io_wait_seeing_queued_replies if enabled else _original_io_wait


use_reply_race_workaround()

# IPMI commands the driver sends: (name, netfn, command).
GET_CHASSIS_STATUS = ("Get Chassis Status", 0x00, 0x01)
CHASSIS_CONTROL = ("Chassis Control", 0x00, 0x02)
CHASSIS_IDENTIFY = ("Chassis Identify", 0x00, 0x04)
GET_SYSTEM_GUID = ("Get System GUID", 0x06, 0x37)
_CONTROL_CODES = {"off": 0x00, "on": 0x01, "reset": 0x03}
LOGIN = "session login (RMCP+ open session, RAKP)"


def _classify(message: str, where: str, command: str = LOGIN) -> DriverError:
    low = message.lower()
    if any(m in low for m in _AUTH_MARKERS):
        return BmcAuthError(f"BMC {where} refused the credentials in {command}: {message}")
    if not message or message == "None" or "timeout" in low or "unable to transmit" in low:
        return BmcUnreachable(f"no answer from BMC {where} to {command}")
    return BmcRefused(f"BMC {where}: {command} failed: {message}")


class IpmiDriver:
    """pyghmi lanplus driver for one BMC."""

    name = "ipmi"

    def __init__(
        self,
        address: str,
        username: str,
        password: SecretStr,
        port: int = 623,
        timeout: float = 20.0,
    ) -> None:
        problem = ipmi_credentials_error(username, password)
        if problem is not None:
            raise DriverConfigError(f"IPMI driver for BMC {address}:{port}: {problem}")
        self.address = address
        self.port = port
        self.username = username
        self._password = password
        self.timeout = timeout
        self.where = f"{address}:{port}"
        self._cmd: Any = None
        self._lock = _bmc_lock(address, port)  # one pyghmi call at a time per BMC, process-wide

    # -- blocking side (worker thread) ---------------------------------------------------

    def _key(self) -> tuple[str, str, str, int, None]:
        return (self.address, self.username, self._password.get_secret_value(), self.port, None)

    def _connect(self) -> Any:
        if self._cmd is not None:
            return self._cmd
        _forget_finished_logins(self.address, self.port)
        try:
            self._cmd = ipmicommand.Command(
                bmc=self.address,
                userid=self.username,
                password=self._password.get_secret_value(),
                port=self.port,
                keepalive=False,
            )
        except AttributeError:
            sess = ipmisession.Session.initting_sessions.get(self._key())
            deadline = time.monotonic() + 0.5
            while getattr(sess, "errormsg", None) is None and time.monotonic() < deadline:
                time.sleep(0.01)
            raise _classify(str(getattr(sess, "errormsg", "") or ""), self.where) from None
        except IpmiException as exc:
            raise _classify(str(exc), self.where) from None
        except OSError as exc:
            raise BmcUnreachable(f"cannot reach BMC {self.where}: {exc.strerror}") from None
        return self._cmd

    def _drop(self) -> None:
        cmd, self._cmd = self._cmd, None
        if cmd is not None:
            try:
                cmd.ipmi_session.logout()
            except Exception:  # noqa: S110 - a failed logout of a broken session changes nothing
                pass

    def _call(
        self, call: _Call, command: tuple[str, int, int], data: tuple[int, ...] = ()
    ) -> list[int]:
        """Send one IPMI command; its response data, or a DriverError naming the command."""
        name, netfn, code = command
        with self._lock:
            if call.abandoned:  # its caller gave up while another call held this BMC
                raise BmcUnreachable(f"BMC {self.where}: {name} abandoned before it was sent")
            cmd = self._connect()
            try:
                response = cmd.raw_command(netfn=netfn, command=code, data=data)
            except IpmiException as exc:
                self._drop()
                raise _classify(str(exc), self.where, name) from None
            except (TypeError, AttributeError, KeyError) as exc:
                # pyghmi's own bugs on a session that broke under it (see module docstring)
                self._drop()
                raise BmcUnreachable(
                    f"BMC {self.where}: session failed during {name} ({exc})"
                ) from None
        if "error" in response:
            cc = response.get("code")
            raise BmcRefused(
                f"BMC {self.where}: {name} (netfn {netfn:#04x} cmd {code:#04x}) failed: "
                f"{response['error']}" + (f" (completion code {cc:#04x})" if cc else "")
            )
        return list(response.get("data") or [])

    def _abort(self) -> None:
        """Sever the sessions a stuck worker thread waits on, so the thread ends (no I/O)."""
        _sever(ipmisession.Session.initting_sessions.get(self._key()), "abandoned by fencer")
        cmd, self._cmd = self._cmd, None
        if cmd is not None:
            _sever(getattr(cmd, "ipmi_session", None), "abandoned by fencer")

    # -- async side ----------------------------------------------------------------------

    async def _run(self, command: tuple[str, int, int], data: tuple[int, ...] = ()) -> list[int]:
        call = _Call()
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(self._call, call, command, data), self.timeout
            )
        except TimeoutError:
            call.abandoned = True
            self._abort()
            raise BmcUnreachable(
                f"no answer from BMC {self.where} to {command[0]} within {self.timeout:g} s"
            ) from None

    async def get_power(self) -> PowerState:
        """Get Chassis Status: bit 0 of the current power state byte."""
        data = await self._run(GET_CHASSIS_STATUS)
        if not data:
            raise BmcRefused(f"BMC {self.where}: {GET_CHASSIS_STATUS[0]} returned no data")
        return "on" if data[0] & 1 else "off"

    async def set_power(self, state: PowerRequest) -> None:
        """Chassis Control: off is a hard power-down (not ACPI soft-off)."""
        await self._run(CHASSIS_CONTROL, (_CONTROL_CODES[state],))

    async def identify(self, on: bool) -> None:
        """Chassis Identify: on until switched off (force), or off."""
        await self._run(CHASSIS_IDENTIFY, (0, 1) if on else (0, 0))

    async def system_guid(self) -> str:
        """Get System GUID, as dmidecode and ipmitool print it (lower case)."""
        data = await self._run(GET_SYSTEM_GUID)
        if len(data) < 16:
            raise BmcRefused(
                f"BMC {self.where}: {GET_SYSTEM_GUID[0]} returned {len(data)} bytes, not 16"
            )
        return str(ipmiutil.decode_wireformat_uuid(bytearray(data[:16]))).lower()

    async def test(self) -> str:
        """A power-status read: proves address, credentials and cipher suite work."""
        return f"Chassis Power is {await self.get_power()}"

    async def aclose(self) -> None:
        """Log out of the session (severed instead if the logout is not done in time)."""
        if self._cmd is None:
            return
        try:
            await asyncio.wait_for(asyncio.to_thread(self._logout), self.timeout)
        except TimeoutError:
            self._abort()

    def _logout(self) -> None:
        with self._lock:
            self._drop()
