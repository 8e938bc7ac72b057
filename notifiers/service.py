"""The notifier: a record in, one notification out on every channel, and never a delay for
fencing.

Rules:
- `handle()` only renders and schedules: it returns at once and never raises for a delivery
  problem. Sending runs in background tasks; `drain()` waits for them (shutdown, tests).
- Each channel is tried on its own, concurrently, with bounded exponential backoff; a
  non-retryable failure (credentials refused) is not retried. Every failure is logged as one
  line naming the channel and the peer.
- At least once, never lost: a channel's delivery is written to the store (`<id>@<channel>`)
  only after its peer accepted it (the SMTP server took the mail, the trap went out, the inform
  was acknowledged), and the record's id (`render.record_id`) only once every channel has. A
  crash between delivery and marking delivers again, with the same id (mail header
  `X-Fencer-Notice-Id`, varbind `fencerNoticeId`), so receivers can drop the duplicate; a
  redelivered record is sent only on the channels that have not accepted it yet.
- `deliver()` is the awaited form for the Faust shell: it returns only when every channel
  accepted (or, with `forever`, keeps retrying a peer that is down with capped backoff), so the
  Kafka offset is committed after delivery, never before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

from fencing.records import FenceDecision, FenceOutcome, Notice
from fencing.settings import FencerSettings
from notifiers.channel import AuthenticationFailed, Channel, DeliveryFailed, NotifyError
from notifiers.email import EmailChannel
from notifiers.render import Message, record_id, to_message
from notifiers.snmp import snmp_channels

__all__ = [
    "AuthenticationFailed",
    "Channel",
    "DeliveryFailed",
    "Notifier",
    "NotifyError",
    "channels_from_settings",
]

log = logging.getLogger("fencer.notifiers")

Record = FenceDecision | FenceOutcome | Notice
SENT, FAILED, REFUSED = "sent", "failed", "refused"  # a channel's result: refused = not retryable


def channel_key(channel: Channel) -> str:
    """A channel's name in the store: two email channels differ by their server."""
    peer = getattr(channel, "peer", None)
    return f"{channel.name} {peer}" if peer and peer not in channel.name else channel.name


def channels_from_settings(settings: FencerSettings) -> list[Channel]:
    """The enabled channels: email (per-cluster recipients) and one per SNMP receiver."""
    channels: list[Channel] = []
    if settings.email.enabled:
        channels.append(EmailChannel(settings.email, settings.email_to_for))
    if settings.snmp.enabled:
        channels.extend(snmp_channels(settings.snmp))
    return channels


class Notifier:
    """Turns fence decisions, outcomes and notices into notifications on every channel."""

    def __init__(
        self,
        channels: Sequence[Channel],
        store: MutableMapping[str, float] | None = None,
        *,
        retries: int = 4,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        send_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.channels = list(channels)
        self.store: MutableMapping[str, float] = {} if store is None else store
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.send_timeout = send_timeout
        self._clock = clock
        self._in_flight: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    @classmethod
    def from_settings(
        cls,
        settings: FencerSettings,
        store: MutableMapping[str, float] | None = None,
        *,
        retries: int = 4,
        backoff: float = 1.0,
    ) -> Notifier:
        """A notifier with every channel the settings enable."""
        return cls(channels_from_settings(settings), store, retries=retries, backoff=backoff)

    async def handle(self, record: Record) -> None:
        """Schedule the record's notification; return at once (see the module docstring)."""
        try:
            key = record_id(record)
            if key in self.store or key in self._in_flight:
                log.debug("notification %s already sent; skipped", key)
                return
            message = to_message(record)
        except Exception:
            # A record we cannot render must not reach the caller (fencing) as an exception.
            log.exception("cannot render a notification for %s", type(record).__name__)
            return
        self._in_flight.add(key)
        task = asyncio.get_running_loop().create_task(self._deliver(key, message, self.store))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def deliver(
        self,
        record: Record,
        store: MutableMapping[str, float] | None = None,
        *,
        forever: bool = False,
    ) -> bool:
        """Send the record on every channel that has not accepted it yet; True once all have.

        With `forever`, a channel whose peer is down is retried (backoff up to `max_backoff`)
        until it accepts; only a refusal that retrying cannot fix (credentials) ends it."""
        try:
            key = record_id(record)
            message = to_message(record)
        except Exception:
            log.exception("cannot render a notification for %s", type(record).__name__)
            return False
        return await self._deliver(key, message, self.store if store is None else store, forever)

    async def _deliver(
        self,
        key: str,
        message: Message,
        store: MutableMapping[str, float],
        forever: bool = False,
    ) -> bool:
        try:
            if key in store:
                return True
            todo = [ch for ch in self.channels if f"{key}@{channel_key(ch)}" not in store]
            delay = self.backoff
            while True:
                results = await asyncio.gather(*(self._send(ch, message) for ch in todo))
                for ch, result in zip(todo, results, strict=True):
                    if result == SENT:
                        # Marked as soon as this peer accepted: a crash now re-sends elsewhere only.
                        store[f"{key}@{channel_key(ch)}"] = self._clock()
                failed = [ch for ch, r in zip(todo, results, strict=True) if r == FAILED]
                refused = [ch for ch, r in zip(todo, results, strict=True) if r == REFUSED]
                if refused or not failed or not forever:
                    break
                log.warning(
                    "notification %s: still not accepted by %s; trying again in %g s",
                    key,
                    ", ".join(ch.name for ch in failed),
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(self.max_backoff, delay * 2)
                todo = failed
            if failed or refused:
                return False  # not marked: a redelivery (or a restart) sends it again
            for ch in self.channels:
                store.pop(f"{key}@{channel_key(ch)}", None)
            store[key] = self._clock()
            fields = {"record": key, "kind": message.kind.value, "host": message.host_uuid}
            log.info(
                "notified %s on %d channel(s)",
                key,
                len(self.channels),
                extra={"fields": fields},
            )
            return True
        finally:
            self._in_flight.discard(key)

    @property
    def pending(self) -> int:
        """Notifications still being sent or retried."""
        return len(self._tasks)

    async def drain(self, grace: float | None = None) -> None:
        """Wait for every scheduled notification; after `grace` s, cancel what is left."""
        tasks = set(self._tasks)
        if not tasks:
            return
        _done, left = await asyncio.wait(tasks, timeout=grace)
        for t in left:
            t.cancel()
        if left:
            await asyncio.wait(left)
            log.warning("%d notification(s) cancelled at drain", len(left))

    async def _send(self, channel: Channel, message: Message) -> str:
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            retryable = True
            try:
                await asyncio.wait_for(channel.send(message), self.send_timeout)
                return SENT
            except NotifyError as exc:
                problem, retryable = str(exc), exc.retryable
            except TimeoutError:
                problem = f"{channel.name}: no answer within {self.send_timeout:g} s"
            except Exception as exc:
                # A bug in a channel: log it like a failure, never let it escape.
                problem = f"{channel.name}: unexpected {type(exc).__name__}: {exc}"
            fields = {"record": message.record_id, "channel": channel.name, "attempt": attempt}
            if not retryable or attempt == attempts:
                log.error(
                    "notification %s on %s given up after %d attempt(s): %s",
                    message.record_id,
                    channel.name,
                    attempt,
                    problem,
                    extra={"fields": fields},
                )
                return FAILED if retryable else REFUSED
            delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
            log.warning(
                "notification %s on %s failed (attempt %d of %d), retrying in %g s: %s",
                message.record_id,
                channel.name,
                attempt,
                attempts,
                delay,
                problem,
                extra={"fields": fields},
            )
            await asyncio.sleep(delay)
        return FAILED
