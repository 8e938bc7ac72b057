"""BMC identity: a host's BMC is known by its system GUID, pinned on the first successful read.

Rule: the actuator powers a host off only through a BMC that reports the GUID pinned for that
host. A BMC that reports another one (an address typo, a swapped board, a DHCP lease handed to
another machine) is not used for fencing until an operator confirms it (`fencer ipmi pin HOST`
or the UI's "confirm BMC identity"), because powering off the wrong machine is the classic
catastrophic fencing mistake. A host with no pin yet is pinned by the pre-flight, or at its
first fence (read the GUID, pin it, go on): the first read is trusted, later ones are compared.
Two first reads are not trusted: a GUID already pinned for another host (an address copied from
another host's settings reaches that host's BMC) is never pinned for this one and never consents
(verdict "elsewhere", the BMC_IDENTITY_CHANGED notice names both hosts); two hosts that first
read one GUID in the same pre-flight are both pinned with it, so neither fences until an
operator confirms one (fencing.preflight: the first to pin only won a race); and the pre-flight
does not pin a BMC whose chassis is not on while CloudStack shows the host Up (fencing.preflight).
A GUID that cannot be read refuses the fence (unknown is never consent); a driver that has no
way to read one (the command template) is reported as unchecked, never as checked.

Pins live in a `PinStore`: `MemoryPinStore` here, the compacted Kafka topic in
`streams.bmc_pins` for the workers, the CLI and the API.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from fencing.drivers.base import DriverError, PowerDriver, read_system_guid
from fencing.engine import Engine
from fencing.events import FenceAction, NoticeKind
from fencing.records import BmcPin, FenceDecision, HostRef, Notice

# The refusal is logged as the actuator's: it is the actuator that refuses to act.
log = logging.getLogger("fencer.actuator")

# elsewhere: the GUID is pinned for another host; unpinned: read, no pin, pinning left to the
# caller (verify_identity(may_pin=False)); refused: the caller would not pin it (fencing.preflight).
Verdict = Literal[
    "pinned", "matches", "changed", "elsewhere", "unpinned", "refused", "unsupported", "unreadable"
]


class PinStoreError(Exception):
    """The pins cannot be read or written (the message names the store)."""


class PinStore(Protocol):
    """Where pins are kept: one per host uuid."""

    def get(self, host_uuid: str) -> BmcPin | None:
        """The host's pin, None if it has none; raises PinStoreError when unreadable."""
        ...

    async def put(self, pin: BmcPin) -> None:
        """Store (replace) the host's pin."""
        ...

    def holders(self, guid: str) -> list[str]:
        """The uuids of the hosts pinned with this GUID, sorted; raises PinStoreError."""
        ...


class MemoryPinStore:
    """Pins in a dict: tests, and a process that has no Kafka."""

    def __init__(self) -> None:
        self.pins: dict[str, BmcPin] = {}

    def get(self, host_uuid: str) -> BmcPin | None:
        return self.pins.get(host_uuid)

    async def put(self, pin: BmcPin) -> None:
        self.pins[pin.host_uuid] = pin

    def holders(self, guid: str) -> list[str]:
        return sorted(h for h, p in self.pins.items() if p.guid == guid)


@dataclass(frozen=True)
class IdentityCheck:
    """What comparing the BMC's GUID with the host's pin found."""

    host_uuid: str
    verdict: Verdict
    guid: str | None = None  # what the BMC reported now
    pinned: str | None = None  # the pin it was compared with (None: newly pinned)
    reason: str | None = None  # why a fence must not go through this BMC
    retryable: bool = False  # unreadable because the BMC did not answer: worth another try

    @property
    def ok(self) -> bool:
        """Whether a power action may go through this BMC."""
        return self.verdict in ("pinned", "matches", "unsupported")


async def verify_identity(
    host_uuid: str,
    driver: PowerDriver,
    pins: PinStore,
    *,
    address: str | None = None,
    pinned_by: str = "first-fence",
    clock: Callable[[], float] = time.time,
    may_pin: bool = True,
) -> IdentityCheck:
    """Read the BMC's GUID and compare it with the host's pin (pinning it if there is none;
    with may_pin=False, verdict "unpinned" and `pin_new` pins it later). A GUID pinned for another
    host is refused ("elsewhere"), whether this host has a pin or not.

    Never raises: an unreadable GUID or pin store is a refusal with its reason."""
    where = address or "its BMC"
    try:
        guid = await read_system_guid(driver)
    except DriverError as exc:
        return IdentityCheck(
            host_uuid,
            "unreadable",
            reason=f"cannot read the system GUID of BMC {where}: {exc}; not fenced "
            "through a BMC whose identity is unknown",
            retryable=exc.retryable,
        )
    if guid is None:
        return IdentityCheck(
            host_uuid,
            "unsupported",
            reason=f"the {driver.name} driver cannot read a system GUID: identity not checked",
        )
    try:
        pin = pins.get(host_uuid)
        others = [h for h in pins.holders(guid) if h != host_uuid]
        if others and not _confirmed(pin, guid):
            if (
                pin is not None
                and pin.guid != guid
                and (pin.seen_guid != guid or pin.seen_address != address)
            ):
                await pins.put(
                    pin.model_copy(
                        update={"seen_guid": guid, "seen_address": address, "seen_at": clock()}
                    )
                )
            return _elsewhere(host_uuid, guid, where, pins.get(others[0]), others[0], pin)
        if pin is None and (stale := _unsigned_other(pins, host_uuid, guid)) is not None:
            return _unsigned_refusal(host_uuid, guid, where, stale)
        if pin is None and not may_pin:
            return IdentityCheck(host_uuid, "unpinned", guid=guid)
        if pin is None:
            await pins.put(
                BmcPin(
                    host_uuid=host_uuid,
                    guid=guid,
                    address=address,
                    driver=driver.name,
                    pinned_at=clock(),
                    pinned_by=pinned_by,
                )
            )
            return IdentityCheck(host_uuid, "pinned", guid=guid)
        if pin.guid == guid:
            if pin.seen_guid is not None or pin.address != address:
                # The BMC is the pinned one again (a corrected address): forget the other.
                await pins.put(
                    pin.model_copy(
                        update={
                            "address": address,
                            "seen_guid": None,
                            "seen_address": None,
                            "seen_at": None,
                        }
                    )
                )
            return IdentityCheck(host_uuid, "matches", guid=guid, pinned=pin.guid)
        if pin.seen_guid != guid or pin.seen_address != address:
            await pins.put(
                pin.model_copy(
                    update={"seen_guid": guid, "seen_address": address, "seen_at": clock()}
                )
            )
    except Exception as exc:  # a pin store that cannot answer is not a yes
        return IdentityCheck(
            host_uuid,
            "unreadable",
            guid=guid,
            reason=f"cannot read or write the BMC pin of host {host_uuid}: "
            f"{type(exc).__name__}: {exc}",
        )
    other_driver = (
        f"; pinned through the {pin.driver} driver, read through {driver.name}"
        if pin.driver != driver.name
        else ""
    )
    return IdentityCheck(
        host_uuid,
        "changed",
        guid=guid,
        pinned=pin.guid,
        reason=(
            f"BMC identity changed: {where} reports system GUID {guid}, but the host's BMC "
            f"was pinned as {pin.guid} (by {pin.pinned_by}{other_driver}); not used for "
            f"fencing until an operator confirms it: fencer ipmi pin {host_uuid}"
        ),
    )


# Pins made without a person: a first fence's or a pre-flight's first read.
AUTOMATIC_PINS = frozenset({"first-fence", "preflight"})


def _confirmed(pin: BmcPin | None, guid: str) -> bool:
    """Whether this host's pin is `guid` as a person confirmed it (`pin_current`): a GUID other
    hosts hold too then consents for this host (boards that all report one GUID); a pin a first
    read made never does."""
    return pin is not None and pin.guid == guid and pin.pinned_by not in AUTOMATIC_PINS


def _unsigned_other(pins: PinStore, host_uuid: str, guid: str) -> BmcPin | None:
    """The unsigned pin record in force for a host with no signed pin (an older fencer's, or
    forged: streams.bmc_pins) when it names another GUID than the BMC reports; else None.
    Only a store that verifies signatures has such records."""
    unsigned = getattr(pins, "unsigned", None)
    stale: BmcPin | None = unsigned(host_uuid) if unsigned is not None else None
    return stale if stale is not None and stale.guid != guid else None


def _unsigned_refusal(host_uuid: str, guid: str, where: str, stale: BmcPin) -> IdentityCheck:
    """A first read that an unsigned record contradicts: not pinned, not consent. Pinned anew
    automatically only when the BMC reports the GUID that record names (the upgrade from
    unsigned pins), so a board changed meanwhile waits for an operator."""
    return IdentityCheck(
        host_uuid,
        "changed",
        guid=guid,
        pinned=stale.guid,
        reason=(
            f"BMC identity changed: {where} reports system GUID {guid}, but the host's last "
            f"pin record names {stale.guid} (by {stale.pinned_by}) and fencer's keys did not "
            "sign it (an older fencer's pin, or a forged one): not pinned automatically, nor "
            f"used for fencing until an operator confirms it: fencer ipmi pin {host_uuid}"
        ),
    )


def _elsewhere(
    host_uuid: str,
    guid: str,
    where: str,
    other_pin: BmcPin | None,
    other: str,
    pin: BmcPin | None,
) -> IdentityCheck:
    """The refusal of a GUID pinned for another host (`other`), naming both hosts."""
    at = f" at {other_pin.address}" if other_pin is not None and other_pin.address else ""
    by = f", pinned by {other_pin.pinned_by}" if other_pin is not None else ""
    own = f"this host's pin is {pin.guid}" if pin is not None else "this host has no pin yet"
    return IdentityCheck(
        host_uuid,
        "elsewhere",
        guid=guid,
        pinned=pin.guid if pin is not None else None,
        reason=(
            f"BMC identity of another host: {where} reports system GUID {guid}, which is "
            f"pinned for another host, {other} (its BMC{at}{by}); {own}. The BMC address of "
            f"host {host_uuid} reaches host {other}'s BMC (an address copied from its "
            f"settings?): not pinned and not used to fence host {host_uuid} until its address "
            f"is corrected and an operator confirms it: fencer ipmi pin {host_uuid}"
        ),
    )


async def pin_new(
    check: IdentityCheck,
    driver: PowerDriver,
    pins: PinStore,
    *,
    address: str | None,
    pinned_by: str,
    clock: Callable[[], float] = time.time,
) -> IdentityCheck:
    """Pin the GUID of an "unpinned" check (verify_identity(may_pin=False)) once the caller
    trusts it; the store is asked again (a pin, or another host's, may have come since)."""
    guid = check.guid or ""
    try:
        pin = pins.get(check.host_uuid)
        others = [h for h in pins.holders(guid) if h != check.host_uuid]
        if others and not _confirmed(pin, guid):
            return _elsewhere(
                check.host_uuid, guid, address or "its BMC", pins.get(others[0]), others[0], pin
            )
        if pin is None and (stale := _unsigned_other(pins, check.host_uuid, guid)) is not None:
            return _unsigned_refusal(check.host_uuid, guid, address or "its BMC", stale)
        if pin is not None:
            if pin.guid == guid:
                return IdentityCheck(check.host_uuid, "matches", guid=guid, pinned=pin.guid)
            return IdentityCheck(
                check.host_uuid,
                "changed",
                guid=guid,
                pinned=pin.guid,
                reason=f"BMC identity changed: {address or 'its BMC'} reports system GUID "
                f"{guid}, but the host's BMC was pinned as {pin.guid} meanwhile (by "
                f"{pin.pinned_by}); fencer ipmi pin {check.host_uuid}",
            )
        await pins.put(
            BmcPin(
                host_uuid=check.host_uuid,
                guid=guid,
                address=address,
                driver=driver.name,
                pinned_at=clock(),
                pinned_by=pinned_by,
            )
        )
    except Exception as exc:  # a pin store that cannot answer is not a yes
        return IdentityCheck(
            check.host_uuid,
            "unreadable",
            guid=guid,
            reason=f"cannot read or write the BMC pin of host {check.host_uuid}: "
            f"{type(exc).__name__}: {exc}",
        )
    return IdentityCheck(check.host_uuid, "pinned", guid=guid)


async def pin_current(
    host_uuid: str,
    driver: PowerDriver,
    pins: PinStore,
    *,
    address: str | None,
    by: str,
    expect: str | None = None,
    clock: Callable[[], float] = time.time,
) -> tuple[BmcPin | None, BmcPin]:
    """An operator's confirmation: pin the GUID the BMC reports now; (old pin, new pin).

    `expect` refuses the pin unless the BMC reports that GUID (the operator read it elsewhere).
    Raises DriverError (the BMC) or ValueError (no GUID, not the expected one, or one pinned
    for another host)."""
    guid = await read_system_guid(driver)
    if guid is None:
        raise ValueError(f"the {driver.name} driver cannot read a system GUID: nothing to pin")
    if expect is not None and expect.strip().lower() != guid:
        raise ValueError(f"the BMC reports system GUID {guid}, not {expect.strip().lower()}")
    others = [h for h in pins.holders(guid) if h != host_uuid]
    if others and expect is None:
        # An operator who names the GUID (--expect, the UI's confirm of the GUID it shows) may
        # pin one another host holds: boards that all report one GUID (unset, or a vendor's
        # placeholder) are fenced again, each host confirmed by a person (_confirmed).
        raise ValueError(
            f"the BMC reports system GUID {guid}, which is pinned for another host, "
            f"{others[0]}: the address of host {host_uuid} reaches that host's BMC; correct it "
            f"(or pin host {others[0]} through its own BMC first); if the boards really report "
            f"one GUID, confirm it by name: --expect {guid}"
        )
    if others:
        log.warning(
            "host %s: BMC GUID %s pinned by %s, though host(s) %s hold it too (confirmed by name)",
            host_uuid,
            guid,
            by,
            ", ".join(others),
        )
    old = pins.get(host_uuid)
    new = BmcPin(
        host_uuid=host_uuid,
        guid=guid,
        address=address,
        driver=driver.name,
        pinned_at=clock(),
        pinned_by=by,
    )
    await pins.put(new)
    return old, new


DAY = 86400.0


def daily_slot(mono: float) -> int:
    """The day slot of a daily notice's id, on this process's monotonic clock `mono`: never the
    wall clock, whose step back would compute again ids the notify table already dropped as
    duplicates (silence until the wall clock caught up). The id also carries the process's tag:
    another process's monotonic clock starts elsewhere, and a restart must not repeat an id."""
    return int(mono // DAY)


def identity_notice(
    check: IdentityCheck, host: HostRef, at: float, *, tag: str, mono: float
) -> Notice:
    """The BMC_IDENTITY_CHANGED notice of a changed GUID (or one pinned for another host, the
    reason naming it); one id per host, GUID, process (`tag`)
    and day of this process's monotonic clock (`daily_slot`), so a pre-flight repeats it daily
    until an operator acts, and a receiver can drop duplicates. `at` (wall) is only shown."""
    return Notice(
        notice_id=f"{host.host_uuid}/bmc-identity/{check.guid}/{tag}/{daily_slot(mono)}",
        kind=NoticeKind.BMC_IDENTITY_CHANGED,
        host=host,
        at=at,
        result="refused",
        reason=check.reason,
    )


async def identity_refusal(
    decision: FenceDecision,
    driver: PowerDriver,
    address: str | None,
    redact: Callable[[str], str],
    *,
    pins: PinStore | None,
    engine: Engine,
    fence_deadline: float,
    clock: Callable[[], float] = time.time,
    announce: Callable[[Notice], Awaitable[None]] | None = None,
    ends: float | None = None,
    tag: str,
) -> str | None:
    """Why this BMC must not be used (its GUID is not the host's pin), or None. `tag` names
    the process in the notice's id (`identity_notice`)."""
    if pins is None or decision.action is FenceAction.NOTHING:
        return None
    host = decision.host
    delay = max(engine.retry_backoff, 0.1)
    if ends is None:
        ends = time.monotonic() + fence_deadline
    attempt = 0
    while True:
        # An unanswered GUID read is retried like an unanswered power command: with
        # backoff until the fence's deadline.
        attempt += 1
        check = await verify_identity(
            host.host_uuid, driver, pins, address=address, pinned_by="first-fence"
        )
        left = ends - time.monotonic()
        if not check.retryable or left <= 0:
            break
        log.warning(
            "host %s: %s attempt %d failed (BMC identity read): %s",
            host.host_uuid,
            decision.action.value,
            attempt,
            redact(check.reason or "no answer"),
        )
        if engine.on_failure is not None:
            engine.on_failure(host.host_uuid, attempt, check.reason or "no answer")
        await asyncio.sleep(min(delay, left))
        delay = min(engine.max_backoff, delay * 2)
    if check.verdict == "pinned":
        log.info("host %s: BMC system GUID %s pinned at first fence", host.host_uuid, check.guid)
    elif check.verdict == "unsupported":
        log.warning("host %s: %s", host.host_uuid, check.reason)
    if check.ok:
        return None
    reason = redact(check.reason or "BMC identity not confirmed")
    if check.retryable:
        reason = (
            f"not done within the fence deadline of "
            f"{fence_deadline:g} s "
            f"({attempt} attempt(s) to read the BMC identity; last error: {reason})"
        )
    log.warning("host %s: decision %s refused: %s", host.host_uuid, decision.decision_id, reason)
    try:
        await driver.aclose()
    except Exception as exc:  # the refusal stands; a failed logout changes nothing
        log.debug("closing the %s driver failed: %s", driver.name, redact(str(exc)))
    if check.verdict in ("changed", "elsewhere") and announce is not None:
        try:
            notice = identity_notice(check, host, clock(), tag=tag, mono=time.monotonic())
            await announce(notice)
        except Exception as exc:  # the outcome still carries the reason to the notifiers
            log.warning("host %s: cannot send the BMC identity notice: %s", host.host_uuid, exc)
    return reason
