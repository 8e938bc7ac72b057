"""Operator marks (streams.actuating.read_again): a record is read again only if it is the very
record a mark remembers (same partition, offset and Kafka timestamp) or one before it; a record
of a deleted and recreated operator-actions topic, at or below an old mark's offset but with a
later timestamp, is new. Marks written before the timestamp was kept judge by place alone."""

from __future__ import annotations

from types import SimpleNamespace

from streams.actuating import _retry_stage, mark_stamp, read_again, record_stamp

T = 1_796_013_066_997  # a Kafka timestamp (ms)


def test_the_very_record_marked_and_records_before_it_are_read_again() -> None:
    mark = [0, 7, "done", T]
    assert read_again(mark, (0, 7), T)
    assert read_again(mark, (0, 3), T - 5_000)
    assert read_again(mark, (0, 6), T)  # the same millisecond, before it: read again


def test_a_recreated_topics_record_at_or_below_an_old_mark_is_new() -> None:
    mark = [0, 7, "done", T]
    assert not read_again(mark, (0, 0), T + 1)  # offsets from 0 again, written later
    assert not read_again(mark, (0, 7), T + 60_000)  # the marked offset, another record
    assert not read_again(mark, (0, 7), T - 60_000)  # even with an earlier timestamp
    assert not read_again(mark, (0, 8), T)  # after the mark, as always
    assert not read_again(mark, (1, 3), T - 1)  # another partition
    assert not read_again(mark, None, T)


def test_marks_and_records_without_a_timestamp_are_judged_by_place() -> None:
    for mark in ([0, 7], [0, 7, "done"], [0, 7, "done", None], [0, 7, "done", True]):
        assert mark_stamp(mark) is None
        assert read_again(mark, (0, 7), T) and read_again(mark, (0, 0), T + 1)
        assert not read_again(mark, (0, 8), T)
    assert read_again([0, 7, "done", T], (0, 2), None)
    assert not read_again("0 7", (0, 2), T) and not read_again([0], (0, 0), T)


def test_a_retry_stage_follows_the_record_not_only_its_place() -> None:
    assert _retry_stage([0, 5, "started", T], (0, 5), T) == "started"
    assert _retry_stage([0, 5, "done", T], (0, 5), T) == "done"
    assert _retry_stage([0, 5, "started", T], (0, 4), T - 1) == "done"  # overtaken
    # A recreated topic: the retry at offset 5 (or 0) is another request, never seen.
    assert _retry_stage([0, 5, "started", T], (0, 5), T + 9) is None
    assert _retry_stage([0, 5, "done", T], (0, 0), T + 9) is None
    # Older marks keep today's behaviour.
    assert _retry_stage([0, 5, "started"], (0, 5), T) == "started"
    assert _retry_stage([0, 5, "done"], (0, 2), T) == "done"
    assert _retry_stage([0, 5, "done"], (0, 6), T) is None
    assert _retry_stage([0, 5], (0, 5), T) is None and _retry_stage(None, (0, 5), T) is None


def test_a_records_stamp_is_its_kafka_timestamp_in_milliseconds() -> None:
    assert record_stamp(SimpleNamespace(timestamp=T / 1000.0)) == T  # Faust: seconds
    for missing in (None, -1, -0.001, True):
        assert record_stamp(SimpleNamespace(timestamp=missing)) is None
    assert record_stamp(object()) is None
