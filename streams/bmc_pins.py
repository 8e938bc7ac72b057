"""BMC pins on the compacted topic `bmc-pins` (key host uuid, value fencing.records.BmcPin).

Rule: every reader (actuating worker, `fencer ipmi pin`, the API) reads the whole topic before
it answers, and writes through to it, so a pin confirmed by an operator anywhere is the one the
actuator compares with. Nothing here decides: fencing.identity compares.

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

from aiokafka import AIOKafkaProducer, ConsumerRecord
from pydantic import ValidationError

from fencing.drivers.base import DriverError
from fencing.identity import PinStoreError
from fencing.records import BmcPin, Notice
from fencing.settings import FencerSettings
from streams.kafka import aiokafka_kwargs, ensure_topics, prepare_kafka

log = logging.getLogger("fencer.bmc_pins")


class BmcPinStore:
    """The pins topic read from the beginning and kept current; writes go through it."""

    def __init__(
        self,
        settings: FencerSettings,
        *,
        client_id: str = "fencer-bmc-pins",
        read_only: bool = False,
    ) -> None:
        from streams.topic_reader import TopicReader

        self._settings = settings
        self._topic = settings.kafka.topics.bmc_pins
        self._client_id = client_id
        # The API reads pins only: an actuate worker pins (its Kafka principal may not write).
        self.read_only = read_only
        self._pins: dict[str, BmcPin] = {}
        self._reader = TopicReader(settings, [self._topic], self._on_record, client_id=client_id)
        self._producer: AIOKafkaProducer | None = None
        self._started = False

    async def start(self, within: float = 30.0) -> None:
        """Create the topics if missing, read the pins topic to its end, open a producer."""
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
            await self._reader.start(within)
        except Exception as exc:
            if producer is not None:
                await producer.stop()
            await self._reader.stop()
            raise PinStoreError(f"cannot read the BMC pins topic {self._topic}: {exc}") from None
        self._producer = producer
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
        return sorted(h for h, p in self._pins.items() if p.guid == guid)

    def all(self) -> dict[str, BmcPin]:
        """Every pin, by host uuid."""
        return dict(self._pins)

    async def put(self, pin: BmcPin) -> None:
        """Write the host's pin (acks=all) and apply it here at once."""
        await self._send(self._topic, pin.host_uuid, pin.model_dump_json().encode())
        self._pins[pin.host_uuid] = pin

    async def delete(self, host_uuid: str) -> BmcPin | None:
        """Write the host's null record (the compacted topic's tombstone, acks=all) and forget
        the pin here at once; the pin it removed (None: the host had none)."""
        old = self.get(host_uuid)
        await self._send(self._topic, host_uuid, None)
        self._pins.pop(host_uuid, None)
        return old

    async def send_notice(self, notice: Notice) -> None:
        """Hand a notice to the notifiers (topic notices, key host uuid)."""
        topic = self._settings.kafka.topics.notices
        await self._send(topic, notice.host.host_uuid, notice.model_dump_json().encode())

    async def _send(self, topic: str, key: str, value: bytes | None) -> None:
        if self.read_only:
            raise PinStoreError(f"this BMC pins store only reads (writing {topic})")
        if self._producer is None:
            raise PinStoreError(f"the BMC pins store is not started (writing {topic})")
        try:
            await self._producer.send_and_wait(topic, key=key.encode(), value=value)
        except Exception as exc:
            raise PinStoreError(f"cannot write {key} to {topic}: {type(exc).__name__}") from None

    def _on_record(self, record: ConsumerRecord[bytes, bytes]) -> None:
        if record.key is None:
            return
        key = record.key.decode()
        if record.value is None:
            self._pins.pop(key, None)
            return
        try:
            self._pins[key] = BmcPin.model_validate_json(record.value)
        except ValidationError as exc:
            log.warning("ignored a bmc-pins record for %s that does not fit: %s", key, exc)


# -------------------------------------------------------------------------------------------
# `fencer ipmi pin HOST`: an operator confirms the GUID the host's BMC reports now


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
    pins = store or BmcPinStore(settings, client_id="fencer-ipmi-pin")
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
    pins = store or BmcPinStore(settings, client_id="fencer-ipmi-unpin")
    try:
        if own:
            await pins.start()
        old = pins.get(host_uuid)
        if old is None:
            raise LookupError(
                f"host {host_uuid} has no BMC pin on {settings.kafka.topics.bmc_pins}: "
                "nothing removed (is the host uuid right?)"
            )
        await pins.delete(host_uuid)
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
