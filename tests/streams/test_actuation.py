"""The actuator's last-moment checks and its claim log (streams/actuation.py).

The checks are plain functions over records; the claim log runs against the embedded broker:
two workers racing for one decision, and a follower of a claimant that died."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fencing.events import FenceAction, NoticeKind
from fencing.records import EvidenceSummary, FenceClaim, FenceDecision, FenceOutcome, HostRef
from fencing.signing import DECISION, parse_keys, sign
from streams.actuating import carry_out
from streams.actuation import (
    ClaimLog,
    Forged,
    LogEdges,
    NotNow,
    check_cloudstack,
    check_live,
    check_record,
    forged_notice,
    read_decision,
)

pytestmark = pytest.mark.timeout(120)

RING = parse_keys("k1 " + "s" * 40, "test")
OTHER = parse_keys("k1 " + "t" * 40, "test")


def decision(at: float = 1000.0, **update: Any) -> FenceDecision:
    d = FenceDecision(
        decision_id="h1/2",
        host=HostRef(host_uuid="h1", host_name="kvm01"),
        episode=2,
        action=FenceAction.STOP,
        approved=True,
        evidence=EvidenceSummary(suspect_since=900.0, stale_checks=3),
        decided_at=at,
    )
    return d.model_copy(update=update)


def message(value: bytes, key: bytes | None = b"h1") -> Any:
    return SimpleNamespace(
        key=key, value=value, topic="fencer.fence-decisions", partition=1, offset=7
    )


def signed(d: FenceDecision, ring: Any = RING) -> bytes:
    return (
        FenceDecision.model_validate(sign(ring, DECISION, d.model_dump(mode="json")))
        .model_dump_json()
        .encode()
    )


def test_only_a_signed_decision_for_its_own_key_is_read() -> None:
    d = decision()
    assert read_decision(RING, message(signed(d))) == d
    unsigned = read_decision(RING, message(d.model_dump_json().encode()))
    assert isinstance(unsigned, Forged) and unsigned.reason == "unsigned"
    assert unsigned.claimed_host == "h1" and unsigned.decision_id == "h1/2"
    other = read_decision(RING, message(signed(d, OTHER)))
    assert isinstance(other, Forged) and "bad signature" in other.reason
    moved = read_decision(RING, message(signed(d), key=b"h9"))
    assert isinstance(moved, Forged) and "not the signed host" in moved.reason


def test_a_forged_record_notice_names_topic_partition_offset_and_host() -> None:
    m = message(decision().model_dump_json().encode())
    forged = read_decision(RING, m)
    assert isinstance(forged, Forged)
    n = forged_notice(m, forged, 5.0)
    assert n.kind is NoticeKind.FORGED_RECORD
    assert (n.topic, n.partition, n.offset, n.claimed_host) == (
        "fencer.fence-decisions",
        1,
        7,
        "h1",
    )
    assert n.notice_id == "forged/fencer.fence-decisions/1/7"
    assert "partition 1 offset 7" in (n.reason or "")


def test_a_decision_is_fresh_only_if_appended_while_listening_and_recently() -> None:
    """The age of a record comes from this worker's own samples of the partition's end (a
    monotonic clock), never from the decision's stamp: the end was 5 at t=100 (asked at 100),
    6 at t=101, 9 at t=102 (the baseline settles on the first two answers, 5 and 5)."""
    edges = LogEdges(retention=600.0)
    edges.note(0, 5, 99.0)
    edges.note(0, 5, 100.0)
    for offset in (0, 4):
        with pytest.raises(NotNow, match=r"not read live: the decision \(partition 0 offset"):
            check_live(edges, 0, offset, 120.0, 100.5)
    with pytest.raises(NotNow, match="not read live"):
        check_live(edges, 1, 0, 120.0, 100.5)  # a partition never sampled: backlog
    edges.note(0, 6, 101.0)
    edges.note(0, 9, 102.0)
    # Offset 5 was appended after the sample at 100 (end 5): at most 10.5 s old at 110.5.
    assert check_live(edges, 0, 5, 120.0, 110.5) == pytest.approx(10.5)
    assert check_live(edges, 0, 8, 120.0, 110.5) == pytest.approx(9.5)
    assert check_live(edges, 0, 9, 120.0, 110.5) == pytest.approx(8.5)  # not yet seen at 102
    with pytest.raises(NotNow, match=r"up to 121 s ago .*decision_max_age 120 s"):
        check_live(edges, 0, 5, 120.0, 221.0)
    # Equal ends keep only the latest time: the bound tightens as the samples go on.
    edges.note(0, 9, 200.0)
    assert check_live(edges, 0, 9, 120.0, 210.0) == pytest.approx(10.0)
    # An end lower than seen before once (a broker answering too low) is not believed: it
    # never makes an older record look new.
    edges.note(0, 2, 300.0)
    assert edges.samples[0][-1] == (200.0, 9)
    with pytest.raises(NotNow, match="not read live"):
        check_live(edges, 0, 1, 120.0, 300.5)
    with pytest.raises(NotNow, match="up to 255 s ago"):
        check_live(edges, 0, 6, 120.0, 356.0)


def test_old_samples_are_pruned_and_what_they_bounded_stays_too_old() -> None:
    edges = LogEdges(retention=30.0)
    edges.note(0, 0, 0.0)
    for i in range(1, 100):
        edges.note(0, i, float(i))
    assert len(edges.samples[0]) <= 32
    assert check_live(edges, 0, 98, 10.0, 100.0) == pytest.approx(2.0)
    # Offset 3 was appended between t=3 and t=4: its samples are gone, and it is too old.
    with pytest.raises(NotNow, match="up to"):
        check_live(edges, 0, 3, 10.0, 100.0)
    # The live max age raises the retention (samples for 3 x decision_max_age are kept).
    check_live(edges, 0, 98, 50.0, 100.0)
    assert edges.retention == 150.0


def row(**record: Any) -> dict[str, Any]:
    base = {"decision_id": "h1/2", "episode": 2, "state": "fencing", "last_evidence": "stale"}
    return {"record": {**base, **record}, "host": {"host_uuid": "h1"}}


def test_fencers_own_record_must_back_the_decision() -> None:
    check_record(decision(), row())
    check_record(decision(), row(state="fence_proposed"))
    with pytest.raises(NotNow, match="no record"):
        check_record(decision(), None)
    with pytest.raises(NotNow, match="not this one"):
        check_record(decision(), row(decision_id="h1/1", episode=1))
    with pytest.raises(NotNow, match="not this one"):
        check_record(decision(), row(episode=3))
    for state in ("idle", "suspect", "fenced", "failed", "maintenance", "withheld"):
        with pytest.raises(NotNow, match=f"record of the host is {state}"):
            check_record(decision(), row(state=state))
    for evidence in ("alive", "unknown", None):
        with pytest.raises(NotNow, match="not stale"):
            check_record(decision(), row(last_evidence=evidence))


def test_cloudstack_must_say_down_and_enabled_now() -> None:
    for state in ("Disconnected", "Alert", "Down"):
        check_cloudstack(state, "Enabled")
    for state in ("Up", "Connecting", "Error", "Removed", ""):
        with pytest.raises(NotNow, match="CloudStack says the host is"):
            check_cloudstack(state, "Enabled")
    for rs in (
        "Maintenance",
        "PrepareForMaintenance",
        "ErrorInMaintenance",
        "Disabled",
        "Degraded",
    ):
        with pytest.raises(NotNow, match=f"resource state is {rs}"):
            check_cloudstack("Disconnected", rs)


# ---------------------------------------------------------------------------------------------
# The claim log on the embedded broker


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


async def test_two_claimants_racing_act_once(fencer_settings: Any) -> None:
    settings = fencer_settings(isolated_topics=True)
    a, b = ClaimLog(settings, "worker-a", RING), ClaimLog(settings, "worker-b", RING)
    await a.start()
    await b.start()
    acted: list[str] = []
    d = decision(at=time.time())

    def actor(name: str) -> Any:
        async def act(takeover: bool) -> FenceOutcome:
            acted.append(name)
            await asyncio.sleep(0.5)  # the BMC call
            return outcome_of(d, name)

        return act

    try:
        (oa, acted_a), (ob, acted_b) = await asyncio.gather(
            a.run_once(d, 30.0, actor("a")), b.run_once(d, 30.0, actor("b"))
        )
        assert len(acted) == 1 and acted_a != acted_b
        assert oa == ob  # the loser returns the winner's outcome
        # A third worker started later sees the outcome and does not act.
        c = ClaimLog(settings, "worker-c", RING)
        await c.start()
        try:
            oc, acted_c = await c.run_once(d, 30.0, actor("c"))
        finally:
            await c.stop()
        assert acted_c is False and oc == oa and len(acted) == 1
    finally:
        await a.stop()
        await b.stop()


async def test_a_dead_claimant_is_followed_after_the_lease_with_takeover(
    fencer_settings: Any,
) -> None:
    settings = fencer_settings(isolated_topics=True)
    d = decision(at=time.time())
    dead = ClaimLog(settings, "dead-worker", RING)
    await dead.start()
    # It claimed, then died before the BMC call: no `done` follows.
    await dead.append(
        FenceClaim(
            decision_id=d.decision_id,
            host_uuid="h1",
            claim_id="dead-claim",
            claimed_by="dead-worker",
            state="claimed",
        )
    )
    await dead.stop()
    follower = ClaimLog(settings, "follower", RING)
    await follower.start()
    seen: list[bool] = []

    async def act(takeover: bool) -> FenceOutcome:
        seen.append(takeover)
        return outcome_of(d, "follower")

    try:
        started = time.monotonic()
        out, acted = await follower.run_once(d, 2.0, act)
        waited = time.monotonic() - started
    finally:
        await follower.stop()
    assert acted is True and seen == [True] and out.driver == "follower"
    assert waited >= 2.0  # it waited for the claimant's lease on its own clock first
    claims = follower.of(d.decision_id)
    assert [c.state for c in claims] == ["claimed", "claimed", "done"]
    assert claims[1].takeover_of == "dead-claim"


async def test_a_live_claimant_slower_than_the_lease_keeps_followers_waiting(
    fencer_settings: Any,
) -> None:
    settings = fencer_settings(isolated_topics=True)
    d = decision(at=time.time())
    slow, follower = ClaimLog(settings, "slow", RING), ClaimLog(settings, "follower", RING)
    await slow.start()
    await follower.start()
    acted: list[str] = []

    async def slow_act(takeover: bool) -> FenceOutcome:
        acted.append("slow")
        await asyncio.sleep(4.0)  # four leases: a BMC that takes its time
        return outcome_of(d, "slow")

    async def follower_act(takeover: bool) -> FenceOutcome:
        acted.append("follower")
        return outcome_of(d, "follower")

    try:
        first = asyncio.create_task(slow.run_once(d, 1.0, slow_act))
        await asyncio.sleep(0.5)
        out, did_act = await follower.run_once(d, 1.0, follower_act)
        assert (await first)[0] == out
    finally:
        await slow.stop()
        await follower.stop()
    assert acted == ["slow"] and did_act is False and out.driver == "slow"
    assert "renewed" in [c.state for c in follower.of(d.decision_id)]


async def test_an_outcome_is_kept_when_its_done_claim_cannot_be_written(
    fencer_settings: Any,
) -> None:
    """The BMC acted, then the claim log's producer fails (here: closed under it): the outcome
    is returned all the same (stored and sent by the caller), never lost to an exception that
    the actuate agent logged as "nothing was fenced"."""
    settings = fencer_settings(isolated_topics=True)
    d = decision(at=time.time())
    claims = ClaimLog(settings, "worker", RING)
    await claims.start()
    acted: list[bool] = []

    async def act(takeover: bool) -> FenceOutcome:
        acted.append(takeover)
        assert claims._producer is not None
        await claims._producer.stop()  # the broker connection fails after the BMC acted
        return outcome_of(d, "worker")

    try:
        out, did_act = await claims.run_once(d, 30.0, act)
    finally:
        await claims.stop()
    assert did_act is True and acted == [False] and out.driver == "worker"
    assert [c.state for c in claims.of(d.decision_id)] == ["claimed"]  # no done was written


async def test_a_released_claim_lets_a_later_decision_act_at_once(fencer_settings: Any) -> None:
    settings = fencer_settings(isolated_topics=True)
    d = decision(at=time.time())
    log = ClaimLog(settings, "w", RING)
    await log.start()

    async def refuse(takeover: bool) -> FenceOutcome:
        raise NotNow("the host came back")

    async def act(takeover: bool) -> FenceOutcome:
        return outcome_of(d, "w")

    try:
        with pytest.raises(NotNow):
            await log.run_once(d, 30.0, refuse)
        assert log.open_claims(d.decision_id) == []
        started = time.monotonic()
        _out, acted = await log.run_once(d, 30.0, act)
        assert acted and time.monotonic() - started < 10
    finally:
        await log.stop()


# ---------------------------------------------------------------------------------------------
# Refusing to start


def _fencer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streams.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "FENCER_DEBUG": ""},
    )


@pytest.mark.parametrize("roles", ["actuate", "ingest", "notify,actuate", "all"])
def test_the_gate_and_actuator_roles_refuse_to_start_without_a_key(
    tmp_path: Path, roles: str
) -> None:
    f = tmp_path / "fencer.yaml"
    f.write_text("kafka:\n  bootstrap_servers: 127.0.0.1:1\n")
    p = _fencer("worker", "-c", str(f), "--roles", roles)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("fencer: roles ") and "signing.keys_file is not set" in lines[0]


def test_config_check_refuses_driver_fake_outside_the_lab(tmp_path: Path) -> None:
    f = tmp_path / "fencer.yaml"
    f.write_text("clusters:\n  c1:\n    ipmi:\n      driver: fake\n")
    p = _fencer("config", "check", str(f))
    assert p.returncode == 1 and p.stdout == ""
    assert "clusters.c1.ipmi.driver: driver fake" in p.stderr and "lab: true" in p.stderr
    f.write_text("lab: true\nclusters:\n  c1:\n    ipmi:\n      driver: fake\n")
    p = _fencer("config", "check", str(f))
    assert p.returncode == 0, p.stderr


# ---------------------------------------------------------------------------------------------
# A takeover reads the power first, against a real pyghmi BMC


def _runtime_for(bmc: Any, action: FenceAction) -> Any:
    from fencing.actuator import Actuator
    from fencing.settings import FencerSettings, IpmiSettings, RestartVia
    from streams.runtime import Runtime

    settings = FencerSettings.model_validate(
        {
            "defaults": IpmiSettings(
                action=action, password="pw", restart_via=RestartVia.NONE
            ).model_dump(),
            "hosts": {"h1": {"ipmi": {"address": "127.0.0.1", "port": bmc.port}}},
            "actuator": {"power_timeout": 5, "poll_interval": 0.2, "retries": 0},
        }
    )
    runtime = Runtime(settings=settings, started_at=0.0)
    runtime._actuator = Actuator(settings)
    return runtime


@pytest.mark.parametrize("power", ["on", "off"])
async def test_a_reboot_is_never_repeated_blindly_after_a_dead_claimant(power: str) -> None:
    from lab.bmc import BmcSimulator

    d = decision(at=time.time(), action=FenceAction.REBOOT)
    with BmcSimulator(password="pw", power=power) as bmc:
        out = await carry_out(_runtime_for(bmc, FenceAction.REBOOT), d, takeover=True)
        assert bmc.power == power  # the takeover changed nothing
        changes = ("power_off", "power_on", "power_reset", "power_cycle", "power_shutdown")
        commands = {c for c in changes if bmc.count(c)}
        assert bmc.count("get_power") >= 1  # it did read the power
    assert commands == set()
    assert out.action is FenceAction.REBOOT and out.power_before == power
    if power == "off":
        # Off already: the host is fenced (verified), the VMs may be restarted.
        assert out.success and out.verified and out.power_after == "off"
    else:
        assert not out.success and "never repeated blindly" in (out.error or "")


async def test_a_stop_after_a_dead_claimant_powers_off_only_a_host_still_on() -> None:
    from lab.bmc import BmcSimulator

    for power, offs in (("off", 0), ("on", 1)):
        d = decision(at=time.time())
        with BmcSimulator(password="pw", power=power) as bmc:
            out = await carry_out(_runtime_for(bmc, FenceAction.STOP), d, takeover=True)
            assert bmc.power == "off" and bmc.count("power_off") == offs
        assert out.success and out.verified and out.power_before == power


# ---------------------------------------------------------------------------------------------
# At most once is the shell's: the `actuated` table and the claim log, never the actuator


async def test_a_redelivered_decision_is_answered_from_the_actuated_table(
    fencer_settings: Any,
) -> None:
    """After a restart the table (rebuilt from its changelog) holds the first outcome: a
    redelivery gets it back, and the host's BMC (a real pyghmi one) hears nothing."""
    from pydantic import SecretStr

    from fencing.settings import (
        HostSettings,
        IpmiOverrides,
        IpmiSettings,
        SigningSettings,
    )
    from lab.bmc import BmcSimulator
    from streams.actuating import actuate
    from streams.runtime import Runtime
    from streams.tables import done_entry, put_entry

    d = decision(at=time.time())
    first = outcome_of(d, "the-first-worker")
    table: dict[str, Any] = {}
    put_entry(table, "h1", d.decision_id, done_entry(d, first))
    with BmcSimulator(password="pw", power="on") as bmc:
        settings = fencer_settings(
            isolated_topics=True,
            signing=SigningSettings(keys=SecretStr("k1 " + "s" * 40)),
            defaults=IpmiSettings(password=SecretStr("pw"), port=bmc.port, action="stop"),
            hosts={"h1": HostSettings(ipmi=IpmiOverrides(address="127.0.0.1"))},
        )
        runtime = Runtime(settings=settings, started_at=0.0)
        try:
            out = await actuate(runtime, message(signed(d)), table)
        finally:
            await runtime.close()
        assert bmc.count() == 0 and bmc.power == "on"
    assert out == [(settings.kafka.topics.fence_outcomes, b"h1", first.model_dump_json().encode())]


async def test_an_operator_retry_never_runs_a_fence_that_succeeded() -> None:
    from fencing.records import OperatorAction
    from fencing.settings import FencerSettings
    from streams.actuating import operator_action
    from streams.runtime import Runtime
    from streams.tables import done_entry, put_entry

    d = decision(at=time.time())
    table: dict[str, Any] = {}
    put_entry(table, "h1", d.decision_id, done_entry(d, outcome_of(d, "w")))
    runtime = Runtime(settings=FencerSettings(), started_at=0.0)
    retry = OperatorAction(kind="retry", host_uuid="h1", decision_id=d.decision_id, at=1.0)
    assert await operator_action(runtime, retry, table, "h1") is None
    assert runtime._actuator is None


async def test_sixteen_actors_starting_at_once_share_one_reader_of_each_topic(
    fencer_settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The actuate agent runs 16 actors; each asks the runtime for the last-moment checks, the
    BMC pins and the live settings as it starts. One reader of each topic is started, before
    the first decision (a first fence no longer waits for the pin topic to be read)."""
    from fencing.settings import SigningSettings
    from fencing.signing import write_keys_file
    from streams.actuation import Actuation
    from streams.bmc_pins import BmcPinStore
    from streams.runtime import Runtime
    from streams.settings_store import SettingsStore

    settings = fencer_settings(
        isolated_topics=True,
        signing=SigningSettings(keys_file=write_keys_file(tmp_path / "signing.keys")),
    )
    starts: list[str] = []
    for cls in (Actuation, BmcPinStore, SettingsStore):
        original = cls.start

        async def counted(self: Any, *a: Any, _o: Any = original, **kw: Any) -> Any:
            starts.append(type(self).__name__)
            return await _o(self, *a, **kw)

        monkeypatch.setattr(cls, "start", counted)
    rt = Runtime(settings, started_at=time.time())

    async def actor() -> tuple[Any, Any, Any]:
        await rt.start_actuation()
        return await rt.actuation(), await rt.bmc_pins(), await rt.live()

    try:
        got = await asyncio.gather(*(actor() for _ in range(16)))
        assert sorted(starts) == ["Actuation", "BmcPinStore", "SettingsStore"], starts
        assert len({tuple(map(id, g)) for g in got}) == 1
        assert isinstance(got[0][1], BmcPinStore)  # read, not the refusing stand-in
    finally:
        for service in (rt._actuation, rt._pins, rt._store):
            if service is not None:
                await service.stop()


def test_a_refusal_is_told_once_per_reason_and_renotify_period() -> None:
    """A refused fence is tried again about every check interval while its reason lasts, and a
    decision read again after a restart is refused again: one notice id per decision, kind of
    reason (its figures aside) and renotify period, so people are told once a period."""
    from streams.actuation import refused_notice

    d = decision(at=1000.0)
    old = refused_notice(d, "decision is 73 s old (decision_max_age 10 s)", 7300.0, 3600.0)
    older = refused_notice(d, "decision is 3601 s old (decision_max_age 10 s)", 10799.0, 3600.0)
    assert old.notice_id == older.notice_id  # the same reason, the same period
    down = refused_notice(d, "CloudStack reports the host Up now", 7300.0, 3600.0)
    assert down.notice_id != old.notice_id  # another reason is told
    later = refused_notice(d, "decision is 73 s old (decision_max_age 10 s)", 10800.0, 3600.0)
    assert later.notice_id != old.notice_id  # and the same one again the next period
    assert d.decision_id in old.notice_id and old.reason and "73 s" in old.reason


def test_a_lasting_refusal_is_told_every_period_across_a_wall_clock_step_back() -> None:
    """A refusal whose reason lasts for hours (CloudStack keeps saying Up), tried every minute;
    then NTP steps the actuator's wall clock back three hours. Counted on the wall clock, every
    period's id was one already sent: the notify table dropped them, three hours of silence.
    Counted on the process's monotonic clock, one new id each period; a restarted process
    (another tag) tells at once."""
    from streams.actuation import refused_notice

    d = decision(at=1000.0)
    why = "CloudStack says the host is Up now"
    sent: list[str] = []
    told_at: list[float] = []
    wall, mono = 1_800_000_000.0, 500.0
    for minute in range(6 * 60):
        if minute == 3 * 60:
            wall -= 3 * 3600  # the step back
        n = refused_notice(d, why, wall, 3600.0, mono=mono, tag="p1")
        if n.notice_id not in sent:
            sent.append(n.notice_id)
            told_at.append(mono)
        wall, mono = wall + 60, mono + 60
    told_at.append(mono)  # (and no silence longer than a period at the end)
    gaps = [b - a for a, b in itertools.pairwise(told_at)]
    assert len(sent) >= 6 and max(gaps) <= 3600.0
    again = refused_notice(d, why, wall, 3600.0, mono=mono, tag="p2")  # after a restart
    assert again.notice_id not in sent


# ---------------------------------------------------------------------------------------------
# Fresh on the embedded broker: read live, and soon, by the actuator's own clock


async def test_backlog_is_refused_and_a_decision_read_then_stalled_past_max_age_too(
    fencer_settings: Any,
) -> None:
    """A real Actuation against the session broker and the CloudStack simulator: a decision
    already on fence-decisions when the actuator starts is refused as not read live; one
    appended afterwards and stamped 10 min in the past or the future (the gate's clock far
    off) passes every check; one whose backing host record reaches the actuator only after
    decision_max_age (the actuator stalled in its record wait) is refused by its own clock.
    The actuator's monotonic clock is the real one plus a step the test makes to stand for the
    stall: the limit (30 s) is far above any pause of a loaded machine."""
    from aiokafka import AIOKafkaProducer
    from pydantic import SecretStr

    from fencing.records import HostStateRecord
    from fencing.settings import ActuatorSettings, CloudStackSettings
    from lab.cloudstack_sim import CloudStackSimulator, SimCloud
    from probes.inventory import Inventory
    from streams.actuation import Actuation
    from streams.kafka import aiokafka_kwargs
    from streams.topic_reader import TopicReader

    sc = SimCloud()
    cluster = sc.add_cluster(sc.add_zone())
    hv = sc.add_host(cluster, "hv1", "10.0.0.11", state="Disconnected")
    sim = CloudStackSimulator(sc)
    await sim.start()
    settings = fencer_settings(
        isolated_topics=True,
        cloudstack=CloudStackSettings(
            endpoint=sim.url,
            api_key=SecretStr(sim.api_key),
            secret_key=SecretStr(sim.secret_key),
        ),
        actuator=ActuatorSettings(decision_max_age=30.0),
    )
    t = settings.kafka.topics
    host = HostRef(host_uuid=hv.uuid, host_name="hv1", cluster_uuid=cluster.uuid)
    now = time.time()

    def gate_decision(n: int, decided_at: float) -> FenceDecision:
        return decision(at=decided_at, decision_id=f"{hv.uuid}/{n}", host=host, episode=n)

    producer = AIOKafkaProducer(acks="all", **aiokafka_kwargs(settings))
    await producer.start()

    async def append(topic: str, value: bytes) -> tuple[int, int]:
        meta = await producer.send_and_wait(topic, key=hv.uuid.encode(), value=value)
        return meta.partition, meta.offset

    async def back(d: FenceDecision) -> None:
        record = {
            "decision_id": d.decision_id,
            "episode": d.episode,
            "state": "fencing",
            "last_evidence": "stale",
        }
        value = HostStateRecord(host=host, record=record, updated_at=time.time())
        await append(t.host_states, value.model_dump_json().encode())

    read: dict[tuple[int, int], FenceDecision] = {}

    def on_record(r: Any) -> None:
        parsed = read_decision(RING, r)
        assert isinstance(parsed, FenceDecision)
        read[(r.partition, r.offset)] = parsed

    inventory = Inventory(settings)
    stalled_for = 0.0

    def clock() -> float:
        return time.monotonic() + stalled_for

    act = Actuation(settings, RING, "w", inventory.host, clock=clock)
    reader = TopicReader(settings, [t.fence_decisions], on_record)
    try:
        # 1. On the topic before the actuator began reading it (and backed by the record).
        backlog = gate_decision(1, now)
        await back(backlog)
        at_backlog = await append(t.fence_decisions, signed(backlog))
        await act.start()
        # 2. Appended while it listens, the gate's clock 10 min behind, then 10 min ahead.
        past, future = gate_decision(2, now - 600), gate_decision(3, now + 600)
        at_past = await append(t.fence_decisions, signed(past))
        at_future = await append(t.fence_decisions, signed(future))
        await reader.start()
        assert {at_backlog, at_past, at_future} <= set(read)
        live = settings
        with pytest.raises(NotNow, match="not read live"):
            await act.last_moment(read[at_backlog], live, position=at_backlog)
        await back(past)
        await act.last_moment(read[at_past], live, position=at_past)
        await back(future)
        await act.last_moment(read[at_future], live, position=at_future)
        # 3. Read live, then the actuator waits for fencer's record (its view lags) while its
        # own clock moves on 40 s: the decision is older than decision_max_age (30 s) when it
        # could act.
        stalled = gate_decision(4, now)
        at_stalled = await append(t.fence_decisions, signed(stalled))
        waited = asyncio.create_task(act.last_moment(stalled, live, position=at_stalled))
        await asyncio.sleep(0.5)
        assert not waited.done()
        stalled_for = 40.0
        await back(stalled)
        too_old = r"reached the log up to (4\d|[5-9]\d) s ago .*decision_max_age 30 s"
        with pytest.raises(NotNow, match=too_old):
            await waited
        # The same decision appended again (after a sample at the moved clock) and read at once
        # passes: nothing else was wrong.
        await act.decisions.sample()
        again = await append(t.fence_decisions, signed(stalled))
        await act.last_moment(stalled, live, position=again)
    finally:
        await reader.stop()
        await act.stop()
        await producer.stop()
        await inventory.close()
        await sim.stop()


# ---------------------------------------------------------------------------------------------
# CloudStack asked again before each power-down command of a fence that retries


async def test_a_fence_retrying_its_bmc_asks_cloudstack_again_and_spares_a_host_back_up(
    fencer_settings: Any,
) -> None:
    """The last-moment check passed, then the BMC did not answer for a while (the fence retries
    up to fence_deadline): meanwhile the host came back Up in CloudStack. The retry that
    reaches the BMC must not power it off: NotNow (the claim is released, the decision refused
    and told), the BMC untouched. A confirmation younger than RECHECK_AFTER costs no call."""
    from pydantic import SecretStr

    from fencing.settings import CloudStackSettings
    from lab.bmc import BmcSimulator
    from lab.cloudstack_sim import CloudStackSimulator, SimCloud
    from probes.inventory import Inventory
    from streams.actuation import RECHECK_AFTER, recheck

    sc = SimCloud()
    cluster = sc.add_cluster(sc.add_zone())
    hv = sc.add_host(cluster, "hv1", "10.0.0.11", state="Disconnected")
    sim = CloudStackSimulator(sc)
    await sim.start()
    cs = fencer_settings(
        cloudstack=CloudStackSettings(
            endpoint=sim.url, api_key=SecretStr(sim.api_key), secret_key=SecretStr(sim.secret_key)
        )
    )
    inventory = Inventory(cs)
    asked: list[str] = []

    async def ask(host_uuid: str) -> Any:
        h = await inventory.host(host_uuid)
        asked.append(h.state)
        return h

    step = 0.0
    d = decision(at=time.time(), host=HostRef(host_uuid=hv.uuid, cluster_uuid=cluster.uuid))
    again = recheck(d, ask, clock=lambda: time.monotonic() + step)
    try:
        again.confirmed()  # the last-moment check just passed
        await again()
        assert asked == []  # younger than RECHECK_AFTER: no extra call
        step = RECHECK_AFTER + 1
        await again()
        assert asked == ["Disconnected"]
        with BmcSimulator(password="pw") as bmc:
            rt = _runtime_for(bmc, FenceAction.STOP)
            rt.actuator().settings.actuator.fence_deadline = 20
            rt.actuator().settings.actuator.retry_backoff = 0.2
            rt.actuator().settings.actuator.power_timeout = 1
            bmc.pause()

            async def back_up() -> None:
                nonlocal step
                await asyncio.sleep(1.5)
                sc.set_host_state(hv.uuid, "Up")
                step += RECHECK_AFTER + 1
                await asyncio.sleep(0.3)
                bmc.resume()

            task = asyncio.create_task(back_up())
            with pytest.raises(NotNow, match=r"Up now.*asked again before the power command"):
                await carry_out(
                    rt, d.model_copy(update={"host": HostRef(host_uuid="h1")}), False, again
                )
            await task
            assert bmc.power == "on" and bmc.count("power_off") == 0
        assert asked[-1] == "Up"
    finally:
        await inventory.close()
        await sim.stop()


# ---------------------------------------------------------------------------------------------
# A claimant that fenced, had CloudStack restart the VMs, and died before its `done`


@pytest.mark.parametrize("claim_left", [True, False])
async def test_a_fence_done_by_a_claimant_that_died_before_its_done_ends_in_an_outcome(
    fencer_settings: Any, claim_left: bool
) -> None:
    """Worker A claimed the decision, powered the host off (verified), declareHostAsDegraded
    ran (resource state Degraded, the VM restarted elsewhere), and A died before writing its
    `done`. The decision comes again (re-proposed): CloudStack now says Disconnected and
    Degraded. With A's claim open, the follower waits out A's lease, takes over, reads the power
    (off: fenced, no power command) and ends the decision with a success outcome (the restart
    call answers "already done"). Before, every re-proposal was refused ("resource state is
    Degraded"): no outcome ever, "refused" told about a fenced host. Without an open claim
    (someone else declared the host Degraded) it is refused as before."""
    from aiokafka import AIOKafkaProducer
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
    from streams.kafka import aiokafka_kwargs
    from streams.runtime import Runtime

    sc = SimCloud()
    cluster = sc.add_cluster(sc.add_zone())
    hv = sc.add_host(cluster, "hv1", "10.0.0.11", state="Disconnected")
    sc.add_host(cluster, "hv2", "10.0.0.12")
    vm = sc.add_vm(hv, "vm1")
    sc.run_declare_degraded(hv)  # what worker A's restart call did before it died
    assert hv.resourcestate == "Degraded" and sc.vms[vm.uuid].host_uuid != hv.uuid
    sim = CloudStackSimulator(sc)
    await sim.start()
    host = HostRef(host_uuid=hv.uuid, host_name="hv1", cluster_uuid=cluster.uuid)
    d = decision(at=time.time(), decision_id=f"{hv.uuid}/1", host=host, episode=1)
    with BmcSimulator(password="pw", power="off") as bmc:  # A powered it off
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
        if claim_left:
            dead = ClaimLog(settings, "worker-a", RING)
            await dead.start()
            claim = FenceClaim(
                decision_id=d.decision_id,
                host_uuid=hv.uuid,
                claim_id="a-claim",
                claimed_by="worker-a",
                state="claimed",
            )
            await dead.append(claim)
            await dead.stop()
        runtime = Runtime(settings=settings, started_at=0.0)
        producer = AIOKafkaProducer(acks="all", **aiokafka_kwargs(settings))
        await producer.start()
        try:
            await runtime.start_actuation()  # listening before the decision comes again
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
                t.fence_decisions, key=hv.uuid.encode(), value=signed(d)
            )
            msg = SimpleNamespace(
                key=hv.uuid.encode(),
                value=signed(d),
                topic=t.fence_decisions,
                partition=meta.partition,
                offset=meta.offset,
            )
            table: dict[str, Any] = {}
            out = await actuate(runtime, msg, table)
        finally:
            await producer.stop()
            await runtime.close()
            await sim.stop()
        assert bmc.count("power_off") == 0 and bmc.count("power_on") == 0
    outcome = FenceOutcome.model_validate_json(
        next(v for topic, _, v in out if topic == t.fence_outcomes)
    )
    if claim_left:
        assert outcome.success and outcome.verified and outcome.power_before == "off"
        assert (outcome.cloudstack_result or "").startswith("already done")
        assert table[hv.uuid][d.decision_id]  # the outcome is kept: a redelivery gets it
    else:
        assert outcome.refused and "resource state is Degraded" in (outcome.error or "")


async def test_a_follower_waiting_on_a_claim_that_is_released_acts_at_once_not_as_takeover(
    fencer_settings: Any,
) -> None:
    """A decision read twice (a rebalance): B waits on A's claim; A is refused after claiming
    (its recheck found the host back, or CloudStack unanswering) and releases it. B goes on at
    once as a first claimant, not a lease later as the takeover of a dead claimant (which
    reads the power first and never repeats a reboot: an operator would be asked for nothing)."""
    settings = fencer_settings(isolated_topics=True)
    d = decision(at=time.time())
    a, b = ClaimLog(settings, "worker-a", RING), ClaimLog(settings, "worker-b", RING)
    await a.start()
    await b.start()
    seen: list[bool] = []

    async def refuse(takeover: bool) -> FenceOutcome:
        await asyncio.sleep(1.0)  # the BMC retries, then the recheck refuses
        raise NotNow("CloudStack says the host is Up now")

    async def act(takeover: bool) -> FenceOutcome:
        seen.append(takeover)
        return outcome_of(d, "worker-b")

    try:
        first = asyncio.create_task(a.run_once(d, 20.0, refuse))
        await asyncio.sleep(0.5)
        started = time.monotonic()
        out, acted = await b.run_once(d, 20.0, act)
        waited = time.monotonic() - started
        with pytest.raises(NotNow):
            await first
    finally:
        await a.stop()
        await b.stop()
    assert acted and seen == [False] and out.driver == "worker-b"
    assert waited < 10  # not the 20 s lease


async def test_a_claim_renewed_for_ever_lapses_after_the_fence_deadline_and_two_leases(
    fencer_settings: Any,
) -> None:
    """A claimant whose action hangs while its renewal task runs (or its genuine renewals
    written to the log again and again) held a follower waiting for good, told once at the
    start. The follower takes over once the wait passed actuator.fence_deadline,
    cloudstack.job_timeout and two leases:
    as a takeover (the power read first, a reboot never repeated)."""
    settings = fencer_settings(isolated_topics=True)
    settings.actuator.fence_deadline = 2.0
    settings.cloudstack.job_timeout = 1
    d = decision(at=time.time())
    a, b = ClaimLog(settings, "worker-a", RING), ClaimLog(settings, "worker-b", RING)
    await a.start()
    await b.start()
    seen: list[bool] = []

    async def hang(takeover: bool) -> FenceOutcome:
        await asyncio.sleep(3600)  # an action that never returns; the renewals go on
        raise AssertionError("unreachable")

    async def act(takeover: bool) -> FenceOutcome:
        seen.append(takeover)
        return outcome_of(d, "worker-b")

    lease = 1.5
    try:
        first = asyncio.create_task(a.run_once(d, lease, hang))
        await asyncio.sleep(0.5)
        started = time.monotonic()
        out, acted = await asyncio.wait_for(b.run_once(d, lease, act), 30)
        waited = time.monotonic() - started
        first.cancel()
    finally:
        await a.stop()
        await b.stop()
    assert acted and seen == [True] and out.driver == "worker-b"
    assert 3.0 + 2 * lease - 0.5 <= waited < 3.0 + 2 * lease + 5


async def test_the_last_moment_cloudstack_check_retries_a_failing_api_and_never_takes_it_as_yes(
    fencer_settings: Any,
) -> None:
    """CloudStack's API answers 530 (or too slowly) at the last moment: tried three times, a
    yes only from an answer; three failures refuse (NotNow), the host is never taken as down."""
    from pydantic import SecretStr

    from fencing.settings import CloudStackSettings
    from lab.cloudstack_sim import CloudStackSimulator, SimCloud
    from probes.inventory import Inventory
    from streams.actuation import cloudstack_confirms

    sc = SimCloud()
    cluster = sc.add_cluster(sc.add_zone())
    hv = sc.add_host(cluster, "hv1", "10.0.0.11", state="Disconnected")
    sim = CloudStackSimulator(sc)
    await sim.start()
    settings = fencer_settings(
        cloudstack=CloudStackSettings(
            endpoint=sim.url,
            api_key=SecretStr(sim.api_key),
            secret_key=SecretStr(sim.secret_key),
            timeout=1,
        )
    )
    inventory = Inventory(settings)
    d = decision(at=time.time(), host=HostRef(host_uuid=hv.uuid))
    try:
        sc.fail_next_calls["listhosts"] = 2
        await cloudstack_confirms(d, inventory.host)  # the third answer says Disconnected
        sc.fail_next_calls["listhosts"] = 3
        with pytest.raises(NotNow, match=r"cannot be asked now.*530.*not a yes"):
            await cloudstack_confirms(d, inventory.host)
        sc.api_stall, sc.stall_next_calls["listhosts"] = 5.0, 3  # longer than 3 x timeout
        with pytest.raises(NotNow, match=r"no answer .* within 3 s"):
            await cloudstack_confirms(d, inventory.host)
        assert sc.fail_next_calls["listhosts"] == 0 and sc.stall_next_calls["listhosts"] == 0
    finally:
        await inventory.close()
        await sim.stop()


async def test_a_claim_log_that_cannot_be_written_refuses_and_nothing_is_done(
    fencer_settings: Any,
) -> None:
    """The fence-claims producer fails before the claim: a refusal (NotNow, so an outcome and
    a fence_refused notice), the action never run; it was an exception the actuate agent only
    dead-lettered, nobody told, the host's record waiting fencing_resend_after."""
    settings = fencer_settings(isolated_topics=True)
    d = decision(at=time.time())
    claims = ClaimLog(settings, "worker", RING)
    await claims.start()
    acted: list[bool] = []

    async def act(takeover: bool) -> FenceOutcome:
        acted.append(takeover)
        return outcome_of(d, "worker")

    try:
        assert claims._producer is not None
        await claims._producer.stop()  # the broker connection fails before the claim
        with pytest.raises(NotNow, match="claim could not be written"):
            await claims.run_once(d, 30.0, act)
    finally:
        await claims.stop()
    assert acted == [] and claims.of(d.decision_id) == []


async def test_the_claim_log_reader_survives_a_cancelled_error_of_aiokafka_own(
    fencer_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiokafka can raise its own fetch task's CancelledError out of a read (a lost broker):
    the fence-claims reader (a TopicReader, like the host-states view and the pins) ended for
    good with no word, every later claim was never read back (every fence refused after 30 s),
    and a view frozen. It reads on through a new consumer, each record once."""
    from aiokafka import AIOKafkaConsumer

    settings = fencer_settings(isolated_topics=True)
    d = decision(at=time.time())
    claims = ClaimLog(settings, "worker", RING)
    await claims.start()
    real = AIOKafkaConsumer.getmany
    raised: list[int] = []

    async def getmany(self: AIOKafkaConsumer, *args: Any, **kwargs: Any) -> Any:
        if not raised:
            raised.append(1)
            raise asyncio.CancelledError()  # as aiokafka's own fetch task's
        return await real(self, *args, **kwargs)

    def claim(n: int) -> FenceClaim:
        return FenceClaim(
            decision_id=d.decision_id,
            host_uuid="h1",
            claim_id=f"c{n}",
            claimed_by="worker",
            state="claimed",
        )

    try:
        await claims.append(claim(1))  # written and read back
        monkeypatch.setattr(AIOKafkaConsumer, "getmany", getmany)
        await asyncio.sleep(1.0)
        assert raised
        await claims.append(claim(2))  # read back: the reader read on
        assert [c.claim_id for c in claims.of(d.decision_id)] == ["c1", "c2"]
    finally:
        await claims.stop()


async def test_the_end_offset_sampler_survives_a_cancelled_error_of_aiokafka_own(
    fencer_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fence-decisions end-offset sampler (freshness on this worker's clock) ended for good
    on a CancelledError that aiokafka raised of its own task: every later decision looked older
    and older and was refused as lagged until a restart. It samples on."""
    from aiokafka import AIOKafkaConsumer

    from streams.actuation import DecisionLog

    settings = fencer_settings(isolated_topics=True)
    sampler = DecisionLog(settings, period=0.1)
    real = AIOKafkaConsumer.end_offsets
    raised: list[int] = []

    async def end_offsets(self: AIOKafkaConsumer, *args: Any, **kwargs: Any) -> Any:
        if not raised:
            raised.append(1)
            raise asyncio.CancelledError()  # as aiokafka's own task's
        return await real(self, *args, **kwargs)

    await sampler.start()
    try:
        monkeypatch.setattr(AIOKafkaConsumer, "end_offsets", end_offsets)
        await asyncio.sleep(0.5)
        assert raised
        before = max(t for t, _ in sampler.edges.samples[0])
        await asyncio.sleep(0.5)
        assert max(t for t, _ in sampler.edges.samples[0]) > before  # still sampling
        assert sampler._task is not None and not sampler._task.done()
    finally:
        await sampler.stop()
