"""Signed records: only fencer's own gate and settings store can tell the actuator what to do.

Rule: a record is trusted only if its `signature` is an HMAC-SHA256, under a key this worker
holds, of the record's canonical JSON without the signature, prefixed with what the record is
for (a signed settings record can never pass as a fence decision). Keys come from a file or a
secret named in the settings (`signing.keys_file`, `signing.keys`), never from a topic. Several
keys may be active: the first signs, any verifies, so keys rotate without a flag day.

    ring = load_keyring(settings)            # KeyringError names the setting when none
    value = sign(ring, DECISION, record)     # record + {"signature": {...}}
    verify(ring, DECISION, value)            # the record without its signature, or SignatureError

Exceptions:

    SigningError
     ├── KeyringError     no key, unreadable file, a malformed or too short key
     └── SignatureError   unsigned, unknown key id, bad MAC, not a JSON object
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fencing.settings import FencerSettings, SigningSettings

DECISION = "fencer.fence-decision.v1"
SETTINGS = "fencer.settings.v1"
CLAIM = "fencer.fence-claim.v1"  # streams.claims: the actuators' fence-claims log
BMC_PIN = "fencer.bmc-pin.v1"  # streams.bmc_pins: a host's pinned BMC system GUID
BMC_UNPIN = "fencer.bmc-unpin.v1"  # streams.bmc_pins: the removal a pin's tombstone carries
ALGORITHM = "HMAC-SHA256"
MIN_SECRET = 32
SIGNATURE_FIELD = "signature"


class SigningError(Exception):
    """A signing problem; the message never carries a key."""


class KeyringError(SigningError):
    """No usable signing key: the message names the setting."""


class SignatureError(SigningError):
    """The record is not signed by a key this worker holds."""


@dataclass(frozen=True)
class Keyring:
    """Active keys in order: the first signs, every one verifies."""

    keys: tuple[tuple[str, bytes], ...]

    @property
    def signing_key_id(self) -> str:
        return self.keys[0][0]

    def secret(self, key_id: str) -> bytes | None:
        for kid, secret in self.keys:
            if kid == key_id:
                return secret
        return None

    def __repr__(self) -> str:  # never the secrets
        return f"Keyring({', '.join(k for k, _ in self.keys)})"


def parse_keys(text: str, where: str) -> Keyring:
    """Lines `KEY_ID SECRET` (blank lines and # comments ignored); raise KeyringError."""
    keys: list[tuple[str, bytes]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise KeyringError(f"{where} line {n}: expected 'KEY_ID SECRET'")
        kid, secret = parts
        if len(secret) < MIN_SECRET:
            raise KeyringError(
                f"{where} line {n}: key {kid} is shorter than {MIN_SECRET} characters"
            )
        if any(k == kid for k, _ in keys):
            raise KeyringError(f"{where} line {n}: key id {kid} appears twice")
        keys.append((kid, secret.encode()))
    if not keys:
        raise KeyringError(f"{where}: no signing key in it")
    return Keyring(tuple(keys))


def load_keyring(settings: FencerSettings | SigningSettings) -> Keyring:
    """The signing keys the settings name; KeyringError (naming the setting) if there are none."""
    s = settings.signing if isinstance(settings, FencerSettings) else settings
    if s.keys is not None and s.keys.get_secret_value().strip():
        return parse_keys(s.keys.get_secret_value(), "signing.keys")
    if s.keys_file is not None:
        where = f"signing.keys_file ({s.keys_file})"
        try:
            text = Path(s.keys_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise KeyringError(f"cannot read {where}: {exc.strerror}") from None
        return parse_keys(text, where)
    raise KeyringError(
        "signing.keys_file is not set: fence decisions, settings and fence claims cannot be "
        "signed or verified (a file of 'KEY_ID SECRET' lines, mode 0600; see the operators' "
        "guide)"
    )


def new_key_line(key_id: str | None = None) -> str:
    """A fresh `KEY_ID SECRET` line."""
    return f"{key_id or 'k' + secrets.token_hex(4)} {secrets.token_urlsafe(36)}"


def write_keys_file(path: Path, key_id: str | None = None) -> Path:
    """Create a keys file with one fresh key (mode 0600)."""
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(new_key_line(key_id) + "\n", encoding="utf-8")
    return path


def canonical(purpose: str, record: Mapping[str, Any]) -> bytes:
    """The bytes that are signed: the purpose, a newline, the sorted compact JSON."""
    body = {k: v for k, v in record.items() if k != SIGNATURE_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"{purpose}\n{text}".encode()


def _mac(secret: bytes, purpose: str, record: Mapping[str, Any]) -> str:
    return hmac.new(secret, canonical(purpose, record), hashlib.sha256).hexdigest()


def sign(ring: Keyring, purpose: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """The record with its `signature` (key id, algorithm, MAC) under the first key."""
    kid, secret = ring.keys[0]
    body = {k: v for k, v in record.items() if k != SIGNATURE_FIELD}
    return {
        **body,
        SIGNATURE_FIELD: {"key_id": kid, "alg": ALGORITHM, "mac": _mac(secret, purpose, body)},
    }


def verify(ring: Keyring, purpose: str, record: Any) -> dict[str, Any]:
    """The record without its signature if a held key signed it; else SignatureError."""
    if not isinstance(record, dict):
        raise SignatureError("not a JSON object")
    sig = record.get(SIGNATURE_FIELD)
    if sig is None:
        raise SignatureError("unsigned")
    if not isinstance(sig, dict) or not all(
        isinstance(sig.get(k), str) for k in ("key_id", "alg", "mac")
    ):
        raise SignatureError("malformed signature")
    if sig["alg"] != ALGORITHM:
        raise SignatureError(f"unsupported algorithm {sig['alg'][:40]!r}")
    secret = ring.secret(sig["key_id"])
    if secret is None:
        raise SignatureError(f"unknown key id {sig['key_id'][:40]!r}")
    if not hmac.compare_digest(_mac(secret, purpose, record), sig["mac"]):
        raise SignatureError(f"bad signature (key {sig['key_id']})")
    return {k: v for k, v in record.items() if k != SIGNATURE_FIELD}


def verify_bytes(ring: Keyring, purpose: str, value: bytes | None) -> dict[str, Any]:
    """`verify` of a topic value; unparseable JSON is a SignatureError too."""
    if not value:
        raise SignatureError("empty record")
    try:
        record = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        raise SignatureError("not JSON") from None
    return verify(ring, purpose, record)
