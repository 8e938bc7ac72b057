"""The REST API's request and response bodies; the OpenAPI document is generated from them.

Rule: no response model has a password field. Passwords enter only through the write models
(`IpmiInput.password`, JSON schema `writeOnly`) and leave only as `password_set: bool`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from fencing.settings import IpmiOverrides, IpmiSettings
from webui.fencing_view import BlocklistEntryView, BudgetView, FenceResult, HostStateView

Source = Literal["host", "cluster", "default"]


def _copy_fields(model: type[BaseModel], *, optional: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, f in model.model_fields.items():
        if name == "password":
            continue
        annotation: Any = f.annotation
        if optional:
            annotation = annotation | None
        out[name] = (annotation, Field(None if optional else f.default, description=f.description))
    return out


IpmiValues = create_model(
    "IpmiValues",
    __doc__="Every IPMI setting with its value (no password: see password_set).",
    **_copy_fields(IpmiSettings, optional=False),
)
IpmiOverrideValues = create_model(
    "IpmiOverrideValues",
    __doc__="The values set at this level; null means inherited.",
    **_copy_fields(IpmiOverrides, optional=True),
)


class ErrorField(BaseModel):
    """One invalid field."""

    field: str
    message: str


class ErrorBody(BaseModel):
    """Every error answer: one line, plus the invalid fields when validation failed."""

    error: str
    fields: list[ErrorField] = Field(default_factory=list)


class Health(BaseModel):
    """Liveness and readiness."""

    status: Literal["ok", "starting"]
    settings_ready: bool
    topics_ready: bool


class LoginInput(BaseModel):
    """Log in with the API token; the answer sets a session cookie and a CSRF cookie."""

    model_config = ConfigDict(extra="forbid")
    token: str = Field(min_length=1, max_length=4096, json_schema_extra={"writeOnly": True})


class LoginResult(BaseModel):
    """Send `csrf_token` as the X-CSRF-Token header on every write made with the cookie."""

    csrf_token: str


class IpmiInput(IpmiOverrides):
    """IPMI fields to set; null or absent = inherit. The password is write-only."""

    clear_password: bool = Field(False, description="remove the password stored at this level")

    @field_validator("password", mode="before")
    @classmethod
    def _empty_means_keep(cls, v: Any) -> Any:
        # An empty password box in a form means "unchanged", never "empty password".
        return None if v == "" else v


class ClusterSettingsInput(BaseModel):
    """A cluster's settings (PUT replaces them; the password is kept unless given or cleared)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, max_length=200)
    ipmi: IpmiInput = Field(default_factory=IpmiInput)
    email_to: list[str] | None = Field(None, description="recipients; the global list if null")
    fence_cap: int | None = Field(None, ge=0, le=1000, description="power-downs per window")

    @field_validator("ipmi")
    @classmethod
    def _no_cluster_address(cls, v: IpmiInput) -> IpmiInput:
        if v.address is not None:
            raise ValueError("the BMC address is set per host, not per cluster")
        return v


class HostSettingsInput(BaseModel):
    """A host's overrides (PUT replaces them; the password is kept unless given or cleared)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, max_length=200)
    ipmi: IpmiInput = Field(default_factory=IpmiInput)


class PauseInput(BaseModel):
    """Why fencing is paused (shown to other operators)."""

    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(None, max_length=500)


class FenceOperatorInput(BaseModel):
    """Which failed fence an operator answers (default: the host's latest one)."""

    model_config = ConfigDict(extra="forbid")
    decision_id: str | None = Field(None, max_length=300)
    note: str | None = Field(None, max_length=500)


class FenceOperatorResult(BaseModel):
    """The operator record written to the operator-actions topic."""

    kind: str
    host_uuid: str
    decision_id: str | None = None
    by: str | None = None
    at: float


class PauseState(BaseModel):
    """A pause flag as stored."""

    paused: bool
    reason: str | None = None
    at: float | None = None


class PauseOverview(BaseModel):
    """Global pause and every cluster's."""

    global_pause: PauseState
    clusters: dict[str, PauseState]


class ClusterSettingsView(BaseModel):
    """A cluster's fencing settings: what is set here, what applies, and where it comes from."""

    name: str | None
    email_to: list[str] | None
    fence_cap: int | None
    effective_fence_cap: int
    fence_window: float
    paused: bool
    overrides: IpmiOverrideValues
    effective: IpmiValues
    defaults: IpmiValues
    sources: dict[str, Source]
    password_set: bool
    password_source: Source
    password_error: str | None = Field(
        None, description="the stored password cannot be decrypted (fencing will fail): why"
    )
    file_only: list[str] = Field(
        default_factory=list,
        description="IPMI fields set only in the configuration file (shown read-only; a write "
        "is refused with 403)",
    )
    settable_drivers: list[str] = Field(
        default_factory=list, description="drivers the API may choose (api.settable_drivers)"
    )


class ClusterSummary(BaseModel):
    """A KVM cluster from CloudStack, with its fencing pause and budget."""

    uuid: str
    name: str
    zone_name: str | None = None
    pod_name: str | None = None
    host_count: int
    paused: bool
    budget: BudgetView


class ClusterView(ClusterSummary):
    """A cluster with its settings."""

    settings: ClusterSettingsView


class HostSettingsView(BaseModel):
    """A host's overrides, the value each field would inherit, and what applies."""

    name: str | None
    address: str | None
    overrides: IpmiOverrideValues
    inherited: IpmiValues
    effective: IpmiValues
    sources: dict[str, Source]
    password_set: bool
    password_source: Source
    password_error: str | None = Field(
        None, description="the stored password cannot be decrypted (fencing will fail): why"
    )
    file_only: list[str] = Field(
        default_factory=list,
        description="IPMI fields set only in the configuration file (shown read-only; a write "
        "is refused with 403)",
    )
    settable_drivers: list[str] = Field(
        default_factory=list, description="drivers the API may choose (api.settable_drivers)"
    )


class HostSummary(BaseModel):
    """A KVM host from CloudStack with its fencing state."""

    uuid: str
    name: str
    ip_address: str | None = None
    cluster_uuid: str | None = None
    cluster_name: str | None = None
    status: str | None = Field(None, description="CloudStack's agent state")
    resource_state: str | None = None
    fencing: HostStateView


class BlocklistView(BaseModel):
    """Whether a Ceph blocklist can concern the host: the entries fencer's storage fence recorded
    (not lifted through fencer since) and the host's effective `storage_fence`."""

    entries: list[BlocklistEntryView] = Field(default_factory=list)
    storage_fence: str = Field(description="the host's effective storage_fence (none: never)")
    liftable: bool = Field(
        description="the UI offers Lift blocklist: an entry is recorded, or storage_fence is "
        "not none (fencer blocklists this host when it fences it)"
    )


class HostView(HostSummary):
    """A host with its settings."""

    settings: HostSettingsView
    blocklist: BlocklistView


class IpmiTestPending(BaseModel):
    """No actuate worker answered the test within the API's wait: ask again by request id."""

    request_id: str
    host_uuid: str | None = None
    status: Literal["pending"] = "pending"
    message: str


class BmcPinView(BaseModel):
    """The system GUID a host's BMC is pinned to (fencing refuses a BMC that reports another)."""

    host_uuid: str
    pinned: bool
    guid: str | None = None
    address: str | None = None
    pinned_at: float | None = None
    pinned_by: str | None = None
    seen_guid: str | None = Field(
        None, description="another GUID the BMC reported: fencing refused until confirmed"
    )
    seen_at: float | None = None


class BmcPinInput(BaseModel):
    """Confirm the BMC's identity: pin the GUID it reports now."""

    model_config = ConfigDict(extra="forbid")
    expect: str | None = Field(
        None, min_length=1, max_length=64, description="refuse unless the BMC reports this GUID"
    )


class FenceQuery(BaseModel):
    """The filters of GET /api/fences (query parameters)."""

    model_config = ConfigDict(extra="forbid")
    cluster: str | None = Field(None, description="cluster uuid")
    host: str | None = Field(None, description="host uuid")
    since: float | None = Field(None, description="decided at or after (epoch seconds)")
    until: float | None = Field(None, description="decided at or before (epoch seconds)")
    result: FenceResult | None = None
    limit: int = Field(100, ge=1, le=1000)


class AuditQuery(BaseModel):
    """The filters of GET /api/audit (query parameters)."""

    model_config = ConfigDict(extra="forbid")
    target: str | None = Field(None, max_length=300, description="e.g. cluster:<uuid>")
    limit: int = Field(100, ge=1, le=1000)


class HostQuery(BaseModel):
    """The filter of GET /api/hosts (query parameter)."""

    model_config = ConfigDict(extra="forbid")
    cluster: str | None = Field(None, description="only the hosts of this cluster uuid")
