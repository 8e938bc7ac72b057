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


def test_a_table_row_is_encoded_once_per_write_and_each_row_reads_back_as_written():
    """Faust encodes a table write twice, back to back (the changelog record, then the store's
    value): the second encode of the same row object gets the first's bytes, once; every other
    encode is done afresh, so interleaved rows and a row encoded again later are each their own
    JSON. The gates codec reads what Faust's own json codec wrote before."""
    import json

    from faust.serializers import codecs

    from streams.tables import gate_row_serializer, host_row_serializer

    for name in (gate_row_serializer(), host_row_serializer()):
        codec = codecs.get_codec(name)
        a = {"clock": 1.5, "grants": [{"decision_id": "d1", "host": "h1", "at": 2.0}], "x": None}
        b = {"clock": 2.5, "grants": [], "paused": True}
        first = codec.dumps(a)
        assert codec.dumps(a) is first  # the store's encode right after the changelog's
        again = codec.dumps(a)
        assert again == first and again is not first  # used once: encoded afresh
        for row in (a, b, a, b, b):  # other rows between: each is its own JSON
            assert json.loads(codec.dumps(row)) == row
        c = {**b, "clock": 3.5}  # an equal-looking new row object is encoded afresh
        assert json.loads(codec.dumps(c)) == c
        assert codec.loads(codec.dumps(a)) == a
    gates = codecs.get_codec(gate_row_serializer())
    legacy = codecs.get_codec("json").dumps({"clock": 1.0, "grants": [], "paused": False})
    assert gates.loads(legacy) == {"clock": 1.0, "grants": [], "paused": False}


def test_the_gate_rows_json_fast_path_gives_the_generic_output():
    """The shared row's grants go to JSON without the generic field loop (streams.gating): the
    same keys, order and values, -inf as null, an int stamp kept as it is."""
    import dataclasses
    import json
    from enum import Enum

    from fencing import gate as gatecore
    from fencing.events import FenceAction, WithheldReason
    from streams import gating

    def generic(obj):  # the rule the rows were written by before the fast path
        if isinstance(obj, frozenset):
            return sorted(obj)
        if isinstance(obj, tuple):
            return [generic(x) for x in obj]
        if dataclasses.is_dataclass(obj):
            return {f.name: generic(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, Enum):
            return obj.value
        if obj == float("-inf"):
            return None
        return obj

    grants = (
        gatecore.Grant("d1", "h1", "c1", 1.5),
        gatecore.Grant("d2", "h2", "c1", float("-inf")),
        gatecore.Grant("d3", "h3", "c2", 7),
    )
    verdict = gatecore.Verdict(
        "d1", "h1", "c1", FenceAction.STOP, 1.0, False, WithheldReason.CAP_REACHED, 1, 2, True
    )
    rows = [
        gatecore.GlobalGate(paused=True, clock=3.0, grants=grants, clock_id="k"),
        gatecore.GlobalGate(),
        gatecore.ClusterGate("c1", 4, frozenset({"h2", "h1"}), False, 2.0, grants, (verdict,)),
    ]
    for row in rows:
        fast = gating._jsonable(row)
        assert json.dumps(fast) == json.dumps(generic(row))
    assert type(gating._jsonable(grants)[2]["at"]) is int


def test_the_fence_action_follows_replaced_settings_and_host_and_cluster_overrides():
    from fencing.events import FenceAction
    from fencing.settings import HostSettings, IpmiOverrides, IpmiSettings

    a = FencerSettings(defaults=IpmiSettings(action=FenceAction.STOP))
    assert watch.fence_action(a, "h1", "c1") == a.effective_ipmi("h1", "c1").values.action
    assert watch.fence_action(a, "h1", "c1") is watch.fence_action(a, "h1", "c1")
    b = a.model_copy(
        update={
            "hosts": {"h1": HostSettings(ipmi=IpmiOverrides(action=FenceAction.NOTHING))},
            "clusters": {"c2": ClusterSettings(ipmi=IpmiOverrides(action=FenceAction.REBOOT))},
        }
    )
    for host, cluster in (("h1", "c1"), ("h2", "c1"), ("h2", "c2"), ("h1", None)):
        assert watch.fence_action(b, host, cluster) == b.effective_ipmi(host, cluster).values.action
    assert watch.fence_action(b, "h1", "c1") == FenceAction.NOTHING
    assert watch.fence_action(b, "h2", "c2") == FenceAction.REBOOT
    assert watch.fence_action(a, "h1", "c1") == FenceAction.STOP
