"""The actuator's side of the safety rules, checked at the last moment before any BMC call.

Rule: the actuator obeys only a decision that (1) fencer's gate signed, (2) is fresh: read
live, and soon, on this worker's own clock (below), (3) fencer's own host record still backs
(same decision and episode, fence proposed or fencing, last evidence stale), (4) CloudStack
confirms *now* (Disconnected, Alert or Down, and resource state Enabled), and (5) this worker
has claimed in the fence-claims log. Nothing here decides to fence: it refuses, or lets a
decision the gate made through. A refusal is an outcome with `success: false` plus a
`fence_refused` notice and is never remembered as done, so a fresh re-sent decision is judged
again.

Fresh never compares two machines' clocks (the gate's `decided_at` is shown to people, never
compared with this worker's clock). This worker asks the broker for the end offset of every
fence-decisions partition every `sample_period` seconds, noting its own monotonic time *before*
each request (`DecisionLog`, `LogEdges`). A record at offset o reached the log after the last
sample whose end was <= o, so its age is at most now minus that sample's time, whoever's clock
stamped it. A record below the end of the first samples (the highest of two answers: one
answer too low must not make backlog look live) was on the topic before this worker began
listening (written while no actuator listened, or read again after a restart): it is refused
as "not read live", nothing done; the core sends the host back to checking and its next
stale check proposes again under the same decision id, which this worker then reads live. A
live record older than `decision_max_age` by this bound (the actuator lagged, or stalled
between reading and acting: the bound is checked again after the record and CloudStack checks)
is refused too. The bound overstates an age by at most one sample period. An end lower than
seen before is not believed once (a broker answering wrongly); lower in every one of three
samples in a row, it is a new log (fence-decisions deleted and recreated): that partition
starts again as at a first sample, and people are told once (`LogEdges`, `NewLog`).

Exactly once: the claim is a record on the one-partition topic `fencer.fence-claims`, keyed by
decision id, signed with the keyring and written with `acks=all` before the BMC is touched
(a claim no held key signed is ignored: streams.claims); the log's order decides
between two claimants (the first `claimed` record of a round wins, the other waits for its
`done`). The claimant renews its claim every `actuator.claim_lease` / 3 while it acts; a claim
neither renewed nor done for `claim_lease` (this worker's clock) belongs to a claimant that died:
the follower re-checks CloudStack and fencer's record, then reads the power first (stop: off
already = fenced; reboot: never repeated blindly, only an "off" reading counts).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka import ConsumerRecord
from pydantic import ValidationError

from fencing.events import NoticeKind
from fencing.records import (
    FenceDecision,
    FenceOutcome,
    HostRef,
    HostStateRecord,
    Notice,
)
from fencing.settings import Driver, FencerSettings, RestartVia
from fencing.signing import DECISION, Keyring, SignatureError, verify_bytes

# Claimed once (check 5) lives in streams.claims, with the refusal every check raises.
from streams.claims import ClaimLog, NotNow

__all__ = ["ClaimLog", "NotNow"]

log = logging.getLogger("fencer.actuation")

DOWN_STATES = frozenset({"Disconnected", "Alert", "Down"})
BACKED_STATES = frozenset({"fence_proposed", "fencing"})
RECORD_WAIT = 10.0  # seconds the host-states view may lag behind the decision it produced
CLOUDSTACK_TRIES = 3


HostLookup = Callable[[str], Awaitable[Any]]  # host uuid -> an object with state, resourcestate


# ---------------------------------------------------------------------------------------------
# 1. Signed: fencer's gate wrote it


@dataclass(frozen=True)
class Forged:
    """A fence-decisions record that fencer's gate did not sign."""

    reason: str
    claimed_host: str | None
    decision_id: str | None


def _claimed(value: bytes | None) -> tuple[str | None, str | None]:
    try:
        data = json.loads(value or b"")
        host = data.get("host", {}).get("host_uuid")
        did = data.get("decision_id")
        return (str(host)[:100] if host else None, str(did)[:200] if did else None)
    except (ValueError, AttributeError, TypeError):
        return None, None


def read_decision(ring: Keyring, message: Any) -> FenceDecision | Forged:
    """The decision a fence-decisions record carries, if the gate signed all of it."""
    claimed, did = _claimed(message.value)
    try:
        body = verify_bytes(ring, DECISION, message.value)
    except SignatureError as exc:
        return Forged(str(exc), claimed, did)
    try:
        decision = FenceDecision.model_validate(body)
    except ValidationError:
        return Forged("signed, but not a fence decision", claimed, did)
    key = message.key.decode("utf-8", "replace") if message.key else None
    if key != decision.host.host_uuid:
        return Forged(f"record key {key!r} is not the signed host", claimed, did)
    return decision


def forged_notice(message: Any, forged: Forged, now: float) -> Notice:
    """The forged_record notice for a record fencer did not sign."""
    where = f"{message.topic} partition {message.partition} offset {message.offset}"
    return Notice(
        notice_id=f"forged/{message.topic}/{message.partition}/{message.offset}",
        kind=NoticeKind.FORGED_RECORD,
        host=HostRef(host_uuid=forged.claimed_host or "unknown"),
        at=now,
        decision_id=forged.decision_id,
        reason=f"refused {where} ({forged.reason}); it names host {forged.claimed_host}",
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        claimed_host=forged.claimed_host,
    )


# ---------------------------------------------------------------------------------------------
# 2-4. Fresh, backed by fencer's own record, confirmed by CloudStack now


@dataclass(frozen=True)
class NewLog:
    """A partition whose end went lower than seen before in `samples` answers in a row: a new
    log (the topic deleted and recreated), started again from `end`."""

    partition: int
    was: int  # the highest end seen on the old log
    end: int  # the new log's baseline: records below it are backlog
    samples: int


@dataclass
class LogEdges:
    """Each fence-decisions partition's end offset as this worker saw it, on its own monotonic
    clock (pure: the samples arrive from `DecisionLog`). `samples[p]` holds (time, end) pairs,
    ends rising; of a run of equal ends only the latest time is kept (it bounds best).

    The baseline (`first`: records below it are backlog) is the highest of the first `settle`
    answers: one answer too low would make backlog look appended while listening, so nothing
    is read live before `settle` answers came. An answer lower than seen before is not
    believed (a broker answering wrongly once must not make older records look new); lower
    answers in every one of `new_log_after` samples in a row mean a new log (the topic deleted
    and recreated): the partition starts again as at a first sample, from the highest of those
    answers (what is on the new log then is backlog, what is appended after is live)."""

    retention: float = 600.0  # seconds of samples kept (the live decision_max_age raises it)
    settle: int = 2  # answers that make the baseline, the highest of them
    new_log_after: int = 3  # lower answers in a row that mean a new log
    samples: dict[int, list[tuple[float, int]]] = field(default_factory=dict)
    first: dict[int, int] = field(default_factory=dict)  # the baseline (see above)
    answers: dict[int, int] = field(default_factory=dict)  # answers since the baseline began
    low: dict[int, list[tuple[float, int]]] = field(default_factory=dict)  # lower, in a row

    def note(self, partition: int, end: int, at: float) -> NewLog | None:
        """The broker answered `end` to a request sent at `at` (this worker's monotonic clock);
        a `NewLog` when this answer made the partition start again."""
        seen = self.samples.get(partition)
        if seen is None:
            self.samples[partition] = [(at, end)]
            self.first[partition] = end
            self.answers[partition] = 1
            self.low[partition] = []
            return None
        if self.answers[partition] < self.settle:
            self.answers[partition] += 1
            self.first[partition] = max(self.first[partition], end)
        low = self.low[partition]
        if end < seen[-1][1]:
            # Lower than seen before: a broker answering too low once (not believed: starting
            # again from it would make older records look new; kept as is, a record below what
            # was seen is backlog or too old, refused either way), or a new log if it lasts.
            low.append((at, end))
            if len(low) < self.new_log_after:
                return None
            top = max(e for _, e in low)
            since = max(t for t, e in low if e == top)
            new = NewLog(partition, seen[-1][1], top, len(low))
            self.samples[partition] = [(since, top)]
            self.first[partition] = top
            self.answers[partition] = len(low)
            self.low[partition] = []
            return new
        low.clear()
        if end == seen[-1][1]:
            seen[-1] = (at, end)
        else:
            seen.append((at, end))
        while len(seen) > 1 and seen[1][0] < at - self.retention:
            del seen[0]
        return None

    def settled(self, partition: int) -> bool:
        """Whether the partition's baseline is made (`settle` answers came)."""
        return self.answers.get(partition, 0) >= self.settle

    def age(self, partition: int, offset: int, now: float) -> float | None:
        """At most how long ago the record at `offset` reached the log (or at least, when more
        than `retention`), on this worker's clock; None if it was there before the baseline
        (backlog), or the baseline is not settled yet."""
        seen = self.samples.get(partition)
        if seen is None or not self.settled(partition) or offset < self.first[partition]:
            return None
        before = [t for t, end in seen if end <= offset]
        return now - (before[-1] if before else seen[0][0])


def check_live(
    edges: LogEdges,
    partition: int,
    offset: int,
    max_age: float,
    now: float,
    what: str = "decision",
) -> float:
    """Raise NotNow unless the record (a `what`) at (`partition`, `offset`) was appended
    while this worker listened, at most `max_age` ago on its monotonic clock `now`; the age
    bound."""
    edges.retention = max(edges.retention, 3 * max_age)
    age = edges.age(partition, offset, now)
    if age is None:
        again = "; the host's next stale check proposes it again" if what == "decision" else ""
        if partition in edges.samples and not edges.settled(partition):
            raise NotNow(
                f"not read live: the {what} (partition {partition} offset {offset}) came before "
                f"this actuator knew where the log ended when it began reading it{again}"
            )
        raise NotNow(
            f"not read live: the {what} (partition {partition} offset {offset}) was on the "
            f"topic before this actuator began reading it{again}"
        )
    if age > max_age:
        raise NotNow(
            f"the {what} reached the log up to {age:.0f} s ago by this actuator's clock "
            f"(decision_max_age {max_age:g} s): the actuator lagged or stalled"
        )
    return age


class DecisionLog:
    """Samples the end offsets of the partitions of `topic` (default fence-decisions; the
    operator-actions topic too) every `period` seconds into `edges` (the time noted before
    each request): no consumer group, nothing consumed."""

    def __init__(
        self,
        settings: FencerSettings,
        period: float,
        clock: Callable[[], float] = time.monotonic,
        topic: str | None = None,
    ) -> None:
        self.settings = settings
        self.topic = topic or settings.kafka.topics.fence_decisions
        self.period = period
        self.clock = clock
        self.edges = LogEdges(retention=max(600.0, 3 * settings.decision_max_age()))
        # Where a new log is told (the runtime's emit_notice; Actuation.notify_to).
        self.notify: Callable[[Notice], Awaitable[None]] | None = None
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    async def start(self, within: float = 30.0) -> None:
        """Connect and take the first samples (`LogEdges.settle`, a short pause apart): records
        below the highest answer are backlog."""
        from aiokafka import AIOKafkaConsumer

        from streams.kafka import aiokafka_kwargs

        consumer = AIOKafkaConsumer(
            client_id="fencer-actuate-decision-log",
            enable_auto_commit=False,
            **aiokafka_kwargs(self.settings),
        )
        self._consumer = consumer
        try:
            async with asyncio.timeout(within):
                await consumer.start()
                while not consumer.partitions_for_topic(self.topic):
                    await consumer.topics()  # refreshes the metadata
                    if not consumer.partitions_for_topic(self.topic):
                        await asyncio.sleep(0.2)
                await self.sample()
                for _ in range(1, self.edges.settle):
                    await asyncio.sleep(min(self.period, 0.2))
                    await self.sample()
        except BaseException:
            await self.stop()
            raise
        self._task = asyncio.create_task(self._run(), name="fencer-decision-log")
        ends = dict(sorted(self.edges.first.items()))
        log.info(
            "actuator listening: %s records from end offsets %s on are read live", self.topic, ends
        )

    async def sample(self) -> None:
        """Ask the end offset of every partition once; note it at the time asked."""
        from aiokafka import TopicPartition

        parts = self._consumer.partitions_for_topic(self.topic) or set()
        tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        at = self.clock()
        ends = await self._consumer.end_offsets(tps)
        for tp, end in ends.items():
            new = self.edges.note(tp.partition, end, at)
            if new is not None:
                await self._new_log(new)

    async def _new_log(self, new: NewLog) -> None:
        """Tell people (once) that a partition started again: its records before the new
        baseline are refused as not read live, those appended after are read live."""
        reason = (
            f"the end of {self.topic} partition {new.partition} went lower ({new.was} -> "
            f"{new.end}) in {new.samples} samples in a row: a new log (the topic deleted and "
            f"recreated?). The actuator started that partition again: records up to offset "
            f"{new.end} are refused as not read live, records appended from now on are read "
            "live (if the broker answers wrongly instead, check the broker)"
        )
        log.warning("%s", reason)
        if self.notify is None:
            return
        notice = Notice(
            notice_id=f"new-log/{self.topic}/{new.partition}/{new.was}/{new.end}/{time.time():.0f}",
            kind=NoticeKind.FENCE_REFUSED,
            host=HostRef(host_uuid="unknown"),
            at=time.time(),
            reason=reason,
            topic=self.topic,
            partition=new.partition,
            offset=new.end,
        )
        try:
            await self.notify(notice)
        except Exception as exc:  # the warning above stands; the sampling goes on
            log.error("cannot send the new-log notice of %s: %s", self.topic, exc)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            try:
                async with asyncio.timeout(max(self.period * 4, 10.0)):
                    await self.sample()
                if self._failing:
                    log.info("the end offsets of %s are read again", self.topic)
                self._failing = False
            except (asyncio.CancelledError, Exception) as exc:
                if isinstance(exc, asyncio.CancelledError) and _cancelled():
                    raise  # the sampler's own stop
                # Decisions then look older and older: refused, never taken for fresh. (A
                # CancelledError of aiokafka's own, after a lost broker, ended the sampler for
                # good: every later decision refused as lagged until a restart.)
                if not self._failing:
                    log.warning("cannot read the end offsets of %s: %s", self.topic, exc)
                self._failing = True

    async def stop(self) -> None:
        from streams.topic_reader import stop_tailing

        task, consumer = self._task, self._consumer
        self._task, self._consumer = None, None
        await stop_tailing(task, consumer)


def _cancelled() -> bool:
    """Whether the running task is being cancelled (not a CancelledError of aiokafka's own)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def sample_period(max_age: float) -> float:
    """How often the end offsets are asked: a tenth of the age limit, within 0.2 s to 5 s."""
    return min(5.0, max(0.2, max_age / 10))


def check_record(decision: FenceDecision, row: Mapping[str, Any] | None) -> None:
    """Raise NotNow unless fencer's host record still stands behind this decision."""
    if row is None:
        raise NotNow("fencer has no record of this host on the host-states topic")
    rec = row.get("record") or {}
    if rec.get("decision_id") != decision.decision_id or rec.get("episode") != decision.episode:
        raise NotNow(
            f"fencer's record of the host is at decision {rec.get('decision_id')} episode "
            f"{rec.get('episode')}, not this one"
        )
    if rec.get("state") not in BACKED_STATES:
        raise NotNow(f"fencer's record of the host is {rec.get('state')}, not fence_proposed")
    if rec.get("last_evidence") != "stale":
        raise NotNow(f"the host's last check is {rec.get('last_evidence')}, not stale")


# The resource state fencer's own call to restart the VMs leaves a host in (fencing.restart).
LEFT_BY_RESTART = {
    RestartVia.DECLARE_DEGRADED: frozenset({"Degraded"}),
    RestartVia.MAINTENANCE: frozenset({"PrepareForMaintenance", "Maintenance"}),
    RestartVia.NONE: frozenset(),
}


def check_cloudstack(state: str, resourcestate: str, also: frozenset[str] = frozenset()) -> None:
    """Raise NotNow unless CloudStack's answer allows a fence: down and Enabled (or one of the
    resource states `also` allows: see `after_claim` in `Actuation.last_moment`)."""
    if state not in DOWN_STATES:
        raise NotNow(f"CloudStack says the host is {state or 'unknown'} now")
    if resourcestate != "Enabled" and resourcestate not in also:
        raise NotNow(f"CloudStack says the host's resource state is {resourcestate or 'unknown'}")


@dataclass
class HostStatesView:
    """The latest fencer.host-states record of every host, read from the topic's beginning."""

    settings: FencerSettings
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    _reader: Any = None

    async def start(self, within: float = 30.0) -> None:
        from streams.topic_reader import TopicReader

        self._reader = TopicReader(
            self.settings,
            [self.settings.kafka.topics.host_states],
            self._on_record,
            client_id="fencer-actuate-host-states",
        )
        await self._reader.start(within)

    def _on_record(self, record: ConsumerRecord[bytes, bytes]) -> None:
        if record.key is None:
            return
        key = record.key.decode()
        if record.value is None:
            self.rows.pop(key, None)
            return
        r = HostStateRecord.model_validate_json(record.value)
        self.rows[key] = {"record": r.record, "host": r.host.model_dump()}

    async def stop(self) -> None:
        if self._reader is not None:
            await self._reader.stop()


# ---------------------------------------------------------------------------------------------
# Everything together, for the actuate agent


def refusal(decision: FenceDecision, reason: str, now: float) -> FenceOutcome:
    """The outcome of a decision the last-moment checks refused."""
    return FenceOutcome(
        decision_id=decision.decision_id,
        host=decision.host,
        episode=decision.episode,
        action=decision.action,
        driver="none",
        success=False,
        started_at=now,
        finished_at=now,
        attempts=0,
        error=f"refused: {reason}",
        refused=True,
    )


def refused_notice(
    decision: FenceDecision,
    reason: str,
    now: float,
    period: float = 3600.0,
    mono: float | None = None,
    tag: str = "",
) -> Notice:
    """The fence_refused notice of a refusal: one per decision, kind of reason and `period`
    (the renotify interval). A refused fence is tried again about every check interval while
    the reason lasts, and a decision read again after a restart is refused again: the notice
    id (its reason without the figures, the period) lets the notifiers tell people once a
    period, not at every try.

    The period is counted on `mono` (this process's monotonic clock) when given, with `tag`
    (unique to the process) in the id: counted on the wall clock `now`, a step back of hours
    made every period's id one already sent while a reason lasted (dropped by the notify
    table: silence for as long as the step). `now` is shown only."""
    kind = hashlib.sha256(re.sub(r"[0-9.+-]+", "#", reason).encode()).hexdigest()[:12]
    slot = f"{int((now if mono is None else mono) // max(period, 1.0))}"
    if tag:
        slot = f"{tag}-{slot}"
    return Notice(
        notice_id=f"{decision.host.host_uuid}/{decision.decision_id}/refused/{kind}/{slot}",
        kind=NoticeKind.FENCE_REFUSED,
        host=decision.host,
        at=now,
        action=decision.action,
        decision_id=decision.decision_id,
        reason=reason,
        evidence=decision.evidence,
    )


class Actuation:
    """The actuate role's checks and claims around `fencing.actuator.Actuator`."""

    def __init__(
        self,
        settings: FencerSettings,
        ring: Keyring,
        worker: str,
        cloudstack_host: Callable[[str], Awaitable[Any]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.ring = ring
        self.cloudstack_host = cloudstack_host
        self.clock = clock  # monotonic: only ever compared with itself
        self.states = HostStatesView(settings)
        self.claims = ClaimLog(settings, worker, ring)
        period = sample_period(settings.decision_max_age())
        self.decisions = DecisionLog(settings, period, clock)
        # An operator's lift that names no blocklist entry is carried out only if read live.
        self.actions = DecisionLog(settings, period, clock, settings.kafka.topics.operator_actions)
        self._started = False

    def notify_to(self, send: Callable[[Notice], Awaitable[None]]) -> None:
        """Where the end-offset samplers tell people of a new log (the runtime's emit_notice)."""
        self.decisions.notify = send
        self.actions.notify = send
        self.claims.notify = send  # a forged or foreign claim, ignored, is told

    async def start(self) -> None:
        if not self._started:
            try:
                await self.states.start()
                await self.claims.start()
                # Last: a decision the views above may lag behind is not taken for backlog.
                await self.decisions.start()
                await self.actions.start()
            except BaseException:
                await self.states.stop()
                await self.claims.stop()
                await self.decisions.stop()
                await self.actions.stop()
                raise
            self._started = True

    async def stop(self) -> None:
        if self._started:
            await self.states.stop()
            await self.claims.stop()
            await self.decisions.stop()
            await self.actions.stop()

    def check_fresh(self, live: FencerSettings, position: tuple[int, int] | None) -> float:
        """Raise NotNow unless the decision at `position` (partition, offset on
        fence-decisions) was read live, at most decision_max_age ago (this worker's clock)."""
        if position is None:
            raise NotNow("the decision's place in the log is unknown: its age cannot be told")
        edges = self.decisions.edges
        return check_live(edges, *position, live.decision_max_age(), self.clock())

    async def last_moment(
        self,
        decision: FenceDecision,
        live: FencerSettings,
        fresh: bool = True,
        position: tuple[int, int] | None = None,
        after_claim: bool = False,
    ) -> None:
        """Raise NotNow with the reason unless every last-moment check passes.

        `position` is the decision's (partition, offset) on fence-decisions: read live and
        within decision_max_age, checked first and again once the record and CloudStack
        agreed (time spent here counts). `fresh=False` skips it: a takeover follows a claim
        that passed it, and waiting out the dead claimant's lease must not turn the decision
        down by itself.

        `after_claim`: the decision has a claim without its `done` (a claimant that may have
        acted, then died before writing it): CloudStack may also show the resource state the
        host's own restart call leaves (Degraded for declareHostAsDegraded). Refused for it, a
        fence carried out by a claimant that died before its `done` was refused at every
        re-proposal: never an outcome, people told "refused" about a host fenced and its VMs
        restarted. The claim log then lets one worker take over, the power read first (off:
        fenced, the restart call answers "already done"; a reboot never repeated blindly)."""
        if fresh:
            self.check_fresh(live, position)
        check_not_paused(decision, live)
        eff = live.effective_ipmi(decision.host.host_uuid, decision.host.cluster_uuid)
        also = LEFT_BY_RESTART[RestartVia(eff.values.restart_via)] if after_claim else frozenset()
        if eff.values.driver is Driver.FAKE and not live.lab:
            # A settings-topic record can choose a driver the file check never saw.
            raise NotNow("driver fake powers off nothing: allowed only with lab: true")
        deadline = time.monotonic() + RECORD_WAIT
        while True:
            try:
                check_record(decision, self.states.rows.get(decision.host.host_uuid))
                break
            except NotNow:
                # The view may lag behind the record that produced this decision.
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.2)
        await cloudstack_confirms(decision, self.cloudstack_host, also)
        if fresh:
            age = self.check_fresh(live, position)
            log.info(
                "decision %s read live: reached the log at most %.1f s ago (this worker's clock)",
                decision.decision_id,
                age,
            )

    async def cloudstack_confirms(self, decision: FenceDecision) -> None:
        """Raise NotNow unless CloudStack says now: Disconnected/Alert/Down and Enabled."""
        await cloudstack_confirms(decision, self.cloudstack_host)

    def recheck(self, decision: FenceDecision) -> CloudStackRecheck:
        """The CloudStack check asked again before each power-down command (`fencing.engine`):
        see `recheck`."""
        return recheck(decision, self.cloudstack_host, self.clock)


RECHECK_AFTER = 5.0  # seconds (this worker's monotonic clock) a CloudStack "down" is taken as now


def check_not_paused(decision: FenceDecision, live: FencerSettings) -> None:
    """Raise NotNow when the decision's cluster is paused in `live` (review4: a pause pressed
    after the gate signed a decision did not stop it; the gate honours a pause only for the
    decisions it makes after it). Resumed, the next stale check proposes again and the gate
    decides anew."""
    cluster = decision.host.cluster_uuid
    c = live.clusters.get(cluster) if cluster else None
    if c is not None and c.paused:
        raise NotNow(
            f"fencing is paused for the host's cluster {cluster} (paused after the decision)"
        )


class CloudStackRecheck:
    """CloudStack asked again before a power-down command, unless it confirmed the host down
    less than `RECHECK_AFTER` seconds ago (`confirmed()` notes a confirmation made elsewhere).

    The last-moment check is made once before the claim; a fence then retries its BMC for up
    to `actuator.fence_deadline` (minutes). A host CloudStack sees back in the meantime (the
    network that cut it off healed) must not be powered off by the next retry: NotNow, the
    claim is released and the decision refused (or, after an off was sent, the fence fails
    without a VM restart). The first command, moments after the last-moment check, costs no
    extra call."""

    def __init__(
        self, decision: FenceDecision, ask: HostLookup, clock: Callable[[], float]
    ) -> None:
        self.decision, self.ask, self.clock = decision, ask, clock
        self.at: float | None = None
        self.also: frozenset[str] = frozenset()  # resource states allowed too (check_cloudstack)
        # Why fencing is paused now (None: it is not), asked before every command too: a pause
        # pressed during a fence's BMC retries stops the next power-down command.
        self.paused: Callable[[], str | None] = lambda: None

    def confirmed(self, also: frozenset[str] | None = None) -> None:
        self.at = self.clock()
        if also is not None:
            self.also = also

    async def __call__(self) -> None:
        why = self.paused()
        if why is not None:
            raise NotNow(f"{why} (asked again before the power command)")
        if self.at is not None and self.clock() - self.at < RECHECK_AFTER:
            return
        try:
            await cloudstack_confirms(self.decision, self.ask, self.also)
        except NotNow as exc:
            raise NotNow(f"{exc} (asked again before the power command)") from None
        self.confirmed()


def recheck(
    decision: FenceDecision, ask: HostLookup, clock: Callable[[], float] = time.monotonic
) -> CloudStackRecheck:
    """A `CloudStackRecheck` of the decision's host, CloudStack asked through `ask`."""
    return CloudStackRecheck(decision, ask, clock)


async def operator_checks(decision: FenceDecision, live: FencerSettings, ask: HostLookup) -> None:
    """An operator's retry: no age or record check (the operator decided), but never driver
    fake outside the lab and never a host CloudStack does not show down and Enabled now."""
    eff = live.effective_ipmi(decision.host.host_uuid, decision.host.cluster_uuid)
    if eff.values.driver is Driver.FAKE and not live.lab:
        raise NotNow("driver fake powers off nothing: allowed only with lab: true")
    await cloudstack_confirms(decision, ask)


async def cloudstack_confirms(
    decision: FenceDecision, ask: HostLookup, also: frozenset[str] = frozenset()
) -> None:
    """Raise NotNow unless CloudStack says now: Disconnected/Alert/Down and Enabled (or a
    resource state in `also`)."""
    last_error = ""
    for attempt in range(CLOUDSTACK_TRIES):
        try:
            host = await ask(decision.host.host_uuid)
        except Exception as exc:
            last_error = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("cannot ask CloudStack about %s: %s", decision.host.host_uuid, last_error)
            await asyncio.sleep(1.0 + attempt)
            continue
        check_cloudstack(host.state, host.resourcestate, also)
        return
    raise NotNow(f"CloudStack cannot be asked now ({last_error}); not a yes")
