"""Operator marks (streams.actuating.read_again): a record is read again only if it is the very
record a mark remembers (same partition, offset and Kafka timestamp) or one before it on the
same log, which only the log itself can tell (what it holds at the mark's offset now). The
timestamps of two records are never compared (rule 1: they may come from two producers'
clocks). Marks written before the timestamp was kept judge by place alone."""

from __future__ import annotations

from types import SimpleNamespace

from streams.actuating import AtMark, _retry_stage, mark_stamp, read_again, record_stamp

T = 1_796_013_066_997  # a Kafka timestamp (ms)


def test_the_very_record_marked_is_read_again_and_one_below_it_asks_the_log() -> None:
    mark = [0, 7, "done", T]
    assert read_again(mark, (0, 7), T) == "again"
    # Below the mark: whatever its timestamp, earlier, the same or later (a producer whose clock
    # ran ahead), only the log can tell.
    for stamp in (T - 5_000, T, T + 60_000):
        assert read_again(mark, (0, 3), stamp) == "ask"


def test_what_the_log_holds_at_the_mark_tells_read_again_from_new() -> None:
    mark = [0, 7, "done", T]
    for stamp in (T - 5_000, T + 60_000):  # the record's own stamp plays no part
        # The marked record is still there: the same log, read again.
        assert read_again(mark, (0, 3), stamp, AtMark("record", T)) == "again"
        # The log ends at or below the mark's offset: recreated, a new request.
        assert read_again(mark, (0, 3), stamp, AtMark("end")) == "new"
        # Another record there (the recreated log grew past the mark): a new request.
        assert read_again(mark, (0, 3), stamp, AtMark("record", T + 1)) == "new"
        assert read_again(mark, (0, 3), stamp, AtMark("record", None)) == "new"
        # No answer (broker unreachable, timeout, a gap): unknown, never taken for either.
        assert read_again(mark, (0, 3), stamp, AtMark("failed", detail="timeout")) == "unknown"


def test_the_marked_offset_with_another_stamp_and_records_after_the_mark_are_new() -> None:
    mark = [0, 7, "done", T]
    assert read_again(mark, (0, 7), T + 60_000) == "new"  # the marked offset, another record
    assert read_again(mark, (0, 7), T - 60_000) == "new"  # even with an earlier timestamp
    assert read_again(mark, (0, 8), T) == "new"  # after the mark, as always
    assert read_again(mark, (0, 8), T, AtMark("failed")) == "new"  # the log is never asked
    assert read_again(mark, (1, 3), T - 1) == "new"  # another partition
    assert read_again(mark, None, T) == "new"


def test_marks_and_records_without_a_timestamp_are_judged_by_place() -> None:
    for mark in ([0, 7], [0, 7, "done"], [0, 7, "done", None], [0, 7, "done", True]):
        assert mark_stamp(mark) is None
        assert read_again(mark, (0, 7), T) == "again"
        assert read_again(mark, (0, 0), T + 1) == "again"
        assert read_again(mark, (0, 8), T) == "new"
    assert read_again([0, 7, "done", T], (0, 2), None) == "again"
    assert read_again("0 7", (0, 2), T) == "new" and read_again([0], (0, 0), T) == "new"
    # A mark of this partition whose offset is no number cannot place anything.
    assert read_again([0, "7", "done", T], (0, 2), T) == "unknown"
    assert read_again([0, True, "done"], (0, 0), T) == "unknown"


def test_a_retry_stage_follows_the_verdict_on_the_record() -> None:
    assert _retry_stage([0, 5, "started", T], (0, 5), "again") == "started"
    assert _retry_stage([0, 5, "done", T], (0, 5), "again") == "done"
    assert _retry_stage([0, 5, "started", T], (0, 4), "again") == "done"  # overtaken
    # A recreated topic: the retry at offset 5 (or 0) is another request, never seen.
    assert _retry_stage([0, 5, "started", T], (0, 5), "new") is None
    assert _retry_stage([0, 5, "done", T], (0, 0), "new") is None
    assert _retry_stage([0, 5, "done"], (0, 2), "again") == "done"
    assert _retry_stage([0, 5], (0, 5), "again") is None
    assert _retry_stage(None, (0, 5), "new") is None


def test_a_records_stamp_is_its_kafka_timestamp_in_milliseconds() -> None:
    assert record_stamp(SimpleNamespace(timestamp=T / 1000.0)) == T  # Faust: seconds
    for missing in (None, -1, -0.001, True):
        assert record_stamp(SimpleNamespace(timestamp=missing)) is None
    assert record_stamp(object()) is None
