"""Metrics over real HTTP on loopback, JSON log lines, and the secret scrubber."""

from __future__ import annotations

import io
import json
import logging
import urllib.request
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from prometheus_client import REGISTRY

from fencing.events import Evidence, FenceAction, WithheldReason
from fencing.records import EvidenceSummary, FenceDecision, FenceOutcome, HostRef, ProbeResult
from fencing.settings import load_settings
from streams import observability as obs

pytestmark = pytest.mark.timeout(30)

# Every metric name the dashboard and the operator's guide rely on, as Prometheus exposes it.
EXPOSED_NAMES = [
    "fencer_hosts",
    "fencer_probes_total",
    "fencer_checks_total",
    "fencer_probe_duration_seconds_bucket",
    "fencer_probe_duration_seconds_count",
    "fencer_decisions_total",
    "fencer_fences_withheld_total",
    "fencer_fence_budget_used",
    "fencer_fence_budget_cap",
    "fencer_fence_outcomes_total",
    "fencer_notification_failures_total",
    "fencer_consumer_lag",
]

SECRETS = {
    "defaults": "dflt-ipmi-Pw1",
    "cluster": "clus-ipmi-Pw2",
    "host": "host-ipmi-Pw3",
    "smtp": "smtp-Pw4",
    "community": "snmp-comm-5",
    "auth_key": "snmp-auth-key-6",
    "priv_key": "snmp-priv-key-7",
    "api_key": "cs-api-key-8",
    "secret_key": "cs/secret+key=9",
    "sasl": "sasl-Pw10",
    "token": "api-token-11",
}


def settings_with_secrets():
    return load_settings(
        None,
        defaults={"password": SECRETS["defaults"]},
        clusters={"c-1": {"ipmi": {"password": SECRETS["cluster"]}}},
        hosts={"h-1": {"ipmi": {"address": "10.0.0.9", "password": SECRETS["host"]}}},
        email={"enabled": True, "username": "u", "password": SECRETS["smtp"]},
        snmp={
            "enabled": True,
            "receivers": [
                {"host": "127.0.0.1", "community": SECRETS["community"]},
                {
                    "host": "127.0.0.1",
                    "version": "v3",
                    "user": "trapper",
                    "auth_key": SECRETS["auth_key"],
                    "priv_key": SECRETS["priv_key"],
                },
            ],
        },
        cloudstack={"api_key": SECRETS["api_key"], "secret_key": SECRETS["secret_key"]},
        kafka={"sasl": {"username": "fencer", "password": SECRETS["sasl"]}},
        api={"token": SECRETS["token"]},
    )


def decision(approved: bool = True, reason: WithheldReason | None = None) -> FenceDecision:
    return FenceDecision(
        decision_id="d-42",
        host=HostRef(host_uuid="h-1", host_name="kvm03", cluster_uuid="c-obs"),
        episode=1,
        action=FenceAction.STOP,
        approved=approved,
        withheld_reason=reason,
        evidence=EvidenceSummary(
            suspect_since=1_700_000_000.0,
            stale_checks=3,
            newest_write=1_699_999_000.0,
            files_checked=4,
            last_neighbour="kvm02",
        ),
        decided_at=1_700_000_200.0,
        budget_used=2,
        budget_cap=3,
    )


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Leave the root logger and the global scrubber as they were."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    obs.SCRUBBER.set_secrets(())


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- metrics -------------------------------------------------------------------------------


def test_metrics_endpoint_serves_every_metric_over_http() -> None:
    obs.set_host_states({"suspect": 2, "watching": 5})
    obs.CONSUMER_LAG.labels(topic="fencer.probe-requests").set(7)
    obs.NOTIFICATION_FAILURES.labels(channel="email").inc()
    obs.observe_probe(
        ProbeResult(
            host=HostRef(host_uuid="h-1"),
            episode=1,
            check=1,
            evidence=Evidence.STALE,
            suspect_since=1.0,
            finished_at=2.0,
            duration=0.3,
        )
    )
    obs.observe_decision(decision(approved=False, reason=WithheldReason.CAP_REACHED))
    obs.observe_check("stale")
    obs.observe_outcome(
        FenceOutcome(
            decision_id="d-1",
            host=HostRef(host_uuid="h-1"),
            episode=1,
            action=FenceAction.STOP,
            driver="ipmi",
            success=True,
            verified=True,
            started_at=1.0,
            finished_at=2.0,
        )
    )
    server = obs.start_metrics_server(0)
    try:
        assert server.server.server_address[0] == "127.0.0.1"
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.status == 200
            body = resp.read().decode()
    finally:
        server.close()
    names = {line.split("{")[0].split(" ")[0] for line in body.splitlines() if line[:1] != "#"}
    for name in EXPOSED_NAMES:
        assert name in names, name
    assert 'fencer_hosts{state="suspect"} 2.0' in body
    assert 'fencer_consumer_lag{topic="fencer.probe-requests"} 7.0' in body
    assert 'fencer_fence_budget_used{cluster="c-obs"} 2.0' in body
    # The port is released: a second server can bind a fresh one and the first is gone.
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)


def test_observe_helpers_count_by_label() -> None:
    approved0 = sample("fencer_decisions_total", action="stop", verdict="approved")
    withheld0 = sample("fencer_decisions_total", action="stop", verdict="withheld")
    storm0 = sample("fencer_fences_withheld_total", reason="storm_guard")
    obs.observe_decision(decision())
    obs.observe_decision(decision(approved=False, reason=WithheldReason.STORM_GUARD))
    assert sample("fencer_decisions_total", action="stop", verdict="approved") == approved0 + 1
    assert sample("fencer_decisions_total", action="stop", verdict="withheld") == withheld0 + 1
    assert sample("fencer_fences_withheld_total", reason="storm_guard") == storm0 + 1
    assert sample("fencer_fence_budget_cap", cluster="c-obs") == 3

    failed0 = sample("fencer_fence_outcomes_total", action="reboot", result="failed")
    unver0 = sample("fencer_fence_outcomes_total", action="reboot", result="unverified")
    base = dict(
        decision_id="d",
        host=HostRef(host_uuid="h"),
        episode=1,
        action=FenceAction.REBOOT,
        driver="template",
        started_at=0.0,
        finished_at=1.0,
    )
    obs.observe_outcome(FenceOutcome(success=False, **base))
    obs.observe_outcome(FenceOutcome(success=True, verified=False, **base))
    assert sample("fencer_fence_outcomes_total", action="reboot", result="failed") == failed0 + 1
    assert sample("fencer_fence_outcomes_total", action="reboot", result="unverified") == unver0 + 1


def test_host_states_missing_from_a_report_drop_to_zero() -> None:
    obs.set_host_states({"fenced": 1, "suspect": 3})
    obs.set_host_states({"suspect": 1})
    assert sample("fencer_hosts", state="fenced") == 0
    assert sample("fencer_hosts", state="suspect") == 1


# --- structured logs -----------------------------------------------------------------------


def test_json_log_lines_parse_with_fields(root_logging: None) -> None:
    out = io.StringIO()
    obs.configure_logging("DEBUG", json=True, stream=out)
    log = logging.getLogger("fencer.test")
    log.info(
        "probe of %s: %s", "kvm03", "stale", extra={"fields": {"check": 2, "ev": Evidence.STALE}}
    )
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("it broke")
    log.debug("multi\nline")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    first, second, third = (json.loads(line) for line in lines)
    assert first["msg"] == "probe of kvm03: stale"
    assert first["level"] == "INFO" and first["logger"] == "fencer.test"
    assert first["check"] == 2 and first["ev"] == "stale"
    assert first["ts"].endswith("Z")
    assert "RuntimeError: boom" in second["exc"]
    assert third["msg"] == "multi\nline"


def test_log_decision_writes_one_line_with_evidence(root_logging: None) -> None:
    out = io.StringIO()
    obs.configure_logging("INFO", json=True, stream=out)
    obs.log_decision(logging.getLogger("fencer.gate"), decision(False, WithheldReason.PAUSED))
    (line,) = out.getvalue().splitlines()
    rec = json.loads(line)
    assert rec["event"] == "fence_decision"
    assert rec["decision_id"] == "d-42" and rec["verdict"] == "withheld"
    assert rec["withheld_reason"] == "paused"
    assert rec["stale_checks"] == 3 and rec["files_checked"] == 4
    assert rec["last_neighbour"] == "kvm02"
    assert rec["suspect_since"] == "2023-11-14T22:13:20.000Z"
    assert "kvm03" in rec["msg"] and "withheld" in rec["msg"]


def test_text_format_appends_fields(root_logging: None) -> None:
    out = io.StringIO()
    obs.configure_logging("INFO", json=False, stream=out)
    logging.getLogger("fencer.t").info("hello", extra={"fields": {"host": "kvm03", "n": 1}})
    line = out.getvalue().strip()
    assert line.endswith('fencer.t: hello host="kvm03" n=1')


# --- secrets -------------------------------------------------------------------------------


def test_collect_secrets_finds_every_configured_secret() -> None:
    found = obs.collect_secrets(settings_with_secrets())
    assert set(SECRETS.values()) <= found
    # Empty secrets (the defaults) are not collected: they would match everywhere.
    assert "" not in found


@pytest.mark.parametrize("as_json", [True, False])
def test_secret_never_reaches_the_output(root_logging: None, as_json: bool) -> None:
    out = io.StringIO()
    obs.configure_logging("DEBUG", json=as_json, stream=out)
    obs.install_secret_scrubber(settings_with_secrets())
    log = logging.getLogger("fencer.oops")
    for name, secret in SECRETS.items():
        log.info(f"msg {name} {secret}")
        log.warning("args %s %r", name, secret)
        log.info(
            "fields", extra={"fields": {"cmd": ["ipmitool", "-P", secret], name: {"x": secret}}}
        )
        log.info("other extra", extra={"password": secret})
        log.info("url %s", f"https://bmc/?p={quote(secret, safe='')}")
        try:
            raise ConnectionError(f"login with {secret} refused")
        except ConnectionError:
            log.exception("traceback %s", name)
        log.info("stack", stack_info=True, extra={"fields": {"s": secret}})
    text = out.getvalue()
    for name, secret in SECRETS.items():
        assert secret not in text, name
        assert quote(secret, safe="") not in text, name
    assert text.count(obs.REDACTED) >= 6 * len(SECRETS)
    # Nothing else was lost: every record came out, names and tracebacks intact.
    assert "ConnectionError: login with ********** refused" in text
    if as_json:
        lines = [json.loads(line) for line in text.splitlines()]
        assert len(lines) == 7 * len(SECRETS)


def test_handlers_added_later_are_covered_by_the_record_factory(root_logging: None) -> None:
    obs.install_secret_scrubber(settings_with_secrets())
    late = io.StringIO()
    handler = logging.StreamHandler(late)  # a handler someone adds afterwards, no filter
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("fencer.late")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        secret = SECRETS["sasl"]
        log.info("connect with %s", secret)
        try:
            raise PermissionError(secret)
        except PermissionError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    assert secret not in late.getvalue()
    assert "connect with **********" in late.getvalue()
    assert "PermissionError: **********" in late.getvalue()


def test_scrubber_can_be_replaced_and_cleared(root_logging: None) -> None:
    out = io.StringIO()
    obs.configure_logging("INFO", json=False, stream=out)
    s = load_settings(None, cloudstack={"api_key": "first-key"})
    obs.install_secret_scrubber(s)
    obs.install_secret_scrubber(load_settings(None, cloudstack={"api_key": "second-key"}))
    logging.getLogger("fencer.r").info("first-key second-key")
    assert "first-key **********" in out.getvalue()
    obs.SCRUBBER.set_secrets(())
    logging.getLogger("fencer.r").info("second-key")
    assert out.getvalue().rstrip().endswith("second-key")


def test_setup_observability_starts_what_the_settings_ask(root_logging: None) -> None:
    s = load_settings(
        None,
        log_json=True,
        metrics={"enabled": True, "port": 0},
        email={"password": "setup-smtp-pw"},
    )
    server = obs.setup_observability(s)
    assert server is not None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            assert b"# HELP fencer_probes_total" in r.read()
        (handler,) = logging.getLogger().handlers
        assert isinstance(handler.formatter, obs.JsonFormatter)
        assert obs.SCRUBBER.scrub("pw=setup-smtp-pw") == "pw=**********"
    finally:
        server.close()
    assert obs.setup_observability(load_settings(None)) is None


def test_faust_logging_setup_keeps_format_and_scrubber(
    root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from mode.utils.logging import setup_logging

    obs.install_secret_scrubber(load_settings(None, api={"token": "mode-token-1"}))
    # What faust.Worker(logging_config=...) does with it: clear root handlers, dictConfig.
    setup_logging(loglevel="INFO", logging_config=obs.logging_config("INFO", json=True))
    logging.getLogger("fencer.faust").info(
        "token %s", "mode-token-1", extra={"fields": {"t": "mode-token-1"}}
    )
    err = capsys.readouterr().err
    (line,) = [json.loads(x) for x in err.splitlines() if "fencer.faust" in x]
    assert line["msg"] == "token **********" and line["t"] == "**********"
    assert "mode-token-1" not in err
