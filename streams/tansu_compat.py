"""Every workaround for the embedded Tansu 0.6 broker lives here, and is applied only to it.

Rule: nothing outside this module knows about Tansu's defects. `streams.kafka.prepare_kafka`
calls `apply_tansu_workarounds()` when `settings.kafka.embedded` is true and never otherwise,
so a configured real Kafka always sees unmodified aiokafka.

The defects (research/feasibility-kafka.md), and one cost:

- ListOffsets(LATEST) answers the base offset of the partition's *last batch* + 1, not the high
  watermark, so `end_offsets()` is too low. Faust reads a table's changelog up to that offset on
  recovery, so a restarted worker silently loses table rows (memory store) or refuses to start
  (RocksDB store: "persisted offset is higher than highwater"). Patch B asks the partition
  leader for a Fetch response, whose high watermark is right, and returns the larger of the two.
- aiokafka sends InitProducerId v0 only; Tansu needs the v3 fields (producer id and epoch = -1)
  and answers v0 with UnknownError, so an idempotent or transactional producer cannot start.
  Patch A teaches aiokafka InitProducerId v3.

- Tansu parks a Fetch for its whole `max_wait_ms` when the partition is empty at request time,
  even if a record arrives meanwhile: a record waits half the consumer's fetch wait on average.
  Faust's aiokafka driver hard-codes 1,500 ms, so every hop of the topology cost ~750 ms.
  Patch C caps every consumer's `fetch_max_wait_ms` at `CONSUMER_FETCH_MAX_WAIT_MS` (40 ms),
  and at `ACTIVE_FETCH_MAX_WAIT_MS` (10 ms) while the consumer has fetched a record within the
  last `ACTIVE_WINDOW_S`: a hop costs ~5 ms instead of ~20 on average while records flow (an
  open episode: probe results, and its ticks at least every 5 s), and an idle consumer still
  asks the broker only once per 40 ms (each fetch costs CPU in the worker and in Tansu;
  measured in benchmarks/README.md). A consumer that only tails a log in the background
  (client id in `IDLE_WAIT_CLIENT_IDS`: the event bus, the host directory, the settings; nothing
  waits on each of its records) keeps the idle wait whether records flow or not: in a burst of
  decisions those tails fetched as often as the topology's own consumer, each fetch costing the
  worker's one event loop and the broker CPU that the decisions needed (issue 17).

The patches are process-wide monkeypatches of aiokafka classes; `apply_tansu_workarounds` is
idempotent and `remove_tansu_workarounds` restores the originals (used by the test that shows
the defect).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.consumer.fetcher import Fetcher
from aiokafka.protocol.api import RequestStruct, Response
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.protocol.transaction import InitProducerIdRequest, InitProducerIdRequest_v0
from aiokafka.protocol.types import CompactString, Int16, Int32, Int64, Schema, TaggedFields
from aiokafka.structs import TopicPartition

log = logging.getLogger("fencer.tansu")

# Tansu answers a Fetch with max_wait_ms=0 with an empty topic list; 100 ms gets an answer
# (immediately when the partition has data, after 100 ms when it is empty).
FETCH_MAX_WAIT_MS = 100
# Patch C: what a parked fetch may cost a record per hop (about half of it on average). Lower
# means more idle fetch requests to the embedded broker (one per consumer per this many ms).
CONSUMER_FETCH_MAX_WAIT_MS = 40
# Patch C while records flow: the fetch wait of a consumer that fetched a record within the
# last ACTIVE_WINDOW_S seconds (longer than the 5 s tick period of an open episode).
ACTIVE_FETCH_MAX_WAIT_MS = 10
ACTIVE_WINDOW_S = 10.0
# Patch C: consumers (by client id) that never get the short wait (module rule). The event bus
# (an alert waits ~20 ms more at most: nothing against the evidence windows), the host directory
# and the settings topic; every other consumer, the topology's own and the actuator's readers
# included, gets the short wait while records flow.
IDLE_WAIT_CLIENT_IDS = frozenset({"fencer-event-bus", "fencer-host-directory", "fencer-settings"})
# Other values for one process and the workers it starts, to measure the trade-off (benchmarks).
FETCH_WAIT_ENV = "FENCER_TANSU_FETCH_WAIT_MS"
ACTIVE_FETCH_WAIT_ENV = "FENCER_TANSU_ACTIVE_FETCH_WAIT_MS"


def _env_ms(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}: not a whole number of ms: {text!r}") from None
    if value < 1:
        # Tansu answers a Fetch with max_wait_ms=0 with an empty topic list.
        raise ValueError(f"{name}: must be at least 1 ms, got {value}")
    return value


def consumer_fetch_max_wait_ms() -> int:
    """Patch C's cap in ms: `CONSUMER_FETCH_MAX_WAIT_MS`, or $FENCER_TANSU_FETCH_WAIT_MS."""
    return _env_ms(FETCH_WAIT_ENV, CONSUMER_FETCH_MAX_WAIT_MS)


def active_fetch_max_wait_ms() -> int:
    """Patch C's cap while records flow: `ACTIVE_FETCH_MAX_WAIT_MS`, or
    $FENCER_TANSU_ACTIVE_FETCH_WAIT_MS."""
    return _env_ms(ACTIVE_FETCH_WAIT_ENV, ACTIVE_FETCH_MAX_WAIT_MS)


def fetch_wait_for(
    idle_wait_ms: int, active_wait_ms: int, last_record_at: float | None, now: float
) -> int:
    """The fetch wait of a consumer whose last fetched record came at `last_record_at`
    (monotonic seconds, None: never): the active wait within ACTIVE_WINDOW_S, else the idle."""
    if last_record_at is not None and now - last_record_at < ACTIVE_WINDOW_S:
        return min(idle_wait_ms, active_wait_ms)
    return idle_wait_ms


_lock = threading.Lock()
_originals: dict[str, Any] = {}


class InitProducerIdResponse_v3(Response):  # type: ignore[misc]  # aiokafka is untyped
    """InitProducerId v3 response (flexible)."""

    API_KEY = 22
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("error_code", Int16),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("tags", TaggedFields),
    )


class InitProducerIdRequest_v3(RequestStruct):  # type: ignore[misc]
    """InitProducerId v3 request: adds the current producer id and epoch (-1 = new producer)."""

    FLEXIBLE_VERSION = True
    API_KEY = 22
    API_VERSION = 3
    RESPONSE_TYPE = InitProducerIdResponse_v3
    SCHEMA = Schema(
        ("transactional_id", CompactString("utf-8")),
        ("transaction_timeout_ms", Int32),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("tags", TaggedFields),
    )


def _build_init_producer_id(self: Any, request_struct_class: type[RequestStruct]) -> Any:
    if request_struct_class.API_VERSION >= 3:
        return request_struct_class(
            self._transactional_id, self._transaction_timeout_ms, -1, -1, {}
        )
    return request_struct_class(self._transactional_id, self._transaction_timeout_ms)


async def _fetch_highwaters(
    client: Any, offsets: Mapping[TopicPartition, int]
) -> dict[TopicPartition, int]:
    """The high watermark of each partition, read from a Fetch response of its leader."""
    by_leader: dict[int, dict[str, list[tuple[int, int, int]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for tp, listed in offsets.items():
        leader = client.cluster.leader_for_partition(tp)
        if leader is None or leader < 0:
            continue
        # Fetch the last batch that ListOffsets saw; one byte is enough to get the header back.
        by_leader[leader][tp.topic].append((tp.partition, max(listed - 1, 0), 1))

    async def ask(node: int, topics: dict[str, list[tuple[int, int, int]]]) -> Any:
        request = FetchRequest(
            max_wait_time=FETCH_MAX_WAIT_MS,
            min_bytes=1,
            max_bytes=1,
            isolation_level=0,
            topics=list(topics.items()),
        )
        return await client.send(node, request)

    responses = await asyncio.gather(
        *(ask(node, topics) for node, topics in by_leader.items()), return_exceptions=True
    )
    highwaters: dict[TopicPartition, int] = {}
    for response in responses:
        if isinstance(response, BaseException):
            # ListOffsets' answer still stands; a lost correction is logged, not hidden.
            log.warning("tansu workaround: fetch for the high watermark failed: %s", response)
            continue
        for topic, partitions in response.topics:
            for partition, error_code, highwater, *_ in partitions:
                if error_code == 0 and highwater >= 0:
                    highwaters[TopicPartition(topic, partition)] = highwater
    return highwaters


def _patched_end_offsets(
    original: Callable[..., Coroutine[Any, Any, dict[TopicPartition, int]]],
) -> Callable[..., Coroutine[Any, Any, dict[TopicPartition, int]]]:
    async def end_offsets(
        self: AIOKafkaConsumer, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int]:
        """Tansu workaround: the larger of ListOffsets(LATEST) and the Fetch high watermark."""
        listed = await original(self, partitions)
        highwaters = await _fetch_highwaters(self._client, listed)
        return {tp: max(off, highwaters.get(tp, off)) for tp, off in listed.items()}

    end_offsets.__tansu_workaround__ = True  # type: ignore[attr-defined]
    return end_offsets


def _patched_consumer_init(original: Callable[..., None]) -> Callable[..., None]:
    def __init__(self: AIOKafkaConsumer, *topics: str, **kwargs: Any) -> None:
        """Tansu workaround: a short fetch wait (Faust passes 1,500 ms, aiokafka's default 500)."""
        wait = kwargs.get("fetch_max_wait_ms", 500)
        kwargs["fetch_max_wait_ms"] = min(int(wait), consumer_fetch_max_wait_ms())
        original(self, *topics, **kwargs)

    __init__.__tansu_workaround__ = True  # type: ignore[attr-defined]
    return __init__


def _patched_fetch_actions(original: Callable[..., Any]) -> Callable[..., Any]:
    def _get_actions_per_node(self: Any, assignment: Any) -> Any:
        """Tansu workaround: the next fetch waits less while records flow (Patch C)."""
        state = self.__dict__
        if "_tansu_active_wait_ms" not in state:  # the first fetch: read the settings once
            state["_tansu_idle_wait_ms"] = idle = self._fetch_max_wait_ms
            background = getattr(self._client, "_client_id", None) in IDLE_WAIT_CLIENT_IDS
            state["_tansu_active_wait_ms"] = idle if background else active_fetch_max_wait_ms()
        else:
            idle = state["_tansu_idle_wait_ms"]
        active = state["_tansu_active_wait_ms"]
        last = state.get("_tansu_record_at")
        self._fetch_max_wait_ms = fetch_wait_for(idle, active, last, time.monotonic())
        return original(self, assignment)

    _get_actions_per_node.__tansu_workaround__ = True  # type: ignore[attr-defined]
    return _get_actions_per_node


def _patched_proc_fetch(
    original: Callable[..., Coroutine[Any, Any, bool]],
) -> Callable[..., Coroutine[Any, Any, bool]]:
    async def _proc_fetch_request(self: Any, assignment: Any, node_id: int, request: Any) -> bool:
        """Tansu workaround: note when this fetcher last got records (Patch C)."""
        has_records = await original(self, assignment, node_id, request)
        if has_records:
            self._tansu_record_at = time.monotonic()
        return has_records

    _proc_fetch_request.__tansu_workaround__ = True  # type: ignore[attr-defined]
    return _proc_fetch_request


def apply_tansu_workarounds() -> None:
    """Patch aiokafka for Tansu 0.6 (end offsets, InitProducerId v3); idempotent."""
    with _lock:
        if _originals:
            return
        _originals["end_offsets"] = AIOKafkaConsumer.end_offsets
        _originals["init_classes"] = InitProducerIdRequest._CLASSES
        _originals["init_build"] = InitProducerIdRequest.__dict__["build"]
        AIOKafkaConsumer.end_offsets = _patched_end_offsets(_originals["end_offsets"])
        InitProducerIdRequest._CLASSES = (
            InitProducerIdRequest_v0,
            InitProducerIdRequest_v3,
        )
        InitProducerIdRequest.build = _build_init_producer_id
        _originals["consumer_init"] = AIOKafkaConsumer.__init__
        AIOKafkaConsumer.__init__ = _patched_consumer_init(_originals["consumer_init"])
        _originals["fetch_actions"] = Fetcher._get_actions_per_node
        _originals["proc_fetch"] = Fetcher._proc_fetch_request
        Fetcher._get_actions_per_node = _patched_fetch_actions(_originals["fetch_actions"])
        Fetcher._proc_fetch_request = _patched_proc_fetch(_originals["proc_fetch"])
        log.debug("tansu workarounds applied to aiokafka")


def remove_tansu_workarounds() -> None:
    """Restore aiokafka exactly as it was; calling it when nothing is applied is a no-op."""
    with _lock:
        if not _originals:
            return
        AIOKafkaConsumer.end_offsets = _originals.pop("end_offsets")
        InitProducerIdRequest._CLASSES = _originals.pop("init_classes")
        InitProducerIdRequest.build = _originals.pop("init_build")
        AIOKafkaConsumer.__init__ = _originals.pop("consumer_init")
        Fetcher._get_actions_per_node = _originals.pop("fetch_actions")
        Fetcher._proc_fetch_request = _originals.pop("proc_fetch")
        log.debug("tansu workarounds removed from aiokafka")


def tansu_workarounds_applied() -> bool:
    """Whether aiokafka is currently patched for Tansu."""
    return bool(_originals)


__all__ = [
    "ACTIVE_FETCH_MAX_WAIT_MS",
    "ACTIVE_FETCH_WAIT_ENV",
    "ACTIVE_WINDOW_S",
    "CONSUMER_FETCH_MAX_WAIT_MS",
    "FETCH_MAX_WAIT_MS",
    "FETCH_WAIT_ENV",
    "IDLE_WAIT_CLIENT_IDS",
    "active_fetch_max_wait_ms",
    "apply_tansu_workarounds",
    "consumer_fetch_max_wait_ms",
    "fetch_wait_for",
    "remove_tansu_workarounds",
    "tansu_workarounds_applied",
]
