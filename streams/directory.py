"""The host directory log: what the listHosts poller last saw of each host, shared by every
ingest worker through one compacted Kafka topic, `<app id>-host-directory`.

Rule: the leader's poller writes a host's entry (its state, cluster, address, name, zone) after
the signals of a poll were delivered, and only when the entry changed; every ingest worker tails
the topic into its `HostDirectory`. So a new leader resumes from what the last leader saw
(an unchanged Up host costs nothing, a host that went down or came back while no leader polled
differs from its entry and is reported), and an ingest worker that does not poll still knows
each host's cluster and address without asking CloudStack. A `recheck` entry (state null, the
rest unchanged) asks the next poll to report the host whatever its state: ingest writes one for
every host an alert called down, the watch one for every host it holds open, so an episode
whose host came back between two polls still ends.

The directory never says whether a host is down now: ingest still asks CloudStack (streams.ingest).
While the topic cannot be read the poller keeps its own memory as before (its first poll
reports every host: safe, only slower).

Entry value (JSON): {"v": 1, "s": "<state>/<resourcestate>" or null, "c": cluster uuid,
"i": ip address, "n": host name, "z": zone uuid}; absent fields are unknown.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from typing import Any

from fencing.settings import FencerSettings
from streams.poller import HostDirectory

log = logging.getLogger("fencer.streams")

ENTRY_VERSION = 1
TOPIC_SUFFIX = "-host-directory"


def topic_name(app_id: str) -> str:
    """The directory topic of a Faust app (prefixed by its id: the worker ACLs cover it)."""
    return f"{app_id}{TOPIC_SUFFIX}"


def encode_entry(entry: dict[str, Any]) -> bytes:
    """An entry as the topic stores it."""
    return json.dumps({"v": ENTRY_VERSION, **entry}, separators=(",", ":")).encode()


def decode_entry(value: bytes | None) -> dict[str, Any] | None:
    """An entry from the topic; None for a tombstone; ValueError names what is wrong."""
    if value is None:
        return None
    try:
        raw = json.loads(value)
    except ValueError as exc:
        raise ValueError(f"host directory entry: not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError("host directory entry: not a JSON object")
    if raw.get("v") != ENTRY_VERSION:
        raise ValueError(f"host directory entry: unknown version {raw.get('v')!r}")
    for k in ("s", "c", "i", "n", "z"):
        if raw.get(k) is not None and not isinstance(raw[k], str):
            raise ValueError(f"host directory entry: field {k!r} is not a string")
    return {k: raw[k] for k in ("s", "c", "i", "n", "z") if k in raw}


def apply_entry(directory: HostDirectory, host_uuid: str, entry: dict[str, Any] | None) -> None:
    """One topic record into the directory (the poller's memory and the placement)."""
    if entry is None:
        directory.entries.pop(host_uuid, None)
        directory.seen.pop(host_uuid, None)
        return
    directory.entries[host_uuid] = entry
    directory.seen[host_uuid] = entry.get("s")
    if entry.get("c") is not None or entry.get("i") is not None:
        directory.placed[host_uuid] = (entry.get("c") or "", entry.get("i") or "")
    if entry.get("n"):
        directory.names[entry["n"]] = host_uuid


class DirectoryLog:
    """Tails the directory topic into `directory` and writes entries to it.

    `start()` creates the topic if needed (one partition, compacted) and returns once the
    topic was read to its end; from then on `directory.memory_ready` is True while the tail
    runs. Writes go through one producer."""

    def __init__(self, settings: FencerSettings, topic: str, directory: HostDirectory) -> None:
        self.settings, self.topic, self.directory = settings, topic, directory
        self._reader: Any = None
        self._producer: Any = None
        self._lock = asyncio.Lock()
        self.failures = 0

    @property
    def ready(self) -> bool:
        """Whether the directory holds the whole topic and is kept up to date."""
        r = self._reader
        return r is not None and r._task is not None and not r._task.done()

    async def start(self, within: float = 30.0) -> bool:
        """Read the topic to its end (once); False, logged, when it cannot be read now."""
        async with self._lock:
            if self.ready:
                return True
            await self._close()
            try:
                await self._start(within)
            except Exception as exc:
                self.failures += 1
                log.warning(
                    "host directory %s unreadable (the poller reports every host until it is "
                    "read): %s",
                    self.topic,
                    exc,
                )
                await self._close()
                self.directory.memory_ready = False
                return False
            self.directory.memory_ready = True
            log.info("host directory %s read: %d hosts", self.topic, len(self.directory.entries))
            return True

    async def _start(self, within: float) -> None:
        from aiokafka import AIOKafkaProducer

        from streams.kafka import aiokafka_kwargs
        from streams.topic_reader import TopicReader

        await asyncio.wait_for(self._ensure_topic(), within)
        producer = AIOKafkaProducer(**aiokafka_kwargs(self.settings), linger_ms=5)
        await asyncio.wait_for(producer.start(), within)
        self._producer = producer

        def on_record(record: Any) -> None:
            if record.key is None:
                return
            apply_entry(self.directory, record.key.decode(), decode_entry(record.value))

        reader = TopicReader(
            self.settings, [self.topic], on_record, client_id="fencer-host-directory"
        )
        await reader.start(within=within)
        self._reader = reader

    async def _ensure_topic(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        from streams.kafka import TOPIC_ALREADY_EXISTS, aiokafka_kwargs

        admin = AIOKafkaAdminClient(**aiokafka_kwargs(self.settings))
        await admin.start()
        try:
            if self.topic in set(await admin.list_topics()):
                return
            k = self.settings.kafka
            response = await admin.create_topics(
                [
                    NewTopic(
                        self.topic,
                        1,
                        k.replication_factor,
                        topic_configs={"cleanup.policy": "compact"},
                    )
                ]
            )
            for name, code, *_ in response.topic_errors:
                if code not in (0, TOPIC_ALREADY_EXISTS):
                    raise RuntimeError(f"kafka: cannot create topic {name}: error code {code}")
        finally:
            await admin.close()

    async def write(self, entries: Iterable[tuple[str, dict[str, Any]]]) -> int:
        """Write entries (host uuid, entry) and wait until the broker has them all; they are
        applied to the directory at once (the tail applies them again, in log order)."""
        producer = self._producer
        if producer is None or not self.ready:
            raise RuntimeError(f"host directory {self.topic} is not open")
        pending = []
        n = 0
        for host_uuid, entry in entries:
            apply_entry(self.directory, host_uuid, entry)
            pending.append(
                await producer.send(self.topic, encode_entry(entry), key=host_uuid.encode())
            )
            n += 1
        if pending:
            await asyncio.gather(*pending)
        return n

    async def recheck(
        self, hosts: str | Iterable[str], ref: dict[str, Any] | None = None, within: float = 5.0
    ) -> bool:
        """Ask the next poll to report these hosts whatever their state; False when the topic
        is not open or the broker did not take them `within` seconds (the caller's stream or
        timer never waits longer; the watch asks again at its next sweep)."""
        if self._producer is None or not self.ready:
            return False
        entries = []
        for host_uuid in [hosts] if isinstance(hosts, str) else sorted(hosts):
            entry = dict(self.directory.entries.get(host_uuid) or {})
            for field, value in (ref or {}).items():
                if value and entry.get(field) is None:
                    entry[field] = value
            entry["s"] = None
            entries.append((host_uuid, entry))
        try:
            await asyncio.wait_for(self.write(entries), within)
        except Exception as exc:
            log.warning("host directory: %d rechecks not written: %s", len(entries), exc)
            return False
        return True

    async def _close(self) -> None:
        reader, producer = self._reader, self._producer
        self._reader = self._producer = None
        if reader is not None:
            await reader.stop()
        if producer is not None:
            await producer.stop()

    async def stop(self) -> None:
        """Stop tailing and writing."""
        async with self._lock:
            await self._close()
            self.directory.memory_ready = False
        log.info("host directory %s closed", self.topic)
