"""The shared evidence rule, on hand-built readings (no I/O)."""

from fencing.events import Evidence
from probes.base import PoolTarget, ProbeTarget, Reading, judge

MP = "/mnt/p1"
HB = "/mnt/p1/KVMHA/hb-10.0.0.11"
DISKS = ("/mnt/p1/a", "/mnt/p1/b")


def target(disks=DISKS, heartbeat=HB, suspect=1000.0) -> ProbeTarget:
    return ProbeTarget(
        "h1", "kvm01", "10.0.0.11", suspect, (PoolTarget("p1", MP, heartbeat, disks),)
    )


def reading(mtimes, beat=None, now=2000.0, mounted=True, complete=True) -> Reading:
    beats = {HB: beat} if beat is not None else {}
    return Reading(now, mtimes, beats, {MP: mounted}, complete)


def test_one_disk_written_after_suspect_time_is_alive():
    v = judge(target(), reading({DISKS[0]: 900, DISKS[1]: 1001, HB: 900}, "900"), 61)
    assert (v.evidence, v.newest_write, v.files_checked, v.files_missing) == (
        Evidence.ALIVE,
        1001,
        3,
        0,
    )


def test_fresh_heartbeat_content_is_alive_even_if_disks_are_old():
    v = judge(target(), reading({DISKS[0]: 900, DISKS[1]: 900, HB: 900}, "1990\n"), 61)
    assert v.evidence is Evidence.ALIVE and v.heartbeat == 1990


def test_old_disks_and_old_heartbeat_are_stale():
    v = judge(target(), reading({DISKS[0]: 900, DISKS[1]: 1000, HB: 900}, "1900"), 61)
    assert v.evidence is Evidence.STALE and v.reason is None


def test_heartbeat_exactly_max_age_old_is_not_fresh():
    v = judge(target(), reading({DISKS[0]: 900, HB: 900}, "1939"), 61)
    assert v.evidence is Evidence.STALE and v.files_missing == 1


def test_unmounted_pool_is_unknown_never_stale():
    v = judge(target(), reading({}, mounted=False), 61)
    assert v.evidence is Evidence.UNKNOWN and v.reason.startswith("storage not mounted")


def test_empty_mount_point_is_unknown():
    v = judge(target(), reading({}), 61)
    assert v.evidence is Evidence.UNKNOWN and "none of the host's 3 files" in v.reason


def test_cut_short_output_is_unknown_unless_it_already_shows_life():
    cut = judge(target(), reading({DISKS[0]: 900}, complete=False), 61)
    assert cut.evidence is Evidence.UNKNOWN
    alive = judge(target(), reading({DISKS[0]: 1500}, complete=False), 61)
    assert alive.evidence is Evidence.ALIVE


def test_garbage_heartbeat_is_ignored_and_no_pools_is_unknown():
    v = judge(target(), reading({DISKS[0]: 900, DISKS[1]: 900, HB: 1999}, "not-a-number"), 61)
    assert v.evidence is Evidence.STALE and v.heartbeat is None
    none = judge(ProbeTarget("h", None, None, 1000.0, ()), reading({}), 61)
    assert none.evidence is Evidence.UNKNOWN and none.reason.startswith("no files")


def test_host_without_vms_is_judged_on_its_heartbeat():
    stale = judge(target(disks=()), reading({HB: 900}, "900"), 61)
    assert stale.evidence is Evidence.STALE
