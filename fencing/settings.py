"""Operator settings: one YAML file plus `FENCER_...` environment variables, validated by pydantic.

Secrets are `SecretStr` everywhere, so they print as '**********' in reprs, logs and
`fencer config check`. IPMI settings follow the feature design: cluster-level values, host-level
overrides inherited field by field (`effective_ipmi`), falling back to `defaults.ipmi`.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NestedSecretsSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings import SettingsError as _SourceError

from fencing.events import FenceAction
from fencing.policy import Policy

# A directory of secret files, one per setting, named by the setting's path joined with "__"
# (`cloudstack__api_key`, `defaults__password`, `clusters__<uuid>__ipmi__password`); each file
# holds the value (a trailing newline is stripped). Docker/compose secrets land in /run/secrets.
SECRETS_DIR_ENV = "FENCER_SECRETS_DIR"

DEFAULT_EXECUTION_SYNTAX = (
    "$IPMI_EXEC --username $IPMI_USERNAME --password $IPMI_PASSWORD "
    "--command $IPMI_ACTION --host $IPMI_HOST"
)


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


IPMI_FIELDS = (
    "action",
    "driver",
    "username",
    "password",
    "exec",
    "action_stop",
    "action_start",
    "action_reboot",
    "action_blink",
    "action_test",
    "execution_syntax",
    "password_via",
    "port",
    "redfish_system",
    "verify_tls",
    "restart_via",
    "restart_without_fence",
    "allow_insecure_redfish",
    "storage_fence",
)

# Fields that choose what runs or where a password may go (the command template, its tool and
# arguments, TLS checks): set only in the configuration file. The API refuses a write of them
# (403 naming the field) and a settings-topic record cannot change them (the store keeps the
# file's values); `driver: template` likewise unless `api.settable_drivers` lists it.
FILE_ONLY_IPMI_FIELDS = (
    "exec",
    "execution_syntax",
    "password_via",
    "action_stop",
    "action_start",
    "action_reboot",
    "action_blink",
    "action_test",
    "verify_tls",
    "allow_insecure_redfish",
)


# IPMI 2.0 carries at most 16 bytes of user name and 20 bytes of password (RAKP messages);
# a longer value reaches the BMC cut short or not at all, and the operator reads "incorrect
# password". Checked by `config check` and again by the IPMI driver before any packet.
IPMI_USERNAME_MAX_BYTES = 16
IPMI_PASSWORD_MAX_BYTES = 20


def ipmi_credentials_error(username: str, password: SecretStr | None) -> str | None:
    """Why these credentials cannot travel over IPMI 2.0 (naming the field), or None."""
    name_len = len(username.encode())
    if name_len > IPMI_USERNAME_MAX_BYTES:
        return (
            f"username is {name_len} bytes; IPMI 2.0 carries at most "
            f"{IPMI_USERNAME_MAX_BYTES} (the BMC would refuse the login)"
        )
    pw_len = len(password.get_secret_value().encode()) if password is not None else 0
    if pw_len > IPMI_PASSWORD_MAX_BYTES:
        return (
            f"password is {pw_len} bytes; IPMI 2.0 carries at most {IPMI_PASSWORD_MAX_BYTES} "
            "(the BMC would answer 'incorrect password')"
        )
    return None


class IpmiSettings(_Model):
    """Cluster-level fencing settings (the feature design's IPMI tab), all with defaults."""

    action: FenceAction = Field(
        FenceAction.NOTHING, description="default fencing action: nothing | stop | reboot | blink"
    )
    driver: Driver = Driver.IPMI
    username: str = "admin"
    password: SecretStr = SecretStr("")
    exec: str = Field("ipmitool", description="IPMI Exec: the tool the template runs")
    action_stop: str = "power off"
    action_start: str = "power on"
    action_reboot: str = "power reset"
    action_blink: str = "chassis identify"
    action_test: str = "power status"
    execution_syntax: str = DEFAULT_EXECUTION_SYNTAX
    password_via: PasswordVia = PasswordVia.ARGV
    port: int = Field(623, ge=1, le=65535, description="BMC port (623 for IPMI, 443 Redfish)")
    redfish_system: str | None = Field(None, description="Redfish system id; first one if unset")
    verify_tls: bool = True
    restart_via: RestartVia = RestartVia.DECLARE_DEGRADED
    restart_without_fence: bool = Field(
        False,
        description="tell CloudStack to restart VMs after nothing/blink (VMs may run twice)",
    )
    allow_insecure_redfish: bool = Field(
        False,
        description="allow an http:// Redfish address (the password travels in clear); "
        "configuration file only",
    )
    storage_fence: StorageFence = Field(
        StorageFence.NONE,
        description="Ceph blocklist of the host's storage address: none | before (the BMC "
        "action) | fallback (when the BMC action failed); fencing.storage_fence",
    )

    @field_validator("action")
    @classmethod
    def _decision_action(cls, v: FenceAction) -> FenceAction:
        if v in (FenceAction.START, FenceAction.TEST):
            raise ValueError("the fencing action must be one of nothing, stop, reboot, blink")
        return v


class IpmiOverrides(_Model):
    """Host-level overrides: every field optional (None = inherit from the cluster)."""

    address: str | None = Field(None, description="BMC hostname or IP")
    action: FenceAction | None = None
    driver: Driver | None = None
    username: str | None = None
    password: SecretStr | None = None
    exec: str | None = None
    action_stop: str | None = None
    action_start: str | None = None
    action_reboot: str | None = None
    action_blink: str | None = None
    action_test: str | None = None
    execution_syntax: str | None = None
    password_via: PasswordVia | None = None
    port: int | None = Field(None, ge=1, le=65535)
    redfish_system: str | None = None
    verify_tls: bool | None = None
    restart_via: RestartVia | None = None
    restart_without_fence: bool | None = None
    allow_insecure_redfish: bool | None = None
    storage_fence: StorageFence | None = None

    @field_validator("action")
    @classmethod
    def _decision_action(cls, v: FenceAction | None) -> FenceAction | None:
        if v in (FenceAction.START, FenceAction.TEST):
            raise ValueError("the fencing action must be one of nothing, stop, reboot, blink")
        return v


class ClusterSettings(_Model):
    """Per-cluster settings; the key in `clusters` is the CloudStack cluster uuid."""

    name: str | None = None
    ipmi: IpmiOverrides = Field(default_factory=IpmiOverrides)
    email_to: list[str] | None = Field(None, description="recipients; the global list if unset")
    fence_cap: int | None = Field(None, ge=0)
    paused: bool = False
    judge_readable_only: bool | None = Field(
        None, description="see policy.judge_readable_only; the policy's value if unset"
    )


class HostSettings(_Model):
    """Per-host settings; the key in `hosts` is the CloudStack host uuid."""

    name: str | None = None
    ipmi: IpmiOverrides = Field(default_factory=IpmiOverrides)
    storage_ip: str | None = Field(
        None,
        description="the host's address on the Ceph network (its RBD watchers carry it, a "
        "blocklist names it); CloudStack's ipaddress if unset",
    )


class EffectiveIpmi(_Model):
    """A host's resolved settings and where each value came from."""

    address: str | None
    values: IpmiSettings
    sources: dict[str, Literal["host", "cluster", "default"]]


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
    preflight_interval: float = Field(0.0, ge=0, description="0 = no periodic BMC pre-flight")
    decision_max_age: float | None = Field(
        None, gt=0, description="seconds a decision may wait; default 2 x policy.check_interval"
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


class SigningSettings(_Model):
    """Keys that sign fence decisions and settings records (fencing.signing).

    One key per line, `KEY_ID SECRET` (32 characters or more); the first line signs, every line
    verifies (rotation: add the new key first, remove the old one once its records are gone)."""

    keys_file: Path | None = Field(None, description="file of signing keys (mode 0600)")
    keys: SecretStr | None = Field(
        None, description="the same lines inline (e.g. FENCER_SECRETS_DIR file signing__keys)"
    )


class GateSettings(_Model):
    """The cluster gate's own clock."""

    clock_tolerance: float = Field(
        300.0, gt=0, description="seconds a proposal's stamp may differ from the gate's clock"
    )


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


class FencerSettings(BaseSettings):
    """Everything fencer is configured with."""

    model_config = SettingsConfigDict(
        env_prefix="FENCER_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    policy: PolicySettings = Field(default_factory=PolicySettings)
    defaults: IpmiSettings = Field(default_factory=IpmiSettings)
    clusters: dict[str, ClusterSettings] = Field(default_factory=dict)
    hosts: dict[str, HostSettings] = Field(default_factory=dict)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    cloudstack: CloudStackSettings = Field(default_factory=CloudStackSettings)
    ssh: SshSettings = Field(default_factory=SshSettings)
    rbd: RbdSettings = Field(default_factory=RbdSettings)
    email: EmailSettings = Field(default_factory=EmailSettings)
    snmp: SnmpSettings = Field(default_factory=SnmpSettings)
    actuator: ActuatorSettings = Field(default_factory=ActuatorSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    signing: SigningSettings = Field(default_factory=SigningSettings)
    lab: bool = Field(False, description="this is the lab: allows driver fake")
    data_dir: Path = Field(Path("var"), description="Faust tables and local state")
    log_json: bool = False
    log_level: str = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the file, as operators expect of FENCER_... variables.
        # Secret files (FENCER_SECRETS_DIR, e.g. compose's /run/secrets) sit between the two:
        # one file per setting, named by its path with "__" (cloudstack__api_key).
        secrets_dir = os.environ.get(SECRETS_DIR_ENV) or None
        if secrets_dir is None:
            return (env_settings, init_settings)
        secret_files = NestedSecretsSettingsSource(
            file_secret_settings,
            secrets_dir=secrets_dir,
            secrets_dir_missing="error",
            secrets_prefix="",
            secrets_nested_delimiter="__",
        )
        return (env_settings, secret_files, init_settings)

    @model_validator(mode="after")
    def _api_security_settings_hang_together(self) -> FencerSettings:
        a = self.api
        for name, value in a.tokens.items():
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", value):
                raise ValueError(
                    f"api.tokens.{name}: must be sha256:<64 lower-case hex digits> "
                    "(printf %s TOKEN | sha256sum), never the token itself"
                )
        if (a.tls_certfile is None) != (a.tls_keyfile is None):
            raise ValueError("api.tls_certfile: set together with api.tls_keyfile (or neither)")
        import ipaddress

        for i, proxy in enumerate(a.trusted_proxies):
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(
                    f"api.trusted_proxies.{i}: {proxy[:60]!r} is not an address or network"
                ) from None
        return self

    @model_validator(mode="after")
    def _fake_driver_only_in_the_lab(self) -> FencerSettings:
        where = fake_driver_fields(self)
        if where and not self.lab:
            raise ValueError(
                f"{where[0]}: driver fake powers off nothing; it is allowed only with lab: true"
            )
        return self

    def decision_max_age(self) -> float:
        """How old a decision may be when the actuator acts on it (its own clock)."""
        a = self.actuator.decision_max_age
        return a if a is not None else 2 * self.policy.check_interval

    def group_for(self, roles: tuple[str, ...] | list[str], all_roles: tuple[str, ...]) -> str:
        """The consumer group (Faust app id) of a role set: the same whatever the order."""
        wanted = tuple(sorted(set(roles)))
        for key, group in self.kafka.role_groups.items():
            if tuple(sorted({r.strip() for r in key.split(",") if r.strip()})) == wanted:
                return group
        if set(wanted) == set(all_roles):
            return self.kafka.group_id
        return f"{self.kafka.group_id}-{'-'.join(wanted)}"

    @model_validator(mode="after")
    def _redfish_only_over_https(self) -> FencerSettings:
        problems = insecure_redfish_problems(self)
        if problems:
            raise ValueError("\n".join(f"{where}: {problem}" for where, problem in problems))
        return self

    @model_validator(mode="after")
    def _ipmi_credentials_fit(self) -> FencerSettings:
        problems = ipmi_credential_problems(self)
        if problems:
            raise ValueError("\n".join(f"{where}: {problem}" for where, problem in problems))
        return self

    def effective_ipmi(self, host_uuid: str, cluster_uuid: str | None) -> EffectiveIpmi:
        """The host's settings: host override, else cluster, else defaults, field by field."""
        host = self.hosts.get(host_uuid, HostSettings()).ipmi
        cluster = self.clusters.get(cluster_uuid or "", ClusterSettings()).ipmi
        values: dict[str, Any] = {}
        sources: dict[str, Literal["host", "cluster", "default"]] = {}
        for name in IPMI_FIELDS:
            hv, cv = getattr(host, name), getattr(cluster, name)
            if hv is not None:
                values[name], sources[name] = hv, "host"
            elif cv is not None:
                values[name], sources[name] = cv, "cluster"
            else:
                values[name], sources[name] = getattr(self.defaults, name), "default"
        return EffectiveIpmi(address=host.address, values=IpmiSettings(**values), sources=sources)

    def storage_ip_for(self, host_uuid: str, management_ip: str) -> str:
        """The host's Ceph-network address: its `storage_ip` setting, else CloudStack's."""
        h = self.hosts.get(host_uuid)
        return h.storage_ip if h and h.storage_ip else management_ip

    def fence_cap_for(self, cluster_uuid: str) -> int:
        """The cluster's cap, or the policy's."""
        c = self.clusters.get(cluster_uuid)
        return c.fence_cap if c and c.fence_cap is not None else self.policy.fence_cap

    def policy_for(self, cluster_uuid: str | None) -> Policy:
        """The core's policy for a host of this cluster (cluster overrides applied)."""
        policy = self.policy.to_policy()
        c = self.clusters.get(cluster_uuid or "")
        if c is None:
            return policy
        updates: dict[str, Any] = {}
        if c.fence_cap is not None:
            updates["fence_cap"] = c.fence_cap
        if c.judge_readable_only is not None:
            updates["judge_readable_only"] = c.judge_readable_only
        return replace(policy, **updates) if updates else policy

    def email_to_for(self, cluster_uuid: str | None) -> list[str]:
        """The cluster's recipients, or the global list."""
        c = self.clusters.get(cluster_uuid or "")
        return c.email_to if c and c.email_to is not None else list(self.email.to)


def file_only_violations(
    change: IpmiOverrides, in_file: IpmiOverrides | None, settable_drivers: list[Driver]
) -> list[str]:
    """The fields of `change` (an API write or a settings-topic record for one cluster or host)
    that only the configuration file may set: a file-only field whose value differs from the
    file's at that level, or a driver outside `api.settable_drivers` that the file does not
    choose there."""
    base = in_file or IpmiOverrides()
    out = [
        name
        for name in FILE_ONLY_IPMI_FIELDS
        if getattr(change, name) is not None and getattr(change, name) != getattr(base, name)
    ]
    if (
        change.driver is not None
        and change.driver not in settable_drivers
        and change.driver != base.driver
    ):
        out.append("driver")
    return out


def confine_to_file(
    change: IpmiOverrides, in_file: IpmiOverrides | None, settable_drivers: list[Driver]
) -> IpmiOverrides:
    """`change` with every file-only field (and a driver outside `api.settable_drivers`) taken
    from the file's entry at that level: the settings topic never decides what runs."""
    base = in_file or IpmiOverrides()
    update = {name: getattr(base, name) for name in FILE_ONLY_IPMI_FIELDS}
    if change.driver is not None and change.driver not in settable_drivers:
        update["driver"] = base.driver
    return change.model_copy(update=update)


def insecure_redfish_problems(settings: FencerSettings) -> list[tuple[str, str]]:
    """(setting path, problem) for each host whose Redfish address is not https while neither
    the host, its cluster (any cluster, the host's being unknown here) nor the defaults say
    `allow_insecure_redfish: true`. The driver refuses such an address again before a request."""
    out: list[tuple[str, str]] = []
    some_cluster = any(c.ipmi.allow_insecure_redfish for c in settings.clusters.values())
    for huuid, host in settings.hosts.items():
        address = (host.ipmi.address or "").strip()
        if "://" not in address or address.lower().startswith("https://"):
            continue
        eff = settings.effective_ipmi(huuid, None).values
        if eff.driver is not Driver.REDFISH or eff.allow_insecure_redfish or some_cluster:
            continue
        scheme = address.split("://", 1)[0]
        out.append(
            (
                f"hosts.{huuid}.ipmi.address",
                f"Redfish over {scheme}:// would send the BMC password in clear; use https, or "
                "set allow_insecure_redfish: true for this host or its cluster",
            )
        )
    return out


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


def fake_driver_fields(settings: FencerSettings) -> list[str]:
    """Where the settings choose driver fake (defaults, a cluster or a host)."""
    where = ["defaults.driver"] if settings.defaults.driver is Driver.FAKE else []
    fake = Driver.FAKE
    where += [
        f"clusters.{u}.ipmi.driver" for u, c in settings.clusters.items() if c.ipmi.driver is fake
    ]
    where += [f"hosts.{u}.ipmi.driver" for u, h in settings.hosts.items() if h.ipmi.driver is fake]
    return where


def ipmi_credential_problems(settings: FencerSettings) -> list[tuple[str, str]]:
    """(setting path, problem) for each IPMI user name or password IPMI 2.0 cannot carry.

    A value is reported where it is set, when the driver that would use it is `ipmi`. A host's
    cluster is not known from the settings alone: a host value is judged with the host's own
    driver, else the defaults' unless some cluster sets another driver (the driver refuses
    such a value at the pre-flight or the fence, with the same reason).
    """
    out: list[tuple[str, str]] = []

    def judge(prefix: str, eff: EffectiveIpmi, source: str) -> None:
        v = eff.values
        if v.driver is not Driver.IPMI:
            return
        for field in ("username", "password"):
            if eff.sources[field] != source:
                continue
            problem = (
                ipmi_credentials_error(v.username, None)
                if field == "username"
                else ipmi_credentials_error("", v.password)
            )
            if problem is not None:
                out.append((f"{prefix}.{field}", problem))

    judge("defaults", settings.effective_ipmi("", None), "default")
    for cuuid in settings.clusters:
        judge(f"clusters.{cuuid}.ipmi", settings.effective_ipmi("", cuuid), "cluster")
    other_drivers = any(
        c.ipmi.driver not in (None, Driver.IPMI) for c in settings.clusters.values()
    )
    for huuid, host in settings.hosts.items():
        if host.ipmi.driver is None and other_drivers:
            continue
        judge(f"hosts.{huuid}.ipmi", settings.effective_ipmi(huuid, None), "host")
    return out


class SettingsError(Exception):
    """Bad settings: the message names the field (and the file line where known)."""


def _line_index(text: str, source: str) -> dict[tuple[str, ...], int]:
    """Map each key path in a YAML document to its 1-based line; refuse duplicate keys.

    PyYAML keeps the last of two equal keys without a word, so a second `hosts:` block would
    silently drop every host override above it: for fencing settings that is an error.
    """
    index: dict[tuple[str, ...], int] = {}
    seen: set[int] = set()

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if id(node) in seen:  # an alias: indexed where its anchor is (and may be recursive)
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            here: dict[str, int] = {}
            for k, v in node.value:
                name, line = str(k.value), k.start_mark.line + 1
                if name in here and name != "<<":
                    raise SettingsError(
                        f"{source} line {line}: duplicate key {'.'.join((*path, name))} "
                        f"(first at line {here[name]})"
                    )
                here[name] = line
                index[(*path, name)] = line
                walk(v, (*path, name))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                key = (*path, str(i))
                index[key] = v.start_mark.line + 1
                walk(v, key)

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return index


def _env_names() -> dict[str, str]:
    """FENCER_ variables present, by upper-case name (pydantic-settings ignores case)."""
    return {name.upper(): name for name in os.environ if name.upper().startswith("FENCER_")}


def _describe(err: ValidationError, lines: dict[tuple[str, ...], int], source: str) -> str:
    # Messages only, never the input: the bad value may be a password.
    env = _env_names()
    out = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        where = ""
        for n in range(len(loc), 0, -1):
            # The environment wins over the file, so a variable is the value's origin.
            var = env.get(("FENCER_" + "__".join(loc[:n])).upper())
            if var is not None:
                where = f" (environment {var})"
                break
            if loc[:n] in lines:
                where = f" ({source} line {lines[loc[:n]]})"
                break
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown setting"
        if not loc and e["type"] == "value_error":
            # A check across fields names its setting at the start of the message.
            for one in msg.removeprefix("Value error, ").splitlines():
                line = lines.get(tuple(one.split(":", 1)[0].split(".")))
                out.append(one + (f" ({source} line {line})" if line else ""))
            continue
        out.append(f"{'.'.join(loc) or '<root>'}: {msg}{where}")
    return "invalid settings:\n  " + "\n  ".join(out)


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> FencerSettings:
    """Load settings from a YAML file (optional) plus the environment; raise SettingsError."""
    data: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    source = "environment"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise SettingsError(f"cannot read settings file {p}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise SettingsError(f"{p}: not UTF-8 text (byte {exc.start})") from None
        try:
            loaded = yaml.safe_load(text)
            lines = _line_index(text, source)
        except yaml.YAMLError as exc:
            # Only the problem and its line: the YAML snippet could hold a password.
            mark = getattr(exc, "problem_mark", None)
            at = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise SettingsError(f"{p}{at}: not valid YAML: {problem}") from None
        except RecursionError:
            raise SettingsError(f"{p}: nested too deeply to be a settings file") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise SettingsError(f"{p}: the top level must be a mapping of settings")
        data = loaded
    data.update(overrides)
    try:
        return FencerSettings(**data)
    except ValidationError as exc:
        raise SettingsError(_describe(exc, lines, source)) from None
    except _SourceError as exc:
        raise SettingsError(_describe_source_error(exc)) from None


def _describe_source_error(exc: Exception) -> str:
    """One line for a value pydantic-settings could not even decode (never the value)."""
    text = str(exc)
    field = re.search(r'field "([^"]+)"', text)
    if "EnvSettingsSource" in text and field is not None:
        prefix = f"FENCER_{field.group(1)}".upper()
        names = sorted(v for k, v in _env_names().items() if k.startswith(prefix))
        return (
            f"environment {', '.join(names) or prefix}: cannot parse the value of setting "
            f"{field.group(1)} (lists and mappings must be JSON, e.g. "
            """FENCER_EMAIL__TO='["ops@example.com"]')"""
        )
    return f"{SECRETS_DIR_ENV}: {text}"


def redacted_dump(settings: FencerSettings) -> dict[str, Any]:
    """The effective settings as plain data, every secret shown as '**********' or null."""
    return settings.model_dump(mode="json")


# $IPMI_PASSWORD, ${IPMI_PASSWORD}, or the feature design's $IPMI_password; not $IPMI_PASSWORD_FILE.
_PASSWORD_IN_TEMPLATE = re.compile(r"\$\{?IPMI_PASSWORD\b", re.IGNORECASE)
_CHECKED_FIELDS = frozenset(
    {"driver", "execution_syntax", "password_via", "action", "restart_without_fence"}
)


def settings_warnings(settings: FencerSettings) -> list[str]:
    """Things that validate but that an operator should fix (printed by `config check`)."""
    warnings: list[str] = []

    def check(where: str, ipmi: IpmiSettings) -> None:
        if (
            ipmi.driver is Driver.TEMPLATE
            and ipmi.password_via is PasswordVia.ARGV
            and _PASSWORD_IN_TEMPLATE.search(ipmi.execution_syntax)
        ):
            warnings.append(
                f"{where}: the execution syntax puts $IPMI_PASSWORD in the command line, "
                "where any local user can read it in /proc; use password_via: env "
                "(ipmitool -E) or file"
            )
        if ipmi.restart_without_fence and ipmi.action in (FenceAction.NOTHING, FenceAction.BLINK):
            warnings.append(
                f"{where}: restart_without_fence with action {ipmi.action.value}: CloudStack "
                "will restart VMs of a host that may still run them (disk corruption)"
            )

    check("defaults", settings.defaults)
    # A cluster or host is checked only where it changes something the checks look at, so a
    # problem in the defaults is reported once, not once per cluster and host.
    for cuuid, cluster in settings.clusters.items():
        if cluster.ipmi.model_fields_set & _CHECKED_FIELDS:
            check(f"clusters.{cuuid}", settings.effective_ipmi("", cuuid).values)
    for huuid, host in settings.hosts.items():
        if host.ipmi.model_fields_set & _CHECKED_FIELDS:
            check(f"hosts.{huuid}", settings.effective_ipmi(huuid, None).values)
    plaintext = kafka_plaintext_warning(settings.kafka)
    if plaintext is not None:
        warnings.append(plaintext)
    if settings.ssh.user == "root" and not settings.lab:
        warnings.append(
            "ssh.user is root: the probe needs no privilege; use a dedicated user whose key is "
            "forced through fencer-probe-gate (operators' guide, section 4)"
        )
    if settings.ssh.insecure_skip_host_key_check:
        warnings.append("ssh.insecure_skip_host_key_check is on: only acceptable in the lab")
    elif settings.ssh.known_hosts is None:
        warnings.append("ssh.known_hosts is not set: probes will refuse to connect")
    return warnings
