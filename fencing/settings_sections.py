"""The settings sections other than IPMI and Kafka, the shared base model and the enums.

Each class is one top-level key of the settings file (`policy`, `cloudstack`, `ssh`, ...); the
root model that holds them, the loader and the checks across sections live in fencing.settings.
"""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from fencing.policy import Policy


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PolicySettings(_Model):
    """The decision policy (see fencing.policy.Policy for the meaning of each number)."""

    check_interval: float = Field(
        60.0, gt=0, description="seconds between checks of a suspect host"
    )
    extra_checks: int = Field(2, ge=0, le=100, description="stale checks needed after the first")
    heartbeat_max_age: float | None = Field(
        None,
        gt=0,
        description="ignored (kept so older files load): heartbeats are judged by whether their "
        "content changed between checks, never by their age against a clock",
    )
    unknown_alert_after: int = Field(3, ge=1)
    fence_cap: int = Field(3, ge=0, description="power-downs per cluster per window")
    fence_window: float = Field(3600.0, gt=0)
    global_cap: int = Field(10, ge=0)
    storm_ratio: float = Field(0.5, ge=0, le=1)
    startup_quiet: float = Field(120.0, ge=0)
    probe_timeout: float = Field(
        180.0, gt=0, description="seconds before an unanswered probe counts as unknown"
    )
    judge_readable_only: bool = Field(
        False,
        description="judge a host stale on the files the probe can read even when some of its "
        "disks sit on storage it cannot read (RBD, local); per cluster in clusters.<uuid>",
    )
    clock_skew_alert: float = Field(
        30.0, gt=0, description="measured clock skew (seconds) that raises a clock_skew notice"
    )
    suspect_alert_after: float = Field(
        1800.0, gt=0, description="seconds suspect without a decision before suspect_too_long"
    )
    suspect_renotify: float = Field(
        3600.0, gt=0, description="seconds between repeated suspect_too_long notices"
    )
    fencing_resend_after: float = Field(
        900.0, gt=0, description="approved without an outcome this long: the proposal is re-sent"
    )

    def to_policy(self) -> Policy:
        """The core's plain-data view."""
        return Policy(**self.model_dump(exclude={"heartbeat_max_age"}))


class Driver(str, Enum):  # noqa: UP042 - same base as the core enums
    """How the actuator talks to a BMC."""

    IPMI = "ipmi"  # native IPMI 2.0 lanplus through pyghmi
    TEMPLATE = "template"  # the feature design's command template (ipmitool, iLO tools, scripts)
    REDFISH = "redfish"
    FAKE = "fake"  # in-process fake, for tests and dry runs


class RestartVia(str, Enum):  # noqa: UP042
    """How CloudStack is told to restart the fenced host's VMs elsewhere."""

    DECLARE_DEGRADED = "declareHostAsDegraded"
    MAINTENANCE = "prepareHostForMaintenance"
    NONE = "none"


class StorageFence(str, Enum):  # noqa: UP042
    """Where a Ceph blocklist of the host's storage address sits in the fencing ladder."""

    NONE = "none"  # never blocklist
    BEFORE = "before"  # blocklist (and verify) before the BMC action: writes stop at once
    FALLBACK = "fallback"  # only when the BMC action failed or timed out


class PasswordVia(str, Enum):  # noqa: UP042
    """How the command-template driver hands the password to the tool."""

    ARGV = "argv"  # substituted into $IPMI_PASSWORD (visible in /proc; config check warns)
    ENV = "env"  # exported as IPMI_PASSWORD (ipmitool -E reads it)
    FILE = "file"  # written to a 0600 temp file whose path is $IPMI_PASSWORD_FILE


class CloudStackSettings(_Model):
    endpoint: str = Field("http://127.0.0.1:8080/client/api", description="API URL")
    api_key: SecretStr = SecretStr("")
    secret_key: SecretStr = SecretStr("")
    timeout: float = Field(10.0, gt=0)
    verify_tls: bool = True
    poll_interval: float = Field(30.0, gt=0, description="seconds between listHosts polls")
    job_timeout: float = Field(300.0, gt=0)


class SshSettings(_Model):
    user: str = Field(
        "fencer-probe",
        description="the neighbours' probe user: non-root, its key forced through "
        "fencer-probe-gate (operators' guide, section 4)",
    )
    key_file: Path | None = None
    key_passphrase: SecretStr | None = Field(
        None, description="if the key file is encrypted (a secret: ssh__key_passphrase)"
    )
    known_hosts: Path | None = Field(None, description="required outside the lab")
    insecure_skip_host_key_check: bool = Field(False, description="lab only")
    port: int = Field(22, ge=1, le=65535)
    connect_timeout: float = Field(5.0, gt=0)
    command_timeout: float = Field(20.0, gt=0)
    max_neighbours: int = Field(2, ge=1, description="neighbours tried per check")
    mount_root: str = "/mnt"


class RbdSettings(_Model):
    """The RBD back end (probes.rbd) and the storage fence (fencing.blocklist)."""

    conf: str = Field("/etc/ceph/ceph.conf", description="ceph.conf on the neighbours")
    user: str = Field("fencer-probe", description="the probe's read-only Ceph client id")
    keyring: str = Field(
        "/etc/ceph/ceph.client.fencer-probe.keyring", description="its keyring, on the neighbours"
    )
    python: str = Field(
        "python3", description="the neighbours' Python with python3-rados/-rbd (from ceph-common)"
    )
    connect_timeout: float = Field(5.0, gt=0, description="seconds for each Ceph command")
    watch_timeout: float = Field(
        30.0, gt=0, description="the cluster's osd_client_watch_timeout: a dead client's lingering"
    )
    watch_margin: float = Field(5.0, ge=0, description="added to watch_timeout for a stale window")
    foreign_watchers: Literal["unknown", "ignore"] = Field(
        "unknown",
        description="a watch from another address on the host's image: the check is unknown "
        "(a storage_ip that is not set), or ignored (e.g. rbd-mirror watches every image)",
    )
    fence_conf: str = Field("/etc/ceph/ceph.conf", description="ceph.conf on the fencer worker")
    fence_user: str = Field("fencer-fence", description="the Ceph client id that may blocklist")
    fence_keyring: str = Field(
        "/etc/ceph/ceph.client.fencer-fence.keyring", description="its keyring, on the worker"
    )
    blocklist_expire: float = Field(
        86400.0, gt=0, description="seconds a blocklist lasts unless lifted (outlive BMC retries)"
    )


class EmailSettings(_Model):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(25, ge=1, le=65535)
    security: Literal["plain", "starttls", "smtps"] = "plain"
    username: str | None = None
    password: SecretStr | None = None
    ca_file: Path | None = None
    sender: str = "fencer@localhost"
    to: list[str] = Field(default_factory=list)
    timeout: float = Field(10.0, gt=0)


class SnmpReceiver(_Model):
    host: str
    port: int = Field(162, ge=1, le=65535)
    version: Literal["v2c", "v3"] = "v2c"
    community: SecretStr = SecretStr("public")
    user: str | None = None
    auth_key: SecretStr | None = None
    priv_key: SecretStr | None = None
    auth_protocol: Literal["SHA", "SHA256", "SHA512", "MD5"] = "SHA"
    priv_protocol: Literal["AES", "AES256", "DES"] = "AES"
    notify_type: Literal["trap", "inform"] = "trap"

    @model_validator(mode="after")
    def _v3_needs_user(self) -> SnmpReceiver:
        if self.version == "v3" and not (self.user and self.auth_key and self.priv_key):
            raise ValueError("an SNMP v3 receiver needs user, auth_key and priv_key (authPriv)")
        return self


class SnmpSettings(_Model):
    enabled: bool = False
    engine_id: str | None = Field(None, description="hex; fixed so v3 trap receivers know it")
    receivers: list[SnmpReceiver] = Field(default_factory=list)


class ActuatorSettings(_Model):
    power_timeout: float = Field(60.0, gt=0, description="seconds to see the power state change")
    poll_interval: float = Field(1.0, gt=0)
    retries: int = Field(2, ge=0)
    retry_backoff: float = Field(2.0, ge=0)
    preflight_interval: float = Field(
        3600.0,
        ge=0,
        description="seconds between BMC pre-flights of every host (the first soon after the "
        "actuate leader starts, hosts new since within minutes: pinned while Up); 0 = none",
    )
    decision_max_age: float | None = Field(
        None,
        gt=0,
        description="seconds a decision may wait between reaching the log and the BMC call, on "
        "the actuator's own clock (never against the gate's stamp); default 2 x "
        "policy.check_interval",
    )
    claim_lease: float = Field(
        60.0,
        gt=0,
        description="seconds without a renewal after which another worker's claim has lapsed",
    )

    fence_deadline: float = Field(
        600.0, gt=0, description="seconds one fence keeps retrying its BMC before fence_failed"
    )
    renotify_interval: float = Field(
        3600.0, gt=0, description="seconds between fence_failed reminders until an operator acts"
    )
    vms_follow_for: float = Field(
        86400.0,
        gt=0,
        description="seconds the VMs of a fenced host are followed after the restart call: "
        "vms_not_restarted reminders at growing intervals (at most renotify_interval) until "
        "they run, then a last notice",
    )


class SigningSettings(_Model):
    """Keys that sign fence decisions and settings records (fencing.signing).

    One key per line, `KEY_ID SECRET` (32 characters or more); the first line signs, every line
    verifies (rotation: add the new key first, remove the old one once its records are gone)."""

    keys_file: Path | None = Field(None, description="file of signing keys (mode 0600)")
    keys: SecretStr | None = Field(
        None, description="the same lines inline (e.g. FENCER_SECRETS_DIR file signing__keys)"
    )


_log = logging.getLogger("fencer.settings")
_told_deprecated: set[str] = set()


def _deprecated(field: str, why: str) -> None:
    """Log once per process that a settings field is accepted and ignored (a warning, never an
    error: a settings file written for an older version must still load)."""
    if field not in _told_deprecated:
        _told_deprecated.add(field)
        _log.warning("%s is deprecated and ignored (%s): remove it from the settings", field, why)


class GateSettings(_Model):
    """The cluster gate. It judges by its own clock only; `clock_tolerance` stays so that
    settings files written for older versions still load."""

    log_tail_notify_after: float = Field(
        120.0,
        gt=0,
        description="seconds the gate owner's tail of the decision log may fail in a row before "
        "a decision_log_unread notice (repeated every actuator.renotify_interval)",
    )

    clock_tolerance: float | None = Field(
        None,
        description="deprecated, ignored: the gate no longer compares a proposal's time stamp "
        "with its own clock",
    )

    @field_validator("clock_tolerance")
    @classmethod
    def _clock_tolerance_is_ignored(cls, value: float | None) -> None:
        if value is not None:
            _deprecated(
                "gate.clock_tolerance",
                "the gate judges by its own clock only and never compares a proposal's time "
                "stamp with it",
            )
        return None


class ApiSettings(_Model):
    listen: str = "127.0.0.1"
    port: int = Field(8480, ge=1, le=65535)
    token: SecretStr | None = None
    secrets_key_file: Path | None = Field(None, description="key that encrypts stored passwords")
    tokens: dict[str, str] = Field(
        default_factory=dict,
        description="API tokens stored hashed, by name: `sha256:<hex of the token>` "
        "(printf %s TOKEN | sha256sum); the name is the `who` of the audit log",
    )
    tls_certfile: Path | None = Field(None, description="serve the API and UI over https")
    tls_keyfile: Path | None = None
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="addresses or networks of reverse proxies whose X-Forwarded-Proto and "
        "X-Forwarded-For are believed (TLS ended there: the session cookie is Secure)",
    )
    login_max_failures: int = Field(
        5, ge=1, description="failed logins (or wrong bearer tokens) per client per window"
    )
    login_window: float = Field(300.0, gt=0, description="seconds of the failed-login window")
    settable_drivers: list[Driver] = Field(
        default_factory=lambda: [Driver.IPMI, Driver.REDFISH],
        description="drivers the API (and the settings topic) may choose; `template` runs a "
        "command, so it is chosen only in the file unless listed here",
    )


class MetricsSettings(_Model):
    """The Prometheus endpoint each `fencer worker` process serves (streams.observability)."""

    enabled: bool = False
    listen: str = Field("127.0.0.1", description="0.0.0.0 in a container, for the scraper")
    port: int = Field(9464, ge=0, le=65535, description="0 = a free port (tests)")
