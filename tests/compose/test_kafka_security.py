"""The compose deployment's Kafka security, checked without Docker or a Kafka broker:

- the broker publishes no PLAINTEXT listener: SASL_SSL for fencer and CloudStack, mutual TLS
  everywhere, the StandardAuthorizer with no access without an ACL;
- every fencer service runs as its own principal (SCRAM user = certificate CN) with its own
  certificate and password;
- the ACLs of compose/kafka/setup.sh are exactly the table of streams/kafka_acl.py (the script
  is generated from it), and the table matches what each role's Faust app really reads;
- make-pki.sh really makes a CA and certificates that fencer's own TLS client accepts (a mutual
  TLS handshake with the broker's certificate, hostname checked), and setup.sh never puts a
  password on a command line.

What cannot be checked here (no Kafka broker runs on the test machines): that Kafka accepts
these settings, its SCRAM logins and its authorizer. tests/security/ runs fencer's clients
through SASL exchanges and the role table at run time against a test server instead; the guide
says what that leaves open (section 12).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import SecretStr

from fencing.settings import FencerSettings, SigningSettings, TopicNames, load_settings
from fencing.signing import new_key_line
from streams import kafka_acl
from streams.kafka_acl import ADMIN, BROKER, PRINCIPALS, Grant, grants, parse_setup_script

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
SETUP = COMPOSE_DIR / "kafka" / "setup.sh"
MAKE_PKI = COMPOSE_DIR / "kafka" / "make-pki.sh"
OPENSSL = shutil.which("openssl")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def settings() -> FencerSettings:
    return load_settings(COMPOSE_DIR / "fencer.yaml")


def fencer_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run fencer against the deployment's Kafka (not the demo lab)."""
    return {
        n: s
        for n, s in compose["services"].items()
        if s.get("command", [None])[0] == "fencer" and "lab" not in s.get("profiles", [])
    }


# -- the broker ---------------------------------------------------------------------------------


def convert_key(key: str) -> str:
    """The apache/kafka image's env -> property rule (docker/resources/utility ConvertKey):
    `_` -> `.`, `__` -> `_`, `___` -> `-`, lower case (with Go's non-overlapping matches)."""
    single = re.sub(r"[^_]_[^_]", lambda m: m.group(0).replace("_", "."), key)
    return single.replace("___", "-").replace("__", "_").lower()


def broker_properties(compose: dict[str, Any]) -> dict[str, str]:
    env = compose["services"]["kafka"]["environment"]
    return {
        convert_key(k.removeprefix("KAFKA_")): str(v).replace("$$", "$")
        for k, v in env.items()
        if k.startswith("KAFKA_")
    }


def test_the_env_rule_is_the_image_s() -> None:
    assert convert_key("LISTENER_SECURITY_PROTOCOL_MAP") == "listener.security.protocol.map"
    assert (
        convert_key("LISTENER_NAME_INTERNAL_SCRAM___SHA___512_SASL_JAAS_CONFIG")
        == "listener.name.internal.scram-sha-512.sasl.jaas.config"
    )
    # The rule's trap: a one-letter word between single underscores is not converted.
    assert convert_key("A_B_C") != "a.b.c"


def test_no_plaintext_listener_and_mutual_tls_everywhere(compose: dict[str, Any]) -> None:
    props = broker_properties(compose)
    # Every property name is one the broker knows (no word lost to the env rule).
    known = {
        "node.id", "process.roles", "controller.quorum.voters", "controller.listener.names",
        "listeners", "advertised.listeners", "listener.security.protocol.map",
        "inter.broker.listener.name", "sasl.enabled.mechanisms",
        "listener.name.internal.scram-sha-512.sasl.jaas.config",
        "listener.name.external.scram-sha-512.sasl.jaas.config",
        "ssl.keystore.type", "ssl.keystore.location", "ssl.truststore.type",
        "ssl.truststore.location", "ssl.client.auth", "ssl.endpoint.identification.algorithm",
        "ssl.principal.mapping.rules", "authorizer.class.name",
        "allow.everyone.if.no.acl.found", "super.users", "auto.create.topics.enable",
        "log.dirs", "num.partitions", "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor", "transaction.state.log.min.isr",
        "group.initial.rebalance.delay.ms", "log.retention.hours",
    }  # fmt: skip
    assert set(props) <= known, set(props) - known
    protocols = dict(p.split(":") for p in props["listener.security.protocol.map"].split(","))
    assert "PLAINTEXT" not in protocols.values() and "SASL_PLAINTEXT" not in protocols.values()
    listeners = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"([A-Z]+)://[^:,]*:(\d+)", props["listeners"])
    }
    assert set(listeners) == set(protocols), (listeners, protocols)
    advertised = re.findall(r"([A-Z]+)://", props["advertised.listeners"])
    assert set(advertised) <= set(listeners) and "CONTROLLER" not in advertised
    # Published: only SASL_SSL listeners (CloudStack's EXTERNAL); ADMIN and CONTROLLER never.
    published = {int(str(p).split(":")[-1]) for p in compose["services"]["kafka"]["ports"]}
    by_port = {port: name for name, port in listeners.items()}
    assert published and all(protocols[by_port[p]] == "SASL_SSL" for p in published)
    assert protocols["INTERNAL"] == protocols["EXTERNAL"] == "SASL_SSL"
    assert protocols[props["inter.broker.listener.name"]] == "SSL"
    assert protocols[props["controller.listener.names"]] == "SSL"
    # A SASL password alone is not enough: every listener requires a CA-signed certificate.
    assert props["ssl.client.auth"] == "required"
    assert props["ssl.keystore.type"] == props["ssl.truststore.type"] == "PEM"
    assert props["ssl.endpoint.identification.algorithm"] == "https"
    mechanisms = props["sasl.enabled.mechanisms"].split(",")
    assert mechanisms == [kafka_acl.SCRAM_MECHANISM]
    for name, proto in protocols.items():
        if proto.startswith("SASL_"):
            for mech in mechanisms:
                jaas = props[f"listener.name.{name.lower()}.{mech.lower()}.sasl.jaas.config"]
                assert jaas.startswith("org.apache.kafka.common.security.scram.ScramLoginModule")
                assert "password" not in jaas  # SCRAM users live in the cluster metadata
    # ACLs decide; no ACL, no access; fencer's topics are made by the setup job only.
    assert props["authorizer.class.name"].endswith("StandardAuthorizer")
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert props["auto.create.topics.enable"] == "false"
    assert props["super.users"] == ";".join(f"User:{u}" for u in (BROKER, ADMIN))
    # CN=<name> is the principal <name>: the same as the SCRAM user of that name.
    rule = props["ssl.principal.mapping.rules"].split(",")[0]
    pattern, replacement = re.fullmatch(r"RULE:(.*)/(.*)/", rule).groups()  # type: ignore[union-attr]
    assert re.sub(pattern, replacement.replace("$1", r"\1"), "CN=fencer-api") == "fencer-api"
    # The healthcheck speaks to the ADMIN listener with the broker's own certificate.
    test = compose["services"]["kafka"]["healthcheck"]["test"]
    assert f"kafka:{listeners['ADMIN']}" in test and "--command-config" in test


# -- principals ---------------------------------------------------------------------------------


def test_every_fencer_service_has_its_own_principal_and_certificate(
    compose: dict[str, Any],
) -> None:
    from streams.app import ROLES

    assert kafka_acl.ROLES == ROLES
    services = fencer_services(compose)
    by_service = {p.service: p for p in PRINCIPALS if p.service is not None}
    assert set(services) == set(by_service), (set(services), set(by_service))
    seen: set[str] = set()
    for name, svc in services.items():
        p = by_service[name]
        assert p.name not in seen
        seen.add(p.name)
        assert svc["environment"]["FENCER_KAFKA__SASL__USERNAME"] == p.name, name
        assert f"./pki/{p.name}:/etc/fencer/kafka:ro" in svc["volumes"], name
        assert sum("/etc/fencer/kafka" in v for v in svc["volumes"]) == 1, name
        secrets = {s["target"]: s["source"] for s in svc["secrets"]}
        assert secrets["kafka__sasl__password"] == f"kafka_sasl_{p.name}", name
        assert sum(s.startswith("kafka_sasl_") for s in secrets.values()) == 1, name
        cmd = svc["command"]
        roles = tuple(cmd[cmd.index("--roles") + 1].split(",")) if "--roles" in cmd else ()
        assert roles == p.roles, name
        assert svc["depends_on"]["kafka-setup"]["condition"] == "service_completed_successfully"
    # The setup job knows every principal's password; nothing else knows another's.
    setup = compose["services"]["kafka-setup"]
    assert set(setup["secrets"]) == {f"kafka_sasl_{p.name}" for p in PRINCIPALS}
    assert "./pki/fencer-admin:/etc/kafka/setup/pki:ro" in setup["volumes"]
    assert "./pki/kafka:/etc/kafka/pki:ro" in compose["services"]["kafka"]["volumes"]
    scram = re.findall(r"^scram (\S+)$", SETUP.read_text(), flags=re.M)
    assert scram == [p.name for p in PRINCIPALS]


def test_each_service_holds_only_the_secrets_its_role_uses(compose: dict[str, Any]) -> None:
    holders: dict[str, set[str]] = {}
    for name, svc in fencer_services(compose).items():
        for s in svc["secrets"]:
            holders.setdefault(s["source"], set()).add(name)
    assert holders["ipmi_password"] == {"actuator"}  # the API's BMC test runs in a worker
    assert holders["ssh_key"] == {"probe"}
    assert holders["smtp_password"] == {"notifier"}
    assert holders["api_token"] == {"api"}
    assert holders["signing_keys"] == {"ingest", "actuator", "notifier", "api"}
    assert "probe" not in holders["signing_keys"]  # the probe neither signs nor verifies


def test_the_settings_file_uses_sasl_ssl_with_the_mounted_certificate(
    settings: FencerSettings,
) -> None:
    k = settings.kafka
    assert k.security_protocol == "SASL_SSL"
    assert k.sasl is not None and k.sasl.mechanism == kafka_acl.SCRAM_MECHANISM
    assert str(k.ssl_cafile) == "/etc/fencer/kafka/ca.pem"
    assert str(k.ssl_certfile) == "/etc/fencer/kafka/client.pem"
    assert str(k.ssl_keyfile) == "/etc/fencer/kafka/client.key"


# -- ACLs ---------------------------------------------------------------------------------------


def test_the_setup_script_is_generated_from_the_table(settings: FencerSettings) -> None:
    assert SETUP.read_text() == kafka_acl.render_setup_script(settings), (
        "compose/kafka/setup.sh is stale: python -m streams.kafka_acl -c compose/fencer.yaml "
        "> compose/kafka/setup.sh"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "streams.kafka_acl", "-c", str(COMPOSE_DIR / "fencer.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert proc.stdout == SETUP.read_text()


def writers(acls: list[Grant], topic: str) -> set[str]:
    return {g.principal for g in acls if g.operation == "Write" and g.name == topic}


def readers(acls: list[Grant], topic: str) -> set[str]:
    return {g.principal for g in acls if g.operation == "Read" and g.name == topic}


def test_the_acls_of_the_script_are_the_table_and_the_rules(settings: FencerSettings) -> None:
    acls = parse_setup_script(SETUP.read_text())
    assert acls == grants(settings)
    t = settings.kafka.topics
    # The rules of issue #15, on the script itself.
    assert writers(acls, t.fence_decisions) == {"fencer-ingest"}  # only the gate decides
    assert writers(acls, t.settings) == {"fencer-api"}
    assert writers(acls, t.audit) == {"fencer-api"}
    assert writers(acls, t.operator_actions) == {"fencer-api"}
    assert writers(acls, t.cloudstack) == {"cloudstack-events"}
    assert readers(acls, t.fence_decisions) >= {"fencer-actuate"}
    assert writers(acls, t.fence_outcomes) == {"fencer-actuate"}
    assert writers(acls, t.fence_claims) == {"fencer-actuate"}
    assert "fencer-probe" not in writers(acls, t.notices) | writers(acls, t.fence_proposals)
    fencer_topics = set(t.model_dump().values())
    notify = [g for g in acls if g.principal == "fencer-notify"]
    assert not [g for g in notify if g.operation != "Describe" and g.name in fencer_topics
                and g.operation != "Read"]  # fmt: skip
    notify_reads = {g.name for g in notify if g.operation == "Read" and g.pattern == "literal"}
    assert notify_reads - {"fencer-notify"} == {
        t.fence_decisions,
        t.fence_outcomes,
        t.notices,
        t.settings,  # a cluster's mail recipients as the UI set them (read at each send)
    }
    cloudstack = [g for g in acls if g.principal == "cloudstack-events"]
    assert cloudstack == [Grant("cloudstack-events", "Write", "topic", t.cloudstack)]
    # Nothing is granted to everyone, nor on every topic; prefixes only for Faust's own topics.
    for g in acls:
        assert g.principal not in ("*", "ANONYMOUS") and g.name != "*"
        assert g.operation in ("Read", "Write", "Describe", "Create")
        if g.pattern == "prefixed":
            p = kafka_acl.principal(g.principal)
            assert g.name == f"{kafka_acl.app_id(p, settings)}-"
        if g.operation == "Create":
            assert g.pattern == "prefixed"  # fencer's topics are made by the setup job only
    # The Faust prefixes are disjoint: no role reaches another's tables.
    prefixes = [g.name for g in acls if g.pattern == "prefixed" and g.operation == "Create"]
    assert len(prefixes) == 4
    for a in prefixes:
        assert not [b for b in prefixes if b != a and b.startswith(a)]
        assert not [n for n in fencer_topics if n.startswith(a)]


@pytest.mark.parametrize("p", [p for p in PRINCIPALS if p.roles], ids=lambda p: p.name)
def test_the_table_holds_what_each_role_s_faust_app_reads(
    p: kafka_acl.Principal, tmp_path: Path
) -> None:
    """Derived from streams/app.py: every topic an agent of the role consumes is in the role's
    read set, and the app's own topics (tables) carry the app id the ACLs grant."""
    from streams.app import create_app

    s = FencerSettings(
        data_dir=tmp_path,
        signing=SigningSettings(keys=SecretStr(new_key_line("acl-test"))),
        kafka={"table_store": "memory"},
    )
    app = create_app(s, p.roles)
    names = {v: k for k, v in s.kafka.topics.model_dump().items()}
    consumed = set()
    for agent in app.agents.values():
        for topic in agent.channel.topics:
            consumed.add(names[topic])
    assert consumed, p.name
    assert consumed <= p.read, consumed - p.read
    aid = kafka_acl.app_id(p, s)
    assert app.conf.id == aid
    for table in app.tables.values():
        assert table.changelog_topic.get_topic_name().startswith(f"{aid}-")


def test_every_topic_is_in_the_table() -> None:
    used = set().union(*(p.read | p.write for p in PRINCIPALS))
    assert used == set(TopicNames.model_fields)


# -- make-pki.sh and setup.sh -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if OPENSSL is None:
        pytest.fail("openssl is needed (Debian package openssl)")
    base = tmp_path_factory.mktemp("pki")
    pki, secrets = base / "pki", base / "secrets"
    env = {
        **os.environ,
        "FENCER_PKI_DIR": str(pki),
        "FENCER_SECRETS_OUT": str(secrets),
        "FENCER_KAFKA_EXTERNAL_HOST": "fencer.example.net",
    }
    subprocess.run(["bash", str(MAKE_PKI)], env=env, check=True, capture_output=True, timeout=60)
    ca_before = (pki / "ca.pem").read_bytes()
    # A second run keeps everything (and adds only what is missing).
    (secrets / "kafka_sasl_fencer-probe").unlink()
    again = subprocess.run(
        ["bash", str(MAKE_PKI)], env=env, check=True, capture_output=True, text=True, timeout=60
    )
    assert (pki / "ca.pem").read_bytes() == ca_before
    assert [line for line in again.stdout.splitlines() if line.startswith("made")] == [
        f"made {secrets}/kafka_sasl_fencer-probe"
    ]
    return pki, secrets


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_make_pki_makes_a_certificate_and_password_per_principal(pki: tuple[Path, Path]) -> None:
    root, secrets = pki
    names = [BROKER, ADMIN] + [p.name for p in PRINCIPALS]
    for name in names:
        d = root / name
        proc = subprocess.run(
            [str(OPENSSL), "verify", "-CAfile", str(root / "ca.pem"), str(d / "client.pem")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr
        cert = _cert(d / "client.pem")
        (cn,) = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        assert cn.value == name
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
        keystore = (d / "keystore.pem").read_text()
        assert keystore.startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
        assert keystore.index("BEGIN CERTIFICATE") > keystore.index("END PRIVATE KEY")
        assert (d / "ca.pem").read_bytes() == (root / "ca.pem").read_bytes()
        for f in d.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    broker = _cert(root / "kafka" / "client.pem")
    san = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"kafka", "localhost", "fencer.example.net"} <= set(
        san.get_values_for_type(x509.DNSName)
    )
    passwords = set()
    for p in PRINCIPALS:
        f = secrets / f"kafka_sasl_{p.name}"
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        value = f.read_text().strip()
        assert re.fullmatch(r"[0-9a-f]{48}", value)
        passwords.add(value)
    assert len(passwords) == len(PRINCIPALS)


def test_fencer_s_client_and_the_broker_certificate_agree(
    pki: tuple[Path, Path], settings: FencerSettings
) -> None:
    """A mutual-TLS handshake: a server with the broker's keystore.pem requiring a CA-signed
    client, and fencer's own client context (streams.kafka.ssl_context) built from the compose
    settings with the paths of one service's files, checking the host name `kafka`."""
    from streams.kafka import ssl_context

    root, _ = pki
    kafka = settings.kafka.model_copy(
        update={
            "ssl_cafile": root / "fencer-ingest" / "ca.pem",
            "ssl_certfile": root / "fencer-ingest" / "client.pem",
            "ssl_keyfile": root / "fencer-ingest" / "client.key",
        }
    )
    client = ssl_context(kafka)
    assert client is not None and client.check_hostname
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(root / "kafka" / "keystore.pem")
    server.load_verify_locations(root / "kafka" / "ca.pem")
    server.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: dict[str, Any] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server.wrap_socket(conn, server_side=True) as tls:
                seen["peer"] = tls.getpeercert()
                tls.sendall(b"ok")
        except ssl.SSLError as exc:
            seen["error"] = exc

    for host, ok in (("kafka", True), ("not-the-broker", False)):
        t = threading.Thread(target=serve, daemon=True)
        t.start()
        with socket.create_connection(("127.0.0.1", port), 5) as raw:
            if ok:
                with client.wrap_socket(raw, server_hostname=host) as tls:
                    assert tls.recv(2) == b"ok"
            else:
                with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
                    client.wrap_socket(raw, server_hostname=host)
        t.join(5)
        if ok:
            subject = dict(x[0] for x in seen.pop("peer")["subject"])
            assert subject["commonName"] == "fencer-ingest"
    listener.close()


def test_setup_sh_runs_every_step_and_keeps_passwords_off_command_lines(
    pki: tuple[Path, Path], settings: FencerSettings, tmp_path: Path
) -> None:
    """setup.sh against stand-in kafka-*.sh tools that record their argv and the SCRAM file."""
    _, secrets = pki
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    for tool in ("kafka-configs.sh", "kafka-topics.sh", "kafka-acls.sh"):
        f = bin_dir / tool
        f.write_text(
            "#!/bin/bash\n"
            f'printf "%s\\0" {tool} "$@" >> {log}; printf "\\n" >> {log}\n'
            "while [[ $# -gt 0 ]]; do\n"
            '  if [[ $1 == --add-config-file ]]; then cat "$2" >> ' + f"{log}.scram; fi\n"
            "  shift\n"
            "done\n"
        )
        f.chmod(0o755)
    env = {
        **os.environ,
        "KAFKA_SETUP_BIN": str(bin_dir),
        "KAFKA_SETUP_SECRETS": str(secrets),
        "KAFKA_SETUP_BOOTSTRAP": "kafka:9094",
        "KAFKA_SETUP_CONFIG": "/etc/kafka/setup/admin.properties",
    }
    proc = subprocess.run(["bash", str(SETUP)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = [c.split("\0")[:-1] for c in log.read_text().split("\n") if c]
    tools = [c[0] for c in calls]
    assert tools.count("kafka-configs.sh") == len(PRINCIPALS)
    assert tools.count("kafka-topics.sh") == len(TopicNames.model_fields)
    assert tools.count("kafka-acls.sh") == len(grants(settings))
    argv_text = "\n".join(" ".join(c) for c in calls)
    scram = (tmp_path / "calls.scram").read_text()
    for p in PRINCIPALS:
        password = (secrets / f"kafka_sasl_{p.name}").read_text().strip()
        assert password not in argv_text
        assert f"SCRAM-SHA-512=[iterations=8192,password={password}]" in scram
    for c in calls:
        assert c[1:5] == ["--bootstrap-server", "kafka:9094", "--command-config",
                          "/etc/kafka/setup/admin.properties"]  # fmt: skip
