"""An in-process fake BMC driver: the engine's test double, shipped with the package.

Rule: it behaves like a real BMC seen through a driver (power changes may land late, the BMC
may be unreachable or refuse the password), and it records every call so tests assert on it.
"""

from __future__ import annotations

import asyncio

from fencing.drivers.base import (
    BmcAuthError,
    BmcUnreachable,
    PowerRequest,
    PowerState,
)


class FakeDriver:
    """A fake BMC: `FakeDriver(power='on', settle_polls=0)`; set `unreachable`/`wrong_password`."""

    name = "fake"

    def __init__(
        self,
        power: PowerState = "on",
        settle_polls: int = 0,
        latency: float = 0.0,
        fail_first: int = 0,
    ) -> None:
        self.power: PowerState = power
        self.identify_on = False
        self.unreachable = False
        self.wrong_password = False
        self.ignore_off = False  # a BMC that accepts "off" but never powers down
        self.settle_polls = settle_polls  # get_power calls before a change shows
        self.latency = latency
        self.fail_first = fail_first  # the first N calls are unreachable (retry tests)
        self.calls: list[str] = []
        self.resets = 0
        self.closed = False
        self._pending: PowerState | None = None
        self._pending_in = 0
        self._in_flight = 0
        self.max_in_flight = 0
        self.guid = "00000000-0000-4000-8000-00000000fa4e"  # the system GUID it reports

    async def _call(self, name: str) -> None:
        self.calls.append(name)
        self._in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
        finally:
            self._in_flight -= 1
        if self.fail_first > 0:
            self.fail_first -= 1
            raise BmcUnreachable("fake BMC: no answer")
        if self.unreachable:
            raise BmcUnreachable("fake BMC: no answer")
        if self.wrong_password:
            raise BmcAuthError("fake BMC: incorrect password")

    async def get_power(self) -> PowerState:
        await self._call("get_power")
        if self._pending is not None:
            if self._pending_in <= 0:
                self.power, self._pending = self._pending, None
            else:
                self._pending_in -= 1
        return self.power

    async def set_power(self, state: PowerRequest) -> None:
        await self._call(f"set_power:{state}")
        if state == "reset":
            if self.power == "on":
                self.resets += 1
            return
        if state == "off" and self.ignore_off:
            return
        if self.settle_polls:
            self._pending, self._pending_in = state, self.settle_polls
        else:
            self.power = state

    async def identify(self, on: bool) -> None:
        await self._call(f"identify:{'on' if on else 'off'}")
        self.identify_on = on

    async def system_guid(self) -> str:
        await self._call("system_guid")
        return self.guid

    async def test(self) -> str:
        await self._call("test")
        return f"Chassis Power is {self.power}"

    async def aclose(self) -> None:
        self.closed = True
