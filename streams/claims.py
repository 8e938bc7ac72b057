"""Claimed once: the fence-claims log the actuator writes before any BMC call (the fifth
last-moment check of streams.actuation, whose docstring states the rule).

The claim is a record on the one-partition topic `fencer.fence-claims`, keyed by decision id
and written with `acks=all`; the log's order decides between two claimants, a claim neither
renewed nor done for `claim_lease` (this worker's clock) belongs to a claimant that died.

Signed: every claim is signed with the keyring (purpose `fencing.signing.CLAIM`, the key id in
its `signature`, as the gate signs decisions) and every claim read is verified. A record that is
unsigned, signed by no key this worker holds, or fails verification is ignored for every rule:
never a claim, a renewal, a release nor a `done` (a forged `done` made the actuator take a fence
nobody carried out for done; a forged claim made it wait a lease, then act as a takeover). It is
logged and told once per decision id per process (a forged_record notice), never per record.
An unsigned claim of a fencer from before signing is ignored the same way: run one version of
the actuate role at a time (docs/operators-guide.md, "Upgrading").
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from aiokafka import AIOKafkaProducer, ConsumerRecord
from pydantic import ValidationError

from fencing.engine import Withdrawn
from fencing.events import NoticeKind
from fencing.records import (
    FenceClaim,
    FenceDecision,
    FenceOutcome,
    HostRef,
    Notice,
)
from fencing.settings import FencerSettings
from fencing.signing import CLAIM, Keyring, SignatureError, sign, verify_bytes
from streams.kafka import aiokafka_kwargs

log = logging.getLogger("fencer.actuation")


DONE_TRIES = 3  # writes of a `done` claim before the outcome goes on without it


class NotNow(Withdrawn):
    """A last-moment check refused the decision; the message is the reason. A Withdrawn: the
    same checks asked again before each power-down command (`fencing.engine`) stop it."""


class ClaimLog:
    """The fence-claims log: written with acks=all, signed, read back from the beginning and
    verified (a record fencer's keyring did not sign is ignored, logged and told once)."""

    def __init__(self, settings: FencerSettings, worker: str, ring: Keyring) -> None:
        self.settings = settings
        self.worker = worker
        self.ring = ring
        # Where an ignored (forged or foreign) claim is told: the runtime's emit_notice.
        self.notify: Callable[[Notice], Awaitable[None]] | None = None
        self.ignored: dict[str, int] = {}  # decision id ("" if none) -> records ignored
        self._telling: set[asyncio.Task[None]] = set()
        self.topic = settings.kafka.topics.fence_claims
        self.claims: dict[str, list[tuple[int, FenceClaim]]] = {}
        self._seen = asyncio.Condition()
        self._producer: AIOKafkaProducer | None = None
        self._reader: Any = None
        self._high = -1

    async def start(self, within: float = 30.0) -> None:
        from streams.topic_reader import TopicReader

        producer = AIOKafkaProducer(
            client_id="fencer-claims", acks="all", **aiokafka_kwargs(self.settings)
        )
        await producer.start()
        self._producer = producer
        self._reader = TopicReader(
            self.settings, [self.topic], self._on_record, client_id="fencer-claims-reader"
        )
        await self._reader.start(within)

    def _on_record(self, record: ConsumerRecord[bytes, bytes]) -> None:
        if record.value is None:
            return
        try:
            claim = FenceClaim.model_validate(verify_bytes(self.ring, CLAIM, record.value))
        except SignatureError as exc:
            self._ignore(record, str(exc))
            return
        except ValidationError:
            self._ignore(record, "signed, but not a fence claim")
            return
        self.claims.setdefault(claim.decision_id, []).append((record.offset, claim))
        self._high = max(self._high, record.offset)
        asyncio.get_running_loop().create_task(self._notify())

    def _ignore(self, record: ConsumerRecord[bytes, bytes], reason: str) -> None:
        """A record fencer did not sign: never a claim; logged, told once per decision id."""
        did, host, state = _named(record.value)
        where = f"{record.topic} partition {record.partition} offset {record.offset}"
        log.warning(
            "ignored %s: a fence claim fencer did not sign (%s); it names decision %s, state %s",
            where,
            reason,
            did,
            state,
        )
        first = (did or "") not in self.ignored
        self.ignored[did or ""] = self.ignored.get(did or "", 0) + 1
        if not first:
            return
        notice = Notice(
            notice_id=f"forged-claim/{record.topic}/{did}/{record.offset}",
            kind=NoticeKind.FORGED_RECORD,
            host=HostRef(host_uuid=host or "unknown"),
            at=time.time(),
            decision_id=did,
            reason=(
                f"ignored {where} ({reason}): a fence claim (state {state}) fencer's actuators "
                f"did not sign; it names host {host}. Neither a claim nor a done: the actuator "
                "goes by signed claims only. Whoever wrote it can write fence-claims (check "
                "its ACLs), or it is a fencer from before claims were signed, or one with "
                "other keys. Told once per decision."
            ),
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            claimed_host=host,
        )
        if self.notify is None:
            log.error("notice %s has nowhere to go", notice.notice_id)
            return
        task = asyncio.get_running_loop().create_task(self._tell(notice))
        self._telling.add(task)
        task.add_done_callback(self._telling.discard)

    async def _tell(self, notice: Notice) -> None:
        assert self.notify is not None
        try:
            await self.notify(notice)
        except Exception as exc:  # the record stays ignored whether or not it was told
            log.error("cannot send notice %s: %s", notice.notice_id, exc)

    async def _notify(self) -> None:
        async with self._seen:
            self._seen.notify_all()

    def of(self, decision_id: str) -> list[FenceClaim]:
        return [c for _, c in sorted(self.claims.get(decision_id, []), key=lambda x: x[0])]

    def done(self, decision_id: str) -> FenceClaim | None:
        return next((c for c in self.of(decision_id) if c.state == "done"), None)

    def open_claims(self, decision_id: str) -> list[FenceClaim]:
        """Claims of the decision that were neither finished nor released, in log order."""
        recs = self.of(decision_id)
        released = {c.claim_id for c in recs if c.state == "released"}
        return [c for c in recs if c.state == "claimed" and c.claim_id not in released]

    async def _wait(self, pred: Callable[[], Any], within: float) -> Any:
        deadline = time.monotonic() + within
        async with self._seen:
            while not (result := pred()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return result
                try:
                    await asyncio.wait_for(self._seen.wait(), min(left, 0.5))
                except TimeoutError:
                    pass
            return result

    async def append(self, claim: FenceClaim) -> None:
        """Write a claim record and wait until it is read back (its place in the log known)."""
        assert self._producer is not None
        body = claim.model_dump(mode="json", exclude={"signature"})
        value = json.dumps(sign(self.ring, CLAIM, body), separators=(",", ":")).encode()
        await self._producer.send_and_wait(self.topic, key=claim.decision_id.encode(), value=value)
        seen = await self._wait(
            lambda: any(
                c.claim_id == claim.claim_id and c.state == claim.state
                for c in self.of(claim.decision_id)
            ),
            30.0,
        )
        if not seen:
            raise RuntimeError(f"claim {claim.claim_id} was written but not read back in 30 s")

    async def _renew(self, claim: FenceClaim, every: float) -> None:
        """While acting, say so: a renewal every `every` seconds keeps followers waiting."""
        while True:
            await asyncio.sleep(every)
            try:
                await self.append(claim.model_copy(update={"state": "renewed"}))
            except Exception as exc:  # a missed renewal shortens the wait, never the action
                log.warning("cannot renew claim %s: %s", claim.claim_id, exc)

    def _moved(self, decision_id: str, seen: int) -> bool:
        return self.done(decision_id) is not None or len(self.of(decision_id)) > seen

    async def _wait_while_renewed(
        self, decision_id: str, lease: float, claim_id: str | None = None
    ) -> FenceClaim | str | None:
        """The `done` record, "released" once claim `claim_id` is released (its claimant was
        refused before acting: go on as a first claimant, at once, not a lease later as the
        takeover of a dead one), or None once `lease` seconds (this worker's clock) passed
        without any new record for the decision: its claimant stopped renewing, so it is dead.

        Also None, renewals or not, once the wait passed what any fence takes (its BMC retries,
        actuator.fence_deadline, and its restart call's job, cloudstack.job_timeout) and two
        leases more: a claimant that renews for ever (its action hung while its renewal task
        runs, or genuine renewals written to the log again and again) would hold the fence up
        for good with one warning at its start. The takeover reads the power first and never
        repeats a reboot. (A live claimant cuts its own fence at fence_deadline + job_timeout,
        streams.actuating.bounded, and writes its `done`: this bound is for one that could not.)"""
        seen = len(self.of(decision_id))
        deadline = time.monotonic() + lease
        s = self.settings
        limit = time.monotonic() + s.actuator.fence_deadline + s.cloudstack.job_timeout + 2 * lease
        while True:
            done = self.done(decision_id)
            if done is not None:
                return done
            if claim_id is not None and all(
                c.claim_id != claim_id for c in self.open_claims(decision_id)
            ):
                return "released"
            now = len(self.of(decision_id))
            if now > seen:
                seen, deadline = now, time.monotonic() + lease
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if time.monotonic() >= limit:
                log.error(
                    "decision %s: its claim was renewed for longer than any fence takes "
                    "(fence_deadline, job_timeout, two leases): a hung claimant or renewals "
                    "written again; taken as lapsed",
                    decision_id,
                )
                return None
            await self._wait(partial(self._moved, decision_id, seen), min(left, 1.0))

    async def run_once(
        self,
        decision: FenceDecision,
        lease: float,
        act: Callable[[bool], Awaitable[FenceOutcome]],
    ) -> tuple[FenceOutcome, bool]:
        """The decision's outcome, carried out by at most one live claimant; (outcome, acted)."""
        did = decision.decision_id
        while True:
            done = self.done(did)
            if done is not None and done.outcome is not None:
                return FenceOutcome.model_validate(done.outcome), False
            open_claims = self.open_claims(did)
            base = open_claims[-1].claim_id if open_claims else None
            takeover = False
            if open_claims:
                log.warning(
                    "decision %s is claimed by %s: waiting for its outcome (lapses after %g s "
                    "without a renewal)",
                    did,
                    open_claims[-1].claimed_by,
                    lease,
                )
                if await self._wait_while_renewed(did, lease, open_claims[-1].claim_id):
                    continue
                takeover = True
                log.warning(
                    "decision %s: the claim of %s lapsed; taking over",
                    did,
                    open_claims[-1].claimed_by,
                )
            mine = FenceClaim(
                decision_id=did,
                host_uuid=decision.host.host_uuid,
                claim_id=uuid.uuid4().hex,
                claimed_by=self.worker,
                state="claimed",
                takeover_of=base,
            )
            await self._append_before_acting(mine)
            first = next(c for c in self.open_claims(did) if c.takeover_of == base)
            if first.claim_id != mine.claim_id:
                log.warning("decision %s: %s claimed it first", did, first.claimed_by)
                await self._append_before_acting(mine.model_copy(update={"state": "released"}))
                continue
            renewing = asyncio.create_task(self._renew(mine, lease / 3))
            try:
                outcome = await act(takeover)
            except NotNow:
                # Refused after the claim (a takeover re-checks): nothing was done, let go.
                try:
                    await self.append(mine.model_copy(update={"state": "released"}))
                except Exception as exc:  # the refusal stands; followers wait out the lease
                    log.warning("decision %s: claim %s not released: %s", did, mine.claim_id, exc)
                raise
            finally:
                renewing.cancel()
            await self._done(mine, outcome)
            return outcome, True

    async def _append_before_acting(self, claim: FenceClaim) -> None:
        """`append`, before anything was done: a claim log that cannot be written (the broker
        refuses, or the record is not read back) is a refusal (NotNow: an outcome and a
        fence_refused notice, the host checked again and proposed again), never an exception
        the actuate agent only dead-letters while the host's record waits 15 minutes
        (fencing_resend_after) with nobody told."""
        try:
            await self.append(claim)
        except Exception as exc:
            raise NotNow(
                f"the claim could not be written to {self.topic} ({type(exc).__name__}: "
                f"{str(exc)[:200]}); nothing was done"
            ) from None

    async def _done(self, mine: FenceClaim, outcome: FenceOutcome) -> None:
        """Write the `done` record of a claim whose action was carried out, tried a few times;
        never raises: the BMC acted, so its outcome is a fact the caller must store and send
        whatever this log says (raised, the outcome was lost: no fence-outcomes record, no
        `actuated` entry, the host's record left fencing until the proposal was re-sent). A
        follower that finds no `done` takes over after the lease, power read first."""
        done = mine.model_copy(update={"state": "done", "outcome": outcome.model_dump(mode="json")})
        for attempt in range(1, DONE_TRIES + 1):
            try:
                await self.append(done)
                return
            except Exception as exc:
                log.error(
                    "decision %s: carried out, but its done claim was not written (attempt %d of "
                    "%d): %s",
                    mine.decision_id,
                    attempt,
                    DONE_TRIES,
                    exc,
                )
            if attempt < DONE_TRIES:
                await asyncio.sleep(0.5 * attempt)

    async def stop(self) -> None:
        for task in list(self._telling):
            await asyncio.wait([task], timeout=5.0)
        if self._reader is not None:
            await self._reader.stop()
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


def _named(value: bytes | None) -> tuple[str | None, str | None, str | None]:
    """The decision id, host and state an unverified record names (shown, never believed)."""
    try:
        data = json.loads(value or b"")
        got = [data.get(k) for k in ("decision_id", "host_uuid", "state")]
    except (ValueError, AttributeError, TypeError):
        return None, None, None
    shown = [str(v)[:200] if v is not None else None for v in got]
    return shown[0], shown[1], shown[2]
