"""The small shape every notification channel has, and the one exception tree they raise.

A channel turns a rendered `Message` into one delivery (an email, a set of SNMP notifications)
and raises `NotifyError` when it cannot; the `Notifier` owns retries, backoff, logging and
idempotency, so a channel stays a few lines of library calls.

    NotifyError                 one line naming the channel and the peer, never a secret
    ├── DeliveryFailed          the peer is down, slow or refused: worth retrying
    └── AuthenticationFailed    the credentials were refused: retrying will not help
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from notifiers.render import Message


class NotifyError(Exception):
    """A channel could not deliver; the message is one operator-readable line."""

    retryable: bool = True


class DeliveryFailed(NotifyError):
    """The peer is unreachable, timed out or refused the message."""


class AuthenticationFailed(NotifyError):
    """The peer refused our credentials."""

    retryable = False


@runtime_checkable
class Channel(Protocol):
    """Something that can deliver a notification: email, SNMP, or a new one."""

    name: str

    async def send(self, message: Message) -> None:
        """Deliver `message` once, or raise `NotifyError`."""
        ...
