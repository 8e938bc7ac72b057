"""A real `fencer worker` killed (SIGKILL) and started again at once, as a supervisor does
(docker `restart: unless-stopped` within a second): the new worker joins while the broker still
holds the dead member, recovers its tables, and must then read every record produced while it
was down and right after it started. Three kills in a row, each proposal answered by a decision.

Before `streams.kafka.apply_faust_workarounds` the restarted worker often judged none of them:
Faust dropped the records its fetcher read at the end of the table recovery, without a log
line (see streams/kafka.py). Real peers: the embedded broker, the lab's CloudStack, the worker.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from mode.utils.queues import FlowControlEvent, FlowControlQueue

from fencing.events import FenceAction
from fencing.records import EvidenceSummary, FenceProposal, HostRef
from lab.cloud import LabCloud
from lab.pipeline import Tap, WorkerProcess, write_settings
from streams.broker import EmbeddedBroker
from streams.kafka import apply_faust_workarounds, remove_faust_workarounds

pytestmark = pytest.mark.timeout(300)

KILLS = 3
# A restart is one session timeout of the dead member plus a join and a recovery (~6 s here);
# generous for a loaded 2-core machine, far below the 80 s the defect stalled for.
CONSUMED_WITHIN = 45.0


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


async def test_a_worker_killed_and_restarted_at_once_reads_what_was_produced_around_it(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    async with LabCloud(broker, hosts=4, interval=0.5, root=tmp_path / "lab") as lab:
        settings = lab.settings(fence_cap=100, global_cap=100, check_interval=1.0)
        file = write_settings(settings, tmp_path / "fencer.yaml")
        t = settings.kafka.topics
        tap = await Tap(settings).start([t.fence_proposals, t.fence_decisions])
        log = tmp_path / "worker.log"
        worker = WorkerProcess(file, "all", log).start()
        cluster = lab.cluster.uuid
        sent = 0

        def decided() -> set[str]:
            return {str(v.get("decision_id")) for _, v in tap.of(t.fence_decisions)}

        async def propose() -> str:
            nonlocal sent
            sent += 1
            proposal = ghost(sent, cluster)
            await tap.send(t.fence_proposals, cluster, proposal)
            return proposal.decision_id

        try:
            await tap.wait_for(
                lambda: any(v.get("kind") == "cluster_size" for _, v in tap.of(t.fence_proposals)),
                90,
                "the worker to poll CloudStack",
            )
            first = await propose()
            await tap.wait_for(lambda: first in decided(), 60, "the first decision")
            for kill in range(1, KILLS + 1):
                worker.kill()
                killed = time.monotonic()
                meanwhile = await propose()  # waits in the topic while no worker runs
                worker = WorkerProcess(file, "all", log).start()
                wanted = [meanwhile, await propose()]  # ... and one as the new worker starts
                await asyncio.sleep(2.0)  # ... and one while it joins and recovers
                wanted.append(await propose())
                await tap.wait_for(
                    lambda: set(wanted) <= decided(),
                    CONSUMED_WITHIN,
                    f"kill {kill}: decisions for {sorted(set(wanted) - decided())}",
                )
                print(f"kill {kill}: all judged {time.monotonic() - killed:.1f} s after the kill")
                # Some time with a worker that committed, before the next kill.
                await asyncio.sleep(1.0 + kill)
        finally:
            await asyncio.to_thread(worker.stop, 10)
            await tap.stop()
        # Every proposal was judged. One judged just before a kill may be judged again after it
        # (its row's write died with the worker; at least once): then with the same verdict.
        verdicts: dict[str, set[object]] = {}
        for _, v in tap.of(t.fence_decisions):
            verdicts.setdefault(str(v.get("decision_id")), set()).add(v.get("approved"))
        assert len(verdicts) == sent, sorted(verdicts)
        assert all(len(seen) == 1 for seen in verdicts.values()), verdicts


async def test_a_resume_of_a_running_flow_keeps_what_the_agents_have_queued() -> None:
    """The second path of the defect, on mode's own classes: Faust resumes the flow at the end of
    a recovery while it already runs; a resume emptied every agent's queue (records fetched
    after the seek to the committed offsets, read by nobody again). Only a resume after a
    suspension clears the queues now (what was queued while suspended is stale)."""

    def queued(workaround: bool, suspended_first: bool) -> list[str]:
        flow = FlowControlEvent(initially_suspended=False)
        queue: FlowControlQueue[str] = FlowControlQueue(flow_control=flow, clear_on_resume=True)
        queue.put_nowait("record")
        if suspended_first:
            flow.suspend()
        (apply_faust_workarounds if workaround else remove_faust_workarounds)()
        try:
            flow.resume()
        finally:
            apply_faust_workarounds()  # as every fencer process has it
        assert flow.is_active()
        return list(queue._queue)  # type: ignore[attr-defined]  # asyncio.Queue's deque

    assert queued(workaround=False, suspended_first=False) == []  # the defect
    assert queued(workaround=True, suspended_first=False) == ["record"]
    assert queued(workaround=True, suspended_first=True) == []
