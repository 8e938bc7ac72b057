"""The hosts table's compact rows (streams.codec.pack_row): every record and host round-trip
exactly, rows of version 1 still load and step on, and the serializer Faust uses for the table
reads back what it wrote."""

from __future__ import annotations

import asyncio
import base64
import json
import math
from dataclasses import replace
from typing import Any

import faust
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fencing.decision import (
    Evidence,
    HostRecord,
    HostState,
    as_reference,
    fingerprint,
    judge,
)
from fencing.events import (
    HostCameBack,
    HostDisconnected,
    HostStatus,
    MaintenanceStarted,
    ProbeFinished,
    Tick,
)
from fencing.records import HostRef
from fencing.settings import FencerSettings, PolicySettings
from streams.codec import (
    ROW_RECORD_FIELDS,
    ROW_VERSION,
    HostInput,
    intern_row,
    pack_reference,
    pack_row,
    pack_row_v2,
    row_position,
    unpack_reference,
    unpack_row,
)
from streams.tables import RowCache, host_row_serializer
from streams.watch import apply, judged_check, tick, wants_tick

HOST = "7650a66e-54c1-4a0e-9b7d-7865250dc275"
REF = HostRef(
    host_uuid=HOST,
    host_name="kvm01",
    cluster_uuid="c1c1c1c1-0000-4000-8000-000000000001",
    zone_uuid="z1z1z1z1-0000-4000-8000-000000000001",
    ip_address="10.0.0.1",
)

_f = st.floats(min_value=0, max_value=2e9, allow_nan=False) | st.none()
_path = st.text(alphabet="abc/-_.0", min_size=1, max_size=20)
_mtime = st.integers(0, 2**32 - 1).map(float) | st.floats(-1e10, 2e10, allow_nan=False)


@st.composite
def records(draw: Any) -> HostRecord:
    return HostRecord(
        host=draw(st.sampled_from([HOST, "another-host"])),
        state=draw(st.sampled_from(list(HostState))),
        since=draw(_f),
        episode=draw(st.integers(0, 10**6)),
        suspect_since=draw(_f),
        checks_requested=draw(st.integers(0, 50)),
        probe_outstanding=draw(st.booleans()),
        last_result_at=draw(_f),
        stale_count=draw(st.integers(0, 5)),
        last_evidence=draw(st.sampled_from([None, *Evidence])),
        # whole seconds (as `stat %Y`), any float, short and long heartbeats (a digest)
        **dict(
            zip(
                ("ref_mtimes", "ref_heartbeats"),
                as_reference(
                    draw(st.dictionaries(_path, _mtime)).items(),
                    draw(st.dictionaries(_path, st.text(max_size=60))).items(),
                ),
                strict=True,
            )
        ),
        reason=draw(st.text(max_size=40) | st.none()),
        skew_notified=draw(st.booleans()),
        decision_id=draw(st.text(max_size=60) | st.none()),
        error=draw(st.text(max_size=20) | st.none()),
    )


@settings(max_examples=300, deadline=None)
@given(records(), st.sampled_from([REF, HostRef(host_uuid=HOST)]))
def test_every_record_and_host_round_trip_through_a_packed_row(r: HostRecord, ref: HostRef):
    record, host = r.to_dict(), ref.model_dump()
    row = pack_row(record, host)
    assert row[0] == ROW_VERSION
    assert unpack_row(row) == (record, host)
    through_json = json.loads(json.dumps(row))
    assert unpack_row(intern_row(through_json)) == (record, host)
    assert HostRecord.from_dict(unpack_row(through_json)[0]) == r


def test_a_packed_row_has_no_key_strings_and_no_trailing_defaults():
    record = HostRecord(host=HOST, state=HostState.SUSPECT, episode=1, since=5.0).to_dict()
    row = pack_row(record, REF.model_dump())
    assert row == [ROW_VERSION, ["suspect", 1, 5.0], [HOST, "kvm01", REF.cluster_uuid, "10.0.0.1",
                                                       REF.zone_uuid]]  # fmt: skip
    assert len(json.dumps(row)) < len(json.dumps({"record": record, "host": REF.model_dump()})) / 4


def test_a_field_the_core_adds_later_is_kept_in_the_extras():
    record = HostRecord(host=HOST).to_dict() | {"new_field": 3}
    row = pack_row(record, REF.model_dump())
    assert row[3] == {"new_field": 3}
    assert unpack_row(row)[0]["new_field"] == 3


def test_a_version_1_row_loads_and_steps_on_to_a_packed_row():
    settings = FencerSettings(policy=PolicySettings(startup_quiet=0))
    policy = settings.policy.to_policy()
    topics = settings.kafka.topics
    old = HostRecord(
        host=HOST, state=HostState.SUSPECT, episode=2, since=100.0, suspect_since=99.0
    ).to_dict()
    v1 = {"record": old, "host": REF.model_dump()}
    assert unpack_row(v1) == (old, REF.model_dump())
    assert wants_tick(v1) and tick(v1, 200.0).host == REF
    row, out = apply(v1, HostInput(Tick(200.0)), HOST, policy, settings, topics)
    assert row is not None and row[0] == ROW_VERSION
    record, host = unpack_row(row)
    assert (record["episode"], record["checks_requested"], host) == (2, 1, REF.model_dump())
    assert [t for t, _, _ in out] == [topics.probe_requests]
    result = ProbeFinished(
        at=201.0, episode=2, check=1, mtimes=(("/d1", 5.0),), complete=True, files_wanted=1
    )
    row2, _ = apply(row, HostInput(result), HOST, policy, settings, topics)
    assert judged_check(row, row2) == "baseline" and judged_check(v1, row) is None
    assert unpack_row(row2)[0]["ref_mtimes"] == [[fingerprint("/d1"), 5.0]]


def test_a_new_host_gets_a_packed_row():
    settings = FencerSettings(policy=PolicySettings(startup_quiet=0))
    event = HostInput(HostDisconnected(1.0, HostStatus.DISCONNECTED), REF)
    row, _ = apply(None, event, HOST, settings.policy.to_policy(), settings, settings.kafka.topics)
    assert row is not None and unpack_row(row)[0]["state"] == "suspect"


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"record": None}, "version 1 without a record"),
        ([9, [], []], "unknown version 9"),
        ([], "unknown version None"),
        ("text", "unknown version None"),
    ],
)
def test_a_row_of_no_known_version_is_a_clear_error(row: Any, problem: str):
    with pytest.raises(ValueError, match=problem):
        unpack_row(row)


def test_the_table_serializer_reads_back_what_it_wrote_and_interns_shared_strings():
    from faust.serializers import codecs

    codec = codecs.get_codec(host_row_serializer())
    record = HostRecord(host=HOST, state=HostState.SUSPECT, episode=1).to_dict()
    row = pack_row(record, REF.model_dump())
    a, b = codec.loads(codec.dumps(row)), codec.loads(codec.dumps(row))
    assert a == row
    assert a[2][2] is b[2][2]  # the cluster uuid: one string for every row of the cluster
    assert a[1][0] is b[1][0]  # "suspect"
    # and what Faust's own json codec wrote before (version 1 rows) still loads
    v1 = {"record": record, "host": REF.model_dump()}
    assert unpack_row(codec.loads(codecs.get_codec("json").dumps(v1))) == (record, REF.model_dump())


def test_a_host_signal_read_again_after_a_restart_changes_nothing():
    """A worker killed before its consumer committed leaves a suffix of host-signals to be read
    again by the next owner, after the row already applied it: the "up" of the first poll read
    again must not end the episode a later disconnection opened (a second episode followed), nor
    an old "maintenance started" stop the watch. The partition's order decides, no clock."""
    settings = FencerSettings(policy=PolicySettings(startup_quiet=0))
    policy, topics = settings.policy.to_policy(), settings.kafka.topics

    def step(row: Any, event: Any, offset: int, partition: int = 2) -> tuple[Any, list[Any]]:
        position = (partition, offset)
        return apply(row, HostInput(event, REF), HOST, policy, settings, topics, position)

    row, out = step(None, HostCameBack(10.0), 4)  # the first poll: a host never in trouble
    assert (row, out) == (None, [])
    row, out = step(row, HostDisconnected(20.0, HostStatus.DISCONNECTED), 9)
    assert unpack_row(row)[0]["state"] == "suspect" and row_position(row) == (2, 9)
    # a probe result moves the record on and keeps the host-signals position
    row, _ = apply(row, HostInput(Tick(21.0)), HOST, policy, settings, topics)
    assert row_position(row) == (2, 9) and unpack_row(row)[0]["checks_requested"] == 1
    # a repeated poll report (a new offset) that changes nothing is not written
    again, out = step(row, HostDisconnected(22.0, HostStatus.DISCONNECTED), 12)
    assert again is row and out == []
    # the restart: offsets 4 .. 12 are read again
    for offset, event in [
        (4, HostCameBack(10.0)),
        (7, MaintenanceStarted(15.0)),
        (9, HostDisconnected(20.0, HostStatus.DISCONNECTED)),
    ]:
        replayed, out = step(row, event, offset)
        assert replayed is row and out == [], offset
    assert unpack_row(row)[0]["episode"] == 1
    # a new "up" (a later offset) still ends the episode; so would one on another partition
    back, out = step(row, HostCameBack(30.0), 13)
    assert unpack_row(back)[0]["state"] == "idle" and row_position(back) == (2, 13)
    assert [t for t, _, _ in out] == [topics.fence_proposals, topics.notices]
    moved, _ = step(row, HostCameBack(30.0), 1, partition=5)
    assert unpack_row(moved)[0]["state"] == "idle" and row_position(moved) == (5, 1)
    # the position survives the table's serializer and a version-1 row has none (accepts all)
    from faust.serializers import codecs

    codec = codecs.get_codec(host_row_serializer())
    assert row_position(codec.loads(codec.dumps(back))) == (2, 13)
    v1 = {"record": unpack_row(row)[0], "host": REF.model_dump()}
    assert unpack_row(step(v1, HostCameBack(30.0), 0)[0])[0]["state"] == "idle"


def test_a_position_follows_the_extras_and_leaves_the_record_as_it_was():
    from streams.codec import row_content, with_position

    record = HostRecord(host=HOST, state=HostState.SUSPECT, episode=1).to_dict() | {"new": 3}
    row = pack_row(record, REF.model_dump())
    assert isinstance(row[-1], dict)  # the extras
    placed = with_position(row, (1, 42))
    assert row_position(placed) == (1, 42) and row_position(row) is None
    assert row_content(placed) == row and unpack_row(placed) == unpack_row(row)
    assert unpack_row(intern_row(json.loads(json.dumps(placed)))) == unpack_row(row)


def test_an_event_that_changes_nothing_returns_the_very_row_and_a_change_a_new_one():
    settings = FencerSettings(policy=PolicySettings(startup_quiet=0))
    policy, topics = settings.policy.to_policy(), settings.kafka.topics
    row, _ = apply(
        None, HostInput(HostDisconnected(1000.0, HostStatus.DISCONNECTED), REF), HOST, policy,
        settings, topics, (0, 5),
    )  # fmt: skip
    # The same disconnection seen again by a poll (a later offset): nothing changes, the row
    # is the same object (not packed again) and its position stays.
    again, out = apply(
        row, HostInput(HostDisconnected(1001.0, HostStatus.DISCONNECTED), REF), HOST, policy,
        settings, topics, (0, 9),
    )  # fmt: skip
    assert again is row and out == [] and row_position(again) == (0, 5)
    # The host's name changes: a new row (the host reference is part of it).
    renamed = REF.model_copy(update={"host_name": "kvm01-renamed"})
    changed, _ = apply(row, HostInput(Tick(1001.0), renamed), HOST, policy, settings, topics)
    assert changed is not row and unpack_row(changed)[1]["host_name"] == "kvm01-renamed"
    # A row of version 1 is written in the current form at its next event, as before.
    record, host = unpack_row(row)
    v1 = {"record": record, "host": host}
    repacked, _ = apply(v1, HostInput(Tick(1000.5)), HOST, policy, settings, topics)
    assert isinstance(repacked, list) and repacked[0] == ROW_VERSION


def test_the_row_cache_serves_what_this_worker_wrote_until_its_partitions_change():
    table: dict[str, Any] = {"a": ["row a, from the changelog"]}
    cache = RowCache(table, limit=2)
    assert cache.get("a") == ["row a, from the changelog"] and cache.get("b") is None
    cache.put("b", ["b1"])
    assert table["b"] == ["b1"] and cache.get("b") == ["b1"]
    # Another owner wrote "b" meanwhile (seen here only after a rebalance): forgotten on the
    # app's partition signals, so the table's row is read again.
    table["b"] = ["b2, written elsewhere"]
    app = faust.App("row-cache-test", broker="memory://", store="memory://")
    app.on_partitions_revoked.connect(cache.on_partitions_changed)
    app.on_partitions_assigned.connect(cache.on_partitions_changed)
    asyncio.run(app.on_partitions_revoked.send(set()))
    assert cache.get("b") == ["b2, written elsewhere"]
    cache.put("b", ["b3"])
    asyncio.run(app.on_partitions_assigned.send(set()))
    table["b"] = ["b4, recovered from the changelog"]
    assert cache.get("b") == ["b4, recovered from the changelog"]
    # At most `limit` rows: the least recently used is read from the table again.
    cache.put("x", ["x1"])
    cache.put("y", ["y1"])
    cache.get("x")
    cache.put("z", ["z1"])
    table["y"] = ["y2"]
    table["x"] = ["x2"]
    assert cache.get("y") == ["y2"] and cache.get("x") == ["x1"] and cache.get("z") == ["z1"]


# -- version 3: the reference reading as one compact string ------------------------------------

D1, D2, HB = "/mnt/p1/vm1.qcow2", "/mnt/p1/vm2.qcow2", "/mnt/p1/KVMHA/hb-10.0.0.1"


def test_the_reference_is_one_string_in_a_fixed_format():
    """The format of rows already in changelogs: a change that cannot read them fails here."""
    mtimes, beats = as_reference([(D1, 1700000000.0), (HB, 1700000007.0)], [(HB, "1700000005\n")])
    ref = pack_reference([list(p) for p in mtimes], [list(p) for p in beats])
    assert ref == "ATzlBJDd085tCzE3MDAwMDAwMDUKSTzlBJDd085tjp5bvja4m71lU/EHZVPxAA=="
    assert unpack_reference(ref) == ([list(p) for p in mtimes], [list(p) for p in beats])
    # with a fraction: float64, as exact
    fraction = [[fingerprint(D1), 1700000000.25]]
    assert pack_reference(fraction, []) == "AGSOnlu+NribvUHZVPxAEAAA"
    assert unpack_reference("AGSOnlu+NribvUHZVPxAEAAA") == (fraction, [])
    assert pack_reference([], []) is None and unpack_reference(None) == ([], [])


def test_whole_seconds_take_four_bytes_and_anything_else_eight_all_exact():
    for values, kind in [
        ([0.0, 2.0**32 - 1], "I"),
        ([-0.0], "d"),
        ([2.0**32], "d"),
        ([-1.0], "d"),
        ([1.5, 3.0], "d"),
        ([1e-300, 2e9 + 1e-6], "d"),
        ([float("inf")], "d"),
    ]:
        pairs = [[fingerprint(str(i)), v] for i, v in enumerate(values)]
        packed = pack_reference(pairs, [])
        assert packed is not None and chr(base64.b64decode(packed)[1]) == kind, values
        back = unpack_reference(packed)[0]
        assert [(k, v, math.copysign(1, v)) for k, v in back] == [
            (k, v, math.copysign(1, v)) for k, v in pairs
        ]
    disks = [(f"/mnt/p1/{i:040d}.qcow2", 1.7e9 + i) for i in range(20)]
    assert len(pack_reference(as_reference(disks, [])[0], []) or "") == 324
    fractional = [(p, m + 0.5) for p, m in disks]
    assert len(pack_reference(as_reference(fractional, [])[0], []) or "") == 432


@pytest.mark.parametrize(
    ("mtimes", "beats", "problem"),
    [
        ([["/mnt/p1/vm1.qcow2", 1.0]], [], "ref_mtimes key '/mnt/p1/vm1.qcow2' is not a path"),
        ([["ABCDEF0123456789", 1.0]], [], "ref_mtimes key 'ABCDEF0123456789' is not a path"),
        ([["0123456789abcdeg", 1.0]], [], "ref_mtimes key '0123456789abcdeg' is not a path"),
        ([[7, 1.0]], [], "ref_mtimes key '7' is not a path fingerprint"),
        ([["0123456789abcdef", "1.0"]], [], "ref_mtimes holds a value that is not a number"),
        ([], [["0123456789abcde", "1"]], "ref_heartbeats key '0123456789abcde' is not a path"),
        ([], [["0123456789abcdef", 1]], "ref_heartbeats value of '0123456789abcdef' is not a"),
    ],
)
def test_a_reference_that_is_not_fingerprint_keyed_is_refused_naming_the_field(
    mtimes: Any, beats: Any, problem: str
):
    with pytest.raises(ValueError, match=f"hosts row: {problem}"):
        pack_reference(mtimes, beats)


@pytest.mark.parametrize(
    ("ref", "problem"),
    [
        (5, "ref is not a string"),
        ("not base64!", "ref is not base64"),
        (base64.b64encode(b"").decode(), "ref is truncated"),
        (base64.b64encode(b"\x01" + b"\x00" * 8 + b"\x05ab").decode(), "ref is truncated"),
        (base64.b64encode(b"\x01" + b"\x00" * 5).decode(), "ref is truncated"),
        (base64.b64encode(b"\x01" + b"\x00" * 8 + b"\x01\xff").decode(), "not UTF-8"),
        (base64.b64encode(b"\x00x" + b"\x00" * 12).decode(), "malformed mtimes part"),
        (base64.b64encode(b"\x00I" + b"\x00" * 11).decode(), "malformed mtimes part"),
        (base64.b64encode(b"\xff" * 11).decode(), "ref is truncated"),
    ],
)
def test_a_broken_reference_is_a_clear_error(ref: Any, problem: str):
    with pytest.raises(ValueError, match=problem):
        unpack_reference(ref)
    row = pack_row(HostRecord(host=HOST).to_dict(), REF.model_dump())
    row[1] = [None] * ROW_RECORD_FIELDS.index("ref") + [ref]
    with pytest.raises(ValueError, match=problem):
        unpack_row(row)


def _suspect_after_baseline(mtimes: Any, beats: Any) -> HostRecord:
    """A host checked once (its baseline taken at 102), the reference as given."""
    return HostRecord(
        host=HOST, state=HostState.SUSPECT, since=100.0, episode=1, suspect_since=100.0,
        opened_at=101.0, checks_requested=1, last_request_at=101.0, last_result_at=102.0,
        last_check=1, last_evidence=Evidence.BASELINE, last_probe_at=102.0, ref_at=102.0,
        ref_mtimes=mtimes, ref_heartbeats=beats, newest_write=5.0, files_checked=3,
        neighbour="kvm02",
    )  # fmt: skip


OLD_MTIMES = ((D1, 5.0), (D2, 4.0), (HB, 6.0))
OLD_BEATS = ((HB, "1700000000\n"),)
# A version 2 row as workers before version 3 wrote it (path-keyed, flattened pairs).
V2_ROW = [
    2,
    ["suspect", 1, 100.0, 100.0, 101.0, 1, None, 101.0, 102.0, 1, None, None, "baseline", 102.0,
     102.0, [D1, 5.0, D2, 4.0, HB, 6.0], [HB, "1700000000\n"], 5.0, 3, None, "kvm02"],
    [HOST, "kvm01", REF.cluster_uuid, "10.0.0.1", REF.zone_uuid],
    [0, 17],
]  # fmt: skip


@pytest.mark.parametrize(
    ("mtimes", "beats", "evidence", "reason"),
    [
        (OLD_MTIMES, OLD_BEATS, "stale", None),
        (OLD_MTIMES[:2], (), "stale", None),  # a file the reading lacks keeps its value
        (((D1, 5.5), *OLD_MTIMES[1:]), OLD_BEATS, "alive", f"{D1} changed"),
        (OLD_MTIMES, ((HB, "1700000060\n"),), "alive", f"{HB} changed"),
        ((*OLD_MTIMES, ("/mnt/p1/vm3.qcow2", 1.0)), OLD_BEATS, "alive", "vm3.qcow2 appeared"),
    ],
)
@pytest.mark.parametrize("version", [1, 2])
def test_an_old_row_loads_and_judges_the_next_reading_as_before(
    version: int, mtimes: Any, beats: Any, evidence: str, reason: str | None
):
    """The upgrade from path-keyed references: an unchanged reading is no sign of life, a
    changed or new file is."""
    settings = FencerSettings(policy=PolicySettings(startup_quiet=0))
    policy, topics = settings.policy.to_policy(), settings.kafka.topics
    old = _suspect_after_baseline(OLD_MTIMES, OLD_BEATS).to_dict()
    assert pack_row_v2(old, REF.model_dump()) == V2_ROW[:3]
    row: Any = V2_ROW if version == 2 else {"record": old, "host": REF.model_dump()}
    record, host = unpack_row(row)
    assert host == REF.model_dump()
    assert (record["ref_mtimes"], record["ref_heartbeats"]) == tuple(
        [list(p) for p in pairs] for pairs in as_reference(OLD_MTIMES, OLD_BEATS)
    )
    assert HostRecord.from_dict(record) == _suspect_after_baseline(
        *as_reference(OLD_MTIMES, OLD_BEATS)
    )
    at = 102.0 + policy.check_interval + 1
    asked, out = apply(row, HostInput(Tick(at)), HOST, policy, settings, topics)
    assert asked is not None and asked[0] == ROW_VERSION and len(out) == 1
    assert row_position(asked) == (row_position(row) if version == 2 else None)
    result = ProbeFinished(
        at=at + 1, episode=1, check=2, mtimes=mtimes, heartbeats=beats, complete=True
    )
    judged, _ = apply(asked, HostInput(result), HOST, policy, settings, topics)
    assert judged_check(asked, judged) == evidence
    got = unpack_row(judged)[0]["reason"]
    assert got == reason if reason is None else got.endswith(reason)


_paths = st.sampled_from([D1, D2, HB, "/mnt/p2/vm1.qcow2", "/x"])
_values = st.sampled_from([5.0, 6.0, 1700000000.0, 1700000000.5, -0.0, 0.0])
_beats = st.sampled_from(["1", "2", "1700000000\n", "x" * 40, "x" * 39 + "y"])
_readings = st.tuples(
    st.dictionaries(_paths, _values, max_size=5), st.dictionaries(_paths, _beats, max_size=2)
)


def _old_changed(before: dict[str, Any], now: dict[str, Any]) -> str | None:
    """Version 2's rule, path by path (fencing.decision before fingerprints)."""
    for path, value in sorted(now.items()):
        if path not in before:
            return f"{path} appeared"
        if before[path] != value:
            return f"{path} changed"
    return None


@settings(max_examples=400, deadline=None)
@given(st.lists(_readings, min_size=1, max_size=4), _readings, st.booleans())
def test_old_and_new_references_judge_every_reading_alike(
    earlier: list[Any], now: Any, through_v2: bool
):
    """For random earlier readings (merged as the reference) and a new reading: the record
    loaded from a version 2 row (path-keyed) or from a version 3 row says alive-by-change
    exactly when version 2's path-by-path rule did, naming the same file (the random paths
    never share a fingerprint)."""
    ref_m: dict[str, float] = {}
    ref_b: dict[str, str] = {}
    for m, b in earlier:
        ref_m, ref_b = {**ref_m, **m}, {**ref_b, **b}
    if not ref_m and not ref_b:
        return
    old = _old_changed(ref_m, now[0]) or _old_changed(ref_b, now[1])
    paths = _suspect_after_baseline(tuple(sorted(ref_m.items())), tuple(sorted(ref_b.items())))
    if through_v2:
        row = pack_row_v2(paths.to_dict(), REF.model_dump())
    else:
        mtimes, beats = as_reference(ref_m.items(), ref_b.items())
        record = replace(paths, ref_mtimes=mtimes, ref_heartbeats=beats)
        row = pack_row(record.to_dict(), REF.model_dump())
    loaded = HostRecord.from_dict(unpack_row(intern_row(json.loads(json.dumps(row))))[0])
    loaded = replace(loaded, last_request_at=1000.0)
    policy = FencerSettings().policy.to_policy()
    result = ProbeFinished(
        at=1001.0,
        episode=1,
        check=2,
        mtimes=tuple(sorted(now[0].items())),
        heartbeats=tuple(sorted(now[1].items())),
        complete=True,
    )
    evidence, reason = judge(loaded, result, policy)
    if not now[0] and not now[1]:
        assert evidence is Evidence.UNKNOWN
    elif old is None:
        assert (evidence, reason) == (Evidence.STALE, None)
    else:
        assert (evidence, reason) == (Evidence.ALIVE, old)


def test_a_reference_with_many_heartbeats_round_trips():
    beats = [[fingerprint(f"/mnt/p{i}/KVMHA/hb"), str(i) * (i % 34)] for i in range(200)]
    beats.sort()
    packed = pack_reference([], beats)
    assert base64.b64decode(packed or "")[:2] == bytes([200 & 0x7F | 0x80, 1])  # a 2-byte count
    assert unpack_reference(packed) == ([], beats)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80))
def test_any_bytes_in_the_ref_slot_load_or_fail_with_a_value_error(data: bytes):
    """Total: a damaged row is reported (ValueError), never another exception in the watch."""
    try:
        mtimes, beats = unpack_reference(base64.b64encode(data).decode())
    except ValueError as exc:
        assert str(exc).startswith("hosts row: ref ")
    else:  # what loads packs again to a string that loads to the same
        again = pack_reference(mtimes, beats)
        assert again is None or pack_reference(*unpack_reference(again)) == again


def test_the_worker_clocks_are_row_slots_not_extras_and_shared_after_recovery():
    # The watch stamps a suspect row with its process's clock name (streams.worker_clock): in the
    # row's fixed order (no key string per row), and one string for every row of that worker
    # once read back from the changelog.
    clock = "mgmt-worker-with-a-long-host-name.example.org:12345:1764484000.123"
    record = HostRecord(
        host=HOST,
        state=HostState.SUSPECT,
        request_clock=clock,
        ref_clock=clock,
        opened_clock=clock,
    ).to_dict()
    row = pack_row(record, REF.model_dump())
    assert len(row) == 3 and clock in row[1]  # no extras dict
    assert unpack_row(row)[0] == record
    first, second = (intern_row(json.loads(json.dumps(row))) for _ in range(2))
    slot = ROW_RECORD_FIELDS.index("request_clock")
    assert first[1][slot] == clock and first[1][slot] is second[1][slot]
    opened = ROW_RECORD_FIELDS.index("opened_clock")
    assert first[1][opened] is first[1][slot]
