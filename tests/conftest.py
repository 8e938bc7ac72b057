"""Fixtures shared by the whole suite: the embedded Kafka broker and settings that point at it.

- `broker` (session scope): one started `streams.broker.EmbeddedBroker` (Tansu on a free
  127.0.0.1 port, memory storage) with every topic of the default `TopicNames` created. It is
  stopped at the end of the session; its process also dies with pytest (PR_SET_PDEATHSIG), so
  an interrupted run leaves nothing behind. The broker is shared: tests must not assume an
  empty topic or a fresh consumer group. Use `fencer_settings(isolated_topics=True)` when a
  test consumes from fencer's topics.
- `fencer_settings` (function scope): a factory
  `fencer_settings(isolated_topics=False, **update) -> FencerSettings` pointing at `broker`
  with `kafka.embedded=True` (so `streams.kafka.prepare_kafka` applies the Tansu workarounds),
  a fresh `data_dir` under the test's tmp_path, and a unique `kafka.group_id` (Faust app id,
  hence also unique table changelog topics). With `isolated_topics=True` every topic name gets
  a unique prefix and those topics are created before the factory returns. `update` is passed
  to `FencerSettings.model_copy(update=...)`, e.g. `fencer_settings(policy=PolicySettings(...))`.
- `kafka_settings` (function scope): `fencer_settings().kafka`, for code that only needs Kafka.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fencing.settings import FencerSettings, KafkaSettings, TopicNames
from streams.broker import EmbeddedBroker, run_coroutine
from streams.kafka import ensure_topics

FencerSettingsFactory = Callable[..., FencerSettings]


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """The session's embedded Kafka broker, started, with fencer's topics created."""
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture
def fencer_settings(broker: EmbeddedBroker, tmp_path: Path) -> FencerSettingsFactory:
    """Factory of FencerSettings pointing at `broker` (see the module docstring)."""
    counter = itertools.count()

    def make(isolated_topics: bool = False, **update: Any) -> FencerSettings:
        n = next(counter)
        unique = uuid.uuid4().hex[:8]
        kafka = broker.kafka_settings().model_copy(update={"group_id": f"fencer-test-{unique}"})
        if isolated_topics:
            names = {f: f"t{unique}.{name}" for f, name in TopicNames().model_dump().items()}
            kafka = kafka.model_copy(update={"topics": TopicNames(**names)})
        data_dir = tmp_path / f"data{n}"
        data_dir.mkdir()
        settings = FencerSettings().model_copy(
            update={"kafka": kafka, "data_dir": data_dir, **update}
        )
        if isolated_topics:
            run_coroutine(ensure_topics(settings))
        return settings

    return make


@pytest.fixture
def kafka_settings(fencer_settings: FencerSettingsFactory) -> KafkaSettings:
    """KafkaSettings pointing at the session broker (embedded=True, unique group id)."""
    return fencer_settings().kafka
