"""What the API answers with: the pages (views) of clusters, hosts, settings, pauses and pins,
built from the settings store, the fencing view and CloudStack's listings.

Rule: nothing here writes or decides; a view shows what the settings store and fencer's topics
say (webui.fencing_view) next to what CloudStack lists now (through fencing.cloudstack). No
view has a password: only whether one is set and where it comes from.
"""

from __future__ import annotations

from typing import Any

from fencing.cloudstack import Row, host_from_api
from fencing.records import HostRef
from fencing.settings import FILE_ONLY_IPMI_FIELDS, IpmiOverrides, StorageFence
from webui import api_models as m
from webui.app import Api, ApiError

# -- CloudStack's listings, through the API's cached client ------------------------------------


async def kvm_clusters(api: Api) -> list[Row]:
    """KVM clusters."""
    rows = await api.cloudstack.list("listClusters")
    return [c for c in rows if str(c.get("hypervisortype", "KVM")).upper() == "KVM"]


async def kvm_hosts(api: Api) -> list[Row]:
    """KVM routing hosts."""
    return await api.cloudstack.list("listHosts", type="Routing", hypervisor="KVM")


async def cluster_row(api: Api, uuid: str) -> Row:
    """One KVM cluster, or a 404."""
    for c in await kvm_clusters(api):
        if c.get("id") == uuid:
            return c
    raise ApiError(404, f"cluster {uuid}: no such KVM cluster in CloudStack")


async def host_row(api: Api, uuid: str) -> Row:
    """One KVM host, or a 404."""
    for h in await kvm_hosts(api):
        if h.get("id") == uuid:
            return h
    raise ApiError(404, f"host {uuid}: no such KVM host in CloudStack")


async def host_with_bmc(api: Api, uuid: str) -> dict[str, Any]:
    """The host's listHosts row; a 422 naming ipmi.address when no BMC address is set."""
    h = await host_row(api, uuid)
    if not api.store.effective(uuid, h.get("clusterid")).address:
        raise ApiError(
            422,
            "invalid host settings: ipmi.address: no BMC address is set for this host",
            [m.ErrorField(field="ipmi.address", message="no BMC address is set for this host")],
        )
    return h


async def cluster_ids(api: Api) -> list[str]:
    """The uuids of the KVM clusters."""
    return [str(c["id"]) for c in await kvm_clusters(api)]


# -- pages -----------------------------------------------------------------------------------


def ipmi_values(values: Any) -> Any:
    return m.IpmiValues(**values.model_dump(exclude={"password"}))


def override_values(ipmi: IpmiOverrides) -> Any:
    return m.IpmiOverrideValues(**ipmi.model_dump(exclude={"password"}))


def password_error(
    api: Api, source: str, host_uuid: str | None, cluster_uuid: str | None
) -> str | None:
    """Why the password in force cannot be decrypted, or None."""
    key = f"host:{host_uuid}" if source == "host" else f"cluster:{cluster_uuid}"
    return api.store.undecryptable.get(key) if source != "default" else None


def cluster_settings_view(api: Api, uuid: str) -> m.ClusterSettingsView:
    s = api.store.settings
    cs = api.store.cluster(uuid)
    eff = s.effective_ipmi("", uuid)
    return m.ClusterSettingsView(
        name=cs.name,
        email_to=cs.email_to,
        fence_cap=cs.fence_cap,
        effective_fence_cap=s.fence_cap_for(uuid),
        fence_window=s.policy.fence_window,
        paused=api.store.is_paused(uuid),
        overrides=override_values(cs.ipmi),
        effective=ipmi_values(eff.values),
        defaults=ipmi_values(s.defaults),
        sources=eff.sources,
        password_set=bool(eff.values.password.get_secret_value()),
        password_source=eff.sources["password"],
        password_error=password_error(api, eff.sources["password"], None, uuid),
        file_only=list(FILE_ONLY_IPMI_FIELDS),
        settable_drivers=[d.value for d in s.api.settable_drivers],
    )


def host_settings_view(api: Api, uuid: str, cluster_uuid: str | None) -> m.HostSettingsView:
    s = api.store.settings
    hs = api.store.host(uuid)
    eff = s.effective_ipmi(uuid, cluster_uuid)
    inherited = s.effective_ipmi("", cluster_uuid)
    return m.HostSettingsView(
        name=hs.name,
        address=eff.address,
        overrides=override_values(hs.ipmi),
        inherited=ipmi_values(inherited.values),
        effective=ipmi_values(eff.values),
        sources=eff.sources,
        password_set=bool(eff.values.password.get_secret_value()),
        password_source=eff.sources["password"],
        password_error=password_error(api, eff.sources["password"], uuid, cluster_uuid),
        file_only=list(FILE_ONLY_IPMI_FIELDS),
        settable_drivers=[d.value for d in s.api.settable_drivers],
    )


def blocklist_view(api: Api, uuid: str, cluster_uuid: str | None) -> m.BlocklistView:
    """The host's recorded blocklist entries and whether the UI offers to lift them."""
    entries = api.view.blocklist(uuid)
    fence = api.store.settings.effective_ipmi(uuid, cluster_uuid).values.storage_fence
    return m.BlocklistView(
        entries=entries,
        storage_fence=fence.value,
        liftable=bool(entries) or fence is not StorageFence.NONE,
    )


def budget(api: Api, cluster_uuid: str) -> Any:
    s = api.store.settings
    return api.view.budget(
        cluster_uuid,
        now=api.clock(),
        window=s.policy.fence_window,
        cap=s.fence_cap_for(cluster_uuid),
    )


def cluster_summary(api: Api, c: dict[str, Any], hosts: list[dict[str, Any]]) -> dict[str, Any]:
    uuid = str(c["id"])
    return {
        "uuid": uuid,
        "name": str(c.get("name") or uuid),
        "zone_name": c.get("zonename"),
        "pod_name": c.get("podname"),
        "host_count": sum(1 for h in hosts if h.get("clusterid") == uuid),
        "paused": api.store.is_paused(uuid),
        "budget": budget(api, uuid),
    }


def host_summary(api: Api, h: dict[str, Any]) -> dict[str, Any]:
    ref = host_from_api(h)
    return {
        "uuid": ref.host_uuid,
        "name": ref.host_name or ref.host_uuid,
        "ip_address": ref.ip_address,
        "cluster_uuid": ref.cluster_uuid,
        "cluster_name": ref.cluster_name,
        "status": h.get("state"),
        "resource_state": h.get("resourcestate"),
        "fencing": fencing_state(api, ref),
    }


def fencing_state(api: Api, ref: HostRef) -> Any:
    """The host's record as fencer's watch agent published it (webui.fencing_view)."""
    return api.view.host(ref.host_uuid, ref)


def pause_state(api: Api, cluster_uuid: str | None) -> m.PauseState:
    flag = api.store.pause_flag(cluster_uuid)
    if cluster_uuid is None:
        paused = api.store.is_paused(None)
    else:
        paused = api.store.cluster(cluster_uuid).paused
    return m.PauseState(
        paused=paused, reason=flag.reason if flag else None, at=flag.at if flag else None
    )


def pause_overview(api: Api, cluster_uuids: list[str]) -> m.PauseOverview:
    return m.PauseOverview(
        global_pause=pause_state(api, None),
        clusters={u: pause_state(api, u) for u in cluster_uuids},
    )


def pin_view(api: Api, uuid: str) -> m.BmcPinView:
    from fencing.identity import PinStoreError

    if api.pins is None:
        raise ApiError(503, "the BMC pins topic is not read")
    try:
        pin = api.pins.get(uuid)
    except PinStoreError as exc:
        raise ApiError(503, str(exc)) from None
    if pin is None:
        return m.BmcPinView(host_uuid=uuid, pinned=False)
    return m.BmcPinView(
        host_uuid=uuid,
        pinned=True,
        guid=pin.guid,
        address=pin.address,
        pinned_at=pin.pinned_at,
        pinned_by=pin.pinned_by,
        seen_guid=pin.seen_guid,
        seen_at=pin.seen_at,
    )
