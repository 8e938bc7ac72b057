"""SettingsStore on the embedded broker: the file overlaid with the topic, tombstones, passwords
encrypted and kept, refused without a key, and every store (worker) sees the same view."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr

from fencing.events import FenceAction
from fencing.settings import (
    ClusterSettings,
    FencerSettings,
    HostSettings,
    IpmiOverrides,
    TopicNames,
)
from streams.settings_store import SecretsKeyMissing, SettingsStore, SettingsStoreError

pytestmark = pytest.mark.timeout(60)


def _settings(broker, **file) -> FencerSettings:
    prefix = f"store-{secrets.token_hex(4)}"
    topics = TopicNames(**{k: f"{prefix}.{v}" for k, v in TopicNames().model_dump().items()})
    kafka = broker.kafka_settings().model_copy(update={"topics": topics})
    return FencerSettings(kafka=kafka, **file)


async def test_topic_records_replace_file_entries_and_tombstones_restore_them(webui_broker):
    file = {
        "clusters": {
            "c1": ClusterSettings(
                ipmi=IpmiOverrides(username="from-file", password=SecretStr("file-pw"))
            )
        }
    }
    settings = _settings(webui_broker, **file)
    key = Fernet(Fernet.generate_key())
    api, worker = SettingsStore(settings, secrets_key=key), SettingsStore(settings, secrets_key=key)
    await api.start()
    await worker.start()
    try:
        assert api.effective("h1", "c1").values.username == "from-file"
        # No password given: the file's is kept, without needing to store it.
        await api.put_cluster("c1", ClusterSettings(ipmi=IpmiOverrides(action=FenceAction.STOP)))
        eff = api.effective("h1", "c1")
        assert eff.values.action is FenceAction.STOP and eff.sources["username"] == "default"
        assert eff.values.password.get_secret_value() == "file-pw"

        await api.put_host("h1", HostSettings(ipmi=IpmiOverrides(password=SecretStr("host-pw"))))
        v = api.version

        async def seen() -> bool:
            return worker.effective("h1", "c1").values.password.get_secret_value() == "host-pw"

        for _ in range(100):
            if await seen():
                break
            await asyncio.sleep(0.05)
        assert await seen() and worker.effective("h1", "c1").sources["password"] == "host"
        # Clearing the host's password falls back to the cluster's.
        await api.put_host("h1", HostSettings(ipmi=IpmiOverrides(password=SecretStr(""))))
        assert api.effective("h1", "c1").values.password.get_secret_value() == "file-pw"
        assert api.version > v

        await api.delete_cluster("c1")
        assert api.effective("h1", "c1").values.username == "from-file"
        assert api.effective("h1", "c1").values.action is FenceAction.NOTHING
    finally:
        await api.stop()
        await worker.stop()

    # A restarted store rebuilds the same view from the topic alone.
    again = SettingsStore(settings, secrets_key=key)
    await again.start()
    try:
        assert again.effective("h1", "c1").values.username == "from-file"
        assert again.host("h1").ipmi.password is None
    finally:
        await again.stop()


async def test_a_password_is_refused_without_a_key_and_ignored_with_another(webui_broker):
    settings = _settings(webui_broker)
    keyless = SettingsStore(settings, secrets_key=None)
    await keyless.start()
    try:
        with pytest.raises(SecretsKeyMissing, match=r"ipmi\.password: cannot store a password"):
            await keyless.put_cluster(
                "c9", ClusterSettings(ipmi=IpmiOverrides(password=SecretStr("x")))
            )
        # Other settings need no key.
        await keyless.put_cluster("c9", ClusterSettings(ipmi=IpmiOverrides(username="u")))
        assert keyless.cluster("c9").ipmi.username == "u"
    finally:
        await keyless.stop()

    writer = SettingsStore(settings, secrets_key=Fernet(Fernet.generate_key()))
    await writer.start()
    try:
        await writer.put_cluster("c9", ClusterSettings(ipmi=IpmiOverrides(password=SecretStr("p"))))
    finally:
        await writer.stop()
    wrong = SettingsStore(settings, secrets_key=Fernet(Fernet.generate_key()))
    await wrong.start()
    try:
        # Never a wrong plaintext, never the inherited password: an empty one, and the reason.
        assert wrong.cluster("c9").ipmi.password == SecretStr("")
        assert "cluster:c9" in wrong.undecryptable
    finally:
        await wrong.stop()


def test_a_bad_key_file_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.delenv("FENCER_SECRETS_KEY", raising=False)
    bad = tmp_path / "key"
    bad.write_text("not-a-key")
    settings = FencerSettings(api={"secrets_key_file": bad})
    with pytest.raises(SettingsStoreError, match=r"api.secrets_key_file .* is not a Fernet key"):
        SettingsStore(settings)


async def test_a_lagging_tail_never_undoes_the_writers_own_later_write(webui_broker):
    """Pause then resume at once: the tail may read the pause after the resume was applied
    locally; it must not pause the cluster again (the UI showed "paused" after a resume)."""
    from aiokafka import ConsumerRecord

    settings = _settings(webui_broker)
    api = SettingsStore(settings, secrets_key=None)
    await api.start()
    try:
        sent: list[tuple[int, int, bytes, bytes]] = []
        real_send = api._producer.send_and_wait

        async def recording_send(topic, key, value):
            meta = await real_send(topic, key=key, value=value)
            sent.append((meta.partition, meta.offset, key, value))
            return meta

        api._producer.send_and_wait = recording_send
        await api.pause("c1", reason="maintenance", by="ops")
        await api.resume("c1", by="ops")
        assert api.is_paused("c1") is False
        partition, offset, key, value = sent[0]  # the pause, as the tail reads it only now
        late = ConsumerRecord(
            settings.kafka.topics.settings, partition, offset, 0, 0, key, value, None, 0, 0, []
        )
        api._on_record(late)
        assert api.is_paused("c1") is False
    finally:
        await api.stop()
