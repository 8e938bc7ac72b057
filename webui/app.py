"""The REST API's application: the state its handlers share, its middlewares, its aiohttp app.

Rules: everything under /api/ but health and login needs the API token, as a bearer header or
as the session cookie obtained by logging in with it; a write made with the cookie also needs
the double-submit CSRF header. Every error is one JSON line naming the field or the peer, never
a traceback, a URL or a password. The handlers are in `webui.routes`, the pages they answer
with in `webui.views`, the running service in `webui.lifecycle`, the command in `webui.cli`.

Security (webui.auth, webui.audit): tokens and sessions are kept only as SHA-256 hashes; failed
logins are limited per client; every change is audited on the audit topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from fencing.cloudstack import CloudStack, CloudStackError
from fencing.events import NoticeKind
from fencing.records import HostRef, Notice, OperatorAction
from fencing.settings import FencerSettings
from streams.settings_store import SettingsStore, SettingsStoreError
from webui import api_models as m
from webui.audit import AuditChange, AuditLog
from webui.auth import LoginLimiter, ProxyRules, TokenBook, hash_token
from webui.fencing_view import FencingView
from webui.ipmi_tests import IpmiTests

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

    def __init__(self, status: int, message: str, fields: list[m.ErrorField] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.fields = status, message, fields or []


# -- application state ------------------------------------------------------------------------


@dataclass
class Session:
    csrf: str
    expires: float
    who: str = ""


@dataclass
class Api:
    """Everything the handlers share."""

    settings: FencerSettings
    store: SettingsStore
    view: FencingView
    cloudstack: CloudStack  # fencing.cloudstack with a short cache: the UI asks often
    ipmi_tests: IpmiTests  # the "test BMC" round trip through an actuate worker
    ipmi_test_wait: float = 20.0  # seconds the API waits for the worker's answer
    clock: Callable[[], float] = time.time
    sessions: dict[str, Session] = field(default_factory=dict)
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


def api_of(request: web.Request) -> Api:
    return request.app[API_KEY]


def reply(model: BaseModel | list[Any] | dict[str, Any], status: int = 200) -> web.Response:
    if isinstance(model, BaseModel):
        text = model.model_dump_json()
    elif isinstance(model, list):
        text = "[" + ",".join(x.model_dump_json() for x in model) + "]"
    else:
        text = json.dumps(model)
    return web.Response(text=text, status=status, content_type="application/json")


def error_reply(
    status: int, message: str, fields: list[m.ErrorField] | None = None
) -> web.Response:
    return reply(m.ErrorBody(error=message, fields=fields or []), status)


def error_fields(exc: ValidationError, prefix: str = "") -> list[m.ErrorField]:
    # Only loc and msg: the input itself may be a password.
    out = []
    for e in exc.errors(include_input=False, include_url=False):
        loc = ".".join(str(p) for p in e["loc"] if p not in ("function-after", "function-before"))
        out.append(m.ErrorField(field=(prefix + loc) or "body", message=e["msg"]))
    return out


def invalid(exc: ValidationError, what: str) -> ApiError:
    fields = error_fields(exc)
    first = fields[0] if fields else m.ErrorField(field="body", message="invalid")
    more = f" (and {len(fields) - 1} more)" if len(fields) > 1 else ""
    return ApiError(422, f"invalid {what}: {first.field}: {first.message}{more}", fields)


async def read_body(request: web.Request, model: type[BaseModel], what: str) -> Any:
    try:
        raw = await request.read()
        data = json.loads(raw) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, f"invalid {what}: body: not valid JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid(exc, what) from None


def path_id(request: web.Request, name: str) -> str:
    """A path parameter, 1 to 200 characters, or a 422 naming it."""
    value = request.match_info[name]
    if not value or len(value) > 200:
        raise ApiError(422, f"invalid {name}: must be 1 to 200 characters")
    return value


def read_query(request: web.Request, model: type[BaseModel]) -> Any:
    """The query string as `model`, or a 422 naming the parameter."""
    try:
        return model.model_validate(dict(request.query))
    except ValidationError as exc:
        raise invalid(exc, "query") from None


# -- middlewares ------------------------------------------------------------------------------


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error is JSON with one line; no traceback leaves the process."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_reply(exc.status, exc.message, exc.fields)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if not request.path.startswith("/api/"):
            raise
        message = {
            404: "no such API path",
            405: f"method {request.method} not allowed on {request.path}",
        }.get(exc.status, exc.reason)
        return error_reply(exc.status, message)
    except SettingsStoreError as exc:
        return error_reply(503, str(exc))
    except CloudStackError as exc:
        # The client's text names the command and the endpoint's host, never the signed URL.
        return error_reply(502, str(exc))
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return error_reply(500, "internal error (see the fencer api log)")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer token, or session cookie plus the CSRF header on writes."""
    path = request.path
    if not path.startswith("/api/") or path in PUBLIC_API:
        return await handler(request)
    api = api_of(request)
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


# -- the application --------------------------------------------------------------------------


async def ui_root(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/ui/")


async def ui_index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(str(resources.files("webui") / "static" / "index.html"))


def create_app(api: Api) -> web.Application:
    """The aiohttp application: API, OpenAPI document and UI."""
    from webui import bmc_routes, rbd_routes, routes

    app = web.Application(
        middlewares=[headers_middleware, errors_middleware, auth_middleware],
        client_max_size=64 * 1024,
    )
    app[API_KEY] = api
    app.add_routes(routes.routes)
    app.add_routes(bmc_routes.routes)
    app.add_routes(rbd_routes.routes)  # lift a Ceph blocklist (issue 18)
    app.router.add_get("/", ui_root)
    app.router.add_get("/ui/", ui_index)
    app.router.add_static("/ui/", str(resources.files("webui") / "static"))
    return app
