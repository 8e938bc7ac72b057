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

import argparse
import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


async def _all_vms(inv: Any, host_uuid: str) -> list[dict[str, Any]]:
    """Every VM CloudStack places on the host, in any state, account or project."""
    plain, projects = await asyncio.gather(
        inv._list("listVirtualMachines", hostid=host_uuid, listall=True),
        inv._list("listVirtualMachines", hostid=host_uuid, listall=True, projectid="-1"),
    )
    seen: dict[str, dict[str, Any]] = {}
    for vm in [*plain, *projects]:
        seen.setdefault(vm["id"], vm)
    return list(seen.values())


async def host_disks(settings: FencerSettings, host_uuid: str) -> HostDisks:
    """Ask CloudStack (listHosts, listVirtualMachines hostid, listVolumes, listStoragePools
    types) where the host's VMs' disks are. Raises probes.inventory.InventoryError."""
    from probes.inventory import NFS_POOL_TYPES, RBD_POOL_TYPES, Inventory, rbd_disk_path
    from probes.rbd import spec_of

    inv = Inventory(settings)
    try:
        host, vms, pools = await asyncio.gather(
            inv.host(host_uuid), _all_vms(inv, host_uuid), inv.pools()
        )
        volumes = await asyncio.gather(*(inv.volumes(vm) for vm in vms))
    finally:
        await inv.close()
    by_uuid = {p.uuid: p for p in pools}
    images: list[str] = []
    nfs = other = 0
    for vols in volumes:
        for vol in vols:
            pool = by_uuid.get(vol.get("storageid", ""))
            if pool is not None and pool.type in RBD_POOL_TYPES:
                key = rbd_disk_path(pool, vol.get("path") or "")
                spec = spec_of(key) if key else None
                if spec is None:
                    other += 1
                elif spec not in images:
                    images.append(spec)
            elif pool is not None and pool.type in NFS_POOL_TYPES:
                nfs += 1
            else:
                other += 1
    address = settings.storage_ip_for(host_uuid, host.ip)
    return HostDisks(address, tuple(images), nfs, other, len(vms))


class StorageFencer:
    """Blocklists a host's storage address with the fence key and verifies it took."""

    def __init__(
        self,
        settings: FencerSettings,
        blocklister: Blocklister | None = None,
        verify_timeout: float | None = None,
    ) -> None:
        self.settings = settings
        self.blocklister = blocklister or Blocklister(settings.rbd)
        # Watches of a blocklisted address drop within a fraction of a second; a wait longer
        # than a few Ceph round trips means something still holds the images.
        self.verify_timeout = (
            verify_timeout if verify_timeout is not None else max(5.0, settings.rbd.connect_timeout)
        )

    async def fence(self, host_uuid: str) -> StorageFenceResult:
        """Blocklist the host's storage address, then verify; never raises."""
        from probes.inventory import InventoryError

        try:
            disks = await host_disks(self.settings, host_uuid)
        except InventoryError as exc:
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


# -------------------------------------------------------------------------------------------
# Operators: `fencer rbd lift HOST`


def add_cli(sub: Any, lazy: Callable[[str], Callable[[argparse.Namespace], int]]) -> None:
    """The `rbd` subcommands of the `fencer` CLI (streams.cli)."""
    r = sub.add_parser("rbd", help="Ceph RBD storage fencing (blocklists)")
    rsub = r.add_subparsers(dest="rbd_command", required=True, metavar="SUBCOMMAND")
    lift = rsub.add_parser(
        "lift",
        help="lift the blocklist of a repaired host (its writes to Ceph work again): sent to "
        "the actuate workers through the operator-actions topic, or done here with --direct",
    )
    lift.add_argument("host", help="CloudStack host uuid")
    lift.add_argument("--address", help="storage address (default: storage_ip, else CloudStack's)")
    lift.add_argument("-c", "--config", help="settings file (YAML)")
    lift.add_argument(
        "--direct",
        action="store_true",
        help="lift it from this machine with rbd.fence_keyring (when no worker runs)",
    )
    lift.add_argument("--by", help="who acts (default: cli:<user>)")
    lift.add_argument("--timeout", type=float, default=30.0, help="seconds to reach Kafka")
    lift.set_defaults(func=lazy("fencing.storage_fence:cli_lift"))
    ls = rsub.add_parser("list", help="list the cluster's blocklist entries")
    ls.add_argument("-c", "--config", help="settings file (YAML)")
    ls.set_defaults(func=lazy("fencing.storage_fence:cli_list"))


async def lift_host(settings: FencerSettings, host_uuid: str, address: str | None = None) -> str:
    """Remove the blocklist of a host's storage address; the entry removed."""
    if address is None:
        h = settings.hosts.get(host_uuid)
        if h is not None and h.storage_ip:
            address = h.storage_ip
        else:
            from probes.inventory import Inventory

            inv = Inventory(settings)
            try:
                address = settings.storage_ip_for(host_uuid, (await inv.host(host_uuid)).ip)
            finally:
                await inv.close()
    return await Blocklister(settings.rbd).lift(address)


def cli_lift(args: argparse.Namespace) -> int:
    """`fencer rbd lift HOST [--address IP] [--direct] [-c FILE]`: an operator lifts a host's
    blocklist, through the actuate workers (the operator-actions topic, as the web UI does) or,
    with --direct, here with the fence key."""
    import getpass
    import sys

    from fencing.settings import load_settings

    settings = load_settings(getattr(args, "config", None))
    address = getattr(args, "address", None)
    if getattr(args, "direct", False):
        try:
            entry = asyncio.run(lift_host(settings, args.host, address))
        except (BlocklistError, ValueError) as exc:
            print(f"fencer: blocklist NOT lifted: {exc}", file=sys.stderr)
            return 1
        print(f"blocklist {entry} lifted: host {args.host} can write to Ceph again")
        return 0
    from aiokafka.errors import KafkaError

    from fencing.records import OperatorAction
    from streams.actuating import send_operator_action

    action = OperatorAction(
        kind="lift_blocklist",
        host_uuid=args.host,
        decision_id=None,
        address=address,
        by=getattr(args, "by", None) or f"cli:{getpass.getuser()}",
        at=time.time(),
    )
    timeout = getattr(args, "timeout", 30.0)
    try:
        asyncio.run(asyncio.wait_for(send_operator_action(settings, action), timeout))
    except (TimeoutError, OSError, KafkaError) as exc:
        where = settings.kafka.bootstrap_servers
        print(f"fencer: cannot write to Kafka at {where}: {exc or 'timed out'}", file=sys.stderr)
        return 1
    print(
        f"sent: lift of host {args.host}'s blocklist; an actuate worker lifts it "
        "(its log says so; `fencer rbd list` shows what is left)"
    )
    return 0


def cli_list(args: argparse.Namespace) -> int:
    """`fencer rbd list [-c FILE]`: every blocklist entry and its expiry."""
    import json

    from fencing.settings import load_settings

    settings = load_settings(getattr(args, "config", None))
    print(json.dumps(asyncio.run(Blocklister(settings.rbd).listed()), indent=2))
    return 0
