"""Pre-flight: read a host's BMC through its effective settings (the test action), change
nothing, and say whether a fence of it could work right now (`fencer ipmi test`, the periodic
pre-flight of the actuate role, the UI's test button). With a pin store it also reads the BMC's
system GUID and pins or compares it (fencing.identity)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fencing.drivers import build_driver
from fencing.drivers.base import PowerDriver
from fencing.engine import Engine
from fencing.events import FenceAction
from fencing.identity import PinStore, verify_identity
from fencing.records import HostRef
from fencing.redaction import Redactor, secrets_of
from fencing.settings import FencerSettings, IpmiSettings

DriverFactory = Callable[[IpmiSettings, str | None, float], PowerDriver]


def call_timeout(settings: FencerSettings) -> float:
    """Deadline of one BMC call: long enough for a slow BMC, short enough to retry."""
    return max(5.0, min(30.0, settings.actuator.power_timeout))


@dataclass(frozen=True)
class PreflightResult:
    """Whether a fence of this host could work right now."""

    host_uuid: str
    cluster_uuid: str | None
    driver: str
    ok: bool
    power: str | None
    detail: str | None
    error: str | None
    checked_at: float
    # BMC identity (fencing.identity), when a pin store was given: pinned, matches, changed,
    # unsupported or unreadable, and the GUID the BMC reported.
    identity: str | None = None
    guid: str | None = None


async def check_host(
    settings: FencerSettings,
    host_uuid: str,
    cluster_uuid: str | None,
    engine: Engine | None = None,
    driver_factory: DriverFactory = build_driver,
    pins: PinStore | None = None,
) -> PreflightResult:
    """Run the test action through the host's effective settings; never changes power.

    With `pins`, first read the BMC's system GUID: pin it if the host has no pin yet, else
    compare (a changed GUID makes the result not ok, with the reason)."""
    eff = settings.effective_ipmi(host_uuid, cluster_uuid)
    redact = Redactor(secrets_of(settings, eff.values))
    now = time.time()
    try:
        driver = driver_factory(eff.values, eff.address, call_timeout(settings))
    except Exception as exc:
        return PreflightResult(
            host_uuid,
            cluster_uuid,
            eff.values.driver.value,
            False,
            None,
            None,
            redact(str(exc)),
            now,
        )
    identity = None
    if pins is not None:
        identity = await verify_identity(
            host_uuid, driver, pins, address=eff.address, pinned_by="preflight"
        )
        if identity.verdict == "unreadable":
            # The BMC did not answer the GUID read: a power read would wait as long again.
            await driver.aclose()
            return PreflightResult(
                host_uuid,
                cluster_uuid,
                driver.name,
                False,
                None,
                None,
                redact(identity.reason or ""),
                now,
                identity.verdict,
                identity.guid,
            )
    eng = engine or Engine(
        power_timeout=settings.actuator.power_timeout,
        poll_interval=settings.actuator.poll_interval,
        retries=0,
    )
    r = await eng.run(host_uuid, driver, FenceAction.TEST, secrets_of(settings, eff.values))
    ok, error = r.success, r.error
    if identity is not None and not identity.ok:
        ok, error = False, redact(identity.reason or "")
    return PreflightResult(
        host_uuid,
        cluster_uuid,
        driver.name,
        ok,
        r.power_after,
        r.detail,
        error,
        now,
        identity.verdict if identity else None,
        identity.guid if identity else None,
    )


async def preflight(
    settings: FencerSettings,
    hosts: Iterable[HostRef | tuple[str, str | None]],
    engine: Engine | None = None,
    limit: int = 8,
    pins: PinStore | None = None,
) -> list[PreflightResult]:
    """Read every host's BMC (test action); a result with ok=False means a fence would fail.

    With `pins`, each BMC's system GUID is pinned on first success and compared afterwards."""
    sem = asyncio.Semaphore(limit)

    async def one(h: HostRef | tuple[str, str | None]) -> PreflightResult:
        host_uuid, cluster = (h.host_uuid, h.cluster_uuid) if isinstance(h, HostRef) else h
        async with sem:
            return await check_host(settings, host_uuid, cluster, engine, pins=pins)

    return list(await asyncio.gather(*(one(h) for h in hosts)))
