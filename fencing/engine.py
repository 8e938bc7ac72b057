"""The one fencing engine: every driver's power action goes through `Engine.run`.

Rule: success means the BMC was seen in the requested state, never that a command was sent.
The engine reads power first (already off is fenced: no action for stop), sets power, then
polls until the state shows or `power_timeout` passes (a timeout is a failure), retries with
backoff, and turns every exception into a failed `EngineResult` whose text carries no secret
(one fence at a time per host is the actuator's lock).

Never gives up early: given a `deadline` (the actuator passes `actuator.fence_deadline`, one
overall deadline per fence), a failed attempt is retried with doubling backoff (capped at
`max_backoff`) until the action is verified or the deadline passes, whatever `retries` says;
only a failure that retrying cannot fix (credentials refused) ends it sooner. The deadline is
checked between BMC calls (a call is never cancelled half-way), so the last call may overrun it
by its own timeout. Without a
deadline, `retries` counts the extra attempts (pre-flight and `fencer ipmi test` use 0).
Before every power-down command (off, reset), retries included, the caller's `recheck` (the
actuator's CloudStack check) is asked again: retried for minutes, a fence must not power off a
host that came back meanwhile (`Withdrawn`).

Reboot is off, verified off, on, verified on ("onoff", as fence-agents does by default): it
proves the host really went down. "cycle" sends one reset and verifies the host is on again,
for BMCs that refuse a hard off; it proves less and says so (`verified` stays True only for the
acknowledged reset plus power on).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from fencing.drivers.base import DriverError, PowerDriver, PowerState
from fencing.events import FenceAction
from fencing.redaction import Redactor

log = logging.getLogger("fencer.engine")


@dataclass
class EngineResult:
    """What one action did to one host."""

    action: FenceAction
    driver: str
    success: bool
    verified: bool = False
    power_before: str | None = None
    power_after: str | None = None
    attempts: int = 0
    started_at: float = 0.0
    finished_at: float = 0.0
    detail: str | None = None  # the test action's output, "already off", ...
    error: str | None = None
    steps: list[str] = field(default_factory=list)
    withdrawn: bool = False  # stopped by a failed recheck after a power command (`Engine.run`)

    @property
    def duration(self) -> float:
        """Seconds from start to finish."""
        return self.finished_at - self.started_at


class _VerifyTimeout(Exception):
    """The power state did not show within power_timeout."""


class Withdrawn(Exception):
    """A last-moment check, asked again before a power-down command (`Engine.run`'s `recheck`),
    no longer holds: nothing more goes to the BMC. Raised out of `Engine.run` only while no
    power command was sent in that run (nothing was done); after one, the run fails with it."""


Recheck = Callable[[], Awaitable[None]]  # raises Withdrawn (or a subclass) when it no longer holds


class Engine:
    """Runs actions through drivers; one per process, shared by all hosts."""

    def __init__(
        self,
        power_timeout: float = 60.0,
        poll_interval: float = 1.0,
        retries: int = 2,
        retry_backoff: float = 2.0,
        reboot_method: Literal["onoff", "cycle"] = "onoff",
        clock: Callable[[], float] = time.time,
        max_backoff: float = 30.0,
        on_failure: Callable[[str, int, str], object] | None = None,
    ) -> None:
        self.power_timeout = power_timeout
        self.poll_interval = poll_interval
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.max_backoff = max_backoff
        self.on_failure = on_failure  # (host, attempt, error) after each failed attempt
        self.reboot_method = reboot_method
        self.clock = clock

    async def run(
        self,
        host: str,
        driver: PowerDriver,
        action: FenceAction,
        secrets: Iterable[str | None] = (),
        deadline: float | None = None,
        recheck: Recheck | None = None,
    ) -> EngineResult:
        """Carry out `action` on `host` through `driver`, retrying until `deadline` seconds
        (see the module docstring); never raises but `Withdrawn`.

        `recheck` is awaited before every power-down command (off, reset), the retries' too:
        a fence retried for minutes must not power off a host that came back meanwhile. It
        raises Withdrawn when its check fails: raised on while no power command was sent in
        this run (nothing done: a refusal), else the run fails with its reason, not retried."""
        redact = Redactor(secrets)
        result = EngineResult(action=action, driver=driver.name, success=False)
        result.started_at = self.clock()
        try:
            # The deadline is kept between calls, never by cancelling one: a pyghmi call
            # cancelled mid-login leaves a half-made session that later logins to the same
            # BMC join and hang on. The overrun is at most one BMC call's own timeout.
            await self._with_retries(host, driver, action, result, redact, deadline, recheck)
        except Withdrawn as exc:
            if not any(step.startswith("set ") for step in result.steps):
                log.warning(
                    "host %s: %s withdrawn before any power command: %s",
                    host,
                    action.value,
                    redact(str(exc)),
                )
                raise  # (the driver is closed below)
            result.success, result.withdrawn = False, True
            result.error = redact(
                f"stopped, not retried: {exc} (a power command was sent before: "
                f"{', '.join(result.steps)})"
            )
        except Exception as exc:  # the engine's promise: an outcome, never a traceback
            result.success = False
            result.error = redact(_describe(exc))
        finally:
            try:
                await driver.aclose()
            except Exception as exc:
                log.warning(
                    "host %s: closing the %s driver failed: %s",
                    host,
                    driver.name,
                    redact(_describe(exc)),
                )
            result.finished_at = self.clock()
        level = logging.INFO if result.success else logging.WARNING
        log.log(
            level,
            "host %s: %s via %s %s (verified=%s, power %s -> %s, %d attempt(s), %.2f s)%s",
            host,
            action.value,
            driver.name,
            "succeeded" if result.success else "FAILED",
            result.verified,
            result.power_before,
            result.power_after,
            result.attempts,
            result.duration,
            f": {result.error}" if result.error else "",
        )
        return result

    async def _with_retries(
        self,
        host: str,
        driver: PowerDriver,
        action: FenceAction,
        result: EngineResult,
        redact: Redactor,
        deadline: float | None = None,
        recheck: Recheck | None = None,
    ) -> None:
        if action is FenceAction.NOTHING:
            result.success, result.detail = True, "no BMC action configured"
            return
        ends = None if deadline is None else time.monotonic() + deadline
        delay = self.retry_backoff
        attempt = 0
        while True:
            attempt += 1
            result.attempts = attempt
            try:
                await self._once(driver, action, result, ends, recheck)
                result.success, result.error = True, None
                return
            except (DriverError, _VerifyTimeout) as exc:
                result.error = redact(_describe(exc))
                retryable = getattr(exc, "retryable", True)
                log.warning(
                    "host %s: %s attempt %d failed: %s", host, action.value, attempt, result.error
                )
                if self.on_failure is not None:
                    self.on_failure(host, attempt, result.error)
                if not retryable:
                    return
                if ends is None and attempt > self.retries:
                    return
                if ends is not None and time.monotonic() >= ends:
                    seconds = f"{deadline:.1f}".rstrip("0").rstrip(".")
                    result.error = (
                        f"not done within the fence deadline of {seconds} s "
                        f"({attempt} attempt(s); last error: {result.error})"
                    )
                    return
            if ends is not None:
                # Never sleep past the deadline (the last attempt gets what is left), and never
                # hammer a BMC that refuses at once: at least 0.1 s between attempts.
                delay = min(max(delay, 0.1), max(0.0, ends - time.monotonic()))
            await asyncio.sleep(delay)
            delay = min(self.max_backoff, max(delay, self.retry_backoff) * 2)

    async def _once(
        self,
        driver: PowerDriver,
        action: FenceAction,
        r: EngineResult,
        ends: float | None = None,
        recheck: Recheck | None = None,
    ) -> None:
        if action is FenceAction.TEST:
            r.detail = await driver.test()
            r.power_before = r.power_after = await _try_power(driver)
            return
        power = await driver.get_power()
        if r.power_before is None:
            r.power_before = power  # the first attempt's reading: a retry must not overwrite it
        r.steps.append(f"power {power}")
        if action is FenceAction.STOP:
            if power == "off":
                r.detail, r.verified, r.power_after = "already off", True, "off"
                return
            if recheck is not None:
                await recheck()
            await driver.set_power("off")
            r.steps.append("set off")
            r.power_after = await self._wait_for(driver, "off", r, ends)
            r.verified = True
        elif action is FenceAction.START:
            if power != "on":
                await driver.set_power("on")
                r.steps.append("set on")
            r.power_after = await self._wait_for(driver, "on", r, ends)
            r.verified = True
        elif action is FenceAction.REBOOT:
            if power == "off":
                r.detail = "was off: powered on"
            elif self.reboot_method == "cycle":
                if recheck is not None:
                    await recheck()
                await driver.set_power("reset")
                r.steps.append("set reset")
                r.detail = "reset acknowledged"
            else:
                if recheck is not None:
                    await recheck()
                await driver.set_power("off")
                r.steps.append("set off")
                await self._wait_for(driver, "off", r, ends)
                r.detail = "seen off, then on"
            if power == "off" or self.reboot_method != "cycle":
                await driver.set_power("on")
                r.steps.append("set on")
            r.power_after = await self._wait_for(driver, "on", r, ends)
            r.verified = True
        elif action is FenceAction.BLINK:
            await driver.identify(True)
            r.steps.append("identify on")
            r.power_after = power
            r.detail = "identify LED on"
        else:
            raise DriverError(f"unknown action {action!r}")

    async def _wait_for(
        self, driver: PowerDriver, want: PowerState, r: EngineResult, ends: float | None = None
    ) -> str:
        """Poll until the BMC reports `want` (within power_timeout, and the fence's deadline
        `ends` if any); a deadline is a failure, never a success."""
        started = time.monotonic()
        deadline = started + self.power_timeout
        if ends is not None:
            deadline = min(deadline, ends)
        last: str | None = None
        last_error: str | None = None
        while True:
            try:
                last = await driver.get_power()
                if last == want:
                    r.steps.append(f"seen {want}")
                    return last
            except DriverError as exc:
                # BMCs often drop a session while the host changes power; keep polling.
                last_error = _describe(exc)
            if time.monotonic() >= deadline:
                r.power_after = last
                raise _VerifyTimeout(
                    f"power did not read {want} within {deadline - started:.3g} s "
                    f"(last read: {last or 'none'}{'; ' + last_error if last_error else ''})"
                )
            await asyncio.sleep(min(self.poll_interval, max(0.0, deadline - time.monotonic())))


async def _try_power(driver: PowerDriver) -> str | None:
    try:
        return await driver.get_power()
    except DriverError:
        return None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, (DriverError, _VerifyTimeout)) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
