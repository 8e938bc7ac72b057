"""Kafka client configuration, derived from `FencerSettings.kafka` in this one place.

Rule: every aiokafka client and every Faust app is built from `aiokafka_kwargs` /
`faust_app_kwargs`, after `prepare_kafka(settings)`, which applies the Tansu workarounds when
(and only when) the settings say the broker is the embedded one. Nothing here is Tansu-specific
otherwise: `ensure_topics` works against any Kafka.
"""

from __future__ import annotations

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
    """Call before building any client or Faust app: applies the Tansu workarounds if embedded."""
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
