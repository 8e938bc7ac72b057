"""The long-lived services the topology's agents share, each built on first use.

Rule: a role that does not need a service never opens it. Runtime holds the settings store (the
live settings), the inventory, the poller and event-bus ingest (sharing one HostDirectory), the
probes, the signing keys, the actuator and its last-moment checks, the BMC pins and the
notifier; what the actuate and operator agents do with them is streams.actuating.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import secrets
import time
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from fencing.policy import Policy
from fencing.records import FenceDecision, FenceOutcome, Notice, ProbeRequest, ProbeResult
from fencing.settings import FencerSettings
from streams.ingest import Ingest
from streams.poller import HostDirectory, Poller
from streams.tables import RowStore, failed_runs, reminder
from streams.watch import WORKER_ID
from streams.worker_clock import CLOCK_ID

log = logging.getLogger("fencer.streams")


async def settle_memory(*args: Any, **kwargs: Any) -> None:
    """Collect once, then move every object alive now out of the cyclic collector's view
    (`gc.freeze`): connected to the app's start and to each completed rebalance (after which
    the tables are recovered). A worker holds some 100,000 long-lived objects (modules, the
    app, tables, clients); each full collection walked them all, 60-110 ms with the loop
    stopped, several times a minute under load: a stall for every record in flight. Objects
    made later are still collected as before."""
    gc.collect()
    gc.freeze()
    log.debug("memory settled: %d objects frozen", gc.get_freeze_count())


@dataclass
class Runtime:
    """Long-lived clients the agents share: CloudStack, SSH probes, BMCs, mail and traps."""

    settings: FencerSettings
    started_at: float
    _probes: Any = None
    _actuator: Any = None
    _notifier: Any = None
    _inventory: Any = None
    # listHosts and the event bus share what they learn about hosts (uuid -> cluster, name -> uuid)
    directory: HostDirectory = field(default_factory=HostDirectory)
    poller: Poller = field(init=False)
    ingest: Ingest = field(init=False)

    _store: Any = None
    _store_failed: bool = False
    _keyring: Any = None
    _actuation: Any = None
    # async (Notice) -> None, set by the topology: how the actuator's notices reach the topic
    notice_sink: Any = None
    # run -> (the last reminder's number, when it went out on the monotonic clock)
    _reminder_counts: dict[str, tuple[int, float]] = field(default_factory=dict)
    # run -> the last reminder's number, kept when the run's row leaves this worker (the
    # partition moved away, and may come back: its numbers go on, never an id already sent)
    _reminder_numbers: dict[str, int] = field(default_factory=dict)
    # in every reminder id: unique to this Runtime (process), so a restart never reuses an id
    reminder_tag: str = field(default_factory=lambda: secrets.token_hex(4))
    clock_id: str = CLOCK_ID  # this process (`written_by` of the entries its actuator wrote)
    _pins: Any = None  # streams.bmc_pins.BmcPinStore once it has read the topic
    # One start per service: the agents' actors (actuate runs 16) ask for it at the same time.
    _starting: dict[str, asyncio.Lock] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.poller = Poller(self.inventory, self.directory)
        self.poller.notify = self.emit_notice  # a listHosts outage is told (streams.poller)
        self.ingest = Ingest(self.inventory, self.directory)

    @property
    def policy(self) -> Policy:
        return self.settings.policy.to_policy()

    def _start_lock(self, service: str) -> asyncio.Lock:
        return self._starting.setdefault(service, asyncio.Lock())

    async def live(self) -> FencerSettings:
        """The file's settings overlaid with the settings topic (what the UI changed)."""
        if self._store is None and not self._store_failed:
            async with self._start_lock("settings"):
                await self._start_store()
        return self._store.settings if self._store is not None else self.settings

    async def _start_store(self) -> None:
        if self._store is None and not self._store_failed:
            from streams.settings_store import SettingsStore

            store = SettingsStore(self.settings, keyring=self.keyring())
            try:
                await store.start(within=15.0)
                self._store = store
            except Exception as exc:
                log.warning("settings topic unreadable, using the settings file only: %s", exc)
                self._store_failed = True

    @property
    def current(self) -> FencerSettings:
        """The live settings once read, else the file's."""
        return self._store.settings if self._store is not None else self.settings

    def cluster_paused(self, cluster: str) -> bool:
        if self._store is not None:
            return bool(self._store.is_paused(cluster))
        c = self.settings.clusters.get(cluster)
        return bool(c and c.paused)

    def globally_paused(self) -> bool:
        return bool(self._store.is_paused(None)) if self._store is not None else False

    def inventory(self) -> Any:
        if self._inventory is None:
            from probes.inventory import Inventory

            self._inventory = Inventory(self.settings)
        return self._inventory

    async def run_probe(self, request: ProbeRequest) -> ProbeResult:
        """One storage-activity check."""
        if self._probes is None:
            from probes.service import ProbeService

            self._probes = ProbeService(self.settings, inventory=self.inventory())
        result: ProbeResult = await self._probes.run(request)
        return result

    def keyring(self) -> Any:
        """The signing keys (fencing.signing.Keyring); KeyringError names the setting if none."""
        if self._keyring is None:
            from fencing.signing import load_keyring

            self._keyring = load_keyring(self.settings)
        return self._keyring

    def decision_is_signed(self, message: Any, required: bool = True) -> bool:
        """Whether a fence-decisions record carries the gate's signature (when not `required`
        and this worker holds no key, it cannot tell and says yes)."""
        from fencing.signing import DECISION, KeyringError, SignatureError, verify_bytes

        try:
            ring = self.keyring()
        except KeyringError:
            if required:
                raise
            return True
        try:
            verify_bytes(ring, DECISION, message.value)
        except SignatureError:
            return False
        return True

    def sign_decision(self, decision: FenceDecision) -> FenceDecision:
        """The decision with the gate's signature."""
        from fencing.signing import DECISION, sign

        signed = sign(self.keyring(), DECISION, decision.model_dump(mode="json"))
        return FenceDecision.model_validate(signed)

    async def start_actuation(self) -> None:
        """Start reading what the actuator's checks need (host states, claims, BMC pins) before
        the first decision arrives; retried on use."""
        try:
            await self.actuation()
        except Exception as exc:
            log.warning("actuate: cannot read the host-states or fence-claims topic yet: %s", exc)
        try:
            await self.bmc_pins()
        except Exception as exc:
            log.warning("actuate: cannot read the bmc-pins topic yet: %s", exc)

    async def actuation(self) -> Any:
        """The actuator's last-moment checks (streams.actuation.Actuation), started once."""
        if self._actuation is None:
            async with self._start_lock("actuation"):
                await self._start_actuation()
        return self._actuation

    async def _start_actuation(self) -> None:
        if self._actuation is None:
            from streams.actuation import Actuation

            act = Actuation(
                self.settings, self.keyring(), WORKER_ID, lambda h: self.inventory().host(h)
            )
            act.notify_to(self.emit_notice)  # a recreated topic's new log is told
            await act.start()
            self._actuation = act

    def actuator(self) -> Any:
        """The BMC actuator (fencing.actuator.Actuator); its notices go to `emit_notice`."""
        if self._actuator is None:
            from fencing.actuator import Actuator
            from fencing.storage_fence import StorageFencer
            from probes.host_disks import host_disks

            # The storage rung asks CloudStack where the host's disks are through a probe.
            rung = StorageFencer(self.settings, disks=partial(host_disks, self.settings))
            self._actuator = Actuator(self.settings, notify=self.emit_notice, storage_fencer=rung)
        return self._actuator

    def due_reminders(
        self, rows: Iterable[tuple[str, Any]], now: float, mono: float | None = None
    ) -> list[Notice]:
        """The fence_failed reminders due now, timed on this process's monotonic clock `mono`
        only (never the actuator's stamp against this worker's clock: two clocks).

        A failed run this process wrote itself (it saw the failure, whose notice went out then)
        is reminded of every `renotify_interval` from the moment it first saw the entry; one
        another process wrote (this worker restarted, or the partition moved here) at once,
        then every interval. Each reminder's id carries this process's tag (`reminder_tag`),
        so no id sent before a restart is ever computed again (the notify table would drop
        it: silence until some clock caught up)."""
        every = self.current.actuator.renotify_interval
        mono = time.monotonic() if mono is None else mono
        due: list[Notice] = []
        live: set[str] = set()
        for run in failed_runs(rows):
            series = f"{run.run_id}/{self.reminder_tag}"
            live.add(series)
            seen = self._reminder_counts.get(series)
            if seen is None:
                sent = self._reminder_numbers.get(series, 0)
                if run.written_by == self.clock_id:
                    self._reminder_counts[series] = (sent, mono)
                    continue
                seen = (sent, mono - every)  # another process's failure: remind now
            n, last = seen
            if mono - last < every:
                continue
            self._reminder_counts[series] = (n + 1, mono)
            self._reminder_numbers[series] = n + 1
            due.append(reminder(run, f"{series}/{n + 1}", n + 1, now))
        for gone in set(self._reminder_counts) - live:
            del self._reminder_counts[gone]  # retried, handled, or no longer this worker's
        return due

    async def emit_notice(self, notice: Notice) -> None:
        """Send a notice the actuator raised (VMs still down, ...) to the notices topic."""
        if self.notice_sink is None:
            log.error("notice %s (%s) has nowhere to go", notice.notice_id, notice.kind.value)
            return
        await self.notice_sink(notice)

    async def bmc_pins(self) -> Any:
        """The BMC pin store (topic bmc-pins), or one that refuses every fence while the topic
        cannot be read: a BMC whose identity cannot be checked is not used (fencing.identity)."""
        if self._pins is None:
            async with self._start_lock("pins"):
                if self._pins is None:
                    return await self._start_pins()
        return self._pins

    async def _start_pins(self) -> Any:
        from fencing.identity import PinStoreError
        from streams.bmc_pins import BmcPinStore

        store = BmcPinStore(self.settings)
        try:
            await store.start(within=15.0)
        except PinStoreError as exc:
            log.warning("BMC pins unreadable, fences refused until they are: %s", exc)
            return _UnreadablePins(str(exc))
        self._pins = store
        return store

    def notifier(self) -> Any:
        """The notify role's Notifier (built once, from the settings file's channels)."""
        if self._notifier is None:
            from notifiers.service import Notifier

            # A cluster's recipients as the API set them, read at each send (review4: the
            # file's lists were mailed, the operator's silently ignored).
            self._notifier = Notifier.from_settings(
                self.settings, recipients_for=lambda c: self.current.email_to_for(c)
            )
        return self._notifier

    async def notify(
        self,
        record: FenceDecision | FenceOutcome | Notice,
        table: MutableMapping[str, Any],
        key: str,
        channel: str | None = None,
    ) -> None:
        """Deliver a record's notification before returning (so the offset is committed after
        delivery): marked in the table per channel once its peer accepted it, at least once.
        `channel`: that channel only (the notify role's agent of that channel)."""
        from fencing.signing import KeyringError

        notifier = self.notifier()
        try:
            await self.live()
        except KeyringError:
            pass  # no signing key: the settings topic cannot be trusted, the file's lists apply
        await notifier.deliver(record, RowStore(table, key), forever=True, channel=channel)

    async def close(self) -> None:
        """Close every client."""
        if self._store is not None:
            await self._store.stop()
        if self._actuation is not None:
            await self._actuation.stop()
        if self._pins is not None:
            await self._pins.stop()
        for service in (self._probes, self._inventory):
            if service is not None:
                await service.close()


class _UnreadablePins:
    """A pin store that cannot be read: every identity check through it is refused."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def get(self, host_uuid: str) -> Any:
        from fencing.identity import PinStoreError

        raise PinStoreError(self.reason)

    async def put(self, pin: Any) -> None:
        from fencing.identity import PinStoreError

        raise PinStoreError(self.reason)

    def holders(self, guid: str) -> list[str]:
        from fencing.identity import PinStoreError

        raise PinStoreError(self.reason)
