"""A real `fencer worker` whose gate lost the global row's write of a decision: killed (SIGKILL)
after the decision, its gates changelog set back to the global row written before it (what the
changelog holds when the worker dies between the cluster row's write and the global row's),
restarted. The cluster row still holds the grant: the next proposal of another cluster meets it
and the global cap holds. And one that lost both rows' writes of a decision it had published:
the gate reads the decision log at its restart and the cluster cap holds. Real peers: the
embedded broker, the lab's CloudStack and worker."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from aiokafka import ConsumerRecord

from fencing.events import FenceAction
from fencing.records import EvidenceSummary, FenceProposal, GateSignal, HostRef
from lab.cloud import LabCloud
from lab.pipeline import Tap, WorkerProcess, write_settings
from streams.broker import EmbeddedBroker
from streams.topic_reader import TopicReader

pytestmark = pytest.mark.timeout(240)

OTHER_CLUSTER = "00000000-0000-4000-8000-0000000000c2"  # a second cluster, told by its size


def ghost(n: int, cluster: str) -> FenceProposal:
    """A proposal for a host CloudStack does not know: the gate judges it, nothing is fenced."""
    host = f"00000000-0000-4000-8000-{n:012d}"
    at = time.time()
    return FenceProposal(
        decision_id=f"{host}/1/{int(at)}",
        host=HostRef(host_uuid=host, cluster_uuid=cluster, host_name=f"ghost{n}"),
        episode=1,
        action=FenceAction.STOP,
        evidence=EvidenceSummary(suspect_since=at - 60, stale_checks=3),
        proposed_at=at,
    )


async def changelog(tap: Tap, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    records: list[ConsumerRecord[bytes, bytes]] = []
    reader = TopicReader(tap.settings, [topic], records.append)
    await reader.start()
    await reader.stop()
    return records


def global_key(record: ConsumerRecord[bytes, bytes]) -> bool:
    return record.key is not None and record.key.decode().strip('"') == "*"


async def test_a_lost_global_row_write_still_counts_toward_the_global_cap(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    async with LabCloud(broker, hosts=4, interval=0.5, root=tmp_path / "lab") as lab:
        settings = lab.settings(fence_cap=3, global_cap=2, check_interval=1.0)
        file = write_settings(settings, tmp_path / "fencer.yaml")
        t = settings.kafka.topics
        gates = f"{settings.kafka.group_id}-gates-changelog"
        tap = await Tap(settings).start([t.fence_proposals, t.fence_decisions])
        log = tmp_path / "worker.log"
        worker = WorkerProcess(file, "all", log).start()
        try:

            def decisions() -> list[dict[str, object]]:
                return [v for _, v in tap.of(t.fence_decisions)]

            await tap.wait_for(
                lambda: any(v.get("kind") == "cluster_size" for _, v in tap.of(t.fence_proposals)),
                90,
                "the worker to poll CloudStack",
            )
            cluster = lab.cluster.uuid
            first, second = ghost(1, cluster), ghost(2, cluster)
            for p in (first, second):
                await tap.send(t.fence_proposals, cluster, p)
            await tap.wait_for(lambda: len(decisions()) >= 2, 60, "2 decisions")
            assert [d["approved"] for d in decisions()] == [True, True]
            # The gates changelog holds the global row twice: 1 grant, then 2.
            deadline = time.monotonic() + 30
            while True:
                rows = [r for r in await changelog(tap, gates) if global_key(r)]
                grants = [len(json.loads(r.value)["grants"]) for r in rows if r.value]
                if grants[-1:] == [2]:
                    break
                assert time.monotonic() < deadline, grants
                await asyncio.sleep(0.5)
            worker.kill()
            before = next(r for r in rows if r.value and len(json.loads(r.value)["grants"]) == 1)
            assert before.key is not None and before.value is not None
            await tap.send(gates, before.key, before.value)  # the global write lost
            put_back = len(rows) + 1  # global rows in the changelog, the one put back included
            worker = WorkerProcess(file, "all", log).start()

            size = GateSignal(
                kind="cluster_size", cluster_uuid=OTHER_CLUSTER, at=time.time(), host_count=10
            )
            await tap.send(t.fence_proposals, OTHER_CLUSTER, size)
            third = ghost(3, OTHER_CLUSTER)
            await tap.send(t.fence_proposals, OTHER_CLUSTER, third)
            await tap.wait_for(lambda: len(decisions()) >= 3, 90, "the third decision")
            # The global row written with this judgement holds both grants again, once each. The
            # worker sends the decision before its changelog write reaches the broker: wait for a
            # global row after the one put back above.
            deadline = time.monotonic() + 30
            while True:
                rows = [r for r in await changelog(tap, gates) if global_key(r)]
                if len(rows) > put_back:
                    break
                assert time.monotonic() < deadline, "no global row written after the judgement"
                await asyncio.sleep(0.5)
            last = rows[-1]
            assert last.value is not None
            held = [g["decision_id"] for g in json.loads(last.value)["grants"]]
            assert held == [first.decision_id, second.decision_id]
        finally:
            await asyncio.to_thread(worker.stop, 10)
            await tap.stop()
        verdict = decisions()[-1]
        assert verdict["decision_id"] == third.decision_id
        assert (verdict["approved"], verdict["withheld_reason"]) == (False, "global_cap_reached")
        assert len(decisions()) == 3, decisions()


def row_key(record: ConsumerRecord[bytes, bytes], key: str) -> bool:
    return record.key is not None and record.key.decode().strip('"') == key


async def test_a_published_decision_whose_two_row_writes_were_lost_counts_at_the_cluster_cap(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """Killed after its second decision reached fence-decisions, the gates changelog set back to
    the rows of both (the cluster's and the shared one) written before it: the worker died
    before either write. Restarted, the gate reads the decision log: the cluster's third
    proposal is withheld at its cap of 2."""
    async with LabCloud(broker, hosts=4, interval=0.5, root=tmp_path / "lab") as lab:
        settings = lab.settings(fence_cap=2, global_cap=5, check_interval=1.0)
        file = write_settings(settings, tmp_path / "fencer.yaml")
        t = settings.kafka.topics
        gates = f"{settings.kafka.group_id}-gates-changelog"
        tap = await Tap(settings).start([t.fence_proposals, t.fence_decisions])
        log = tmp_path / "worker.log"
        worker = WorkerProcess(file, "all", log).start()
        cluster = lab.cluster.uuid
        try:

            def decisions() -> list[dict[str, object]]:
                return [v for _, v in tap.of(t.fence_decisions)]

            await tap.wait_for(
                lambda: any(v.get("kind") == "cluster_size" for _, v in tap.of(t.fence_proposals)),
                90,
                "the worker to poll CloudStack",
            )
            first, second = ghost(1, cluster), ghost(2, cluster)
            for p in (first, second):
                await tap.send(t.fence_proposals, cluster, p)
            await tap.wait_for(lambda: len(decisions()) >= 2, 60, "2 decisions")
            assert [d["approved"] for d in decisions()] == [True, True]
            # Both rows in the changelog twice: 1 grant, then 2.
            deadline = time.monotonic() + 30
            while True:
                records = await changelog(tap, gates)
                counts = {
                    key: [
                        len(json.loads(r.value)["grants"])
                        for r in records
                        if row_key(r, key) and r.value
                    ]
                    for key in (cluster, "*")
                }
                if all(c[-1:] == [2] for c in counts.values()):
                    break
                assert time.monotonic() < deadline, counts
                await asyncio.sleep(0.5)
            worker.kill()
            for key in (cluster, "*"):
                older = next(
                    r
                    for r in records
                    if row_key(r, key) and r.value and len(json.loads(r.value)["grants"]) == 1
                )
                assert older.key is not None and older.value is not None
                await tap.send(gates, older.key, older.value)  # both writes lost
            put_back = sum(1 for r in records if row_key(r, cluster)) + 1
            worker = WorkerProcess(file, "all", log).start()

            third = ghost(3, cluster)
            await tap.send(t.fence_proposals, cluster, third)
            await tap.wait_for(
                lambda: any(d["decision_id"] == third.decision_id for d in decisions()),
                90,
                "the third decision",
            )
            # The cluster row written with the third judgement (after the one put back).
            deadline = time.monotonic() + 30
            while True:
                rows = [r for r in await changelog(tap, gates) if row_key(r, cluster)]
                if len(rows) > put_back and rows[-1].value:
                    break
                assert time.monotonic() < deadline, "no cluster row written after the judgement"
                await asyncio.sleep(0.5)
        finally:
            await asyncio.to_thread(worker.stop, 10)
            await tap.stop()
        # Decisions of different hosts are on different partitions: the tap's order across
        # them is not the order they were judged in (the gate's clock stamps that).
        judged = sorted(decisions()[2:], key=lambda d: float(str(d["decided_at"])))
        verdict = judged[-1]
        assert verdict["decision_id"] == third.decision_id
        assert (verdict["approved"], verdict["withheld_reason"]) == (False, "cap_reached")
        assert verdict["budget_used"] == 2
        # Before the worker died its proposals' offsets may not have been committed: the
        # restarted worker may read the second proposal again. Then it is the same approval
        # again (a repeat, nothing consumed): the row counts the second fence once, stamped with
        # the decision the log holds, not as a fresh grant of the replay.
        again = judged[:-1]
        assert all(d["decision_id"] == second.decision_id and d["approved"] for d in again)
        first_at = {d["decision_id"]: d["decided_at"] for d in reversed(decisions())}
        held = [(g["decision_id"], g["at"]) for g in json.loads(rows[-1].value)["grants"]]
        assert held == [(p.decision_id, first_at[p.decision_id]) for p in (first, second)]
        assert "signed decisions from" in log.read_text()
