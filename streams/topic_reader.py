"""Read whole Kafka topics from the beginning, without a consumer group, and know when caught up.

Every reader sees every partition (manual assignment), so each API process and each worker
builds the same view. "Caught up" compares the position with the high watermark of the last
fetch response, never with `end_offsets()`, which the embedded Tansu broker reports too low.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from fencing.settings import FencerSettings
from streams.kafka import aiokafka_kwargs

log = logging.getLogger(__name__)


class TopicReaderError(Exception):
    """A topic could not be read (the message names the topic or the broker)."""


class TopicReader:
    """Tails `topics` from offset 0 and calls `on_record` for each record, in partition order."""

    def __init__(
        self,
        settings: FencerSettings,
        topics: list[str],
        on_record: Callable[[ConsumerRecord[bytes, bytes]], None],
        *,
        client_id: str = "fencer-reader",
        start: Mapping[int, int] | None = None,
    ) -> None:
        self._settings = settings
        # {partition: offset} to start from instead of the beginning (every topic); an offset
        # the topic no longer holds starts from its beginning (auto_offset_reset).
        self._start = dict(start or {})
        self._topics = topics
        self._on_record = on_record
        self._client_id = client_id
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.caught_up = asyncio.Event()
        self._next: dict[TopicPartition, int] = {}  # the offset after the last record read
        self.failures = 0  # failed reads in a row (each one logged, the read retried)

    def _new_consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            client_id=self._client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=200,
            **aiokafka_kwargs(self._settings),
        )

    async def start(self, within: float = 30.0) -> None:
        """Connect, assign every partition, and return once everything present has been read."""
        consumer = self._new_consumer()
        try:
            await asyncio.wait_for(consumer.start(), within)
            parts = await asyncio.wait_for(self._partitions(consumer), within)
        except (TimeoutError, Exception) as exc:
            await consumer.stop()
            if isinstance(exc, TopicReaderError):
                raise
            raise TopicReaderError(
                f"cannot read {', '.join(self._topics)} from Kafka at "
                f"{self._settings.kafka.bootstrap_servers}: {type(exc).__name__} {exc}".rstrip()
            ) from None
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        for tp in parts:
            if tp.partition in self._start:
                consumer.seek(tp, self._start[tp.partition])
        self._consumer = consumer
        self._task = asyncio.create_task(self._run(parts), name=f"{self._client_id}-tail")
        waiter = asyncio.create_task(self.caught_up.wait())
        done, _ = await asyncio.wait(
            [self._task, waiter], timeout=within, return_when=asyncio.FIRST_COMPLETED
        )
        waiter.cancel()
        if self._task in done:
            await self.stop()
            raise TopicReaderError(f"reading {', '.join(self._topics)} stopped early")
        if not self.caught_up.is_set():
            await self.stop()
            raise TopicReaderError(
                f"could not catch up with {', '.join(self._topics)} within {within:.0f}s"
            )

    async def _partitions(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        while True:
            await consumer.topics()  # refreshes the metadata
            missing = [t for t in self._topics if not consumer.partitions_for_topic(t)]
            if not missing:
                return [
                    TopicPartition(t, p)
                    for t in self._topics
                    for p in sorted(consumer.partitions_for_topic(t) or ())
                ]
            await asyncio.sleep(0.2)

    async def _run(self, parts: list[TopicPartition]) -> None:
        while True:
            consumer = self._consumer
            assert consumer is not None
            try:
                batches = await consumer.getmany(timeout_ms=300)
            except (asyncio.CancelledError, Exception) as exc:
                if isinstance(exc, asyncio.CancelledError) and _cancelled():
                    raise  # the reader's own stop: only it ends the tail
                # A lost broker (aiokafka can raise its own fetch task's CancelledError out of
                # a read, and raises it again at every read after): it ended the tail for good,
                # with no word, and the view (claims, host records, pins) froze. Logged, and
                # read on from where it was through a new consumer.
                self.failures += 1
                wait = min(0.2 * 2 ** min(self.failures - 1, 5), 5.0)
                log.warning(
                    "%s cannot be read (%s: %s): reading on in %.1f s (failure %d in a row)",
                    ", ".join(self._topics),
                    type(exc).__name__,
                    exc,
                    wait,
                    self.failures,
                )
                await asyncio.sleep(wait)
                await self._reopen(parts)
                continue
            if self.failures:
                log.warning(
                    "%s read again after %d failure(s)", ", ".join(self._topics), self.failures
                )
                self.failures = 0
            for tp, records in batches.items():
                for record in records:
                    self._next[tp] = record.offset + 1
                    try:
                        self._on_record(record)
                    except Exception:
                        # One bad record must not stop the view; the topic still holds it.
                        log.exception(
                            "skipped record %s[%d]@%d",
                            record.topic,
                            record.partition,
                            record.offset,
                        )
            if not self.caught_up.is_set() and await self._at_end(parts):
                self.caught_up.set()

    async def _reopen(self, parts: list[TopicPartition]) -> None:
        """A new consumer, each partition at the offset after its last record read (the first
        one's start otherwise); the old one closed. Never raises: a broker still away leaves
        the old consumer, whose next read fails and is retried."""
        consumer = self._new_consumer()
        try:
            await asyncio.wait_for(consumer.start(), 10.0)
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            for tp in parts:
                at = self._next.get(tp, self._start.get(tp.partition))
                if at is not None:
                    consumer.seek(tp, at)
        except (asyncio.CancelledError, Exception) as exc:
            if isinstance(exc, asyncio.CancelledError) and _cancelled():
                await _quiet_stop(consumer)
                raise
            log.warning("%s: no new consumer yet: %s", ", ".join(self._topics), exc)
            await _quiet_stop(consumer)
            return
        old, self._consumer = self._consumer, consumer
        if old is not None:
            await _quiet_stop(old)

    async def _at_end(self, parts: list[TopicPartition]) -> bool:
        assert self._consumer is not None
        for tp in parts:
            high = self._consumer.highwater(tp)
            if high is None or await self._consumer.position(tp) < high:
                return False
        return True

    async def stop(self) -> None:
        """Stop tailing and close the connection."""
        task, consumer = self._task, self._consumer
        self._task, self._consumer = None, None
        await stop_tailing(task, consumer)


def _cancelled() -> bool:
    """Whether the running task (the tail) is being cancelled."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


async def _quiet_stop(consumer: AIOKafkaConsumer) -> None:
    """Stop a consumer given up on; aiokafka's stop after a lost broker can raise its own
    fetch task's CancelledError."""
    try:
        await consumer.stop()
    except (asyncio.CancelledError, Exception) as exc:
        if isinstance(exc, asyncio.CancelledError) and _cancelled():
            raise
        log.debug("closing a consumer given up on: %s", exc)


async def stop_tailing(task: asyncio.Task[None] | None, consumer: AIOKafkaConsumer | None) -> None:
    """Cancel a tailing task and wait for it to end, then close its consumer (either may be
    None): how a TopicReader and the actuator's end-offset sampler (streams.actuation) stop."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    if consumer is not None:
        await consumer.stop()
