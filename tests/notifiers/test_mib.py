"""FENCER-MIB passes smilint and says what the code sends (checked with net-snmp's parser)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from notifier_peers import MIB_DIR

from fencing.events import NoticeKind
from notifiers.render import FENCER_OID, KINDS, OBJECT_NUMBERS
from notifiers.snmp import mib_file

pytestmark = pytest.mark.timeout(60)

MIB = MIB_DIR / "FENCER-MIB.txt"
NOTIFICATION_NAMES = {
    NoticeKind.FENCE_DECIDED: "fencerFenceDecided",
    NoticeKind.FENCE_WITHHELD: "fencerFenceWithheld",
    NoticeKind.FENCE_SUCCEEDED: "fencerFenceSucceeded",
    NoticeKind.FENCE_FAILED: "fencerFenceFailed",
    NoticeKind.CANNOT_VERIFY: "fencerCannotVerify",
    NoticeKind.PREFLIGHT_FAILED: "fencerPreflightFailed",
    NoticeKind.HOST_RECOVERED: "fencerHostRecovered",
    NoticeKind.CLOCK_SKEW: "fencerClockSkew",
    NoticeKind.SUSPECT_TOO_LONG: "fencerSuspectTooLong",
    NoticeKind.FORGED_RECORD: "fencerForgedRecord",
    NoticeKind.FENCE_REFUSED: "fencerFenceRefused",
    NoticeKind.VMS_NOT_RESTARTED: "fencerVmsNotRestarted",
    NoticeKind.BMC_IDENTITY_CHANGED: "fencerBmcIdentityChanged",
    NoticeKind.LOGIN_BURST: "fencerLoginBurst",
    NoticeKind.BLOCKLIST_LIFTED: "fencerBlocklistLifted",
    NoticeKind.BLOCKLIST_NOT_LIFTED: "fencerBlocklistNotLifted",
    NoticeKind.DECISION_LOG_UNREAD: "fencerDecisionLogUnread",
}


def smilint(level: int, ietf_mib_dir: Path) -> list[str]:
    out = subprocess.run(
        ["smilint", "-l", str(level), "-m", str(MIB)],
        env={**os.environ, "SMIPATH": f"{ietf_mib_dir}:{MIB_DIR}"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    return (out.stdout + out.stderr).splitlines()


def test_smilint_reports_nothing_for_fencer_mib_even_at_level_9(ietf_mib_dir: Path) -> None:
    # Lines about the IETF base modules are libsmi's quarrels with those files, not ours.
    lines = smilint(9, ietf_mib_dir)
    ours = [ln for ln in lines if "FENCER-MIB" in ln]
    assert ours == []
    assert not any("failed to locate" in ln for ln in lines), lines


def test_smilint_would_see_an_error(ietf_mib_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "FENCER-MIB.txt"
    broken.write_text(MIB.read_text().replace("{ fencerObjects 15 }", "{ fencerObjects 14 }"))
    out = subprocess.run(
        ["smilint", "-l", "3", "-m", str(broken)],
        env={**os.environ, "SMIPATH": str(ietf_mib_dir)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "FENCER-MIB" in out.stdout + out.stderr


def translate(ietf_mib_dir: Path, *names: str) -> list[str]:
    out = subprocess.run(
        ["snmptranslate", "-M", f"{ietf_mib_dir}:{MIB_DIR}", "-m", "FENCER-MIB", "-On", *names],
        env={**os.environ, "MIBS": ""},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout.split()


def test_net_snmp_loads_the_mib_and_oids_match_the_code(ietf_mib_dir: Path) -> None:
    dotted = ".".join(map(str, FENCER_OID))
    objects = list(OBJECT_NUMBERS)
    got = translate(ietf_mib_dir, "FENCER-MIB::fencerMIB", *(f"FENCER-MIB::{o}" for o in objects))
    assert got == [f".{dotted}"] + [f".{dotted}.1.{OBJECT_NUMBERS[o]}" for o in objects]
    kinds = list(NOTIFICATION_NAMES)
    got = translate(ietf_mib_dir, *(f"FENCER-MIB::{NOTIFICATION_NAMES[k]}" for k in kinds))
    assert got == [f".{dotted}.0.{KINDS[k][2]}" for k in kinds]
    assert set(kinds) == set(NoticeKind)


def test_the_package_finds_its_mib() -> None:
    assert mib_file().read_text() == MIB.read_text()
