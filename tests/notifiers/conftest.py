"""Sample records for the notifier tests; the real receivers come from notifier_peers.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fencing.events import FenceAction, NoticeKind, WithheldReason
from fencing.records import EvidenceSummary, FenceDecision, FenceOutcome, HostRef, Notice

# ---------------------------------------------------------------------------------------------
# records


@pytest.fixture
def host() -> HostRef:
    return HostRef(
        host_uuid="0b5e0b3a-1111-4c1e-9a57-000000000003",
        host_name="kvm03",
        cluster_uuid="c1-uuid",
        cluster_name="c1",
        zone_uuid="z1-uuid",
        zone_name="zone1",
        ip_address="10.0.0.3",
    )


@pytest.fixture
def evidence() -> EvidenceSummary:
    return EvidenceSummary(
        suspect_since=1736935445.0,  # 2025-01-15T10:04:05Z
        stale_checks=3,
        newest_write=1736935000.0,  # 2025-01-15T09:56:40Z
        files_checked=7,
        last_neighbour="kvm02",
    )


@pytest.fixture
def decision(host: HostRef, evidence: EvidenceSummary) -> FenceDecision:
    return FenceDecision(
        decision_id="dec-0001",
        host=host,
        episode=1,
        action=FenceAction.STOP,
        approved=True,
        evidence=evidence,
        decided_at=1736935625.0,
        budget_used=1,
        budget_cap=3,
    )


@pytest.fixture
def withheld(decision: FenceDecision) -> FenceDecision:
    return decision.model_copy(
        update={"approved": False, "withheld_reason": WithheldReason.CAP_REACHED}
    )


@pytest.fixture
def outcome(host: HostRef) -> FenceOutcome:
    return FenceOutcome(
        decision_id="dec-0001",
        host=host,
        episode=1,
        action=FenceAction.STOP,
        driver="ipmi",
        success=True,
        verified=True,
        power_before="on",
        power_after="off",
        started_at=1736935626.0,
        finished_at=1736935631.0,
        cloudstack_call="declareHostAsDegraded",
        cloudstack_result="success",
    )


@pytest.fixture
def notice(host: HostRef, evidence: EvidenceSummary) -> Notice:
    return Notice(
        notice_id="n-0001",
        kind=NoticeKind.CANNOT_VERIFY,
        host=host,
        at=1736935700.0,
        reason="ssh to kvm02 timed out",
        evidence=evidence,
    )


# The suite runs with --import-mode=importlib, which puts no test directory on sys.path; the
# receivers are a plain module so test files can import their helpers, and importing their
# fixtures here registers them.
sys.path.insert(0, str(Path(__file__).parent))
from notifier_peers import ietf_mib_dir, smtp_server, snmptrapd, tls  # noqa: E402, F401
