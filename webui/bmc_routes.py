"""The REST API's BMC handlers: the IPMI test and the BMC identity pin, both run by an actuate
worker (webui.ipmi_tests).

Rule: neither the IPMI test nor the pin confirmation runs in the API process (it holds no BMC
password); the API asks on the operator-actions topic and answers with what the worker said,
or 202 "pending". No answer carries a secret.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from fencing.cloudstack import host_from_api
from fencing.records import IpmiTestAnswer
from webui import api_models as m
from webui import views as v
from webui.app import WHO_KEY, Api, ApiError, api_of, path_id, read_body, reply
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
    return reply(answer)  # the worker's record as it is (fencing.records.IpmiTestAnswer)


@routes.get("/api/hosts/{host_id}/bmc-pin")
async def get_bmc_pin(request: web.Request) -> web.Response:
    """The system GUID the host's BMC is pinned to, and any other GUID it reported since."""
    api = api_of(request)
    uuid = path_id(request, "host_id")
    await v.host_row(api, uuid)
    return reply(v.pin_view(api, uuid))


@routes.post("/api/hosts/{host_id}/bmc-pin")
async def confirm_bmc_pin(request: web.Request) -> web.Response:
    """Confirm the BMC's identity: an actuate worker reads its system GUID now and pins it for
    the host (the API never reads a BMC); the pin, or 202 "pending" when no worker answered
    within the API's wait (then GET /api/ipmi-tests/<request id>)."""
    api = api_of(request)
    uuid = path_id(request, "host_id")
    body: m.BmcPinInput = await read_body(request, m.BmcPinInput, "BMC pin")
    host = host_from_api(await v.host_with_bmc(api, uuid))
    if api.pins is None:
        raise ApiError(503, "the BMC pins topic is not read")
    who = str(request.get(WHO_KEY) or "api")
    # Always the GUID the operator saw (the other one the BMC reported, else the pinned one):
    # a confirmation read again after the BMC was swapped pins nothing (streams.actuating).
    shown = v.pin_view(api, uuid)
    expect = body.expect or shown.seen_guid or shown.guid
    try:
        request_id = await api.ipmi_tests.ask(
            api.settings, host, by=f"{who} (api)", kind="bmc_pin_confirm", expect=expect
        )
    except Exception as exc:
        raise ApiError(503, f"cannot write to Kafka: {type(exc).__name__}") from None
    answer = await api.ipmi_tests.wait(request_id, api.ipmi_test_wait)
    if answer is None:
        return _ipmi_answer(request_id, uuid, None, api.ipmi_test_wait)
    if answer.refused == "bmc":
        raise ApiError(502, answer.error or "cannot read the BMC's system GUID")
    if answer.refused == "expect":
        reason = answer.error or "not the expected GUID"
        raise ApiError(422, f"not pinned: {reason}", [m.ErrorField(field="expect", message=reason)])
    if answer.refused is not None or answer.pinned_guid is None:
        raise ApiError(503, answer.error or "the BMC pins topic is not written")
    await _pin_read(api, uuid, answer.pinned_guid, api.ipmi_test_wait)
    view = v.pin_view(api, uuid)
    await api.record(
        request, "confirm_bmc_pin", f"host:{uuid}", [AuditChange(field="bmc_guid", new=view.guid)]
    )
    return reply(view)


async def _pin_read(api: Api, uuid: str, guid: str, within: float) -> None:
    """Wait until this process has read the pin the worker wrote on bmc-pins (bounded)."""
    from fencing.identity import PinStoreError

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            pin = api.pins.get(uuid) if api.pins is not None else None
        except PinStoreError:
            return  # pin_view says so
        if pin is not None and pin.guid == guid and pin.seen_guid is None:
            return
        await asyncio.sleep(0.05)
