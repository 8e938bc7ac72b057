"""The hosts table's compact rows (streams.codec.pack_row): every record and host round-trip
exactly, rows of version 1 still load and step on, and the serializer Faust uses for the table
reads back what it wrote."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import faust
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fencing.decision import Evidence, HostRecord, HostState, as_reference, fingerprint
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
from streams.codec import ROW_VERSION, HostInput, intern_row, pack_row, row_position, unpack_row
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
