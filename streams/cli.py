"""The `fencer` command. Each subcommand lives in the module that owns its work; this file only
parses arguments, turns known errors into one clear line on stderr and an exit code, and never
shows a traceback to an operator (set FENCER_DEBUG=1 to see one)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _config_check(args: argparse.Namespace) -> int:
    from fencing.settings import SettingsError, load_settings, redacted_dump, settings_warnings

    try:
        settings = load_settings(args.file)
    except SettingsError as exc:
        print(f"fencer: {exc}", file=sys.stderr)
        return EXIT_FAIL
    from fencing.settings import kafka_tls_file_problems

    problems = [] if args.skip_files else kafka_tls_file_problems(settings.kafka)
    for where, problem in problems:
        print(f"fencer: {where}: {problem}", file=sys.stderr)
    for warning in settings_warnings(settings):
        print(f"warning: {warning}", file=sys.stderr)
    if problems:
        return EXIT_FAIL
    print(json.dumps(redacted_dump(settings), indent=2, sort_keys=False))
    return EXIT_OK


def _fence_operator(args: argparse.Namespace) -> int:
    """`fencer fence retry|handled HOST`: write the operator's answer to a failed fence."""
    import asyncio
    import getpass
    import time

    from aiokafka.errors import KafkaError

    from fencing.records import OperatorAction
    from fencing.settings import load_settings
    from streams.actuating import send_operator_action

    settings = load_settings(args.config)
    action = OperatorAction(
        kind=args.fence_command,
        host_uuid=args.host,
        decision_id=args.decision,
        by=args.by or f"cli:{getpass.getuser()}",
        note=args.note,
        at=time.time(),
    )
    try:
        asyncio.run(asyncio.wait_for(send_operator_action(settings, action), args.timeout))
    except (TimeoutError, OSError, KafkaError) as exc:
        where = settings.kafka.bootstrap_servers
        print(f"fencer: cannot write to Kafka at {where}: {exc or 'timed out'}", file=sys.stderr)
        return EXIT_FAIL
    what = "retry of" if action.kind == "retry" else "handled mark for"
    target = f"decision {action.decision_id}" if action.decision_id else "its latest failed fence"
    print(f"sent: {what} host {action.host_uuid}, {target}")
    return EXIT_OK


def _lazy(target: str) -> Callable[[argparse.Namespace], int]:
    """A handler that imports `module:function` only when its subcommand runs."""

    def run(args: argparse.Namespace) -> int:
        module, _, func = target.partition(":")
        handler: Callable[[argparse.Namespace], int] = getattr(
            importlib.import_module(module), func
        )
        return handler(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    """All subcommands and their options."""
    p = argparse.ArgumentParser(prog="fencer", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("broker", help="run the embedded Kafka-compatible broker (Tansu)")
    b.add_argument("--port", type=int, default=0, help="loopback port (0 = a free one)")
    b.add_argument("--no-topics", action="store_true", help="do not create fencer's topics")
    b.set_defaults(func=_lazy("streams.broker:cli_broker"))

    c = sub.add_parser("config", help="settings")
    csub = c.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    cc = csub.add_parser("check", help="validate a settings file and print it, secrets redacted")
    cc.add_argument("file", help="the YAML settings file")
    cc.add_argument(
        "--skip-files",
        action="store_true",
        help="do not open the files it names (a file written for another machine)",
    )
    cc.set_defaults(func=_config_check)

    e = sub.add_parser("events", help="CloudStack event bus records")
    esub = e.add_subparsers(dest="events_command", required=True, metavar="SUBCOMMAND")
    ep = esub.add_parser("parse", help="classify records given as JSON lines {key, value}")
    ep.add_argument("file", nargs="?", default="-", help="input file (default: stdin)")
    ep.set_defaults(func=_lazy("streams.parser:cli_parse"))

    w = sub.add_parser("worker", help="run the fencer service (Faust worker)")
    w.add_argument("-c", "--config", help="settings file (YAML)")
    w.add_argument(
        "--roles",
        default="all",
        help="comma list of ingest,probe,actuate,notify (default: all in one process)",
    )
    w.set_defaults(func=_lazy("streams.worker_cli:cli_worker"))

    d = sub.add_parser("demo", help="play the demo story on the embedded broker and the lab")
    d.add_argument("--list", action="store_true", help="name the scenarios and exit")
    d.add_argument("--scenario", action="append", default=[], help="play this scenario")
    d.add_argument("--json", action="store_true", help="one JSON object per timeline event")
    d.add_argument("--fast", action="store_true", help="shorter intervals")
    d.set_defaults(func=_lazy("lab.demo:cli_demo"))

    i = sub.add_parser("ipmi", help="BMC operations through a host's effective settings")
    isub = i.add_subparsers(dest="ipmi_command", required=True, metavar="SUBCOMMAND")
    it = isub.add_parser("test", help="run the test action (no power change) and print it")
    it.add_argument("--host", required=True, help="CloudStack host uuid")
    it.add_argument("--cluster", help="cluster uuid (looked up through the API if omitted)")
    it.add_argument("-c", "--config", help="settings file (YAML)")
    it.set_defaults(func=_lazy("streams.ipmi_cli:cli_ipmi_test"))
    ip = isub.add_parser(
        "pin", help="confirm the BMC's identity: pin the system GUID it reports now"
    )
    ip.add_argument("host", help="CloudStack host uuid")
    ip.add_argument("--cluster", help="cluster uuid (looked up through the API if omitted)")
    ip.add_argument("--expect", help="refuse unless the BMC reports this GUID")
    ip.add_argument("--by", help="who confirms (default: the login name)")
    ip.add_argument("-c", "--config", help="settings file (YAML)")
    ip.set_defaults(func=_lazy("streams.bmc_pins:cli_ipmi_pin"))
    iu = isub.add_parser(
        "unpin", help="remove a host's BMC pin: its next pre-flight pins what the BMC reports"
    )
    iu.add_argument("host", help="CloudStack host uuid")
    iu.add_argument("--by", help="who removes it (default: the login name)")
    iu.add_argument("-c", "--config", help="settings file (YAML)")
    iu.set_defaults(func=_lazy("streams.ipmi_cli:cli_ipmi_unpin"))

    f = sub.add_parser("fence", help="answer a failed fence (stops the fence_failed reminders)")
    fsub = f.add_subparsers(dest="fence_command", required=True, metavar="SUBCOMMAND")
    for name, text in (
        ("retry", "run the host's failed fence again now (same decision)"),
        ("handled", "mark the host's failed fence handled by a person: no more reminders"),
    ):
        fp = fsub.add_parser(name, help=text)
        fp.add_argument("host", help="CloudStack host uuid")
        fp.add_argument("--decision", help="decision id (default: the host's latest failed fence)")
        fp.add_argument("--by", help="who acts (default: cli:<user>)")
        fp.add_argument("--note", help="free text kept with the record")
        fp.add_argument("--timeout", type=float, default=30.0, help="seconds to reach Kafka")
        fp.add_argument("-c", "--config", help="settings file (YAML)")
        fp.set_defaults(func=_fence_operator)
    importlib.import_module("streams.rbd_cli").add_cli(sub, _lazy)  # `fencer rbd lift`

    a = sub.add_parser("api", help="run the REST API and web UI (the IPMI tab)")
    a.add_argument("-c", "--config", help="settings file (YAML)")
    a.set_defaults(func=_lazy("webui.cli:cli_api"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fencer` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("FENCER_DEBUG"):
            raise
        from fencing.settings import SettingsError

        if isinstance(exc, SettingsError):
            print(f"fencer: {exc}", file=sys.stderr)
        else:
            print(f"fencer: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
