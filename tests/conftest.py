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
- `ceph` (session scope): a real single-node Ceph (lab.ceph.CephCluster: one monitor, one
  memstore OSD, pool `rbd`) with a short `osd client watch timeout` (WATCH_TIMEOUT s, so a dead
  client's watch expires in seconds) and two keys: the probe's read-only key and the actuator's
  blocklist key. A real peer: if Ceph is not installed the test FAILS (make test installs
  ceph-mon ceph-osd ceph-common), never skips. Started once per test process (~1-2 s).
- `ceph_clean` (function scope): `ceph`, with the blocklist cleared and the monitor running
  again after the test (lab addresses repeat across tests).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fencing.settings import FencerSettings, KafkaSettings, TopicNames
from lab.ceph import LAB_WATCH_TIMEOUT, CephCluster, ceph_installed
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


# --- a real Ceph ---------------------------------------------------------------------------------

WATCH_TIMEOUT = LAB_WATCH_TIMEOUT  # osd_client_watch_timeout of the test cluster (Ceph's: 30)


@dataclass
class Ceph:
    """The session's cluster and its two keys (lab.ceph PROBE_CAPS, FENCE_CAPS)."""

    cluster: CephCluster
    probe_keyring: Path
    fence_keyring: Path
    names: Iterator[int]

    def image(self, prefix: str = "vol") -> str:
        """A new image in pool `rbd`; its name (unique in the session)."""
        name = f"{prefix}-{next(self.names)}"
        self.cluster.create_image(name)
        return name

    def rbd_settings(self, **kw: object) -> dict[str, object]:
        """The `rbd` settings section that reaches this cluster (neighbours and worker alike)."""
        return self.cluster.rbd_settings(**kw)


@pytest.fixture(scope="session")
def ceph() -> Iterator[Ceph]:
    """One monitor and one memstore OSD for the whole session (a real peer: never skipped)."""
    problem = ceph_installed()
    if problem:
        pytest.fail(f"a real Ceph is needed: {problem}")
    with CephCluster(watch_timeout=WATCH_TIMEOUT) as cluster:
        print(f"ceph: started in {cluster.started_in:.2f} s")  # shown with -s / -rP
        probe_keyring, fence_keyring = cluster.fencer_keys()
        yield Ceph(cluster, probe_keyring, fence_keyring, itertools.count(1))


@pytest.fixture
def ceph_clean(ceph: Ceph) -> Iterator[Ceph]:
    """The cluster, with its blocklist and monitor as they were after the test (lab addresses
    repeat across tests, so a blocklist left behind would cut the next test's clients off)."""
    yield ceph
    ceph.cluster.reset()
