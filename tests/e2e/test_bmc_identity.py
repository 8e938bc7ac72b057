"""End to end: a host's BMC is swapped for another board (its system GUID changes) after an
operator pinned it; the host then crashes. A real `fencer worker` decides to fence, reads the
GUID, refuses to power anything off, and mails and traps BMC-IDENTITY-CHANGED; the operator
confirms the new board with `fencer ipmi pin`, and the next crash of the host is fenced.

Real peers only: the lab cloud (CloudStack simulator, SSH hosts, pyghmi BMCs, mail and trap
receivers) on the session broker, the worker and the CLI as subprocesses.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from lab.cloud import LabCloud
from lab.demo import Run
from streams.broker import EmbeddedBroker

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]


def fencer_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streams.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


async def test_swapped_bmc_is_never_powered_off_until_an_operator_pins_it(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    async with LabCloud(broker, root=tmp_path / "lab", hosts=4, interval=0.5) as lab:
        run = Run("bmc-swapped", lab, tmp_path, True, None)
        try:
            await run.start()
            assert run.file is not None
            host, cluster = lab.host("kvm03").uuid, lab.cloud.hosts[lab.host("kvm03").uuid]
            old_guid = lab.bmcs["kvm03"].guid
            pinned = await asyncio.to_thread(
                fencer_cli, "ipmi", "pin", host, "--cluster", cluster.cluster_uuid, "-c",
                str(run.file),
            )  # fmt: skip
            assert pinned.returncode == 0, pinned.stderr
            assert old_guid in pinned.stdout

            new_guid = str(uuid.uuid4())
            lab.bmcs["kvm03"].guid = new_guid  # another board behind the BMC's address
            await lab.crash("kvm03")
            await run.wait(lambda: run.outcomes("kvm03"), run.fence_deadline + 40, "an outcome")
            await run.wait(
                lambda: (
                    any(t.kind == "bmc_identity_changed" for t in lab.traps.traps)
                    and any("BMC-IDENTITY-CHANGED" in m.subject for m in lab.mail.mails)
                ),
                20,
                "the BMC identity mail and trap",
            )
            refused = run.outcomes("kvm03")
            assert refused and not any(o.get("success") for o in refused)
            assert all("BMC identity changed" in (o.get("error") or "") for o in refused)
            assert new_guid in refused[0]["error"] and old_guid in refused[0]["error"]
            assert lab.bmc_power_offs("kvm03") == 0 and lab.bmcs["kvm03"].power == "on"
            assert lab.degraded_calls("kvm03") == [] and lab.restarted_elsewhere("kvm03") == []
            assert run.notices("bmc_identity_changed", "kvm03")

            # The operator checks the machine and confirms the new board; the host comes back
            # and crashes again: this time it is fenced through the confirmed BMC.
            confirmed = await asyncio.to_thread(
                fencer_cli, "ipmi", "pin", host, "--cluster", cluster.cluster_uuid, "--expect",
                new_guid, "-c", str(run.file),
            )  # fmt: skip
            assert confirmed.returncode == 0, confirmed.stderr

            def ups() -> int:
                signals = run._of(run.settings.kafka.topics.host_signals)
                return sum(
                    s.get("kind") == "up" and s["host"]["host_uuid"] == host for s in signals
                )

            before = ups()
            await lab.recovers("kvm03")
            await run.wait(lambda: ups() > before, 30, "kvm03 Up again")
            await lab.crash("kvm03")
            await run.wait(
                lambda: any(o.get("success") for o in run.outcomes("kvm03")),
                run.fence_deadline + 40,
                "kvm03 fenced after the pin",
            )
            assert lab.bmc_power_offs("kvm03") == 1
        finally:
            await run.stop()


async def test_preflight_on_by_default_pins_hosts_while_up_then_fences_through_that_pin(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """With the product's default settings the actuate leader reads every BMC soon after it
    starts: each host is pinned while CloudStack shows it Up and its chassis reads on, not at
    its first fence (when nothing could tell its BMC from another machine's). The crashed host
    is then fenced through that pin, which stays as the pre-flight wrote it."""
    from fencing.settings import ActuatorSettings
    from streams.bmc_pins import BmcPinStore

    async with LabCloud(broker, root=tmp_path / "lab", hosts=4, interval=0.5) as lab:
        run = Run("preflight-default", lab, tmp_path, True, None)
        pins: BmcPinStore | None = None
        try:
            await run.start()
            default = ActuatorSettings.model_fields["preflight_interval"].default
            assert default > 0 and run.settings.actuator.preflight_interval == default
            pins = BmcPinStore(run.settings, client_id="test-pins", read_only=True)
            await pins.start()
            names = lab.names()
            store = pins

            def pinned() -> dict[str, Any]:
                got = {n: store.get(lab.host(n).uuid) for n in names}
                return got if all(got.values()) else {}

            got = await run.wait(pinned, 60, "every host pinned by the pre-flight")
            for name, pin in got.items():
                assert pin.pinned_by == "preflight" and pin.guid == lab.bmcs[name].guid, name
                assert lab.cloud.hosts[lab.host(name).uuid].state == "Up"
            assert run.notices("preflight_failed") == []
            before = got["kvm02"]

            await lab.crash("kvm02")
            await run.wait(
                lambda: any(o.get("success") for o in run.outcomes("kvm02")),
                run.fence_deadline + 40,
                "kvm02 fenced",
            )
            assert lab.bmc_power_offs("kvm02") == 1 and lab.bmcs["kvm02"].power == "off"
            assert store.get(lab.host("kvm02").uuid) == before  # fenced through that pin
            assert all(lab.bmc_power_offs(n) == 0 for n in names if n != "kvm02")
        finally:
            if pins is not None:
                await pins.stop()
            await run.stop()
