"""Native IPMI 2.0 (RMCP+, lanplus) through pyghmi.

Rule: every pyghmi call runs in a worker thread under a deadline, and a call that misses it
breaks its session so the thread ends too. pyghmi is blocking and keeps process-wide state;
two defects of pyghmi 1.6.19 are worked around here:

- A second `Command` for the same BMC, user, password and port in one process hangs (or
  returns a dead session): `Session.initting_sessions` is keyed with str user/password but
  deleted with bytes, so a finished login stays registered as "initting" and the next login
  joins it and waits for it forever. `_forget_finished_logins` drops such entries before every
  login (only entries whose login is over, so a login in progress in another thread is kept).
- With several threads driving pyghmi's loop, a failed login can surface as
  `AttributeError: ... 'errormsg'` before the error text is set; it is read back from the
  session and reported as what it was (wrong password, unknown user).

One `Command` (one session) serves a driver's calls; `aclose()` logs it out. The actuator builds
a driver per fence, so no session outlives a fence and a restarted BMC never meets a stale one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import SecretStr
from pyghmi.exceptions import IpmiException
from pyghmi.ipmi import command as ipmicommand
from pyghmi.ipmi.private import session as ipmisession

from fencing.drivers.base import (
    BmcAuthError,
    BmcRefused,
    BmcUnreachable,
    DriverError,
    PowerRequest,
    PowerState,
)

T = TypeVar("T")

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


def _classify(message: str, where: str) -> DriverError:
    low = message.lower()
    if any(m in low for m in _AUTH_MARKERS):
        return BmcAuthError(f"BMC {where} refused the credentials: {message}")
    if not message or message == "None" or "timeout" in low or "unable to transmit" in low:
        return BmcUnreachable(f"no answer from BMC {where}")
    return BmcRefused(f"BMC {where}: {message}")


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
        self.address = address
        self.port = port
        self.username = username
        self._password = password
        self.timeout = timeout
        self.where = f"{address}:{port}"
        self._cmd: Any = None
        self._lock = threading.Lock()  # one pyghmi call at a time per driver

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

    def _call(self, fn: Callable[[Any], T]) -> T:
        with self._lock:
            cmd = self._connect()
            try:
                return fn(cmd)
            except IpmiException as exc:
                self._drop()
                raise _classify(str(exc), self.where) from None
            except (TypeError, AttributeError, KeyError) as exc:
                # pyghmi's own bugs on a session that broke under it (see module docstring)
                self._drop()
                raise BmcUnreachable(f"BMC {self.where}: session failed ({exc})") from None

    def _abort(self) -> None:
        """Break the session a stuck worker thread waits on, so the thread ends."""
        sessions = [ipmisession.Session.initting_sessions.get(self._key())]
        if self._cmd is not None:
            sessions.append(self._cmd.ipmi_session)
        for sess in sessions:
            if sess is not None and not getattr(sess, "broken", False):
                try:
                    sess._mark_broken("timeout")
                except Exception:  # noqa: S110 - best effort on pyghmi internals
                    pass
        self._cmd = None

    # -- async side ----------------------------------------------------------------------

    async def _run(self, fn: Callable[[Any], T]) -> T:
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._call, fn), self.timeout)
        except TimeoutError:
            self._abort()
            raise BmcUnreachable(
                f"no answer from BMC {self.where} within {self.timeout:g} s"
            ) from None

    async def get_power(self) -> PowerState:
        """Chassis power state."""
        result = await self._run(lambda c: c.get_power())
        state = result.get("powerstate")
        if state == "on":
            return "on"
        if state == "off":
            return "off"
        raise BmcRefused(f"BMC {self.where} reported power state {state!r}")

    async def set_power(self, state: PowerRequest) -> None:
        """Chassis control: off is a hard power-down (not ACPI soft-off)."""
        await self._run(lambda c: c.set_power(state, wait=False))

    async def identify(self, on: bool) -> None:
        """Chassis Identify: on until switched off (force), or off."""
        await self._run(lambda c: c.set_identify(on=on))

    async def test(self) -> str:
        """A power-status read: proves address, credentials and cipher suite work."""
        return f"Chassis Power is {await self.get_power()}"

    async def aclose(self) -> None:
        """Log out of the session."""
        if self._cmd is not None:
            await asyncio.to_thread(self._drop)
