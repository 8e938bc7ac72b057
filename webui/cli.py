"""`fencer api -c FILE`: run the REST API and the web UI until SIGTERM.

Rule: a setting that keeps the API from running safely (no token, a missing Kafka CA,
certificate or key file) is one line on stderr naming it, and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from fencing.settings import FencerSettings, SettingsError, load_settings
from streams.settings_store import SettingsStoreError
from streams.topic_reader import TopicReaderError
from webui.auth import TokenBook
from webui.lifecycle import Service


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
