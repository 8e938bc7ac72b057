"""`fencer worker`: load the settings, wait for Kafka and CloudStack, run the topology
(streams.app) for the chosen roles until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import logging

import faust

from streams import observability as obs
from streams.app import create_app, parse_roles, require_signing_key

log = logging.getLogger("fencer.app")


def cli_worker(args: argparse.Namespace) -> int:
    """`fencer worker`: run the service until interrupted."""
    from fencing.settings import load_settings

    settings = load_settings(args.config)
    roles = parse_roles(args.roles)
    require_signing_key(settings, roles)  # before waiting for Kafka: a missing key is final
    from streams.kafka import ssl_context

    ssl_context(settings.kafka)  # a missing CA / certificate / key: one line naming it, exit 1
    obs.setup_observability(settings)
    # Services start in any order (compose, systemd): wait, one line per try, no traceback.
    from streams.startup import wait_for_dependencies

    asyncio.run(wait_for_dependencies(settings))
    app = create_app(settings, roles)
    log.info(
        "fencer worker starting: roles %s, broker %s",
        ",".join(roles),
        settings.kafka.bootstrap_servers,
    )
    worker = faust.Worker(
        app,
        loglevel=settings.log_level.lower(),
        quiet=True,
        logging_config=obs.logging_config(settings.log_level, settings.log_json),
    )
    worker.execute_from_commandline()
    return 0
