"""The compose deployment, checked without Docker: the file against the Compose Specification's
JSON schema, and every command, path, environment variable, secret, metric and setting it uses
against the project itself."""

from __future__ import annotations

import argparse
import configparser
import copy
import importlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

import jsonschema
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from pydantic import BaseModel

from fencing.settings import SECRETS_DIR_ENV, FencerSettings, load_settings
from streams import observability
from streams.cli import build_parser

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
SCHEMA_FILE = Path(__file__).with_name("compose-spec.json")
DASHBOARD = COMPOSE_DIR / "grafana" / "fencer-dashboard.json"
FENCER_BIN = Path(sys.executable).with_name("fencer")
# Queried by the dashboard but made by Prometheus itself, not by fencer.
PROMETHEUS_BUILTINS = {"up"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def fencer_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if svc.get("command", [None])[0] == "fencer"
    }


def volume_targets(svc: dict[str, Any]) -> dict[str, str]:
    """Container path -> host source of each bind mount (named/anonymous volumes excluded)."""
    out = {}
    for v in svc.get("volumes", []):
        parts = v.split(":")
        if len(parts) >= 2 and parts[0].startswith("."):
            out[parts[1]] = parts[0]
    return out


def setting_exists(path: list[str], tp: Any = FencerSettings) -> bool:
    """Whether a settings path ("cloudstack", "api_key") names a real field; dict keys are free."""
    if not path:
        return True
    origin = get_origin(tp)
    if origin is dict:
        return setting_exists(path[1:], get_args(tp)[1])
    if origin is list:
        return setting_exists(path, get_args(tp)[0])
    if origin in (Union, UnionType):
        return any(setting_exists(path, a) for a in get_args(tp) if a is not type(None))
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(path[0])
        return field is not None and setting_exists(path[1:], field.annotation)
    return False


def test_setting_paths_are_checked_for_real() -> None:
    assert setting_exists(["cloudstack", "api_key"])
    assert setting_exists(["clusters", "any-uuid", "ipmi", "password"])
    assert setting_exists(["kafka", "sasl", "password"])
    assert not setting_exists(["cloudstack", "apikey"])
    assert not setting_exists(["clusters", "any-uuid", "password"])
    assert setting_exists(["snmp", "receivers", "community"])
    assert not setting_exists(["snmp", "receivers", "password"])


# --- the schema ----------------------------------------------------------------------------


def test_compose_file_validates_against_the_compose_spec(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    # The validator is not a rubber stamp: a typo in a service key is caught.
    broken = copy.deepcopy(compose)
    broken["services"]["ingest"]["replicas"] = 2
    assert list(validator.iter_errors(broken))


def test_the_deployment_has_the_services_the_design_asks_for(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    env = services["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft combined mode
    assert "CONTROLLER" in env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert services["ingest"]["deploy"]["replicas"] >= 2
    assert services["probe"]["deploy"]["replicas"] >= 2
    roles = {
        name: svc["command"][svc["command"].index("--roles") + 1]
        for name, svc in fencer_services(compose).items()
        if "--roles" in svc["command"]
    }
    covered = {r for value in roles.values() for r in value.split(",")}
    from streams.app import ROLES

    assert covered == set(ROLES), roles
    assert roles["actuator"] == "actuate" and roles["notifier"] == "notify"
    # One role per service: each its own Kafka principal (tests/compose/test_kafka_security.py).
    assert roles["ingest"] == "ingest" and roles["probe"] == "probe"
    assert services["api"]["command"][:2] == ["fencer", "api"]
    assert services["demo"]["profiles"] == ["lab"]
    assert services["demo"]["command"][:2] == ["fencer", "demo"]
    # The core services run without a profile: `docker compose up` starts them.
    for name in ("kafka", "kafka-setup", "ingest", "probe", "actuator", "notifier", "api"):
        assert "profiles" not in services[name], name


# --- commands ------------------------------------------------------------------------------


def fencer_subcommands() -> set[str]:
    out = subprocess.run(
        [str(FENCER_BIN), "--help"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    listed = re.search(r"\{([a-z,-]+)\}", out)
    if listed:
        return set(listed.group(1).split(","))
    # metavar=COMMAND: the subcommands are the indented names under it.
    return set(re.findall(r"^ {4}([a-z][a-z-]*) ", out, flags=re.M))


def check_fencer_command(argv: list[str], subcommands: set[str]) -> argparse.Namespace:
    assert argv[0] == "fencer"
    assert argv[1] in subcommands, f"{argv[1]} is not a fencer subcommand"
    args = build_parser().parse_args(argv[1:])
    if getattr(args, "roles", None):
        from streams.app import parse_roles

        parse_roles(args.roles)
    # The subcommand's handler really exists (lazy `module:function` targets included).
    func = args.func
    target = next(
        (c.cell_contents for c in (func.__closure__ or ()) if isinstance(c.cell_contents, str)),
        None,
    )
    if target:
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), target
    return args


def test_every_fencer_command_exists(compose: dict[str, Any]) -> None:
    subcommands = fencer_subcommands()
    assert {"worker", "api", "demo", "config"} <= subcommands
    services = fencer_services(compose)
    assert set(services) >= {"ingest", "probe", "actuator", "notifier", "api", "demo"}
    for name, svc in services.items():
        args = check_fencer_command(svc["command"], subcommands)
        config = getattr(args, "config", None)
        if config:
            assert config in volume_targets(svc), f"{name}: {config} is not mounted"


def made_by_make_pki(source: str) -> bool:
    """A host path compose/kafka/make-pki.sh makes (certificates are never in git)."""
    return source.startswith("./pki/")


def test_every_host_path_exists(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if build:
            context = (COMPOSE_DIR / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), name
            assert (context / "pyproject.toml").is_file(), name
        for target, source in volume_targets(svc).items():
            if made_by_make_pki(source):
                continue  # checked in test_kafka_security.py against a run of make-pki.sh
            assert (COMPOSE_DIR / source).exists(), f"{name}: {source} -> {target}"
    for name, secret in compose["secrets"].items():
        path = COMPOSE_DIR / secret["file"]
        if name.startswith("kafka_sasl_"):
            continue  # a random password made by make-pki.sh (test_kafka_security.py)
        example = path.with_name(path.name + ".example")
        assert example.is_file(), f"secret {name}: no {example.relative_to(ROOT)}"


def test_dockerfile_installs_the_project_and_its_tools() -> None:
    text = (COMPOSE_DIR / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, flags=re.M)
    assert "pip install --no-cache-dir ." in text
    assert "ipmitool" in text and "openssh-client" in text
    for src, _dst in re.findall(r"^COPY (\S+) (\S+)", text, flags=re.M):
        assert (ROOT / src).exists(), src
    # The build context stays small and free of secrets and virtualenvs.
    ignore = (COMPOSE_DIR / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "compose/secrets"} <= set(ignore)


# --- environment and secrets ---------------------------------------------------------------


def test_every_fencer_environment_variable_is_a_setting(compose: dict[str, Any]) -> None:
    for name, svc in fencer_services(compose).items():
        for var in svc.get("environment", {}):
            if not var.startswith("FENCER_"):
                continue
            if var == SECRETS_DIR_ENV:
                continue
            path = var.removeprefix("FENCER_").lower().split("__")
            assert setting_exists(path), f"{name}: {var} names no setting"


def test_every_secret_target_is_a_setting_or_a_configured_file(compose: dict[str, Any]) -> None:
    settings_yaml = yaml.safe_load((COMPOSE_DIR / "fencer.yaml").read_text())
    referenced_files = {
        settings_yaml["ssh"]["key_file"],
        str(settings_yaml["ssh"].get("known_hosts")),
    }
    for name, svc in fencer_services(compose).items():
        if not svc.get("secrets"):
            continue
        assert svc["environment"][SECRETS_DIR_ENV] == "/run/secrets", name
        for s in svc["secrets"]:
            assert s["source"] in compose["secrets"], f"{name}: {s['source']}"
            target = s["target"]
            if "__" in target:
                assert setting_exists(target.split("__")), f"{name}: {target} names no setting"
            else:
                assert f"/run/secrets/{target}" in referenced_files, f"{name}: {target} unused"


@pytest.mark.parametrize("service", ["ingest", "probe", "actuator", "notifier", "api"])
def test_the_mounted_settings_load_with_the_secret_files(
    compose: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, service: str
) -> None:
    svc = compose["services"][service]
    secrets_dir = tmp_path / "run-secrets"
    secrets_dir.mkdir()
    expected = {}
    for s in svc["secrets"]:
        source = COMPOSE_DIR / compose["secrets"][s["source"]]["file"]
        if s["source"].startswith("kafka_sasl_"):
            value = f"sasl-password-of-{service}\n"  # make-pki.sh writes a random one
        else:
            value = source.with_name(source.name + ".example").read_text()
        (secrets_dir / s["target"]).write_text(value)
        expected[s["target"]] = value.strip()
    monkeypatch.setenv(SECRETS_DIR_ENV, str(secrets_dir))
    for var, value in svc["environment"].items():
        if var != SECRETS_DIR_ENV:
            monkeypatch.setenv(var, str(value))
    settings = load_settings(COMPOSE_DIR / "fencer.yaml")

    assert settings.kafka.bootstrap_servers == "kafka:9092"
    assert settings.kafka.embedded is False
    assert settings.kafka.security_protocol == "SASL_SSL"
    assert settings.kafka.sasl is not None
    assert settings.kafka.sasl.username == svc["environment"]["FENCER_KAFKA__SASL__USERNAME"]
    assert settings.kafka.sasl.password.get_secret_value() == f"sasl-password-of-{service}"
    got = {
        "cloudstack__api_key": settings.cloudstack.api_key,
        "cloudstack__secret_key": settings.cloudstack.secret_key,
        "defaults__password": settings.defaults.password,
        "email__password": settings.email.password,
        "api__token": settings.api.token,
        "kafka__sasl__password": settings.kafka.sasl.password,
    }
    for target, secret in got.items():
        if target not in expected:
            continue  # this service is not given that secret
        assert secret is not None and secret.get_secret_value() == expected[target], target
    # And the scrubber knows every one of them.
    assert {v for k, v in expected.items() if "__" in k} <= observability.collect_secrets(settings)


def test_a_missing_secrets_dir_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRETS_DIR_ENV, str(tmp_path / "nope"))
    proc = subprocess.run(
        [str(FENCER_BIN), "config", "check", str(COMPOSE_DIR / "fencer.yaml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and SECRETS_DIR_ENV in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_check_accepts_the_mounted_file() -> None:
    # The certificate files exist only inside the containers: --skip-files here, and
    # test_kafka_security.py checks the file with the certificates make-pki.sh makes.
    proc = subprocess.run(
        [str(FENCER_BIN), "config", "check", "--skip-files", str(COMPOSE_DIR / "fencer.yaml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert "warning: kafka." not in proc.stderr  # SASL_SSL: no PLAINTEXT warning
    dumped = json.loads(proc.stdout)
    assert dumped["metrics"]["enabled"] is True
    assert dumped["kafka"]["security_protocol"] == "SASL_SSL"


# --- wiring between the services -----------------------------------------------------------


def test_kafka_address_and_metrics_port_agree_across_files(compose: dict[str, Any]) -> None:
    settings = load_settings(COMPOSE_DIR / "fencer.yaml")
    host, _, port = settings.kafka.bootstrap_servers.partition(":")
    kafka = compose["services"]["kafka"]
    assert kafka["hostname"] == host
    assert f"INTERNAL://:{port}" in kafka["environment"]["KAFKA_LISTENERS"]
    assert f"INTERNAL://{host}:{port}" in kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert "INTERNAL:SASL_SSL" in kafka["environment"]["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]

    prom = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    (sd,) = job["dns_sd_configs"]
    assert sd["port"] == settings.metrics.port
    assert settings.metrics.enabled and settings.metrics.listen == "0.0.0.0"
    for name in sd["names"]:
        assert name in fencer_services(compose), name
    prom_svc = compose["services"]["prometheus"]
    assert "/etc/prometheus/prometheus.yml" in volume_targets(prom_svc)

    grafana = compose["services"]["grafana"]
    mounts = volume_targets(grafana)
    provider = yaml.safe_load(
        (COMPOSE_DIR / "grafana/provisioning/dashboards/fencer.yml").read_text()
    )
    folder = provider["providers"][0]["options"]["path"]
    assert any(t.startswith(folder + "/") and t.endswith(".json") for t in mounts), mounts


# --- the dashboard -------------------------------------------------------------------------


def defined_samples() -> dict[str, str]:
    """Every sample name observability.py exposes -> the metric (family) it belongs to."""
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_count", "_sum", "_created"],
        "gauge": [""],
    }
    out = {}
    for value in vars(observability).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                for suffix in suffixes[family.type]:
                    out[family.name + suffix] = family.name
    return out


def test_every_dashboard_query_uses_a_defined_metric() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    defined = defined_samples()
    assert len(set(defined.values())) >= 9
    shown: set[str] = set()
    for panel in dash["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"].strip("${}") in variables
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.count("(") == expr.count(")"), expr
            names = re.findall(r"\b(fencer_[a-z0-9_]+|up)\b(?!\s*\()", expr)
            assert names, expr
            for name in names:
                if name in PROMETHEUS_BUILTINS:
                    continue
                assert name in defined, f"{panel['title']}: {name} is not in observability.py"
                shown.add(defined[name])
    # No metric without a panel.
    assert shown == set(defined.values()), set(defined.values()) - shown


# --- systemd units -------------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["fencer-worker.service", "fencer-api.service"])
def test_systemd_units_run_real_commands(unit: str) -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(ROOT / "docs" / unit)
    service = parser["Service"]
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name == "fencer"
    check_fencer_command(["fencer", *argv[1:]], fencer_subcommands())
    for line in service.get("Environment", "").splitlines():
        for assignment in shlex.split(line):
            var = assignment.split("=", 1)[0]
            if var.startswith("FENCER_") and var != SECRETS_DIR_ENV:
                assert setting_exists(var.removeprefix("FENCER_").lower().split("__")), var
    assert "Install" in parser and parser["Install"]["WantedBy"]


# --- the operator's guide ------------------------------------------------------------------

GUIDE = ROOT / "docs" / "operators-guide.md"


def guide_code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", GUIDE.read_text(), flags=re.S)


def test_every_setting_the_guide_names_exists() -> None:
    text = GUIDE.read_text()
    top = set(FencerSettings.model_fields)
    checked = 0
    for name in re.findall(r"`([a-z_]+(?:\.[a-z_<>-]+(?:\[\])?)+)`", text):
        parts = name.replace("[]", "").split(".")
        if parts[0] not in top:
            continue  # CloudStack's own settings (ping.interval, kvm.ha.*) are not ours
        assert setting_exists(parts), f"the guide names {name}, which is not a setting"
        checked += 1
    assert checked >= 60
    # The secret file names of the table are settings paths too.
    for name in re.findall(r"`([a-z_<>-]+(?:__[a-z_<>-]+)+)`", text):
        assert setting_exists(name.split("__")), f"secret file {name} names no setting"


def test_every_settings_example_in_the_guide_loads() -> None:
    blocks = guide_code_blocks("yaml")
    assert len(blocks) >= 3
    for block in blocks:
        load_settings(None, **yaml.safe_load(block))


def test_every_fencer_command_in_the_guide_parses() -> None:
    subcommands = fencer_subcommands()
    commands = 0
    for block in guide_code_blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["sudo"]:
                words = words[1:]
            if not words or Path(words[0]).name != "fencer":
                continue
            # <placeholders> stand for values the operator fills in.
            argv = ["fencer", *("x" if w.startswith("<") else w for w in words[1:])]
            check_fencer_command(argv, subcommands)
            commands += 1
    assert commands >= 3


def test_every_metric_the_guide_lists_is_defined() -> None:
    defined = defined_samples()
    families = set(defined.values())
    listed = set(re.findall(r"`(fencer_[a-z_]+)`", GUIDE.read_text()))
    for name in listed:
        assert name in defined or name in families, name
    assert families <= {defined.get(n, n) for n in listed}
