"""The REST API and the web UI (the feature design's IPMI tab), one aiohttp app.

Rules: everything under /api/ but health and login needs the API token, as a bearer header or
as the session cookie obtained by logging in with it; a write made with the cookie also needs
the double-submit CSRF header. Settings changes go through `SettingsStore` (the settings topic);
host states and fences come from `FencingView` (fencer's topics); clusters and hosts from the
CloudStack API. No response carries a password, and errors are one line naming the field or
the peer. Listens on 127.0.0.1 unless `api.listen` says otherwise.

Security (webui.auth, webui.audit): tokens and sessions are kept only as SHA-256 hashes; failed
logins are limited per client; every change is audited on the audit topic; the fields that
choose what runs (FILE_ONLY_IPMI_FIELDS, driver template) are refused with 403.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import aiohttp
from aiohttp import web
from cs import AIOCloudStack, CloudStackException
from pydantic import BaseModel, ValidationError

from fencing.events import HostStatus, NoticeKind
from fencing.records import HostRef, Notice, OperatorAction
from fencing.settings import (
    FILE_ONLY_IPMI_FIELDS,
    ClusterSettings,
    FencerSettings,
    HostSettings,
    IpmiOverrides,
    SettingsError,
    file_only_violations,
    load_settings,
)
from streams.bmc_pins import BmcPinStore
from streams.settings_store import SettingsStore, SettingsStoreError
from streams.topic_reader import TopicReader, TopicReaderError
from webui import api_models as m
from webui.audit import AuditChange, AuditLog, diff
from webui.auth import LoginLimiter, ProxyRules, TokenBook, hash_token
from webui.fencing_view import FencingView
from webui.openapi import build_openapi
from webui.rbd_routes import routes as rbd_routes  # lift a Ceph blocklist (issue 18)

log = logging.getLogger("fencer.api")

SESSION_COOKIE = "fencer_session"
CSRF_COOKIE = "fencer_csrf"
CSRF_HEADER = "X-CSRF-Token"
SESSION_TTL = 12 * 3600.0
MAX_SESSIONS = 1000
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PUBLIC_API = frozenset({"/api/health", "/api/login"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An answer other than 200: status, one line, and the invalid fields if any."""

    def __init__(self, status: int, message: str, fields: list[m.ErrorField] | None = None):
        super().__init__(message)
        self.status, self.message, self.fields = status, message, fields or []


# -- CloudStack inventory ---------------------------------------------------------------------


class Inventory:
    """KVM clusters and routing hosts from the CloudStack API, cached for a few seconds."""

    def __init__(self, settings: FencerSettings, ttl: float = 3.0) -> None:
        cs = settings.cloudstack
        self._endpoint = cs.endpoint
        self._client = AIOCloudStack(
            endpoint=cs.endpoint,
            key=cs.api_key.get_secret_value(),
            secret=cs.secret_key.get_secret_value(),
            timeout=cs.timeout,
            verify=cs.verify_tls,
        )
        self._ttl = ttl
        self._cache: dict[str, tuple[float, list[dict[str, Any]]]] = {}
        self._lock = asyncio.Lock()

    async def _list(self, command: str, **params: str) -> list[dict[str, Any]]:
        async with self._lock:
            hit = self._cache.get(command)
            if hit is not None and time.monotonic() - hit[0] < self._ttl:
                return hit[1]
            try:
                result = await getattr(self._client, command)(fetch_list=True, **params)
            except CloudStackException as exc:
                error = getattr(exc, "error", None) or {}
                text = error.get("errortext") if isinstance(error, dict) else None
                raise ApiError(
                    502, f"CloudStack at {self._endpoint}: {command} failed: {text or exc.args[0]}"
                ) from None
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise ApiError(
                    502, f"CloudStack at {self._endpoint}: {type(exc).__name__} {exc}".rstrip()
                ) from None
            rows = [r for r in result or [] if isinstance(r, dict)]
            self._cache[command] = (time.monotonic(), rows)
            return rows

    async def clusters(self) -> list[dict[str, Any]]:
        """KVM clusters."""
        rows = await self._list("listClusters")
        return [c for c in rows if str(c.get("hypervisortype", "KVM")).upper() == "KVM"]

    async def hosts(self) -> list[dict[str, Any]]:
        """KVM routing hosts."""
        return await self._list("listHosts", type="Routing", hypervisor="KVM")

    async def cluster(self, uuid: str) -> dict[str, Any]:
        """One cluster, or a 404."""
        for c in await self.clusters():
            if c.get("id") == uuid:
                return c
        raise ApiError(404, f"cluster {uuid}: no such KVM cluster in CloudStack")

    async def host(self, uuid: str) -> dict[str, Any]:
        """One host, or a 404."""
        for h in await self.hosts():
            if h.get("id") == uuid:
                return h
        raise ApiError(404, f"host {uuid}: no such KVM host in CloudStack")


# -- the IPMI test ----------------------------------------------------------------------------

IpmiTester = Callable[[FencerSettings, HostRef], Awaitable[m.IpmiTestResult]]


async def actuator_ipmi_test(settings: FencerSettings, host: HostRef) -> m.IpmiTestResult:
    """Run the host's test action through the actuator (the only code that talks to BMCs)."""
    from fencing.actuator import check_host

    started = time.monotonic()
    r = await check_host(settings, host.host_uuid, host.cluster_uuid)
    return m.IpmiTestResult(
        host_uuid=host.host_uuid,
        success=r.ok,
        driver=r.driver,
        power_state=r.power,
        output=r.detail,
        error=r.error,
        duration=round(time.monotonic() - started, 3),
    )


# -- application state ------------------------------------------------------------------------


@dataclass
class _Session:
    csrf: str
    expires: float
    who: str = ""


@dataclass
class Api:
    """Everything the handlers share."""

    settings: FencerSettings
    store: SettingsStore
    view: FencingView
    inventory: Inventory
    ipmi_test: IpmiTester = actuator_ipmi_test
    clock: Callable[[], float] = time.time
    sessions: dict[str, _Session] = field(default_factory=dict)
    topics_ready: Callable[[], bool] = lambda: True
    # writes an operator's retry / handled record (the actuate workers act on it)
    send_operator: Callable[[FencerSettings, OperatorAction], Awaitable[None]] | None = None
    pins: Any = None  # streams.bmc_pins.BmcPinStore (BMC identity), started by Service
    audit: AuditLog | None = None  # the audit topic (Service starts it)
    tokens: TokenBook = field(init=False)
    proxies: ProxyRules = field(init=False)
    limiter: LoginLimiter = field(init=False)

    def __post_init__(self) -> None:
        a = self.settings.api
        self.tokens = TokenBook.from_settings(a)  # hashes only, never the token
        self.proxies = ProxyRules(a.trusted_proxies)
        self.limiter = LoginLimiter(a.login_max_failures, a.login_window)

    async def record(
        self,
        request: web.Request,
        action: str,
        target: str,
        changes: list[AuditChange] | None = None,
    ) -> None:
        """Audit one change (who, client, field, old and new, secrets masked)."""
        if self.audit is None:
            return
        who = str(request.get(WHO_KEY) or "unauthenticated")
        try:
            await asyncio.wait_for(
                self.audit.write(who, self.proxies.client(request), action, target, changes), 30
            )
        except Exception as exc:
            # The change is made; that its audit line is missing must not pass silently.
            log.error("AUDIT NOT WRITTEN: %s %s by %s: %s", action, target, who, exc)
            raise ApiError(
                503, f"the change was made but its audit record could not be written: {exc}"
            ) from None

    def refuse_if_limited(self, request: web.Request) -> str:
        """The client's address; 429 while it has failed too often."""
        client = self.proxies.client(request)
        wait = self.limiter.retry_after(client)
        if wait is not None:
            raise ApiError(
                429,
                f"too many failed logins from {client}: try again in {int(wait) + 1} s "
                "(api.login_max_failures, api.login_window)",
            )
        return client

    async def failed_login(self, request: web.Request, client: str) -> None:
        """Count a failed login or wrong bearer token; report the start of a burst once."""
        if self.limiter.failed(client):
            log.error(
                "LOGIN BURST: %d failed logins from %s in %.0f s: refused until the window passes",
                self.limiter.max_failures,
                client,
                self.limiter.window,
            )
            await self.report_burst(request, client)

    async def report_burst(self, request: web.Request, client: str) -> None:
        """The burst notice: an audit entry, and a notice on the notices topic."""
        change = AuditChange(field="failed_logins", new=self.limiter.max_failures)
        with contextlib.suppress(ApiError):
            await self.record(request, "login_burst", f"client:{client}", [change])
        notice = Notice(
            notice_id=f"login-burst/{client}/{int(time.time())}",
            kind=NoticeKind.LOGIN_BURST,
            host=HostRef(host_uuid=f"client:{client}"),
            at=time.time(),
            reason=(
                f"{self.limiter.max_failures} failed API logins from {client} within "
                f"{self.limiter.window:.0f} s: refused until the window passes"
            ),
        )
        try:
            if self.audit is None:
                raise RuntimeError("the audit log is not started")
            await asyncio.wait_for(
                self.audit.publish(
                    self.settings.kafka.topics.notices,
                    notice.host.host_uuid.encode(),
                    notice.model_dump_json().encode(),
                ),
                30,
            )
        except Exception as exc:
            log.error("cannot send the login burst notice: %s", exc)


API_KEY: web.AppKey[Api] = web.AppKey("api", Api)
WHO_KEY = "fencer_who"  # request key: the name of the token (or the session's token)


def _api(request: web.Request) -> Api:
    return request.app[API_KEY]


def _json(model: BaseModel | list[Any] | dict[str, Any], status: int = 200) -> web.Response:
    if isinstance(model, BaseModel):
        text = model.model_dump_json()
    elif isinstance(model, list):
        text = "[" + ",".join(x.model_dump_json() for x in model) + "]"
    else:
        text = json.dumps(model)
    return web.Response(text=text, status=status, content_type="application/json")


def _error(status: int, message: str, fields: list[m.ErrorField] | None = None) -> web.Response:
    return _json(m.ErrorBody(error=message, fields=fields or []), status)


def _fields(exc: ValidationError, prefix: str = "") -> list[m.ErrorField]:
    # Only loc and msg: the input itself may be a password.
    out = []
    for e in exc.errors(include_input=False, include_url=False):
        loc = ".".join(str(p) for p in e["loc"] if p not in ("function-after", "function-before"))
        out.append(m.ErrorField(field=(prefix + loc) or "body", message=e["msg"]))
    return out


def _validation(exc: ValidationError, what: str) -> ApiError:
    fields = _fields(exc)
    first = fields[0] if fields else m.ErrorField(field="body", message="invalid")
    more = f" (and {len(fields) - 1} more)" if len(fields) > 1 else ""
    return ApiError(422, f"invalid {what}: {first.field}: {first.message}{more}", fields)


async def _body(request: web.Request, model: type[BaseModel], what: str) -> Any:
    try:
        raw = await request.read()
        data = json.loads(raw) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, f"invalid {what}: body: not valid JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation(exc, what) from None


# -- middlewares ------------------------------------------------------------------------------


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error is JSON with one line; no traceback leaves the process."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _error(exc.status, exc.message, exc.fields)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if not request.path.startswith("/api/"):
            raise
        message = {
            404: "no such API path",
            405: f"method {request.method} not allowed on {request.path}",
        }.get(exc.status, exc.reason)
        return _error(exc.status, message)
    except SettingsStoreError as exc:
        return _error(503, str(exc))
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return _error(500, "internal error (see the fencer api log)")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer token, or session cookie plus the CSRF header on writes."""
    path = request.path
    if not path.startswith("/api/") or path in PUBLIC_API:
        return await handler(request)
    api = _api(request)
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        client = api.refuse_if_limited(request)
        who = api.tokens.who(header[7:])
        if who is not None:
            request[WHO_KEY] = who
            return await handler(request)
        await api.failed_login(request, client)
        raise ApiError(401, "authentication failed: wrong token")
    sid = request.cookies.get(SESSION_COOKIE)
    session = api.sessions.get(hash_token(sid)) if sid else None
    if session is None or session.expires < time.time():
        if sid:
            api.sessions.pop(hash_token(sid), None)
        raise ApiError(401, "authentication required: a bearer token or a session (log in)")
    if request.method not in SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER, "")
        cookie = request.cookies.get(CSRF_COOKIE, "")
        if not (
            sent
            and hmac.compare_digest(sent.encode(), cookie.encode())
            and hmac.compare_digest(sent.encode(), session.csrf.encode())
        ):
            raise ApiError(403, f"CSRF check failed: send the {CSRF_HEADER} header")
    request[WHO_KEY] = session.who
    return await handler(request)


@web.middleware
async def headers_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """No caching of API answers; the UI may be framed only by its own origin."""
    response = await handler(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    if request.path.startswith("/api/"):
        response.headers.setdefault("Cache-Control", "no-store")
    else:
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'self'",
        )
    return response


# -- views ------------------------------------------------------------------------------------


def _ipmi_values(values: Any) -> Any:
    return m.IpmiValues(**values.model_dump(exclude={"password"}))


def _override_values(ipmi: IpmiOverrides) -> Any:
    return m.IpmiOverrideValues(**ipmi.model_dump(exclude={"password"}))


def _password_error(
    api: Api, source: str, host_uuid: str | None, cluster_uuid: str | None
) -> str | None:
    """Why the password in force cannot be decrypted, or None."""
    key = f"host:{host_uuid}" if source == "host" else f"cluster:{cluster_uuid}"
    return api.store.undecryptable.get(key) if source != "default" else None


def _cluster_settings_view(api: Api, uuid: str) -> m.ClusterSettingsView:
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
        overrides=_override_values(cs.ipmi),
        effective=_ipmi_values(eff.values),
        defaults=_ipmi_values(s.defaults),
        sources=eff.sources,
        password_set=bool(eff.values.password.get_secret_value()),
        password_source=eff.sources["password"],
        password_error=_password_error(api, eff.sources["password"], None, uuid),
        file_only=list(FILE_ONLY_IPMI_FIELDS),
        settable_drivers=[d.value for d in s.api.settable_drivers],
    )


def _host_settings_view(api: Api, uuid: str, cluster_uuid: str | None) -> m.HostSettingsView:
    s = api.store.settings
    hs = api.store.host(uuid)
    eff = s.effective_ipmi(uuid, cluster_uuid)
    inherited = s.effective_ipmi("", cluster_uuid)
    return m.HostSettingsView(
        name=hs.name,
        address=eff.address,
        overrides=_override_values(hs.ipmi),
        inherited=_ipmi_values(inherited.values),
        effective=_ipmi_values(eff.values),
        sources=eff.sources,
        password_set=bool(eff.values.password.get_secret_value()),
        password_source=eff.sources["password"],
        password_error=_password_error(api, eff.sources["password"], uuid, cluster_uuid),
        file_only=list(FILE_ONLY_IPMI_FIELDS),
        settable_drivers=[d.value for d in s.api.settable_drivers],
    )


def _budget(api: Api, cluster_uuid: str) -> Any:
    s = api.store.settings
    return api.view.budget(
        cluster_uuid,
        now=api.clock(),
        window=s.policy.fence_window,
        cap=s.fence_cap_for(cluster_uuid),
    )


def _cluster_summary(api: Api, c: dict[str, Any], hosts: list[dict[str, Any]]) -> dict[str, Any]:
    uuid = str(c["id"])
    return {
        "uuid": uuid,
        "name": str(c.get("name") or uuid),
        "zone_name": c.get("zonename"),
        "pod_name": c.get("podname"),
        "host_count": sum(1 for h in hosts if h.get("clusterid") == uuid),
        "paused": api.store.is_paused(uuid),
        "budget": _budget(api, uuid),
    }


def _host_ref(h: dict[str, Any]) -> HostRef:
    return HostRef(
        host_uuid=str(h["id"]),
        host_name=h.get("name"),
        cluster_uuid=h.get("clusterid"),
        cluster_name=h.get("clustername"),
        zone_uuid=h.get("zoneid"),
        zone_name=h.get("zonename"),
        ip_address=h.get("ipaddress"),
    )


def _host_summary(api: Api, h: dict[str, Any]) -> dict[str, Any]:
    ref = _host_ref(h)
    return {
        "uuid": ref.host_uuid,
        "name": ref.host_name or ref.host_uuid,
        "ip_address": ref.ip_address,
        "cluster_uuid": ref.cluster_uuid,
        "cluster_name": ref.cluster_name,
        "status": h.get("state"),
        "resource_state": h.get("resourcestate"),
        "fencing": _fencing_state(api, ref, h.get("state")),
    }


def _fencing_state(api: Api, ref: HostRef, cs_state: Any) -> Any:
    view = api.view.host(ref.host_uuid, ref)
    if view.state == "unknown" and cs_state == HostStatus.UP.value:
        # No topic has mentioned the host yet; CloudStack's listHosts says it is fine.
        view = view.model_copy(update={"state": "up", "status": HostStatus.UP})
    return view


def _path_id(request: web.Request, name: str) -> str:
    value = request.match_info[name]
    if not value or len(value) > 200:
        raise ApiError(422, f"invalid {name}: must be 1 to 200 characters")
    return value


# -- handlers ---------------------------------------------------------------------------------

routes = web.RouteTableDef()


@routes.get("/api/health")
async def health(request: web.Request) -> web.Response:
    """Liveness (no auth)."""
    api = _api(request)
    ready = api.topics_ready()
    return _json(
        m.Health(status="ok" if ready else "starting", settings_ready=True, topics_ready=ready)
    )


@routes.post("/api/login")
async def login(request: web.Request) -> web.Response:
    """Trade the API token for a session cookie and a CSRF token."""
    api = _api(request)
    client = api.refuse_if_limited(request)
    body: m.LoginInput = await _body(request, m.LoginInput, "login")
    who = api.tokens.who(body.token)
    if who is None:
        await api.failed_login(request, client)
        raise ApiError(401, "authentication failed: wrong token")
    api.limiter.succeeded(client)
    now = time.time()
    for sid in [k for k, v in api.sessions.items() if v.expires < now]:
        del api.sessions[sid]
    if len(api.sessions) >= MAX_SESSIONS:
        api.sessions.pop(next(iter(api.sessions)))
    sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    # Kept by hash, like the tokens: a memory dump does not hand out live sessions.
    api.sessions[hash_token(sid)] = _Session(csrf=csrf, expires=now + SESSION_TTL, who=who)
    secure = api.proxies.is_tls(request)
    response = _json(m.LoginResult(csrf_token=csrf))
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
    api = _api(request)
    sid = request.cookies.get(SESSION_COOKIE)
    if sid:
        api.sessions.pop(hash_token(sid), None)
    response = _json(m.LoginResult(csrf_token=""))
    response.del_cookie(SESSION_COOKIE, path="/")
    response.del_cookie(CSRF_COOKIE, path="/")
    return response


@routes.get("/api/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    """This API's OpenAPI 3.1 document."""
    return web.json_response(build_openapi())


@routes.get("/api/clusters")
async def list_clusters(request: web.Request) -> web.Response:
    """KVM clusters with pause state and fence budget."""
    api = _api(request)
    hosts = await api.inventory.hosts()
    clusters = await api.inventory.clusters()
    return _json([m.ClusterSummary(**_cluster_summary(api, c, hosts)) for c in clusters])


@routes.get("/api/clusters/{cluster_id}")
async def get_cluster(request: web.Request) -> web.Response:
    """A cluster with its settings."""
    api = _api(request)
    uuid = _path_id(request, "cluster_id")
    c = await api.inventory.cluster(uuid)
    hosts = await api.inventory.hosts()
    return _json(
        m.ClusterView(**_cluster_summary(api, c, hosts), settings=_cluster_settings_view(api, uuid))
    )


@routes.put("/api/clusters/{cluster_id}/settings")
async def put_cluster_settings(request: web.Request) -> web.Response:
    """Replace a cluster's settings (stored in the settings topic)."""
    api = _api(request)
    uuid = _path_id(request, "cluster_id")
    body: m.ClusterSettingsInput = await _body(request, m.ClusterSettingsInput, "cluster settings")
    await api.inventory.cluster(uuid)
    _refuse_file_only(api, body.ipmi, api.store.file_settings.clusters.get(uuid))
    ipmi = body.ipmi.model_dump(exclude={"clear_password"})
    if body.ipmi.clear_password:
        ipmi["password"] = ""
    try:
        settings = ClusterSettings(
            name=body.name, email_to=body.email_to, fence_cap=body.fence_cap, ipmi=ipmi
        )
    except ValidationError as exc:
        raise _validation(exc, "cluster settings") from None
    _refuse_what_ipmi_cannot_carry(api, settings, uuid, None)
    old = _dump(api.store.cluster(uuid))
    await _store_write(api.store.put_cluster(uuid, settings))
    await api.record(
        request,
        "put_cluster_settings",
        f"cluster:{uuid}",
        _changes(old, _dump(api.store.cluster(uuid)), body.ipmi),
    )
    return _json(_cluster_settings_view(api, uuid))


def _dump(entry: ClusterSettings | HostSettings) -> dict[str, Any]:
    return entry.model_dump(mode="json", exclude={"paused"})


def _changes(old: dict[str, Any], new: dict[str, Any], ipmi: Any = None) -> list[AuditChange]:
    """What a write changed; a new password shows as changed, never its value."""
    out = diff(old, new)
    if ipmi is not None and ipmi.password is not None:
        if not any(c.field == "ipmi.password" for c in out):
            out.append(AuditChange(field="ipmi.password", old="**********", new="(changed)"))
    return out


def _refuse_file_only(
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


def _refuse_what_ipmi_cannot_carry(
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


@routes.delete("/api/clusters/{cluster_id}/settings")
async def delete_cluster_settings(request: web.Request) -> web.Response:
    """Forget the settings made here (the file's apply again)."""
    api = _api(request)
    uuid = _path_id(request, "cluster_id")
    await api.inventory.cluster(uuid)
    old = _dump(api.store.cluster(uuid))
    await _store_write(api.store.delete_cluster(uuid))
    await api.record(
        request,
        "delete_cluster_settings",
        f"cluster:{uuid}",
        _changes(old, _dump(api.store.cluster(uuid))),
    )
    return _json(_cluster_settings_view(api, uuid))


@routes.get("/api/hosts")
async def list_hosts(request: web.Request) -> web.Response:
    """KVM hosts with their fencing state; `?cluster=` filters."""
    api = _api(request)
    try:
        q = m.HostQuery.model_validate(dict(request.query))
    except ValidationError as exc:
        raise _validation(exc, "query") from None
    hosts = [h for h in await api.inventory.hosts() if q.cluster in (None, h.get("clusterid"))]
    return _json([m.HostSummary(**_host_summary(api, h)) for h in hosts])


@routes.get("/api/hosts/{host_id}")
async def get_host(request: web.Request) -> web.Response:
    """A host with its fencing state, evidence, last probe and settings."""
    api = _api(request)
    uuid = _path_id(request, "host_id")
    h = await api.inventory.host(uuid)
    return _json(
        m.HostView(
            **_host_summary(api, h),
            settings=_host_settings_view(api, uuid, h.get("clusterid")),
        )
    )


@routes.put("/api/hosts/{host_id}/settings")
async def put_host_settings(request: web.Request) -> web.Response:
    """Replace a host's overrides (stored in the settings topic)."""
    api = _api(request)
    uuid = _path_id(request, "host_id")
    body: m.HostSettingsInput = await _body(request, m.HostSettingsInput, "host settings")
    h = await api.inventory.host(uuid)
    _refuse_file_only(api, body.ipmi, api.store.file_settings.hosts.get(uuid))
    ipmi = body.ipmi.model_dump(exclude={"clear_password"})
    if body.ipmi.clear_password:
        ipmi["password"] = ""
    try:
        settings = HostSettings(name=body.name, ipmi=ipmi)
    except ValidationError as exc:
        raise _validation(exc, "host settings") from None
    _refuse_what_ipmi_cannot_carry(api, settings, h.get("clusterid"), uuid)
    old = _dump(api.store.host(uuid))
    await _store_write(api.store.put_host(uuid, settings))
    await api.record(
        request,
        "put_host_settings",
        f"host:{uuid}",
        _changes(old, _dump(api.store.host(uuid)), body.ipmi),
    )
    return _json(_host_settings_view(api, uuid, h.get("clusterid")))


@routes.delete("/api/hosts/{host_id}/settings")
async def delete_host_settings(request: web.Request) -> web.Response:
    """Forget the overrides made here (the file's apply again)."""
    api = _api(request)
    uuid = _path_id(request, "host_id")
    h = await api.inventory.host(uuid)
    old = _dump(api.store.host(uuid))
    await _store_write(api.store.delete_host(uuid))
    await api.record(
        request, "delete_host_settings", f"host:{uuid}", _changes(old, _dump(api.store.host(uuid)))
    )
    return _json(_host_settings_view(api, uuid, h.get("clusterid")))


@routes.post("/api/hosts/{host_id}/ipmi-test")
async def ipmi_test(request: web.Request) -> web.Response:
    """Run the host's IPMI test action (reads the BMC, changes nothing)."""
    api = _api(request)
    uuid = _path_id(request, "host_id")
    h = await api.inventory.host(uuid)
    if not api.store.effective(uuid, h.get("clusterid")).address:
        raise ApiError(
            422,
            "invalid host settings: ipmi.address: no BMC address is set for this host",
            [m.ErrorField(field="ipmi.address", message="no BMC address is set for this host")],
        )
    return _json(await api.ipmi_test(api.store.settings, _host_ref(h)))


async def _fence_operator(request: web.Request, kind: str) -> web.Response:
    api = _api(request)
    uuid = _path_id(request, "host_id")
    body: m.FenceOperatorInput = await _body(request, m.FenceOperatorInput, f"fence {kind}")
    await api.inventory.host(uuid)
    action = OperatorAction(
        kind=kind,  # type: ignore[arg-type]
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
    return _json(
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


@routes.get("/api/fences")
async def list_fences(request: web.Request) -> web.Response:
    """Fence decisions and outcomes, newest first, filtered."""
    api = _api(request)
    try:
        q = m.FenceQuery.model_validate(dict(request.query))
    except ValidationError as exc:
        raise _validation(exc, "query") from None
    return _json(
        api.view.history(
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
    api = _api(request)
    decision_id = _path_id(request, "decision_id")
    rec = api.view.fence(decision_id)
    if rec is None:
        raise ApiError(404, f"fence {decision_id}: no such decision")
    return _json(rec)


def _pause_state(api: Api, cluster_uuid: str | None) -> m.PauseState:
    flag = api.store.pause_flag(cluster_uuid)
    if cluster_uuid is None:
        paused = api.store.is_paused(None)
    else:
        paused = api.store.cluster(cluster_uuid).paused
    return m.PauseState(
        paused=paused, reason=flag.reason if flag else None, at=flag.at if flag else None
    )


def _pause_overview(api: Api, cluster_uuids: list[str]) -> m.PauseOverview:
    return m.PauseOverview(
        global_pause=_pause_state(api, None),
        clusters={u: _pause_state(api, u) for u in cluster_uuids},
    )


async def _cluster_ids(api: Api) -> list[str]:
    return [str(c["id"]) for c in await api.inventory.clusters()]


@routes.get("/api/pause")
async def get_pause(request: web.Request) -> web.Response:
    """Global and per-cluster pause flags."""
    api = _api(request)
    return _json(_pause_overview(api, await _cluster_ids(api)))


async def _store_write(write: Awaitable[None]) -> None:
    try:
        await write
    except SettingsStoreError as exc:
        if str(exc).startswith("ipmi.password"):
            field, _, message = str(exc).partition(": ")
            raise ApiError(
                422, f"invalid settings: {exc}", [m.ErrorField(field=field, message=message)]
            ) from None
        raise ApiError(503, str(exc)) from None


async def _audit_pause(
    api: Api, request: web.Request, cluster: str | None, paused: bool, reason: str | None
) -> None:
    changes = [AuditChange(field="paused", old=not paused, new=paused)]
    if reason:
        changes.append(AuditChange(field="reason", new=reason))
    target = "pause:global" if cluster is None else f"pause:cluster:{cluster}"
    await api.record(request, "pause" if paused else "resume", target, changes)


@routes.post("/api/pause")
async def pause_all(request: web.Request) -> web.Response:
    """Pause fencing everywhere."""
    api = _api(request)
    body: m.PauseInput = await _body(request, m.PauseInput, "pause")
    await _store_write(api.store.pause(None, reason=body.reason, by="api"))
    await _audit_pause(api, request, None, True, body.reason)
    return _json(_pause_overview(api, await _cluster_ids(api)))


@routes.post("/api/resume")
async def resume_all(request: web.Request) -> web.Response:
    """Resume fencing everywhere (cluster pauses stay)."""
    api = _api(request)
    await _store_write(api.store.resume(None, by="api"))
    await _audit_pause(api, request, None, False, None)
    return _json(_pause_overview(api, await _cluster_ids(api)))


@routes.post("/api/clusters/{cluster_id}/pause")
async def pause_cluster(request: web.Request) -> web.Response:
    """Pause fencing in one cluster."""
    api = _api(request)
    uuid = _path_id(request, "cluster_id")
    body: m.PauseInput = await _body(request, m.PauseInput, "pause")
    await api.inventory.cluster(uuid)
    await _store_write(api.store.pause(uuid, reason=body.reason, by="api"))
    await _audit_pause(api, request, uuid, True, body.reason)
    return _json(_pause_state(api, uuid))


def _pin_view(api: Api, uuid: str) -> m.BmcPinView:
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


@routes.get("/api/hosts/{host_id}/bmc-pin")
async def get_bmc_pin(request: web.Request) -> web.Response:
    """The system GUID the host's BMC is pinned to, and any other GUID it reported since."""
    api = _api(request)
    uuid = _path_id(request, "host_id")
    await api.inventory.host(uuid)
    return _json(_pin_view(api, uuid))


@routes.post("/api/hosts/{host_id}/bmc-pin")
async def confirm_bmc_pin(request: web.Request) -> web.Response:
    """Confirm the BMC's identity: read its system GUID now and pin it for the host."""
    from fencing.drivers.base import DriverError
    from fencing.identity import PinStoreError
    from streams.bmc_pins import confirm_pin

    api = _api(request)
    uuid = _path_id(request, "host_id")
    body: m.BmcPinInput = await _body(request, m.BmcPinInput, "BMC pin")
    h = await api.inventory.host(uuid)
    if not api.store.effective(uuid, h.get("clusterid")).address:
        raise ApiError(
            422,
            "invalid host settings: ipmi.address: no BMC address is set for this host",
            [m.ErrorField(field="ipmi.address", message="no BMC address is set for this host")],
        )
    if api.pins is None:
        raise ApiError(503, "the BMC pins topic is not read")
    try:
        await confirm_pin(
            api.store.settings,
            uuid,
            h.get("clusterid"),
            by="operator (api)",
            expect=body.expect,
            store=api.pins,
        )
    except DriverError as exc:
        raise ApiError(502, f"cannot read the BMC's system GUID: {exc}") from None
    except ValueError as exc:
        raise ApiError(
            422, f"not pinned: {exc}", [m.ErrorField(field="expect", message=str(exc))]
        ) from None
    except PinStoreError as exc:
        raise ApiError(503, str(exc)) from None
    view = _pin_view(api, uuid)
    await api.record(
        request, "confirm_bmc_pin", f"host:{uuid}", [AuditChange(field="bmc_guid", new=view.guid)]
    )
    return _json(view)


@routes.post("/api/clusters/{cluster_id}/resume")
async def resume_cluster(request: web.Request) -> web.Response:
    """Resume fencing in one cluster."""
    api = _api(request)
    uuid = _path_id(request, "cluster_id")
    await api.inventory.cluster(uuid)
    await _store_write(api.store.resume(uuid, by="api"))
    await _audit_pause(api, request, uuid, False, None)
    return _json(_pause_state(api, uuid))


@routes.get("/api/audit")
async def get_audit(request: web.Request) -> web.Response:
    """Settings changes and login bursts, newest first (who, field, old and new, when)."""
    api = _api(request)
    try:
        q = m.AuditQuery.model_validate(dict(request.query))
    except ValidationError as exc:
        raise _validation(exc, "query") from None
    if api.audit is None:
        raise ApiError(503, "the audit topic is not read")
    return _json(api.audit.entries(limit=q.limit, target=q.target))


@routes.get("/api/budget")
async def get_budget(request: web.Request) -> web.Response:
    """Power-downs used in the current window, per cluster."""
    api = _api(request)
    return _json([_budget(api, u) for u in await _cluster_ids(api)])


# -- the UI -----------------------------------------------------------------------------------


async def ui_root(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/ui/")


async def ui_index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(str(resources.files("webui") / "static" / "index.html"))


def create_app(api: Api) -> web.Application:
    """The aiohttp application: API, OpenAPI document and UI."""
    app = web.Application(
        middlewares=[headers_middleware, errors_middleware, auth_middleware],
        client_max_size=64 * 1024,
    )
    app[API_KEY] = api
    app.add_routes(routes)
    app.add_routes(rbd_routes)
    app.router.add_get("/", ui_root)
    app.router.add_get("/ui/", ui_index)
    app.router.add_static("/ui/", str(resources.files("webui") / "static"))
    return app


# -- running ----------------------------------------------------------------------------------


def api_tls_context(settings: FencerSettings) -> ssl.SSLContext | None:
    """The server context of `api.tls_certfile` / `api.tls_keyfile`, or None (plain http)."""
    a = settings.api
    if a.tls_certfile is None or a.tls_keyfile is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(a.tls_certfile), str(a.tls_keyfile))
    except FileNotFoundError as exc:
        which = "api.tls_keyfile" if exc.filename == str(a.tls_keyfile) else "api.tls_certfile"
        raise OSError(f"{which}: {exc.filename}: no such file") from None
    except (OSError, ssl.SSLError) as exc:
        raise OSError(
            f"api.tls_certfile / api.tls_keyfile ({a.tls_certfile}, {a.tls_keyfile}): "
            f"cannot load: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    return context


class Service:
    """The API's moving parts: settings store, topic view, HTTP site."""

    def __init__(self, settings: FencerSettings, *, ipmi_test: IpmiTester = actuator_ipmi_test):
        self.settings = settings
        self.store = SettingsStore(settings, client_id="fencer-api-settings")
        self.view = FencingView(settings.kafka.topics)
        self.reader = TopicReader(
            settings, self.view.topics, self.view.on_record, client_id="fencer-api-view"
        )
        self.api = Api(
            settings=settings,
            store=self.store,
            view=self.view,
            inventory=Inventory(settings),
            ipmi_test=ipmi_test,
            topics_ready=self.reader.caught_up.is_set,
            pins=BmcPinStore(settings, client_id="fencer-api-bmc-pins"),
            audit=AuditLog(settings),
        )
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, port: int | None = None) -> str:
        """Read the topics, then listen; returns the base URL."""
        await self.store.start()
        try:
            await self.api.pins.start()
            assert self.api.audit is not None
            await self.api.audit.start()
            await self.reader.start()
            self._runner = web.AppRunner(create_app(self.api), access_log=None)
            await self._runner.setup()
            site = web.TCPSite(
                self._runner,
                self.settings.api.listen,
                self.settings.api.port if port is None else port,
                ssl_context=api_tls_context(self.settings),
            )
            await site.start()
        except BaseException:
            await self.stop()
            raise
        sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
        bound = sockets[0].getsockname()[1] if sockets else self.settings.api.port
        scheme = "https" if self.settings.api.tls_certfile else "http"
        self.url = f"{scheme}://{self.settings.api.listen}:{bound}"
        return self.url

    async def stop(self) -> None:
        """Stop listening and reading."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.reader.stop()
        if self.api.audit is not None:
            await self.api.audit.stop()
        await self.api.pins.stop()
        await self.store.stop()


async def _serve(settings: FencerSettings) -> None:
    service = Service(settings)
    url = await service.start()
    print(f"fencer api: listening on {url}/ui/", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await service.stop()


def cli_api(args: argparse.Namespace) -> int:
    """`fencer api -c FILE`: run the REST API and the web UI until SIGTERM."""
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        print(f"fencer: {exc}", file=sys.stderr)
        return 1
    if not TokenBook.from_settings(settings.api):
        print(
            "fencer: neither api.tokens nor api.token is set: the API refuses to run without "
            "authentication",
            file=sys.stderr,
        )
        return 1
    from streams.kafka import ssl_context

    try:
        ssl_context(settings.kafka)  # a missing CA / certificate / key file: name it, exit 1
    except SettingsError as exc:
        print(f"fencer: {exc}", file=sys.stderr)
        return 1
    logging.basicConfig(level=settings.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_serve(settings))
    except (SettingsStoreError, TopicReaderError, OSError) as exc:
        print(f"fencer: api: {exc}", file=sys.stderr)
        return 1
    return 0
