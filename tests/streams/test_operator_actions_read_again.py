"""Operator actions read again after a restart (operator-actions is at least once), against
real peers: the session's Kafka broker, a real Ceph (blocklist entries) and the lab's pyghmi
BMC. A lift names the entry it lifts and lifts only while fencer's notices record that fence's
entry; a lift or a pin confirmation read again by position does nothing; a lift naming no entry
is carried out only if read live and fencer records no entry of its own for the host; a
confirmation whose BMC reports another GUID than the one the operator saw pins nothing and
notifies."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr

from fencing.blocklist import parse_ls
from fencing.events import FenceAction, NoticeKind
from fencing.outcome import storage_notice
from fencing.records import EvidenceSummary, FenceDecision, HostRef, Notice, OperatorAction
from fencing.settings import (
    FencerSettings,
    HostSettings,
    IpmiOverrides,
    IpmiSettings,
    RbdSettings,
    SigningSettings,
)
from fencing.storage_fence import StorageFenceResult
from lab.bmc import BmcSimulator
from streams import actuating
from streams.codec import dump
from streams.kafka import aiokafka_kwargs
from streams.runtime import Runtime
from tests.conftest import Ceph

pytestmark = pytest.mark.timeout(180)

HOST = "7d5c1c3e-0000-4000-8000-00000000a001"
ADDRESS = "10.77.0.5"
ENTRY = f"{ADDRESS}:0/0"


class Shell:
    """A Runtime as the actuate worker builds it, its notices published on the notices topic
    (the worker's fold reads them back) and kept in `sent`."""

    def __init__(self, settings: FencerSettings) -> None:
        self.settings = settings
        self.rt = Runtime(settings=settings, started_at=time.time())
        self.sent: list[Notice] = []
        self.table: dict[str, Any] = {}
        self.producer = AIOKafkaProducer(acks="all", **aiokafka_kwargs(settings))
        self.rt.notice_sink = self.notice

    async def start(self) -> Shell:
        await self.producer.start()
        return self

    async def notice(self, n: Notice) -> None:
        self.sent.append(n)
        await self.send(self.settings.kafka.topics.notices, n.host.host_uuid, dump(n))

    async def send(self, topic: str, key: str, value: bytes) -> tuple[int, int]:
        meta = await self.producer.send_and_wait(topic, key=key.encode(), value=value)
        return meta.partition, meta.offset

    async def fence_blocklisted(self, decision_id: str) -> None:
        """The notice the actuator's storage rung sends once it blocklisted the host."""
        now = time.time()
        d = FenceDecision(
            decision_id=decision_id,
            host=HostRef(host_uuid=HOST),
            episode=1,
            action=FenceAction.STOP,
            approved=True,
            evidence=EvidenceSummary(suspect_since=now - 60, stale_checks=3),
            decided_at=now,
        )
        r = StorageFenceResult(HOST, ADDRESS, ENTRY, True, True, f"blocklist {ENTRY} verified")
        await self.notice(storage_notice(d, r, True, None, now))

    async def lift(
        self, position: tuple[int, int], entry: str | None = None, fence: str | None = None
    ) -> None:
        action = OperatorAction(
            kind="lift_blocklist",
            host_uuid=HOST,
            by="ops-anna",
            at=time.time(),
            blocklist_entry=entry,
            decision_id=fence,
        )
        await actuating.operator_action(self.rt, action, self.table, HOST, position)

    def told(self, kind: NoticeKind) -> list[Notice]:
        return [n for n in self.sent if n.kind is kind]

    async def stop(self) -> None:
        await self.producer.stop()
        await self.rt.close()


def listed(ceph: Ceph) -> list[str]:
    out = ceph.cluster.run("ceph", "osd", "blocklist", "ls", "--format", "json").stdout
    return [str(e.get("addr")) for e in parse_ls(out)]


@pytest.fixture
async def shell(fencer_settings: Any, ceph_clean: Ceph) -> AsyncIterator[Shell]:
    settings = fencer_settings(
        isolated_topics=True,
        rbd=RbdSettings.model_validate(ceph_clean.rbd_settings()),
        hosts={HOST: HostSettings(storage_ip=ADDRESS)},
        signing=SigningSettings(keys=SecretStr("k1 " + "s" * 40)),
    )
    s = await Shell(settings).start()
    try:
        yield s
    finally:
        await s.stop()


async def test_a_lift_names_its_entry_and_never_lifts_a_newer_blocklist(
    shell: Shell, ceph_clean: Ceph
) -> None:
    s = shell
    ceph_clean.cluster.run("ceph", "osd", "blocklist", "add", ENTRY, "3600")
    await s.fence_blocklisted("fence-A")
    await s.lift((0, 10), ENTRY, "fence-A")
    assert ENTRY not in listed(ceph_clean)
    assert [n.blocklist_entry for n in s.told(NoticeKind.BLOCKLIST_LIFTED)] == [ENTRY]
    assert s.table[HOST][actuating.mark_key(s.rt, "blocklist_lift")] == [0, 10, "done"]

    # Later fencer fences the host again: entry B, the same address.
    ceph_clean.cluster.run("ceph", "osd", "blocklist", "add", ENTRY, "3600")
    await s.fence_blocklisted("fence-B")
    # The old lift read again after a restart: skipped by its position, B stays.
    await s.lift((0, 10), ENTRY, "fence-A")
    # The same request under another position (a table that lost its mark): fencer's records
    # say the entry is fence B's now, not A's: not lifted, and people are told.
    await s.lift((0, 11), ENTRY, "fence-A")
    assert ENTRY in listed(ceph_clean)
    (refused,) = s.told(NoticeKind.BLOCKLIST_NOT_LIFTED)
    assert "added again by fence fence-B after fence fence-A" in (refused.reason or "")
    # A request naming no entry while fencer records one (which may be newer): not lifted.
    await s.lift((0, 12))
    assert ENTRY in listed(ceph_clean)
    assert "names no entry, and fencer's records show entry" in (
        s.told(NoticeKind.BLOCKLIST_NOT_LIFTED)[-1].reason or ""
    )
    # The operator lifts B by name: lifted.
    await s.lift((0, 13), ENTRY, "fence-B")
    assert ENTRY not in listed(ceph_clean)
    assert len(s.told(NoticeKind.BLOCKLIST_LIFTED)) == 2


async def test_a_lift_cut_short_by_a_restart_is_not_run_again_and_people_are_told(
    shell: Shell, ceph_clean: Ceph
) -> None:
    s = shell
    ceph_clean.cluster.run("ceph", "osd", "blocklist", "add", ENTRY, "3600")
    await s.fence_blocklisted("fence-A")
    s.table[HOST] = {actuating.mark_key(s.rt, "blocklist_lift"): [0, 4, "started"]}  # dead
    await s.lift((0, 4), ENTRY, "fence-A")
    assert ENTRY in listed(ceph_clean)
    (n,) = s.told(NoticeKind.BLOCKLIST_NOT_LIFTED)
    assert "a restart cut this lift short" in (n.reason or "")
    await s.lift((0, 3), ENTRY, "fence-A")  # older still: skipped silently
    assert len(s.sent) == 2 and ENTRY in listed(ceph_clean)


async def test_a_lift_naming_no_entry_runs_only_if_read_live(
    shell: Shell, ceph_clean: Ceph
) -> None:
    """An entry fencer never added (no record): a request naming none, written while no
    actuator listened, is not carried out; one written while it listens is."""
    s = shell
    ceph_clean.cluster.run("ceph", "osd", "blocklist", "add", ENTRY, "3600")
    topic = s.settings.kafka.topics.operator_actions
    old = OperatorAction(kind="lift_blocklist", host_uuid=HOST, by="ops", at=time.time())
    at_old = await s.send(topic, HOST, dump(old))
    await s.rt.start_actuation()  # the actuator begins listening
    at_new = await s.send(topic, HOST, dump(old.model_copy(update={"at": time.time()})))
    await s.lift(at_old)
    assert ENTRY in listed(ceph_clean)
    (n,) = s.told(NoticeKind.BLOCKLIST_NOT_LIFTED)
    assert "names no entry and is not fresh (not read live" in (n.reason or ""), n.reason
    await s.lift(at_new)
    assert ENTRY not in listed(ceph_clean)
    assert [n.blocklist_entry for n in s.told(NoticeKind.BLOCKLIST_LIFTED)] == [ENTRY]


async def test_a_pin_confirmation_read_again_does_nothing_and_another_guid_pins_nothing(
    fencer_settings: Any,
) -> None:
    old_board = "6a1b7f2e-1111-4a2b-9c3d-000000000001"
    new_board = "6a1b7f2e-2222-4a2b-9c3d-000000000002"

    def confirm(expect: str | None) -> OperatorAction:
        return OperatorAction(
            kind="bmc_pin_confirm",
            host_uuid=HOST,
            by="ops",
            at=time.time(),
            request_id=f"r{time.monotonic_ns()}",
            expect=expect,
        )

    with BmcSimulator(password="pw", guid=old_board) as bmc:
        settings = fencer_settings(
            isolated_topics=True,
            lab=True,
            signing=SigningSettings(keys=SecretStr("k1 " + "s" * 40)),
            defaults=IpmiSettings(password=SecretStr("pw"), port=bmc.port),
            hosts={HOST: HostSettings(ipmi=IpmiOverrides(address="127.0.0.1"))},
        )
        s = await Shell(settings).start()
        try:
            first = confirm(old_board)
            answer = await actuating.bmc_pin_confirm(s.rt, first, s.table, (0, 5))
            assert answer is not None and answer.pinned_guid == old_board, answer
            pins = await s.rt.bmc_pins()
            assert pins.get(HOST).guid == old_board
            # The BMC is swapped: another board answers at the same address.
            bmc.guid = new_board
            asked = bmc.count()
            # The old confirmation read again after a restart: the BMC is not even asked,
            # nothing is pinned, nothing answered.
            assert await actuating.bmc_pin_confirm(s.rt, first, s.table, (0, 5)) is None
            assert await actuating.bmc_pin_confirm(s.rt, first, s.table, (0, 4)) is None
            assert bmc.count() == asked and pins.get(HOST).guid == old_board
            # A new confirmation of the GUID the operator saw: the BMC reports another one.
            again = await actuating.bmc_pin_confirm(s.rt, confirm(old_board), s.table, (0, 6))
            assert again is not None and again.refused == "expect" and not again.success
            assert new_board in (again.error or "") and pins.get(HOST).guid == old_board
            (n,) = s.told(NoticeKind.BMC_IDENTITY_CHANGED)
            assert n.host.host_uuid == HOST and new_board in (n.reason or "")
            assert n.result == "not pinned"
        finally:
            await s.stop()


# ---------------------------------------------------------------------------------------------
# A deleted and recreated operator-actions topic (same name): its offsets start at 0 again


async def read_topic(settings: FencerSettings, topic: str) -> list[Any]:
    """Every record of partition 0 of `topic` as the broker serves it (timestamps included)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(enable_auto_commit=False, **aiokafka_kwargs(settings))
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, 0)
        end = (await consumer.end_offsets([tp]))[tp]
        records: list[Any] = []
        while len(records) < end:
            got = await consumer.getmany(tp, timeout_ms=2000)
            assert got, f"{topic}: {len(records)} of {end} records read"
            records += got[tp]
        return records
    finally:
        await consumer.stop()


async def recreate(settings: FencerSettings, topic: str) -> None:
    """Delete `topic` on the broker and create it again (the session's Tansu can)."""
    from aiokafka.admin import AIOKafkaAdminClient

    from streams.kafka import ensure_topics

    admin = AIOKafkaAdminClient(**aiokafka_kwargs(settings))
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()
    assert topic in await ensure_topics(settings)


def place(record: Any) -> tuple[tuple[int, int], int | None]:
    """(partition, offset) and timestamp, as the operator agent passes them (Faust's message
    carries the timestamp in seconds)."""
    from types import SimpleNamespace

    stamp = actuating.record_stamp(SimpleNamespace(timestamp=record.timestamp / 1000.0))
    assert stamp == record.timestamp
    return (record.partition, record.offset), stamp


async def test_a_confirmation_on_a_recreated_topic_is_carried_out_and_one_read_again_is_not(
    fencer_settings: Any,
) -> None:
    """Three confirmations on operator-actions, the last one carried out (its mark: offset 2 and
    its timestamp). The operator deletes and recreates the topic: a new confirmation at offset
    0 is carried out (the BMC asked, the new GUID pinned); the old records read again are not."""
    old_board = "6a1b7f2e-1111-4a2b-9c3d-000000000001"
    new_board = "6a1b7f2e-2222-4a2b-9c3d-000000000002"

    def confirm(expect: str) -> OperatorAction:
        return OperatorAction(
            kind="bmc_pin_confirm",
            host_uuid=HOST,
            by="ops",
            at=time.time(),
            request_id=f"r{time.monotonic_ns()}",
            expect=expect,
        )

    with BmcSimulator(password="pw", guid=old_board) as bmc:
        settings = fencer_settings(
            isolated_topics=True,
            lab=True,
            signing=SigningSettings(keys=SecretStr("k1 " + "s" * 40)),
            defaults=IpmiSettings(password=SecretStr("pw"), port=bmc.port),
            hosts={HOST: HostSettings(ipmi=IpmiOverrides(address="127.0.0.1"))},
        )
        topic = settings.kafka.topics.operator_actions
        s = await Shell(settings).start()
        try:
            sent = [confirm(old_board) for _ in range(3)]
            for action in sent:
                await s.send(topic, HOST, dump(action))
            old = await read_topic(settings, topic)
            assert [r.offset for r in old] == [0, 1, 2]
            answer = await actuating.bmc_pin_confirm(s.rt, sent[2], s.table, *place(old[2]))
            assert answer is not None and answer.pinned_guid == old_board, answer
            mark = s.table[HOST][actuating.mark_key(s.rt, "bmc_pin_confirm")]
            assert mark == [0, 2, "done", old[2].timestamp]
            pins = await s.rt.bmc_pins()
            # The BMC is swapped; the worker restarts and reads the old confirmations again:
            # nothing done (the log still holds the marked record).
            bmc.guid = new_board
            asked = bmc.count()
            for record, action in zip(old, sent, strict=True):
                assert (
                    await actuating.bmc_pin_confirm(s.rt, action, s.table, *place(record)) is None
                )
            assert bmc.count() == asked and pins.get(HOST).guid == old_board
            # The operator recreates operator-actions and confirms the new board.
            await recreate(settings, topic)
            await s.send(topic, HOST, dump(confirm(new_board)))
            (new,) = await read_topic(settings, topic)
            assert new.offset == 0
            # The new one at offset 0, below the old mark: carried out.
            action = OperatorAction.model_validate_json(new.value)
            answer = await actuating.bmc_pin_confirm(s.rt, action, s.table, *place(new))
            assert answer is not None and answer.pinned_guid == new_board, answer
            assert bmc.count() > asked and pins.get(HOST).guid == new_board
            # And it, read again in turn, is not.
            assert await actuating.bmc_pin_confirm(s.rt, action, s.table, *place(new)) is None
        finally:
            await s.stop()


async def test_a_lift_on_a_recreated_topic_is_carried_out_and_one_read_again_is_not(
    shell: Shell, ceph_clean: Ceph
) -> None:
    s = shell
    topic = s.settings.kafka.topics.operator_actions
    ceph_clean.cluster.run("ceph", "osd", "blocklist", "add", ENTRY, "3600")
    await s.fence_blocklisted("fence-A")

    def lift(fence: str) -> OperatorAction:
        return OperatorAction(
            kind="lift_blocklist",
            host_uuid=HOST,
            by="ops-anna",
            at=time.time(),
            blocklist_entry=ENTRY,
            decision_id=fence,
        )

    first = lift("fence-A")
    for action in (first, first):  # the UI sent it twice
        await s.send(topic, HOST, dump(action))
    old = await read_topic(s.settings, topic)
    await actuating.operator_action(s.rt, first, s.table, HOST, *place(old[1]))
    assert ENTRY not in listed(ceph_clean)
    # Fenced again (entry of fence B), operator-actions recreated, the operator lifts B.
    ceph_clean.cluster.run("ceph", "osd", "blocklist", "add", ENTRY, "3600")
    await s.fence_blocklisted("fence-B")
    # The old records read again after a restart: skipped, silently (B stays).
    for record in old:
        await actuating.operator_action(s.rt, first, s.table, HOST, *place(record))
    assert ENTRY in listed(ceph_clean) and not s.told(NoticeKind.BLOCKLIST_NOT_LIFTED)
    await recreate(s.settings, topic)
    second = lift("fence-B")
    await s.send(topic, HOST, dump(second))
    (new,) = await read_topic(s.settings, topic)
    assert new.offset == 0
    # The new request at offset 0, below the old mark: carried out.
    await actuating.operator_action(s.rt, second, s.table, HOST, *place(new))
    assert ENTRY not in listed(ceph_clean)
    assert len(s.told(NoticeKind.BLOCKLIST_LIFTED)) == 2
    mark = s.table[HOST][actuating.mark_key(s.rt, "blocklist_lift")]
    assert mark == [0, 0, "done", new.timestamp]


async def test_a_lift_or_confirmation_below_its_mark_is_refused_when_the_log_cannot_be_asked(
    fencer_settings: Any,
) -> None:
    """After a restart a request comes below the host's mark, and the broker cannot say what
    the log holds at the mark's offset (unreachable): it may be one read again or a new one on
    a recreated topic. Neither carried out nor skipped silently: nothing lifted or pinned, the
    BMC not asked, no mark written, people told to send the request again."""
    board = "6a1b7f2e-1111-4a2b-9c3d-000000000001"
    t = 1_796_013_066_997  # the marked records' timestamp (ms), at offset 5
    with BmcSimulator(password="pw", guid=board) as bmc:
        settings = fencer_settings(
            isolated_topics=True,
            lab=True,
            signing=SigningSettings(keys=SecretStr("k1 " + "s" * 40)),
            defaults=IpmiSettings(password=SecretStr("pw"), port=bmc.port),
            hosts={HOST: HostSettings(ipmi=IpmiOverrides(address="127.0.0.1"))},
        )
        s = await Shell(settings).start()
        try:
            marks = {
                actuating.mark_key(s.rt, "blocklist_lift"): [0, 5, "done", t],
                actuating.mark_key(s.rt, "bmc_pin_confirm"): [0, 5, "done", t],
            }
            s.table[HOST] = dict(marks)
            down = settings.kafka.model_copy(update={"bootstrap_servers": "127.0.0.1:1"})
            s.rt.settings = settings.model_copy(update={"kafka": down})
            lift = OperatorAction(
                kind="lift_blocklist",
                host_uuid=HOST,
                by="ops-anna",
                at=time.time(),
                blocklist_entry=ENTRY,
                decision_id="fence-A",
            )
            assert await actuating.operator_action(s.rt, lift, s.table, HOST, (0, 2), t + 1) is None
            (n,) = s.told(NoticeKind.BLOCKLIST_NOT_LIFTED)
            assert "send the request again" in (n.reason or "") and "offset 2" in (n.reason or "")
            confirm = OperatorAction(
                kind="bmc_pin_confirm", host_uuid=HOST, by="ops", at=time.time(), request_id="r1"
            )
            answer = await actuating.bmc_pin_confirm(s.rt, confirm, s.table, (0, 3), t + 1)
            assert answer is not None and not answer.success and answer.pinned_guid is None
            assert "send the request again" in (answer.error or ""), answer
            (r,) = s.told(NoticeKind.FENCE_REFUSED)
            assert r.result == "not pinned" and "send the request again" in (r.reason or "")
            assert bmc.count() == 0 and s.table[HOST] == marks
        finally:
            await s.stop()


async def test_record_at_tells_what_the_log_holds_at_a_marks_offset(fencer_settings: Any) -> None:
    """The broker's answer `read_again` places a record below a mark by: the record at the
    offset and its timestamp (set by the producer here), the log's end at or below it, or no
    answer."""
    settings = fencer_settings(isolated_topics=True)
    topic = settings.kafka.topics.operator_actions
    s = await Shell(settings).start()
    try:
        t = 1_796_013_066_997
        for i in range(3):
            meta = await s.producer.send_and_wait(
                topic, key=HOST.encode(), value=b"{}", partition=0, timestamp_ms=t + 1000 * i
            )
            assert meta.offset == i
    finally:
        await s.stop()
    at = await actuating.record_at(settings, topic, 0, 1)
    assert (at.found, at.stamp) == ("record", t + 1000), at
    for offset in (3, 10):  # the log ends at 3
        at = await actuating.record_at(settings, topic, 0, offset)
        assert at.found == "end" and "ends at 3" in at.detail, at
    down = settings.kafka.model_copy(update={"bootstrap_servers": "127.0.0.1:1"})
    at = await actuating.record_at(settings.model_copy(update={"kafka": down}), topic, 0, 1)
    assert at.found == "failed" and "KafkaConnectionError" in at.detail, at
    # A broker that accepts the connection and never answers: failed within the bound.
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen()
    try:
        port = mute.getsockname()[1]
        silent = settings.kafka.model_copy(update={"bootstrap_servers": f"127.0.0.1:{port}"})
        started = asyncio.get_running_loop().time()
        at = await actuating.record_at(
            settings.model_copy(update={"kafka": silent}), topic, 0, 1, within=1.0
        )
        assert at.found == "failed" and "no answer" in at.detail, at
        assert asyncio.get_running_loop().time() - started < 5
    finally:
        mute.close()
