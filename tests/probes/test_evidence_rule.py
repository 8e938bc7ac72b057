"""What a probe says about a reading, on hand-built readings (no I/O): whether it is complete
(and if not, why), the files it read and the clock offsets it measured. Probes never judge:
alive, stale and unknown are the core's (tests/fencing/test_decision.py)."""

from __future__ import annotations

import pytest

from fencing.records import HostRef, ProbeRequest
from probes.base import (
    PoolTarget,
    ProbeOutcome,
    ProbeTarget,
    Reading,
    Reason,
    incomplete_reason,
    outcome_of,
    parse_heartbeat,
)

MP = "/mnt/p1"
HB = "/mnt/p1/KVMHA/hb-10.0.0.11"
DISKS = ("/mnt/p1/a", "/mnt/p1/b")
MP2 = "/mnt/p2"
HB2 = "/mnt/p2/KVMHA/hb-10.0.0.11"


def target(
    disks: tuple[str, ...] = DISKS,
    heartbeat: str | None = HB,
    unreadable: int = 0,
    pools: tuple[PoolTarget, ...] | None = None,
) -> ProbeTarget:
    return ProbeTarget(
        "h1",
        "kvm01",
        "10.0.0.11",
        1000.0,
        (PoolTarget("p1", MP, heartbeat, disks),) if pools is None else pools,
        unreadable=unreadable,
    )


def reading(
    mtimes: dict[str, float],
    beats: dict[str, str] | None = None,
    *,
    now: float = 2000.0,
    mounted: dict[str, bool] | None = None,
    complete: bool = True,
    why: str | None = None,
    local_now: float | None = None,
) -> Reading:
    return Reading(
        now,
        mtimes,
        beats or {},
        {MP: True} if mounted is None else mounted,
        complete,
        why,
        local_now,
    )


def test_a_complete_reading_keeps_every_file_of_the_host_and_judges_nothing() -> None:
    r = reading(
        {DISKS[0]: 900.5, DISKS[1]: 1001.0, HB: 1990.0, "/mnt/p1/someone-else": 5.0},
        {HB: "1990\n", "/mnt/p1/KVMHA/hb-other": "7"},
    )
    out = outcome_of(target(), r, "nfs", "n2", 0.25)
    assert out == ProbeOutcome(
        mtimes={DISKS[0]: 900.5, DISKS[1]: 1001.0, HB: 1990.0},
        heartbeats={HB: "1990\n"},
        complete=True,
        reason=None,
        files_wanted=3,
        unreadable=0,
        neighbour="n2",
        duration=0.25,
        probe="nfs",
        neighbour_offset=None,
        filer_offset=0.0,
    )
    assert not hasattr(out, "evidence")


def test_a_missing_disk_leaves_the_reading_complete() -> None:
    """A VM restarted elsewhere, or a disk deleted: the core sees a file fewer, not a change
    (while at least one of the pool's disks is found: with none, see `only-the-heartbeat`)."""
    out = outcome_of(target(), reading({DISKS[0]: 900.0, HB: 900.0}, {HB: "900"}), "nfs", "n2", 0)
    assert out.complete and out.reason is None
    assert out.mtimes == {DISKS[0]: 900.0, HB: 900.0} and out.files_wanted == 3
    # ...and names the requested file it could not read: the core decides what that means
    # (unknown when the file was read before in the episode)
    assert out.missing == (DISKS[1],)


def test_every_requested_file_that_could_not_be_read_is_listed_missing_once() -> None:
    tgt = target(pools=(PoolTarget("p1", MP, HB, (*DISKS, DISKS[0])), PoolTarget("p2", MP2, HB2)))
    r = reading({DISKS[1]: 900.0, HB2: 900.0}, {HB2: "900"}, mounted={MP: True, MP2: True})
    out = outcome_of(tgt, r, "nfs", "n2", 0)
    assert out.complete and out.missing == (DISKS[0], HB)
    request = ProbeRequest(
        host=HostRef(host_uuid="h1"), episode=1, check=2, suspect_since=1000.0, requested_at=1001.0
    )
    assert out.to_result(request, 1002.0).missing == [DISKS[0], HB]
    # everything read: nothing missing
    full = reading({DISKS[0]: 1.0, DISKS[1]: 1.0, HB: 1.0}, {HB: "1"})
    assert outcome_of(target(), full, "nfs", "n2", 0).missing == ()


def test_a_host_without_vms_is_read_by_its_heartbeat_file_alone() -> None:
    out = outcome_of(target(disks=()), reading({HB: 900.0}, {HB: "900"}), "nfs", "n2", 0)
    assert out.complete and out.mtimes == {HB: 900.0} and out.files_wanted == 1


@pytest.mark.parametrize(
    ("tgt", "r", "why"),
    [
        pytest.param(
            target(),
            reading({}, mounted={MP: False}),
            f"{Reason.NOT_MOUNTED}: {MP}",
            id="not-mounted",
        ),
        pytest.param(
            target(),
            reading({}, mounted={}),
            f"{Reason.NOT_MOUNTED}: {MP}",
            id="mount-not-reported",
        ),
        pytest.param(
            target(),
            reading({}),
            f"{Reason.NOT_MOUNTED}: none of the host's 3 files under {MP}",
            id="empty-mount-point",
        ),
        pytest.param(
            target(),
            reading({DISKS[0]: 900.0}, complete=False),
            Reason.PARTIAL,
            id="cut-short",
        ),
        pytest.param(
            target(),
            reading({DISKS[0]: 900.0}, complete=False, why="timeout: 10 s"),
            "timeout: 10 s",
            id="timed-out",
        ),
        pytest.param(
            ProbeTarget("h", None, None, 1000.0, ()),
            reading({}),
            f"{Reason.NO_FILES}: no storage pool known for the host",
            id="no-pools",
        ),
        pytest.param(
            target(disks=(), heartbeat=None),
            reading({}),
            f"{Reason.NO_FILES}: nothing to read",
            id="nothing-to-read",
        ),
        pytest.param(
            target(
                pools=(
                    PoolTarget("p1", MP, HB, DISKS),
                    PoolTarget("p2", MP2, HB2, ("/mnt/p2/c",)),
                )
            ),
            reading({DISKS[0]: 900.0, HB: 900.0}, mounted={MP: True, MP2: False}),
            f"{Reason.NOT_MOUNTED}: {MP2}",
            id="second-pool-not-mounted",
        ),
        pytest.param(
            target(),
            reading({HB: 900.0}, {HB: "900"}),
            f"{Reason.NO_FILES}: none of the host's 2 disks under {MP}, only its heartbeat",
            id="only-the-heartbeat",
        ),
        pytest.param(
            target(
                pools=(
                    PoolTarget("p1", MP, HB, DISKS),
                    PoolTarget("p2", MP2, HB2, ("/mnt/p2/c",)),
                )
            ),
            reading({DISKS[0]: 900.0, HB: 900.0, HB2: 900.0}, mounted={MP: True, MP2: True}),
            f"{Reason.NO_FILES}: none of the host's 1 disks under {MP2}, only its heartbeat",
            id="second-pool-only-the-heartbeat",
        ),
    ],
)
def test_an_incomplete_reading_says_why(tgt: ProbeTarget, r: Reading, why: str) -> None:
    assert incomplete_reason(tgt, r) == why
    out = outcome_of(tgt, r, "nfs", "n2", 1.0)
    assert (out.complete, out.reason) == (False, why)


def test_an_incomplete_reading_still_reports_what_it_read() -> None:
    """What it read is shown; the core never compares an incomplete reading (it is unknown)."""
    out = outcome_of(target(), reading({DISKS[0]: 1500.0}, complete=False), "nfs", "n2", 1.0)
    assert out.mtimes == {DISKS[0]: 1500.0} and not out.complete
    # output cut short cannot tell an unreadable file from one it never reached: none listed
    assert out.missing == ()


def test_unreadable_disks_are_counted_the_core_decides_what_they_mean() -> None:
    r = reading({DISKS[0]: 900.0, HB: 900.0}, {HB: "900"})
    out = outcome_of(target(unreadable=2), r, "nfs", "n2", 0)
    assert out.complete and out.unreadable == 2


def test_two_pools_both_mounted_make_one_complete_reading() -> None:
    tgt = target(pools=(PoolTarget("p1", MP, HB, DISKS), PoolTarget("p2", MP2, HB2, ())))
    r = reading(
        {DISKS[1]: 1.0, HB: 2.0, HB2: 3.0},
        {HB: "1\n", HB2: "2\n"},
        mounted={MP: True, MP2: True},
    )
    out = outcome_of(tgt, r, "nfs", "n2", 0)
    assert out.complete and out.files_wanted == 4
    assert out.heartbeats == {HB: "1\n", HB2: "2\n"}
    # the filer offset comes from the newest heartbeat content: HB2 (2) written at 3.0
    assert out.filer_offset == 1.0


@pytest.mark.parametrize(
    ("now", "local_now", "offset"),
    [(2000.0, 2000.0, 0.0), (2000.0, 2045.26, -45.3), (2000.0, 1000.0, 1000.0), (5.0, None, None)],
)
def test_the_neighbours_clock_offset_is_measured_and_only_shown(
    now: float, local_now: float | None, offset: float | None
) -> None:
    r = reading({HB: 900.0}, {HB: "900"}, now=now, local_now=local_now)
    out = outcome_of(target(disks=()), r, "nfs", "n2", 0)
    assert out.neighbour_offset == offset and out.complete


@pytest.mark.parametrize(
    ("mtime", "content", "offset"),
    [
        (1990.0, "1990\n", 0.0),
        (1990.0, "2470", -480.0),  # the filer's clock 8 minutes behind the host's
        (1_700_086_400.0, "1700000000", 86_400.0),  # a day ahead
        (1990.0, "not-a-number", None),  # unreadable content: no offset
    ],
)
def test_the_filers_clock_offset_is_heartbeat_mtime_minus_content(
    mtime: float, content: str, offset: float | None
) -> None:
    r = reading({DISKS[0]: 900.0, HB: mtime}, {HB: content})
    assert outcome_of(target(), r, "nfs", "n2", 0).filer_offset == offset


def test_no_filer_offset_without_the_heartbeat_files_mtime() -> None:
    r = reading({DISKS[0]: 900.0}, {HB: "1990"})
    out = outcome_of(target(), r, "nfs", "n2", 0)
    assert out.filer_offset is None and out.heartbeats == {HB: "1990"}


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("1990\n", 1990.0),
        ("1700000000 extra words", 1_700_000_000.0),
        ("  12.5 ", 12.5),
        ("", None),
        ("\n", None),
        ("garbage", None),
        ("0", None),
        ("-5", None),
    ],
)
def test_heartbeat_content_is_the_hosts_date_or_nothing(raw: str, value: float | None) -> None:
    assert parse_heartbeat(raw) == value


def test_an_unknown_outcome_and_its_wire_record() -> None:
    out = ProbeOutcome.unknown(f"{Reason.NO_NEIGHBOUR}: none Up", "nfs", files_wanted=3)
    assert (out.complete, out.reason, out.files_wanted, out.mtimes) == (
        False,
        "no neighbour: none Up",
        3,
        {},
    )
    request = ProbeRequest(
        host=HostRef(host_uuid="h1"),
        episode=2,
        check=5,
        suspect_since=1000.0,
        requested_at=1001.0,
        requested_by=None,
    )
    done = outcome_of(target(disks=()), reading({HB: 1990.0}, {HB: "1990"}), "nfs", "n2", 0.5)
    result = done.to_result(request, 1002.0)
    assert (result.episode, result.check, result.finished_at) == (2, 5, 1002.0)
    assert result.mtimes == {HB: 1990.0} and result.heartbeats == {HB: "1990"}
    assert result.complete and result.filer_offset == 0.0 and result.neighbour == "n2"
    assert "evidence" not in result.model_dump()


def test_the_missing_files_reach_the_core_and_an_older_record_without_them_still_loads() -> None:
    from fencing.records import ProbeResult
    from streams.codec import probe_finished

    base = {"host": {"host_uuid": "h1"}, "episode": 1, "check": 2, "suspect_since": 1000.0}
    old = ProbeResult.model_validate({**base, "finished_at": 1001.0, "complete": True})
    assert old.missing == [] and probe_finished(old, 5.0).missing == ()
    new = ProbeResult.model_validate_json(
        ProbeResult.model_validate(
            {**base, "finished_at": 1001.0, "missing": [DISKS[1], HB]}
        ).model_dump_json()
    )
    assert probe_finished(new, 5.0).missing == (DISKS[1], HB)
