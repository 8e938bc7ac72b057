"""Operator settings: YAML + FENCER_ environment, inheritance, errors, redaction, warnings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr

from fencing.events import FenceAction
from fencing.settings import (
    IPMI_FIELDS,
    Driver,
    FencerSettings,
    PasswordVia,
    SettingsError,
    load_settings,
    redacted_dump,
    settings_warnings,
)

REPO = Path(__file__).resolve().parent.parent.parent
EXAMPLE = REPO / "fencer.example.yaml"
FENCER = Path(sys.executable).parent / "fencer"

CLUSTER = "3f1c2a9e-0b7d-4e55-9c1a-7d2e4b6a8c01"
HOST = "5b2c6f0e-1d7a-4c1e-9a55-0c1f3e2a9b10"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No FENCER_ variable of the calling shell leaks into a test."""
    for name in list(os.environ):
        if name.upper().startswith("FENCER_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "fencer.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return p


def config_check(path: Path, *flags: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("FENCER_")}
    return subprocess.run(
        [str(FENCER), "config", "check", *flags, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **env},
    )


# ---------------------------------------------------------------------------------------------
# The shipped example


def test_example_passes_config_check_without_warnings() -> None:
    # The example names /etc/fencer/kafka-*.pem, which exist on a fencer machine, not here.
    proc = config_check(EXAMPLE, "--skip-files")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    shown = json.loads(proc.stdout)
    assert shown["policy"]["fence_cap"] == 3 and shown["policy"]["fence_window"] == 3600
    assert shown["defaults"]["password"] == "**********"
    assert shown["kafka"]["sasl"]["password"] == "**********"
    assert "change-me" not in proc.stdout


def test_example_covers_every_section_and_every_ipmi_field() -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    assert set(doc) == set(FencerSettings.model_fields)
    assert set(doc["defaults"]) == set(IPMI_FIELDS)
    assert doc["clusters"] and doc["hosts"]
    assert all(h["ipmi"].get("address") for h in doc["hosts"].values())
    assert doc["kafka"]["sasl"] and doc["kafka"]["ssl_cafile"]
    assert {r["version"] for r in doc["snmp"]["receivers"]} == {"v2c", "v3"}


def test_example_inherits_host_then_cluster_then_default() -> None:
    s = load_settings(EXAMPLE)
    kvm07 = "7c3d8e1f-2a4b-4c6d-8e0f-1a2b3c4d5e6f"
    eff = s.effective_ipmi(kvm07, CLUSTER)
    assert eff.address == "bmc-kvm07.oob.example.com"
    assert (eff.values.username, eff.sources["username"]) == ("root", "host")
    assert (eff.values.action, eff.sources["action"]) == (FenceAction.REBOOT, "host")
    assert (eff.values.port, eff.sources["port"]) == (6230, "host")
    assert (eff.values.exec, eff.sources["exec"]) == ("ipmitool", "default")
    eff3 = s.effective_ipmi(HOST, CLUSTER)
    assert (eff3.values.action, eff3.sources["action"]) == (FenceAction.STOP, "cluster")
    assert eff3.values.password.get_secret_value() == "change-me-too"


# ---------------------------------------------------------------------------------------------
# effective_ipmi


def test_effective_ipmi_field_by_field_with_sources(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        f"""
        defaults:
          username: d-user
          password: d-pass
          action_test: chassis power status
        clusters:
          {CLUSTER}:
            ipmi:
              username: c-user
              action: stop
              exec: /usr/bin/ipmitool
        hosts:
          {HOST}:
            ipmi:
              address: 10.0.0.5
              username: h-user
              password: h-pass
        """,
    )
    s = load_settings(p)
    eff = s.effective_ipmi(HOST, CLUSTER)
    assert eff.address == "10.0.0.5"
    expected_sources = dict.fromkeys(IPMI_FIELDS, "default")
    expected_sources.update(username="host", password="host", action="cluster", exec="cluster")
    assert eff.sources == expected_sources
    assert eff.values.username == "h-user"
    assert eff.values.password.get_secret_value() == "h-pass"
    assert eff.values.action is FenceAction.STOP
    assert eff.values.exec == "/usr/bin/ipmitool"
    assert eff.values.action_test == "chassis power status"
    assert eff.values.driver is Driver.IPMI

    # The same host in an unknown cluster: the cluster's values do not apply.
    other = s.effective_ipmi(HOST, "another-cluster")
    assert other.sources["action"] == "default" and other.values.action is FenceAction.NOTHING
    assert other.values.username == "h-user"
    # An unknown host in the cluster: no address, cluster then defaults.
    bare = s.effective_ipmi("unknown-host", CLUSTER)
    assert bare.address is None
    assert (bare.values.username, bare.sources["username"]) == ("c-user", "cluster")
    assert (bare.values.password.get_secret_value(), bare.sources["password"]) == (
        "d-pass",
        "default",
    )


def test_effective_ipmi_without_cluster_uses_defaults() -> None:
    s = FencerSettings(defaults={"action": "blink"})
    eff = s.effective_ipmi(HOST, None)
    assert set(eff.sources.values()) == {"default"}
    assert eff.values.action is FenceAction.BLINK


# ---------------------------------------------------------------------------------------------
# Secrets never shown

SECRETS = {
    "defaults.password": "S3cret-defaults-pw",
    "cluster.password": "S3cret-cluster-pw",
    "host.password": "S3cret-host-pw",
    "sasl": "S3cret-sasl-pw",
    "api_key": "S3cret-api-key",
    "secret_key": "S3cret-secret-key",
    "smtp": "S3cret-smtp-pw",
    "community": "S3cret-community",
    "auth": "S3cret-auth-key",
    "priv": "S3cret-priv-key",
    "token": "S3cret-api-token",
}


def secrets_yaml(tmp_path: Path) -> Path:
    return write(
        tmp_path,
        f"""
        defaults:
          password: {SECRETS["defaults.password"]}
          driver: template
        clusters:
          {CLUSTER}:
            ipmi: {{password: {SECRETS["cluster.password"]}}}
        hosts:
          {HOST}:
            ipmi: {{address: 10.0.0.9, password: {SECRETS["host.password"]}}}
        kafka:
          security_protocol: SASL_SSL
          sasl: {{mechanism: PLAIN, username: u, password: {SECRETS["sasl"]}}}
        cloudstack:
          api_key: {SECRETS["api_key"]}
          secret_key: {SECRETS["secret_key"]}
        email: {{enabled: true, username: u, password: {SECRETS["smtp"]}}}
        snmp:
          receivers:
            - {{host: 127.0.0.1, community: {SECRETS["community"]}}}
            - host: 127.0.0.1
              version: v3
              user: u
              auth_key: {SECRETS["auth"]}
              priv_key: {SECRETS["priv"]}
        api: {{token: {SECRETS["token"]}}}
        """,
    )


def test_config_check_redacts_every_secret(tmp_path: Path) -> None:
    env_secret = "S3cret-from-env"
    proc = config_check(secrets_yaml(tmp_path), FENCER_CLOUDSTACK__SECRET_KEY=env_secret)
    assert proc.returncode == 0, proc.stderr
    # The template driver with argv passwords is worth a warning, and the warning is on stderr.
    assert "defaults: the execution syntax puts $IPMI_PASSWORD" in proc.stderr
    for secret in [*SECRETS.values(), env_secret]:
        assert secret not in proc.stdout + proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["cloudstack"]["secret_key"] == "**********"
    assert shown["snmp"]["receivers"][1]["priv_key"] == "**********"
    assert shown["hosts"][HOST]["ipmi"]["password"] == "**********"
    # In process too: reprs, the redacted dump.
    s = load_settings(secrets_yaml(tmp_path))
    text = repr(s) + str(s) + json.dumps(redacted_dump(s))
    assert not any(secret in text for secret in SECRETS.values())
    assert s.cloudstack.api_key.get_secret_value() == SECRETS["api_key"]


@pytest.mark.parametrize(
    "text",
    [
        # A wrong type where a password goes.
        "defaults:\n  password: [S3cret-in-a-list]\n",
        # A YAML error on the password's own line.
        'defaults:\n  password: "S3cret-unterminated\n  port: 1\n',
        # An unknown key whose value is a secret.
        "cloudstack:\n  apikey: S3cret-misspelt\n",
    ],
    ids=["wrong-type", "yaml-error", "unknown-key"],
)
def test_errors_never_show_the_value(tmp_path: Path, text: str) -> None:
    proc = config_check(write(tmp_path, text))
    assert proc.returncode == 1
    assert "S3cret" not in proc.stdout + proc.stderr
    with pytest.raises(SettingsError) as info:
        load_settings(tmp_path / "fencer.yaml")
    assert "S3cret" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Bad files: one clear error naming the field and the line, exit 1, no traceback

BAD_FILES = [
    (
        "policy:\n  check_interval: 30\n  extra_checks: many\n",
        ["policy.extra_checks: Input should be a valid integer", "line 3"],
    ),
    (
        f"clusters:\n  {CLUSTER}:\n    name: a\n    ipmi:\n      port: 99999\n",
        [f"clusters.{CLUSTER}.ipmi.port: Input should be less than or equal to 65535", "line 5"],
    ),
    (
        f"hosts:\n  {HOST}:\n    ipmi:\n      adress: 10.0.0.1\n",
        [f"hosts.{HOST}.ipmi.adress: unknown setting", "line 4"],
    ),
    (
        "defaults:\n  action: start\n",
        ["defaults.action: Value error, the fencing action must be one of", "line 2"],
    ),
    (
        "snmp:\n  receivers:\n    - host: a\n    - host: b\n      version: v3\n",
        ["snmp.receivers.1: Value error, an SNMP v3 receiver needs user", "line 4"],
    ),
    ("kafka:\n  bootstrap_servers: [a\n", ["not valid YAML", "line 3"]),
    ("hosts: {}\npolicy: {}\nhosts: {}\n", ["line 3: duplicate key hosts (first at line 1)"]),
    (
        "policy:\n  fence_cap: 1\n  fence_cap: 5\n",
        ["line 3: duplicate key policy.fence_cap (first at line 2)"],
    ),
    ("- policy\n", ["the top level must be a mapping of settings"]),
    ("a: &a [*a]\n", ["a: unknown setting", "line 1"]),
    ("policy:\n" + "  " + "[" * 5000 + "]" * 5000 + "\n", ["nested too deeply"]),
]


@pytest.mark.parametrize(("text", "needles"), BAD_FILES)
def test_bad_file_is_one_clear_error(tmp_path: Path, text: str, needles: list[str]) -> None:
    p = tmp_path / "fencer.yaml"
    p.write_text(text)
    proc = config_check(p)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("fencer: ")
    for needle in needles:
        assert needle in proc.stderr


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    missing = config_check(tmp_path / "nope.yaml")
    assert missing.returncode == 1
    assert "cannot read settings file" in missing.stderr and "nope.yaml" in missing.stderr
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"policy:\n  check_interval: \xff\n")
    proc = config_check(binary)
    assert proc.returncode == 1
    assert "not UTF-8" in proc.stderr and "Traceback" not in proc.stderr


def test_settings_error_names_every_bad_field(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """
        policy:
          storm_ratio: 2
        ssh:
          port: 0
        """,
    )
    with pytest.raises(SettingsError) as info:
        load_settings(p)
    assert str(info.value) == (
        "invalid settings:\n"
        f"  policy.storm_ratio: Input should be less than or equal to 1 ({p} line 2)\n"
        f"  ssh.port: Input should be greater than or equal to 1 ({p} line 4)"
    )


# ---------------------------------------------------------------------------------------------
# Environment


def test_environment_wins_over_the_file_and_merges_nested(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = write(
        tmp_path,
        f"""
        policy:
          check_interval: 30
          extra_checks: 4
        kafka:
          bootstrap_servers: k1:9092
          topics:
            cloudstack: cs-events
        clusters:
          {CLUSTER}:
            name: prod
            ipmi: {{username: fence}}
        """,
    )
    monkeypatch.setenv("FENCER_POLICY__CHECK_INTERVAL", "15")
    monkeypatch.setenv("FENCER_KAFKA__SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("FENCER_KAFKA__TOPICS__DEAD_LETTER", "dlq")
    monkeypatch.setenv(f"FENCER_CLUSTERS__{CLUSTER}__PAUSED", "true")
    monkeypatch.setenv("FENCER_EMAIL__TO", '["a@example.com", "b@example.com"]')
    monkeypatch.setenv("FENCER_DEFAULTS__PASSWORD", "env-pw")
    s = load_settings(p)
    assert s.policy.check_interval == 15 and s.policy.extra_checks == 4
    assert s.kafka.bootstrap_servers == "k1:9092" and s.kafka.security_protocol == "SSL"
    assert (s.kafka.topics.cloudstack, s.kafka.topics.dead_letter) == ("cs-events", "dlq")
    cluster = s.clusters[CLUSTER]
    assert (cluster.name, cluster.paused, cluster.ipmi.username) == ("prod", True, "fence")
    assert s.email.to == ["a@example.com", "b@example.com"]
    assert s.defaults.password == SecretStr("env-pw")


def test_environment_alone_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FENCER_CLOUDSTACK__ENDPOINT", "https://cs.example/client/api")
    monkeypatch.setenv("FENCER_LOG_LEVEL", "DEBUG")
    s = load_settings()
    assert s.cloudstack.endpoint == "https://cs.example/client/api"
    assert s.log_level == "DEBUG"
    assert s.policy == FencerSettings().policy


def test_environment_error_names_the_variable_not_the_file_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = write(tmp_path, "policy:\n  check_interval: 30\n")
    monkeypatch.setenv("FENCER_POLICY__CHECK_INTERVAL", "soon")
    with pytest.raises(SettingsError) as info:
        load_settings(p)
    assert str(info.value) == (
        "invalid settings:\n  policy.check_interval: Input should be a valid number, unable "
        "to parse string as a number (environment FENCER_POLICY__CHECK_INTERVAL)"
    )


def test_environment_value_that_is_not_json_is_one_line(tmp_path: Path) -> None:
    p = write(tmp_path, "email:\n  enabled: false\n")
    proc = config_check(p, FENCER_EMAIL__TO="ops@example.com")
    assert proc.returncode == 1
    assert proc.stderr.startswith("fencer: environment FENCER_EMAIL__TO: cannot parse")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_config_check_shows_environment_overrides(tmp_path: Path) -> None:
    p = write(tmp_path, "policy:\n  check_interval: 30\n")
    proc = config_check(p, FENCER_POLICY__CHECK_INTERVAL="12.5", FENCER_DEBUG="")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["policy"]["check_interval"] == 12.5


# ---------------------------------------------------------------------------------------------
# Warnings


def warnings_for(**kw: object) -> list[str]:
    base: dict[str, object] = {"ssh": {"known_hosts": "/etc/fencer/known_hosts"}}
    return settings_warnings(FencerSettings(**{**base, **kw}))


@pytest.mark.parametrize(
    "syntax",
    [
        "$IPMI_EXEC -U $IPMI_USERNAME -P $IPMI_PASSWORD -H $IPMI_HOST $IPMI_ACTION",
        "$IPMI_EXEC --username $IPMI_Username --password  $IPMI_password --command $IPMI_ACTION",
        "$IPMI_EXEC -P ${IPMI_PASSWORD} $IPMI_ACTION",
    ],
    ids=["upper", "design-case", "braces"],
)
def test_password_in_argv_warns(syntax: str) -> None:
    got = warnings_for(defaults={"driver": "template", "execution_syntax": syntax})
    assert len(got) == 1 and got[0].startswith("defaults: the execution syntax puts")


@pytest.mark.parametrize(
    "defaults",
    [
        {"driver": "template", "password_via": "env"},
        {"driver": "template", "execution_syntax": "$IPMI_EXEC -f $IPMI_PASSWORD_FILE"},
        {"driver": "ipmi"},
        {"driver": "redfish"},
    ],
    ids=["env", "password-file", "ipmi", "redfish"],
)
def test_password_kept_out_of_argv_does_not_warn(defaults: dict[str, str]) -> None:
    assert warnings_for(defaults=defaults) == []


def test_cluster_and_host_warnings_are_their_own() -> None:
    got = warnings_for(
        defaults={"driver": "template", "password_via": "env"},
        clusters={
            "c-argv": {"ipmi": {"password_via": "argv"}},
            "c-user": {"ipmi": {"username": "x"}},
        },
        hosts={
            "h-argv": {"ipmi": {"password_via": "argv"}},
            "h-addr": {"ipmi": {"address": "10.0.0.1"}},
        },
    )
    assert [w.split(":")[0] for w in got] == ["clusters.c-argv", "hosts.h-argv"]
    # A problem in the defaults is told once, not again for clusters that do not touch it.
    once = warnings_for(
        defaults={"driver": "template"}, clusters={"c": {"ipmi": {"username": "x"}}}
    )
    assert [w.split(":")[0] for w in once] == ["defaults"]


def test_restart_without_fence_and_ssh_host_keys_warn() -> None:
    got = warnings_for(clusters={"c": {"ipmi": {"restart_without_fence": True}}})
    assert got == [
        "clusters.c: restart_without_fence with action nothing: CloudStack will restart VMs "
        "of a host that may still run them (disk corruption)"
    ]
    assert settings_warnings(FencerSettings()) == [
        "ssh.known_hosts is not set: probes will refuse to connect"
    ]
    lab = FencerSettings(ssh={"insecure_skip_host_key_check": True})
    assert settings_warnings(lab) == [
        "ssh.insecure_skip_host_key_check is on: only acceptable in the lab"
    ]


def test_password_via_and_driver_parse_from_yaml(tmp_path: Path) -> None:
    p = write(tmp_path, "defaults:\n  driver: template\n  password_via: file\n")
    s = load_settings(p)
    assert (s.defaults.driver, s.defaults.password_via) == (Driver.TEMPLATE, PasswordVia.FILE)
    assert s.policy.to_policy().fence_cap == 3
