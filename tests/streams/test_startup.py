"""A worker started before Kafka or CloudStack says so in one line per try and keeps waiting."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fencing.settings import CloudStackSettings, FencerSettings, KafkaSettings, SigningSettings
from fencing.signing import write_keys_file
from lab.cloudstack_sim import CloudStackSimulator, SimCloud
from lab.pipeline import Tap, WorkerProcess, write_settings
from streams.startup import wait_for_dependencies

pytestmark = pytest.mark.timeout(60)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_kafka_is_one_line_per_try_naming_address_and_setting(caplog):
    port = closed_port()
    settings = FencerSettings(kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}"))
    caplog.set_level(logging.INFO, logger="fencer.startup")
    ok = await wait_for_dependencies(settings, attempts=2, max_delay=0.1)
    assert ok is False
    lines = [r.getMessage() for r in caplog.records if r.name == "fencer.startup"]
    assert len(lines) == 2, lines
    assert all(
        f"cannot reach Kafka at 127.0.0.1:{port} (kafka.bootstrap_servers)" in m for m in lines
    )
    assert all(r.exc_info is None for r in caplog.records)  # no traceback


async def test_cloudstack_down_then_up_is_waited_for(kafka_settings: KafkaSettings, caplog):
    sim = await CloudStackSimulator(SimCloud()).start()
    url, key, secret = sim.url, sim.api_key, sim.secret_key
    await sim.stop()  # CloudStack is not up yet
    settings = FencerSettings(
        kafka=kafka_settings,
        cloudstack=CloudStackSettings(endpoint=url, api_key=key, secret_key=secret, timeout=2),
    )
    caplog.set_level(logging.INFO, logger="fencer.startup")
    assert await wait_for_dependencies(settings, attempts=1) is False
    [line] = [r.getMessage() for r in caplog.records if "CloudStack" in r.getMessage()]
    assert "(cloudstack.endpoint)" in line and secret not in line and key not in line
    sim2 = await CloudStackSimulator(SimCloud()).start()
    try:
        settings = settings.model_copy(
            update={
                "cloudstack": CloudStackSettings(
                    endpoint=sim2.url, api_key=sim2.api_key, secret_key=sim2.secret_key
                )
            }
        )
        assert await wait_for_dependencies(settings, attempts=1) is True
    finally:
        await sim2.stop()


def test_worker_started_before_kafka_waits_without_a_traceback(tmp_path: Path) -> None:
    port = closed_port()
    settings: Any = FencerSettings(kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}"))
    cfg = write_settings(settings, tmp_path / "fencer.yaml")
    proc = subprocess.Popen(
        # notify: a role that needs no signing key, so only Kafka is waited for
        [sys.executable, "-m", "streams.cli", "worker", "-c", str(cfg), "--roles", "notify"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    expected = f"cannot reach Kafka at 127.0.0.1:{port} (kafka.bootstrap_servers)"
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")))
    reader.start()
    try:
        # Wait for the line itself (a loaded machine takes seconds to import the worker), then
        # for the next try: the worker is still waiting, not gone.
        deadline = time.monotonic() + 90
        while not any(expected in line for line in lines) and time.monotonic() < deadline:
            assert proc.poll() is None, "the worker exited instead of waiting for Kafka"
            time.sleep(0.2)
        time.sleep(2.0)
        assert proc.poll() is None, "the worker exited instead of waiting for Kafka"
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        reader.join(timeout=15)
    out = "".join(lines)
    assert expected in out
    assert "Traceback" not in out


async def test_a_started_leader_polls_cloudstack_at_once_not_a_poll_interval_later(
    fencer_settings: Any, tmp_path: Path
) -> None:
    """Faust's timer first runs a whole interval after the start: with the default 30 s (here
    120 s) a started or restarted worker would know nothing of CloudStack's hosts until then."""
    cloud = SimCloud()
    cluster = cloud.add_cluster(cloud.add_zone("zone1"), "cluster1")
    for i in range(1, 4):
        cloud.add_host(cluster, f"kvm{i:02d}", f"10.1.0.{i}")
    sim = await CloudStackSimulator(cloud).start()
    settings = fencer_settings(
        isolated_topics=True,
        cloudstack=CloudStackSettings(
            endpoint=sim.url, api_key=sim.api_key, secret_key=sim.secret_key, poll_interval=120.0
        ),
        signing=SigningSettings(keys_file=write_keys_file(tmp_path / "signing.keys")),
    )
    t = settings.kafka.topics
    tap = await Tap(settings).start([t.fence_proposals])
    worker = WorkerProcess(write_settings(settings, tmp_path / "fencer.yaml"), "ingest")
    try:
        worker.start()
        # The first poll's cluster size (a start on a loaded machine takes seconds, not 120).
        [(key, size)] = await tap.wait_for(
            lambda: [
                (k, v) for k, v in tap.of(t.fence_proposals) if v.get("kind") == "cluster_size"
            ],
            45,
            "the first listHosts poll",
        )
        assert key == cluster.uuid and size["host_count"] == 3
    finally:
        await asyncio.to_thread(worker.stop, 10)
        await tap.stop()
        await sim.stop()
