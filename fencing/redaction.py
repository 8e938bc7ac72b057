"""The one redactor: every secret value that could reach a log line, an error text, the argv a
person reads or an audit record is replaced by `MASK`, the mask pydantic prints for a SecretStr.

Secrets are matched as they may be written (plain, URL-encoded, escaped by repr or JSON),
longest first, so a secret that contains another is replaced whole. Nothing here does I/O.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, quote_plus

from pydantic import BaseModel, SecretStr

if TYPE_CHECKING:
    from fencing.settings import FencerSettings, IpmiSettings

MASK = "**********"


def variants(secret: str) -> Iterator[str]:
    """The secret as it may be written: plain, URL-encoded, and as repr/JSON escape it."""
    yield secret
    yield quote(secret, safe="")
    yield quote_plus(secret, safe="")
    yield repr(secret)[1:-1]
    yield json.dumps(secret)[1:-1]


class Redactor:
    """Replaces every given secret (in each of its written forms) with MASK."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        self.needles: tuple[str, ...] = ()
        self.set_secrets(secrets)

    def set_secrets(self, secrets: Iterable[str | None]) -> None:
        """Replace the set of secrets to redact."""
        needles = {v for s in secrets if s for v in variants(s) if v}
        # Longest first, so a secret that contains another is replaced whole.
        self.needles = tuple(sorted(needles, key=len, reverse=True))

    @property
    def active(self) -> bool:
        """Whether there is anything to redact."""
        return bool(self.needles)

    def __call__(self, text: str) -> str:
        for needle in self.needles:
            if needle in text:
                text = text.replace(needle, MASK)
        return text


def secrets_of(settings: FencerSettings, ipmi: IpmiSettings | None = None) -> list[str]:
    """Every secret value an error text of a fence could carry."""
    values = [
        settings.cloudstack.api_key.get_secret_value(),
        settings.cloudstack.secret_key.get_secret_value(),
    ]
    if ipmi is not None:
        values.append(ipmi.password.get_secret_value())
    return [v for v in values if v]


def collect_secrets(settings: BaseModel) -> set[str]:
    """Every non-empty `SecretStr` value anywhere in the settings (nested models, maps, lists)."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, SecretStr):
            secret = value.get_secret_value()
            if secret:
                found.add(secret)
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name))
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list | tuple | set | frozenset):
            for v in value:
                walk(v)

    walk(settings)
    return found
