"""A real `fencer worker` owns the gates partition, has reconciled its rows with the decision
log; then a stalled former owner wakes and publishes an approval it judged before its stall
(signed with fencer's key, stamped on its own clock). The worker's gate tails the log: the next
proposal of the cluster meets the late fence at the cap of 1. Real peers: the embedded broker,
the lab's CloudStack and worker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from fencing.events import FenceAction, WithheldReason
from fencing.records import EvidenceSummary, FenceDecision, FenceProposal, HostRef
from lab.cloud import LabCloud
from lab.pipeline import Tap, WorkerProcess, write_settings
from streams.broker import EmbeddedBroker
from streams.codec import dump
from streams.runtime import Runtime

pytestmark = pytest.mark.timeout(240)


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


async def test_a_worker_counts_a_late_decision_published_after_its_reconciliation(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    async with LabCloud(broker, hosts=4, interval=0.5, root=tmp_path / "lab") as lab:
        settings = lab.settings(fence_cap=1, global_cap=5, check_interval=1.0)
        file = write_settings(settings, tmp_path / "fencer.yaml")
        t = settings.kafka.topics
        tap = await Tap(settings).start([t.fence_proposals, t.fence_decisions])
        log = tmp_path / "worker.log"
        worker = WorkerProcess(file, "all", log).start()
        cluster = lab.cluster.uuid
        try:
            await tap.wait_for(
                lambda: any(v.get("kind") == "cluster_size" for _, v in tap.of(t.fence_proposals)),
                90,
                "the worker to poll CloudStack",
            )
            # The owner's timer took the rows over once the log was read: the tail follows.
            await tap.wait_for(
                lambda: "the decision log is tailed from" in log.read_text(),
                60,
                "the gate to tail the decision log",
            )
            stalled = ghost(9, cluster)
            late = Runtime(settings=settings, started_at=0.0).sign_decision(
                FenceDecision(
                    decision_id=stalled.decision_id,
                    host=stalled.host,
                    episode=1,
                    action=FenceAction.STOP,
                    approved=True,
                    evidence=stalled.evidence,
                    decided_at=time.time() - 5,
                    budget_used=1,
                    budget_cap=1,
                    decided_clock="stalled-owner:4242:1800000000.000",
                )
            )
            await tap.send(t.fence_decisions, late.host.host_uuid, dump(late))
            await tap.wait_for(
                lambda: late.decision_id in log.read_text(),
                30,
                "the gate's tail to read the late decision",
            )
            second = ghost(1, cluster)
            await tap.send(t.fence_proposals, cluster, second)
            verdict = await tap.wait_for(
                lambda: next(
                    (
                        v
                        for _, v in tap.of(t.fence_decisions)
                        if v.get("decision_id") == second.decision_id
                    ),
                    None,
                ),
                60,
                "the second decision",
            )
        finally:
            await asyncio.to_thread(worker.stop, 10)
            await tap.stop()
        assert (verdict["approved"], verdict["withheld_reason"]) == (
            False,
            WithheldReason.CAP_REACHED.value,
        )
        assert verdict["budget_used"] == 1
        assert "a former owner published it late" in log.read_text()
