"""The settings topic is signed: workers apply only records fencer's API signed.

Against the embedded broker: a store that signs, a worker's store that verifies, and records
written straight to the topic by something else (unsigned, a tombstone, another key)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from fencing.events import FenceAction
from fencing.settings import ClusterSettings, IpmiOverrides, SigningSettings
from fencing.signing import parse_keys, write_keys_file
from lab.pipeline import Tap
from streams.kafka import aiokafka_kwargs
from streams.settings_store import SettingsStore
from streams.topic_reader import TopicReader

pytestmark = pytest.mark.timeout(90)


async def _wait(pred: Any, what: str, tap: Tap | None = None) -> None:
    import asyncio

    for _ in range(200):
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_unsigned_or_foreign_settings_records_are_refused(
    fencer_settings: Any, tmp_path: Path
) -> None:
    keys = write_keys_file(tmp_path / "signing.keys", "k1")
    settings = fencer_settings(isolated_topics=True, signing=SigningSettings(keys_file=keys))
    t = settings.kafka.topics
    api, worker = SettingsStore(settings, client_id="api"), SettingsStore(settings, client_id="w")
    stranger = SettingsStore(settings, client_id="s", keyring=parse_keys("k1 " + "x" * 40, "t"))
    tap = Tap(settings)
    await tap.start([t.settings])
    producer = AIOKafkaProducer(**aiokafka_kwargs(settings))
    await producer.start()
    await api.start()
    await worker.start()
    await stranger.start()
    try:
        # The API signs what it writes; a worker with the same key applies it.
        await api.put_cluster("c1", ClusterSettings(ipmi=IpmiOverrides(action=FenceAction.STOP)))
        await _wait(lambda: worker.cluster("c1").ipmi.action is FenceAction.STOP, "c1")
        raw = await tap.wait_for(
            lambda: [v for k, v in tap.of(t.settings) if k == "cluster:c1"], 30, "the record"
        )
        assert raw and raw[0]["signature"]["key_id"] == "k1"
        # Something else writes to the topic: a pause, a tombstone, a cluster entry.
        await producer.send_and_wait(
            t.settings, key=b"pause:global", value=json.dumps({"paused": True}).encode()
        )
        await producer.send_and_wait(t.settings, key=b"cluster:c1", value=None)
        stolen = dict(raw[0])  # a genuine record replayed under another key
        await producer.send_and_wait(
            t.settings, key=b"cluster:c2", value=json.dumps(stolen).encode()
        )
        await _wait(lambda: len(worker.refused) >= 3, "three refusals")
        assert worker.is_paused(None) is False
        assert worker.cluster("c1").ipmi.action is FenceAction.STOP
        assert "c2" not in worker.settings.clusters
        reasons = {k: r for k, _p, _o, r in worker.refused}
        assert reasons["pause:global"] == "unsigned"
        assert "tombstone" in reasons["cluster:c1"]
        assert "signed for key 'cluster:c1', not this key" in reasons["cluster:c2"]
        # A store with another key refuses even the API's genuine record.
        await _wait(lambda: len(stranger.refused) >= 4, "the stranger's refusals")
        assert "c1" not in stranger.settings.clusters
        # Every store that read a forged record sent a notice (one id per record).
        notices: list[dict[str, Any]] = []
        reader = TopicReader(settings, [t.notices], lambda r: notices.append(json.loads(r.value)))
        await reader.start(30)
        try:
            await _wait(
                lambda: len({v["notice_id"] for v in notices if v["kind"] == "forged_record"}) >= 4,
                "forged_record notices",
            )
        finally:
            await reader.stop()
        n = next(v for v in notices if v["kind"] == "forged_record")
        assert n["topic"] == t.settings and isinstance(n["offset"], int)
        # A signed deletion is applied.
        await api.delete_cluster("c1")
        await _wait(lambda: "c1" not in worker.settings.clusters, "the deletion")
    finally:
        for s in (api, worker, stranger):
            await s.stop()
        await producer.stop()
        await tap.stop()


async def test_an_old_signed_record_written_again_does_not_roll_the_settings_back(
    fencer_settings: Any, tmp_path: Path
) -> None:
    """review4: the signature covered only key and value, so a genuine OLD record copied back
    onto the topic (by anyone who may write to it, no key needed) was applied: an operator's
    pause undone by the earlier resume, silently. Each record now carries a signed sequence per
    key; an older one is refused (forged_record notice), and the current record is written
    again so compaction keeps it, not the replay (a store started later reads the same)."""
    keys = write_keys_file(tmp_path / "signing.keys", "k1")
    settings = fencer_settings(isolated_topics=True, signing=SigningSettings(keys_file=keys))
    t = settings.kafka.topics
    api, worker = SettingsStore(settings, client_id="api"), SettingsStore(settings, client_id="w")
    tap = Tap(settings)
    await tap.start([t.settings])
    producer = AIOKafkaProducer(**aiokafka_kwargs(settings))
    await producer.start()
    await api.start()
    await worker.start()
    later: SettingsStore | None = None
    try:
        await api.resume(None, by="alice")
        await api.pause(None, reason="storage maintenance", by="bob")
        await _wait(lambda: worker.is_paused(None), "the pause")
        old = await tap.wait_for(
            lambda: [v for k, v in tap.of(t.settings) if k == "pause:global"][:1], 30, "resume"
        )
        assert old[0]["value"]["paused"] is False
        # The old, genuinely signed resume written again, byte for byte as it was.
        await producer.send_and_wait(
            t.settings, key=b"pause:global", value=json.dumps(old[0]).encode()
        )
        await _wait(lambda: any(k == "pause:global" for k, *_ in worker.refused), "the refusal")
        assert worker.is_paused(None) and api.is_paused(None)
        (reason,) = [r for k, _p, _o, r in worker.refused if k == "pause:global"][:1]
        assert "older" in reason
        # The current record (the pause) is the topic's last word on the key again.
        await tap.wait_for(
            lambda: [v for k, v in tap.of(t.settings) if k == "pause:global"][3:], 30, "heal"
        )
        last = [v for k, v in tap.of(t.settings) if k == "pause:global"][-1]
        assert last["value"]["paused"] is True
        await asyncio.sleep(1.0)  # each running store wrote its copy
        written = len([k for k, _ in tap.of(t.settings) if k == "pause:global"])
        later = SettingsStore(settings, client_id="later")
        await later.start()
        assert later.is_paused(None)
        # the replay is followed by a copy already: a store starting later writes no other
        await asyncio.sleep(1.0)
        assert len([k for k, _ in tap.of(t.settings) if k == "pause:global"]) == written
    finally:
        for s in (api, worker, later):
            if s is not None:
                await s.stop()
        await producer.stop()
        await tap.stop()


async def test_a_signed_record_that_fails_validation_keeps_the_old_settings_and_is_told(
    fencer_settings: Any, tmp_path: Path
) -> None:
    """review4: a genuine record the models refuse (an older or newer fencer wrote it) was only
    a traceback in the log ("skipped record"); nobody was told, and its sequence was not
    checked. Now: the key's previous settings stay, and a notice names the key and the field."""
    from fencing.signing import load_keyring
    from streams.settings_records import sign_settings_value

    keys = write_keys_file(tmp_path / "signing.keys", "k1")
    settings = fencer_settings(isolated_topics=True, signing=SigningSettings(keys_file=keys))
    t = settings.kafka.topics
    api, worker = SettingsStore(settings, client_id="api"), SettingsStore(settings, client_id="w")
    producer = AIOKafkaProducer(**aiokafka_kwargs(settings))
    await producer.start()
    await api.start()
    await worker.start()
    notices: list[dict[str, Any]] = []
    reader = TopicReader(settings, [t.notices], lambda r: notices.append(json.loads(r.value)))
    await reader.start(30)
    try:
        await api.put_cluster("c1", ClusterSettings(ipmi=IpmiOverrides(action=FenceAction.STOP)))
        await _wait(lambda: worker.cluster("c1").ipmi.action is FenceAction.STOP, "c1")
        bad = json.dumps({"settings": {"fence_cap": -3}}).encode()
        value = sign_settings_value(load_keyring(settings), "cluster:c1", bad, 2)
        await producer.send_and_wait(t.settings, key=b"cluster:c1", value=value)
        await _wait(lambda: any("fence_cap" in n.get("reason", "") for n in notices), "notice")
        told = [n for n in notices if "fence_cap" in n.get("reason", "")]
        assert len({n["notice_id"] for n in told}) == 1  # every store tells it, with one id
        n = told[0]
        assert n["kind"] == "preflight_failed"
        assert "cluster:c1" in n["reason"] and n["offset"] is not None
        assert worker.cluster("c1").ipmi.action is FenceAction.STOP
        assert any(k == "cluster:c1" and "fence_cap" in r for k, _p, _o, r in worker.refused)
    finally:
        await reader.stop()
        for s in (api, worker):
            await s.stop()
        await producer.stop()
