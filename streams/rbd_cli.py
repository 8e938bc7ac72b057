"""`fencer rbd lift HOST` and `fencer rbd list`: an operator lifts a repaired host's Ceph
blocklist (fencing.storage_fence) or lists the entries; the host's address from CloudStack
(probes.host_disks) when it has no `storage_ip`."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from functools import partial
from typing import Any

from fencing.blocklist import Blocklister
from fencing.storage_fence import lift_host
from probes.host_disks import management_ip


def add_cli(sub: Any, lazy: Callable[[str], Callable[[argparse.Namespace], int]]) -> None:
    """The `rbd` subcommands of the `fencer` CLI (streams.cli)."""
    r = sub.add_parser("rbd", help="Ceph RBD storage fencing (blocklists)")
    rsub = r.add_subparsers(dest="rbd_command", required=True, metavar="SUBCOMMAND")
    lift = rsub.add_parser(
        "lift", help="lift the blocklist of a repaired host (its writes to Ceph work again)"
    )
    lift.add_argument("host", help="CloudStack host uuid")
    lift.add_argument("--address", help="storage address (default: storage_ip, else CloudStack's)")
    lift.add_argument("-c", "--config", help="settings file (YAML)")
    lift.set_defaults(func=lazy("streams.rbd_cli:cli_lift"))
    ls = rsub.add_parser("list", help="list the cluster's blocklist entries")
    ls.add_argument("-c", "--config", help="settings file (YAML)")
    ls.set_defaults(func=lazy("streams.rbd_cli:cli_list"))


def cli_lift(args: argparse.Namespace) -> int:
    """`fencer rbd lift HOST [--address IP] [-c FILE]`: an operator lifts a host's blocklist."""
    from fencing.settings import load_settings

    settings = load_settings(getattr(args, "config", None))
    lookup = partial(management_ip, settings)
    entry = asyncio.run(lift_host(settings, args.host, getattr(args, "address", None), lookup))
    print(f"blocklist {entry} lifted: host {args.host} can write to Ceph again")
    return 0


def cli_list(args: argparse.Namespace) -> int:
    """`fencer rbd list [-c FILE]`: every blocklist entry and its expiry."""
    import json

    from fencing.settings import load_settings

    settings = load_settings(getattr(args, "config", None))
    print(json.dumps(asyncio.run(Blocklister(settings.rbd).listed()), indent=2))
    return 0
