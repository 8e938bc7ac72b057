"""CloudStack's event bus -> host signals.

Rule: one parsed event bus record (streams.parser) becomes at most one host signal, completed
with the host's cluster and address from the `HostDirectory` (the host directory log every
ingest worker reads, streams.directory), else from the inventory; a record fencer cannot use
becomes a dead-letter reason. Nothing here decides: whether a host is down is asked of
CloudStack at that moment, never read from the directory.

More than 99.9 % of the bus is VM, volume and usage noise, so two shortcuts keep the stream
cheap, and neither may lose a record that matters:
- `may_matter(value)` looks at the bytes before any JSON is decoded: a record is skipped only
  when it is a flat Gson object of strings (`{"k":"v",...}`, no nesting, no `\\u` escape) that
  names a `resource` (VM / volume state changes, usage events) and holds none of the words
  every host signal's record must hold (`ALERT.COMPUTE.HOST`, `MAINT.`). Anything else is
  parsed exactly as before, so junk still reaches the dead-letter topic. A skipped record could
  at most have been dead-lettered for an odd VM state change (a status that is neither pre nor
  post): it is counted (`skipped`), never turned into a signal.
- `EventBusConsumer` reads the bus with a plain batched aiokafka consumer (its own consumer
  group, `<app id>.event-bus`), writes a batch's signals and dead letters, waits until the
  broker has them all, and only then commits the batch's offsets: a worker killed mid-batch
  leaves the batch uncommitted and the next owner reads it again (at least once, in partition
  order: a host's signals keep their order).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fencing.events import HostStatus
from fencing.records import HostRef, HostSignal
from streams import parser
from streams.poller import DOWN_STATES, HostDirectory
from streams.worker_clock import CLOCK_ID, worker_clock

log = logging.getLogger("fencer.streams")


@dataclass
class Ingest:
    """Maps event bus records to host signals; host lookups through `inventory()`."""

    inventory: Callable[[], Any]
    directory: HostDirectory
    # streams.directory.DirectoryLog: the leader's poller learns of rechecks through it
    log: Any = None
    clock_id: str = CLOCK_ID  # which clock stamps the signals' `at` (the core compares only it)
    clock: Callable[[], float] = worker_clock  # that clock (never stepped)

    async def signal(self, message: Any) -> tuple[HostSignal | None, str | None]:
        """A CloudStack event bus record as a host signal, or a dead-letter reason, or neither."""
        parsed = parser.parse_record(message.key, message.value)
        if isinstance(parsed, parser.Rejected):
            return None, parsed.reason
        # The signal's time is this worker's clock on arrival: CloudStack's own event time (the
        # management server's clock) is shown, never compared with the poller's times (rule 1).
        # The never-stepped clock named `clock_id` (a wall clock stepped back would make the next
        # disconnection look earlier than the host's return on that same clock: ignored as late).
        at = self.clock()
        reported_at = getattr(parsed, "at", None)
        kind: str | None = None
        status: HostStatus | None = None
        if isinstance(parsed, parser.HostDisconnectedAlert):
            kind, status = "disconnected", HostStatus.DISCONNECTED
        elif isinstance(parsed, parser.HostDownAlert):
            kind, status = "disconnected", HostStatus.DOWN
        elif isinstance(parsed, parser.HostAlertStateAlert):
            kind, status = "disconnected", HostStatus.ALERT
        elif isinstance(parsed, parser.MaintenancePrepare) and parsed.status == "Completed":
            kind = "maintenance_started"
        elif isinstance(parsed, parser.MaintenancePrepare) and parsed.status in (
            "Scheduled",
            "Started",
        ):
            kind = "maintenance_started"
        elif isinstance(parsed, parser.MaintenanceCancel) and parsed.status == "Completed":
            kind = "maintenance_ended"
        if kind is None:
            return None, None
        uuid = getattr(parsed, "host_uuid", None)
        name = getattr(parsed, "host_name", None)
        if uuid is None and name:
            uuid = await self.resolve_name(name)
        if uuid is None:
            return None, f"{parsed.kind}: no host uuid in the event and none found by name"
        ref = HostRef(host_uuid=uuid, host_name=name, zone_uuid=getattr(parsed, "zone_uuid", None))
        cached = self.directory.placed.get(uuid)
        if kind == "disconnected":
            # CloudStack's state now is the arbiter, not its alert's time: an alert for a host
            # CloudStack reports up (redelivered, or processed after the host came back) opens
            # nothing; a host it reports down, or cannot be asked about, is reported, and the
            # next poll reports it again as CloudStack then sees it.
            now = await self._current_state(uuid)
            if now is not None and now not in DOWN_STATES:
                log.info(
                    "host %s: %s alert ignored: CloudStack reports the host %s now",
                    uuid,
                    parsed.kind,
                    now,
                )
                return None, None
            self.directory.recheck.add(uuid)
        if cached is not None:
            ref = ref.model_copy(update={"cluster_uuid": cached[0], "ip_address": cached[1]})
            entry = self.directory.entries.get(uuid) or {}
            if ref.host_name is None and entry.get("n"):
                ref = ref.model_copy(update={"host_name": entry["n"]})
            if ref.zone_uuid is None and entry.get("z"):
                ref = ref.model_copy(update={"zone_uuid": entry["z"]})
        else:
            ref = await self._complete_ref(ref)
        if kind == "disconnected" and self.log is not None:
            # The leader may be another worker: the next poll there reports this host too.
            await self.log.recheck(
                uuid, {"c": ref.cluster_uuid, "i": ref.ip_address, "n": ref.host_name}
            )
        signal = HostSignal(
            kind=kind,
            host=ref,
            at=at,
            reported_at=float(reported_at) if reported_at else None,
            status=status,
            clock=self.clock_id,
        )
        return signal, None

    async def resolve_name(self, name: str) -> str | None:
        """A host uuid from its name (older alert wordings carry only name and numeric id)."""
        if name in self.directory.names:
            return self.directory.names[name]
        try:
            hosts = await self.inventory().list("listHosts", name=name, type="Routing")
        except Exception as exc:
            log.warning("cannot resolve host %s: %s", name, exc)
            return None
        for h in hosts:
            if h.get("name") == name:
                self.directory.names[name] = h["id"]
                return str(h["id"])
        return None

    async def _current_state(self, host_uuid: str) -> str | None:
        """The host's state in CloudStack now, or None when CloudStack cannot say."""
        try:
            return (await self.inventory().host(host_uuid)).state or None
        except Exception as exc:
            log.warning("cannot read host %s's state from CloudStack: %s", host_uuid, exc)
            return None

    async def _complete_ref(self, ref: HostRef) -> HostRef:
        try:
            h = await self.inventory().host(ref.host_uuid)
        except Exception as exc:
            log.warning("cannot look up host %s: %s", ref.host_uuid, exc)
            return ref
        return ref.model_copy(
            update={
                "cluster_uuid": h.cluster_uuid,
                "ip_address": h.ip,
                "host_name": h.name,
                "zone_uuid": h.zone_uuid,
            }
        )


# Every record Ingest.signal turns into a signal holds one of these words verbatim: the alert's
# `event` value ALERT.COMPUTE.HOST, or the action event MAINT.PREPARE / MAINT.CANCEL. Gson never
# escapes letters or dots, and a record with any `\u` escape is parsed anyway.
SIGNAL_MARKERS = (b"ALERT.COMPUTE.HOST", b"MAINT.")


def may_matter(value: Any) -> bool:
    """False only for a flat JSON object of strings that cannot carry a host signal (noise);
    True for everything else, which is then parsed as before."""
    if type(value) is not bytes:
        return True
    if value[:2] != b'{"' or value[-2:] != b'"}':
        return True  # not Gson's flat object shape: parse it (junk goes to the dead letters)
    for marker in SIGNAL_MARKERS:
        if marker in value:
            return True
    return (
        # the noise fencer knows: VM / volume state changes and usage events name a resource
        b'"resource":"' not in value
        or b"\\u" in value
        or value.count(b"{") != 1
        or b"[" in value
        # every key's value is a string ("k":"v"): numbers, booleans or nesting are parsed
        or value.count(b'":') != value.count(b'":"')
    )


@dataclass(frozen=True)
class BusRecord:
    """One event bus record as `Ingest.signal` and `codec.dead_letter` read it (timestamp in
    seconds, as Faust's messages carry it)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float | None


Send = Callable[[str, bytes | None, bytes], Awaitable[Awaitable[Any]]]


@dataclass
class EventBusConsumer:
    """The ingest step as a plain batched consumer of the event bus (see the module rule).

    `send(kind, key, value)` hands a record to the producer (`kind` is "signal" or "dead") and
    returns its delivery future; `make_consumer(group_id)` builds an aiokafka consumer.
    """

    ingest: Ingest
    topic: str
    group_id: str
    send: Send
    make_consumer: Callable[..., Any]
    dead_letter: Callable[[Any, str], bytes]
    encode_signal: Callable[[HostSignal], bytes]
    previous_group: str | None = None  # where the offsets were before (the Faust app's group)
    max_records: int = 10_000
    concurrency: int = 16  # host lookups in flight at once within a batch
    counts: dict[str, int] = field(
        default_factory=lambda: {"records": 0, "skipped": 0, "signals": 0, "dead": 0}
    )
    _consumer: Any = None
    _stopping: bool = False

    async def run(self) -> None:
        """Consume until `stop()`; a failed batch is read again, never committed."""
        from aiokafka import ConsumerRebalanceListener
        from aiokafka.errors import ConsumerStoppedError

        outer = self

        class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: Any) -> None:
                return None

            async def on_partitions_assigned(self, assigned: Any) -> None:
                await outer._start_where_the_old_group_was(list(assigned))

        consumer = self.make_consumer(
            group_id=self.group_id, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        self._consumer = consumer
        await consumer.start()
        try:
            consumer.subscribe([self.topic], listener=_Listener())
            while not self._stopping:
                try:
                    batch = await consumer.getmany(timeout_ms=500, max_records=self.max_records)
                except ConsumerStoppedError:
                    break
                if not batch:
                    continue
                try:
                    await self.handle(consumer, batch)
                except Exception:
                    if self._stopping:
                        break
                    # Nothing of the batch was committed: read it again after a pause, and say so
                    # every time (an outage of the broker or of a lookup never stalls silently).
                    log.exception("event bus: a batch failed, reading it again")
                    for tp, records in batch.items():
                        if records:
                            consumer.seek(tp, records[0].offset)
                    await asyncio.sleep(1.0)
        finally:
            self._consumer = None
            await consumer.stop()

    async def stop(self) -> None:
        """Leave the group cleanly (its partitions move at once, not after a session timeout)."""
        self._stopping = True
        consumer = self._consumer
        if consumer is not None:
            self._consumer = None
            await consumer.stop()  # (aiokafka's stop is idempotent: run's own stop is a no-op)

    async def handle(self, consumer: Any, batch: dict[Any, list[Any]]) -> None:
        """One batch: its records that may matter are turned into signals concurrently (a host
        lookup in CloudStack must not hold up the next alert), their signals and dead letters
        are handed to the producer in the batch's order, delivered, then the offsets committed."""
        offsets: dict[Any, int] = {}
        matter: list[Any] = []
        counts = self.counts
        for tp, records in batch.items():
            for r in records:
                counts["records"] += 1
                if may_matter(r.value):
                    matter.append(r)
                else:
                    counts["skipped"] += 1
            if records:
                offsets[tp] = records[-1].offset + 1
        if matter:
            gate = asyncio.Semaphore(self.concurrency)

            async def judged(r: Any) -> tuple[BusRecord, HostSignal | None, str | None]:
                async with gate:
                    return await self._judge(r)

            pending: list[Awaitable[Any]] = []
            for rec, signal, reason in await asyncio.gather(*(judged(r) for r in matter)):
                if signal is not None:
                    counts["signals"] += 1
                    key = signal.host.host_uuid.encode()
                    pending.append(await self.send("signal", key, self.encode_signal(signal)))
                elif reason is not None:
                    counts["dead"] += 1
                    pending.append(await self.send("dead", None, self.dead_letter(rec, reason)))
            await asyncio.gather(*pending)
        try:
            await consumer.commit(offsets)
        except Exception as exc:  # a rebalance: the next owner reads the batch again
            log.warning("event bus: offsets not committed (%s): the batch is read again", exc)

    async def _judge(self, r: Any) -> tuple[BusRecord, HostSignal | None, str | None]:
        ts = r.timestamp / 1000 if r.timestamp is not None and r.timestamp >= 0 else None
        rec = BusRecord(r.topic, r.partition, r.offset, r.key, r.value, ts)
        try:
            signal, reason = await self.ingest.signal(rec)
        except Exception as exc:  # a bug or an outage must not stop the stream
            log.exception("cannot ingest a CloudStack event")
            signal, reason = None, f"ingest failed: {type(exc).__name__}"
        return rec, signal, reason

    async def _start_where_the_old_group_was(self, assigned: list[Any]) -> None:
        """A partition this group never committed starts at the offset the previous group
        (the Faust agent's) committed, so an upgrade does not replay the bus from the start."""
        consumer = self._consumer
        if consumer is None or not self.previous_group or not assigned:
            return
        fresh = [tp for tp in assigned if await consumer.committed(tp) is None]
        if not fresh:
            return
        old = self.make_consumer(group_id=self.previous_group, enable_auto_commit=False)
        try:
            await old.start()
            for tp in fresh:
                offset = await old.committed(tp)
                if offset is not None and offset >= 0:
                    consumer.seek(tp, offset)
        except Exception as exc:
            log.warning("event bus: cannot read the previous group's offsets: %s", exc)
        finally:
            await old.stop()
