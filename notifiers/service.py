"""The notifier: a record in, one notification out on every channel.

Rules:
- It never raises for a delivery problem, and it runs in the notify role's own agent: fencing
  never waits for it.
- Each channel is tried on its own, concurrently, with bounded exponential backoff; a
  non-retryable failure (credentials refused) is not retried. Every failure is logged as one
  line naming the channel and the peer.
- At least once, never lost: a channel's delivery is written to the store the caller gives
  (the Faust `notified` table, streams.tables: the one idempotency store) as `<id>@<channel>`
  only after its peer accepted it (the SMTP server took the mail, the trap went out, the inform
  was acknowledged), and the record's id (`render.record_id`) only once every channel has. A
  crash between delivery and marking delivers again, with the same id (mail header
  `X-Fencer-Notice-Id`, varbind `fencerNoticeId`), so receivers can drop the duplicate; a
  redelivered record is sent only on the channels that have not accepted it yet.
- `deliver()` returns only when every channel accepted (or, with `forever`, keeps retrying a
  peer that is down or refuses the credentials, with capped backoff), so the Kafka offset is
  committed after delivery, never before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, MutableMapping, Sequence

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


def channels_from_settings(
    settings: FencerSettings,
    recipients_for: Callable[[str | None], list[str]] | None = None,
) -> list[Channel]:
    """The enabled channels: email (per-cluster recipients) and one per SNMP receiver.

    `recipients_for`: a cluster's mail recipients at send time (the live settings, which the
    API changes); the given settings' lists otherwise."""
    channels: list[Channel] = []
    if settings.email.enabled:
        channels.append(EmailChannel(settings.email, recipients_for or settings.email_to_for))
    if settings.snmp.enabled:
        channels.extend(snmp_channels(settings.snmp))
    return channels


class Notifier:
    """Turns fence decisions, outcomes and notices into notifications on every channel."""

    def __init__(
        self,
        channels: Sequence[Channel],
        *,
        retries: int = 4,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        send_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.channels = list(channels)
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.send_timeout = send_timeout
        self._clock = clock
        self._locks: dict[str, asyncio.Lock] = {}  # one sender per channel (_until_accepted)

    @classmethod
    def from_settings(
        cls,
        settings: FencerSettings,
        *,
        retries: int = 4,
        backoff: float = 1.0,
        recipients_for: Callable[[str | None], list[str]] | None = None,
    ) -> Notifier:
        """A notifier with every channel the settings enable."""
        channels = channels_from_settings(settings, recipients_for)
        return cls(channels, retries=retries, backoff=backoff)

    def channel_keys(self) -> list[str]:
        """The channels' names (`channel_key`), in order."""
        return [channel_key(ch) for ch in self.channels]

    async def deliver(
        self,
        record: Record,
        store: MutableMapping[str, float],
        *,
        forever: bool = False,
        channel: str | None = None,
    ) -> bool:
        """Send the record on every channel that has not accepted it yet; True once all have.

        With `forever`, a channel whose peer is down is retried (backoff up to `max_backoff`)
        until it accepts; so is one that refuses the credentials (an error logged each time):
        the caller commits its offset when this returns, so returning would lose the record.

        `channel` (a `channel_key`): that channel only, True once it accepted (the notify role
        runs one agent per channel: a mail server down for an hour held every agent's records
        and no trap went out either; review4)."""
        try:
            key = record_id(record)
            message = to_message(record)
        except Exception:
            log.exception("cannot render a notification for %s", type(record).__name__)
            return False
        return await self._deliver(key, message, store, forever, channel)

    async def _deliver(
        self,
        key: str,
        message: Message,
        store: MutableMapping[str, float],
        forever: bool = False,
        only: str | None = None,
    ) -> bool:
        if key in store:
            return True
        todo = [
            ch
            for ch in self.channels
            if f"{key}@{channel_key(ch)}" not in store and only in (None, channel_key(ch))
        ]
        results = await asyncio.gather(
            *(self._until_accepted(ch, key, message, store, forever) for ch in todo)
        )
        if any(r != SENT for r in results):
            return False  # not marked: a redelivery (or a restart) sends it again
        if any(f"{key}@{channel_key(ch)}" not in store for ch in self.channels):
            return True  # this channel's part is done; another channel's agent has the rest
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

    async def _until_accepted(
        self,
        ch: Channel,
        key: str,
        message: Message,
        store: MutableMapping[str, float],
        forever: bool,
    ) -> str:
        """One channel's delivery: SENT and marked once its peer accepted; with `forever`
        retried until then, refused credentials too (review4: returning unmarked let the
        worker commit the offset, and the notification was never sent, not even after the
        fix; each try logs the refusal as an error).

        One sender per channel at a time, for the whole of its retries (review4): the worker
        delivers several records at once, each retrying a peer that is down on its own
        backoff, and when the peer came back the record that came last could reach it first.
        Behind the lock they reach it in the order they came, and a peer that is down is not
        hammered by every record at once."""
        name = channel_key(ch)
        async with self._locks.setdefault(name, asyncio.Lock()):
            delay = self.backoff
            while True:
                result = await self._send(ch, message)
                if result == SENT:
                    # Marked as soon as this peer accepted: a crash now re-sends elsewhere only.
                    store[f"{key}@{name}"] = self._clock()
                    return SENT
                if not forever:
                    return result
                log.warning(
                    "notification %s: still not accepted by %s; trying again in %g s",
                    key,
                    ch.name,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(self.max_backoff, delay * 2)

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
