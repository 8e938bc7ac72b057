"""Signed decisions and settings: any change to a signed record is refused, keys rotate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import SecretStr

from fencing.events import FenceAction
from fencing.records import EvidenceSummary, FenceDecision, HostRef
from fencing.settings import FencerSettings, SigningSettings, load_settings
from fencing.signing import (
    DECISION,
    SETTINGS,
    KeyringError,
    SignatureError,
    load_keyring,
    new_key_line,
    parse_keys,
    sign,
    verify,
    verify_bytes,
    write_keys_file,
)

OLD = "k2025 " + "o" * 40
NEW = "k2026 " + "n" * 40


def decision() -> FenceDecision:
    return FenceDecision(
        decision_id="host-1/3",
        host=HostRef(host_uuid="host-1", host_name="kvm01", cluster_uuid="c1"),
        episode=3,
        action=FenceAction.STOP,
        approved=True,
        evidence=EvidenceSummary(suspect_since=1764400000.25, stale_checks=3, files_checked=4),
        decided_at=1764400123.5,
        budget_used=1,
        budget_cap=3,
    )


def signed_bytes(ring_text: str = OLD) -> bytes:
    ring = parse_keys(ring_text, "test")
    signed = sign(ring, DECISION, decision().model_dump(mode="json"))
    # As the gate sends it: the pydantic model's JSON.
    return FenceDecision.model_validate(signed).model_dump_json().encode()


def test_a_signed_decision_verifies_and_round_trips() -> None:
    ring = parse_keys(OLD, "test")
    body = verify_bytes(ring, DECISION, signed_bytes())
    assert FenceDecision.model_validate(body) == decision()


def test_tampering_with_any_byte_is_refused() -> None:
    ring = parse_keys(OLD, "test")
    value = signed_bytes()
    refused = 0
    for i in range(len(value)):
        for flip in (0x01, 0x20):
            tampered = bytearray(value)
            tampered[i] ^= flip
            with pytest.raises(SignatureError):
                verify_bytes(ring, DECISION, bytes(tampered))
            refused += 1
    assert refused == 2 * len(value)


@pytest.mark.parametrize(
    "change",
    [
        {"host": {"host_uuid": "host-2", "host_name": "kvm01", "cluster_uuid": "c1"}},
        {"episode": 4},
        {"decision_id": "host-1/4"},
        {"decided_at": 1764400999.5},
        {"action": "reboot"},
        {"extra": "field"},
    ],
)
def test_a_changed_field_is_refused(change: dict[str, object]) -> None:
    ring = parse_keys(OLD, "test")
    record = json.loads(signed_bytes())
    record.update(change)
    with pytest.raises(SignatureError, match="bad signature"):
        verify(ring, DECISION, record)


def test_unsigned_and_malformed_are_refused() -> None:
    ring = parse_keys(OLD, "test")
    with pytest.raises(SignatureError, match="unsigned"):
        verify_bytes(ring, DECISION, decision().model_dump_json().encode())
    with pytest.raises(SignatureError, match="not JSON"):
        verify_bytes(ring, DECISION, b"\xff{")
    with pytest.raises(SignatureError, match="empty"):
        verify_bytes(ring, DECISION, None)
    with pytest.raises(SignatureError, match="not a JSON object"):
        verify_bytes(ring, DECISION, b"[1]")
    record = json.loads(signed_bytes())
    record["signature"]["alg"] = "none"
    with pytest.raises(SignatureError, match="unsupported algorithm"):
        verify(ring, DECISION, record)
    record["signature"] = "abc"
    with pytest.raises(SignatureError, match="malformed"):
        verify(ring, DECISION, record)


def test_a_signature_for_another_purpose_is_refused() -> None:
    ring = parse_keys(OLD, "test")
    as_settings = sign(ring, SETTINGS, decision().model_dump(mode="json"))
    with pytest.raises(SignatureError, match="bad signature"):
        verify(ring, DECISION, as_settings)


def test_rotation_first_key_signs_every_key_verifies() -> None:
    old_only = parse_keys(OLD, "test")
    both = parse_keys(f"{NEW}\n{OLD}\n", "test")
    signed_old = json.loads(signed_bytes(OLD))
    signed_new = json.loads(signed_bytes(f"{NEW}\n{OLD}"))
    assert signed_new["signature"]["key_id"] == "k2026"
    # After rotation a record signed with the old key still verifies, and the new one too.
    assert verify(both, DECISION, signed_old)["decision_id"] == "host-1/3"
    assert verify(both, DECISION, signed_new)["decision_id"] == "host-1/3"
    # A worker that has not got the new key yet refuses the new key's records by key id.
    with pytest.raises(SignatureError, match="unknown key id 'k2026'"):
        verify(old_only, DECISION, signed_new)


def test_an_unknown_key_id_and_another_secret_are_refused() -> None:
    mine = parse_keys(OLD, "test")
    other_secret_same_id = parse_keys("k2025 " + "x" * 40, "test")
    forged = sign(other_secret_same_id, DECISION, decision().model_dump(mode="json"))
    with pytest.raises(SignatureError, match="bad signature"):
        verify(mine, DECISION, forged)
    stranger = sign(parse_keys("evil " + "x" * 40, "t"), DECISION, decision().model_dump())
    with pytest.raises(SignatureError, match="unknown key id 'evil'"):
        verify(mine, DECISION, stranger)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no signing key"),
        ("# only a comment\n", "no signing key"),
        ("k1", "expected 'KEY_ID SECRET'"),
        ("k1 short", "shorter than 32"),
        (f"{OLD}\n{OLD}", "appears twice"),
    ],
)
def test_bad_key_files_name_the_line(text: str, message: str) -> None:
    with pytest.raises(KeyringError, match=message):
        parse_keys(text, "signing.keys_file (x)")


def test_keys_come_from_the_file_or_the_secret_never_shown(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match=r"signing\.keys_file is not set"):
        load_keyring(FencerSettings())
    path = write_keys_file(tmp_path / "keys", "k1")
    assert path.stat().st_mode & 0o777 == 0o600
    ring = load_keyring(FencerSettings(signing=SigningSettings(keys_file=path)))
    assert ring.signing_key_id == "k1"
    secret = path.read_text().split()[1]
    assert secret not in repr(ring)
    inline = FencerSettings(signing=SigningSettings(keys=SecretStr(new_key_line("k9"))))
    assert load_keyring(inline).signing_key_id == "k9"
    with pytest.raises(KeyringError, match=r"cannot read signing\.keys_file"):
        load_keyring(FencerSettings(signing=SigningSettings(keys_file=tmp_path / "missing")))


def test_driver_fake_is_refused_outside_the_lab(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("defaults:\n  driver: fake\n")
    with pytest.raises(Exception, match=r"defaults.driver: driver fake .* lab: true"):
        load_settings(f)
    f.write_text("lab: true\ndefaults:\n  driver: fake\n")
    assert load_settings(f).lab is True
    f.write_text("hosts:\n  h1:\n    ipmi:\n      driver: fake\n")
    with pytest.raises(Exception, match=r"hosts.h1.ipmi.driver"):
        load_settings(f)


def test_the_consumer_group_ignores_the_order_of_roles() -> None:
    roles = ("ingest", "probe", "actuate", "notify")
    s = FencerSettings()
    assert s.group_for(("probe", "ingest"), roles) == s.group_for(("ingest", "probe"), roles)
    assert s.group_for(("notify", "actuate", "probe", "ingest"), roles) == "fencer"
    pinned = FencerSettings.model_validate(
        {"kafka": {"role_groups": {"notify, actuate": "fencer-act"}}}
    )
    assert pinned.group_for(("actuate", "notify"), roles) == "fencer-act"
    assert pinned.group_for(("actuate",), roles) == "fencer-actuate"


def test_keys_can_come_from_the_secrets_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = tmp_path / "run-secrets"
    secrets.mkdir()
    (secrets / "signing__keys").write_text(f"{NEW}\n{OLD}\n")
    monkeypatch.setenv("FENCER_SECRETS_DIR", str(secrets))
    settings = load_settings(None)
    ring = load_keyring(settings)
    assert [k for k, _ in ring.keys] == ["k2026", "k2025"]
    assert "n" * 40 not in repr(settings) and "n" * 40 not in repr(ring)
