"""The REST API's BMC handlers: the IPMI test (run by an actuate worker, webui.ipmi_tests) and
the BMC identity pin.

Rule: the IPMI test never runs in the API process; the API asks on the operator-actions topic
and answers with what the worker said, or 202 "pending". No answer carries a secret.
"""

from __future__ import annotations

from aiohttp import web

from fencing.cloudstack import host_from_api
from fencing.records import IpmiTestAnswer
from webui import api_models as m
from webui import views as v
from webui.app import WHO_KEY, ApiError, api_of, path_id, read_body, reply
from webui.audit import AuditChange

routes = web.RouteTableDef()


@routes.post("/api/hosts/{host_id}/ipmi-test")
async def ipmi_test(request: web.Request) -> web.Response:
    """Have an actuate worker run the host's IPMI test action (reads the BMC, changes nothing);
    its answer, or 202 "pending" when none came within the API's wait."""
    api = api_of(request)
    h = await v.host_with_bmc(api, path_id(request, "host_id"))
    host = host_from_api(h)
    who = str(request.get(WHO_KEY) or "api")
    try:
        request_id = await api.ipmi_tests.ask(api.settings, host, by=f"{who} (api)")
    except Exception as exc:
        raise ApiError(503, f"cannot write to Kafka: {type(exc).__name__}") from None
    answer = await api.ipmi_tests.wait(request_id, api.ipmi_test_wait)
    return _ipmi_answer(request_id, host.host_uuid, answer, api.ipmi_test_wait)


@routes.get("/api/ipmi-tests/{request_id}")
async def get_ipmi_test(request: web.Request) -> web.Response:
    """The answer to an IPMI test this API process asked for, or 202 while it is pending."""
    api = api_of(request)
    request_id = path_id(request, "request_id")
    answer = api.ipmi_tests.answer(request_id)
    if answer is None:
        raise ApiError(404, f"IPMI test {request_id}: not asked through this API process")
    return _ipmi_answer(
        request_id, None, answer if isinstance(answer, IpmiTestAnswer) else None, None
    )


def _ipmi_answer(
    request_id: str, host: str | None, answer: IpmiTestAnswer | None, waited: float | None
) -> web.Response:
    if answer is None:
        after = f" within {waited:g} s" if waited is not None else " yet"
        return reply(
            m.IpmiTestPending(
                request_id=request_id,
                host_uuid=host,
                message=f"no actuate worker answered{after}: ask GET /api/ipmi-tests/{request_id}",
            ),
            202,
        )
    return reply(m.IpmiTestResult(**answer.model_dump(exclude={"schema_version", "at"})))


@routes.get("/api/hosts/{host_id}/bmc-pin")
async def get_bmc_pin(request: web.Request) -> web.Response:
    """The system GUID the host's BMC is pinned to, and any other GUID it reported since."""
    api = api_of(request)
    uuid = path_id(request, "host_id")
    await v.host_row(api, uuid)
    return reply(v.pin_view(api, uuid))


@routes.post("/api/hosts/{host_id}/bmc-pin")
async def confirm_bmc_pin(request: web.Request) -> web.Response:
    """Confirm the BMC's identity: read its system GUID now and pin it for the host."""
    from fencing.drivers.base import DriverError
    from fencing.identity import PinStoreError
    from streams.bmc_pins import confirm_pin

    api = api_of(request)
    uuid = path_id(request, "host_id")
    body: m.BmcPinInput = await read_body(request, m.BmcPinInput, "BMC pin")
    h = await v.host_with_bmc(api, uuid)
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
    view = v.pin_view(api, uuid)
    await api.record(
        request, "confirm_bmc_pin", f"host:{uuid}", [AuditChange(field="bmc_guid", new=view.guid)]
    )
    return reply(view)
