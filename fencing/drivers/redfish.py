"""Redfish: ComputerSystem.Reset and IndicatorLED over HTTPS, through httpx.

Rule: power-off is `ForceOff`, never `GracefulShutdown`: a graceful shutdown needs a live OS to
agree, so it cannot fence a hung or dead host (CloudStack's Redfish driver does exactly that,
issue #13376). Reset is `ForceRestart`, on is `On`, blink is IndicatorLED `Blinking`.
Certificates are checked unless `verify_tls` is off. Only https: an `http://` address would
send the BMC password in clear, so the driver refuses it (before any request) unless the
configuration file says `allow_insecure_redfish: true` for that host or cluster.
"""

from __future__ import annotations

from typing import Any

import httpx
from pydantic import SecretStr

from fencing.drivers.base import (
    BmcAuthError,
    BmcRefused,
    BmcUnreachable,
    DriverConfigError,
    PowerRequest,
    PowerState,
)

_RESET_TYPES = {"off": "ForceOff", "on": "On", "reset": "ForceRestart"}
# PoweringOff is still on: only "Off" proves the host is down.
_POWER_STATES: dict[str, PowerState] = {
    "On": "on",
    "PoweringOn": "on",
    "PoweringOff": "on",
    "Paused": "on",
    "Off": "off",
}


def insecure_url_error(url: str) -> str | None:
    """Why the driver refuses this Redfish URL without `allow_insecure_redfish`, or None."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else "https"
    if scheme == "https":
        return None
    return (
        f"ipmi.address: Redfish over {scheme}:// would send the BMC password in clear; use "
        "https, or set allow_insecure_redfish: true for this host or cluster in the "
        "configuration file"
    )


def base_url(address: str, port: int) -> str:
    """`https://address:port`, unless the address is already a URL."""
    if "://" in address:
        return address.rstrip("/")
    host = f"[{address}]" if ":" in address else address
    return f"https://{host}:{port}"


class RedfishDriver:
    """One Redfish ComputerSystem."""

    name = "redfish"

    def __init__(
        self,
        address: str,
        username: str,
        password: SecretStr,
        port: int = 443,
        system: str | None = None,
        verify_tls: bool = True,
        timeout: float = 20.0,
        allow_insecure: bool = False,
    ) -> None:
        self.url = base_url(address, port)
        problem = insecure_url_error(self.url)
        if problem is not None and not allow_insecure:
            raise DriverConfigError(problem)
        self.system = system
        self._client = httpx.AsyncClient(
            base_url=self.url,
            auth=httpx.BasicAuth(username, password.get_secret_value()),
            verify=verify_tls,
            timeout=timeout,
            headers={"Accept": "application/json"},
        )
        self._system_path: str | None = None

    async def _request(self, method: str, path: str, json: Any = None) -> httpx.Response:
        try:
            r = await self._client.request(method, path, json=json)
        except httpx.TimeoutException:
            raise BmcUnreachable(f"no answer from Redfish {self.url} ({method} {path})") from None
        except httpx.TransportError as exc:
            raise BmcUnreachable(f"cannot reach Redfish {self.url}: {exc}") from None
        if r.status_code in (401, 403):
            raise BmcAuthError(f"Redfish {self.url} refused the credentials ({r.status_code})")
        if r.status_code >= 400:
            raise BmcRefused(
                f"Redfish {self.url} answered {r.status_code} to {method} {path}: "
                f"{r.text.strip()[:200]}"
            )
        return r

    async def _system(self) -> str:
        if self._system_path is None:
            if self.system:
                self._system_path = f"/redfish/v1/Systems/{self.system}"
            else:
                members = (await self._request("GET", "/redfish/v1/Systems")).json()
                try:
                    self._system_path = str(members["Members"][0]["@odata.id"])
                except (KeyError, IndexError, TypeError):
                    raise BmcRefused(f"Redfish {self.url} lists no ComputerSystem") from None
        return self._system_path

    async def get_power(self) -> PowerState:
        """ComputerSystem.PowerState."""
        body = (await self._request("GET", await self._system())).json()
        raw = body.get("PowerState")
        state = _POWER_STATES.get(str(raw))
        if state is None:
            raise BmcRefused(f"Redfish {self.url} reported PowerState {raw!r}")
        return state

    async def set_power(self, state: PowerRequest) -> None:
        """ComputerSystem.Reset with ForceOff / On / ForceRestart."""
        path = f"{await self._system()}/Actions/ComputerSystem.Reset"
        await self._request("POST", path, json={"ResetType": _RESET_TYPES[state]})

    async def identify(self, on: bool) -> None:
        """IndicatorLED Blinking or Off."""
        await self._request(
            "PATCH", await self._system(), json={"IndicatorLED": "Blinking" if on else "Off"}
        )

    async def system_guid(self) -> str:
        """ComputerSystem.UUID: the system's SMBIOS UUID, the GUID IPMI reports too."""
        path = await self._system()
        raw = (await self._request("GET", path)).json().get("UUID")
        if not raw or not isinstance(raw, str):
            raise BmcRefused(f"Redfish {self.url}: GET {path} has no UUID")
        return raw.strip().lower()

    async def test(self) -> str:
        """A PowerState read."""
        return f"PowerState {(await self.get_power()).capitalize()}"

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()
