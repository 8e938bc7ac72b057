"""What a settings write may change and what it changed: fields only the configuration file
sets (403), credentials IPMI cannot carry and Redfish over http (422), the audit diff.

Rule: these checks run before anything is written to the settings topic; a refusal names the
field. Passwords are never echoed: a changed one shows as "(changed)".
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from fencing.cloudstack import Row
from fencing.settings import ClusterSettings, HostSettings, IpmiOverrides, file_only_violations
from streams.settings_store import SettingsStoreError
from webui import api_models as m
from webui.app import Api, ApiError, invalid, read_body
from webui.audit import AuditChange, diff
from webui.views import cluster_row, host_row


def dump(entry: ClusterSettings | HostSettings) -> dict[str, Any]:
    return entry.model_dump(mode="json", exclude={"paused"})


def changes(old: dict[str, Any], new: dict[str, Any], ipmi: Any = None) -> list[AuditChange]:
    """What a write changed; a new password shows as changed, never its value."""
    out = diff(old, new)
    if ipmi is not None and ipmi.password is not None:
        if not any(c.field == "ipmi.password" for c in out):
            out.append(AuditChange(field="ipmi.password", old="**********", new="(changed)"))
    return out


def refuse_file_only(
    api: Api, change: IpmiOverrides, in_file: ClusterSettings | HostSettings | None
) -> None:
    """403 naming the field when a write sets what only the configuration file may set (the
    command template, its tool and arguments, TLS checks, a driver outside settable_drivers)."""
    allowed = api.store.file_settings.api.settable_drivers
    refused = file_only_violations(change, in_file.ipmi if in_file else None, allowed)
    if not refused:
        return
    fields = [
        m.ErrorField(
            field=f"ipmi.{name}",
            message=(
                "driver "
                + str(getattr(change.driver, "value", change.driver))
                + " is chosen only in the configuration file (api.settable_drivers: "
                + ", ".join(d.value for d in allowed)
                + ")"
                if name == "driver"
                else "set only in the configuration file: the API cannot change it"
            ),
        )
        for name in refused
    ]
    raise ApiError(403, f"forbidden: {fields[0].field}: {fields[0].message}", fields)


def refuse_what_ipmi_cannot_carry(
    api: Api, change: ClusterSettings | HostSettings, cluster: str | None, host: str | None
) -> None:
    """422 naming the field when the change leaves a user name or password IPMI 2.0 cannot
    carry (16 / 20 bytes) on a BMC reached with the `ipmi` driver."""
    from fencing.settings import Driver, ipmi_credentials_error

    current = api.store.settings
    keep = api.store.host(host) if host else api.store.cluster(cluster or "")
    if change.ipmi.password is None:  # the stored password stays
        change = change.model_copy(
            update={"ipmi": change.ipmi.model_copy(update={"password": keep.ipmi.password})}
        )
    if host is not None:
        assert isinstance(change, HostSettings)
        candidate = current.model_copy(update={"hosts": {**current.hosts, host: change}})
    else:
        assert isinstance(change, ClusterSettings)
        candidate = current.model_copy(
            update={"clusters": {**current.clusters, cluster or "": change}}
        )
    eff = candidate.effective_ipmi(host or "", cluster)
    values = eff.values
    address = (eff.address or "").strip()
    if (
        values.driver is Driver.REDFISH
        and "://" in address
        and not address.lower().startswith("https://")
        and not values.allow_insecure_redfish
    ):
        why = (
            "Redfish over http:// would send the BMC password in clear; use https (only the "
            "configuration file can allow_insecure_redfish)"
        )
        raise ApiError(
            422,
            f"invalid settings: ipmi.address: {why}",
            [m.ErrorField(field="ipmi.address", message=why)],
        )
    if values.driver is not Driver.IPMI:
        return
    for name, problem in (
        ("username", ipmi_credentials_error(values.username, None)),
        ("password", ipmi_credentials_error("", values.password)),
    ):
        if problem is not None:
            raise ApiError(
                422,
                f"invalid settings: ipmi.{name}: {problem}",
                [m.ErrorField(field=f"ipmi.{name}", message=problem)],
            )


async def store_write(write: Awaitable[None]) -> None:
    try:
        await write
    except SettingsStoreError as exc:
        if str(exc).startswith("ipmi.password"):
            field, _, message = str(exc).partition(": ")
            raise ApiError(
                422, f"invalid settings: {exc}", [m.ErrorField(field=field, message=message)]
            ) from None
        raise ApiError(503, str(exc)) from None


async def put_settings(request: web.Request, api: Api, target: str, uuid: str) -> Row:
    """Check and store a cluster's settings or a host's overrides, audit the change; the
    cluster's or host's listHosts row."""
    if target == "cluster":
        body: Any = await read_body(request, m.ClusterSettingsInput, "cluster settings")
        row = await cluster_row(api, uuid)
        cluster: str | None = uuid
        host: str | None = None
        in_file: Any = api.store.file_settings.clusters.get(uuid)
    else:
        body = await read_body(request, m.HostSettingsInput, "host settings")
        row = await host_row(api, uuid)
        cluster, host = row.get("clusterid"), uuid
        in_file = api.store.file_settings.hosts.get(uuid)
    refuse_file_only(api, body.ipmi, in_file)
    ipmi = body.ipmi.model_dump(exclude={"clear_password"})
    if body.ipmi.clear_password:
        ipmi["password"] = ""
    try:
        entry: ClusterSettings | HostSettings = (
            ClusterSettings(
                name=body.name, email_to=body.email_to, fence_cap=body.fence_cap, ipmi=ipmi
            )
            if host is None
            else HostSettings(name=body.name, ipmi=ipmi)
        )
    except ValidationError as exc:
        raise invalid(exc, f"{target} settings") from None
    refuse_what_ipmi_cannot_carry(api, entry, cluster, host)
    await write_settings(request, api, target, uuid, entry, body.ipmi)
    return row


async def write_settings(
    request: web.Request,
    api: Api,
    target: str,
    uuid: str,
    entry: ClusterSettings | HostSettings | None,
    ipmi: Any = None,
) -> None:
    """Store (or, with no entry, forget) a cluster's or host's settings; audit the change."""
    current = api.store.host if target == "host" else api.store.cluster
    old = dump(current(uuid))
    if entry is None:
        write = (api.store.delete_host if target == "host" else api.store.delete_cluster)(uuid)
    elif isinstance(entry, HostSettings):
        write = api.store.put_host(uuid, entry)
    else:
        write = api.store.put_cluster(uuid, entry)
    await store_write(write)
    action = f"{'delete' if entry is None else 'put'}_{target}_settings"
    await api.record(request, action, f"{target}:{uuid}", changes(old, dump(current(uuid)), ipmi))
