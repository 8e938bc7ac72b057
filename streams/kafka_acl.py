"""Who may do what on Kafka: one principal per role, the topics it reads and writes (one table).

The compose deployment's broker setup script (`compose/kafka/setup.sh`) is generated from this
table, and the tests check the table against the Faust app of each role (`streams.app`) and the
script against the table:

    python -m streams.kafka_acl [-c fencer.yaml] > compose/kafka/setup.sh

A principal's name is at once its SASL (SCRAM) user name and the common name of its client
certificate, so it is the same Kafka principal `User:<name>` on a SASL_SSL listener and on the
broker's mutual-TLS admin listener (`ssl.principal.mapping.rules` maps `CN=<name>` to `<name>`).

Topics are named by their `TopicNames` field; the script uses the names of the settings given.
Every fencer principal may also DESCRIBE every fencer topic (metadata only: `ensure_topics` and
Faust see that the topics exist and create none), and a Faust role owns its consumer group and
its internal topics (table changelogs, the assignor's leader topic), all prefixed by its app id.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from fencing.settings import FencerSettings, TopicNames

ROLES = ("ingest", "probe", "actuate", "notify")  # the same as streams.app.ROLES (tested)


@dataclass(frozen=True)
class Principal:
    """One Kafka principal: a compose service (or CloudStack), its roles and its topics."""

    name: str
    service: str | None  # the compose service that runs as this principal (None: outside)
    roles: tuple[str, ...] = ()  # fencer worker roles (a Faust app); () for the API, CloudStack
    read: frozenset[str] = field(default_factory=frozenset)  # TopicNames fields
    write: frozenset[str] = field(default_factory=frozenset)
    why: str = ""


def _f(*names: str) -> frozenset[str]:
    unknown = set(names) - set(TopicNames.model_fields)
    if unknown:
        raise ValueError(f"not a kafka.topics field: {', '.join(sorted(unknown))}")
    return frozenset(names)


PRINCIPALS: tuple[Principal, ...] = (
    Principal(
        "fencer-ingest",
        "ingest",
        ("ingest",),
        read=_f(
            "cloudstack",
            "host_signals",
            "probe_results",
            "fence_decisions",
            "fence_outcomes",
            "fence_proposals",
            "settings",
        ),
        # The gate is part of the ingest role: the only writer of fence decisions.
        write=_f(
            "host_signals",
            "probe_requests",
            "fence_proposals",
            "fence_decisions",
            "host_states",
            "notices",
            "dead_letter",
        ),
        why="CloudStack events and listHosts, the per-host state machine, the gate",
    ),
    Principal(
        "fencer-probe",
        "probe",
        ("probe",),
        read=_f("probe_requests"),
        write=_f("probe_results"),
        why="asks a neighbour over SSH, answers with a probe result",
    ),
    Principal(
        "fencer-actuate",
        "actuator",
        ("actuate",),
        read=_f(
            "fence_decisions",
            "operator_actions",
            "host_states",
            "fence_claims",
            "bmc_pins",
            "settings",
        ),
        write=_f(
            "fence_outcomes", "fence_claims", "bmc_pins", "ipmi_tests", "notices", "dead_letter"
        ),
        why="powers hosts off: reads signed decisions, claims them, writes outcomes; answers "
        "the UI's BMC tests",
    ),
    Principal(
        "fencer-notify",
        "notifier",
        ("notify",),
        # The settings: a cluster's mail recipients as the UI set them, read at each send.
        read=_f("fence_decisions", "fence_outcomes", "notices", "settings"),
        write=_f(),
        why="mails and traps: only reads fencer's topics",
    ),
    Principal(
        "fencer-api",
        "api",
        (),
        read=_f(
            "settings",
            "audit",
            "bmc_pins",
            "host_signals",
            "probe_results",
            "fence_decisions",
            "fence_outcomes",
            "notices",
            "host_states",
            "ipmi_tests",
        ),
        # The only writer of settings and of the audit log; operator actions are the UI's
        # retry/handled/lift/test-BMC/confirm-BMC buttons (and `fencer fence retry|handled`,
        # `fencer rbd lift`, run with the API's identity); the BMC test and the BMC pin itself
        # run in an actuate worker, so the API only reads bmc-pins.
        write=_f("settings", "audit", "operator_actions", "notices"),
        why="the REST API and web UI",
    ),
    Principal(
        "cloudstack-events",
        None,
        read=_f(),
        write=_f("cloudstack"),
        why="CloudStack's Kafka event bus plugin (on the management servers)",
    ),
)

# The broker itself (its own certificate: inter-broker and controller listeners) and the setup
# job's admin certificate: Kafka super users, on the unpublished mutual-TLS listeners only.
BROKER = "kafka"
ADMIN = "fencer-admin"
SUPER_USERS = (BROKER, ADMIN)
SCRAM_MECHANISM = "SCRAM-SHA-512"


def principal(name: str) -> Principal:
    """The principal of that name (KeyError naming it if there is none)."""
    for p in PRINCIPALS:
        if p.name == name:
            return p
    raise KeyError(f"no Kafka principal {name!r}")


def app_id(p: Principal, settings: FencerSettings) -> str | None:
    """The Faust app id (consumer group, internal topic prefix) of a worker principal."""
    if not p.roles:
        return None
    return settings.group_for(p.roles, ROLES)


@dataclass(frozen=True, order=True)
class Grant:
    """One ACL: allow `principal` `operation` on a resource (literal or prefixed name)."""

    principal: str
    operation: str  # Read, Write, Describe, Create
    resource: str  # topic | group
    name: str
    pattern: str = "literal"  # literal | prefixed

    def argv(self) -> list[str]:
        """kafka-acls.sh arguments after `--add`."""
        out = ["--allow-principal", f"User:{self.principal}", "--operation", self.operation]
        out += [f"--{self.resource}", self.name]
        if self.pattern != "literal":
            out += ["--resource-pattern-type", self.pattern]
        return out


def grants(settings: FencerSettings) -> list[Grant]:
    """Every ACL of the deployment, sorted; nothing else is allowed (no ACL = denied)."""
    topics = settings.kafka.topics.model_dump()
    out: set[Grant] = set()
    for p in PRINCIPALS:
        for f in p.read:
            out.add(Grant(p.name, "Read", "topic", topics[f]))
        for f in p.write:
            out.add(Grant(p.name, "Write", "topic", topics[f]))
        if p.service is None:
            continue
        for name in topics.values():
            out.add(Grant(p.name, "Describe", "topic", name))
        aid = app_id(p, settings)
        if aid is not None:
            out.add(Grant(p.name, "Read", "group", aid))
            for op in ("Create", "Read", "Write", "Describe"):
                out.add(Grant(p.name, op, "topic", f"{aid}-", "prefixed"))
    return sorted(out)


def _quote(word: str) -> str:
    import shlex

    return shlex.quote(word)


def render_setup_script(settings: FencerSettings) -> str:
    """The broker setup job: SCRAM users, topics, ACLs (idempotent; run by `kafka-setup`)."""
    from streams.kafka import topic_specs

    lines = [
        "#!/bin/bash",
        "# GENERATED by `python -m streams.kafka_acl -c compose/fencer.yaml`: do not edit;",
        "# the table is streams/kafka_acl.py (tests/compose/test_kafka_security.py checks both).",
        "# Runs in the kafka-setup service (apache/kafka image) against the broker's mutual-TLS",
        "# ADMIN listener as the super user fencer-admin. Idempotent: run it again after a change.",
        "set -euo pipefail",
        'BOOT="${KAFKA_SETUP_BOOTSTRAP:-kafka:9094}"',
        'CFG="${KAFKA_SETUP_CONFIG:-/etc/kafka/setup/admin.properties}"',
        'SECRETS="${KAFKA_SETUP_SECRETS:-/run/secrets}"',
        'BIN="${KAFKA_SETUP_BIN:-/opt/kafka/bin}"',
        "",
        "# A principal's SCRAM credential from its secret file; the password goes through a",
        "# private temporary file, never through a command line (/proc/*/cmdline).",
        "scram() {",
        '  local f; f=$(mktemp); chmod 600 "$f"',
        f"  printf '{SCRAM_MECHANISM}=[iterations=8192,password=%s]\\n' "
        '"$(tr -d \'\\n\' < "$SECRETS/kafka_sasl_$1")" > "$f"',
        '  "$BIN/kafka-configs.sh" --bootstrap-server "$BOOT" --command-config "$CFG" \\',
        '    --alter --entity-type users --entity-name "$1" --add-config-file "$f"',
        '  rm -f "$f"',
        "}",
        "topic() {",
        '  "$BIN/kafka-topics.sh" --bootstrap-server "$BOOT" --command-config "$CFG" \\',
        '    --create --if-not-exists "$@"',
        "}",
        "acl() {",
        '  "$BIN/kafka-acls.sh" --bootstrap-server "$BOOT" --command-config "$CFG" --add "$@"',
        "}",
        "",
        f"# -- SCRAM users ({SCRAM_MECHANISM}), one per principal",
    ]
    for p in PRINCIPALS:
        lines.append(f"scram {p.name}")
    lines += ["", "# -- topics (partitions and configs from streams.kafka.topic_specs)"]
    for spec in topic_specs(settings):
        args = [
            "--topic",
            spec.name,
            "--partitions",
            str(spec.partitions),
            "--replication-factor",
            str(spec.replication_factor),
        ]
        for k, v in sorted(spec.configs.items()):
            args += ["--config", f"{k}={v}"]
        lines.append("topic " + " ".join(_quote(a) for a in args))
    lines += [
        "",
        "# -- ACLs: everything not listed is denied (allow.everyone.if.no.acl.found=false)",
    ]
    current = None
    for g in grants(settings):
        if g.principal != current:
            current = g.principal
            lines.append(f"# {current}: {principal(current).why}")
        lines.append("acl " + " ".join(_quote(a) for a in g.argv()))
    lines += ["", 'echo "kafka-setup: users, topics and ACLs are in place"', ""]
    return "\n".join(lines)


def parse_setup_script(text: str) -> list[Grant]:
    """The ACLs a setup script adds (for the tests and for reviewing a hand-edited script)."""
    import shlex

    out = []
    for line in text.splitlines():
        if not line.startswith("acl "):
            continue
        words = shlex.split(line, comments=True)
        if not words or words[0] != "acl":
            continue
        args = dict(zip(words[1::2], words[2::2], strict=True))
        resource = "topic" if "--topic" in args else "group"
        out.append(
            Grant(
                principal=args["--allow-principal"].removeprefix("User:"),
                operation=args["--operation"],
                resource=resource,
                name=args[f"--{resource}"],
                pattern=args.get("--resource-pattern-type", "literal"),
            )
        )
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    """Print the setup script for the topic names of a settings file (default: built-in)."""
    from fencing.settings import SettingsError, load_settings

    parser = argparse.ArgumentParser(prog="python -m streams.kafka_acl", description=__doc__)
    parser.add_argument("-c", "--config", help="settings file (its kafka.topics names)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        print(f"fencer: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(render_setup_script(settings))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
