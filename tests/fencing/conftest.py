"""BMC fixtures for the actuator and driver tests: the lab's pyghmi BMC simulator, sushy-tools'
Redfish emulator (fake driver, no libvirt), ipmitool command-template settings, and the
CloudStack simulator with one disconnected host. Every peer listens on 127.0.0.1 on a free port
and is stopped at the end of its test, also on failure.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import httpx
import pytest
from pydantic import SecretStr

from lab.bmc import BmcSimulator
from lab.cloudstack_sim import CloudStackSimulator, Host, SimCloud

BMC_PASSWORD = "s3cret-bmc-pw"


@pytest.fixture
def bmc() -> Iterator[BmcSimulator]:
    """A powered-on simulated BMC (admin / BMC_PASSWORD)."""
    with BmcSimulator("admin", BMC_PASSWORD) as sim:
        yield sim


def ipmitool_template(port: int, password: str = BMC_PASSWORD, **extra: object) -> dict:
    """IpmiSettings fields that drive Debian's ipmitool through the command template."""
    fields: dict[str, object] = {
        "driver": "template",
        "exec": "ipmitool",
        "execution_syntax": (
            "$IPMI_EXEC -I lanplus -R 1 -N 1 -H $IPMI_HOST -p $IPMI_PORT -U $IPMI_USERNAME -E "
            "chassis $IPMI_ACTION"
        ),
        "password_via": "env",
        "username": "admin",
        "password": SecretStr(password),
        "port": port,
        "action_blink": "identify force",
    }
    fields.update(extra)
    return fields


@dataclass
class Redfish:
    """A running sushy-emulator."""

    url: str
    system: str
    username: str
    password: str
    ca: str = ""  # the self-signed certificate of an https emulator


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def self_signed_cert(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A throw-away certificate and key for `host` (PEM files in `directory`)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "bmc-cert.pem", directory / "bmc-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@pytest.fixture
def redfish(tmp_path: Path) -> Iterator[Redfish]:
    """sushy-tools' Redfish emulator over plain http (the tests pass allow_insecure)."""
    yield from _sushy(tmp_path, tls=False)


@pytest.fixture
def redfish_https(tmp_path: Path) -> Iterator[Redfish]:
    """The same emulator over https, with a self-signed certificate (Redfish.ca)."""
    yield from _sushy(tmp_path, tls=True)


def _sushy(tmp_path: Path, tls: bool) -> Iterator[Redfish]:
    """sushy-tools' Redfish emulator with one fake system, basic auth (bcrypt htpasswd)."""
    system = str(uuid.uuid4())
    password = "redfish-pw"
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(
        "admin:" + bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode() + "\n"
    )
    state = tmp_path / "sushy-state"
    state.mkdir()
    conf = tmp_path / "emu.conf"
    conf.write_text(
        "SUSHY_EMULATOR_FAKE_DRIVER = True\n"
        f"SUSHY_EMULATOR_AUTH_FILE = {str(htpasswd)!r}\n"
        f"SUSHY_EMULATOR_STATE_DIR = {str(state)!r}\n"
        f"SUSHY_EMULATOR_FAKE_SYSTEMS = [{{'uuid': {system!r}, 'name': 'hv1', "
        "'power_state': 'On', 'external_notifier': False, "
        "'nics': [{'mac': '52:54:00:00:00:01', 'ip': '127.0.0.1'}]}]\n"
    )
    port = _free_tcp_port()
    exe = Path(sys.executable).parent / "sushy-emulator"
    log = (tmp_path / "sushy.log").open("w")
    tls_args: list[str] = []
    ca = ""
    if tls:
        cert, key = self_signed_cert(tmp_path)
        tls_args = ["--ssl-certificate", str(cert), "--ssl-key", str(key)]
        ca = str(cert)
    proc = subprocess.Popen(
        [str(exe), "--config", str(conf), "-i", "127.0.0.1", "-p", str(port), *tls_args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/redfish/v1/", timeout=1, verify=ca or True).status_code < 500:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "sushy-emulator did not start: " + (tmp_path / "sushy.log").read_text()[-500:]
                )
            time.sleep(0.1)
        yield Redfish(url, system, "admin", password, ca)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@dataclass
class Cloud:
    """The CloudStack simulator with one disconnected host that runs one VM."""

    sim: CloudStackSimulator
    cloud: SimCloud
    host: Host
    cluster_uuid: str
    vm_uuid: str


@pytest.fixture
async def cloud() -> AsyncIterator[Cloud]:
    """A simulated management server: cluster c1, hosts hv1 (Disconnected, one VM) and hv2 (Up)."""
    sc = SimCloud()
    zone = sc.add_zone()
    cluster = sc.add_cluster(zone)
    hv1 = sc.add_host(cluster, "hv1", "10.0.0.11", state="Disconnected")
    sc.add_host(cluster, "hv2", "10.0.0.12")
    vm = sc.add_vm(hv1, "vm1")
    sim = CloudStackSimulator(sc)
    await sim.start()
    try:
        yield Cloud(sim, sc, hv1, cluster.uuid, vm.uuid)
    finally:
        await sim.stop()
