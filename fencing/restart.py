"""Telling CloudStack to restart a fenced host's VMs (declareHostAsDegraded or
prepareHostForMaintenance, followed to the end of its job), and which VMs the host ran.

Only the actuator calls these, and only after a verified power-off (fencing.actuator)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass

from fencing.cloudstack import CloudStack, CloudStackError
from fencing.records import HostRef
from fencing.redaction import Redactor
from fencing.settings import RestartVia

log = logging.getLogger("fencer.actuator")

_ALREADY_DONE = re.compile(r"already marked as Degraded|is already in Maintenance", re.IGNORECASE)
# declareHostAsDegraded is refused for a host CloudStack itself found Down (allowed in Alert or
# Disconnected only): CloudStack's own HA restarts that host's HA-enabled VMs ("Host down ...
# Starting HA on the VMs"). The host is fenced (verified off); the VMs are followed
# (vms_not_restarted tells of those that do not run again), not the fence reported failed.
_DOWN_ALREADY = re.compile(r"as 'Degraded' when host is in Down status", re.IGNORECASE)


@dataclass
class CloudStackResult:
    """What CloudStack said about restarting the VMs."""

    call: str
    job: str | None
    success: bool
    result: str


async def vms_on(client: CloudStack, host: HostRef, redact: Redactor) -> dict[str, str]:
    """The VMs CloudStack places on the host now (id -> name); {} if it cannot say."""
    try:
        async with client as cs:
            vms = await cs.list("listVirtualMachines", hostid=host.host_uuid, listall=True)
    except CloudStackError as exc:
        log.warning("cannot list the VMs of host %s: %s", host.host_uuid, redact(str(exc)))
        return {}
    return {vm["id"]: vm.get("name") or vm["id"] for vm in vms}


async def restart_vms(
    client: CloudStack,
    host: HostRef,
    via: RestartVia,
    redact: Redactor,
    job_timeout: float,
    poll_interval: float,
) -> CloudStackResult:
    """Call declareHostAsDegraded / prepareHostForMaintenance and follow the job to its end."""
    call = via.value
    job: str | None = None
    try:
        async with client as cs:
            started = await cs.call(call, id=host.host_uuid)
            job = started.get("jobid")
            if not job:
                return CloudStackResult(call, None, True, "done (no job)")
            deadline = time.monotonic() + job_timeout
            while True:
                j = await cs.call("queryAsyncJobResult", jobid=job)
                status = int(j.get("jobstatus", 0))
                if status == 1:
                    return CloudStackResult(call, job, True, "succeeded")
                if status == 2:
                    r = j.get("jobresult") or {}
                    text = r.get("errortext") or json.dumps(r)[:300]
                    if _ALREADY_DONE.search(text):
                        # An earlier decision for this host already got the VMs restarted.
                        return CloudStackResult(call, job, True, redact(f"already done: {text}"))
                    if _DOWN_ALREADY.search(text):
                        return CloudStackResult(
                            call,
                            job,
                            True,
                            redact(
                                "not needed: CloudStack marked the host Down, its own HA "
                                f"restarts the HA-enabled VMs (it answered: {text})"
                            ),
                        )
                    return CloudStackResult(
                        call, job, False, redact(f"job failed ({r.get('errorcode')}): {text}")
                    )
                if time.monotonic() > deadline:
                    return CloudStackResult(
                        call, job, False, "job still pending at cloudstack.job_timeout"
                    )
                await asyncio.sleep(poll_interval)
    except CloudStackError as exc:
        return CloudStackResult(call, job, False, redact(str(exc)))
