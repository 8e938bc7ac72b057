"""Kafka client configuration, derived from `FencerSettings.kafka` in this one place.

Rule: every aiokafka client and every Faust app is built from `aiokafka_kwargs` /
`faust_app_kwargs`, after `prepare_kafka(settings)`, which applies the Tansu workarounds when
(and only when) the settings say the broker is the embedded one. Nothing here is Tansu-specific
otherwise: `ensure_topics` works against any Kafka. `prepare_kafka` also applies, for every
broker, the Faust workaround at the end of this module (records fetched at the end of a table
recovery were dropped: a worker restarted at once after a crash did not read them).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import for_code
from aiokafka.helpers import create_ssl_context

from fencing.settings import FencerSettings, KafkaSettings, SettingsError, kafka_tls_file_problems

log = logging.getLogger("fencer.kafka")

# Topics that must have exactly one partition, by their TopicNames field: the gate's
# `fence_proposals` feeds a one-partition table (the global fence cap has one owner); in
# `fence_claims` the log order decides between two claimants of one decision.
SINGLE_PARTITION_TOPICS = frozenset({"fence_proposals", "fence_claims"})
# Topics that hold the latest value per key.
COMPACTED_TOPICS = frozenset({"settings", "host_states", "bmc_pins", "audit"})

TOPIC_ALREADY_EXISTS = 36


class TopicMismatchError(Exception):
    """An existing topic has another partition count than fencer needs (names the topic)."""


@dataclass(frozen=True)
class TopicSpec:
    """A topic fencer needs: name, partition count, replication factor and configs."""

    name: str
    partitions: int
    replication_factor: int
    configs: Mapping[str, str]


def topic_specs(settings: FencerSettings) -> list[TopicSpec]:
    """Every topic of `settings.kafka.topics` with its partition count and configs."""
    k = settings.kafka
    specs = []
    for field, name in k.topics.model_dump().items():
        configs = {"cleanup.policy": "compact"} if field in COMPACTED_TOPICS else {}
        partitions = 1 if field in SINGLE_PARTITION_TOPICS else k.partitions
        specs.append(TopicSpec(name, partitions, k.replication_factor, configs))
    return specs


def ssl_context(kafka: KafkaSettings) -> ssl.SSLContext | None:
    """A verifying TLS context for SSL / SASL_SSL (the CA file if set, else the system CAs),
    with the client certificate for mutual TLS when `ssl_certfile` / `ssl_keyfile` are set.

    A CA, certificate or key file that is missing or unreadable is a SettingsError naming the
    setting and the path (never a bare FileNotFoundError)."""
    if kafka.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    problems = kafka_tls_file_problems(kafka)
    if problems:
        raise SettingsError("; ".join(f"{where}: {problem}" for where, problem in problems))
    password = kafka.ssl_keyfile_password
    try:
        context: ssl.SSLContext = create_ssl_context(
            cafile=str(kafka.ssl_cafile) if kafka.ssl_cafile else None,
            certfile=str(kafka.ssl_certfile) if kafka.ssl_certfile else None,
            keyfile=str(kafka.ssl_keyfile) if kafka.ssl_keyfile else None,
            password=password.get_secret_value() if password is not None else None,
        )
    except ssl.SSLError as exc:
        # Readable but not usable: name every file involved (which one the library cannot say).
        files = ", ".join(
            f"kafka.{n} ({getattr(kafka, n)})"
            for n in ("ssl_cafile", "ssl_certfile", "ssl_keyfile")
            if getattr(kafka, n) is not None
        )
        raise SettingsError(
            f"{files}: not a usable CA / certificate / key: {exc.reason or exc}"
        ) from None
    return context


def aiokafka_kwargs(settings: FencerSettings) -> dict[str, Any]:
    """Keyword arguments shared by AIOKafkaProducer, AIOKafkaConsumer and AIOKafkaAdminClient."""
    k = settings.kafka
    kwargs: dict[str, Any] = {
        "bootstrap_servers": k.bootstrap_servers,
        "security_protocol": k.security_protocol,
    }
    context = ssl_context(k)
    if context is not None:
        kwargs["ssl_context"] = context
    if k.security_protocol.startswith("SASL_"):
        sasl = k.sasl
        if sasl is None:
            raise ValueError(f"kafka.sasl: required by security_protocol {k.security_protocol}")
        kwargs["sasl_mechanism"] = sasl.mechanism
        kwargs["sasl_plain_username"] = sasl.username
        kwargs["sasl_plain_password"] = sasl.password.get_secret_value()
    return kwargs


def faust_broker_url(kafka: KafkaSettings) -> str:
    """`kafka://host:port` for each bootstrap server, `;`-separated as Faust expects."""
    hosts = [h.strip() for h in kafka.bootstrap_servers.split(",") if h.strip()]
    return ";".join(f"kafka://{h}" for h in hosts)


def faust_app_kwargs(settings: FencerSettings) -> dict[str, Any]:
    """Keyword arguments for `faust.App(app_id, **faust_app_kwargs(settings))`.

    Creates `data_dir/faust` if needed: Faust makes only the last level of its datadir.
    """
    import faust

    k = settings.kafka
    faust_dir = settings.data_dir / "faust"
    faust_dir.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {
        "broker": faust_broker_url(k),
        # Tansu's JoinGroup waits half the session timeout; Faust's default (60 s) makes every
        # start take 30 s or more. The settings hold the value so a real Kafka can use another.
        "broker_session_timeout": k.session_timeout,
        "broker_heartbeat_interval": k.heartbeat_interval,
        "topic_partitions": k.partitions,
        "topic_replication_factor": k.replication_factor,
        "table_standby_replicas": 0,
        "web_enabled": False,
        "store": "rocksdb://" if k.table_store == "rocksdb" else "memory://",
        "datadir": str(faust_dir / "{conf.id}"),
    }
    context = ssl_context(k)
    if k.security_protocol.startswith("SASL_"):
        sasl = k.sasl
        if sasl is None:
            raise ValueError(f"kafka.sasl: required by security_protocol {k.security_protocol}")
        kwargs["broker_credentials"] = faust.SASLCredentials(
            username=sasl.username,
            password=sasl.password.get_secret_value(),
            ssl_context=context,
            mechanism=sasl.mechanism,
        )
    elif context is not None:
        kwargs["broker_credentials"] = faust.SSLCredentials(context)
    return kwargs


def prepare_kafka(settings: FencerSettings) -> None:
    """Call before building any client or Faust app: applies the Faust workaround (any broker)
    and the Tansu workarounds if embedded."""
    apply_faust_workarounds()
    apply_faust_start_settings()
    if settings.kafka.embedded:
        from streams.tansu_compat import apply_tansu_workarounds

        apply_tansu_workarounds()


async def ensure_topics(settings: FencerSettings) -> list[str]:
    """Create the missing topics of `topic_specs(settings)` on any Kafka; return their names.

    An existing topic with another partition count raises TopicMismatchError (Faust would
    refuse to co-partition it anyway); its configs are left alone.
    """
    specs = {s.name: s for s in topic_specs(settings)}
    admin = AIOKafkaAdminClient(**aiokafka_kwargs(settings))
    await admin.start()
    try:
        # Metadata for *all* topics: naming unknown topics would make some brokers auto-create them.
        existing = set(await admin.list_topics())
        present = [name for name in specs if name in existing]
        if present:
            for t in await admin.describe_topics(present):
                want = specs[t["topic"]].partitions
                have = len(t["partitions"])
                if have != want:
                    raise TopicMismatchError(
                        f"kafka topic {t['topic']} has {have} partitions, fencer needs {want}"
                    )
        missing = [s for name, s in specs.items() if name not in existing]
        if not missing:
            return []
        response = await admin.create_topics(
            [
                NewTopic(s.name, s.partitions, s.replication_factor, topic_configs=dict(s.configs))
                for s in missing
            ]
        )
        for name, code, *rest in response.topic_errors:
            if code not in (0, TOPIC_ALREADY_EXISTS):
                message = rest[0] if rest and rest[0] else for_code(code).__name__
                raise RuntimeError(f"kafka: cannot create topic {name}: {message}")
        created = [s.name for s in missing]
        log.info("created kafka topics: %s", ", ".join(created))
        return created
    finally:
        await admin.close()


# -- Faust 0.15 workaround: records fetched at the end of a recovery are dropped --------------
#
# Found with a worker SIGKILLed and restarted at once (records waited in its stream partitions):
# the restarted worker never saw the records produced around its restart, with no log line.
# Faust's fetcher passes its *live* set of active partitions to the consumer thread; the
# recovery's `pause_partitions` empties that set in place while the request waits in the
# thread's queue, and aiokafka reads an empty set as "every partition": it hands over (and
# moves its position past) the records of the paused stream partitions, which Faust's
# `getmany` then skips as not active. The recovery's seek to the committed offsets rescues them
# only where the group has committed; records produced since the last commit, or on a
# partition the group never committed, are lost. (`getmany` likewise drops the rest of a batch
# when the flow stops or the generation changes mid-batch.)
# The patch: the thread is given a copy of the set, and nothing when it has become empty; a
# record `getmany` does not hand on sends its partition back to that record's offset, so it is
# fetched again once the partition is resumed (a partition no longer assigned is left alone:
# its next owner starts at the committed offset).
#
# Second path, same symptom: at the end of a recovery Faust resumes the stream partitions,
# seeks them to the committed offsets, then calls `app.flow_control.resume()`, which empties
# every agent's queue (mode's FlowControlEvent clears its queues on each resume). The flow is
# already running then (the recovery resumed it to read the changelogs), so records fetched
# after the seek and already queued for an agent are thrown away, and nothing reads them again.
# The patch: a resume clears the queues only when the flow was suspended (what was queued
# during a suspension is stale); a resume of a running flow leaves the queued records. Records
# of an earlier generation are still skipped by Faust's streams (they compare generations).

_faust_originals: dict[str, Any] = {}


async def _fetch_records_snapshot(
    self: Any,
    consumer: Any,
    active_partitions: Any,
    timeout: float | None = None,  # noqa: ASYNC109  (Faust's signature)
    max_records: int | None = None,
) -> Any:
    """Faust workaround: aiokafka gets a copy of the active partitions, never an empty set."""
    wanted = set(active_partitions) if active_partitions is not None else None
    if wanted is not None and not wanted:
        return {}  # paused meanwhile; aiokafka would read an empty set as "all partitions"
    return await _faust_originals["fetch_records"](
        self, consumer, wanted, timeout=timeout, max_records=max_records
    )


async def _getmany_rewinding(self: Any, timeout: float) -> Any:  # noqa: ASYNC109  (Faust's)
    """Faust's `Consumer.getmany` (faust-streaming 0.15.3), except that a fetched record it does
    not hand on rewinds its partition to that record (see above)."""
    records, active_partitions = await self._wait_next_records(timeout)
    generation_id = self.app.consumer_generation_id
    if records is None or self.should_stop:
        return
    # Per partition: the first offset not handed on yet, and where to rewind to.
    pending = {tp: recs[0].offset for tp, recs in records.items() if recs}
    rewind: dict[Any, int] = {}
    flow_was_active = self.flow_active
    interrupted = False
    try:
        if flow_was_active:
            for tp, record in self.scheduler.iterate(records):
                if tp in rewind:
                    continue
                if not self.flow_active or self.app.consumer_generation_id != generation_id:
                    break
                if (
                    active_partitions is None
                    or tp in active_partitions
                    or tp in self._buffered_partitions
                ):
                    pending[tp] = record.offset + 1
                    self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
                    yield tp, self._to_message(tp, record)
                else:
                    rewind[tp] = record.offset
    except BaseException:  # cancelled or closed: Faust stops its fetcher only at shutdown
        interrupted = True
        raise
    finally:
        if not interrupted and not self.should_stop:
            for tp, recs in records.items():
                if recs and tp not in rewind and pending[tp] <= recs[-1].offset:
                    rewind[tp] = pending[tp]
            if rewind:
                await _rewind(self, rewind)
    if not flow_was_active:
        # As Faust: fetched while the flow was stopped, seek back to the committed offsets.
        try:
            await self.perform_seek()
        except Exception as exc:
            log.warning("faust workaround: seek to the committed offsets failed: %s", exc)


async def _rewind(consumer: Any, offsets: dict[Any, int]) -> None:
    """Send each still-assigned partition back to its first record not handed on."""
    try:
        assigned = consumer.assignment()
        back = {tp: off for tp, off in offsets.items() if tp in assigned}
        if not back:
            return
        log.info(
            "faust workaround: fetched records not handed on (partition paused or a "
            "rebalance), read again from %s",
            ", ".join(f"{tp.topic}[{tp.partition}]@{off}" for tp, off in sorted(back.items())),
        )
        await consumer.seek_wait(back)
    except Exception as exc:  # revoked meanwhile: the next owner starts at the committed offset
        log.warning("faust workaround: cannot rewind %s: %s", sorted(offsets), exc)


def _resume_keeping_live_records(self: Any) -> None:
    """mode's FlowControlEvent.resume, clearing the queues only after a suspension."""
    if self._suspend.is_set():
        _faust_originals["flow_resume"](self)
    else:
        self._resume.set()


def apply_faust_workarounds() -> None:
    """Patch Faust's fetch path and flow control (see above); idempotent. Every broker."""
    if _faust_originals:
        return
    from faust.transport import consumer as faust_consumer
    from faust.transport.drivers import aiokafka as faust_aiokafka
    from mode.utils.queues import FlowControlEvent

    thread = faust_aiokafka.AIOKafkaConsumerThread
    _faust_originals["fetch_records"] = thread._fetch_records
    _faust_originals["getmany"] = faust_consumer.Consumer.getmany
    _faust_originals["flow_resume"] = FlowControlEvent.resume
    setattr(thread, "_fetch_records", _fetch_records_snapshot)  # noqa: B010  (typed classes)
    setattr(faust_consumer.Consumer, "getmany", _getmany_rewinding)  # noqa: B010
    setattr(FlowControlEvent, "resume", _resume_keeping_live_records)  # noqa: B010


def remove_faust_workarounds() -> None:
    """Restore Faust as it was (for the test that shows the defect)."""
    if not _faust_originals:
        return
    from faust.transport import consumer as faust_consumer
    from faust.transport.drivers import aiokafka as faust_aiokafka
    from mode.utils.queues import FlowControlEvent

    thread = faust_aiokafka.AIOKafkaConsumerThread
    setattr(thread, "_fetch_records", _faust_originals.pop("fetch_records"))  # noqa: B010
    setattr(faust_consumer.Consumer, "getmany", _faust_originals.pop("getmany"))  # noqa: B010
    setattr(FlowControlEvent, "resume", _faust_originals.pop("flow_resume"))  # noqa: B010


# -- Faust 0.15 start: a fixed one-second sleep before the tables register ---------------------
#
# Faust's TableManager sleeps 1.0 s when it starts, before it registers the tables' changelog
# channels and starts the recovery: a grace period for tables created after the app started
# (once registered, `TableManager.add` refuses new ones). The conductor subscribes the
# consumer only once the tables are registered, so every worker start (and restart) joined its
# group a second later than it could. Fencer creates every table in `create_app`, before the
# app starts, so the grace period serves nothing: the patch yields to the loop once instead.
# A table added after the start still fails loudly, as it would after Faust's second.

_faust_start_originals: dict[str, Any] = {}


async def _table_manager_on_start(self: Any) -> None:
    """Faust's `TableManager.on_start` (faust-streaming 0.15.3) without its 1 s sleep."""
    await asyncio.sleep(0)
    if not self.should_stop:
        await self._update_channels()
        await self.recovery.start()


def apply_faust_start_settings() -> None:
    """Patch Faust's table manager start (see above); idempotent. Every broker."""
    if _faust_start_originals:
        return
    from faust.tables.manager import TableManager

    _faust_start_originals["on_start"] = TableManager.on_start
    setattr(TableManager, "on_start", _table_manager_on_start)  # noqa: B010  (typed class)


def remove_faust_start_settings() -> None:
    """Restore Faust's table manager start as it was."""
    if not _faust_start_originals:
        return
    from faust.tables.manager import TableManager

    setattr(TableManager, "on_start", _faust_start_originals.pop("on_start"))  # noqa: B010
