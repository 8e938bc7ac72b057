"""Operator settings changed at run time live in the compacted settings topic, and nowhere else.

Keys: `cluster:<uuid>`, `host:<uuid>`, `pause:global`, `pause:cluster:<uuid>`. A cluster or host
record replaces that entry of the YAML file as a whole; a tombstone (null value) deletes the
record, so the file's entry applies again. IPMI passwords are Fernet-encrypted inside the record
(key from `FENCER_SECRETS_KEY` or `api.secrets_key_file`) and a record without a password keeps
the file's. `SettingsStore` reads the topic from the beginning and keeps the merged view; the API
writes through it, and the workers read `effective()` / `is_paused()` from it.

Every record is signed (streams.settings_records); a record not signed by a held key is refused:
logged, kept out of the view, and reported as a `forged_record` notice.

    store = SettingsStore(load_settings(path))
    await store.start()                      # returns once the whole topic has been read
    store.effective(host_uuid, cluster_uuid) # EffectiveIpmi, passwords decrypted (SecretStr)
    store.is_paused(cluster_uuid)            # global or cluster pause in force
    await store.put_cluster(uuid, ClusterSettings(...)); await store.pause(cluster_uuid)
    await store.stop()
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaProducer, ConsumerRecord
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from pydantic import SecretStr

from fencing.events import NoticeKind
from fencing.records import Notice
from fencing.settings import (
    ClusterSettings,
    EffectiveIpmi,
    FencerSettings,
    HostSettings,
)
from fencing.signing import (
    Keyring,
    SignatureError,
)
from streams.kafka import aiokafka_kwargs, ensure_topics, prepare_kafka

# The records themselves (keys, signing, password encryption) live in streams.settings_records;
# these names stay importable from here.
from streams.settings_records import (
    GLOBAL_PAUSE_KEY,
    SECRETS_KEY_ENV,
    PauseFlag,
    SecretsKeyMissing,
    SettingsStoreError,
    _Entry,
    _ring_or_none,
    cluster_key,
    decode_entry,
    encode_entry,
    forged_settings_notice,
    generate_secrets_key,
    host_key,
    invalid_fields,
    load_secrets_key,
    pause_key,
    sign_settings_value,
    undecryptable_notice,
    verify_settings_record,
    verify_settings_value,
)
from streams.topic_reader import TopicReader

__all__ = [
    "GLOBAL_PAUSE_KEY",
    "SECRETS_KEY_ENV",
    "PauseFlag",
    "SecretsKeyMissing",
    "SettingsStore",
    "SettingsStoreError",
    "cluster_key",
    "forged_settings_notice",
    "generate_secrets_key",
    "host_key",
    "load_secrets_key",
    "pause_key",
    "sign_settings_value",
    "verify_settings_value",
]

log = logging.getLogger(__name__)

_UNSET: Any = object()


class SettingsStore:
    """The YAML settings overlaid with the settings topic; the one place operators' changes go."""

    def __init__(
        self,
        settings: FencerSettings,
        *,
        secrets_key: Fernet | MultiFernet | None = _UNSET,
        client_id: str = "fencer-settings",
        keyring: Keyring | None = _UNSET,
    ) -> None:
        self._file = settings
        # Signing keys: every record written is signed, every record read must be. Without a
        # configured key (an API or test without `signing`) records are neither signed nor
        # checked; the workers that fence always pass one (streams.app refuses to start).
        self._ring: Keyring | None = _ring_or_none(settings) if keyring is _UNSET else keyring
        self.refused: list[tuple[str, int, int, str]] = []  # (key, partition, offset, reason)
        self._fernet: Fernet | MultiFernet | None = (
            load_secrets_key(settings.api) if secrets_key is _UNSET else secrets_key
        )
        # Stored passwords no key decrypts, by record key: the reason (shown by the API).
        self.undecryptable: dict[str, str] = {}
        self._reported: set[str] = set()
        self._pending_notices: list[Notice] = []
        self._topic = settings.kafka.topics.settings
        self._client_id = client_id
        self._entries: dict[str, _Entry] = {}
        self._pauses: dict[str, PauseFlag] = {}
        # Where this writer's own latest record of a key landed ((partition, offset)): the
        # tail, which may lag, must not apply an older record of that key over it.
        self._written: dict[str, tuple[int, int]] = {}
        # Per key: the highest signed sequence applied, and that record's bytes as read (an
        # older record written again is refused, and this one written again after it).
        self._seq: dict[str, int] = {}
        self._current: dict[str, bytes] = {}
        self._heal: set[str] = set()  # keys whose last record read at start is a replay
        self._merged = settings
        self._reader = TopicReader(settings, [self._topic], self._on_record, client_id=client_id)
        self._producer: AIOKafkaProducer | None = None
        self._notices: set[asyncio.Task[Any]] = set()
        self.version = 0  # bumped on every applied record: cheap change detection

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, within: float = 30.0) -> None:
        """Create fencer's topics if missing, then read the settings topic before returning."""
        prepare_kafka(self._file)
        await self._ensure_topic(within)
        producer = AIOKafkaProducer(
            client_id=self._client_id, acks="all", **aiokafka_kwargs(self._file)
        )
        try:
            await producer.start()
        except Exception as exc:
            await producer.stop()
            raise SettingsStoreError(
                f"cannot reach Kafka at {self._file.kafka.bootstrap_servers}: {exc}"
            ) from None
        self._producer = producer
        try:
            await self._reader.start(within)
        except Exception:
            await self.stop()
            raise
        pending, self._pending_notices = self._pending_notices, []
        for notice in pending:
            self._send_notice(notice)
        # A replay still last of its key when the topic was read (once per replay, not once
        # per start: the copy written now follows it).
        heal, self._heal = self._heal, set()
        for key in sorted(heal):
            self._write_again(key)

    async def _ensure_topic(self, within: float) -> None:
        try:
            await asyncio.wait_for(ensure_topics(self._file), within)
        except Exception as exc:
            raise SettingsStoreError(
                f"cannot prepare the topics at {self._file.kafka.bootstrap_servers}: "
                f"{type(exc).__name__} {exc}".rstrip()
            ) from None

    async def stop(self) -> None:
        """Stop reading and writing."""
        await self._reader.stop()
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def __aenter__(self) -> SettingsStore:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- reading --------------------------------------------------------------------------------

    @property
    def settings(self) -> FencerSettings:
        """The merged settings (file + topic), as the workers should use them."""
        return self._merged

    @property
    def file_settings(self) -> FencerSettings:
        """The settings as loaded from the file and the environment."""
        return self._file

    def effective(self, host_uuid: str, cluster_uuid: str | None) -> EffectiveIpmi:
        """A host's IPMI settings and the source of each value (host, cluster, default)."""
        return self._merged.effective_ipmi(host_uuid, cluster_uuid)

    def cluster(self, uuid: str) -> ClusterSettings:
        """A cluster's merged settings (an empty entry if none is set)."""
        return self._merged.clusters.get(uuid) or ClusterSettings()

    def host(self, uuid: str) -> HostSettings:
        """A host's merged overrides (an empty entry if none is set)."""
        return self._merged.hosts.get(uuid) or HostSettings()

    def pause_flag(self, cluster_uuid: str | None) -> PauseFlag | None:
        """The stored pause record of the cluster (or the global one when None)."""
        return self._pauses.get(pause_key(cluster_uuid))

    def is_paused(self, cluster_uuid: str | None = None) -> bool:
        """Whether fencing is paused globally or for this cluster."""
        flag = self._pauses.get(GLOBAL_PAUSE_KEY)
        if flag is not None and flag.paused:
            return True
        return cluster_uuid is not None and self.cluster(cluster_uuid).paused

    # -- writing --------------------------------------------------------------------------------

    async def put_cluster(self, uuid: str, settings: ClusterSettings) -> None:
        """Replace a cluster's settings. ipmi.password None keeps the current one; "" clears."""
        key = cluster_key(uuid)
        await self._send(key, encode_entry(settings, self._entries.get(key), self._fernet))

    async def put_host(self, uuid: str, settings: HostSettings) -> None:
        """Replace a host's overrides. ipmi.password None keeps the current one; "" clears."""
        key = host_key(uuid)
        await self._send(key, encode_entry(settings, self._entries.get(key), self._fernet))

    async def delete_cluster(self, uuid: str) -> None:
        """Forget the API's settings of a cluster (the file's apply again)."""
        await self._send(cluster_key(uuid), None)

    async def delete_host(self, uuid: str) -> None:
        """Forget the API's overrides of a host (the file's apply again)."""
        await self._send(host_key(uuid), None)

    async def pause(
        self, cluster_uuid: str | None = None, *, reason: str | None = None, by: str | None = None
    ) -> None:
        """Pause fencing for a cluster, or everywhere when `cluster_uuid` is None."""
        flag = PauseFlag(paused=True, reason=reason, at=time.time(), by=by)
        await self._send(pause_key(cluster_uuid), flag.model_dump_json().encode())

    async def resume(self, cluster_uuid: str | None = None, *, by: str | None = None) -> None:
        """Resume fencing (an explicit flag, so it also overrides `paused: true` in the file)."""
        flag = PauseFlag(paused=False, at=time.time(), by=by)
        await self._send(pause_key(cluster_uuid), flag.model_dump_json().encode())

    async def _send(self, key: str, value: bytes | None) -> None:
        if self._producer is None:
            raise SettingsStoreError("the settings store is not started")
        plain = value
        seq = self._seq.get(key, 0) + 1
        if self._ring is not None:
            value = sign_settings_value(self._ring, key, value, seq)
        try:
            meta = await self._producer.send_and_wait(self._topic, key=key.encode(), value=value)
        except Exception as exc:
            raise SettingsStoreError(
                f"cannot write {key} to the settings topic {self._topic}: {type(exc).__name__}"
            ) from None
        # Applied now so the writer reads its own write; the tail applies it again, harmlessly,
        # and skips the older records of that key it has not read yet (a pause then a resume:
        # the tail's pause must not undo the resume).
        self._written[key] = (meta.partition, meta.offset)
        if self._ring is not None and value is not None:
            self._seq[key], self._current[key] = seq, value
        self._apply(key, plain)

    # -- the topic ------------------------------------------------------------------------------

    def _on_record(self, record: ConsumerRecord[bytes, bytes]) -> None:
        if record.key is None:
            return
        key = record.key.decode("utf-8", "replace")
        mine = self._written.get(key)
        if mine is not None and record.partition == mine[0] and record.offset < mine[1]:
            return  # older than this writer's own write of the key, already applied
        value = record.value
        if self._ring is not None:
            try:
                value, seq = verify_settings_record(self._ring, key, value)
            except SignatureError as exc:
                self._refuse(record, key, str(exc))
                return
            last = self._seq.get(key, 0)
            if seq < last:
                # A genuine record, but an older one written again (review4): applying it
                # rolled the key back silently (a pause undone by the resume before it).
                self._refuse(
                    record,
                    key,
                    f"replayed: an older signed record of this key (sequence {seq}, "
                    f"{last} already applied)",
                )
                if self._reader.caught_up.is_set():
                    self._write_again(key)
                else:
                    self._heal.add(key)  # unless a later record of the key follows (start)
                return
        try:
            self._apply(key, value)
        except ValueError as exc:
            # A genuine record the models refuse (another fencer version wrote it): it was a
            # traceback in the log and nothing else (review4). The key's previous settings
            # stay in force; the refusal names the field and is sent as a notice.
            self._refuse(
                record, key, f"invalid: {invalid_fields(exc)}", NoticeKind.PREFLIGHT_FAILED
            )
            return
        if self._ring is not None:
            self._heal.discard(key)
            self._seq[key] = seq
            if record.value is not None:
                self._current[key] = record.value

    def _write_again(self, key: str) -> None:
        """Write the current record of `key` after a replayed one, so that compaction keeps the
        current one and a store that starts later reads the same (its copy is applied again,
        harmlessly: same sequence)."""
        current = self._current.get(key)
        if self._producer is None or current is None:
            return
        task = asyncio.get_running_loop().create_task(
            self._producer.send_and_wait(self._topic, key=key.encode(), value=current)
        )
        self._notices.add(task)
        task.add_done_callback(self._notice_sent)

    def _refuse(
        self,
        record: ConsumerRecord[bytes, bytes],
        key: str,
        reason: str,
        kind: NoticeKind = NoticeKind.FORGED_RECORD,
    ) -> None:
        log.error(
            "REFUSED settings record %s partition %d offset %d (key %r): %s",
            record.topic,
            record.partition,
            record.offset,
            key[:100],
            reason,
        )
        self.refused.append((key, record.partition, record.offset, reason))
        if self._producer is not None:
            self._send_notice(forged_settings_notice(record, key, reason, kind))

    def _notice_sent(self, task: asyncio.Task[Any]) -> None:
        self._notices.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("cannot send a forged_record notice: %s", task.exception())

    def _apply(self, key: str, value: bytes | None) -> None:
        if key.startswith("pause:"):
            if value is None:
                self._pauses.pop(key, None)
            else:
                self._pauses[key] = PauseFlag.model_validate_json(value)
        elif key.startswith(("cluster:", "host:")):
            if value is None:
                self._entries.pop(key, None)
            else:
                self._entries[key] = decode_entry(self._file, key, value)
        else:
            log.warning("ignored settings record with unknown key %r", key)
            return
        self._rebuild()
        self.version += 1

    def _password(self, key: str, entry: _Entry, file_pw: SecretStr | None) -> SecretStr | None:
        if not entry.has_token:
            return file_pw
        if entry.token is None:
            return None
        if self._fernet is None:
            return self._undecryptable(
                key,
                entry.token,
                f"no key is configured ({SECRETS_KEY_ENV} or api.secrets_key_file)",
            )
        try:
            return SecretStr(self._fernet.decrypt(entry.token.encode()).decode())
        except InvalidToken:
            return self._undecryptable(
                key,
                entry.token,
                f"no key of {SECRETS_KEY_ENV} / api.secrets_key_file decrypts it (a key was "
                "removed or replaced before the password was stored again)",
            )

    def _undecryptable(self, key: str, token: str, why: str) -> SecretStr:
        """Never the inherited password instead: an empty one (the BMC refuses it, the fence
        fails loudly), an error in the log, a notice, and the reason in the API's view."""
        reason = (
            f"{key}: the stored BMC password cannot be decrypted: {why}; fencing this "
            "{what} will fail until the password is stored again or the key is restored"
        ).replace("{what}", "host" if key.startswith("host:") else "cluster's hosts")
        self.undecryptable[key] = reason
        mark = f"{key}/{hashlib.sha256(token.encode()).hexdigest()[:16]}"
        if mark not in self._reported:
            self._reported.add(mark)
            log.error("STORED PASSWORD UNUSABLE: %s", reason)
            self._send_notice(undecryptable_notice(key, mark, reason, time.time()))
        return SecretStr("")

    def _send_notice(self, notice: Notice) -> None:
        if self._producer is None:
            self._pending_notices.append(notice)
            return
        task = asyncio.get_running_loop().create_task(
            self._producer.send_and_wait(
                self._file.kafka.topics.notices,
                key=notice.host.host_uuid.encode(),
                value=notice.model_dump_json().encode(),
            )
        )
        self._notices.add(task)
        task.add_done_callback(self._notice_sent)

    def _rebuild(self) -> None:
        self.undecryptable.clear()
        clusters = dict(self._file.clusters)
        hosts = dict(self._file.hosts)
        for key, entry in self._entries.items():
            kind, _, uuid = key.partition(":")
            if kind == "cluster":
                base = self._file.clusters.get(uuid)
                pw = self._password(key, entry, base.ipmi.password if base else None)
                cs = entry.settings.model_copy(
                    update={
                        "ipmi": entry.settings.ipmi.model_copy(update={"password": pw}),
                        "paused": base.paused if base else False,
                    }
                )
                assert isinstance(cs, ClusterSettings)
                clusters[uuid] = cs
            else:
                hbase = self._file.hosts.get(uuid)
                pw = self._password(key, entry, hbase.ipmi.password if hbase else None)
                hs = entry.settings.model_copy(
                    update={"ipmi": entry.settings.ipmi.model_copy(update={"password": pw})}
                )
                assert isinstance(hs, HostSettings)
                hosts[uuid] = hs
        for key, flag in self._pauses.items():
            if key.startswith("pause:cluster:"):
                uuid = key.removeprefix("pause:cluster:")
                clusters[uuid] = (clusters.get(uuid) or ClusterSettings()).model_copy(
                    update={"paused": flag.paused}
                )
        self._merged = self._file.model_copy(update={"clusters": clusters, "hosts": hosts})
