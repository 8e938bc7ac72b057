"""Pre-flight: read a host's BMC through its effective settings (the test action), change
nothing, and say whether a fence of it could work right now (`fencer ipmi test`, the periodic
pre-flight of the actuate role, the UI's test button). With a pin store it also reads the BMC's
system GUID and pins or compares it (fencing.identity); given the host's CloudStack state, it
does not pin a BMC whose chassis is not on while CloudStack shows the host Up (its agent is
connected, so the host runs: that BMC is another machine's)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

from fencing.drivers import build_driver
from fencing.drivers.base import PowerDriver
from fencing.engine import Engine
from fencing.events import FenceAction
from fencing.identity import IdentityCheck, PinStore, pin_new, verify_identity
from fencing.records import HostRef
from fencing.redaction import Redactor, secrets_of
from fencing.settings import FencerSettings, IpmiSettings

log = logging.getLogger("fencer.actuator")

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
    # elsewhere (pinned for another host), refused (not pinned: off while CloudStack shows the
    # host Up), unsupported or unreadable, and the GUID the BMC reported.
    identity: str | None = None
    guid: str | None = None


async def check_host(
    settings: FencerSettings,
    host_uuid: str,
    cluster_uuid: str | None,
    engine: Engine | None = None,
    driver_factory: DriverFactory = build_driver,
    pins: PinStore | None = None,
    cloud_state: str | None = None,
) -> PreflightResult:
    """Run the test action through the host's effective settings; never changes power.

    With `pins`, first read the BMC's system GUID: compare it with the host's pin (a changed
    GUID, or one pinned for another host, makes the result not ok, with the reason); a host
    with no pin is pinned after the power read, unless `cloud_state` (CloudStack's state of the
    host) is Up and the chassis does not read on."""
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
            host_uuid, driver, pins, address=eff.address, pinned_by="preflight", may_pin=False
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
    if pins is not None and identity is not None and identity.verdict == "unpinned":
        if cloud_state == "Up" and r.power_after != "on":
            # Trusted on first use only when nothing contradicts it: a host whose agent is
            # connected runs, so a BMC whose chassis is off is another machine's.
            where = f"BMC {eff.address or '?'} (system GUID {identity.guid})"
            why = (
                f"{where} not pinned: its chassis reads off while CloudStack shows the host Up "
                "(its agent connected), so this BMC is not the host's; check the host's BMC "
                f"address, then: fencer ipmi pin {host_uuid}"
                if r.power_after == "off"
                else f"{where} not pinned: its chassis power could not be read "
                f"({r.error or 'no answer'}) while CloudStack shows the host Up; pinned once "
                "it reads on"
            )
            identity = IdentityCheck(host_uuid, "refused", guid=identity.guid, reason=why)
        else:
            identity = await pin_new(
                identity, driver, pins, address=eff.address, pinned_by="preflight"
            )
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
    limit: int | None = None,
    pins: PinStore | None = None,
    states: Mapping[str, str] | None = None,
) -> list[PreflightResult]:
    """Read every host's BMC (test action); a result with ok=False means a fence would fail.

    With `pins`, each BMC's system GUID is pinned on first success and compared afterwards;
    `states` (host uuid -> CloudStack's state) keeps a BMC that reads off while its host is Up
    from being pinned (check_host). At most `limit` BMCs are read at once
    (PREFLIGHT_CONCURRENCY by default): the others wait their turn, so a run over thousands
    of hosts spreads over time instead of opening thousands of sessions at once."""
    sem = asyncio.Semaphore(limit or PREFLIGHT_CONCURRENCY)

    async def one(h: HostRef | tuple[str, str | None]) -> PreflightResult:
        host_uuid, cluster = (h.host_uuid, h.cluster_uuid) if isinstance(h, HostRef) else h
        async with sem:
            state = states.get(host_uuid) if states is not None else None
            return await check_host(
                settings, host_uuid, cluster, engine, pins=pins, cloud_state=state
            )

    results = list(await asyncio.gather(*(one(h) for h in hosts)))
    if pins is not None:
        results = await _one_bmc_first_read_twice(settings, results, pins)
    return results


async def _one_bmc_first_read_twice(
    settings: FencerSettings, results: list[PreflightResult], pins: PinStore
) -> list[PreflightResult]:
    """Hosts whose BMC addresses reached one BMC (one GUID) in the same run, none pinned
    before it: the one that pinned first only won a race (the first run of a cloud reads every
    host at once), so nothing tells whose address is the right one. None is trusted: the others
    are pinned with that GUID too (as first reads), so it is held by several hosts and none
    fences through it (fencing.identity) until the wrong address is corrected and an operator
    confirms each host's BMC (`fencer ipmi pin`); every result says so. (A host pinned on an
    earlier run keeps its pin: a host added later with its BMC's address is the newcomer.)"""
    won = {r.guid: r for r in results if r.identity == "pinned" and r.guid}
    losers: dict[str, list[str]] = {}
    for r in results:
        if r.identity != "elsewhere" or r.guid not in won:
            continue
        guid = r.guid
        try:
            first = pins.get(won[guid].host_uuid)
            if pins.get(r.host_uuid) is not None or first is None or first.guid != guid:
                continue
            eff = settings.effective_ipmi(r.host_uuid, r.cluster_uuid)
            await pins.put(
                first.model_copy(
                    update={
                        "host_uuid": r.host_uuid,
                        "address": eff.address,
                        "driver": r.driver,
                        "pinned_at": time.time(),
                        "pinned_by": "preflight",
                    }
                )
            )
        except Exception as exc:  # the loser stays refused; the winner is told below anyway
            log.warning("host %s: cannot pin BMC GUID %s too: %s", r.host_uuid, guid, exc)
        losers.setdefault(guid, []).append(r.host_uuid)
    out = []
    for r in results:
        others = losers.get(r.guid or "") if r.identity == "pinned" else None
        if not others:
            out.append(r)
            continue
        named = ", ".join(others)
        out.append(
            replace(
                r,
                ok=False,
                identity="elsewhere",
                error=(
                    f"BMC identity of another host: the BMC address of host {r.host_uuid} and "
                    f"that of host(s) {named} reach one BMC (system GUID {r.guid}), read in "
                    "the same pre-flight with no pin before it: one address is wrong (copied "
                    "from another host's settings?), and nothing tells which. Neither host is "
                    "fenced through it until the wrong address is corrected and an operator "
                    f"confirms each host's BMC: fencer ipmi pin {r.host_uuid}"
                ),
            )
        )
    return out


# The actuate leader's schedule (streams.app's pre-flight timer, streams.actuating.preflight).
PREFLIGHT_TICK = 5.0  # seconds between the leader's looks at whether a pre-flight is due
NEW_HOSTS_EVERY = 300.0  # seconds between looks for hosts no pre-flight of this process read
RETRY_AFTER = 60.0  # seconds before a run that could not list the hosts is tried again
PREFLIGHT_CONCURRENCY = 16  # BMCs read at once: a cloud has thousands, each a session
PREFLIGHT_RETRY_AFTER = 5.0  # seconds before a BMC that failed is read again, then told

Run = Literal["all", "new"]


class PreflightSchedule:
    """When the actuate leader reads its BMCs, on this process's monotonic clock.

    A full run (every host) at its first tick as leader, so hosts are pinned while they are Up
    rather than at their first fence, then every `interval`. Between full runs, every
    `new_hosts_every` (at most `interval`), a run of only the hosts no run read yet at their
    current BMC address (new in listHosts, or given an address since): pinned within minutes.
    A host whose read failed is read again by the next full run, not at every look (its
    notice is daily anyway). A run that could not list the hosts is due again after
    RETRY_AFTER, not at every tick."""

    def __init__(self, interval: float, new_hosts_every: float = NEW_HOSTS_EVERY) -> None:
        if interval <= 0:
            raise ValueError(f"actuator.preflight_interval must be > 0 here, not {interval!r}")
        self.interval = interval
        self.new_hosts_every = min(interval, new_hosts_every)
        self.tick = min(PREFLIGHT_TICK, interval)  # the timer's interval
        self._last_full: float | None = None
        self._last_any: float | None = None
        self._not_before: float | None = None
        self._read: set[tuple[str, str | None]] = set()

    def due(self, mono: float) -> Run | None:
        """Which run is due now: "all" hosts, the "new" ones, or none."""
        if self._not_before is not None and mono < self._not_before:
            return None
        if self._last_full is None or mono - self._last_full >= self.interval:
            return "all"
        if self._last_any is None or mono - self._last_any >= self.new_hosts_every:
            return "new"
        return None

    def is_new(self, host_uuid: str, address: str | None) -> bool:
        """Whether no run of this schedule read this host at this BMC address."""
        return (host_uuid, address) not in self._read

    def ran(self, run: Run, mono: float, read: Iterable[tuple[str, str | None]]) -> None:
        """Record a run that listed the hosts, and the (host, BMC address) pairs it read."""
        self._read.update(read)
        if run == "all":
            self._last_full = mono
        self._last_any = mono
        self._not_before = None

    def failed(self, mono: float) -> None:
        """A run that could not list the hosts: due again after RETRY_AFTER."""
        self._not_before = mono + min(RETRY_AFTER, self.new_hosts_every)
