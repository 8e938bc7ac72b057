"""Before a worker starts: wait until Kafka and CloudStack answer, saying so in one line each.

Rule: compose and systemd start services in any order, so an unreachable dependency at start is
normal, not a crash. Each failed attempt logs one line naming the address and the setting that
holds it, then the worker waits (exponential backoff up to `max_delay`) and asks again; no
traceback, no exit. A dependency that answers once is not asked again here: Faust and the
services handle later outages themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiokafka import AIOKafkaClient

from fencing.settings import FencerSettings
from streams.kafka import aiokafka_kwargs, prepare_kafka

log = logging.getLogger("fencer.startup")

Check = Callable[[], Awaitable[None]]


async def kafka_reachable(settings: FencerSettings, within: float = 5.0) -> None:
    """Raise unless a Kafka broker of `kafka.bootstrap_servers` answers a metadata request."""
    prepare_kafka(settings)
    kwargs = aiokafka_kwargs(settings)
    client = AIOKafkaClient(**kwargs, request_timeout_ms=int(within * 1000))
    try:
        await asyncio.wait_for(client.bootstrap(), within)
    finally:
        await client.close()


async def cloudstack_reachable(settings: FencerSettings) -> None:
    """Raise unless CloudStack answers a signed `listZones` (what every role needs first)."""
    from fencing.cloudstack import CloudStack

    async with CloudStack(settings) as cloudstack:
        await cloudstack.list("listZones")


def _why(exc: BaseException) -> str:
    # aiohttp and aiokafka messages may carry URLs with signatures: keep type and a short text
    # only when it names no URL.
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if "://" in text or "apikey" in text.lower() or "signature" in text.lower():
        text = ""
    return f"{type(exc).__name__}{': ' + text[:160] if text else ''}"


async def wait_until_reachable(
    name: str,
    where: str,
    setting: str,
    check: Check,
    *,
    first_delay: float = 1.0,
    max_delay: float = 30.0,
    attempts: int | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> bool:
    """Call `check` until it succeeds (True), or `attempts` ran out (False)."""
    delay, tried = first_delay, 0
    while True:
        tried += 1
        try:
            await check()
        except Exception as exc:  # any failure is "not yet": say it in one line and wait
            log.warning(
                "cannot reach %s at %s (%s): %s; retrying in %.0f s",
                name,
                where,
                setting,
                _why(exc),
                delay,
            )
        else:
            if tried > 1:
                log.info("%s at %s answers now", name, where)
            return True
        if attempts is not None and tried >= attempts:
            return False
        await sleep(delay)
        delay = min(delay * 2, max_delay)


async def wait_for_dependencies(
    settings: FencerSettings, *, attempts: int | None = None, max_delay: float = 30.0
) -> bool:
    """Wait for Kafka, then CloudStack; True when both answered."""
    kafka = settings.kafka.bootstrap_servers
    endpoint = urlsplit(settings.cloudstack.endpoint)
    ok = await wait_until_reachable(
        "Kafka",
        kafka,
        "kafka.bootstrap_servers",
        lambda: kafka_reachable(settings),
        attempts=attempts,
        max_delay=max_delay,
    )
    if not ok:
        return False
    return await wait_until_reachable(
        "CloudStack",
        f"{endpoint.scheme}://{endpoint.netloc}{endpoint.path}",
        "cloudstack.endpoint",
        lambda: cloudstack_reachable(settings),
        attempts=attempts,
        max_delay=max_delay,
    )
