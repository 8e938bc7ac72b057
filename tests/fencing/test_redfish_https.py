"""Redfish over https only: an http:// address is refused before any request (the password
would travel in clear) unless the configuration file says allow_insecure_redfish for that host
or cluster; `config check` refuses it too; https works against sushy-tools with TLS."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr

from fencing.actuator import check_host
from fencing.drivers.base import DriverConfigError
from fencing.drivers.redfish import RedfishDriver
from fencing.settings import SettingsError, load_settings

from .conftest import Redfish

REPO = Path(__file__).resolve().parents[2]
HOST = "6f1c2b3a-0d4e-4f5a-9b8c-7d6e5f4a3b2c"
CLUSTER = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"


def _file(tmp_path: Path, rf: Redfish, *, host_allows: bool = False, cluster_allows=False):
    host_ipmi: dict = {"address": rf.url, "driver": "redfish", "redfish_system": rf.system}
    if host_allows:
        host_ipmi["allow_insecure_redfish"] = True
    data = {
        "defaults": {"username": rf.username, "password": rf.password, "verify_tls": False},
        "clusters": {CLUSTER: {"ipmi": {"allow_insecure_redfish": True} if cluster_allows else {}}},
        "hosts": {HOST: {"ipmi": host_ipmi}},
    }
    path = tmp_path / "fencer.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def test_an_http_redfish_address_gets_no_request_and_no_password(tmp_path):
    """A listener stands where the BMC would be: the driver and a whole check refuse the
    address before connecting, naming the setting, and the password reaches nobody."""
    seen: list[bytes] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.read(4096))
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    try:
        with pytest.raises(DriverConfigError) as err:
            RedfishDriver(url, "admin", SecretStr("in-clear-pw"))
        assert "allow_insecure_redfish" in str(err.value) and "ipmi.address" in str(err.value)
        settings = load_settings(
            overrides_file(tmp_path, url),
        )
        r = await check_host(settings, HOST, None)
        assert not r.ok and "allow_insecure_redfish" in (r.error or "")
        assert "in-clear-pw" not in (r.error or "")
        await asyncio.sleep(0.2)
        assert seen == []  # nothing connected, so no password was sent
    finally:
        server.close()
        await server.wait_closed()


def overrides_file(tmp_path: Path, url: str) -> Path:
    """A file whose host uses Redfish at `url` through a cluster that allows http, so the
    file loads; the check then runs for the host outside that cluster."""
    data = {
        "defaults": {"username": "admin", "password": "in-clear-pw"},
        "clusters": {CLUSTER: {"ipmi": {"allow_insecure_redfish": True}}},
        "hosts": {HOST: {"ipmi": {"address": url, "driver": "redfish"}}},
    }
    path = tmp_path / "allow-cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def test_https_redfish_works_with_tls(redfish_https: Redfish):
    d = RedfishDriver(
        redfish_https.url,
        redfish_https.username,
        SecretStr(redfish_https.password),
        system=redfish_https.system,
        verify_tls=False,  # self-signed; the driver has no CA-file setting
        timeout=5,
    )
    try:
        assert await d.test() == "PowerState On"
    finally:
        await d.aclose()


def test_config_check_refuses_http_redfish_naming_the_setting(tmp_path, redfish: Redfish):
    path = _file(tmp_path, redfish)
    with pytest.raises(SettingsError) as err:
        load_settings(path)
    text = str(err.value)
    assert f"hosts.{HOST}.ipmi.address" in text and "allow_insecure_redfish" in text
    proc = subprocess.run(
        [sys.executable, "-m", "streams.cli", "config", "check", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert f"hosts.{HOST}.ipmi.address" in proc.stderr + proc.stdout
    assert redfish.password not in proc.stderr + proc.stdout


async def test_the_file_may_allow_http_for_a_host(tmp_path, redfish: Redfish):
    settings = load_settings(_file(tmp_path, redfish, host_allows=True))
    r = await check_host(settings, HOST, CLUSTER)
    assert r.ok, r.error
    assert r.power == "on"


async def test_the_file_may_allow_http_for_a_cluster(tmp_path, redfish: Redfish):
    settings = load_settings(_file(tmp_path, redfish, cluster_allows=True))
    r = await check_host(settings, HOST, CLUSTER)
    assert r.ok, r.error
    # ... and only for that cluster: the same host in another cluster is refused, no request.
    r = await check_host(settings, HOST, "another-cluster")
    assert not r.ok and "allow_insecure_redfish" in (r.error or "")
    assert redfish.password not in (r.error or "")
