"""What the actuate and operator agents do with the runtime's services.

Rule: a BMC is driven only for a decision fencer's gate signed, that is fresh, backed by fencer's
own host record, confirmed by CloudStack now and claimed once (the checks are
streams.actuation; the BMC calls fencing.actuator), or for an operator's retry that CloudStack
still confirms. Every outcome is stored in the `actuated` table (streams.tables).

Nothing stalls silently (rule 5): a fence is cut in its process at actuator.fence_deadline +
cloudstack.job_timeout (`bounded`: a failed outcome "timed out", its retry reads the power
first); outcome and notice sends are retried in place (`send_out`); the VMs of a fenced host are
followed again after a restart (`resume_follows`); a failed fence of a host CloudStack no longer
lists ends its reminders with a last notice (`reminders_of_listed_hosts`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from fencing.events import FenceAction, NoticeKind
from fencing.records import (
    FenceDecision,
    FenceOutcome,
    HostRef,
    IpmiTestAnswer,
    Notice,
    OperatorAction,
)
from fencing.settings import FencerSettings
from notifiers.render import iso_utc
from streams.codec import Out, dead_letter, dump
from streams.tables import done_entry, failed_fence, put_entry

if TYPE_CHECKING:
    from fencing.preflight import PreflightSchedule
    from streams.runtime import Runtime

log = logging.getLogger("fencer.streams")


async def actuate(rt: Runtime, message: Any, table: MutableMapping[str, Any]) -> list[Out]:
    """A fence-decisions record -> what to send: the outcome (and a notice), or nothing.

    Only a decision fencer's gate signed, fresh (read live, and soon, on this worker's own
    clock), backed by fencer's own host record, confirmed by CloudStack now and claimed once
    is carried out (streams.actuation). A decision already carried out is answered with its
    outcome before anything else, also when read again after a restart."""
    from fencing.settings import RestartVia
    from streams.actuation import (
        LEFT_BY_RESTART,
        Forged,
        NotNow,
        forged_notice,
        read_decision,
        refusal,
        refused_notice,
    )

    topics = rt.settings.kafka.topics
    act = await rt.actuation()
    parsed = read_decision(act.ring, message)
    if isinstance(parsed, Forged):
        log.error(
            "REFUSED a fence-decisions record fencer did not sign (%s partition %s offset %s, "
            "names host %s): %s",
            message.topic,
            message.partition,
            message.offset,
            parsed.claimed_host,
            parsed.reason,
        )
        notice = forged_notice(message, parsed, time.time())
        return [
            (topics.notices, notice.host.host_uuid.encode(), dump(notice)),
            (topics.dead_letter, b"", dead_letter(message, f"forged record: {parsed.reason}")),
        ]
    decision = parsed
    if not decision.approved:
        return []
    key = decision.host.host_uuid
    actuator = rt.actuator()
    live = await rt.live()
    actuator.settings = live
    pins = await rt.bmc_pins()
    actuator.pins = pins
    actuator.announce = getattr(pins, "send_notice", None)
    done = dict(table.get(key) or {})
    first = done.get(decision.decision_id)
    claimed = act.claims.done(decision.decision_id)
    if first is None and claimed is not None and claimed.outcome is not None:
        first = claimed.outcome
    if first is not None:
        log.info("decision %s already carried out: not acting again", decision.decision_id)
        return [(topics.fence_outcomes, key.encode(), dump(FenceOutcome.model_validate(first)))]
    # CloudStack asked again before each power-down command a fence sends later (its retries
    # run for minutes): a host back meanwhile is not powered off (streams.actuation).
    again = act.recheck(decision)
    again.paused = partial(pause_reason, rt, decision)
    # A claim without its `done`: its claimant may have acted (CloudStack shows the resource
    # state its restart call left) and died; the claim log settles it (streams.actuation).
    unfinished = bool(act.claims.open_claims(decision.decision_id))
    try:
        # Read live and soon on this worker's clock: the record's place in its partition.
        position = (message.partition, message.offset)
        why = pause_reason(rt, decision)
        if why is not None:
            raise NotNow(why)
        await act.last_moment(decision, live, position=position, after_claim=unfinished)
        again.confirmed()

        async def run(takeover: bool) -> FenceOutcome:
            if takeover:
                # Time passed while the dead claimant's lease ran out: ask again.
                await act.last_moment(decision, live, fresh=False, after_claim=True)
                eff = live.effective_ipmi(key, decision.host.cluster_uuid).values
                again.confirmed(LEFT_BY_RESTART[RestartVia(eff.restart_via)])
            return await bounded(
                rt, decision, lambda: carry_out(rt, decision, takeover, again), live
            )

        outcome, _acted = await act.claims.run_once(decision, live.actuator.claim_lease, run)
    except NotNow as exc:
        now = time.time()
        log.warning(
            "host %s: decision %s REFUSED at the last moment: %s",
            decision.host.host_name or key,
            decision.decision_id,
            exc,
        )
        n = refused_notice(
            decision,
            str(exc),
            now,
            live.actuator.renotify_interval,
            mono=time.monotonic(),
            tag=rt.reminder_tag,
        )
        return [
            (topics.fence_outcomes, key.encode(), dump(refusal(decision, str(exc), now))),
            (topics.notices, key.encode(), dump(n)),
        ]
    put_entry(table, key, decision.decision_id, entry_of(decision, outcome))
    return [(topics.fence_outcomes, key.encode(), dump(outcome))]


# Seconds a fence cut at its bound is given to end once cancelled (its BMC call's thread, the
# driver's logout) before the timed-out outcome goes on without it.
CANCEL_GRACE = 5.0
TIMED_OUT = "timed out"  # the start of a timed-out outcome's error (`bounded`)


def pause_reason(rt: Runtime, decision: FenceDecision) -> str | None:
    """Why fencing is paused now for the decision's host (None: it is not): the global pause
    (kept by the settings store only) or its cluster's. Asked before the claim and before every
    power-down command (review4: a pause pressed after the gate signed a decision stopped
    nothing, its BMC retries included)."""
    if rt.globally_paused():
        return "fencing is paused for every cluster (paused after the decision)"
    cluster = decision.host.cluster_uuid
    if cluster and rt.cluster_paused(cluster):
        return f"fencing is paused for the host's cluster {cluster} (paused after the decision)"
    return None


def fence_bound(live: FencerSettings) -> float:
    """Seconds one fence may take in its process, all of it: its BMC retries
    (actuator.fence_deadline) and its restart call's job (cloudstack.job_timeout). A follower
    waits that and two leases more before it takes a renewed claim over (streams.claims)."""
    return live.actuator.fence_deadline + live.cloudstack.job_timeout


async def bounded(
    rt: Runtime,
    decision: FenceDecision,
    work: Callable[[], Awaitable[FenceOutcome]],
    live: FencerSettings | None = None,
) -> FenceOutcome:
    """`work()` (the fence), cut at `fence_bound`: a BMC call, a CloudStack job wait or a
    verification that hangs must not hold the claim (its renewals alive) for ever with nobody
    told. Cut, the fence is cancelled and ends in a failed outcome whose error starts with
    "timed out" (stored and sent like any failure: a fence_failed notice, then reminders): the
    VMs are not restarted by it (a cancelled fence never reaches its restart call, and one made
    before came after a verified power-off), and a retry reads the power first (`entry_of`: a
    reboot is never repeated blindly after an off that may have been sent). NotNow (withdrawn
    before any power command) and every other exception of `work` pass through."""
    live = live or rt.actuator().settings
    limit = fence_bound(live)
    started = time.time()
    task = asyncio.ensure_future(work())
    try:
        finished, _ = await asyncio.wait({task}, timeout=limit)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if finished:
        return task.result()
    task.cancel()
    ended, _ = await asyncio.wait({task}, timeout=CANCEL_GRACE)
    if not ended:
        log.error(
            "host %s: fence %s cut at %g s did not end %g s after it was cancelled: left "
            "running in the background",
            decision.host.host_name or decision.host.host_uuid,
            decision.decision_id,
            limit,
            CANCEL_GRACE,
        )
    elif not task.cancelled() and task.exception() is None:
        return task.result()  # it finished as it was cut: its own outcome stands
    log.error(
        "host %s: fence %s TIMED OUT: not ended within %g s (actuator.fence_deadline + "
        "cloudstack.job_timeout); cancelled, told as failed",
        decision.host.host_name or decision.host.host_uuid,
        decision.decision_id,
        limit,
    )
    eff = live.effective_ipmi(decision.host.host_uuid, decision.host.cluster_uuid)
    return FenceOutcome(
        decision_id=decision.decision_id,
        host=decision.host,
        episode=decision.episode,
        action=decision.action,
        driver=eff.values.driver.value,
        success=False,
        started_at=started,
        finished_at=time.time(),
        attempts=0,
        error=(
            f"{TIMED_OUT}: the fence did not end within {limit:g} s (actuator.fence_deadline + "
            "cloudstack.job_timeout: a BMC call, a verification or a CloudStack job hung) and "
            "was cancelled; a power command may have been sent, so the power state is unknown "
            "and no VM restart follows this run; a retry reads the power first (a reboot is "
            "never repeated blindly)"
        ),
    )


def entry_of(decision: FenceDecision, outcome: FenceOutcome) -> dict[str, Any]:
    """The `actuated` entry of an outcome (`done_entry`); a timed-out one is marked
    `timed_out`, so an operator's retry reads the power first (`operator_action`)."""
    entry = done_entry(decision, outcome)
    if not outcome.success and (outcome.error or "").startswith(TIMED_OUT):
        entry["timed_out"] = True
    return entry


async def operator_action(
    rt: Runtime,
    action: OperatorAction,
    table: MutableMapping[str, Any],
    key: str,
    position: tuple[int, int] | None = None,
    stamp: int | None = None,
) -> FenceOutcome | None:
    """An operator's retry (runs the failed decision again; the new outcome), handled
    (stops the reminders; None) or lift_blocklist (lift_blocklist; None).

    `position` is the record's (partition, offset) on operator-actions and `stamp` its Kafka
    timestamp (`record_stamp`). A retry marks its entry `retry` = [partition, offset,
    "started", stamp] before it acts and "done" with its outcome, so the same record read again
    after a restart (at least once) is not run twice: done (or overtaken by a later record) ->
    skipped; started but not done (the worker died mid-way) -> carried out as a takeover, the
    power read first (a reboot is never repeated blindly). A record of a recreated topic is not
    taken for one read again (`read_again`)."""
    if action.kind == "lift_blocklist":
        await lift_once(rt, action, table, key, position, stamp)
        return None
    target = failed_fence(dict(table.get(key) or {}), action.decision_id)
    if target is None:
        log.warning(
            "operator %s for host %s: no failed fence %s to act on",
            action.kind,
            key,
            action.decision_id or "(latest)",
        )
        return None
    decision_id, entry = target
    if action.kind == "handled":
        put_entry(
            table, key, decision_id, {**entry, "handled_at": action.at, "handled_by": action.by}
        )
        log.info("fence %s marked handled by %s", decision_id, action.by or "an operator")
        return None
    if "decision" not in entry:
        log.warning("fence %s cannot be retried: its decision was not kept", decision_id)
        return None
    from streams.actuation import NotNow, operator_checks, recheck, refusal

    mark = entry.get("retry")
    verdict, detail = await judge_mark(rt, mark, position, stamp)
    if verdict == "unknown":
        why = unknown_reason("retry", position, detail)
        log.error("fence %s: operator retry NOT carried out: %s", decision_id, why)
        return refusal(FenceDecision.model_validate(entry["decision"]), why, time.time())
    stage = _retry_stage(mark, position, verdict)
    if stage == "done":
        log.info(
            "operator retry of fence %s at offset %s read again: already run, skipped",
            decision_id,
            position[1] if position else "?",
        )
        return None
    decision = FenceDecision.model_validate(entry["decision"])
    actuator = rt.actuator()
    actuator.settings = await rt.live()
    log.info("fence %s retried by %s", decision_id, action.by or "an operator")
    marked = False
    try:
        # The operator is the authority on age and evidence; CloudStack must still agree.
        ask = lambda h: rt.inventory().host(h)  # noqa: E731
        await operator_checks(decision, actuator.settings, ask)
        again = recheck(decision, ask)
        again.confirmed()
        if position is not None:
            put_entry(
                table, key, decision_id, {**entry, "retry": _mark(position, "started", stamp)}
            )
            marked = True
        outcome: FenceOutcome | None
        if stage == "started" or entry.get("timed_out"):
            why = "was cut short by a restart" if stage == "started" else "timed out before"
            log.warning("operator retry of fence %s %s: reading the power first", decision_id, why)
            outcome = await bounded(
                rt, decision, lambda: carry_out(rt, decision, takeover=True, recheck=again)
            )
        else:
            outcome = await bounded(rt, decision, lambda: _sure(actuator.handle(decision, again)))
    except NotNow as exc:
        log.warning("fence %s: operator retry refused: %s", decision_id, exc)
        if marked and position is not None:
            # Refused before any power command (the recheck found the host back): this record
            # is handled; left "started", a restart would carry it out as a takeover.
            put_entry(table, key, decision_id, {**entry, "retry": _mark(position, "done", stamp)})
        return refusal(decision, str(exc), time.time())
    if outcome is not None:
        done = {**entry_of(decision, outcome), "retried_by": action.by}
        if position is not None:
            done["retry"] = _mark(position, "done", stamp)
        put_entry(table, key, decision_id, done)
    return outcome


async def _sure(outcome: Awaitable[FenceOutcome | None]) -> FenceOutcome:
    """The outcome of `Actuator.handle` on an approved decision (never None for one)."""
    out = await outcome
    assert out is not None
    return out


def _retry_stage(mark: Any, position: tuple[int, int] | None, verdict: Verdict) -> str | None:
    """How far the retry at `position` got, by its entry's `retry` mark and `read_again`'s
    `verdict` on it: "done" (or a later record's mark: this one is old), "started" (cut
    short), or None (never seen, or a record of a recreated topic)."""
    if not isinstance(mark, list) or len(mark) not in (3, 4) or verdict != "again":
        return None
    assert position is not None
    return "started" if mark[1] == position[1] and mark[2] == "started" else "done"


def _mark(position: tuple[int, int], stage: str, stamp: int | None) -> list[Any]:
    """A mark [partition, offset, stage] and, when known, the record's timestamp."""
    return [*position, stage] if stamp is None else [*position, stage, stamp]


def record_stamp(message: Any) -> int | None:
    """The Kafka timestamp of a consumed record in milliseconds (Faust's `Message.timestamp`
    is in seconds), None when the broker gave none. Never compared with any clock of fencer's:
    only with the timestamp a mark remembers (`read_again`)."""
    ts = getattr(message, "timestamp", None)
    if ts is None or isinstance(ts, bool) or ts < 0:
        return None
    return round(float(ts) * 1000)


# `actuated` row keys (suffixed with the operator-actions topic's name: a mark is a place in
# that topic): [partition, offset, "started" | "done", timestamp] of the last lift,
# [partition, offset, "done", timestamp] of the last pin confirmation (marks written before the
# timestamp was kept: [partition, offset, stage] and [partition, offset]).
LIFT_MARK = "blocklist_lift"
PIN_MARK = "bmc_pin_confirm"


def mark_key(rt: Runtime, mark: str) -> str:
    """The row key of a `mark` on this deployment's operator-actions topic."""
    return f"{mark} {rt.settings.kafka.topics.operator_actions}"


def mark_stamp(mark: list[Any]) -> int | None:
    """The record timestamp a mark remembers (its fourth item), None in an older mark."""
    ts = mark[3] if len(mark) >= 4 else None
    return ts if isinstance(ts, int) and not isinstance(ts, bool) else None


@dataclass(frozen=True)
class AtMark:
    """What operator-actions holds now at a mark's offset (`record_at`): the record there and
    its Kafka timestamp (`found` "record"), no record because the log ends at or below that
    offset ("end"), or no answer ("failed": broker unreachable, timeout, a gap in the log)."""

    found: Literal["record", "end", "failed"]
    stamp: int | None = None
    detail: str = ""


# read_again's answer: "again" (read again after a restart: not run twice), "new" (carry it
# out), "ask" (the record is below the mark: only the log can tell, `record_at`), "unknown"
# (the log could not tell: refuse, tell people to send the request again).
Verdict = Literal["again", "new", "ask", "unknown"]


def read_again(
    mark: Any, position: tuple[int, int] | None, stamp: int | None = None, at: AtMark | None = None
) -> Verdict:
    """Whether the operator-actions record at `position` with Kafka timestamp `stamp` is the
    one `mark` (a row's [partition, offset, stage, timestamp]) remembers, or one before it on
    the same log: read again after a restart, not to be run again.

    A place alone cannot tell: a deleted and recreated topic (same name) counts its offsets
    from 0 again, and its new records sit at or below old marks. Timestamps of two records are
    never compared (with CreateTime they come from the clocks of two producers, the web UI's
    and a CLI's machine: an older request whose producer's clock ran ahead would look new):
    - a record after the mark (or in another partition) is new;
    - a record at the marked offset is the very record marked iff it carries the marked
      timestamp (a stamp compared with itself, whatever the topic's timestamp type);
    - a record below the marked offset is read again iff the marked record is still in the log:
      "ask" until `at` says what the log holds at the mark's offset (`record_at`): the marked
      timestamp there -> the same log, "again"; the log ends at or below it, or another record
      is there -> the topic was recreated, "new"; no answer -> "unknown".
    An older mark without a timestamp, or a record without one, is judged by the place alone,
    as before. A mark of this partition whose offset is not a number: "unknown"."""
    if position is None or not isinstance(mark, list) or len(mark) < 2 or mark[0] != position[0]:
        return "new"
    offset = mark[1]
    if not isinstance(offset, int) or isinstance(offset, bool):
        return "unknown"
    if offset < position[1]:
        return "new"
    marked = mark_stamp(mark)
    if marked is None or stamp is None:
        return "again"
    if offset == position[1]:
        return "again" if stamp == marked else "new"
    if at is None:
        return "ask"
    if at.found == "failed":
        return "unknown"
    return "again" if at.found == "record" and at.stamp == marked else "new"


async def record_at(
    settings: FencerSettings, topic: str, partition: int, offset: int, within: float = 5.0
) -> AtMark:
    """Ask the broker what `topic` holds at (`partition`, `offset`) now: a short-lived consumer
    without a group reads the one record there (`read_again` compares its timestamp with the
    mark's). Runs only for a record below a mark (after a restart or a recreation). Never
    raises: a broker that does not answer within `within` seconds is "failed"."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.errors import OffsetOutOfRangeError

    from streams.kafka import aiokafka_kwargs, prepare_kafka

    where = f"{topic} partition {partition} offset {offset}"
    tp = TopicPartition(topic, partition)
    consumer: AIOKafkaConsumer | None = None
    try:
        async with asyncio.timeout(within):
            prepare_kafka(settings)
            consumer = AIOKafkaConsumer(
                client_id="fencer-operator-mark",
                enable_auto_commit=False,
                auto_offset_reset="none",
                **aiokafka_kwargs(settings),
            )
            await consumer.start()
            consumer.assign([tp])
            consumer.seek(tp, offset)
            while True:
                try:
                    got = await consumer.getmany(tp, timeout_ms=200, max_records=1)
                except OffsetOutOfRangeError:
                    end = (await consumer.end_offsets([tp]))[tp]
                    if end <= offset:
                        return AtMark("end", detail=f"{topic} partition {partition} ends at {end}")
                    return AtMark(
                        "failed", detail=f"{where} is out of range, the log ends at {end}"
                    )
                records = got.get(tp, [])
                if records:
                    r = records[0]
                    if r.offset != offset:
                        return AtMark("failed", detail=f"{where}: no record there, next {r.offset}")
                    return AtMark("record", stamp=r.timestamp, detail=f"{where}: {r.timestamp}")
                high = consumer.highwater(tp)
                if high is not None and high <= offset:
                    return AtMark("end", detail=f"{topic} partition {partition} ends at {high}")
    except TimeoutError:
        return AtMark("failed", detail=f"{where}: no answer from Kafka within {within:.0f} s")
    except Exception as exc:
        return AtMark("failed", detail=f"{where}: {type(exc).__name__} {exc}".rstrip())
    finally:
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()


async def judge_mark(
    rt: Runtime, mark: Any, position: tuple[int, int] | None, stamp: int | None
) -> tuple[Verdict, str]:
    """`read_again` with the log asked when it must be (`record_at`): the verdict ("again",
    "new" or "unknown") and, when the log was asked, what it said (for the log line)."""
    verdict = read_again(mark, position, stamp)
    if verdict != "ask":
        return verdict, ""
    assert position is not None and isinstance(mark, list)
    topic = rt.settings.kafka.topics.operator_actions
    at = await record_at(rt.settings, topic, position[0], mark[1])
    verdict = read_again(mark, position, stamp, at)
    log.info(
        "operator-actions record at offset %s is below the mark at offset %s: %s (%s)",
        position[1],
        mark[1],
        verdict,
        at.detail,
    )
    return verdict, at.detail


def unknown_reason(what: str, position: tuple[int, int] | None, detail: str) -> str:
    """Why a request below a mark was not carried out: the log could not tell."""
    at = f" at offset {position[1]}" if position is not None else ""
    return (
        f"cannot tell whether this {what} request{at} was read again after a restart or is a "
        f"new one on a recreated operator-actions topic (the log did not answer: {detail}): "
        "nothing done; send the request again"
    )


def recorded_entries(notices: Iterable[Notice]) -> dict[str, str | None]:
    """The Ceph blocklist entries fencer's notices record for one host, in log order: entry ->
    the fence (decision id) that added it; a lift notice removes the entry it lifted (what the
    web UI shows, webui.fencing_view)."""
    entries: dict[str, str | None] = {}
    for n in notices:
        if n.blocklist_entry is None or n.kind is NoticeKind.BLOCKLIST_NOT_LIFTED:
            continue
        if n.kind is NoticeKind.BLOCKLIST_LIFTED:
            entries.pop(n.blocklist_entry, None)
        else:
            entries[n.blocklist_entry] = n.decision_id
    return entries


def lift_identity(
    recorded: dict[str, str | None],
    address: str | None,
    entry: str | None = None,
    decision_id: str | None = None,
) -> tuple[str | None, str | None]:
    """The (entry, fence decision id) a lift request names, from what the operator saw
    (`recorded`, in log order, as `recorded_entries` folds fencer's notices): the named entry,
    else the recorded one of `address`, else the latest recorded; (None, None) when fencer
    records none (an entry fencer never added: the request then names none)."""
    if entry is not None:
        return entry, decision_id or recorded.get(entry)
    if address is not None:
        from fencing.blocklist import entry_for

        mine = entry_for(address)
        return (mine, recorded[mine]) if mine in recorded else (None, None)
    if recorded:
        return next(reversed(recorded.items()))
    return None, None


async def read_recorded_entries(settings: FencerSettings, host_uuid: str) -> dict[str, str | None]:
    """`recorded_entries` of the host's notices on the notices topic, read to its end now
    (keyed by host: one partition, in the order they were appended)."""
    from streams.topic_reader import TopicReader

    mine: list[Notice] = []
    key = host_uuid.encode()

    def on_record(r: Any) -> None:
        if r.key == key and r.value:
            mine.append(Notice.model_validate_json(r.value))

    reader = TopicReader(
        settings, [settings.kafka.topics.notices], on_record, client_id="fencer-lift-entries"
    )
    await reader.start()
    await reader.stop()
    return recorded_entries(mine)


async def lift_once(
    rt: Runtime,
    action: OperatorAction,
    table: MutableMapping[str, Any],
    key: str,
    position: tuple[int, int] | None,
    stamp: int | None = None,
) -> str | None:
    """A lift_blocklist record, carried out at most once and only on the entry it names.

    Read again after a restart (at or before the host's `blocklist_lift` mark on the same log:
    `read_again`) it lifts nothing: done -> skipped; started, not done (the worker died
    mid-way) -> not lifted again, people told to check. Below the mark with a log that cannot
    be asked: nothing lifted, people told to send it again. An action naming its entry
    (`blocklist_entry` and the fence `decision_id` that added it, as the UI and CLI send)
    lifts only while fencer's notices record that fence's entry: a newer blocklist of the host
    (another fence) or one already lifted is not touched. An action naming none (older
    records, an entry fencer never added) lifts only if read live (appended while this worker
    listened, within decision_max_age on its clock) and fencer records no entry of its own for
    the host (which could be newer)."""
    from streams.actuation import NotNow, check_live

    lift_mark = mark_key(rt, LIFT_MARK)
    mark = dict(table.get(key) or {}).get(lift_mark)
    verdict, detail = await judge_mark(rt, mark, position, stamp)
    if verdict == "unknown":
        why = unknown_reason("lift", position, detail)
        log.error("blocklist of host %s NOT lifted (asked by %s): %s", key, action.by, why)
        await _send_lift_notice(rt, action, None, why)
        return None
    if verdict == "again":
        assert position is not None and isinstance(mark, list)
        if mark[1] == position[1] and mark[2:3] == ["started"]:
            why = (
                "a restart cut this lift short: it is not run again; `fencer rbd list` shows "
                "whether the entry is still there (lift again if it is)"
            )
            log.error("host %s: blocklist lift at offset %s: %s", key, position[1], why)
            await _send_lift_notice(rt, action, None, why)
        else:
            log.info("blocklist lift of host %s at offset %s read again: skipped", key, position[1])
        return None
    if position is not None:
        put_entry(table, key, lift_mark, _mark(position, "started", stamp))
    try:
        settings = await rt.live()
        refused = None
        try:
            recorded = await read_recorded_entries(settings, action.host_uuid)
        except Exception as exc:
            recorded, refused = {}, f"fencer's blocklist records cannot be read now ({exc})"
        address = action.address
        if refused is None and (action.blocklist_entry or action.decision_id):
            refused = _named_entry_refusal(action, recorded)
            address = _entry_address(action.blocklist_entry or "")
        elif refused is None and recorded:
            entry, by = next(reversed(recorded.items()))
            refused = (
                f"the request names no entry, and fencer's records show entry {entry} (added "
                f"by fence {by}), which may be newer than the request: lift it from the web UI "
                f"or `fencer rbd lift {action.host_uuid}`, which name it"
            )
        elif refused is None and position is not None:
            try:
                act = await rt.actuation()
                edges, limit = act.actions.edges, settings.decision_max_age()
                check_live(edges, *position, limit, act.clock(), what="request")
            except NotNow as exc:
                refused = f"the request names no entry and is not fresh ({exc}): lift again"
            except Exception as exc:  # the log's end cannot be read: not fresh either
                refused = f"the request names no entry and its age cannot be told ({exc})"
        if refused is not None:
            log.error(
                "blocklist of host %s NOT lifted (asked by %s): %s",
                action.host_uuid,
                action.by or "an operator",
                refused,
            )
            await _send_lift_notice(rt, action, None, refused)
            return None
        return await lift_blocklist(rt, action.model_copy(update={"address": address}))
    finally:
        if position is not None:
            put_entry(table, key, lift_mark, _mark(position, "done", stamp))


def _named_entry_refusal(action: OperatorAction, recorded: dict[str, str | None]) -> str | None:
    """Why a lift naming its entry must not run (None: fencer's records show that entry, added
    by that fence)."""
    entry, fence = action.blocklist_entry, action.decision_id
    if entry is None or fence is None:
        return "the request names a blocklist entry and the fence that added it only in part"
    if entry not in recorded:
        return (
            f"fencer's records show no entry {entry} for this host any more (lifted already, "
            "or never added by fencer): nothing lifted"
        )
    if recorded[entry] != fence:
        return (
            f"entry {entry} was added again by fence {recorded[entry]} after fence {fence} "
            "whose entry the request names: a newer blocklist, not lifted (lift it by name if "
            "the host is repaired)"
        )
    if _entry_address(entry) is None:
        return f"{entry!r} is not a blocklist entry of an address"
    return None


def _entry_address(entry: str) -> str | None:
    """The IP address of an entry `1.2.3.4:0/0` or `[fd00::1]:0/0`."""
    import ipaddress

    host = entry.removesuffix(":0/0").strip("[]")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


async def lift_blocklist(rt: Runtime, action: OperatorAction) -> str | None:
    """An operator lifts a repaired host's Ceph blocklist with this worker's fence key
    (fencing.storage_fence.lift_host, as `fencer rbd lift --direct`): the entry lifted, or None
    when it could not be (logged as an error: the host stays cut off from Ceph). Only through
    `lift_once`, which decides whether this record may lift at all."""
    from fencing.blocklist import BlocklistError
    from fencing.redaction import Redactor, secrets_of
    from fencing.storage_fence import lift_host
    from probes.host_disks import management_ip
    from probes.inventory import InventoryError

    who = action.by or "an operator"
    settings = await rt.live()
    try:
        entry = await lift_host(
            settings, action.host_uuid, action.address, partial(management_ip, settings)
        )
    except (BlocklistError, InventoryError, ValueError) as exc:
        error = Redactor(secrets_of(settings))(str(exc))
        log.error(
            "blocklist of host %s NOT lifted (asked by %s): %s; the host still cannot write to "
            "Ceph: retry, or `fencer rbd lift %s --direct` where the fence key is",
            action.host_uuid,
            who,
            error,
            action.host_uuid,
        )
        await _send_lift_notice(rt, action, None, error)
        return None
    log.warning("blocklist %s of host %s lifted by %s", entry, action.host_uuid, who)
    await _send_lift_notice(rt, action, entry, None)
    return entry


async def _send_lift_notice(
    rt: Runtime, action: OperatorAction, entry: str | None, error: str | None
) -> None:
    """Tell people (email, SNMP trap) that a blocklist was lifted, or was not; a notice that
    cannot be sent is logged, the lift stands."""
    host = HostRef(host_uuid=action.host_uuid)
    try:
        async with asyncio.timeout(10):
            h = await rt.inventory().host(action.host_uuid)
        host = HostRef(
            host_uuid=h.uuid,
            host_name=h.name,
            cluster_uuid=h.cluster_uuid,
            zone_uuid=h.zone_uuid,
            ip_address=h.ip or None,
        )
    except Exception as exc:  # the notice names the uuid alone; it still goes out
        log.info("host %s: no CloudStack name for the lift notice: %s", action.host_uuid, exc)
    try:
        await rt.emit_notice(lift_notice(action, host, entry, error, time.time()))
    except Exception as exc:
        log.error("host %s: cannot send the blocklist lift notice: %s", action.host_uuid, exc)


def lift_notice(
    action: OperatorAction, host: HostRef, entry: str | None, error: str | None, now: float
) -> Notice:
    """BLOCKLIST_LIFTED (`entry` lifted) or BLOCKLIST_NOT_LIFTED (`error`): who asked, what,
    when; its id follows the request, so a redelivered request is notified once."""
    who = action.by or "an operator"
    asked = f"asked {iso_utc(action.at)}" + (f"; note: {action.note}" if action.note else "")
    if entry is not None:
        kind = NoticeKind.BLOCKLIST_LIFTED
        reason = f"blocklist {entry} lifted by {who}"
    else:
        kind = NoticeKind.BLOCKLIST_NOT_LIFTED
        reason = f"blocklist NOT lifted (asked by {who}): {error or 'unknown error'}"
    return Notice(
        notice_id=f"blocklist-lift/{action.host_uuid}/{action.at:.3f}",
        kind=kind,
        host=host,
        at=now,
        reason=reason,
        result=asked,
        blocklist_entry=entry,
    )


async def carry_out(
    rt: Runtime, decision: FenceDecision, takeover: bool, recheck: Any = None
) -> FenceOutcome:
    """The BMC action; after a dead claimant, read the power first (never reboot twice).
    `recheck` is asked before each power-down command (`Actuator.handle`)."""
    actuator = rt.actuator()
    if not takeover or decision.action is not FenceAction.REBOOT:
        # The engine reads power first: a stop finds a host already off and calls it fenced.
        outcome: FenceOutcome = await actuator.handle(decision, recheck)
        return outcome
    from fencing.actuator import check_host

    live = actuator.settings
    read = await check_host(live, decision.host.host_uuid, decision.host.cluster_uuid)
    if read.power == "off":
        stop = decision.model_copy(update={"action": FenceAction.STOP})
        outcome = await actuator.handle(stop, recheck)
        return outcome.model_copy(update={"action": decision.action})
    now = time.time()
    return FenceOutcome(
        decision_id=decision.decision_id,
        host=decision.host,
        episode=decision.episode,
        action=decision.action,
        driver=read.driver,
        success=False,
        power_before=read.power,
        power_after=read.power,
        started_at=now,
        finished_at=now,
        attempts=0,
        error=(
            f"a claimant died during this reboot and the power reads {read.power or 'unknown'}:"
            " a reboot is never repeated blindly; an operator must check the host"
        ),
    )


async def preflight(
    rt: Runtime, schedule: PreflightSchedule | None = None, retry_after: float | None = None
) -> list[Notice]:
    """A PREFLIGHT_FAILED notice for each host whose BMC would not answer a fence now, a
    BMC_IDENTITY_CHANGED one for each BMC whose system GUID is not the pinned one (at most
    one per host per day: the notice id carries the process's tag and the day of its monotonic
    clock, never of the wall clock: `fencing.identity.daily_slot`). GUIDs are pinned on first
    read.

    With a `schedule` (fencing.preflight.PreflightSchedule, the leader's timer), only the run
    it says is due: every host, or only those it has not read yet at their BMC address; none
    is nothing. At most PREFLIGHT_CONCURRENCY BMCs are read at once. A BMC that did not answer
    is read again after `retry_after` seconds (PREFLIGHT_RETRY_AFTER) before it is told: a
    busy BMC or a lost packet is not a notice; a changed identity is told at once."""
    from fencing.actuator import preflight
    from fencing.cloudstack import host_from_api
    from fencing.identity import IdentityCheck, daily_slot, identity_notice
    from fencing.preflight import PREFLIGHT_RETRY_AFTER

    run = schedule.due(time.monotonic()) if schedule is not None else "all"
    if run is None:
        return []
    try:
        rows = await rt.inventory().kvm_hosts()
        hosts = [host_from_api(h) for h in rows]
    except Exception as exc:
        log.warning("pre-flight: cannot list hosts: %s", exc)
        if schedule is not None:
            schedule.failed(time.monotonic())
        return []
    # CloudStack's state of each host: a BMC that reads off while its host is Up is not pinned.
    states = {str(h["id"]): str(h["state"]) for h in rows if h.get("state")}
    live = await rt.live()
    address = {h.host_uuid: live.effective_ipmi(h.host_uuid, h.cluster_uuid).address for h in hosts}
    refs = {
        h.host_uuid: h
        for h in hosts
        if address[h.host_uuid]
        and (schedule is None or run == "all" or schedule.is_new(h.host_uuid, address[h.host_uuid]))
    }
    if schedule is not None and run == "new" and not refs:
        schedule.ran(run, time.monotonic(), [])
        return []
    log.info("pre-flight: reading the BMCs of %d host(s) (%s)", len(refs), run)
    pins = await rt.bmc_pins()
    results = await preflight(live, list(refs.values()), pins=pins, states=states)
    # A changed identity reads the same again; a BMC that did not answer may answer now.
    failed = [
        refs[r.host_uuid]
        for r in results
        if not r.ok and r.identity not in ("changed", "elsewhere")
    ]
    if failed:
        wait = PREFLIGHT_RETRY_AFTER if retry_after is None else retry_after
        log.info("pre-flight: %d BMC(s) failed, read again in %g s", len(failed), wait)
        await asyncio.sleep(wait)
        again = {r.host_uuid: r for r in await preflight(live, failed, pins=pins, states=states)}
        results = [again.get(r.host_uuid, r) for r in results]
    if schedule is not None:
        schedule.ran(run, time.monotonic(), [(h, address[h]) for h in refs])
    mono, tag = time.monotonic(), rt.reminder_tag
    return [
        identity_notice(
            IdentityCheck(r.host_uuid, "changed", guid=r.guid, reason=r.error),
            refs[r.host_uuid],
            r.checked_at,
            tag=tag,
            mono=mono,
        )
        if r.identity in ("changed", "elsewhere")
        else Notice(
            notice_id=f"{r.host_uuid}/preflight/{tag}/{daily_slot(mono)}",
            kind=NoticeKind.PREFLIGHT_FAILED,
            host=refs[r.host_uuid],
            at=r.checked_at,
            reason=r.error or r.detail or "the BMC did not answer",
        )
        for r in results
        if not r.ok
    ]


async def ipmi_test(rt: Runtime, action: OperatorAction) -> IpmiTestAnswer:
    """An operator's `ipmi_test`: the host's test action through the BMC settings in force here
    (the file and the settings topic), never power-changing; the answer masks every secret."""
    from fencing.actuator import check_host

    started = time.monotonic()
    live = await rt.live()
    try:
        r = await check_host(live, action.host_uuid, action.cluster_uuid)
        ok, driver, power, detail, error = r.ok, r.driver, r.power, r.detail, r.error
    except Exception as exc:  # the operator must get an answer, not a silent timeout
        log.exception("IPMI test of host %s failed", action.host_uuid)
        ok, driver, power, detail = False, "?", None, None
        error = f"the IPMI test failed in the worker: {type(exc).__name__}"
    log.info(
        "IPMI test %s of host %s by %s: %s",
        action.request_id,
        action.host_uuid,
        action.by or "an operator",
        "ok" if ok else error,
    )
    return IpmiTestAnswer(
        request_id=action.request_id or "",
        host_uuid=action.host_uuid,
        success=ok,
        driver=driver,
        power_state=power,
        output=detail,
        error=error,
        duration=round(time.monotonic() - started, 3),
        at=time.time(),
    )


async def bmc_pin_confirm(
    rt: Runtime,
    action: OperatorAction,
    table: MutableMapping[str, Any] | None = None,
    position: tuple[int, int] | None = None,
    stamp: int | None = None,
) -> IpmiTestAnswer | None:
    """An operator's `bmc_pin_confirm`: read the host's BMC system GUID through the settings in
    force here and pin it on bmc-pins (streams.bmc_pins.confirm_pin, this worker's pin store);
    the answer names the pinned GUID, or why not (`refused`), every secret masked.

    The record read again after a restart (`position` and `stamp` at or before the host's
    `bmc_pin_confirm` mark in the `actuated` table: `read_again`) does nothing and answers
    nothing: the BMC
    may have been swapped since. A confirm whose BMC reports another GUID than the `expect`ed
    one (the one the operator saw) pins nothing and tells people (bmc_identity_changed)."""
    from fencing.drivers.base import DriverError
    from fencing.identity import PinStoreError
    from streams.bmc_pins import confirm_pin

    if table is not None and position is not None:
        key = action.host_uuid
        pin_mark = mark_key(rt, PIN_MARK)
        verdict, detail = await judge_mark(
            rt, dict(table.get(key) or {}).get(pin_mark), position, stamp
        )
        if verdict == "unknown":
            return await _refuse_unknown_pin(rt, action, position, detail)
        if verdict == "again":
            log.info(
                "BMC pin confirmation of host %s at offset %s read again: nothing done",
                key,
                position[1],
            )
            return None
        put_entry(
            table, key, pin_mark, [*position] if stamp is None else _mark(position, "done", stamp)
        )
    started = time.monotonic()
    pinned: str | None = None
    refused: Literal["bmc", "expect", "pins"] | None = None
    error: str | None = None
    driver = "?"
    try:
        live = await rt.live()
        driver = live.effective_ipmi(action.host_uuid, action.cluster_uuid).values.driver.value
        _, new = await confirm_pin(
            live,
            action.host_uuid,
            action.cluster_uuid,
            by=f"operator {action.by or 'unknown'}",
            expect=action.expect,
            store=await rt.bmc_pins(),
        )
        pinned = new.guid
    except DriverError as exc:  # confirm_pin masked the secrets
        refused, error = "bmc", f"cannot read the BMC's system GUID: {exc}"
    except ValueError as exc:  # no GUID, or not the one the operator expects
        refused, error = "expect", str(exc)
        if action.expect is not None:
            who = action.by or "an operator"
            await _send_pin_notice(
                rt,
                action,
                NoticeKind.BMC_IDENTITY_CHANGED,
                f"BMC identity NOT confirmed (asked by {who}, expecting {action.expect}): {error}",
            )
    except PinStoreError as exc:
        refused, error = "pins", str(exc)
    except Exception as exc:  # the operator must get an answer, not a silent timeout
        log.exception("BMC pin confirmation of host %s failed", action.host_uuid)
        refused, error = "bmc", f"the pin confirmation failed in the worker: {type(exc).__name__}"
    log.info(
        "BMC pin confirmation %s of host %s by %s: %s",
        action.request_id,
        action.host_uuid,
        action.by or "an operator",
        f"pinned {pinned}" if pinned else error,
    )
    return IpmiTestAnswer(
        request_id=action.request_id or "",
        kind="bmc_pin_confirm",
        host_uuid=action.host_uuid,
        success=pinned is not None,
        driver=driver,
        pinned_guid=pinned,
        refused=refused,
        error=error,
        duration=round(time.monotonic() - started, 3),
        at=time.time(),
    )


async def _refuse_unknown_pin(
    rt: Runtime, action: OperatorAction, position: tuple[int, int], detail: str
) -> IpmiTestAnswer:
    """A pin confirmation below the host's mark that the log could not place: nothing pinned;
    logged, told (fence_refused) and answered, asking for the request again."""
    why = unknown_reason("BMC pin confirmation", position, detail)
    log.error("BMC of host %s NOT pinned (asked by %s): %s", action.host_uuid, action.by, why)
    await _send_pin_notice(
        rt,
        action,
        NoticeKind.FENCE_REFUSED,
        f"BMC identity confirmation (asked by {action.by or 'an operator'}): {why}",
        suffix="/unknown",
    )
    return IpmiTestAnswer(
        request_id=action.request_id or "",
        kind="bmc_pin_confirm",
        host_uuid=action.host_uuid,
        success=False,
        driver="?",
        error=why,
        duration=0.0,
        at=time.time(),
    )


async def _send_pin_notice(
    rt: Runtime, action: OperatorAction, kind: NoticeKind, reason: str, suffix: str = ""
) -> None:
    """Tell people that a BMC pin confirmation pinned nothing (`reason`); its id follows the
    request, so a redelivered request is told once. A notice that cannot be sent is logged."""
    notice = Notice(
        notice_id=f"{action.host_uuid}/bmc-pin-confirm/{action.request_id or action.at}{suffix}",
        kind=kind,
        host=HostRef(host_uuid=action.host_uuid, cluster_uuid=action.cluster_uuid),
        at=time.time(),
        result="not pinned",
        reason=reason,
    )
    try:
        await rt.emit_notice(notice)
    except Exception as exc:
        log.error("host %s: cannot send the notice: %s", action.host_uuid, exc)


async def send_operator_action(settings: FencerSettings, action: OperatorAction) -> None:
    """Write an operator's record (retry, handled, lift_blocklist) to its topic (CLI, web UI)."""
    await _send_one(settings, settings.kafka.topics.operator_actions, action.host_uuid, action)


async def send_notice(settings: FencerSettings, notice: Notice) -> None:
    """Write one notice for the notifiers (`fencer rbd lift --direct`, which runs no worker)."""
    await _send_one(settings, settings.kafka.topics.notices, notice.host.host_uuid, notice)


async def _send_one(settings: FencerSettings, topic: str, key: str, record: Any) -> None:
    from aiokafka import AIOKafkaProducer

    from streams.kafka import aiokafka_kwargs, prepare_kafka

    prepare_kafka(settings)
    producer = AIOKafkaProducer(acks="all", **aiokafka_kwargs(settings))
    await producer.start()
    try:
        await producer.send_and_wait(topic, key=key.encode(), value=dump(record))
    finally:
        await producer.stop()


# A send of an outcome or notice that fails is tried again in place, at a doubling pause: the
# BMC acted (or refused) already, and only the record is missing. Never the action again: a
# decision read again is answered from the `actuated` table and the claim's `done`.
SEND_TRIES = 6
SEND_BACKOFF = 0.5  # seconds before the second try, doubled each time, at most SEND_BACKOFF_MAX
SEND_BACKOFF_MAX = 10.0
SEND_WAIT = 30.0  # seconds one send may wait for the broker's acknowledgement

Send = Callable[[str, bytes, bytes], Awaitable[Any]]  # (topic name, key, value) -> delivered


def topic_sender(topics: Mapping[str, Any]) -> Send:
    """A `Send` through Faust topics by name that returns once the broker acknowledged the
    record (Faust's send only enqueues it: a delivery that fails later would not be retried)."""

    async def send(topic: str, key: bytes, value: bytes) -> Any:
        delivery = await topics[topic].send(key=key, value=value)
        return await asyncio.wait_for(asyncio.shield(delivery), SEND_WAIT)

    return send


async def send_out(
    out: Iterable[Out],
    send: Send,
    tries: int = SEND_TRIES,
    backoff: float = SEND_BACKOFF,
) -> list[Out]:
    """Send each record of `out` in order; a send that fails is tried again in place (up to
    `tries` times, `backoff` doubling to SEND_BACKOFF_MAX), each failure logged, a record
    given up on logged as an error (what it was, never its value) and the others still sent.
    Never raises (but a cancellation): an agent that crashed on a producer error left its
    outcome unsent until a restart. The records not sent."""
    lost: list[Out] = []
    for record in out:
        topic, key, value = record
        pause = backoff
        for attempt in range(1, tries + 1):
            try:
                await send(topic, key, value)
                if attempt > 1:
                    log.warning(
                        "record for %s (key %s) sent at attempt %d",
                        topic,
                        key.decode("utf-8", "replace"),
                        attempt,
                    )
                break
            except Exception as exc:
                if attempt == tries:
                    log.error(
                        "record for %s (key %s) NOT sent after %d attempts: %s: %s; the "
                        "decision is answered from its `done` when read again",
                        topic,
                        key.decode("utf-8", "replace"),
                        tries,
                        type(exc).__name__,
                        exc,
                    )
                    lost.append(record)
                    break
                log.warning(
                    "record for %s (key %s) not sent (attempt %d of %d, again in %.1f s): %s: %s",
                    topic,
                    key.decode("utf-8", "replace"),
                    attempt,
                    tries,
                    pause,
                    type(exc).__name__,
                    exc,
                )
            await asyncio.sleep(pause)
            pause = min(SEND_BACKOFF_MAX, pause * 2)
    return lost


async def resume_follows(rt: Runtime, rows: Iterable[tuple[str, Any]]) -> int:
    """Follow again the VMs of the fences in this worker's `actuated` rows that this process
    has not followed yet (it restarted, or took the partition over), while fencer's own host
    record (host-states) still shows the host fenced by that decision: a fenced host's VMs
    still down after a restart are told, never forgotten (fencing.actuator `follow`). Those
    already running are found so at the first look, logged only. Run from the reminder timer;
    how many followings it started."""
    act = await rt.actuation()
    actuator = rt.actuator()
    actuator.settings = await rt.live()
    started = 0
    for host, row in rows:
        for decision_id, entry in dict(row or {}).items():
            if not isinstance(entry, dict) or not entry.get("success") or not entry.get("vms"):
                continue
            record = (act.states.rows.get(host) or {}).get("record") or {}
            if record.get("decision_id") != decision_id or record.get("state") != "fenced":
                continue  # the episode is over (the host back, a later fence): nothing to follow
            if "decision" not in entry:
                continue
            decision = FenceDecision.model_validate(entry["decision"])
            vms = {str(k): str(v) for k, v in dict(entry["vms"]).items()}
            if actuator.follow(decision, vms, resumed=True):
                started += 1
    return started


REMOVED_BY = "fencer (the host no longer exists in CloudStack)"


async def host_removed(rt: Runtime, host: HostRef) -> bool:
    """Whether CloudStack says the host no longer exists: listHosts by its id answers no row,
    or 431 "entity does not exist", while the same key does list other hosts (of its cluster,
    else any: an API key that sees no host at all proves nothing). CloudStack translates an
    id parameter to its database row removed rows included (ParamProcessWorker
    `findByUuidIncludingRemoved`), so a deleted host's uuid answers an empty list (the
    simulator answers so too); one not in the database at all answers 431. Any other failure
    to ask is not a yes (unknown is never gone): False."""
    from fencing.cloudstack import CloudStackApiError

    inv = rt.inventory()
    try:
        try:
            if await inv.list("listHosts", id=host.host_uuid):
                return False
        except CloudStackApiError as exc:
            if str(exc.code) != "431" or "does not exist" not in exc.text:
                raise
        params = {"clusterid": host.cluster_uuid} if host.cluster_uuid else {}
        others = await inv.kvm_hosts(**params) or await inv.kvm_hosts()
    except Exception as exc:
        log.info("host %s: cannot ask CloudStack whether it exists: %s", host.host_uuid, exc)
        return False
    return bool(others)


async def reminders_of_listed_hosts(rt: Runtime, due: list[Notice]) -> list[Notice]:
    """The fence_failed reminders `due` (Runtime.due_reminders) whose host CloudStack still
    lists. A host it says no longer exists (`host_removed`) gets one last notice instead,
    saying so, and its failed fence is marked handled by fencer (an operator-actions record,
    as `fencer fence handled` writes it: stored by the operator agent, so the reminders end
    for good, after a restart too); a host that cannot be asked about keeps its reminders.
    CloudStack is asked only for a reminder due (once a renotify_interval per failed fence)."""
    from fencing.records import OperatorAction

    keep: list[Notice] = []
    for notice in due:
        if not await host_removed(rt, notice.host):
            keep.append(notice)
            continue
        host = notice.host.host_name or notice.host.host_uuid
        log.warning(
            "host %s: CloudStack no longer lists it: the reminders of its failed fence %s end",
            host,
            notice.decision_id,
        )
        keep.append(
            notice.model_copy(
                update={
                    "notice_id": f"{notice.decision_id}/host-removed",
                    "result": "last notice: the host no longer exists in CloudStack",
                    "reason": (
                        f"CloudStack no longer lists host {host} (removed from CloudStack): "
                        "fencer stops reminding of its failed fence; no further reminder. "
                        f"Before: {notice.reason or ''}"
                    ),
                }
            )
        )
        action = OperatorAction(
            kind="handled",
            host_uuid=notice.host.host_uuid,
            decision_id=notice.decision_id,
            by=REMOVED_BY,
            note="the host no longer exists in CloudStack",
            at=time.time(),
        )
        try:
            await send_operator_action(rt.settings, action)
        except Exception as exc:  # the next due reminder asks again and tries again
            log.error("host %s: cannot mark its failed fence handled: %s", host, exc)
    return keep
