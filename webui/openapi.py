"""The OpenAPI 3.1 document of the REST API, generated from the pydantic models it serves.

Rule: every schema comes from `webui.api_models` (and the wire records they embed), so the
document cannot drift from the bodies; only the list of operations below is written by hand,
and it names every status code each operation can answer.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from fencing.records import IpmiTestAnswer
from webui import api_models as m
from webui.audit import AuditEntry
from webui.fencing_view import BudgetView, FenceRecord
from webui.rbd_routes import BlocklistLiftInput

REF = "#/components/schemas/{model}"

_ERRORS = {
    400: "the body is not JSON",
    401: "no or wrong token / session",
    403: "CSRF header missing or wrong (cookie sessions), or a field only the configuration "
    "file may set (`fields` names it)",
    404: "no such cluster, host, fence or IPMI test",
    422: "invalid input; `fields` names each invalid field",
    429: "too many failed logins from this client (api.login_max_failures): wait",
    502: "CloudStack (or the host's BMC) could not be asked",
    503: "Kafka (the settings, BMC pins or operator-actions topic) could not be read or written",
}


class _Op:
    def __init__(
        self,
        method: Literal["get", "put", "post", "delete"],
        path: str,
        op_id: str,
        summary: str,
        response: type[BaseModel],
        *,
        many: bool = False,
        body: type[BaseModel] | None = None,
        errors: tuple[int, ...] = (401, 403),
        query: type[BaseModel] | None = None,
        public: bool = False,
        accepted: type[BaseModel] | None = None,
    ) -> None:
        self.method, self.path, self.op_id, self.summary = method, path, op_id, summary
        self.response, self.many, self.body, self.errors = response, many, body, errors
        self.query, self.public, self.accepted = query, public, accepted


_CLUSTER_ERRORS = (401, 403, 404, 422, 502)
_WRITE_ERRORS = (400, 401, 403, 404, 422, 502, 503)

OPERATIONS = [
    _Op("get", "/api/health", "health", "Liveness and readiness (no auth)", m.Health, public=True,
        errors=()),
    _Op("post", "/api/login", "login", "Log in with the API token (sets cookies)", m.LoginResult,
        body=m.LoginInput, public=True, errors=(400, 401, 422)),
    _Op("post", "/api/logout", "logout", "End the cookie session", m.LoginResult),
    _Op("get", "/api/clusters", "listClusters", "KVM clusters with pause and budget",
        m.ClusterSummary, many=True, errors=(401, 502)),
    _Op("get", "/api/clusters/{cluster_id}", "getCluster", "A cluster and its settings",
        m.ClusterView, errors=_CLUSTER_ERRORS),
    _Op("put", "/api/clusters/{cluster_id}/settings", "putClusterSettings",
        "Replace a cluster's fencing settings (the IPMI tab)", m.ClusterSettingsView,
        body=m.ClusterSettingsInput, errors=_WRITE_ERRORS),
    _Op("delete", "/api/clusters/{cluster_id}/settings", "deleteClusterSettings",
        "Forget the cluster settings made through the API", m.ClusterSettingsView,
        errors=(401, 403, 404, 422, 502, 503)),
    _Op("post", "/api/clusters/{cluster_id}/pause", "pauseCluster", "Pause fencing in a cluster",
        m.PauseState, body=m.PauseInput, errors=_WRITE_ERRORS),
    _Op("post", "/api/clusters/{cluster_id}/resume", "resumeCluster",
        "Resume fencing in a cluster", m.PauseState, errors=(401, 403, 404, 422, 502, 503)),
    _Op("get", "/api/hosts", "listHosts", "KVM hosts with their fencing state", m.HostSummary,
        many=True, errors=(401, 422, 502), query=m.HostQuery),
    _Op("get", "/api/hosts/{host_id}", "getHost",
        "A host: fencing state, evidence, last probe, settings with their sources", m.HostView,
        errors=_CLUSTER_ERRORS),
    _Op("put", "/api/hosts/{host_id}/settings", "putHostSettings",
        "Replace a host's overrides (null = inherit)", m.HostSettingsView,
        body=m.HostSettingsInput, errors=_WRITE_ERRORS),
    _Op("delete", "/api/hosts/{host_id}/settings", "deleteHostSettings",
        "Forget the host overrides made through the API", m.HostSettingsView,
        errors=(401, 403, 404, 422, 502, 503)),
    _Op("post", "/api/hosts/{host_id}/ipmi-test", "ipmiTest",
        "Have an actuate worker run the host's IPMI test action (no power change); 202 when "
        "no worker answered within the API's wait", IpmiTestAnswer,
        accepted=m.IpmiTestPending, errors=(401, 403, 404, 422, 502, 503)),
    _Op("get", "/api/ipmi-tests/{request_id}", "getIpmiTest",
        "The answer to an IPMI test or BMC pin confirmation asked through this API process "
        "(202 while pending)",
        IpmiTestAnswer, accepted=m.IpmiTestPending, errors=(401, 404, 422)),
    _Op("post", "/api/hosts/{host_id}/fence/retry", "fenceRetry",
        "Run the host's failed fence again now (same decision)", m.FenceOperatorResult,
        body=m.FenceOperatorInput, errors=_WRITE_ERRORS),
    _Op("post", "/api/hosts/{host_id}/fence/handled", "fenceHandled",
        "Mark the host's failed fence handled (stops the fence_failed reminders)",
        m.FenceOperatorResult, body=m.FenceOperatorInput, errors=_WRITE_ERRORS),
    _Op("post", "/api/hosts/{host_id}/blocklist/lift", "liftBlocklist",
        "Lift the repaired host's Ceph blocklist (the actuate workers do it)",
        m.FenceOperatorResult, body=BlocklistLiftInput, errors=_WRITE_ERRORS),
    _Op("get", "/api/hosts/{host_id}/bmc-pin", "getBmcPin",
        "The system GUID the host's BMC is pinned to", m.BmcPinView,
        errors=(401, 404, 422, 502, 503)),
    _Op("post", "/api/hosts/{host_id}/bmc-pin", "confirmBmcPin",
        "Confirm the BMC's identity: an actuate worker pins the GUID it reports now; 202 when "
        "no worker answered within the API's wait", m.BmcPinView,
        body=m.BmcPinInput, accepted=m.IpmiTestPending, errors=_WRITE_ERRORS),
    _Op("get", "/api/fences", "listFences", "Fence history, newest first", FenceRecord,
        many=True, errors=(401, 422), query=m.FenceQuery),
    _Op("get", "/api/fences/{decision_id}", "getFence", "One fence with its evidence timeline",
        FenceRecord, errors=(401, 404, 422)),
    _Op("get", "/api/pause", "getPause", "Global and per-cluster pause flags", m.PauseOverview,
        errors=(401, 502)),
    _Op("post", "/api/pause", "pauseAll", "Pause fencing everywhere", m.PauseOverview,
        body=m.PauseInput, errors=(400, 401, 403, 422, 502, 503)),
    _Op("post", "/api/resume", "resumeAll", "Resume fencing everywhere", m.PauseOverview,
        errors=(401, 403, 502, 503)),
    _Op("get", "/api/budget", "getBudget", "Fence budget used per cluster in the window",
        BudgetView, many=True, errors=(401, 502)),
    _Op("get", "/api/audit", "getAudit",
        "Settings changes and login bursts, newest first (secrets masked)", AuditEntry,
        many=True, errors=(401, 422, 503), query=m.AuditQuery),
]  # fmt: skip


def _path_params(path: str) -> list[dict[str, Any]]:
    names = [seg[1:-1] for seg in path.split("/") if seg.startswith("{")]
    return [
        {
            "name": n,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "minLength": 1, "maxLength": 200},
        }
        for n in names
    ]


def _query_params(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(ref_template=REF)
    out = []
    for name, prop in schema["properties"].items():
        prop = dict(prop)
        prop.pop("title", None)
        desc = prop.pop("description", None)
        param: dict[str, Any] = {"name": name, "in": "query", "required": False, "schema": prop}
        if desc:
            param["description"] = desc
        out.append(param)
    return out


@functools.cache
def build_openapi() -> dict[str, Any]:
    """The whole document (cached: it only depends on the code)."""
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(m.ErrorBody, "serialization")]
    for op in OPERATIONS:
        wanted.append((op.response, "serialization"))
        if op.body is not None:
            wanted.append((op.body, "validation"))
        if op.accepted is not None:
            wanted.append((op.accepted, "serialization"))
    refs, defs = models_json_schema(list(dict.fromkeys(wanted)), ref_template=REF)
    error_ref = refs[(m.ErrorBody, "serialization")]
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        ref = refs[(op.response, "serialization")]
        schema = {"type": "array", "items": ref} if op.many else ref
        responses: dict[str, Any] = {
            "200": {"description": "OK", "content": {"application/json": {"schema": schema}}}
        }
        if op.accepted is not None:
            accepted = refs[(op.accepted, "serialization")]
            responses["202"] = {
                "description": "Accepted, not answered yet",
                "content": {"application/json": {"schema": accepted}},
            }
        # Any authenticated call (and a login) may meet the failed-login limit.
        statuses = (*op.errors, 429) if (not op.public or op.body is not None) else op.errors
        for status in statuses:
            responses[str(status)] = {
                "description": _ERRORS[status],
                "content": {"application/json": {"schema": error_ref}},
            }
        operation: dict[str, Any] = {
            "operationId": op.op_id,
            "summary": op.summary,
            "responses": responses,
        }
        params = _path_params(op.path) + (_query_params(op.query) if op.query else [])
        if params:
            operation["parameters"] = params
        if op.body is not None:
            operation["requestBody"] = {
                "required": op.method == "put" or op.public,
                "content": {"application/json": {"schema": refs[(op.body, "validation")]}},
            }
        if op.public:
            operation["security"] = []
        paths.setdefault(op.path, {})[op.method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fencer API",
            "version": "1",
            "description": (
                "Fencing settings (the IPMI tab), host states and fence history of fencer. "
                "Authenticate with `Authorization: Bearer <api.token>`, or log in and send the "
                "X-CSRF-Token header on writes. Passwords are write-only."
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"session": []}],
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "session": {"type": "apiKey", "in": "cookie", "name": "fencer_session"},
            },
        },
    }
