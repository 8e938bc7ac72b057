"""Real receivers on loopback for the notifier tests: aiosmtpd (plain, STARTTLS + AUTH, SMTPS)
and Debian's snmptrapd loading FENCER-MIB.

snmptrapd and smilint need the IETF base modules (SNMPv2-SMI, -TC, -CONF), which Debian does not
ship (snmp-mibs-downloader is non-free and downloads at install). They come from the npm package
`net-snmp` (MIT), fetched once with `npm pack` into a cache, unless FENCER_IETF_MIB_DIR or a
system MIB directory already has them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

MIB_DIR = Path(__file__).resolve().parents[2] / "notifiers" / "mibs"
NET_SNMP_NPM = "net-snmp@3.29.2"
BASE_MODULES = ("SNMPv2-SMI", "SNMPv2-TC", "SNMPv2-CONF", "SNMPv2-MIB")
SMTP_USER, SMTP_PASSWORD = "fencer", "s3cret-pw"


# ---------------------------------------------------------------------------------------------
# TLS and SMTP


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Tls:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A self-signed certificate for 127.0.0.1, made with cryptography."""
    d = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Tls(d / "cert.pem", d / "key.pem")


@dataclass
class Mailbox:
    """What an aiosmtpd server received, and who logged in."""

    envelopes: list[Envelope] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)

    async def handle_DATA(self, server: object, session: object, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return "250 OK"

    def authenticate(
        self, server: object, session: object, envelope: object, mechanism: str, data: object
    ) -> AuthResult:
        if (
            isinstance(data, LoginPassword)
            and data.login.decode() == SMTP_USER
            and data.password.decode() == SMTP_PASSWORD
        ):
            self.logins.append(SMTP_USER)
            return AuthResult(success=True)
        # handled=False makes aiosmtpd answer 535; the default would answer nothing.
        return AuthResult(success=False, handled=False)


@dataclass
class SmtpServer:
    port: int
    mailbox: Mailbox


SmtpFactory = Callable[..., SmtpServer]


@pytest.fixture
def smtp_server() -> Iterator[SmtpFactory]:
    """Start aiosmtpd servers on loopback: mode plain | starttls | smtps."""
    controllers: list[Controller] = []

    def start(mode: str = "plain", tls: Tls | None = None, port: int | None = None) -> SmtpServer:
        box = Mailbox()
        port = port or free_port()
        kwargs: dict[str, object] = {}
        if mode == "starttls":
            assert tls is not None
            kwargs = {
                "tls_context": tls.server_context(),
                "require_starttls": True,
                "authenticator": box.authenticate,
                "auth_require_tls": True,
            }
        elif mode == "smtps":
            assert tls is not None
            kwargs = {
                "ssl_context": tls.server_context(),
                "authenticator": box.authenticate,
                "auth_require_tls": False,
            }
        c = Controller(box, hostname="127.0.0.1", port=port, **kwargs)
        c.start()
        controllers.append(c)
        return SmtpServer(port, box)

    yield start
    for c in controllers:
        c.stop()


# ---------------------------------------------------------------------------------------------
# MIBs and snmptrapd


def _has_base(d: Path) -> bool:
    return all(any(d.glob(f"{m}*")) for m in BASE_MODULES)


@pytest.fixture(scope="session")
def ietf_mib_dir() -> Path:
    """A directory with the IETF SMIv2 base modules (see the module docstring)."""
    candidates = [os.environ.get("FENCER_IETF_MIB_DIR", ""), "/usr/share/snmp/mibs/ietf"]
    for c in candidates:
        if c and Path(c).is_dir() and _has_base(Path(c)):
            return Path(c)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    target = cache / "fencer" / "ietf-mibs" / NET_SNMP_NPM.replace("@", "-")
    if _has_base(target):
        return target
    npm = shutil.which("npm")
    assert npm, "the IETF base MIBs are missing and npm is not installed to fetch them"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [npm, "pack", NET_SNMP_NPM, "--pack-destination", tmp, "--silent"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        (tgz,) = Path(tmp).glob("net-snmp-*.tgz")
        staging = Path(tmp) / "mibs"
        staging.mkdir()
        with tarfile.open(tgz) as tar:
            for m in tar.getmembers():
                name = Path(m.name).name
                if m.isfile() and m.name.startswith("package/lib/mibs/SNMPv2-"):
                    src = tar.extractfile(m)
                    assert src is not None
                    (staging / name).write_bytes(src.read())
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(staging, target)
    assert _has_base(target)
    return target


@dataclass(frozen=True)
class Trap:
    """One logged notification: snmptrapd's %P header and the varbinds by MIB name."""

    header: str
    varbinds: dict[str, str]

    @property
    def version(self) -> str:
        return self.header.split(", ")[1]  # "SNMP v2c" | "SNMP v3"

    def value(self, name: str) -> str:
        """The printed value without its type, e.g. 'kvm03' for 'STRING: kvm03'."""
        return self.varbinds[name].partition(": ")[2]


def parse_trap(line: str) -> Trap:
    header, _, rest = line.removeprefix("TRAP ").partition(" | ")
    varbinds = {}
    for item in rest.split("~~ "):
        name, _, value = item.partition(" = ")
        varbinds[name.strip()] = value
    return Trap(header, varbinds)


@dataclass
class TrapReceiver:
    """A running snmptrapd; `lines()` reads what it logged so far."""

    port: int
    log: Path
    proc: subprocess.Popen[bytes]
    engine_id: str

    def lines(self) -> list[str]:
        if not self.log.exists():
            return []
        return [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]

    def received(self) -> list[Trap]:
        return [parse_trap(t) for t in self.traps()]

    def traps(self) -> list[str]:
        return [ln for ln in self.lines() if ln.startswith("TRAP ")]

    def wait_for(self, count: int, timeout: float = 5.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.traps()
            if len(got) >= count:
                return got
            time.sleep(0.05)
        return self.traps()


# The sender's engine id (RFC 3411 text format under the placeholder PEN 99999): snmptrapd must
# know it for v3 TRAPs; INFORMs use snmptrapd's own engine id instead.
SENDER_ENGINE_ID = "8001869f0466656e6365722d74657374"  # "fencer-test"
V3_USER, V3_AUTH, V3_PRIV = "fenceuser", "authpass123", "privpass123"
TRAP_FORMAT = "TRAP %P | %V~~ %v\\n"


@pytest.fixture
def snmptrapd(tmp_path: Path, ietf_mib_dir: Path) -> Iterator[TrapReceiver]:
    """Debian's snmptrapd on a loopback UDP port, printing varbinds by FENCER-MIB name."""
    port = free_port(socket.SOCK_DGRAM)
    persist = tmp_path / "persist"
    persist.mkdir()
    conf = tmp_path / "snmptrapd.conf"
    conf.write_text(
        "authCommunity log public\n"
        f"createUser -e 0x{SENDER_ENGINE_ID} {V3_USER} SHA {V3_AUTH} AES {V3_PRIV}\n"
        f"createUser {V3_USER} SHA {V3_AUTH} AES {V3_PRIV}\n"
        f"authUser log {V3_USER} priv\n"
        "doNotRetainNotificationLogs yes\n"
    )
    log = tmp_path / "traps.log"
    env = {**os.environ, "SNMP_PERSISTENT_DIR": str(persist), "MIBS": "", "HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [
            "snmptrapd",
            "-f",
            "-C",
            "-c",
            str(conf),
            "-M",
            f"{ietf_mib_dir}:{MIB_DIR}",
            "-m",
            "SNMPv2-MIB:FENCER-MIB",
            "-F",
            TRAP_FORMAT,
            "-Lf",
            str(log),
            f"udp:127.0.0.1:{port}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 5
        while "NET-SNMP version" not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None, "snmptrapd exited at start"
            assert time.monotonic() < deadline, "snmptrapd did not start"
            time.sleep(0.02)
        yield TrapReceiver(port, log, proc, SENDER_ENGINE_ID)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
