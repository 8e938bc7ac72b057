"""The records of the settings topic: their keys, their signatures, the encryption of the
passwords they carry, and how a record is decoded (confined to what the file lets it set).

Every record is signed (fencing.signing, key from `signing.keys_file`) over its key and value,
written as `{"key", "value", "signature"}`; a deletion is a signed record whose value is null,
never a bare tombstone. IPMI passwords are Fernet-encrypted inside the record (key from
`FENCER_SECRETS_KEY` or `api.secrets_key_file`). streams.settings_store keeps the merged view.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from aiokafka import ConsumerRecord
from cryptography.fernet import Fernet, MultiFernet
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fencing.events import NoticeKind
from fencing.records import HostRef, Notice
from fencing.settings import (
    ApiSettings,
    ClusterSettings,
    FencerSettings,
    HostSettings,
    confine_to_file,
    file_only_violations,
)
from fencing.signing import (
    SETTINGS,
    Keyring,
    KeyringError,
    SignatureError,
    load_keyring,
    sign,
    verify_bytes,
)

log = logging.getLogger("streams.settings_store")

SECRETS_KEY_ENV = "FENCER_SECRETS_KEY"
GLOBAL_PAUSE_KEY = "pause:global"


class SettingsStoreError(Exception):
    """A settings change or the settings topic failed; the message is one operator line."""


class SecretsKeyMissing(SettingsStoreError):
    """A password was to be stored but no encryption key is configured."""


def cluster_key(uuid: str) -> str:
    """The topic key of a cluster's settings."""
    return f"cluster:{uuid}"


def host_key(uuid: str) -> str:
    """The topic key of a host's overrides."""
    return f"host:{uuid}"


def pause_key(cluster_uuid: str | None) -> str:
    """The topic key of a pause flag: global when `cluster_uuid` is None."""
    return GLOBAL_PAUSE_KEY if cluster_uuid is None else f"pause:cluster:{cluster_uuid}"


def generate_secrets_key() -> str:
    """A new key for `FENCER_SECRETS_KEY` or `api.secrets_key_file`."""
    return Fernet.generate_key().decode()


def load_secrets_key(api: ApiSettings) -> MultiFernet | None:
    """The password encryption keys from the environment, else the key file, else None.

    Several keys rotate: one per line in the file (or separated by commas or spaces in the
    variable); the first encrypts every new password, every one is tried to decrypt. Rotation:
    put a new key first, store the passwords again (or wait), then drop the old key."""
    raw = os.environ.get(SECRETS_KEY_ENV)
    where = SECRETS_KEY_ENV
    if not raw and api.secrets_key_file is not None:
        where = f"api.secrets_key_file ({api.secrets_key_file})"
        try:
            raw = Path(api.secrets_key_file).read_text()
        except OSError as exc:
            raise SettingsStoreError(f"cannot read {where}: {exc.strerror}") from None
    lines = [
        part
        for line in (raw or "").splitlines()
        if line.strip() and not line.strip().startswith("#")
        for part in line.replace(",", " ").split()
    ]
    if not lines:
        return None
    keys = []
    for n, text in enumerate(lines, 1):
        try:
            keys.append(Fernet(text.encode()))
        except ValueError:
            raise SettingsStoreError(
                f"{where}: key {n} is not a Fernet key (32 url-safe base64-encoded bytes)"
            ) from None
    return MultiFernet(keys)


def _ring_or_none(settings: FencerSettings) -> Keyring | None:
    try:
        return load_keyring(settings)
    except KeyringError as exc:
        if settings.signing.keys_file is not None or settings.signing.keys is not None:
            raise SettingsStoreError(str(exc)) from None
        log.warning(
            "signing.keys_file is not set: settings records are written unsigned, and the "
            "workers (which hold a key) will refuse them"
        )
        return None


def sign_settings_value(ring: Keyring, key: str, value: bytes | None, seq: int = 0) -> bytes:
    """A settings record as written: signed over its key, value and sequence (a deletion is
    signed too, with a null value, so nobody can clear an operator's pause with a bare
    tombstone). `seq` counts the writes of this key (one more than the last one read): an
    old record written to the topic again carries a lower one and is refused."""
    body: dict[str, Any] = {"key": key, "value": None if value is None else json.loads(value)}
    if seq:
        body["seq"] = seq
    return json.dumps(sign(ring, SETTINGS, body)).encode()


def verify_settings_record(ring: Keyring, key: str, raw: bytes | None) -> tuple[bytes | None, int]:
    """The value a signed settings record carries (None: deleted) and its signed sequence (0
    for a record written before sequences); SignatureError if forged."""
    if raw is None:
        raise SignatureError("unsigned deletion (tombstone)")
    body = verify_bytes(ring, SETTINGS, raw)
    if body.get("key") != key:
        raise SignatureError(f"signed for key {str(body.get('key'))[:100]!r}, not this key")
    seq = body.get("seq", 0)
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise SignatureError(f"seq: not a sequence number: {str(seq)[:40]!r}")
    value = body.get("value")
    return (None if value is None else json.dumps(value).encode()), seq


def verify_settings_value(ring: Keyring, key: str, raw: bytes | None) -> bytes | None:
    """The value a signed settings record carries (None: deleted); SignatureError if forged."""
    return verify_settings_record(ring, key, raw)[0]


def invalid_fields(exc: ValueError) -> str:
    """Which fields a settings record got wrong, one line: `fence_cap: Input should be ...`
    (never the values: a record may carry secrets)."""
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(record)'}: {e['msg']}" for e in exc.errors()
        )
    return f"not a settings record ({type(exc).__name__})"


def forged_settings_notice(
    record: ConsumerRecord[bytes, bytes],
    key: str,
    reason: str,
    notice_kind: NoticeKind = NoticeKind.FORGED_RECORD,
) -> Notice:
    """The forged_record notice of a settings record fencer did not sign (or, with another
    kind, of a genuine record refused for another reason)."""
    where = f"{record.topic} partition {record.partition} offset {record.offset}"
    kind, _, uuid = key.partition(":")
    host = uuid if kind == "host" else None
    prefix = "forged" if notice_kind is NoticeKind.FORGED_RECORD else "refused"
    return Notice(
        notice_id=f"{prefix}/{record.topic}/{record.partition}/{record.offset}",
        kind=notice_kind,
        host=HostRef(host_uuid=host or f"settings:{key[:100]}"),
        at=time.time(),
        reason=f"refused settings record {where}, key {key[:100]!r} ({reason})",
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        claimed_host=host,
    )


def undecryptable_notice(key: str, mark: str, reason: str, at: float) -> Notice:
    """The notice that a stored BMC password cannot be decrypted (fencing it will fail)."""
    return Notice(
        notice_id=f"undecryptable/{mark}",
        kind=NoticeKind.PREFLIGHT_FAILED,
        host=HostRef(
            host_uuid=key.removeprefix("host:")
            if key.startswith("host:")
            else f"settings:{key[:100]}"
        ),
        at=at,
        reason=reason,
    )


class PauseFlag(BaseModel):
    """The value of a pause record."""

    model_config = ConfigDict(extra="ignore")
    paused: bool
    reason: str | None = Field(None, max_length=500)
    at: float = 0.0
    by: str | None = None


class _Entry(BaseModel):
    """A decoded cluster or host record: its settings, and its password state."""

    settings: ClusterSettings | HostSettings
    # Absent: keep the file's password; None: cleared; a string: the Fernet token.
    token: str | None = None
    has_token: bool = False


def decode_entry(file: FencerSettings, key: str, value: bytes) -> _Entry:
    """A cluster or host record's settings, confined to what the file lets a record set."""
    data = json.loads(value)
    model = ClusterSettings if key.startswith("cluster:") else HostSettings
    settings = model.model_validate(data.get("settings") or {})
    # What runs stays in the file: a record cannot set exec, the template, TLS checks or a
    # driver outside api.settable_drivers (whoever wrote it, signed or not).
    kind, _, uuid = key.partition(":")
    base = (file.clusters if kind == "cluster" else file.hosts).get(uuid)
    allowed = file.api.settable_drivers
    refused = file_only_violations(settings.ipmi, base.ipmi if base else None, allowed)
    if refused:
        log.error(
            "%s: the settings record sets %s, which only the configuration file may set: "
            "the file's values apply",
            key,
            ", ".join(f"ipmi.{f}" for f in refused),
        )
    ipmi = confine_to_file(settings.ipmi, base.ipmi if base else None, allowed)
    settings = settings.model_copy(update={"ipmi": ipmi})
    if "ipmi_password" in data:
        return _Entry(settings=settings, token=data["ipmi_password"], has_token=True)
    return _Entry(settings=settings)


def encode_entry(
    settings: ClusterSettings | HostSettings,
    current: _Entry | None,
    fernet: Fernet | MultiFernet | None,
) -> bytes:
    """A cluster or host record as written: the settings without their password, and the
    password encrypted (unset: the current record's ciphertext is kept; empty: cleared)."""
    exclude: dict[str, Any] = {"ipmi": {"password"}}
    if isinstance(settings, ClusterSettings):
        exclude["paused"] = True  # pausing has its own keys
    record: dict[str, Any] = {"settings": settings.model_dump(mode="json", exclude=exclude)}
    new = settings.ipmi.password
    if new is None:
        if current is not None and current.has_token:
            record["ipmi_password"] = current.token  # ciphertext copied: no key needed
    elif new.get_secret_value() == "":
        record["ipmi_password"] = None
    else:
        if fernet is None:
            raise SecretsKeyMissing(
                "ipmi.password: cannot store a password without an encryption key; set "
                f"{SECRETS_KEY_ENV} or api.secrets_key_file (fencer can generate one)"
            )
        record["ipmi_password"] = fernet.encrypt(new.get_secret_value().encode()).decode()
    return json.dumps(record).encode()
