"""The actuator: turns an approved fence decision into a verified power action, then (and only
then) tells CloudStack to restart the host's VMs elsewhere.

Rule: CloudStack hears "restart the VMs" only after the engine has *seen* the host off (stop) or
seen it go down and come back (reboot). After nothing or blink it is not told, unless the
cluster sets `restart_without_fence` (VMs would run twice if the host is alive: CloudStack
issue #2890). One lock per host keeps two decisions for one host from acting at once (hosts
never wait for each other: the shell runs decisions concurrently). That a decision acts at most
once is the shell's: its outcome is kept in the `actuated` table and the fence-claims log
(streams.actuating, streams.claims), which answer a redelivered decision without the BMC.

Never gives up silently: the BMC action is retried until `actuator.fence_deadline` (the engine's
one overall deadline; the shell cuts the whole fence, hung calls included, at fence_deadline +
cloudstack.job_timeout: streams.actuating.bounded), a failed or unfinished
`declareHostAsDegraded` is retried with backoff until the same deadline, and the VMs the host
ran are followed afterwards (in the background): those still not Running at
cloudstack.job_timeout are reported in a `vms_not_restarted` notice, repeated at growing
intervals until they run (logged) or until `actuator.vms_follow_for`, when a last notice says
fencer stops following them. The VMs followed are in the success outcome (`vms`, kept in the
shell's `actuated` table): after an actuator restart the shell follows them again (`follow`,
streams.actuating.resume_follows) while fencer's host record still shows the host fenced by that
decision; the time followed and the notices sent before the restart do not survive (the resumed
following counts vms_follow_for afresh, on this process's clock). What still fails is a failed
outcome (a `fence_failed` notification, repeated by the shell until an operator retries or marks
it handled: `retry` runs the same decision again).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fencing.cloudstack import CloudStack
from fencing.drivers import build_driver
from fencing.engine import Engine, EngineResult, Recheck, Withdrawn
from fencing.events import FenceAction, NoticeKind
from fencing.identity import PinStore, identity_refusal
from fencing.outcome import fence_outcome, fence_result, storage_notice
from fencing.preflight import DriverFactory, PreflightResult, call_timeout, check_host, preflight
from fencing.records import FenceDecision, FenceOutcome, HostRef, Notice
from fencing.redaction import Redactor, secrets_of
from fencing.restart import CloudStackResult, restart_vms, vms_on
from fencing.settings import FencerSettings, RestartVia, StorageFence
from fencing.storage_fence import StorageFencer, StorageFenceResult

log = logging.getLogger("fencer.actuator")

# The pre-flight moved to fencing.preflight and the redactor to fencing.redaction; these names
# stay importable from here.
__all__ = [
    "Actuator",
    "CloudStackResult",
    "PreflightResult",
    "call_timeout",
    "check_host",
    "cloudstack_client",
    "engine_for",
    "preflight",
    "secrets_of",
]

CloudStackFactory = Callable[[FencerSettings], CloudStack]
NoticeSink = Callable[[Notice], Awaitable[None]]
NoticeSender = Callable[[Notice], Awaitable[None]]

FOLLOW_POLL_MAX = 60.0  # seconds between reads of the VMs' states once they were reported


def engine_for(settings: FencerSettings) -> Engine:
    """An engine configured from `actuator` settings."""
    a = settings.actuator
    return Engine(
        power_timeout=a.power_timeout,
        poll_interval=a.poll_interval,
        retries=a.retries,
        retry_backoff=a.retry_backoff,
    )


def cloudstack_client(settings: FencerSettings) -> CloudStack:
    """fencer's CloudStack client (fencing.cloudstack) for the configured management server."""
    return CloudStack(settings)


class Actuator:
    """Carries out fence decisions; one per worker."""

    def __init__(
        self,
        settings: FencerSettings,
        engine: Engine | None = None,
        driver_factory: DriverFactory = build_driver,
        cloudstack_factory: CloudStackFactory = cloudstack_client,
        job_poll_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
        notify: NoticeSink | None = None,
        pins: PinStore | None = None,
        announce: NoticeSender | None = None,
        storage_fencer: StorageFencer | None = None,
        tag: str | None = None,
    ) -> None:
        self.settings = settings
        # In every repeated notice's id: unique to this process, so a restart never reuses one.
        self.tag = tag or secrets.token_hex(4)
        # The Ceph blocklist rung (fencing.storage_fence), built on first use.
        self.storage_fencer = storage_fencer
        self.notify = notify
        # BMC identity (fencing.identity): with a pin store, no power action goes through a BMC
        # whose GUID differs from the host's pin; `announce` sends the notice of a mismatch.
        self.pins = pins
        self.announce = announce
        self.engine = engine or engine_for(settings)
        self.driver_factory = driver_factory
        self.cloudstack_factory = cloudstack_factory
        self.job_poll_interval = job_poll_interval
        self.clock = clock
        self._locks: dict[str, asyncio.Lock] = {}
        self._following: set[asyncio.Task[list[str]]] = set()
        self._followed: set[str] = set()  # decisions whose VMs this process followed
        self._follows = 0  # followings started by this process (in the notices' ids)

    async def settle(self) -> None:
        """Wait until every fenced host's VMs have been followed (tests, shutdown)."""
        while self._following:
            await asyncio.wait(set(self._following))

    def _lock(self, host: str) -> asyncio.Lock:
        lock = self._locks.get(host)
        if lock is None:
            lock = self._locks[host] = asyncio.Lock()
        return lock

    async def handle(
        self, decision: FenceDecision, recheck: Recheck | None = None
    ) -> FenceOutcome | None:
        """Act on an approved decision (one at a time per host); None for a withheld one.

        `recheck` (the shell's last-moment CloudStack check) is asked again before every
        power-down command, retries included (`Engine.run`): Withdrawn is raised when it
        fails before anything was done (no power command, no blocklist)."""
        if not decision.approved:
            return None
        async with self._lock(decision.host.host_uuid):
            return await self._act(decision, recheck)

    async def _act(self, decision: FenceDecision, recheck: Recheck | None = None) -> FenceOutcome:
        host = decision.host
        started = self.clock()
        eff = self.settings.effective_ipmi(host.host_uuid, host.cluster_uuid)
        ipmi = eff.values
        redact = Redactor(secrets_of(self.settings, ipmi))
        if decision.action.powers_down and not ipmi.action.powers_down:
            # The host's action was lowered after the gate signed the decision (stop -> nothing
            # or blink): the operator's latest choice wins when it is the gentler one; never the
            # other way round (review4: the host was powered off anyway, though every other
            # setting is read live here). The outcome names the action run.
            log.warning(
                "host %s: decision %s says %s, the host's action is now %s: running %s",
                host.host_name or host.host_uuid,
                decision.decision_id,
                decision.action.value,
                ipmi.action.value,
                ipmi.action.value,
            )
            decision = decision.model_copy(update={"action": ipmi.action})
        action = decision.action
        # The storage rung (fencing.storage_fence): a Ceph blocklist before the BMC action, or
        # as its fallback; only for actions that take the host down.
        ladder = StorageFence(ipmi.storage_fence) if action.powers_down else StorageFence.NONE
        storage: StorageFenceResult | None = None
        if ladder is StorageFence.BEFORE:
            storage = await self._storage_fence(decision)
        # One overall deadline per fence: the identity read and the power action share it.
        deadline = self.settings.actuator.fence_deadline
        ends = time.monotonic() + deadline
        driver_name = ipmi.driver.value
        bmc_error: str | None = None
        withdrawn = False
        result: EngineResult | None = None
        try:
            driver = self.driver_factory(ipmi, eff.address, call_timeout(self.settings))
        except Exception as exc:
            bmc_error = redact(str(exc))
        else:
            driver_name = driver.name
            bmc_error = await identity_refusal(
                decision,
                driver,
                eff.address,
                redact,
                pins=self.pins,
                engine=self.engine,
                fence_deadline=deadline,
                clock=self.clock,
                announce=self.announce,
                ends=ends,
                tag=self.tag,
            )
            if bmc_error is None:
                try:
                    result = await self.engine.run(
                        host.host_uuid,
                        driver,
                        action,
                        secrets=secrets_of(self.settings, ipmi),
                        deadline=max(0.0, ends - time.monotonic()),
                        recheck=recheck,
                    )
                except Withdrawn as exc:
                    if storage is None:
                        raise  # nothing was done: the shell refuses
                    bmc_error, withdrawn = redact(f"stopped before the power command: {exc}"), True
        fenced = result is not None and result.success and result.verified and action.powers_down
        # A host the recheck found back (or CloudStack unanswering) gets no blocklist and no
        # VM restart, whatever a rung before did.
        withdrawn = withdrawn or (result is not None and result.withdrawn)
        if ladder is StorageFence.FALLBACK and not fenced and not withdrawn:
            storage = await self._storage_fence(decision)
        if bmc_error is not None and storage is None:
            return fence_outcome(
                decision, driver_name, started, self.clock(), False, error=bmc_error
            )
        cloud: CloudStackResult | None = None
        restart_via = RestartVia(ipmi.restart_via)
        unfenced_ok = (
            result is not None
            and result.success
            and action in (FenceAction.NOTHING, FenceAction.BLINK)
        ) and ipmi.restart_without_fence
        # Without a verified power-off, a verified blocklist restarts the VMs of an RBD-only
        # host (never one with an NFS disk: a Ceph blocklist does not stop NFS writes).
        storage_fenced = (
            not fenced and not withdrawn and storage is not None and storage.allows_restart
        )
        if restart_via is not RestartVia.NONE and (fenced or unfenced_ok or storage_fenced):
            vms = await self._vms_on(host, redact)
            cloud = await self._restart_until(host, restart_via, redact, ends)
            if cloud.success and vms:
                # Followed in the background: the outcome (fence succeeded) is not held back
                # while CloudStack's HA restarts the VMs, nor the host's lock.
                self._followed.discard(decision.decision_id)  # an operator's retry: again
                self.follow(decision, vms, redact)
        success, error = fence_result(
            decision, bmc_error, result, storage, fenced, storage_fenced, cloud
        )
        if storage is not None:
            await self._emit(storage_notice(decision, storage, success, cloud, self.clock()))
        outcome = fence_outcome(
            decision, driver_name, started, self.clock(), success, result, cloud, error
        )
        if success and cloud is not None and cloud.success and vms:
            # Kept with the outcome: a restarted actuator follows them again (module rule).
            outcome = outcome.model_copy(update={"vms": vms})
        return outcome

    def follow(
        self,
        decision: FenceDecision,
        vms: dict[str, str],
        redact: Redactor | None = None,
        resumed: bool = False,
    ) -> bool:
        """Follow the VMs of a fenced host in the background (`_follow_vms`), once per
        decision in this process; `resumed`: the following of another process (before a
        restart) taken up again. Whether it started."""
        if decision.decision_id in self._followed:
            return False
        self._followed.add(decision.decision_id)
        if redact is None:
            host = decision.host
            eff = self.settings.effective_ipmi(host.host_uuid, host.cluster_uuid)
            redact = Redactor(secrets_of(self.settings, eff.values))
        task = asyncio.get_running_loop().create_task(
            self._follow_vms(decision, vms, redact, resumed)
        )
        self._following.add(task)
        task.add_done_callback(self._following.discard)
        return True

    async def _storage_fence(self, decision: FenceDecision) -> StorageFenceResult:
        """Blocklist the host's storage address and verify it (never raises)."""
        if self.storage_fencer is None:
            self.storage_fencer = StorageFencer(self.settings)
        host = decision.host
        log.warning(
            "host %s: blocklisting its storage address (storage_fence)",
            host.host_name or host.host_uuid,
        )
        try:
            r = await self.storage_fencer.fence(host.host_uuid)
        except Exception as exc:  # a fence rung that breaks is a failed rung, not a crash
            log.exception("host %s: storage fence failed", host.host_uuid)
            return StorageFenceResult(
                host.host_uuid, None, None, False, False, f"blocklist not done: {exc}"
            )
        (log.warning if r.verified else log.error)("host %s: %s", host.host_uuid, r.text())
        return r

    async def _restart_until(
        self, host: HostRef, via: RestartVia, redact: Redactor, ends: float
    ) -> CloudStackResult:
        """`_restart_vms`, retried with backoff while the fence deadline lasts (3 tries at least):
        the host is off, its VMs are down until CloudStack restarts them."""
        delay = max(self.settings.actuator.retry_backoff, 0.1)
        tries = 0
        while True:
            tries += 1
            cloud = await self._restart_vms(host, via, redact)
            if cloud.success:
                return cloud
            left = ends - time.monotonic()
            if left <= 0 and tries >= 3:
                cloud.result = f"{cloud.result} (gave up after {tries} attempts)"
                return cloud
            wait = delay if left <= 0 else min(delay, left)
            log.warning(
                "host %s: %s attempt %d failed, retrying in %.1f s: %s",
                host.host_name or host.host_uuid,
                cloud.call,
                tries,
                wait,
                cloud.result,
            )
            await asyncio.sleep(wait)
            delay = min(30.0, delay * 2)

    async def _vms_on(self, host: HostRef, redact: Redactor) -> dict[str, str]:
        return await vms_on(self.cloudstack_factory(self.settings), host, redact)

    async def _follow_vms(
        self, decision: FenceDecision, vms: dict[str, str], redact: Redactor, resumed: bool = False
    ) -> list[str]:
        """Follow the fenced host's VMs until they run again (or are gone): those still down at
        cloudstack.job_timeout are reported in a `vms_not_restarted` notice, repeated at growing
        intervals (job_timeout, doubled each time, at most actuator.renotify_interval) until
        they run, and once more, saying so, when fencer stops following them after
        actuator.vms_follow_for. When they run after a notice, that is logged. Polls at
        job_poll_interval until the first notice, then at a doubling interval (at most a
        minute). The names of those still down when it stopped."""
        started = time.monotonic()
        job_timeout = self.settings.cloudstack.job_timeout
        renotify = self.settings.actuator.renotify_interval
        follow_for = max(self.settings.actuator.vms_follow_for, job_timeout)
        due = started + job_timeout  # the next notice, on this process's monotonic clock
        gap = job_timeout  # the gap to the notice after it
        poll = self.job_poll_interval
        sent = 0
        label = decision.host.host_name or decision.host.host_uuid
        # Unique to this following: an operator's retry of the decision follows again, and
        # ids already sent would be dropped by the notify table as duplicates.
        self._follows += 1
        series = f"{decision.decision_id}/vms_not_restarted/{self.tag}/{self._follows}"
        if resumed:
            log.warning(
                "host %s: following %d VM(s) of fence %s again after an actuator restart",
                label,
                len(vms),
                decision.decision_id,
            )
        down: dict[str, str] = dict(vms)
        states: dict[str, str] = {}
        while down:
            try:
                async with self.cloudstack_factory(self.settings) as cs:
                    for vm_id in list(down):
                        found = await cs.list("listVirtualMachines", id=vm_id, listall=True)
                        states[vm_id] = _restart_state(found, decision.host.host_uuid)
                        if states[vm_id] in ("Running", "gone"):
                            del down[vm_id]
            except Exception as exc:  # CloudStack down for a while must not end the following
                log.warning(
                    "cannot follow the VMs of a fenced host (%s): %s",
                    type(exc).__name__,
                    redact(str(exc)),
                )
            if not down:
                break
            now = time.monotonic()
            last = now - started >= follow_for
            if now >= due or last:
                sent += 1
                names = ", ".join(f"{name} ({states.get(i, '?')})" for i, name in down.items())
                text = f"{len(down)} of {len(vms)} VM(s) not running after the fence: {names}"
                if last:
                    text += (
                        f"; fencer stops following them now ({now - started:.0f} s after the "
                        "restart call, actuator.vms_follow_for): no further reminder"
                    )
                elif sent > 1:
                    text += f" (reminder {sent - 1}, {now - started:.0f} s after the restart call)"
                if resumed:
                    text += "; followed again after an actuator restart (times counted from then)"
                log.error("host %s: %s", label, text)
                number = "last" if last else str(sent)
                await self._emit(
                    Notice(
                        notice_id=f"{series}/{number}",
                        kind=NoticeKind.VMS_NOT_RESTARTED,
                        host=decision.host,
                        at=self.clock(),
                        action=decision.action,
                        decision_id=decision.decision_id,
                        reason=text,
                        evidence=decision.evidence,
                    )
                )
                if last:
                    return list(down.values())
                due = now + gap
                gap = min(gap * 2, max(renotify, job_timeout))
            if sent:
                poll = min(poll * 2, max(self.job_poll_interval, min(FOLLOW_POLL_MAX, gap)))
            wait = min(poll, max(0.0, due - time.monotonic()), follow_for - (now - started))
            await asyncio.sleep(max(wait, self.job_poll_interval))
        if sent:
            log.warning(
                "host %s: all %d VM(s) of the fenced host run again (or are gone) after %d "
                "vms_not_restarted notice(s)",
                label,
                len(vms),
                sent,
            )
        return list(down.values())

    async def _emit(self, notice: Notice) -> None:
        if self.notify is None:
            log.warning("no notice sink: %s %s not sent", notice.kind.value, notice.notice_id)
            return
        try:
            await self.notify(notice)
        except Exception:
            log.exception("cannot send notice %s", notice.notice_id)

    async def _restart_vms(
        self, host: HostRef, via: RestartVia, redact: Redactor
    ) -> CloudStackResult:
        return await restart_vms(
            self.cloudstack_factory(self.settings),
            host,
            via,
            redact,
            self.settings.cloudstack.job_timeout,
            self.job_poll_interval,
        )


def _restart_state(found: list[dict[str, Any]], fenced_host: str) -> str:
    """A fenced host's VM as `_follow_vms` counts it: "gone", its state, or "Running on the
    fenced host" while CloudStack still shows it there (declareHostAsDegraded's job only
    schedules the HA restarts; until its HA workers stop and restart the VM it shows Running on
    the powered-off host): not restarted."""
    if not found:
        return "gone"
    state = str(found[0].get("state", "?"))
    if state == "Running" and found[0].get("hostid") == fenced_host:
        return "Running on the fenced host"
    return state
