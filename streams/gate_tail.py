"""The gate owner's tail of the decision log: a decision another owner published late counts.

Rule: the decision log (fence-decisions) is the source of truth: the actuator carries out any
decision there whose signature verifies (streams.gating, module rule). The reconciliation after
an assignment reads the log once; a former owner that was stalled longer than the consumer
session (SIGSTOP, a long GC or VM pause, a network hiccup) can wake after that read and publish a
decision it judged before the stall (its producer still works; its row writes reach the changelog
but not the new owner's store). So while this process owns the gates partition it keeps reading
the log from where the reconciliation's read ended (`DecisionTail`: a plain consumer without a
group, the actuator's signature check `streams.actuation.read_decision`: a forged record neither
counts nor stops the tail), and every judgement first merges the approved power-downs read so
far into the shared row (`merge`, by decision id: the owner's own decisions read back count
once), moving the shared row's `log_position` in the same record. The judgement never waits for
the broker: it merges what the tail has read (the tail's fetch wait is its idle time).

Each decision read is taken onto the gate's clock once, when it is read (as the reconciliation
does: `fencing.gate.take_over_logged`, aged against the latest time its clock is known to have
reached in what the tail read; a decision of another clock read alone is as young as now, never
younger than it is), and kept on that clock, so it leaves the window a window after it was read
at the latest. Only approved power-downs are kept, and only while in the window.

The tail stops at every change of assignment (`halt`: what it read and did not merge is
forgotten; the next reconciliation reads the log again from the shared row's position) and is
started again by the next reconciliation (`follow`, from where its read ended). A tail that
cannot read (no broker) logs, retries with a back-off and checks the broker every
`CHECK_EVERY`; the gate judges meanwhile with its rows and what was read, as without a tail.
Never silently (rule 5): a tail that has not read for `gate.log_tail_notify_after` seconds (on
this process's monotonic clock, counted from when it last READ: a fetch answered for every
partition, records or none, or records returned; never from when it last connected: a tail
that connects and fails again at once, or connects and is never answered a fetch, which
aiokafka retries without a word, is not reading) sends a `decision_log_unread` notice through
the usual notice path (the runtime's; a worker without one, the ingest role alone, writes it
to the notices topic itself), repeated every `actuator.renotify_interval` while it still does
not read (not at every retry; one that could not be sent is tried again at the next failure);
each id carries the process's tag and the spell's number, so no id is ever computed twice. When
it reads again after such a notice, a "recovered" line is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from fencing import gate as gatecore
from fencing.events import NoticeKind
from fencing.records import FenceDecision, HostRef, Notice
from streams.actuation import read_decision
from streams.gating import logged_of
from streams.kafka import aiokafka_kwargs
from streams.worker_clock import CLOCK_ID, worker_clock

if TYPE_CHECKING:
    from streams.runtime import Runtime

log = logging.getLogger("fencer.streams")

LogPosition = dict[int, int]  # fence-decisions partition -> the next offset to read

RETRY_FIRST = 1.0  # the first back-off after a failed read; doubled up to RETRY_MAX
RETRY_MAX = 30.0
CHECK_EVERY = 10.0  # the tail asks the broker for metadata this often (a broker gone shows)
FETCH_WAIT_MS = 500  # the broker holds an empty fetch this long: the tail's idle time


def merge(
    glob: gatecore.GlobalGate,
    merged_to: LogPosition,
    logged: tuple[gatecore.Logged, ...],
    read_to: LogPosition,
    now: float,
    window: float,
    clock_id: str | None,
) -> tuple[gatecore.GlobalGate, LogPosition]:
    """The shared row `glob` (the log merged up to `merged_to`) with the approved power-downs
    of `logged` (read up to `read_to`) still in the window merged in by decision id, and the
    position it then holds (module rule). No I/O, no clock. A row not on the clock `clock_id`
    is left as it is (the next reconciliation takes it over with the log)."""
    if glob.clock_id != clock_id:
        return glob, merged_to
    if any(d.clock_id != clock_id for d in logged):
        latest = gatecore.latest_known((), logged)
        logged = gatecore.take_over_logged(logged, latest, now, clock_id)
    proved = gatecore.logged_grants(logged, now, window)
    whole = gatecore.reconcile(glob, (), now, window, proved)
    position = dict(merged_to)
    for partition, offset in read_to.items():
        position[partition] = max(offset, position.get(partition, 0))
    if whole is not glob:
        added = sorted({g.decision_id for g in whole.grants} - {g.decision_id for g in glob.grants})
        log.info(
            "gate: %d approved power-downs read from the decision log after the reconciliation "
            "merged into the shared row (%s): they count toward the caps",
            len(added),
            ", ".join(added),
        )
    return whole, position


class DecisionTail:
    """The decision log read on while this process owns the gates partition (module rule)."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        clock: Callable[[], float] = worker_clock,
        clock_id: str | None = CLOCK_ID,
        retry_first: float = RETRY_FIRST,
        check_every: float = CHECK_EVERY,
        notify_after: float | None = None,
        renotify: float | None = None,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runtime = runtime
        self._clock = clock
        self.clock_id = clock_id
        self.retry_first = retry_first
        self.check_every = check_every
        self._task: asyncio.Task[None] | None = None
        self._kept: list[gatecore.Logged] = []  # approved power-downs, on the gate's clock
        self._latest: dict[str | None, float] = {}  # another clock -> the latest stamp read
        self.position: LogPosition = {}  # the next offset to read, per partition
        self.records = 0  # records read since `follow`
        self.unsigned = 0  # of them, records fencer did not sign (counted nothing)
        self.failures = 0  # failures since the tail last read (0: reading)
        # Rule 5 (module rule): the failing spell, timed on this process's monotonic clock.
        self._notify_after = notify_after  # None: gate.log_tail_notify_after of the settings
        self._renotify = renotify  # None: actuator.renotify_interval of the settings
        self._mono = mono
        self._unread_since: float | None = None  # when the tail last read (or began to)
        self._last_notice: float | None = None
        self._spell: int | None = None  # the failing spell's number, once it was noticed
        self.spells = 0  # failing spells that were noticed (in the notice ids)
        self.notices = 0  # notices sent in the current spell

    @property
    def running(self) -> bool:
        """Whether the tail reads (or retries)."""
        return self._task is not None and not self._task.done()

    def follow(self, position: LogPosition, latest: gatecore.Clocks | None = None) -> None:
        """Read the log from `position` on (the reconciliation's read ended there), forgetting
        what an earlier tail read. `latest` is the latest time each clock is known to have
        reached in that read (`fencing.gate.latest_known`): a decision of such a clock read
        later is aged against it too, so an old signed decision written to the log again (a
        replay) is as old as it is, and does not eat the budget for a whole window."""
        self.halt()
        self.position = dict(position)
        self._unread_since = self._mono()
        self._latest = {c: t for c, t in (latest or {}).items() if c != self.clock_id}
        self._task = asyncio.create_task(self._run(), name="fencer-gate-log-tail")
        log.info("gate: the decision log is tailed from %s", self.position or "the beginning")

    def halt(self) -> None:
        """Stop reading (the assignment changed) and forget what was read and not merged."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()  # (the task closes its consumer as it ends)
        self._kept, self._latest = [], {}
        self.position, self.records, self.unsigned, self.failures = {}, 0, 0, 0
        self._unread_since = self._last_notice = self._spell = None
        self.notices = 0

    async def stop(self) -> None:
        """`halt`, and wait for the consumer to be closed (the app's shutdown)."""
        task = self._task
        self.halt()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def read(self, now: float, window: float) -> tuple[tuple[gatecore.Logged, ...], LogPosition]:
        """What was read so far: the approved power-downs still in the window at `now`, on the
        gate's clock, and the position after the last record read. Never waits."""
        self._kept = [d for d in self._kept if now - d.at < window]
        return tuple(self._kept), dict(self.position)

    def merge(
        self,
        glob: gatecore.GlobalGate,
        merged_to: LogPosition,
        now: float,
        window: float,
        clock_id: str | None,
    ) -> tuple[gatecore.GlobalGate, LogPosition]:
        """`merge` of what was read so far into the shared row (streams.gating's hook); the row
        as it is while the tail does not run."""
        if self._task is None:
            return glob, merged_to
        logged, read_to = self.read(now, window)
        return merge(glob, merged_to, logged, read_to, now, window, clock_id)

    def on_record(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """One fence-decisions record read (the position moves past it, whatever it holds)."""
        self.position[record.partition] = record.offset + 1
        self.records += 1
        if record.value is None:
            return
        d = read_decision(self.runtime.keyring(), record)
        if not isinstance(d, FenceDecision):
            self.unsigned += 1  # the notifier reports it (forged_record); it counts nothing here
            log.debug(
                "gate: the decision log tail skipped an unsigned record at partition %d offset %d",
                record.partition,
                record.offset,
            )
            return
        if not (d.approved and d.action.powers_down and d.host.cluster_uuid):
            return
        logged = logged_of(d)
        if logged.clock_id != self.clock_id:
            if logged.at > self._latest.get(logged.clock_id, float("-inf")):
                self._latest[logged.clock_id] = logged.at
            at = gatecore.restamp(
                logged.at, logged.clock_id, self._latest, self._clock(), self.clock_id
            )
            logged = replace(logged, at=at, clock_id=self.clock_id)
            log.warning(
                "gate: decision %s of another clock (%s) read from the decision log after the "
                "reconciliation: a former owner published it late; it counts at the next "
                "judgement",
                logged.decision_id,
                d.decided_clock,
            )
        self._kept.append(logged)

    async def _run(self) -> None:
        topic = self.runtime.settings.kafka.topics.fence_decisions
        while True:
            wait = self.retry_first
            consumer: AIOKafkaConsumer | None = None
            try:
                consumer = AIOKafkaConsumer(
                    client_id="fencer-gate-log-tail",
                    enable_auto_commit=False,
                    auto_offset_reset="earliest",
                    fetch_max_wait_ms=FETCH_WAIT_MS,
                    **aiokafka_kwargs(self.runtime.settings),
                )
                await asyncio.wait_for(consumer.start(), self.check_every)
                await self._read(consumer, topic)
            except (asyncio.CancelledError, Exception) as exc:
                if isinstance(exc, asyncio.CancelledError) and _cancelled():
                    raise  # the tail's own cancellation (halt, stop): only it ends the tail
                # (aiokafka can raise the CancelledError of a task of its own, such as its fetch
                # task after a lost broker: the tail ended by it read nothing more, silently.)
                self.failures += 1
                wait = min(self.retry_first * 2 ** min(self.failures - 1, 10), RETRY_MAX)
                log.warning(
                    "gate: the decision log %s cannot be tailed (%s %s; failure %d in a row): "
                    "retried in %.0f s; the gate judges meanwhile with its rows and what was read",
                    topic,
                    type(exc).__name__,
                    exc,
                    self.failures,
                    wait,
                )
            finally:
                if consumer is not None:
                    await _close(consumer)
            if self.failures:
                await self._notify_if_due(topic)
            await asyncio.sleep(wait)

    async def _read(self, consumer: AIOKafkaConsumer, topic: str) -> None:
        parts: list[TopicPartition] = []
        while not parts:
            await asyncio.wait_for(consumer.topics(), self.check_every)  # refreshes the metadata
            parts = [
                TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
            ]
            if not parts:
                raise LookupError(f"no partitions of {topic}")
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        for tp in parts:
            if tp.partition in self.position:
                consumer.seek(tp, self.position[tp.partition])
        loop = asyncio.get_running_loop()
        checked = loop.time()
        if self.failures:
            log.info("gate: the decision log is connected again after %d failures", self.failures)
        # The fetch answers each partition's last one had when the tail last read.
        polled = {tp: consumer.last_poll_timestamp(tp) for tp in parts}
        answered: set[TopicPartition] = set()
        while True:
            batches = await consumer.getmany(timeout_ms=FETCH_WAIT_MS * 2)
            # A fetch answered without error stamps its partition (aiokafka's own stamp,
            # compared only with itself): every partition answered, or records returned, is a
            # read; anything else (a fetch dropped, failing, never answered) is not.
            answered |= {tp for tp in parts if consumer.last_poll_timestamp(tp) != polled[tp]}
            if batches or answered >= set(parts):
                polled = {tp: consumer.last_poll_timestamp(tp) for tp in parts}
                answered = set()
                self._has_read(topic)
            elif self._mono() - (self._unread_since or self._mono()) >= self._after():
                await self._notify_if_due(topic)
            for records in batches.values():
                for record in records:
                    try:
                        self.on_record(record)
                    except Exception:
                        # One bad record must not stop the tail (and counts nothing).
                        log.exception(
                            "gate: the decision log tail skipped %s[%d]@%d",
                            record.topic,
                            record.partition,
                            record.offset,
                        )
            if loop.time() - checked >= self.check_every:
                # aiokafka retries a lost broker inside getmany without a word: ask for the
                # metadata, which fails when no broker answers.
                await asyncio.wait_for(consumer.topics(), self.check_every)
                checked = loop.time()

    def _has_read(self, topic: str) -> None:
        """The tail read: the unread spell (its failures, its notices) ends here."""
        if self.failures:
            log.info("gate: the decision log is tailed again after %d failures", self.failures)
        if self.notices:
            log.warning(
                "gate: the decision log %s is read again (recovered) after %d "
                "decision_log_unread notice(s)",
                topic,
                self.notices,
            )
        self.failures, self.notices = 0, 0
        self._last_notice = self._spell = None
        self._unread_since = self._mono()

    def _after(self) -> float:
        """Seconds unread before the first notice (`gate.log_tail_notify_after`)."""
        after = self.runtime.current.gate.log_tail_notify_after
        return after if self._notify_after is None else self._notify_after

    async def _notify_if_due(self, topic: str) -> None:
        """Send the `decision_log_unread` notice when the tail has not read for
        `notify_after`, then every `renotify` while it still does not (module rule); a notice
        that could not be sent is tried again at the next failure, under the same id. Never
        raises."""
        now = self._mono()
        if self._unread_since is None:
            self._unread_since = now
        settings = self.runtime.current
        after = self._after()
        every = settings.actuator.renotify_interval if self._renotify is None else self._renotify
        failing = now - self._unread_since
        if failing < after:
            return
        if self._last_notice is not None and now - self._last_notice < every:
            return
        if self._spell is None:
            self.spells += 1
            self._spell = self.spells
        number = self.notices + 1
        why = (
            f"{self.failures} failed attempts since"
            if self.failures
            else "connected, but no fetch was answered"
        )
        notice = Notice(
            notice_id=f"decision-log-unread/{self.runtime.reminder_tag}/{self._spell}/{number}",
            kind=NoticeKind.DECISION_LOG_UNREAD,
            host=HostRef(host_uuid=f"topic:{topic}"),
            at=self._clock(),
            reason=(
                f"the gate has not read the decision log {topic} for {failing:.0f} s "
                f"({why}): a decision a stalled former gate "
                "owner publishes late does not count toward the fence caps until it reads "
                f"again (notice {number}, repeated every {every:.0f} s while it fails)"
            ),
        )
        log.error("gate: %s", notice.reason)
        try:
            await self._send(notice)
        except Exception as exc:
            log.error(
                "gate: cannot send notice %s (%s: %s): tried again at the next failure",
                notice.notice_id,
                type(exc).__name__,
                exc,
            )
            return
        self.notices, self._last_notice = number, now

    async def _send(self, notice: Notice) -> None:
        """Through the runtime's notice path; a worker without one (the ingest role alone,
        where the gate runs) writes it to the notices topic itself (aiokafka's own request
        timeouts bound it: a producer cancelled while it starts would be left open)."""
        if self.runtime.notice_sink is not None:
            await asyncio.wait_for(self.runtime.emit_notice(notice), self.check_every)
            return
        from streams.actuating import send_notice

        await send_notice(self.runtime.settings, notice)


def _cancelled() -> bool:
    """Whether the running task (the tail) is being cancelled."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


async def _close(consumer: AIOKafkaConsumer) -> None:
    """Stop `consumer`. aiokafka's stop after a lost broker can raise the CancelledError of
    its own fetch task: only a cancellation of the tail itself ends the tail."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
    except Exception as exc:
        log.debug("gate: the decision log tail's consumer stopped with %s", exc)
