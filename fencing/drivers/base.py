"""The one small interface every fence driver implements, and the errors drivers raise.

Rule: a driver only reads and sets power and identify, and (where its protocol can) reads the
BMC's system GUID (`IdentifiesBmc`); "already off", verification, timeouts, retries, locking,
redaction and identity pinning (fencing.identity) belong to the engine side. Errors:

    DriverError                 any failure talking to a BMC
     ├── BmcUnreachable         no answer (network, dead BMC, timeout): worth a retry
     ├── BmcAuthError           credentials refused: a retry cannot help
     ├── BmcRefused             the BMC or tool answered with an error
     └── DriverConfigError      the settings cannot work (bad template, missing address)
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

PowerState = Literal["on", "off"]
PowerRequest = Literal["on", "off", "reset"]


class DriverError(Exception):
    """A driver could not do what it was asked."""

    retryable = True


class BmcUnreachable(DriverError):
    """The BMC did not answer."""


class BmcAuthError(DriverError):
    """The BMC refused the credentials."""

    retryable = False


class BmcRefused(DriverError):
    """The BMC (or the configured tool) answered with an error."""


class DriverConfigError(DriverError):
    """The driver's settings cannot work; names the field."""

    retryable = False


@runtime_checkable
class PowerDriver(Protocol):
    """Read and set one host's power and identify LED through its BMC.

    Methods are coroutines; a driver built on a blocking library runs it off the event loop.
    """

    name: str

    async def get_power(self) -> PowerState:
        """'on' or 'off'."""
        ...

    async def set_power(self, state: PowerRequest) -> None:
        """Ask for 'on', 'off' (hard, never graceful) or 'reset'; returns when the BMC accepted."""
        ...

    async def identify(self, on: bool) -> None:
        """Switch the chassis identify LED on (blinking) or off."""
        ...

    async def test(self) -> str:
        """Run the configured test (no power change) and return what it said, one line."""
        ...

    async def aclose(self) -> None:
        """Release sessions and connections."""
        ...


@runtime_checkable
class IdentifiesBmc(Protocol):
    """A driver that can read which machine its BMC belongs to (IPMI, Redfish, the fake)."""

    async def system_guid(self) -> str:
        """The system GUID (IPMI Get System GUID, Redfish ComputerSystem.UUID), lower case."""
        ...


async def read_system_guid(driver: PowerDriver) -> str | None:
    """The BMC's system GUID, or None when the driver has no way to read one (command template)."""
    if not isinstance(driver, IdentifiesBmc):
        return None
    return (await driver.system_guid()).strip().lower()
