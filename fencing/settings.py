"""Operator settings: one YAML file plus `FENCER_...` environment variables, validated by pydantic
(read by fencing.settings_file; the sections are in fencing.settings_sections, _ipmi, _kafka).

Secrets are `SecretStr` everywhere, so they print as '**********' in reprs, logs and
`fencer config check`. IPMI settings follow the feature design: cluster-level values, host-level
overrides inherited field by field (`effective_ipmi`), falling back to `defaults.ipmi`.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import (
    BaseSettings,
    NestedSecretsSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from fencing.policy import Policy
from fencing.settings_checks import (
    fake_driver_fields,
    insecure_redfish_problems,
    ipmi_credential_problems,
    settings_warnings,
)

# The sections and the reading of the file live in modules of their own; every name stays
# importable from here.
from fencing.settings_file import SECRETS_DIR_ENV, SettingsError, load_settings, redacted_dump
from fencing.settings_ipmi import (
    DEFAULT_EXECUTION_SYNTAX,
    FILE_ONLY_IPMI_FIELDS,
    IPMI_FIELDS,
    IPMI_PASSWORD_MAX_BYTES,
    IPMI_USERNAME_MAX_BYTES,
    ClusterSettings,
    EffectiveIpmi,
    HostSettings,
    IpmiOverrides,
    IpmiSettings,
    confine_to_file,
    file_only_violations,
    ipmi_credentials_error,
)
from fencing.settings_kafka import (
    TLS_PROTOCOLS,
    KafkaSettings,
    SaslSettings,
    TopicNames,
    kafka_plaintext_warning,
    kafka_tls_file_problems,
)
from fencing.settings_sections import (
    ActuatorSettings,
    ApiSettings,
    CloudStackSettings,
    Driver,
    EmailSettings,
    GateSettings,
    MetricsSettings,
    PasswordVia,
    PolicySettings,
    RbdSettings,
    RestartVia,
    SigningSettings,
    SnmpReceiver,
    SnmpSettings,
    SshSettings,
    StorageFence,
)

__all__ = [
    "DEFAULT_EXECUTION_SYNTAX",
    "FILE_ONLY_IPMI_FIELDS",
    "IPMI_FIELDS",
    "IPMI_PASSWORD_MAX_BYTES",
    "IPMI_USERNAME_MAX_BYTES",
    "SECRETS_DIR_ENV",
    "TLS_PROTOCOLS",
    "ActuatorSettings",
    "ApiSettings",
    "CloudStackSettings",
    "ClusterSettings",
    "Driver",
    "EffectiveIpmi",
    "EmailSettings",
    "FencerSettings",
    "GateSettings",
    "HostSettings",
    "IpmiOverrides",
    "IpmiSettings",
    "KafkaSettings",
    "MetricsSettings",
    "PasswordVia",
    "PolicySettings",
    "RbdSettings",
    "RestartVia",
    "SaslSettings",
    "SettingsError",
    "SigningSettings",
    "SnmpReceiver",
    "SnmpSettings",
    "SshSettings",
    "StorageFence",
    "TopicNames",
    "confine_to_file",
    "fake_driver_fields",
    "file_only_violations",
    "insecure_redfish_problems",
    "ipmi_credential_problems",
    "ipmi_credentials_error",
    "kafka_plaintext_warning",
    "kafka_tls_file_problems",
    "load_settings",
    "redacted_dump",
    "settings_warnings",
]


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
        """How long a decision may have been on the log when the actuator acts on it: its
        own monotonic clock between samples of the log's end (streams.actuation), never
        compared with the gate's `decided_at`."""
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
