"""The REST API's handlers, grouped by what they serve: session, clusters, hosts, fences,
pauses, audit and budget.

Rule: a handler reads its input (webui.app), checks it (webui.writes), writes through the
settings store or a topic, audits the change, and answers with a page of webui.views. It
never talks to a BMC: the IPMI test runs in an actuate worker (streams.actuating).
"""

from __future__ import annotations

import asyncio
import secrets
import time

from aiohttp import web

from fencing.records import OperatorAction
from webui import api_models as m
from webui import views as v
from webui import writes as w
from webui.app import (
    CSRF_COOKIE,
    MAX_SESSIONS,
    SESSION_COOKIE,
    SESSION_TTL,
    ApiError,
    Session,
    api_of,
    path_id,
    read_body,
    read_query,
    reply,
)
from webui.audit import AuditChange
from webui.auth import hash_token
from webui.openapi import build_openapi

routes = web.RouteTableDef()

# -- session ----------------------------------------------------------------------------------


@routes.get("/api/health")
async def health(request: web.Request) -> web.Response:
    """Liveness (no auth)."""
    ready = api_of(request).topics_ready()
    return reply(
        m.Health(status="ok" if ready else "starting", settings_ready=True, topics_ready=ready)
    )


@routes.post("/api/login")
async def login(request: web.Request) -> web.Response:
    """Trade the API token for a session cookie and a CSRF token."""
    api = api_of(request)
    client = api.refuse_if_limited(request)
    body: m.LoginInput = await read_body(request, m.LoginInput, "login")
    who = api.tokens.who(body.token)
    if who is None:
        await api.failed_login(request, client)
        raise ApiError(401, "authentication failed: wrong token")
    api.limiter.succeeded(client)
    now = time.time()
    for sid in [k for k, s in api.sessions.items() if s.expires < now]:
        del api.sessions[sid]
    if len(api.sessions) >= MAX_SESSIONS:
        api.sessions.pop(next(iter(api.sessions)))
    sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    # Kept by hash, like the tokens: a memory dump does not hand out live sessions.
    api.sessions[hash_token(sid)] = Session(csrf=csrf, expires=now + SESSION_TTL, who=who)
    secure = api.proxies.is_tls(request)
    response = reply(m.LoginResult(csrf_token=csrf))
    for name, value, http_only in ((SESSION_COOKIE, sid, True), (CSRF_COOKIE, csrf, False)):
        response.set_cookie(
            name,
            value,
            max_age=int(SESSION_TTL),
            path="/",
            httponly=http_only,
            samesite="Strict",
            secure=secure,
        )
    return response


@routes.post("/api/logout")
async def logout(request: web.Request) -> web.Response:
    """End the cookie session (a bearer caller has none)."""
    sid = request.cookies.get(SESSION_COOKIE)
    if sid:
        api_of(request).sessions.pop(hash_token(sid), None)
    response = reply(m.LoginResult(csrf_token=""))
    response.del_cookie(SESSION_COOKIE, path="/")
    response.del_cookie(CSRF_COOKIE, path="/")
    return response


@routes.get("/api/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    """This API's OpenAPI 3.1 document."""
    return web.json_response(build_openapi())


# -- clusters ---------------------------------------------------------------------------------


@routes.get("/api/clusters")
async def list_clusters(request: web.Request) -> web.Response:
    """KVM clusters with pause state and fence budget."""
    api = api_of(request)
    hosts = await v.kvm_hosts(api)
    clusters = await v.kvm_clusters(api)
    return reply([m.ClusterSummary(**v.cluster_summary(api, c, hosts)) for c in clusters])


@routes.get("/api/clusters/{cluster_id}")
async def get_cluster(request: web.Request) -> web.Response:
    """A cluster with its settings."""
    api = api_of(request)
    uuid = path_id(request, "cluster_id")
    c = await v.cluster_row(api, uuid)
    hosts = await v.kvm_hosts(api)
    return reply(
        m.ClusterView(
            **v.cluster_summary(api, c, hosts), settings=v.cluster_settings_view(api, uuid)
        )
    )


@routes.put("/api/clusters/{cluster_id}/settings")
async def put_cluster_settings(request: web.Request) -> web.Response:
    """Replace a cluster's settings (stored in the settings topic)."""
    api = api_of(request)
    uuid = path_id(request, "cluster_id")
    await w.put_settings(request, api, "cluster", uuid)
    return reply(v.cluster_settings_view(api, uuid))


@routes.delete("/api/clusters/{cluster_id}/settings")
async def delete_cluster_settings(request: web.Request) -> web.Response:
    """Forget the settings made here (the file's apply again)."""
    api = api_of(request)
    uuid = path_id(request, "cluster_id")
    await v.cluster_row(api, uuid)
    await w.write_settings(request, api, "cluster", uuid, None)
    return reply(v.cluster_settings_view(api, uuid))


# -- hosts ------------------------------------------------------------------------------------


@routes.get("/api/hosts")
async def list_hosts(request: web.Request) -> web.Response:
    """KVM hosts with their fencing state; `?cluster=` filters."""
    api = api_of(request)
    q: m.HostQuery = read_query(request, m.HostQuery)
    hosts = [h for h in await v.kvm_hosts(api) if q.cluster in (None, h.get("clusterid"))]
    return reply([m.HostSummary(**v.host_summary(api, h)) for h in hosts])


@routes.get("/api/hosts/{host_id}")
async def get_host(request: web.Request) -> web.Response:
    """A host with its fencing state, evidence, last probe and settings."""
    api = api_of(request)
    uuid = path_id(request, "host_id")
    h = await v.host_row(api, uuid)
    return reply(
        m.HostView(
            **v.host_summary(api, h),
            settings=v.host_settings_view(api, uuid, h.get("clusterid")),
            blocklist=v.blocklist_view(api, uuid, h.get("clusterid")),
        )
    )


@routes.put("/api/hosts/{host_id}/settings")
async def put_host_settings(request: web.Request) -> web.Response:
    """Replace a host's overrides (stored in the settings topic)."""
    api = api_of(request)
    uuid = path_id(request, "host_id")
    h = await w.put_settings(request, api, "host", uuid)
    return reply(v.host_settings_view(api, uuid, h.get("clusterid")))


@routes.delete("/api/hosts/{host_id}/settings")
async def delete_host_settings(request: web.Request) -> web.Response:
    """Forget the overrides made here (the file's apply again)."""
    api = api_of(request)
    uuid = path_id(request, "host_id")
    h = await v.host_row(api, uuid)
    await w.write_settings(request, api, "host", uuid, None)
    return reply(v.host_settings_view(api, uuid, h.get("clusterid")))


async def _fence_operator(request: web.Request, kind: str) -> web.Response:
    api = api_of(request)
    uuid = path_id(request, "host_id")
    body: m.FenceOperatorInput = await read_body(request, m.FenceOperatorInput, f"fence {kind}")
    await v.host_row(api, uuid)
    action = OperatorAction(
        kind=kind,
        host_uuid=uuid,
        decision_id=body.decision_id,
        by="api",
        note=body.note,
        at=api.clock(),
    )
    if api.send_operator is None:
        from streams.actuating import send_operator_action

        api.send_operator = send_operator_action
    try:
        await asyncio.wait_for(api.send_operator(api.settings, action), 30)
    except Exception as exc:
        raise ApiError(503, f"cannot write to Kafka: {type(exc).__name__}: {exc}") from None
    await api.record(
        request,
        f"fence_{kind}",
        f"host:{uuid}",
        [AuditChange(field="decision_id", new=body.decision_id or "(latest)")],
    )
    return reply(
        m.FenceOperatorResult(
            kind=kind, host_uuid=uuid, decision_id=body.decision_id, by="api", at=action.at
        )
    )


@routes.post("/api/hosts/{host_id}/fence/retry")
async def fence_retry(request: web.Request) -> web.Response:
    """Run the host's failed fence again now (same decision)."""
    return await _fence_operator(request, "retry")


@routes.post("/api/hosts/{host_id}/fence/handled")
async def fence_handled(request: web.Request) -> web.Response:
    """Mark the host's failed fence handled: the fence_failed reminders stop."""
    return await _fence_operator(request, "handled")


# -- fences -----------------------------------------------------------------------------------


@routes.get("/api/fences")
async def list_fences(request: web.Request) -> web.Response:
    """Fence decisions and outcomes, newest first, filtered."""
    q: m.FenceQuery = read_query(request, m.FenceQuery)
    return reply(
        api_of(request).view.history(
            cluster=q.cluster,
            host=q.host,
            since=q.since,
            until=q.until,
            result=q.result,
            limit=q.limit,
        )
    )


@routes.get("/api/fences/{decision_id}")
async def get_fence(request: web.Request) -> web.Response:
    """One fence with its evidence timeline."""
    decision_id = path_id(request, "decision_id")
    rec = api_of(request).view.fence(decision_id)
    if rec is None:
        raise ApiError(404, f"fence {decision_id}: no such decision")
    return reply(rec)


# -- pauses -----------------------------------------------------------------------------------


@routes.get("/api/pause")
async def get_pause(request: web.Request) -> web.Response:
    """Global and per-cluster pause flags."""
    api = api_of(request)
    return reply(v.pause_overview(api, await v.cluster_ids(api)))


async def _set_pause(request: web.Request, cluster: str | None, paused: bool) -> web.Response:
    """Pause or resume fencing everywhere (cluster None) or in one cluster; audited."""
    api = api_of(request)
    reason = None
    if paused:
        body: m.PauseInput = await read_body(request, m.PauseInput, "pause")
        reason = body.reason
    if cluster is not None:
        await v.cluster_row(api, cluster)
    if paused:
        await w.store_write(api.store.pause(cluster, reason=reason, by="api"))
    else:
        await w.store_write(api.store.resume(cluster, by="api"))
    changes = [AuditChange(field="paused", old=not paused, new=paused)]
    if reason:
        changes.append(AuditChange(field="reason", new=reason))
    target = "pause:global" if cluster is None else f"pause:cluster:{cluster}"
    await api.record(request, "pause" if paused else "resume", target, changes)
    if cluster is None:
        return reply(v.pause_overview(api, await v.cluster_ids(api)))
    return reply(v.pause_state(api, cluster))


@routes.post("/api/pause")
async def pause_all(request: web.Request) -> web.Response:
    """Pause fencing everywhere."""
    return await _set_pause(request, None, True)


@routes.post("/api/resume")
async def resume_all(request: web.Request) -> web.Response:
    """Resume fencing everywhere (cluster pauses stay)."""
    return await _set_pause(request, None, False)


@routes.post("/api/clusters/{cluster_id}/pause")
async def pause_cluster(request: web.Request) -> web.Response:
    """Pause fencing in one cluster."""
    return await _set_pause(request, path_id(request, "cluster_id"), True)


@routes.post("/api/clusters/{cluster_id}/resume")
async def resume_cluster(request: web.Request) -> web.Response:
    """Resume fencing in one cluster."""
    return await _set_pause(request, path_id(request, "cluster_id"), False)


# -- audit and budget -------------------------------------------------------------------------


@routes.get("/api/audit")
async def get_audit(request: web.Request) -> web.Response:
    """Settings changes and login bursts, newest first (who, field, old and new, when)."""
    api = api_of(request)
    q: m.AuditQuery = read_query(request, m.AuditQuery)
    if api.audit is None:
        raise ApiError(503, "the audit topic is not read")
    return reply(api.audit.entries(limit=q.limit, target=q.target))


@routes.get("/api/budget")
async def get_budget(request: web.Request) -> web.Response:
    """Power-downs used in the current window, per cluster."""
    api = api_of(request)
    return reply([v.budget(api, u) for u in await v.cluster_ids(api)])
