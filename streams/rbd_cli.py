"""`fencer rbd lift HOST` and `fencer rbd list`: an operator lifts a repaired host's Ceph
blocklist (fencing.storage_fence) or lists the entries; the host's address from CloudStack
(probes.host_disks) when it has no `storage_ip`."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from fencing.blocklist import Blocklister, BlocklistError
from fencing.storage_fence import lift_host
from probes.host_disks import management_ip
from probes.inventory import InventoryError

if TYPE_CHECKING:
    from fencing.records import OperatorAction
    from fencing.settings import FencerSettings


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
    lift.add_argument(
        "--entry",
        help="the entry to lift (default: the one fencer's records show for --address, else "
        "the latest): a worker lifts only that entry, never a newer blocklist of the host",
    )
    lift.add_argument("--timeout", type=float, default=30.0, help="seconds to reach Kafka")
    lift.set_defaults(func=lazy("streams.rbd_cli:cli_lift"))
    ls = rsub.add_parser("list", help="list the cluster's blocklist entries")
    ls.add_argument("-c", "--config", help="settings file (YAML)")
    ls.set_defaults(func=lazy("streams.rbd_cli:cli_list"))


def cli_lift(args: argparse.Namespace) -> int:
    """`fencer rbd lift HOST [--address IP] [--direct] [-c FILE]`: an operator lifts a host's
    blocklist, through the actuate workers (the operator-actions topic, as the web UI does) or,
    with --direct, here with the fence key."""
    import getpass
    import sys

    from aiokafka.errors import KafkaError

    from fencing.records import OperatorAction
    from fencing.settings import load_settings
    from streams.actuating import send_operator_action

    settings = load_settings(getattr(args, "config", None))
    address = getattr(args, "address", None)
    action = OperatorAction(
        kind="lift_blocklist",
        host_uuid=args.host,
        decision_id=None,
        address=address,
        by=getattr(args, "by", None) or f"cli:{getpass.getuser()}",
        at=time.time(),
    )
    timeout = getattr(args, "timeout", 30.0)
    if not getattr(args, "direct", False):
        # Name the entry fencer's records show, as the web UI does (streams.actuating).
        from streams.actuating import lift_identity, read_recorded_entries

        try:
            recorded = asyncio.run(
                asyncio.wait_for(read_recorded_entries(settings, args.host), timeout)
            )
        except Exception as exc:
            where = settings.kafka.bootstrap_servers
            print(f"fencer: cannot read fencer's records at {where}: {exc}", file=sys.stderr)
            return 1
        named = getattr(args, "entry", None)
        if named is not None and named not in recorded:
            print(
                f"fencer: fencer's records show no entry {named} for host {args.host} "
                "(give --address for an entry fencer did not add)",
                file=sys.stderr,
            )
            return 1
        entry, fence = lift_identity(recorded, address, named)
        action = action.model_copy(update={"blocklist_entry": entry, "decision_id": fence})
        if entry is not None:
            print(f"lifting entry {entry} (added by fence {fence or 'unknown'})")
    if getattr(args, "direct", False):
        lookup = partial(management_ip, settings)
        try:
            entry = asyncio.run(lift_host(settings, args.host, address, lookup))
        except (BlocklistError, InventoryError, ValueError) as exc:
            print(f"fencer: blocklist NOT lifted: {exc}", file=sys.stderr)
            _notify_direct(settings, action, None, str(exc), timeout)
            return 1
        print(f"blocklist {entry} lifted: host {args.host} can write to Ceph again")
        _notify_direct(settings, action, entry, None, timeout)
        return 0
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


def _notify_direct(
    settings: FencerSettings,
    action: OperatorAction,
    entry: str | None,
    error: str | None,
    timeout: float,
) -> None:
    """Tell people about a --direct lift as the worker does (BLOCKLIST-LIFTED or -NOT-LIFTED,
    through the notices topic); Kafka down is said on stderr, the lift stands."""
    import sys

    from fencing.records import HostRef
    from fencing.redaction import Redactor, secrets_of
    from streams.actuating import lift_notice, send_notice

    why = Redactor(secrets_of(settings))(error) if error is not None else None
    notice = lift_notice(action, HostRef(host_uuid=action.host_uuid), entry, why, time.time())
    try:
        asyncio.run(asyncio.wait_for(send_notice(settings, notice), timeout))
    except Exception as exc:
        where = settings.kafka.bootstrap_servers
        print(
            f"fencer: the lift notice was NOT sent (Kafka at {where}: {exc or 'timed out'}): "
            "tell the others yourself",
            file=sys.stderr,
        )


def cli_list(args: argparse.Namespace) -> int:
    """`fencer rbd list [-c FILE]`: every blocklist entry and its expiry."""
    import json

    from fencing.settings import load_settings

    settings = load_settings(getattr(args, "config", None))
    print(json.dumps(asyncio.run(Blocklister(settings.rbd).listed()), indent=2))
    return 0
