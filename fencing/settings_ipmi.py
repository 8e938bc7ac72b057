"""The IPMI tab's settings: cluster-level values, host-level overrides inherited field by field,
and the fields only the configuration file may set.

The field list is IpmiSettings' own: `IPMI_FIELDS` and the overrides model are derived from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, create_model, field_validator
from pydantic.fields import FieldInfo

from fencing.events import FenceAction
from fencing.settings_sections import Driver, PasswordVia, RestartVia, StorageFence, _Model

DEFAULT_EXECUTION_SYNTAX = (
    "$IPMI_EXEC --username $IPMI_USERNAME --password $IPMI_PASSWORD "
    "--command $IPMI_ACTION --host $IPMI_HOST"
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


# The one spelling of the IPMI field list is IpmiSettings; the list and the overrides follow it.
IPMI_FIELDS: tuple[str, ...] = tuple(IpmiSettings.model_fields)


class _OverridesBase(_Model):
    """Host-level overrides: every field optional (None = inherit from the cluster)."""

    address: str | None = Field(None, description="BMC hostname or IP")

    @field_validator("action", check_fields=False)
    @classmethod
    def _decision_action(cls, v: FenceAction | None) -> FenceAction | None:
        if v in (FenceAction.START, FenceAction.TEST):
            raise ValueError("the fencing action must be one of nothing, stop, reboot, blink")
        return v


def _optional(info: FieldInfo) -> tuple[Any, Any]:
    """An IpmiSettings field as an override: the same type, constraints and description, or
    None (inherit)."""
    annotation: Any = info.annotation
    return (annotation | None, FieldInfo.merge_field_infos(info, default=None))


if TYPE_CHECKING:

    class IpmiOverrides(_OverridesBase):
        """Every field of IpmiSettings, optional (None = inherit), plus the BMC address."""

        def __getattr__(self, name: str) -> Any: ...

else:
    IpmiOverrides = create_model(
        "IpmiOverrides",
        __base__=_OverridesBase,
        __module__=__name__,
        __doc__=_OverridesBase.__doc__,
        **{name: _optional(info) for name, info in IpmiSettings.model_fields.items()},
    )


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
