"""`fencer config check` warns (never refuses) when the stale checks after the first span less
than twice NFS's default attribute cache lifetime (120 s): where a neighbour's stat is answered
from the cache (a `nocto` mount, or a disk the probe user cannot open), a live VM's writes can
stay unseen for up to acregmax."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fencing.settings import FencerSettings, settings_warnings

FENCER = Path(sys.executable).parent / "fencer"


def _cache_warnings(**policy: float) -> list[str]:
    s = FencerSettings(ssh={"known_hosts": "/etc/fencer/known_hosts"}, policy=policy)
    return [w for w in settings_warnings(s) if "NFS attribute cache" in w]


@pytest.mark.parametrize(
    ("policy", "window"),
    [
        ({"check_interval": 20.0}, "40"),
        ({"check_interval": 59.0}, "118"),
        ({"check_interval": 60.0, "extra_checks": 1}, "60"),
        ({"check_interval": 600.0, "extra_checks": 0}, "0"),
    ],
)
def test_a_short_window_warns_naming_the_fields_and_the_reason(policy, window):
    (w,) = _cache_warnings(**policy)
    assert w.startswith(f"policy.check_interval x policy.extra_checks is {window} s, below 120 s")
    assert "acregmax" in w and "nocto" in w and "cannot open" in w


@pytest.mark.parametrize(
    "policy",
    [{}, {"check_interval": 40.0, "extra_checks": 3}, {"check_interval": 30.0, "extra_checks": 5}],
)
def test_a_window_of_120_s_or_more_does_not_warn(policy):
    assert _cache_warnings(**policy) == []


def test_the_lab_has_no_nfs_client_and_is_not_warned():
    lab = FencerSettings(lab=True, policy={"check_interval": 1.0})
    assert not [w for w in settings_warnings(lab) if "attribute cache" in w]


def test_config_check_prints_it_and_still_accepts_the_file(tmp_path):
    path = tmp_path / "fencer.yaml"
    path.write_text(
        "ssh:\n  known_hosts: /etc/fencer/known_hosts\n"
        "policy:\n  check_interval: 20\n  extra_checks: 2\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FENCER_")}
    proc = subprocess.run(
        [str(FENCER), "config", "check", "--skip-files", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr  # a warning, never a refusal
    told = [line for line in proc.stderr.splitlines() if "policy.check_interval x" in line]
    assert len(told) == 1 and told[0].startswith("warning: "), proc.stderr
    assert '"check_interval": 20' in proc.stdout
