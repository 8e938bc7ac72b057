"""The storage rung of the fencing ladder: a Ceph blocklist of the host's storage address.

Setting `storage_fence` (cluster default, cluster or host override, like the IPMI fields):
`none` (never), `before` (blocklist and verify before the BMC action: the host's writes to
Ceph stop at once, whatever the BMC does), `fallback` (only when the BMC action failed or timed
out, after the engine's deadline). Only for actions that power the host down (stop, reboot).

Rules (the actuator applies them, fencing.actuator):
- A blocklist counts only once verified (fencing.blocklist `verify`: the entry is listed and no
  image of the host is watched from its address) AND none of the host's RBD images is watched
  from any other address either (a storage_ip that is wrong would otherwise verify an entry that
  cuts nothing off), unless `rbd.foreign_watchers` is `ignore` (rbd-mirror watches every image).
- Without a verified BMC power-off, a verified blocklist allows `declareHostAsDegraded` only for
  a host whose VMs' disks are ALL on RBD pools. A host with any NFS disk (or a disk on a pool of
  another type) is never restarted on a blocklist: a Ceph blocklist does not stop NFS writes.
- Its expiry outlives the BMC retries: max(`rbd.blocklist_expire`, `actuator.fence_deadline` +
  BLOCKLIST_MARGIN). It is lifted only by an operator: `fencer rbd lift HOST` or the web UI's
  "Lift blocklist" button (both write a `lift_blocklist` record to the operator-actions topic;
  the actuate worker, which holds the fence key, lifts it: streams.actuating.lift_blocklist),
  `fencer rbd lift HOST --direct` where the fence key is, or `ceph osd blocklist rm <ip>:0/0`
  with the fence key; fencer never lifts it on its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fencing.blocklist import Blocklister, BlocklistError, entry_for
from fencing.settings import FencerSettings

BLOCKLIST_MARGIN = 3600.0  # seconds a blocklist outlives the fence deadline at least
VERIFY_POLL = 0.5  # seconds between verification attempts


def blocklist_expiry(settings: FencerSettings) -> float:
    """Seconds a fence's blocklist lasts unless lifted: it outlives the BMC retry deadline."""
    return max(settings.rbd.blocklist_expire, settings.actuator.fence_deadline + BLOCKLIST_MARGIN)


def lift_hint(host_uuid: str, entry: str) -> str:
    """How an operator lifts it (notices, logs, the outcome)."""
    return (
        f"it stays until an operator lifts it once the host is repaired: "
        f"`fencer rbd lift {host_uuid}` (or `ceph osd blocklist rm {entry}` with the fence key)"
    )


@dataclass(frozen=True)
class HostDisks:
    """Where the disks of the VMs CloudStack places on a host live."""

    address: str  # the host's storage (Ceph network) address
    images: tuple[str, ...]  # `pool/image` of its RBD disks
    nfs_disks: int
    other_disks: int  # on pools of other types, or with names no Ceph image spec allows
    vms: int

    @property
    def rbd_only(self) -> bool:
        """Every disk is on RBD: a verified blocklist stops all of the host's writes."""
        return self.nfs_disks == 0 and self.other_disks == 0


@dataclass(frozen=True)
class StorageFenceResult:
    """What the storage rung did."""

    host_uuid: str
    address: str | None
    entry: str | None
    verified: bool
    rbd_only: bool
    detail: str  # one line: `blocklist <entry> verified ...` or why not
    disks: HostDisks | None = None

    @property
    def allows_restart(self) -> bool:
        """A verified blocklist of a host whose VMs are all on RBD."""
        return self.verified and self.rbd_only

    @property
    def why_no_restart(self) -> str:
        """Why the VMs are not restarted on this blocklist ('' if they may be)."""
        if not self.verified:
            return self.detail
        if not self.rbd_only and self.disks is not None:
            return (
                f"{self.detail}, but the host has {self.disks.nfs_disks} NFS disk(s) and "
                f"{self.disks.other_disks} other non-RBD disk(s): a Ceph blocklist does not "
                "stop NFS writes, so its VMs are not restarted without a verified power-off"
            )
        return ""

    def text(self) -> str:
        """The line for the outcome and the notice: what was done and how to lift it."""
        if self.entry is None:
            return self.detail
        return f"{self.detail}; {lift_hint(self.host_uuid, self.entry)}"


class DiskLookupError(Exception):
    """CloudStack could not say where a host's disks are; the text is safe to publish."""


# host uuid -> where its VMs' disks are (probes.host_disks asks CloudStack); the shell passes it,
# so that fencing imports no probe. Raises DiskLookupError.
DiskLookup = Callable[[str], Awaitable[HostDisks]]
# host uuid -> CloudStack's address of the host (for a host without `storage_ip`).
AddressLookup = Callable[[str], Awaitable[str]]


class StorageFencer:
    """Blocklists a host's storage address with the fence key and verifies it took."""

    def __init__(
        self,
        settings: FencerSettings,
        blocklister: Blocklister | None = None,
        verify_timeout: float | None = None,
        disks: DiskLookup | None = None,
    ) -> None:
        self.settings = settings
        self.disks = disks
        self.blocklister = blocklister or Blocklister(settings.rbd)
        # Watches of a blocklisted address drop within a fraction of a second; a wait longer
        # than a few Ceph round trips means something still holds the images.
        self.verify_timeout = (
            verify_timeout if verify_timeout is not None else max(5.0, settings.rbd.connect_timeout)
        )

    async def fence(self, host_uuid: str) -> StorageFenceResult:
        """Blocklist the host's storage address, then verify; never raises."""
        if self.disks is None:
            return StorageFenceResult(
                host_uuid, None, None, False, False, "blocklist not done: no disk lookup given"
            )
        try:
            disks = await self.disks(host_uuid)
        except DiskLookupError as exc:
            return StorageFenceResult(
                host_uuid, None, None, False, False, f"blocklist not done: {exc}"
            )
        address = disks.address
        try:
            entry = entry_for(address)
        except ValueError as exc:
            return StorageFenceResult(
                host_uuid, address, None, False, disks.rbd_only, f"blocklist not done: {exc}", disks
            )
        expire = blocklist_expiry(self.settings)
        try:
            await self.blocklister.blocklist(address, expire)
        except (BlocklistError, ValueError) as exc:
            return StorageFenceResult(
                host_uuid,
                address,
                None,
                False,
                disks.rbd_only,
                f"blocklist of {entry} failed: {exc}",
                disks,
            )
        verified, why = await self._verify(address, list(disks.images))
        if verified:
            detail = (
                f"blocklist {entry} verified (listed, no watcher left on "
                f"{len(disks.images)} RBD image(s); expires in {expire:.0f} s unless lifted)"
            )
        else:
            detail = f"blocklist {entry} added but not verified: {why}"
        return StorageFenceResult(
            host_uuid, address, entry, verified, disks.rbd_only, detail, disks
        )

    async def _verify(self, address: str, images: list[str]) -> tuple[bool, str]:
        """Poll until the entry is listed and no image is watched (by the host, or by anyone
        unless foreign watchers are ignored); (verified, why not)."""
        ends = time.monotonic() + self.verify_timeout
        strict = self.settings.rbd.foreign_watchers == "unknown"
        while True:
            v = await self.blocklister.verify(address, images)
            why = v.detail
            ok = v.ok
            if ok and strict:
                try:
                    left = await self.blocklister.watchers(images)
                except BlocklistError as exc:
                    ok, why = False, str(exc)
                else:
                    if left:
                        ok = False
                        why = (
                            f"{left[0]} still watches the host's image from another address "
                            "(is the host's storage_ip right?)"
                        )
            if ok:
                return True, ""
            if time.monotonic() >= ends:
                return False, why
            await asyncio.sleep(VERIFY_POLL)


async def lift_host(
    settings: FencerSettings,
    host_uuid: str,
    address: str | None = None,
    management_ip: AddressLookup | None = None,
) -> str:
    """Remove the blocklist of a host's storage address; the entry removed. Without `address`
    the host's `storage_ip`, else CloudStack's address through `management_ip`."""
    if address is None:
        h = settings.hosts.get(host_uuid)
        if h is not None and h.storage_ip:
            address = h.storage_ip
        elif management_ip is not None:
            address = settings.storage_ip_for(host_uuid, await management_ip(host_uuid))
        else:
            raise ValueError(f"host {host_uuid}: no storage_ip set; give its storage address")
    return await Blocklister(settings.rbd).lift(address)
