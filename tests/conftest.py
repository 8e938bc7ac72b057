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
  a fresh `data_dir` under the test's tmp_path, a unique `kafka.group_id` (Faust app id,
  hence also unique table changelog topics) and the lab's short session timeout (2 s). With
  `isolated_topics=True` every topic name gets a unique prefix and those topics are created
  before the factory returns. `update` is passed
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
        kafka = broker.kafka_settings().model_copy(
            # The lab's session timeout (lab.cloud): Tansu's join waits half of it, a killed
            # worker's partitions move one session timeout after the kill (default 6 s: a
            # 3 s join at every worker start).
            update={
                "group_id": f"fencer-test-{unique}",
                "session_timeout": 2.0,
                "heartbeat_interval": 0.5,
            }
        )
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


# --- the order of the run (xdist) -----------------------------------------------------------------
#
# `pytest -n 4 --dist load` hands the first quarter of the collection to the workers round robin
# and the rest on demand, in collection order. A long test collected late (the e2e modules, the
# stateful Hypothesis machines) starts late and leaves the other workers idle at the end. So the
# modules whose slowest test is long run first, slowest first, and inside such a module its
# slow tests first (a module stays together, so its module fixtures are set up no more often).
# Every test still runs, each on its own fixtures; only the order changes. The seconds are the
# `call` durations of a full CI run (`make test ARGS=--durations=120`, 2026-11-30, a loaded
# 2-core machine); refresh them when the slow tests change. Modules not listed keep their order
# after these.
SLOW_MODULES = {
    "tests/fencing/test_core_properties.py": 187,
    "tests/security/test_acl_roles.py": 118,
    "tests/e2e/test_replay.py": 108,
    "tests/e2e/test_rbd_scenarios.py": 95,
    "tests/streams/test_worker_restart.py": 91,
    "tests/e2e/test_actuation_safety.py": 80,
    "tests/e2e/test_bmc_identity.py": 76,
    "tests/webui/test_schemathesis.py": 76,
    "tests/security/test_sasl_clients.py": 73,
    "tests/e2e/test_never_silent.py": 73,
    "tests/streams/test_gate_worker.py": 63,
    "tests/webui/test_ipmi_test_worker.py": 60,
    "tests/streams/test_rows.py": 57,
    "tests/e2e/test_secrets_nowhere.py": 55,
    "tests/e2e/test_scenarios.py": 53,
    "tests/streams/test_parser.py": 51,
    "tests/webui/test_rbd_lift.py": 48,
    "tests/streams/test_host_directory.py": 44,
    "tests/streams/test_app.py": 43,
    "tests/streams/test_ingest.py": 39,
    "tests/webui/test_browser.py": 34,
    "tests/streams/test_kafka_tls.py": 34,
    "tests/streams/test_broker.py": 30,
    "tests/webui/test_bmc_pin_worker.py": 29,
    "tests/streams/test_actuation.py": 28,
    "tests/webui/test_blocklist_button.py": 23,
    "tests/security/test_worker_start_files.py": 21,
    "tests/e2e/test_lab_ceph.py": 21,
    "tests/streams/test_operator_actions_read_again.py": 18,
    "tests/fencing/test_storage_fence.py": 16,
    "tests/fencing/test_settings.py": 15,
    "tests/probes/test_rbd_blocklist.py": 14,
    "tests/probes/test_rbd_probe.py": 13,
    "tests/streams/test_startup.py": 12,
    "tests/streams/test_settings_signing.py": 11,
    "tests/fencing/test_actuator.py": 11,
    "tests/webui/test_sessions.py": 10,
    "tests/fencing/test_drivers.py": 10,
}
SLOW_TESTS = {  # by name inside their module: these first, slowest first
    "TestHostMachine::runTest": 187,
    "test_rbd_bmc_unreachable_blocklist_fallback_restarts_the_vms": 95,
    "test_rbd_host_crash_watches_expire_then_fenced_once": 74,
    "test_ceph_unreachable_is_unknown_notified_never_fenced": 61,
    "test_a_worker_killed_between_claim_and_bmc_call_powers_off_once": 80,
    "test_rbd_disk_is_unknown_notified_never_fenced": 53,
    "test_agent_dies_then_crash_is_fenced_once_in_time": 53,
    "test_cap_reached_fences_three_and_withholds_the_fourth": 52,
    "test_bmc_unreachable_fails_and_restarts_nothing": 52,
    "TestGateMachine::runTest": 40,
    "test_unknown_readings_never_count_and_never_break_a_run": 36,
    "test_objects_with_non_string_values_are_rejected": 51,
    "test_host_signals_read_again_after_a_restart_neither_end_nor_reopen_an_episode": 43,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow modules first (see SLOW_MODULES); the same order in every xdist worker."""
    position = {id(item): n for n, item in enumerate(items)}

    def key(item: pytest.Item) -> tuple[float, str, float, int]:
        module = item.nodeid.split("::", 1)[0]
        return (
            -SLOW_MODULES.get(module, 0),
            module if module in SLOW_MODULES else "",
            -SLOW_TESTS.get(item.nodeid.split("::", 1)[-1], 0),
            position[id(item)],
        )

    items.sort(key=key)
