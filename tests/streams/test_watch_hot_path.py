"""The watch's hot-path memos (streams.watch): a row unpacked once per identity, a policy built
once per settings object; neither may hand out a stale answer."""

from __future__ import annotations

import pytest

from fencing.events import HostDisconnected, HostStatus, ProbeFinished, Tick
from fencing.records import HostRef
from fencing.settings import ClusterSettings, FencerSettings, PolicySettings
from streams import watch
from streams.codec import HostInput, unpack_row

HOST = "7650a66e-54c1-4a0e-9b7d-7865250dc275"
REF = HostRef(host_uuid=HOST, cluster_uuid="c1")


def test_each_new_row_is_unpacked_afresh_and_equals_unpack_row():
    settings = FencerSettings(policy=PolicySettings(check_interval=1, startup_quiet=0))
    policy, topics = settings.policy.to_policy(), settings.kafka.topics
    row, _ = watch.apply(None, HostInput(HostDisconnected(0.0, HostStatus.DISCONNECTED), REF),
                         HOST, policy, settings, topics)  # fmt: skip
    rows = [row]
    for event in (Tick(1.0), ProbeFinished(at=1.2, episode=1, check=1, mtimes=(("/d", 1.0),),
                                           complete=True), Tick(3.0)):  # fmt: skip
        row, _ = watch.apply(row, HostInput(event), HOST, policy, settings, topics)
        rows.append(row)
    for r in rows:
        assert watch._unpacked(r) == unpack_row(r)
        assert watch._unpacked(r) is watch._unpacked(r)  # remembered
    # an equal row that is another object is unpacked again, to the same content
    twin = [*rows[-1][:-1], list(rows[-1][-1])]
    assert watch._unpacked(twin) == watch._unpacked(rows[-1])
    assert watch._unpacked(twin) is not watch._unpacked(rows[-1])
    assert [watch._unpacked(r)[0]["checks_requested"] for r in rows] == [0, 1, 1, 2]


def test_a_row_of_no_known_version_still_raises_every_time():
    for _ in range(2):
        with pytest.raises(ValueError, match="unknown version"):
            watch._unpacked([9, ["suspect"], []])


def test_the_policy_follows_replaced_settings_and_cluster_overrides():
    a = FencerSettings(policy=PolicySettings(check_interval=10))
    assert watch.policy_for(a, "c1") == a.policy_for("c1")
    assert watch.policy_for(a, "c1") is watch.policy_for(a, "c1")
    # the live settings replaced (as the settings topic does): the new values at once
    b = a.model_copy(update={"clusters": {"c1": ClusterSettings(fence_cap=1)}})
    assert watch.policy_for(b, "c1").fence_cap == 1
    assert watch.policy_for(b, "c2") == b.policy_for("c2")
    assert watch.policy_for(a, "c1").fence_cap == a.policy_for("c1").fence_cap != 1


async def test_a_record_the_producer_could_not_deliver_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The hot path hands records to the app's producer directly (streams.app `produce`): a
    delivery that fails after the enqueue is logged with its topic, as Faust's Topic.send logs
    it; a delivered one and a cancelled one are told apart."""
    import asyncio

    from aiokafka.errors import KafkaTimeoutError

    from streams.app import _delivery_failed

    loop = asyncio.get_running_loop()
    failed, delivered, cancelled = loop.create_future(), loop.create_future(), loop.create_future()
    failed.set_exception(KafkaTimeoutError("batch expired"))
    delivered.set_result(object())
    cancelled.cancel()
    with caplog.at_level("WARNING", logger="fencer.app"):
        for name, fut in (("t-failed", failed), ("t-ok", delivered), ("t-cancel", cancelled)):
            _delivery_failed(name, fut)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "a record for t-failed was not delivered: KafkaTimeoutError: batch expired",
        "a record for t-cancel was not delivered: the send was cancelled",
    ], lines
