"""The web UI's Ceph RBD operator action: lift a repaired host's blocklist.

Rule: the UI never touches Ceph and holds no Ceph key. The button writes the same
`lift_blocklist` record to the operator-actions topic as `fencer rbd lift HOST`; the actuate
worker, which holds the fence key, lifts the blocklist (streams.actuating.lift_blocklist), logs
the result and notifies it (BLOCKLIST-LIFTED or BLOCKLIST-NOT-LIFTED, email and SNMP trap).
The request is an ordinary API write: the API token or the session cookie with the CSRF header
(webui.app's middlewares), audited on the audit topic like the other operator actions.
Registered by webui.app.create_app.
"""

from __future__ import annotations

import asyncio
import ipaddress

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fencing.records import OperatorAction
from streams.actuating import lift_identity
from webui import api_models as m
from webui.audit import AuditChange

routes = web.RouteTableDef()


class BlocklistLiftInput(BaseModel):
    """Which address to lift (default: the host's storage_ip setting, else CloudStack's)."""

    model_config = ConfigDict(extra="forbid")
    address: str | None = Field(None, max_length=64)
    note: str | None = Field(None, max_length=500)
    entry: str | None = Field(
        None,
        max_length=80,
        description="the entry the page shows (default: the one recorded for `address`, else "
        "the latest recorded): the worker lifts only that entry",
    )
    decision_id: str | None = Field(
        None, max_length=200, description="the fence that added `entry` (as the page shows)"
    )

    @field_validator("address")
    @classmethod
    def _an_ip(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        try:
            return str(ipaddress.ip_address(v))
        except ValueError:
            raise ValueError("not an IP address") from None


@routes.post("/api/hosts/{host_id}/blocklist/lift")
async def lift_blocklist(request: web.Request) -> web.Response:
    """Ask the actuate workers to lift the host's Ceph blocklist (it was repaired)."""
    from webui import views as v
    from webui.app import WHO_KEY, ApiError, api_of, path_id, read_body, reply

    api = api_of(request)
    uuid = path_id(request, "host_id")
    body: BlocklistLiftInput = await read_body(request, BlocklistLiftInput, "blocklist lift")
    await v.host_row(api, uuid)  # 404 for a host CloudStack does not know
    who = str(request.get(WHO_KEY) or "unauthenticated")
    # The request names the entry the page shows: a worker reading it again later never lifts a
    # newer blocklist of the host (streams.actuating.lift_once).
    recorded = {e.entry: e.decision_id for e in api.view.blocklist(uuid)}
    entry, decision_id = lift_identity(recorded, body.address, body.entry, body.decision_id)
    action = OperatorAction(
        kind="lift_blocklist",
        host_uuid=uuid,
        address=body.address,
        by=f"api:{who}",
        note=body.note,
        at=api.clock(),
        blocklist_entry=entry,
        decision_id=decision_id,
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
        "blocklist_lift",
        f"host:{uuid}",
        [AuditChange(field="blocklist", new=body.address or "(the host's storage address)")],
    )
    return reply(
        m.FenceOperatorResult(kind=action.kind, host_uuid=uuid, by=action.by, at=action.at)
    )
