"""The actuator's view of the fence-decisions log's end (streams.actuation.LogEdges) when the
broker answers wrongly or the topic is deleted and recreated: one low answer changes nothing,
lower answers in every one of `new_log_after` samples in a row start the partition again as at
a first sample (the new log's backlog refused, what is appended after read live, people told
once), and the baseline is the highest of the first answers (one answer too low never makes
backlog look live). Pure tests, then one against the session's broker, which deletes and
recreates the topic."""

from __future__ import annotations

from typing import Any

import pytest

from fencing.events import NoticeKind
from fencing.records import Notice
from streams.actuation import DecisionLog, LogEdges, NewLog, NotNow, check_live

MAX_AGE = 60.0


def settled(end: int, at: float = 10.0) -> LogEdges:
    edges = LogEdges(retention=600.0)
    assert edges.note(0, end, at - 1.0) is None and edges.note(0, end, at) is None
    assert edges.settled(0)
    return edges


def test_a_single_low_answer_changes_nothing() -> None:
    edges = settled(40)
    edges.note(0, 42, 20.0)
    assert edges.note(0, 3, 21.0) is None  # the broker answers wrongly once
    assert edges.note(0, 42, 22.0) is None
    assert edges.note(0, 0, 23.0) is None and edges.note(0, 1, 24.0) is None  # twice, in a row
    assert edges.note(0, 43, 25.0) is None  # then right again: no new log
    assert edges.first == {0: 40} and edges.low[0] == []
    assert edges.samples[0] == [(10.0, 40), (22.0, 42), (25.0, 43)]
    with pytest.raises(NotNow, match="was on the topic before"):
        check_live(edges, 0, 2, MAX_AGE, 26.0)  # an old record never looks new
    assert check_live(edges, 0, 42, MAX_AGE, 26.0) == pytest.approx(4.0)  # 42 after t=22


def test_a_recreated_topic_is_a_new_log_after_three_low_samples() -> None:
    edges = settled(40)
    assert edges.note(0, 2, 20.0) is None
    assert edges.note(0, 3, 21.0) is None
    new = edges.note(0, 3, 22.0)
    assert new == NewLog(partition=0, was=40, end=3, samples=3)
    assert edges.first[0] == 3 and edges.samples[0] == [(22.0, 3)] and edges.settled(0)
    # What was on the new log when it was found is backlog: refused.
    for offset in (0, 2):
        with pytest.raises(NotNow, match="not read live"):
            check_live(edges, 0, offset, MAX_AGE, 22.5)
    # What is appended after is read live, its age by this worker's clock.
    assert edges.note(0, 5, 30.0) is None
    assert check_live(edges, 0, 3, MAX_AGE, 31.0) == pytest.approx(9.0)
    assert check_live(edges, 0, 4, MAX_AGE, 31.0) == pytest.approx(9.0)
    assert check_live(edges, 0, 5, MAX_AGE, 31.0) == pytest.approx(1.0)
    with pytest.raises(NotNow, match="up to 69 s ago"):
        check_live(edges, 0, 4, MAX_AGE, 91.0)
    # And the new log, recreated once more, is found again the same way.
    assert [edges.note(0, 0, t) for t in (40.0, 41.0)] == [None, None]
    assert edges.note(0, 1, 42.0) == NewLog(0, 5, 1, 3)
    with pytest.raises(NotNow, match="not read live"):
        check_live(edges, 0, 0, MAX_AGE, 42.5)


def test_the_new_logs_baseline_is_the_highest_of_the_low_answers() -> None:
    """An answer in the run lower than the others (the broker wrong once more) does not lower
    the baseline: a record on the new log below the highest answer stays backlog."""
    edges = settled(40)
    edges.note(0, 6, 20.0)
    edges.note(0, 1, 21.0)
    assert edges.note(0, 4, 22.0) == NewLog(0, 40, 6, 3)
    assert edges.first[0] == 6 and edges.samples[0] == [(20.0, 6)]
    with pytest.raises(NotNow, match="not read live"):
        check_live(edges, 0, 5, MAX_AGE, 23.0)
    assert check_live(edges, 0, 6, MAX_AGE, 23.0) == pytest.approx(3.0)


def test_the_first_baseline_is_the_higher_of_two_answers() -> None:
    """The broker's very first answer is too low (3, the log holds 10): the records between
    are backlog once the second answer (10) came; before it nothing is read live."""
    edges = LogEdges(retention=600.0)
    edges.note(0, 3, 1.0)
    assert not edges.settled(0)
    for offset in (2, 5, 10):
        with pytest.raises(NotNow, match="before this actuator knew where the log ended"):
            check_live(edges, 0, offset, MAX_AGE, 1.5)
    edges.note(0, 10, 2.0)
    assert edges.settled(0) and edges.first[0] == 10
    for offset in (3, 5, 9):
        with pytest.raises(NotNow, match="was on the topic before"):
            check_live(edges, 0, offset, MAX_AGE, 2.5)
    assert check_live(edges, 0, 10, MAX_AGE, 2.5) == pytest.approx(0.5)
    # The other way round (the second answer too low): the first one stands.
    edges = LogEdges(retention=600.0)
    edges.note(1, 10, 1.0)
    edges.note(1, 3, 2.0)
    assert edges.settled(1) and edges.first[1] == 10
    with pytest.raises(NotNow, match="was on the topic before"):
        check_live(edges, 1, 5, MAX_AGE, 2.5)
    assert check_live(edges, 1, 10, MAX_AGE, 2.5) == pytest.approx(1.5)
    with pytest.raises(NotNow, match="was on the topic before"):
        check_live(edges, 2, 0, MAX_AGE, 2.5)  # a partition never sampled


# ---------------------------------------------------------------------------------------------
# Against the session's broker: fence-decisions deleted and recreated


async def test_the_sampler_finds_a_recreated_topic_and_tells_people_once(
    fencer_settings: Any,
) -> None:
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient

    from streams.kafka import aiokafka_kwargs, ensure_topics

    settings = fencer_settings(isolated_topics=True)
    topic = settings.kafka.topics.fence_decisions
    told: list[Notice] = []

    async def notify(n: Notice) -> None:
        told.append(n)

    producer = AIOKafkaProducer(acks="all", **aiokafka_kwargs(settings))
    await producer.start()

    async def append() -> int:
        meta = await producer.send_and_wait(topic, b"x", key=b"h", partition=0)
        return int(meta.offset)

    # A period of an hour: this test takes every sample itself, when it means to.
    dl = DecisionLog(settings, 3600.0, topic=topic)
    dl.notify = notify

    async def sample() -> None:
        for _ in range(50):  # the deleted topic may be unknown for a moment
            try:
                await dl.sample()
                return
            except Exception:
                import asyncio

                await asyncio.sleep(0.2)
        raise AssertionError(f"the end offsets of {topic} cannot be read")

    try:
        for _ in range(4):
            await append()
        await dl.start()
        assert dl.edges.first[0] == 4 and dl.edges.settled(0)
        assert await append() == 4
        await sample()
        check_live(dl.edges, 0, 4, MAX_AGE, dl.clock())
        admin = AIOKafkaAdminClient(**aiokafka_kwargs(settings))
        await admin.start()
        try:
            await admin.delete_topics([topic])
        finally:
            await admin.close()
        assert topic in await ensure_topics(settings)
        assert await append() == 0  # on the new log before the actuator finds it
        await sample()
        assert not told and dl.edges.first[0] == 4  # once is not believed
        await sample()
        await sample()
        assert dl.edges.first[0] == 1, dl.edges
        (n,) = told
        assert n.kind is NoticeKind.FENCE_REFUSED and n.topic == topic and n.partition == 0
        assert "went lower (5 -> 1) in 3 samples in a row: a new log" in (n.reason or "")
        with pytest.raises(NotNow, match="was on the topic before"):
            check_live(dl.edges, 0, 0, MAX_AGE, dl.clock())
        assert await append() == 1  # appended while it listens: read live
        await sample()
        assert check_live(dl.edges, 0, 1, MAX_AGE, dl.clock()) < 10.0
        await sample()
        assert len(told) == 1
    finally:
        await dl.stop()
        await producer.stop()
