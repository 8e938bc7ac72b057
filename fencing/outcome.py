"""How the parts of one fence (the BMC result, the storage rung, the CloudStack call) make its
outcome and its notices. Pure: no I/O, no clock (times are given)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fencing.engine import EngineResult
from fencing.events import NoticeKind
from fencing.records import FenceDecision, FenceOutcome, Notice
from fencing.storage_fence import StorageFenceResult, lift_hint

if TYPE_CHECKING:
    from fencing.restart import CloudStackResult


def fence_result(
    decision: FenceDecision,
    bmc_error: str | None,
    result: EngineResult | None,
    storage: StorageFenceResult | None,
    fenced: bool,
    storage_fenced: bool,
    cloud: CloudStackResult | None,
) -> tuple[bool, str | None]:
    """(success, error) of a fence from its parts: a verified blocklist stands in for an
    unverified power-off only where it allows a restart; a failed CloudStack call fails it."""
    action, host = decision.action, decision.host
    error = bmc_error if bmc_error is not None else (result.error if result else None)
    success = bool(result and result.success)
    if storage is not None and not fenced:
        bmc = f"{action.value} not verified ({error or 'no power-off seen'})"
        if storage_fenced:
            success, error = True, f"{bmc}; storage-fenced instead: {storage.text()}"
        else:
            success, error = False, f"{bmc}; {storage.why_no_restart}"
            if storage.entry is not None:
                error = f"{error}; {lift_hint(host.host_uuid, storage.entry)}"
    elif storage is not None:
        error = f"{error}; {storage.text()}" if error else storage.text()
    if cloud is not None and not cloud.success:
        success = False
        error = f"{cloud.call} failed: {cloud.result}" + (
            f"; {storage.text()}" if storage is not None else ""
        )
    return success, error


def storage_notice(
    decision: FenceDecision,
    storage: StorageFenceResult,
    success: bool,
    cloud: CloudStackResult | None,
    at: float,
) -> Notice:
    """The notice that a host was blocklisted (or that the blocklist failed), and how to lift."""
    if cloud is not None:
        done = f"{cloud.call}: {cloud.result}"
    elif storage.allows_restart or not storage.verified:
        done = "VMs not restarted"
    else:
        done = "VMs not restarted: " + storage.why_no_restart
    return Notice(
        notice_id=f"{decision.decision_id}/blocklist",
        kind=NoticeKind.FENCE_SUCCEEDED
        if storage.verified and success
        else NoticeKind.FENCE_FAILED,
        host=decision.host,
        at=at,
        action=decision.action,
        decision_id=decision.decision_id,
        result=done,
        reason=storage.text(),
        evidence=decision.evidence,
        blocklist_entry=storage.entry,
    )


def fence_outcome(
    decision: FenceDecision,
    driver: str,
    started: float,
    finished: float,
    success: bool,
    result: EngineResult | None = None,
    cloud: CloudStackResult | None = None,
    error: str | None = None,
) -> FenceOutcome:
    """The outcome record of a fence."""
    return FenceOutcome(
        decision_id=decision.decision_id,
        host=decision.host,
        episode=decision.episode,
        action=decision.action,
        driver=driver,
        success=success,
        verified=bool(result and result.verified),
        power_before=result.power_before if result else None,
        power_after=result.power_after if result else None,
        started_at=started,
        finished_at=finished,
        attempts=result.attempts if result else 0,
        cloudstack_call=cloud.call if cloud else None,
        cloudstack_job=cloud.job if cloud else None,
        cloudstack_result=cloud.result if cloud else None,
        error=error,
    )
