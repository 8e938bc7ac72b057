"""Signed fence claims (streams/claims.py): a record on fence-claims that fencer's keyring did
not sign is no claim, no renewal and no `done`, whatever it says; it is told once per decision.

Against the embedded broker: the forged records are written straight to the claims topic, as
anyone allowed to write it could."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from fencing.events import FenceAction, NoticeKind
from fencing.records import (
    EvidenceSummary,
    FenceClaim,
    FenceDecision,
    FenceOutcome,
    HostRef,
    Notice,
)
from fencing.signing import CLAIM, DECISION, parse_keys, sign
from streams.claims import ClaimLog
from streams.kafka import aiokafka_kwargs

pytestmark = pytest.mark.timeout(120)

RING = parse_keys("k1 " + "s" * 40, "test")
STRANGER = parse_keys("k9 " + "x" * 40, "test")  # a key id this worker does not hold
SAME_ID = parse_keys("k1 " + "t" * 40, "test")  # the right key id, another secret


def decision(**update: Any) -> FenceDecision:
    d = FenceDecision(
        decision_id="h1/2",
        host=HostRef(host_uuid="h1", host_name="kvm01"),
        episode=2,
        action=FenceAction.STOP,
        approved=True,
        evidence=EvidenceSummary(suspect_since=900.0, stale_checks=3),
        decided_at=time.time(),
    )
    return d.model_copy(update=update)


def outcome_of(d: FenceDecision, by: str) -> FenceOutcome:
    now = time.time()
    return FenceOutcome(
        decision_id=d.decision_id,
        host=d.host,
        episode=d.episode,
        action=d.action,
        driver=by,
        success=True,
        started_at=now,
        finished_at=now,
    )


def claim(d: FenceDecision, state: str, claim_id: str = "forged", **more: Any) -> FenceClaim:
    return FenceClaim.model_validate(
        {
            "decision_id": d.decision_id,
            "host_uuid": d.host.host_uuid,
            "claim_id": claim_id,
            "claimed_by": "attacker",
            "state": state,
            **more,
        }
    )


def unsigned(c: FenceClaim) -> bytes:
    return c.model_dump_json(exclude={"signature"}).encode()


def signed_by(ring: Any, c: FenceClaim) -> bytes:
    return json.dumps(sign(ring, CLAIM, c.model_dump(mode="json", exclude={"signature"}))).encode()


async def write(settings: Any, d: FenceDecision, *values: bytes) -> None:
    producer = AIOKafkaProducer(acks="all", **aiokafka_kwargs(settings))
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(
                settings.kafka.topics.fence_claims, key=d.decision_id.encode(), value=value
            )
    finally:
        await producer.stop()


async def started(settings: Any, worker: str, told: list[Notice]) -> ClaimLog:
    log = ClaimLog(settings, worker, RING)

    async def tell(n: Notice) -> None:
        told.append(n)

    log.notify = tell
    await log.start()
    return log


async def test_a_forged_done_does_not_stop_the_actuator_and_is_told_once(
    fencer_settings: Any,
) -> None:
    """An unsigned `done` (with a success outcome), a `done` signed by a key id this worker
    does not hold, and one under its key id but another secret: none is a done. The actuator
    claims and acts itself; one forged_record notice for the decision, not one per record."""
    settings = fencer_settings(isolated_topics=True)
    d = decision()
    fake = outcome_of(d, "attacker").model_dump(mode="json")
    await write(
        settings,
        d,
        unsigned(claim(d, "done", outcome=fake)),
        signed_by(STRANGER, claim(d, "done", outcome=fake)),
        signed_by(SAME_ID, claim(d, "done", outcome=fake)),
        b"not json",
    )
    told: list[Notice] = []
    log = await started(settings, "worker", told)
    acted: list[bool] = []

    async def act(takeover: bool) -> FenceOutcome:
        acted.append(takeover)
        return outcome_of(d, "worker")

    try:
        out, did_act = await asyncio.wait_for(log.run_once(d, 30.0, act), 20.0)
        await asyncio.sleep(0.2)  # the notice task
    finally:
        await log.stop()
    assert did_act is True and acted == [False] and out.driver == "worker"
    assert [(c.claimed_by, c.state) for c in log.of(d.decision_id)] == [
        ("worker", "claimed"),
        ("worker", "done"),
    ]
    assert log.ignored == {d.decision_id: 3, "": 1}
    forged = [n for n in told if n.decision_id == d.decision_id]
    assert len(forged) == 1 and forged[0].kind is NoticeKind.FORGED_RECORD
    assert forged[0].offset == 0 and "unsigned" in (forged[0].reason or "")
    assert forged[0].claimed_host == "h1"
    assert len(told) == 2  # and one for the record that names no decision
    assert all("s" * 40 not in (n.reason or "") for n in told)


async def test_a_forged_claim_does_not_make_the_actuator_wait_a_lease(
    fencer_settings: Any,
) -> None:
    """An unsigned `claimed` record and renewals of it: the actuator is the first claimant, at
    once (not a lease later as the takeover of a claimant it took for dead)."""
    settings = fencer_settings(isolated_topics=True)
    d = decision()
    await write(
        settings,
        d,
        unsigned(claim(d, "claimed")),
        unsigned(claim(d, "renewed")),
        signed_by(STRANGER, claim(d, "claimed", claim_id="other")),
    )
    told: list[Notice] = []
    log = await started(settings, "worker", told)
    seen: list[bool] = []

    async def act(takeover: bool) -> FenceOutcome:
        seen.append(takeover)
        return outcome_of(d, "worker")

    try:
        begun = time.monotonic()
        out, did_act = await log.run_once(d, 30.0, act)
        waited = time.monotonic() - begun
        await asyncio.sleep(0.2)
    finally:
        await log.stop()
    assert did_act and seen == [False] and out.driver == "worker"
    assert waited < 10  # not the 30 s lease
    claims = log.of(d.decision_id)
    assert [c.state for c in claims] == ["claimed", "done"] and claims[0].takeover_of is None
    assert len(told) == 1 and told[0].decision_id == d.decision_id


async def test_claims_are_signed_and_a_worker_with_other_keys_is_not_believed(
    fencer_settings: Any,
) -> None:
    """What the log writes verifies under the keyring's claim purpose (not as a decision), and
    a claimant with a keyring this worker does not share is a stranger: its claim is ignored."""
    from fencing.signing import SignatureError, verify_bytes

    settings = fencer_settings(isolated_topics=True)
    d = decision()
    told: list[Notice] = []
    mine = await started(settings, "worker", told)
    stranger = ClaimLog(settings, "stranger", STRANGER)
    await stranger.start()
    try:
        await stranger.append(claim(d, "claimed", claim_id="s1"))  # it reads its own back
        await mine.append(claim(d, "claimed", claim_id="m1"))
        assert [c.claim_id for c in mine.of(d.decision_id)] == ["m1"]
        assert [c.claim_id for c in stranger.of(d.decision_id)] == ["s1"]
        # Fencer's key, but not a claim: a decision signed by the gate, a claim-signed half record.
        decision_record = sign(RING, DECISION, {**d.model_dump(mode="json"), "state": "done"})
        half = sign(RING, CLAIM, {"decision_id": d.decision_id, "state": "done"})
        await write(settings, d, json.dumps(decision_record).encode(), json.dumps(half).encode())
        await mine.append(claim(d, "released", claim_id="m1"))  # read after both
        assert [c.state for c in mine.of(d.decision_id)] == ["claimed", "released"]
        await asyncio.sleep(0.2)
    finally:
        await mine.stop()
        await stranger.stop()
    assert mine.ignored == {d.decision_id: 3} and len(told) == 1
    assert "unknown key id 'k9'" in (told[0].reason or "")
    # The record as written: signed under the claim purpose, with the key id.
    value = signed_by(RING, claim(d, "claimed", claim_id="m1"))
    assert json.loads(value)["signature"]["key_id"] == "k1"
    with pytest.raises(SignatureError):
        verify_bytes(RING, DECISION, value)  # a claim never passes for a decision


async def test_a_forged_done_does_not_stop_a_fence_on_the_lab_bmc(fencer_settings: Any) -> None:
    """The actuate role with the lab's BMC and CloudStack: a forged `done` (success) is on the
    claims topic before the decision comes. The host is powered off, the outcome is a success
    of this worker's, and people are told of the forged claim."""
    from pydantic import SecretStr

    from fencing.records import HostStateRecord
    from fencing.settings import (
        ActuatorSettings,
        CloudStackSettings,
        HostSettings,
        IpmiOverrides,
        IpmiSettings,
        SigningSettings,
    )
    from lab.bmc import BmcSimulator
    from lab.cloudstack_sim import CloudStackSimulator, SimCloud
    from streams.actuating import actuate
    from streams.runtime import Runtime

    sc = SimCloud()
    cluster = sc.add_cluster(sc.add_zone())
    hv = sc.add_host(cluster, "hv1", "10.0.0.11", state="Disconnected")
    sc.add_host(cluster, "hv2", "10.0.0.12")
    sim = CloudStackSimulator(sc)
    await sim.start()
    host = HostRef(host_uuid=hv.uuid, host_name="hv1", cluster_uuid=cluster.uuid)
    d = decision(decision_id=f"{hv.uuid}/1", host=host, episode=1)
    with BmcSimulator(password="pw", power="on") as bmc:
        settings = fencer_settings(
            isolated_topics=True,
            signing=SigningSettings(keys=SecretStr("k1 " + "s" * 40)),
            cloudstack=CloudStackSettings(
                endpoint=sim.url,
                api_key=SecretStr(sim.api_key),
                secret_key=SecretStr(sim.secret_key),
                job_timeout=10,
            ),
            defaults=IpmiSettings(password=SecretStr("pw"), port=bmc.port, action="stop"),
            hosts={hv.uuid: HostSettings(ipmi=IpmiOverrides(address="127.0.0.1"))},
            actuator=ActuatorSettings(claim_lease=2.0, decision_max_age=60.0),
        )
        t = settings.kafka.topics
        fake = outcome_of(d, "attacker").model_dump(mode="json")
        await write(settings, d, unsigned(claim(d, "done", outcome=fake)))
        runtime = Runtime(settings=settings, started_at=0.0)
        told: list[Notice] = []

        async def sink(n: Notice) -> None:
            told.append(n)

        runtime.notice_sink = sink
        producer = AIOKafkaProducer(acks="all", **aiokafka_kwargs(settings))
        await producer.start()
        value = json.dumps(sign(RING, DECISION, d.model_dump(mode="json"))).encode()
        try:
            await runtime.start_actuation()
            record = {
                "decision_id": d.decision_id,
                "episode": 1,
                "state": "fencing",
                "last_evidence": "stale",
            }
            row = HostStateRecord(host=host, record=record, updated_at=time.time())
            await producer.send_and_wait(
                t.host_states, key=hv.uuid.encode(), value=row.model_dump_json().encode()
            )
            meta = await producer.send_and_wait(
                t.fence_decisions, key=hv.uuid.encode(), value=value
            )
            msg = SimpleNamespace(
                key=hv.uuid.encode(),
                value=value,
                topic=t.fence_decisions,
                partition=meta.partition,
                offset=meta.offset,
            )
            out = await actuate(runtime, msg, {})
        finally:
            await producer.stop()
            await runtime.close()
            await sim.stop()
        assert bmc.count("power_off") == 1
    outcome = FenceOutcome.model_validate_json(
        next(v for topic, _, v in out if topic == t.fence_outcomes)
    )
    assert outcome.success and outcome.verified and outcome.driver != "attacker"
    forged = [n for n in told if n.kind is NoticeKind.FORGED_RECORD]
    assert len(forged) == 1 and forged[0].decision_id == d.decision_id
    assert forged[0].topic == t.fence_claims
