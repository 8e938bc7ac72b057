"""End to end: the VMs of a fenced host are still followed after the actuate worker is killed.

A real `fencer worker` fences a crashed lab host (pyghmi BMC, CloudStack simulator) whose VMs
CloudStack's HA never restarts, and is SIGKILLed right after its outcome, before its first
vms_not_restarted notice was due. The worker started again follows the VMs once more (the
outcome keeps them; fencer's host record still shows the host fenced) and tells them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from lab.cloud import LabCloud
from lab.pipeline import Tap, WorkerProcess, write_settings
from streams.broker import EmbeddedBroker

pytestmark = pytest.mark.timeout(300)


async def test_a_vm_never_restarted_is_told_after_the_actuate_worker_is_killed_mid_follow(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    async with LabCloud(broker, hosts=4, root=tmp_path / "lab", interval=0.5) as lab:
        base = lab.settings()
        settings = base.model_copy(
            update={
                "actuator": base.actuator.model_copy(update={"renotify_interval": 4.0}),
                # The first notice is due job_timeout after the restart call: after the kill.
                "cloudstack": base.cloudstack.model_copy(update={"job_timeout": 20.0}),
            }
        )
        t = settings.kafka.topics
        file = write_settings(settings, tmp_path / "fencer.yaml")
        tap = await Tap(settings).start([t.fence_proposals, t.fence_outcomes, t.notices])
        workers: list[WorkerProcess] = []

        def of(topic: str, host: str) -> list[dict[str, Any]]:
            return [v for k, v in tap.of(topic) if k == host]

        async def worker() -> WorkerProcess:
            def sizes() -> int:
                return sum(
                    1 for _, v in tap.of(t.fence_proposals) if v.get("kind") == "cluster_size"
                )

            seen = sizes()
            w = WorkerProcess(file, "all", tmp_path / f"worker{len(workers)}.log").start()
            workers.append(w)
            await tap.wait_for(lambda: sizes() > seen, 90, "the worker to start")
            return w

        try:
            lab.cloud.ha_delay = 3600.0  # CloudStack's HA never restarts the VMs in this test
            first = await worker()
            victim = lab.host("kvm03")
            await lab.crash("kvm03")
            done = await tap.wait_for(
                lambda: [o for o in of(t.fence_outcomes, victim.uuid) if o["success"]],
                120,
                "the fence of kvm03",
            )
            first.kill()  # mid-follow: its first vms_not_restarted notice was not due yet
            assert sorted(done[0]["vms"]) == sorted(lab.vms_of("kvm03"))

            def told() -> list[dict[str, Any]]:
                return [n for n in of(t.notices, victim.uuid) if n["kind"] == "vms_not_restarted"]

            assert told() == []
            await worker()
            notices = await tap.wait_for(told, 120, "the VMs told after the restart")
            assert notices[0]["decision_id"] == done[0]["decision_id"]
            assert "followed again after an actuator restart" in notices[0]["reason"]
            assert lab.restarted_elsewhere("kvm03") == []
        finally:
            await asyncio.gather(*(asyncio.to_thread(w.stop, 10) for w in workers))
            await tap.stop()
