"""`fencer ipmi test`: read a host's BMC through its effective settings and print the result;
the power state never changes. Also the cluster lookup the `fencer ipmi` commands share."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING

from fencing.actuator import cloudstack_client
from fencing.cloudstack import CloudStackError, host_from_api
from fencing.redaction import Redactor, secrets_of
from fencing.settings import FencerSettings

if TYPE_CHECKING:
    from fencing.preflight import PreflightResult

log = logging.getLogger("fencer.actuator")


async def _cluster_of(settings: FencerSettings, host_uuid: str) -> str | None:
    async with cloudstack_client(settings) as cs:
        hosts = await cs.list("listHosts", id=host_uuid)
    return host_from_api(hosts[0]).cluster_uuid if hosts else None


async def cluster_for_cli(
    settings: FencerSettings, host_uuid: str, cluster: str | None
) -> str | None:
    """The cluster given, else the one CloudStack names for a host the file does not list."""
    if cluster is not None or host_uuid in settings.hosts:
        return cluster
    try:
        return await _cluster_of(settings, host_uuid)
    except CloudStackError as exc:
        log.warning(
            "cannot look up the host's cluster in CloudStack (%s); pass --cluster",
            Redactor(secrets_of(settings))(str(exc)),
        )
        return None


def cli_ipmi_test(args: argparse.Namespace) -> int:
    """`fencer ipmi test --host UUID [--cluster C] [-c FILE]`: read the BMC, change nothing.

    Logs go through the worker's logging and secret scrubber. The result is JSON on stdout; a
    failure is one log line on stderr (exit status 1), not repeated by the engine's per-attempt
    warnings."""
    from fencing.identity import MemoryPinStore
    from fencing.preflight import check_host
    from fencing.settings import load_settings
    from streams.observability import configure_logging, install_secret_scrubber

    settings = load_settings(getattr(args, "config", None))
    configure_logging(settings.log_level, json=settings.log_json)
    install_secret_scrubber(settings)
    # The engine logs each failed attempt for the worker's log; here the result says it.
    logging.getLogger("fencer.engine").setLevel(logging.ERROR)
    cluster = getattr(args, "cluster", None)

    async def run() -> PreflightResult:
        nonlocal cluster
        cluster = await cluster_for_cli(settings, args.host, cluster)
        # A throwaway pin store: the GUID is read and shown, nothing is pinned.
        return await check_host(settings, args.host, cluster, pins=MemoryPinStore())

    r = asyncio.run(run())
    eff = settings.effective_ipmi(args.host, cluster)
    out = {**asdict(r), "address": eff.address, "sources": eff.sources}
    out.pop("identity")
    print(json.dumps(out, indent=2))
    if not r.ok:
        log.error("IPMI test failed for host %s: %s", args.host, r.error)
    return 0 if r.ok else 1


def cli_ipmi_unpin(args: argparse.Namespace) -> int:
    """`fencer ipmi unpin HOST [--by NAME] [-c FILE]`: remove the host's BMC pin (the null
    record on bmc-pins), so its next pre-flight pins the GUID its BMC reports then: a board
    moved from a host removed from CloudStack, or a host re-installed behind a new board that
    `fencer ipmi pin` cannot confirm because the old pin holds its GUID. Prints the removed
    pin as JSON; a host with no pin, or pins that cannot be read or written, exit 1."""
    from fencing.identity import PinStoreError
    from fencing.settings import load_settings
    from streams.bmc_pins import remove_pin, require_signing
    from streams.observability import configure_logging, install_secret_scrubber

    settings = load_settings(getattr(args, "config", None))
    configure_logging(settings.log_level, json=settings.log_json)
    install_secret_scrubber(settings)
    by = f"operator {args.by or getpass.getuser()}"
    try:
        require_signing(settings)
        old = asyncio.run(remove_pin(settings, args.host, by=by))
    except (LookupError, PinStoreError) as exc:
        print(f"fencer: BMC pin of host {args.host} not removed: {exc}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "host_uuid": old.host_uuid,
                "removed_guid": old.guid,
                "address": old.address,
                "pinned_by": old.pinned_by,
                "removed_by": by,
            },
            indent=2,
        )
    )
    return 0
