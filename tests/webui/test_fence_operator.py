"""The web UI's answer to a failed fence: `Retry fence now` and `Mark handled` write an
OperatorAction to the operator-actions topic (the actuate workers act on it)."""

from __future__ import annotations

import asyncio
import json

from aiokafka import AIOKafkaConsumer, TopicPartition

from fencing.records import OperatorAction
from fencing.settings import FencerSettings


async def _records(settings: FencerSettings, topic: str, want: int) -> list[OperatorAction]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers)
    await consumer.start()
    try:
        out: list[OperatorAction] = []
        for _ in range(40):
            parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
            if parts:
                break
            await consumer.topics()
            await asyncio.sleep(0.1)
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        for _ in range(20):
            batch = await consumer.getmany(timeout_ms=300)
            out += [
                OperatorAction.model_validate_json(r.value) for rs in batch.values() for r in rs
            ]
            if len(out) >= want:
                break
        return out
    finally:
        await consumer.stop()


async def test_retry_and_handled_buttons_write_operator_records(api, lab):
    async with api.aclient() as c:
        r = await c.post(f"/api/hosts/{lab.host_a1}/fence/retry")
        assert r.status_code == 200, r.text
        assert r.json()["kind"] == "retry" and r.json()["host_uuid"] == lab.host_a1
        r = await c.post(
            f"/api/hosts/{lab.host_a2}/fence/handled",
            json={"decision_id": "d-42", "note": "power cut by hand"},
        )
        assert r.status_code == 200, r.text
        r = await c.post(f"/api/hosts/{lab.host_a2}/fence/handled", json={"bogus": 1})
        assert r.status_code == 422 and "bogus" in json.dumps(r.json())
        r = await c.post("/api/hosts/no-such-host/fence/retry")
        assert r.status_code == 404
    got = sorted(await _records(api.settings, api.topics.operator_actions, 2), key=lambda a: a.kind)
    assert [(a.kind, a.host_uuid, a.decision_id, a.by) for a in got] == [
        ("handled", lab.host_a2, "d-42", "api"),
        ("retry", lab.host_a1, None, "api"),
    ]
    assert got[0].note == "power cut by hand"
