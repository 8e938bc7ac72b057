"""Kafka settings (brokers, TLS, SASL, topic names) and the checks of their files and transport."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr

from fencing.settings_sections import _Model


class SaslSettings(_Model):
    mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    username: str = ""
    password: SecretStr = SecretStr("")


class TopicNames(_Model):
    """Every topic name, defined once."""

    cloudstack: str = "cloudstack"
    host_signals: str = "fencer.host-signals"
    probe_requests: str = "fencer.probe-requests"
    probe_results: str = "fencer.probe-results"
    fence_proposals: str = "fencer.fence-proposals"
    fence_decisions: str = "fencer.fence-decisions"
    fence_outcomes: str = "fencer.fence-outcomes"
    notices: str = "fencer.notices"
    host_states: str = "fencer.host-states"
    dead_letter: str = "fencer.dead-letter"
    settings: str = "fencer.settings"
    fence_claims: str = "fencer.fence-claims"
    operator_actions: str = "fencer.operator-actions"
    bmc_pins: str = "fencer.bmc-pins"
    audit: str = "fencer.audit"
    ipmi_tests: str = "fencer.ipmi-tests"


class KafkaSettings(_Model):
    bootstrap_servers: str = "127.0.0.1:9092"
    embedded: bool = Field(
        False, description="the broker is the embedded Tansu: apply its workarounds"
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = Field(
        None, description="client certificate (PEM) for mutual TLS with SSL / SASL_SSL"
    )
    ssl_keyfile: Path | None = Field(None, description="its private key (PEM, mode 0600)")
    ssl_keyfile_password: SecretStr | None = Field(None, description="if the key is encrypted")
    sasl: SaslSettings | None = None
    partitions: int = Field(4, ge=1)
    replication_factor: int = Field(1, ge=1)
    topics: TopicNames = Field(default_factory=TopicNames)
    group_id: str = "fencer"
    role_groups: dict[str, str] = Field(
        default_factory=dict,
        description="pinned consumer group per role set, e.g. {'actuate,notify': 'fencer-act'}",
    )
    session_timeout: float = Field(
        6.0, gt=0, description="Faust broker_session_timeout; Tansu waits half of it on join"
    )
    heartbeat_interval: float = Field(1.5, gt=0)
    table_store: Literal["rocksdb", "memory"] = Field(
        "rocksdb", description="Faust table store under data_dir (memory: rebuilt from changelogs)"
    )


TLS_PROTOCOLS = ("SSL", "SASL_SSL")


def kafka_tls_file_problems(kafka: KafkaSettings) -> list[tuple[str, str]]:
    """(setting, problem) for each Kafka CA, certificate or key file that is set but cannot be
    read (only with SSL / SASL_SSL, where they are used), and a certificate without its key."""
    if kafka.security_protocol not in TLS_PROTOCOLS:
        return []
    out: list[tuple[str, str]] = []
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        path: Path | None = getattr(kafka, name)
        if path is None:
            continue
        try:
            with open(path, "rb") as f:
                f.read(1)
        except FileNotFoundError:
            out.append((f"kafka.{name}", f"{path}: no such file"))
        except IsADirectoryError:
            out.append((f"kafka.{name}", f"{path}: is a directory, not a PEM file"))
        except OSError as exc:
            out.append((f"kafka.{name}", f"{path}: cannot read it: {exc.strerror}"))
    if (kafka.ssl_certfile is None) != (kafka.ssl_keyfile is None):
        missing = "ssl_keyfile" if kafka.ssl_keyfile is None else "ssl_certfile"
        out.append((f"kafka.{missing}", "mutual TLS needs both ssl_certfile and ssl_keyfile"))
    return out


def _loopback(host: str) -> bool:
    import ipaddress

    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def kafka_plaintext_warning(kafka: KafkaSettings) -> str | None:
    """A warning when fencer's topics travel unencrypted to a broker that is not on loopback."""
    if kafka.security_protocol in TLS_PROTOCOLS:
        return None
    remote = []
    for server in kafka.bootstrap_servers.split(","):
        host = server.strip().rsplit(":", 1)[0] if server.strip() else ""
        if host and not _loopback(host):
            remote.append(server.strip())
    if not remote:
        return None
    return (
        f"kafka.security_protocol is {kafka.security_protocol} to {', '.join(remote)}: "
        "decisions, settings and SASL passwords cross the network in clear and anyone who "
        "reaches the broker can write fencer's topics; use SSL or SASL_SSL (with "
        "ssl_certfile / ssl_keyfile for mutual TLS)"
    )
