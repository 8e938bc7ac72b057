"""Fernet key rotation: several keys, the first encrypts, all decrypt; a stored password that
no key decrypts is a loud error, a notice and an empty password (the fence fails), never the
inherited password."""

from __future__ import annotations

import asyncio
import logging
import secrets

import pytest
from aiokafka import AIOKafkaConsumer
from cryptography.fernet import Fernet
from pydantic import SecretStr

from fencing.events import NoticeKind
from fencing.records import Notice
from fencing.settings import (
    ApiSettings,
    ClusterSettings,
    FencerSettings,
    HostSettings,
    IpmiOverrides,
    TopicNames,
)
from streams.settings_store import SettingsStore, SettingsStoreError, load_secrets_key

pytestmark = pytest.mark.timeout(90)


def _settings(broker, **file) -> FencerSettings:
    prefix = f"rot-{secrets.token_hex(4)}"
    topics = TopicNames(**{k: f"{prefix}.{v}" for k, v in TopicNames().model_dump().items()})
    kafka = broker.kafka_settings().model_copy(update={"topics": topics})
    return FencerSettings(kafka=kafka, **file)


def test_the_key_file_holds_several_keys_first_encrypts(tmp_path, monkeypatch):
    monkeypatch.delenv("FENCER_SECRETS_KEY", raising=False)
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    path = tmp_path / "secrets.key"
    path.write_text(f"# rotated 2026-11\n{new}\n{old}\n")
    ring = load_secrets_key(ApiSettings(secrets_key_file=path))
    assert ring is not None
    token = Fernet(old.encode()).encrypt(b"old-pw")
    assert ring.decrypt(token) == b"old-pw"  # the old key still reads
    assert Fernet(new.encode()).decrypt(ring.encrypt(b"x")) == b"x"  # the new one writes
    monkeypatch.setenv("FENCER_SECRETS_KEY", f"{new},{old}")
    assert load_secrets_key(ApiSettings()).decrypt(token) == b"old-pw"
    path.write_text(f"{new}\nnot-a-key\n")
    monkeypatch.delenv("FENCER_SECRETS_KEY")
    with pytest.raises(SettingsStoreError, match="key 2 is not a Fernet key"):
        load_secrets_key(ApiSettings(secrets_key_file=path))


async def test_a_rotated_key_still_decrypts_and_an_unknown_one_alerts(webui_broker, caplog):
    file = {
        "defaults": {"password": SecretStr("inherited-default-pw")},
        "clusters": {"c1": ClusterSettings(ipmi=IpmiOverrides(password=SecretStr("cluster-pw")))},
    }
    settings = _settings(webui_broker, **file)
    old, new, stranger = (Fernet.generate_key().decode() for _ in range(3))
    from cryptography.fernet import MultiFernet

    before = SettingsStore(settings, secrets_key=MultiFernet([Fernet(old)]))
    await before.start()
    try:
        await before.put_host("h1", HostSettings(ipmi=IpmiOverrides(password=SecretStr("h1-pw"))))
    finally:
        await before.stop()
    rotated = SettingsStore(settings, secrets_key=MultiFernet([Fernet(new), Fernet(old)]))
    await rotated.start()
    try:
        assert rotated.effective("h1", "c1").values.password.get_secret_value() == "h1-pw"
        await rotated.put_host("h2", HostSettings(ipmi=IpmiOverrides(password=SecretStr("h2"))))
    finally:
        await rotated.stop()

    caplog.set_level(logging.ERROR)
    lost = SettingsStore(settings, secrets_key=MultiFernet([Fernet(stranger)]))
    await lost.start()
    try:
        pw = lost.effective("h1", "c1").values.password.get_secret_value()
        assert pw == ""  # neither "cluster-pw" nor the default: no silent fallback
        assert "cluster-pw" != pw and "inherited-default-pw" != pw
        assert "host:h1" in lost.undecryptable
        assert "STORED PASSWORD UNUSABLE" in caplog.text and "host:h1" in caplog.text
        # The notice is sent in the background: read the topic until it is there (a fixed
        # pause before stopping the store lost it on a loaded machine).
        consumer = AIOKafkaConsumer(
            settings.kafka.topics.notices,
            bootstrap_servers=settings.kafka.bootstrap_servers,
            auto_offset_reset="earliest",
            group_id=None,
        )
        await consumer.start()
        values: list[bytes] = []
        try:
            async with asyncio.timeout(30):
                while not any(b'"h1"' in v for v in values):
                    batch = await consumer.getmany(timeout_ms=500)
                    values += [r.value for rs in batch.values() for r in rs]
        finally:
            await consumer.stop()
    finally:
        await lost.stop()

    notices = [Notice.model_validate_json(v) for v in values]
    about_h1 = [n for n in notices if n.host.host_uuid == "h1"]
    assert about_h1 and about_h1[0].kind is NoticeKind.PREFLIGHT_FAILED
    assert "cannot be decrypted" in (about_h1[0].reason or "")
    assert all(b"h1-pw" not in v for v in values)


async def test_the_api_shows_why_a_stored_password_is_unusable(api, lab):
    """A password stored under a key the API does not hold: the host's view says so, and the
    password in force is not the cluster's or the default's."""
    stranger = SettingsStore(api.settings, secrets_key=Fernet(Fernet.generate_key()))
    await stranger.start()
    try:
        await stranger.put_host(
            lab.host_b1, HostSettings(ipmi=IpmiOverrides(password=SecretStr("lost-pw")))
        )
    finally:
        await stranger.stop()
    import httpx

    async with httpx.AsyncClient(
        base_url=api.url, headers={"Authorization": f"Bearer {api.token}"}, timeout=20
    ) as c:
        view = None
        for _ in range(100):
            view = (await c.get(f"/api/hosts/{lab.host_b1}")).json()["settings"]
            if view["password_error"]:
                break
            await asyncio.sleep(0.1)
        assert view is not None and view["password_error"], view
        assert "cannot be decrypted" in view["password_error"]
        assert view["password_source"] == "host" and view["password_set"] is False
        assert "lost-pw" not in (await c.get(f"/api/hosts/{lab.host_b1}")).text
        assert (await c.delete(f"/api/hosts/{lab.host_b1}/settings")).status_code == 200
