"""review4: settings changed between the decision and the action. The operator turns a host's
fence action from stop to nothing (or blink) after the gate signed a decision to stop it: the
actuator runs the signed decision's action, so the host is powered off anyway, while every
other setting (driver, address, storage rung, restart) is read live at action time.
ARCHITECTURE.md step 6 says the actuator "runs the host's effective action"; an operator who
just chose "nothing" expects no power-off. Fixed (fencing/actuator.py `_act`): the live action
wins when it is the gentler one (it does not power the host down), never the other way round."""

from __future__ import annotations

import pytest

from fencing.events import FenceAction
from lab.bmc import BmcSimulator

from .conftest import Cloud
from .test_actuator import actuator, decision, make_settings

pytestmark = pytest.mark.timeout(60)


async def test_an_action_changed_to_nothing_after_the_decision_powers_nothing_off(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    live = make_settings(cloud, bmc.port, action="nothing")  # changed after the decision
    out = await actuator(live).handle(decision(cloud, FenceAction.STOP))
    assert out is not None
    assert bmc.power == "on" and bmc.count("power_off") == 0


async def test_an_action_raised_to_stop_after_a_blink_decision_still_only_blinks(
    cloud: Cloud, bmc: BmcSimulator
) -> None:
    """Never the other way round: a decision the gate signed to blink (not counted against the
    cap as a power-down) is not turned into a power-off by a later setting."""
    live = make_settings(cloud, bmc.port, action="stop")
    out = await actuator(live).handle(decision(cloud, FenceAction.BLINK))
    assert out is not None
    assert bmc.power == "on" and bmc.count("power_off") == 0
