"""`gate.clock_tolerance` is deprecated: the gate judges by its own clock only. A settings file
written for an older version still loads, with one clear warning naming the field."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fencing import settings_sections
from fencing.settings import FencerSettings, SettingsError, load_settings

FENCER = Path(sys.executable).parent / "fencer"


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a new process: the warning not told yet, no FENCER_ variable of the calling shell."""
    monkeypatch.setattr(settings_sections, "_told_deprecated", set())
    for name in list(os.environ):
        if name.upper().startswith("FENCER_"):
            monkeypatch.delenv(name)


def test_a_file_that_sets_clock_tolerance_loads_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "fencer.yaml"
    path.write_text("gate:\n  clock_tolerance: 300\n")
    with caplog.at_level(logging.WARNING):
        settings = load_settings(path)
        load_settings(path)  # loaded again (a reload): not told again
        FencerSettings(gate={"clock_tolerance": 8.0})
    assert settings.gate.clock_tolerance is None  # accepted, ignored
    told = [r for r in caplog.records if "clock_tolerance" in r.getMessage()]
    assert len(told) == 1, [r.getMessage() for r in caplog.records]
    assert told[0].levelno == logging.WARNING and told[0].exc_info is None
    assert told[0].getMessage().startswith("gate.clock_tolerance is deprecated and ignored")


def test_settings_without_it_say_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert FencerSettings().gate.clock_tolerance is None
        FencerSettings(gate={})
    assert not [r for r in caplog.records if "clock_tolerance" in r.getMessage()]


def test_a_value_that_is_no_number_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "fencer.yaml"
    path.write_text("gate:\n  clock_tolerance: soon\n")
    with pytest.raises(SettingsError, match=r"gate\.clock_tolerance"):
        load_settings(path)


def test_config_check_prints_the_warning_once_and_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "fencer.yaml"
    path.write_text("gate:\n  clock_tolerance: 300\n")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FENCER_")}
    proc = subprocess.run(
        [str(FENCER), "config", "check", "--skip-files", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    told = [line for line in proc.stderr.splitlines() if "gate.clock_tolerance" in line]
    assert len(told) == 1 and "deprecated and ignored" in told[0], proc.stderr
    assert "Traceback" not in proc.stderr
