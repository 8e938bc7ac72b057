"""The audit log: every settings change made through the API (who, what, old and new value with
secrets masked, when) and every login burst, on the compacted `fencer.audit` topic.

Each record has its own key (time and a random id), so compaction keeps them all; the API reads
the topic from the beginning and shows the newest first (GET /api/audit, the UI's Audit page).

    log = AuditLog(settings); await log.start()
    await log.write(who, client, action, target, changes)
    log.entries(limit=100)
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import deque
from typing import Any

from aiokafka import AIOKafkaProducer, ConsumerRecord
from pydantic import BaseModel, Field, ValidationError

from fencing.redaction import MASK
from fencing.settings import FencerSettings
from streams.kafka import aiokafka_kwargs
from streams.topic_reader import TopicReader

log = logging.getLogger("fencer.audit")

SECRET_NAMES = ("password", "secret", "token", "key", "community", "passphrase")


class AuditChange(BaseModel):
    """One field: its value before and after (a secret shows only whether it is set)."""

    field: str
    old: Any = None
    new: Any = None


class AuditEntry(BaseModel):
    """One audited action."""

    at: float
    who: str = Field(description="the API token's name (api.tokens) or 'unauthenticated'")
    client: str = Field(description="the client's address (through trusted proxies)")
    action: str = Field(description="e.g. put_cluster_settings, pause, login_burst")
    target: str = Field(description="cluster:<uuid>, host:<uuid>, pause:global, client ...")
    changes: list[AuditChange] = Field(default_factory=list)
    audit_id: str = ""


def is_secret(name: str) -> bool:
    """Whether a field name holds a secret (its value is never audited)."""
    last = name.rsplit(".", 1)[-1].lower()
    return any(s in last for s in SECRET_NAMES)


def _flat(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = value


def diff(old: dict[str, Any], new: dict[str, Any]) -> list[AuditChange]:
    """Field by field, the values that differ; a secret shows as set (MASK) or null."""
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flat(old, "", a)
    _flat(new, "", b)
    out = []
    for name in sorted(set(a) | set(b)):
        va, vb = a.get(name), b.get(name)
        if is_secret(name):
            va = MASK if va else None
            vb = MASK if vb else None
        if va != vb:
            out.append(AuditChange(field=name, old=va, new=vb))
    return out


class AuditLog:
    """Writes audit entries and keeps the newest `limit` read from the topic."""

    def __init__(self, settings: FencerSettings, *, limit: int = 2000) -> None:
        self._settings = settings
        self._topic = settings.kafka.topics.audit
        self._entries: deque[AuditEntry] = deque(maxlen=limit)
        self._seen: set[str] = set()
        self._reader = TopicReader(
            settings, [self._topic], self._on_record, client_id="fencer-api-audit"
        )
        self._producer: AIOKafkaProducer | None = None

    async def start(self, within: float = 30.0) -> None:
        """Read the topic, then be ready to write."""
        producer = AIOKafkaProducer(
            client_id="fencer-api-audit", acks="all", **aiokafka_kwargs(self._settings)
        )
        await producer.start()
        self._producer = producer
        try:
            await self._reader.start(within)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop reading and writing."""
        await self._reader.stop()
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    def _on_record(self, record: ConsumerRecord[bytes, bytes]) -> None:
        if record.value is None:
            return
        try:
            entry = AuditEntry.model_validate_json(record.value)
        except ValidationError:
            log.warning("ignored a malformed audit record at offset %d", record.offset)
            return
        self._add(entry)

    def _add(self, entry: AuditEntry) -> None:
        if entry.audit_id in self._seen:
            return
        if len(self._seen) > 4 * (self._entries.maxlen or 1):
            self._seen = {e.audit_id for e in self._entries}
        self._seen.add(entry.audit_id)
        self._entries.append(entry)

    async def write(
        self,
        who: str,
        client: str,
        action: str,
        target: str,
        changes: list[AuditChange] | None = None,
    ) -> AuditEntry:
        """Write one entry (and show it at once). Raises if Kafka does not take it."""
        at = time.time()
        entry = AuditEntry(
            at=at,
            who=who,
            client=client,
            action=action,
            target=target,
            changes=changes or [],
            audit_id=f"{at:.6f}-{secrets.token_hex(6)}",
        )
        # One line in the log too (no values: they are in the topic, secrets masked).
        log.info(
            "audit: %s from %s: %s %s (%s)",
            who,
            client,
            action,
            target,
            ", ".join(c.field for c in entry.changes) or "-",
        )
        if self._producer is None:
            raise RuntimeError("the audit log is not started")
        await self._producer.send_and_wait(
            self._topic,
            key=entry.audit_id.encode(),
            value=json.dumps(entry.model_dump(mode="json")).encode(),
        )
        self._add(entry)
        return entry

    async def publish(self, topic: str, key: bytes, value: bytes) -> None:
        """Send one record to another topic with the audit producer (the burst notice)."""
        if self._producer is None:
            raise RuntimeError("the audit log is not started")
        await self._producer.send_and_wait(topic, key=key, value=value)

    def entries(self, limit: int = 100, target: str | None = None) -> list[AuditEntry]:
        """Newest first, optionally only one target."""
        out = [e for e in reversed(self._entries) if target in (None, e.target)]
        return sorted(out, key=lambda e: e.at, reverse=True)[:limit]
