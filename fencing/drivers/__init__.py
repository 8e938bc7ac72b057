"""Fence drivers: each reads and sets one host's power and identify LED (see base.py).

`build_driver(ipmi, address, timeout)` turns a host's effective settings into a driver.
"""

from __future__ import annotations

from fencing.drivers.base import DriverConfigError, PowerDriver
from fencing.settings import Driver, IpmiSettings


def build_driver(ipmi: IpmiSettings, address: str | None, timeout: float = 20.0) -> PowerDriver:
    """The driver the settings name, for a BMC at `address`."""
    if ipmi.driver is Driver.FAKE:
        from fencing.drivers.fake import FakeDriver

        return FakeDriver()
    if not address:
        raise DriverConfigError("hosts.<uuid>.ipmi.address: the host has no BMC address")
    if ipmi.driver is Driver.IPMI:
        from fencing.drivers.ipmi import IpmiDriver

        return IpmiDriver(address, ipmi.username, ipmi.password, ipmi.port, timeout=timeout)
    if ipmi.driver is Driver.TEMPLATE:
        from fencing.drivers.template import TemplateDriver

        return TemplateDriver(ipmi, address, timeout=timeout)
    from fencing.drivers.redfish import RedfishDriver

    return RedfishDriver(
        address,
        ipmi.username,
        ipmi.password,
        port=ipmi.port,
        system=ipmi.redfish_system,
        verify_tls=ipmi.verify_tls,
        timeout=timeout,
        allow_insecure=ipmi.allow_insecure_redfish,
    )
