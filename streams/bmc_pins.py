"""BMC pins on the compacted topic `bmc-pins` (key host uuid, value fencing.records.BmcPin).

Rule: every reader (actuating worker, `fencer ipmi pin`, the API) reads the whole topic before
it answers, and writes through to it, so a pin confirmed by an operator anywhere is the one the
actuator compares with. Nothing here decides: fencing.identity compares.

Signed: with the signing keys (`signing.keys_file`, the decisions' keyring) every pin is signed
(purpose `fencing.signing.BMC_PIN`) and every pin read is verified; a removal (`fencer ipmi
unpin`) is a tombstone whose header `fencer-unpin` carries the signed removal (purpose
BMC_UNPIN: the host, the GUID and pinned_at of the pin it removes, who removed it), so a bare
or replayed tombstone removes nothing. A record fencer did not sign is never a pin:
- signed badly (unknown key, bad MAC, signed for another host): ignored, logged, told once per
  host per process (a forged_record notice);
- unsigned (an older fencer's pin, or forged): logged once per host; if the host has no signed
  pin it is kept as `unsigned(host)`: the GUID it names still counts in `holders` (another
  host's first read of it is refused), and fencing.identity pins the host anew only if its
  BMC reports that same GUID (a fresh first read; the record's pinned_by is never carried
  over), else refuses as a changed identity until an operator pins it. So the upgrade from
  unsigned pins re-pins each host at its first pre-flight, and can never consent to a board
  changed meanwhile.
Without keys (an API or a test without `signing`) records are neither signed nor verified; the
workers always hold keys (streams.app refuses to start without).

    pins = BmcPinStore(settings); await pins.start()
    pins.get(host_uuid); await pins.put(pin); await pins.send_notice(notice); await pins.stop()
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import sys
import time
from typing import Any

from aiokafka import AIOKafkaProducer, ConsumerRecord
from pydantic import ValidationError

from fencing.drivers.base import DriverError
from fencing.events import NoticeKind
from fencing.identity import PinStoreError
from fencing.records import BmcPin, HostRef, Notice
from fencing.settings import FencerSettings
from fencing.signing import (
    BMC_PIN,
    BMC_UNPIN,
    Keyring,
    KeyringError,
    SignatureError,
    load_keyring,
    sign,
    verify_bytes,
)
from streams.kafka import aiokafka_kwargs, ensure_topics, prepare_kafka

log = logging.getLogger("fencer.bmc_pins")

UNPIN_HEADER = "fencer-unpin"  # the signed removal a tombstone carries
_UNSET: Any = object()


def _ring_or_none(settings: FencerSettings) -> Keyring | None:
    """The signing keys, None when none are configured; PinStoreError when misconfigured."""
    if settings.signing.keys_file is None and settings.signing.keys is None:
        return None
    try:
        return load_keyring(settings)
    except KeyringError as exc:
        raise PinStoreError(str(exc)) from None


class BmcPinStore:
    """The pins topic read from the beginning and kept current; writes go through it."""

    def __init__(
        self,
        settings: FencerSettings,
        *,
        client_id: str = "fencer-bmc-pins",
        read_only: bool = False,
        keyring: Keyring | None = _UNSET,
        tell_forged: bool = True,
    ) -> None:
        from streams.topic_reader import TopicReader

        self._settings = settings
        self._topic = settings.kafka.topics.bmc_pins
        self._client_id = client_id
        # The API reads pins only: an actuate worker pins (its Kafka principal may not write).
        self.read_only = read_only
        # The signing keys, loaded by start() unless given (None: neither signed nor verified).
        self._ring: Keyring | None = None if keyring is _UNSET else keyring
        self._load_ring = keyring is _UNSET
        # A worker tells of badly signed records (forged_record); a CLI run only logs them.
        self._tell_forged = tell_forged and not read_only
        self._pins: dict[str, BmcPin] = {}  # signed (verified) pins
        self._unsigned: dict[str, BmcPin] = {}  # hosts whose latest record is unsigned
        self.ignored: dict[str, int] = {}  # host uuid -> records not taken as pins
        self._logged: set[str] = set()  # hosts whose unsigned record was logged
        self._told: set[str] = set()  # hosts whose badly signed record was told
        self._telling: set[asyncio.Task[None]] = set()
        self._reader = TopicReader(settings, [self._topic], self._on_record, client_id=client_id)
        self._producer: AIOKafkaProducer | None = None
        self._started = False

    async def start(self, within: float = 30.0) -> None:
        """Create the topics if missing, read the pins topic to its end, open a producer.

        Raises PinStoreError (the keys, the broker or the topic)."""
        if self._load_ring:
            self._ring = _ring_or_none(self._settings)
            self._load_ring = False
        prepare_kafka(self._settings)
        try:
            await asyncio.wait_for(ensure_topics(self._settings), within)
        except Exception as exc:
            raise PinStoreError(
                f"cannot prepare the topics at {self._settings.kafka.bootstrap_servers}: "
                f"{type(exc).__name__} {exc}".rstrip()
            ) from None
        producer = None
        if not self.read_only:
            producer = AIOKafkaProducer(
                client_id=self._client_id, acks="all", **aiokafka_kwargs(self._settings)
            )
        try:
            if producer is not None:
                await producer.start()
                self._producer = producer  # a forged record read now is told at once
            await self._reader.start(within)
        except Exception as exc:
            self._producer = None
            if producer is not None:
                await producer.stop()
            await self._reader.stop()
            raise PinStoreError(f"cannot read the BMC pins topic {self._topic}: {exc}") from None
        self._started = True

    async def stop(self) -> None:
        """Stop reading and writing."""
        await self._reader.stop()
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        self._started = False

    def get(self, host_uuid: str) -> BmcPin | None:
        """The host's pin as the topic says now."""
        if not self._started:
            raise PinStoreError(f"the BMC pins topic {self._topic} is not read")
        return self._pins.get(host_uuid)

    def holders(self, guid: str) -> list[str]:
        """The uuids of the hosts pinned with this GUID, sorted (the reverse lookup that keeps
        one BMC from being pinned for two hosts)."""
        if not self._started:
            raise PinStoreError(f"the BMC pins topic {self._topic} is not read")
        held = {h for h, p in self._pins.items() if p.guid == guid}
        # An unsigned record (an older fencer's pin) still keeps its GUID from another host.
        held |= {h for h, p in self._unsigned.items() if p.guid == guid}
        return sorted(held)

    def unsigned(self, host_uuid: str) -> BmcPin | None:
        """The unsigned record in force for a host with no signed pin (an older fencer's pin,
        or forged): never a pin; fencing.identity pins anew only the GUID it names."""
        if not self._started:
            raise PinStoreError(f"the BMC pins topic {self._topic} is not read")
        return self._unsigned.get(host_uuid)

    def all(self) -> dict[str, BmcPin]:
        """Every pin, by host uuid."""
        return dict(self._pins)

    async def put(self, pin: BmcPin) -> None:
        """Write the host's pin (acks=all, signed with the keys) and apply it here at once."""
        body = pin.model_dump(mode="json", exclude={"signature"})
        value = body if self._ring is None else sign(self._ring, BMC_PIN, body)
        await self._send(self._topic, pin.host_uuid, json.dumps(value).encode())
        self._pins[pin.host_uuid] = BmcPin.model_validate(body)
        self._unsigned.pop(pin.host_uuid, None)

    async def delete(self, host_uuid: str, *, by: str) -> BmcPin | None:
        """Write the host's null record (the compacted topic's tombstone, acks=all), its
        header the signed removal of the pin in force (or of the unsigned record), and forget
        it here at once; the pin it removed (None: the host had none, nothing written)."""
        old = self.get(host_uuid) or self.unsigned(host_uuid)
        if old is None:
            return None
        removal = {
            "host_uuid": host_uuid,
            "guid": old.guid,
            "pinned_at": old.pinned_at,
            "removed_by": by,
            "removed_at": time.time(),
        }
        signed = removal if self._ring is None else sign(self._ring, BMC_UNPIN, removal)
        headers = [(UNPIN_HEADER, json.dumps(signed).encode())]
        await self._send(self._topic, host_uuid, None, headers)
        self._pins.pop(host_uuid, None)
        self._unsigned.pop(host_uuid, None)
        return old

    async def send_notice(self, notice: Notice) -> None:
        """Hand a notice to the notifiers (topic notices, key host uuid)."""
        topic = self._settings.kafka.topics.notices
        await self._send(topic, notice.host.host_uuid, notice.model_dump_json().encode())

    async def _send(
        self,
        topic: str,
        key: str,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        if self.read_only:
            raise PinStoreError(f"this BMC pins store only reads (writing {topic})")
        if self._producer is None:
            raise PinStoreError(f"the BMC pins store is not started (writing {topic})")
        try:
            await self._producer.send_and_wait(
                topic, key=key.encode(), value=value, headers=headers
            )
        except Exception as exc:
            raise PinStoreError(f"cannot write {key} to {topic}: {type(exc).__name__}") from None

    def _on_record(self, record: ConsumerRecord[bytes, bytes]) -> None:
        if record.key is None:
            return
        key = record.key.decode()
        if record.value is None:
            self._on_removal(record, key)
            return
        if self._ring is None:
            try:
                self._pins[key] = BmcPin.model_validate_json(record.value)
            except ValidationError as exc:
                log.warning("ignored a bmc-pins record for %s that does not fit: %s", key, exc)
            return
        try:
            pin = BmcPin.model_validate(verify_bytes(self._ring, BMC_PIN, record.value))
            if pin.host_uuid != key:
                raise SignatureError(f"signed for host {pin.host_uuid[:100]}, not this key")
        except SignatureError as exc:
            if str(exc) == "unsigned":
                self._on_unsigned(record, key)
            else:
                self._forged(record, key, str(exc))
            return
        except ValidationError:
            self._forged(record, key, "signed, but not a BMC pin")
            return
        self._pins[key] = pin
        self._unsigned.pop(key, None)

    def _on_removal(self, record: ConsumerRecord[bytes, bytes], key: str) -> None:
        """A tombstone: removes the pin (or unsigned record) its signed header names."""
        if self._ring is None:
            self._pins.pop(key, None)
            self._unsigned.pop(key, None)
            return
        raw = dict(record.headers or ()).get(UNPIN_HEADER)
        try:
            removal = verify_bytes(self._ring, BMC_UNPIN, raw)
            if removal.get("host_uuid") != key:
                raise SignatureError("signed for another host")
        except SignatureError as exc:
            why = "unsigned removal (a bare tombstone)" if raw is None else f"removal: {exc}"
            self._forged(record, key, why)
            return
        for held in (self._pins, self._unsigned):
            pin = held.get(key)
            if pin is not None and (pin.guid, pin.pinned_at) == (
                removal.get("guid"),
                removal.get("pinned_at"),
            ):
                del held[key]
                log.warning(
                    "host %s: BMC pin (system GUID %s) removed by %s",
                    key,
                    pin.guid,
                    str(removal.get("removed_by"))[:200],
                )
                return
        # A removal of a pin no longer in force (written since, or compacted away): nothing.
        log.info(
            "bmc-pins: a removal for host %s of a pin not in force (GUID %s) changes nothing",
            key,
            removal.get("guid"),
        )

    def _on_unsigned(self, record: ConsumerRecord[bytes, bytes], key: str) -> None:
        """An older fencer's pin, or a forged one: never a pin (see the module docstring)."""
        first = key not in self._logged
        self._logged.add(key)
        self.ignored[key] = self.ignored.get(key, 0) + 1
        try:
            pin = BmcPin.model_validate_json(record.value or b"")
        except ValidationError:
            pin = None
        if pin is not None and pin.host_uuid == key and key not in self._pins:
            self._unsigned[key] = pin.model_copy(update={"signature": None})
        if first:
            log.warning(
                "bmc-pins: host %s: an unsigned pin record (%s partition %d offset %d, an older "
                "fencer's or forged) is not a pin; the host is pinned anew only if its BMC "
                "reports the GUID it names (%s), else an operator confirms it: "
                "fencer ipmi pin %s",
                key,
                record.topic,
                record.partition,
                record.offset,
                pin.guid if pin is not None else "none readable",
                key,
            )

    def _forged(self, record: ConsumerRecord[bytes, bytes], key: str, reason: str) -> None:
        """A record fencer's keys did not sign: ignored, logged, told once per host."""
        where = f"{record.topic} partition {record.partition} offset {record.offset}"
        log.warning(
            "ignored %s: a BMC pin record fencer did not sign (%s), host %s", where, reason, key
        )
        first = key not in self._told
        self._told.add(key)
        self.ignored[key] = self.ignored.get(key, 0) + 1
        if not first or not self._tell_forged:
            return
        notice = Notice(
            notice_id=f"forged-bmc-pin/{record.topic}/{record.partition}/{record.offset}",
            kind=NoticeKind.FORGED_RECORD,
            host=HostRef(host_uuid=key[:200]),
            at=time.time(),
            reason=(
                f"ignored {where} ({reason}): a BMC pin record for host {key} that fencer's "
                "signing keys did not sign. It pins, changes and removes nothing: the actuator "
                "goes by signed pins only. Whoever wrote it can write bmc-pins (check its "
                "ACLs), or it is a fencer with other keys. Told once per host."
            ),
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            claimed_host=key[:200],
        )
        task = asyncio.get_running_loop().create_task(self._tell(notice))
        self._telling.add(task)
        task.add_done_callback(self._telling.discard)

    async def _tell(self, notice: Notice) -> None:
        try:
            await self.send_notice(notice)
        except Exception as exc:  # the record stays ignored whether or not it was told
            log.error("cannot send notice %s: %s", notice.notice_id, exc)


# -------------------------------------------------------------------------------------------
# `fencer ipmi pin HOST`: an operator confirms the GUID the host's BMC reports now


def require_signing(settings: FencerSettings) -> None:
    """The CLI writes pins only with the signing keys: the workers ignore an unsigned one."""
    if settings.signing.keys_file is None and settings.signing.keys is None:
        raise PinStoreError(
            "signing.keys_file (or signing.keys) is not set: fencer's workers ignore a BMC pin "
            "record their keys did not sign; run this with the workers' settings file"
        )


async def confirm_pin(
    settings: FencerSettings,
    host_uuid: str,
    cluster_uuid: str | None,
    *,
    by: str,
    expect: str | None = None,
    store: BmcPinStore | None = None,
) -> tuple[BmcPin | None, BmcPin]:
    """Read the BMC's GUID through the host's effective settings and pin it; (old, new).

    Raises DriverError (the BMC), ValueError (no GUID or not the expected one), PinStoreError."""
    from fencing.drivers import build_driver
    from fencing.identity import pin_current
    from fencing.preflight import call_timeout
    from fencing.redaction import Redactor, secrets_of

    eff = settings.effective_ipmi(host_uuid, cluster_uuid)
    redact = Redactor(secrets_of(settings, eff.values))
    driver = build_driver(eff.values, eff.address, call_timeout(settings))
    own = store is None
    pins = store or BmcPinStore(settings, client_id="fencer-ipmi-pin", tell_forged=False)
    try:
        if own:
            await pins.start()
        return await pin_current(host_uuid, driver, pins, address=eff.address, by=by, expect=expect)
    except DriverError as exc:
        raise type(exc)(redact(str(exc))) from None
    finally:
        await driver.aclose()
        if own:
            await pins.stop()


async def remove_pin(
    settings: FencerSettings, host_uuid: str, *, by: str, store: BmcPinStore | None = None
) -> BmcPin:
    """Remove the host's pin (`fencer ipmi unpin`): the null record on bmc-pins; the removed pin.

    The host's next pre-flight (or its first fence) pins what its BMC reports then. Raises
    LookupError (the host has no pin: a mistyped uuid removes nothing) or PinStoreError."""
    own = store is None
    pins = store or BmcPinStore(settings, client_id="fencer-ipmi-unpin", tell_forged=False)
    try:
        if own:
            await pins.start()
        old = pins.get(host_uuid) or pins.unsigned(host_uuid)
        if old is None:
            raise LookupError(
                f"host {host_uuid} has no BMC pin on {settings.kafka.topics.bmc_pins}: "
                "nothing removed (is the host uuid right?)"
            )
        await pins.delete(host_uuid, by=by)
    finally:
        if own:
            await pins.stop()
    log.warning(
        "host %s: BMC pin removed by %s (system GUID %s, address %s, pinned by %s); the next "
        "pre-flight or fence pins what its BMC reports then",
        host_uuid,
        by,
        old.guid,
        old.address or "?",
        old.pinned_by,
    )
    return old


def cli_ipmi_pin(args: argparse.Namespace) -> int:
    """`fencer ipmi pin HOST [--cluster C] [--expect GUID] [-c FILE]`: pin the BMC's GUID now."""
    from fencing.settings import load_settings
    from streams.ipmi_cli import cluster_for_cli
    from streams.observability import configure_logging, install_secret_scrubber

    settings = load_settings(getattr(args, "config", None))
    configure_logging(settings.log_level, json=settings.log_json)
    install_secret_scrubber(settings)
    by = f"operator {args.by or getpass.getuser()}"

    async def run() -> tuple[BmcPin | None, BmcPin]:
        require_signing(settings)
        cluster = await cluster_for_cli(settings, args.host, args.cluster)
        return await confirm_pin(settings, args.host, cluster, by=by, expect=args.expect)

    try:
        old, new = asyncio.run(run())
    except (DriverError, ValueError, PinStoreError) as exc:
        print(f"fencer: BMC of host {args.host} not pinned: {exc}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "host_uuid": new.host_uuid,
                "guid": new.guid,
                "address": new.address,
                "pinned_by": new.pinned_by,
                "previous_guid": old.guid if old else None,
                "changed": bool(old and old.guid != new.guid),
            },
            indent=2,
        )
    )
    return 0
