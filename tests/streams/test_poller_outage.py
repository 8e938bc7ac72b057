"""A listHosts outage is told, repeatedly, never only logged (streams/poller.py).

With CloudStack's API down, no host coming back is seen and every fence is refused (CloudStack
cannot confirm the host down); with no host suspect, nothing else would tell anyone. Against
the CloudStack simulator over real HTTP: first answering, then stopped (connection refused),
then answering again."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from fencing.events import NoticeKind
from fencing.records import Notice
from fencing.settings import CloudStackSettings, FencerSettings, SigningSettings
from fencing.signing import new_key_line
from lab.cloudstack_sim import CloudStackSimulator, SimCloud
from probes.inventory import Inventory
from streams.poller import HostDirectory, Poller


async def test_a_listhosts_outage_is_told_after_three_failed_polls_and_again_each_period() -> None:
    sc = SimCloud()
    cluster = sc.add_cluster(sc.add_zone())
    sc.add_host(cluster, "hv1", "10.0.0.11")
    sim = CloudStackSimulator(sc)
    await sim.start()
    settings = FencerSettings(
        cloudstack=CloudStackSettings(
            endpoint=sim.url,
            api_key=SecretStr(sim.api_key),
            secret_key=SecretStr(sim.secret_key),
            timeout=1,
        )
    )
    inventory = Inventory(settings)
    now = 1000.0
    told: list[Notice] = []

    async def notify(n: Notice) -> None:
        told.append(n)

    poller = Poller(lambda: inventory, HostDirectory(), clock_id="P", clock=lambda: now)
    poller.notify = notify
    poller.outage_renotify = 600.0
    try:
        signals, _ = await poller.poll()
        assert [s.kind for s in signals] == ["maintenance_ended", "up"]
        await sim.stop()  # the management server goes away
        for _ in range(2):
            now += 30
            assert await poller.poll() == ([], [])
        assert told == []  # two failed polls: logged only
        now += 30
        await poller.poll()
        assert [n.kind for n in told] == [NoticeKind.CANNOT_VERIFY]
        assert "3 poll(s) in a row for 60 s" in (told[0].reason or "")
        assert "every fence is refused" in (told[0].reason or "")
        for _ in range(19):  # 570 s more: within the renotify period, no repeat
            now += 30
            await poller.poll()
        assert len(told) == 1
        now += 30  # 600 s after the first notice: told again, under a new id
        await poller.poll()
        assert len(told) == 2 and told[1].notice_id != told[0].notice_id
        assert all(sim.api_key not in n.model_dump_json() for n in told)
        await sim.start()  # (a new port: point the client at it)
        inventory.cloudstack.settings = inventory.cloudstack.settings.model_copy(
            update={"endpoint": sim.url}
        )
        await inventory.close()
        now += 30
        await poller.poll()
        assert poller.failures == 0 and poller.outage_told is None
        await sim.stop()  # a new outage is told again from its third failed poll
        for _ in range(3):
            now += 30
            await poller.poll()
        assert len(told) == 3 and told[2].notice_id.split("/")[2] != told[0].notice_id.split("/")[2]
    finally:
        await inventory.close()
        await sim.stop()


@pytest.mark.parametrize("roles", [("ingest",), ("ingest", "probe"), ("actuate",)])
def test_every_worker_that_notices_has_somewhere_to_send_it(
    roles: tuple[str, ...], tmp_path: Path
) -> None:
    """The poller's listHosts outage and the gate's decision-log tail run in the ingest role:
    a worker without the actuate role sent them nowhere (logged as "has nowhere to go")."""
    from streams.app import create_app

    s = FencerSettings(
        data_dir=tmp_path,
        signing=SigningSettings(keys=SecretStr(new_key_line("notice-sink-test"))),
        kafka={"table_store": "memory"},
    )
    app = create_app(s, roles)
    assert app.fencer_runtime.notice_sink is not None  # type: ignore[attr-defined]
