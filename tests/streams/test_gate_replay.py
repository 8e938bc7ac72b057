"""The gate's rows remember the fence-proposals position they applied: a record read again after
a restart (at least once) is skipped, a new one (a proposal the core re-sent) is judged."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from pydantic import SecretStr

from fencing.events import FenceAction, WithheldReason
from fencing.records import EvidenceSummary, FenceDecision, FenceProposal, GateSignal, HostRef
from fencing.settings import FencerSettings, PolicySettings, SigningSettings
from fencing.signing import new_key_line
from streams import gating
from streams.runtime import Runtime

NOW = 1_800_000_000.0
SIGNING = SigningSettings(keys=SecretStr(new_key_line("gate-replay-test")))


def runtime(**policy: Any) -> Runtime:
    settings = FencerSettings(
        policy=PolicySettings(**{"startup_quiet": 0, "fence_cap": 3, **policy}), signing=SIGNING
    )
    return Runtime(settings=settings, started_at=NOW - 1000)


def proposal(n: int, at: float) -> FenceProposal:
    """Host n's proposal of its episode 1, stamped `at` (a re-send has the same id)."""
    return FenceProposal(
        decision_id=f"h{n}/1/{int(NOW)}",
        host=HostRef(host_uuid=f"h{n}", cluster_uuid="c1"),
        episode=1,
        action=FenceAction.STOP,
        evidence=EvidenceSummary(suspect_since=at - 300, stale_checks=3),
        proposed_at=at,
    )


def size(hosts: int) -> GateSignal:
    return GateSignal(kind="cluster_size", cluster_uuid="c1", at=NOW, host_count=hosts)


def suspect(n: int, kind: str = "suspect") -> GateSignal:
    return GateSignal(kind=kind, cluster_uuid="c1", at=NOW, host_uuid=f"h{n}")


def test_a_proposal_read_again_is_skipped_and_one_re_sent_is_judged_again() -> None:
    rt, table = runtime(), dict[str, Any]()
    assert gating.apply_gate(table, size(20), rt, now=NOW, position=(0, 0)) is None
    first = gating.apply_gate(table, proposal(1, NOW), rt, now=NOW, position=(0, 1))
    assert isinstance(first, FenceDecision) and first.approved
    assert table["c1"]["position"] == [0, 1]
    rows = {k: dict(v) for k, v in table.items()}
    # Read again after a restart, 400 s later: nothing is judged, no decision re-signed (a fresh
    # signature on an old proposal), no row changed.
    for offset in (0, 1):
        again = proposal(1, NOW) if offset else size(20)
        assert gating.apply_gate(table, again, rt, now=NOW + 400, position=(0, offset)) is None
    assert table == rows
    # The core's re-send is a new record: judged (the same verdict, at the gate's now).
    resent = proposal(1, NOW + 400)
    d = gating.apply_gate(table, resent, rt, now=NOW + 401, position=(0, 2))
    assert isinstance(d, FenceDecision) and d.approved and d.decided_at == NOW + 401
    assert d.decision_id == first.decision_id and d.budget_used == 1
    assert len(table["c1"]["grants"]) == 1 and len(table[gating.GLOBAL_ROW]["grants"]) == 1
    assert table["c1"]["position"] == [0, 2]


def test_signals_read_again_never_set_a_cluster_row_back_in_time() -> None:
    """Without positions an old cluster size and an old suspect would be applied again over
    the present row: the storm guard would count against facts that no longer hold."""
    rt, table = runtime(storm_ratio=0.5), dict[str, Any]()
    history = [size(10), suspect(1), suspect(2), suspect(1, "cleared"), size(4)]
    for offset, sig in enumerate(history):
        gating.apply_gate(table, sig, rt, now=NOW, position=(0, offset))
    present = dict(table["c1"])
    assert present["hosts"] == 4 and present["suspect"] == ["h2"]
    for offset, sig in enumerate(history[:4]):  # a replay that stops short of the end
        assert gating.apply_gate(table, sig, rt, now=NOW + 5, position=(0, offset)) is None
    assert table["c1"] == present


def test_rows_without_a_position_and_other_partitions_are_judged_as_before() -> None:
    rt, table = runtime(), dict[str, Any]()
    assert gating.apply_gate(table, size(20), rt, now=NOW) is None  # no position: none stored
    assert "position" not in table["c1"]
    first = gating.apply_gate(table, proposal(1, NOW), rt, now=NOW, position=(0, 7))
    assert isinstance(first, FenceDecision) and first.approved
    # Another partition's offsets are not comparable: judged (a repeat, nothing consumed).
    other = gating.apply_gate(table, proposal(1, NOW), rt, now=NOW + 1, position=(1, 3))
    assert isinstance(other, FenceDecision) and other.approved and other.budget_used == 1
    # No position given: judged as before.
    same = gating.apply_gate(table, proposal(1, NOW), rt, now=NOW + 2)
    assert isinstance(same, FenceDecision) and same.approved and same.budget_used == 1
    assert len(table["c1"]["grants"]) == 1


@pytest.mark.parametrize("offset", [-600.0, 600.0])
def test_a_proposal_stamped_minutes_off_is_judged_once_and_skipped_when_read_again(
    offset: float, caplog: pytest.LogCaptureFixture
) -> None:
    """The watching worker's clock 10 minutes behind or ahead: judged normally at the gate's
    clock; read again after a restart it is skipped by its position, not by its stamp."""
    rt, table = runtime(), dict[str, Any]()
    gating.apply_gate(table, size(20), rt, now=NOW, position=(0, 0))
    off = proposal(1, NOW + offset)
    with caplog.at_level(logging.INFO, logger="fencer.streams"):
        first = gating.apply_gate(table, off, rt, now=NOW, position=(0, 1))
        assert isinstance(first, FenceDecision) and first.approved and first.decided_at == NOW
        rows = {k: dict(v) for k, v in table.items()}
        assert gating.apply_gate(table, off, rt, now=NOW + 30, position=(0, 1)) is None
    assert table == rows
    judged = [r.getMessage() for r in caplog.records if "judged" in r.getMessage()]
    assert judged == [f"gate: proposal {off.decision_id} at partition 0 offset 1 judged"]


def test_a_temporary_withhold_read_again_waits_for_the_core_to_propose_again() -> None:
    rt, table = runtime(), dict[str, Any]()
    gating.apply_gate(table, suspect(1), rt, now=NOW, position=(0, 0))
    first = gating.apply_gate(table, proposal(1, NOW), rt, now=NOW, position=(0, 1))
    assert (
        isinstance(first, FenceDecision)
        and first.withheld_reason is WithheldReason.CLUSTER_SIZE_UNKNOWN
    )
    gating.apply_gate(table, size(20), rt, now=NOW + 1, position=(0, 2))
    # Read again: skipped, though the reason has passed (the replay must not judge it against
    # the size that arrived after it) ...
    assert gating.apply_gate(table, proposal(1, NOW), rt, now=NOW + 9, position=(0, 1)) is None
    # ... the core's own re-send is judged at the gate's now.
    d = gating.apply_gate(table, proposal(1, NOW + 9), rt, now=NOW + 9, position=(0, 3))
    assert isinstance(d, FenceDecision) and d.approved
