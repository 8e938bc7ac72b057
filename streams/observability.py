"""Metrics: every Prometheus metric fencer exports is defined here, once; `setup_observability`
starts them together with the logs (streams.logs, whose names stay importable from here).

Rules:
- Metric objects are module-level and registered on prometheus-client's default registry; the
  stages update them (directly or through the `observe_*` helpers), `start_metrics_server`
  serves them. Metric names are a public interface (the Grafana dashboard in compose/ queries
  them): rename one only together with the dashboard.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from streams.logs import (
    REDACTED,
    SCRUBBER,
    JsonFormatter,
    SecretScrubber,
    TextFormatter,
    collect_secrets,
    configure_logging,
    install_secret_scrubber,
    log_decision,
    logging_config,
    secret_scrubber,
)

if TYPE_CHECKING:
    from fencing.records import FenceDecision, FenceOutcome, ProbeResult
    from fencing.settings import FencerSettings

__all__ = [
    "REDACTED",
    "SCRUBBER",
    "JsonFormatter",
    "SecretScrubber",
    "TextFormatter",
    "collect_secrets",
    "configure_logging",
    "install_secret_scrubber",
    "log_decision",
    "logging_config",
    "secret_scrubber",
]

# ---------------------------------------------------------------------------------------------
# Metrics

HOSTS = Gauge(
    "fencer_hosts",
    "Hosts fencer watches, by their state in the per-host state machine.",
    ["state"],
)
CHECKS = Counter(
    "fencer_checks",
    "Checks of suspect hosts as the core judged them, by evidence.",
    ["evidence"],
)
PROBES = Counter(
    "fencer_probes",
    "Storage-activity probes finished, by reading (complete, incomplete).",
    ["reading"],
)
PROBE_DURATION = Histogram(
    "fencer_probe_duration_seconds",
    "Time one storage-activity probe took, neighbour SSH included.",
    # Probes are SSH round trips bounded by ssh.command_timeout (20 s default).
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0),
)
DECISIONS = Counter(
    "fencer_decisions",
    "Fence decisions made by the cluster gate, by action and verdict (approved or withheld).",
    ["action", "verdict"],
)
WITHHELD = Counter(
    "fencer_fences_withheld",
    "Proposed fences the cluster gate withheld, by reason.",
    ["reason"],
)
BUDGET_USED = Gauge(
    "fencer_fence_budget_used",
    "Power-downs counted against the cluster's fence cap in the current window.",
    ["cluster"],
)
BUDGET_CAP = Gauge(
    "fencer_fence_budget_cap",
    "The cluster's fence cap (power-downs allowed per window).",
    ["cluster"],
)
OUTCOMES = Counter(
    "fencer_fence_outcomes",
    "Fences the actuator carried out, by action and result (succeeded, failed, unverified).",
    ["action", "result"],
)
NOTIFICATION_FAILURES = Counter(
    "fencer_notification_failures",
    "Notifications that could not be delivered, by channel (email, snmp).",
    ["channel"],
)
CONSUMER_LAG = Gauge(
    "fencer_consumer_lag",
    "Records not yet consumed on the partitions this worker owns, by topic (sum over workers).",
    ["topic"],
)


def outcome_result(outcome: FenceOutcome) -> str:
    """The `result` label of a fence outcome: succeeded, unverified or failed."""
    if not outcome.success:
        return "failed"
    return "succeeded" if outcome.verified else "unverified"


def observe_probe(result: ProbeResult) -> None:
    """Count a finished probe and its duration."""
    PROBES.labels(reading="complete" if result.complete else "incomplete").inc()
    PROBE_DURATION.observe(max(result.duration, 0.0))


def observe_check(evidence: str) -> None:
    """Count a check the core judged (baseline, alive, stale, unknown)."""
    CHECKS.labels(evidence=evidence).inc()


def observe_decision(decision: FenceDecision) -> None:
    """Count a gate decision, its withheld reason, and the cluster's budget."""
    verdict = "approved" if decision.approved else "withheld"
    DECISIONS.labels(action=decision.action.value, verdict=verdict).inc()
    if not decision.approved and decision.withheld_reason is not None:
        WITHHELD.labels(reason=decision.withheld_reason.value).inc()
    cluster = decision.host.cluster_uuid
    if cluster:
        BUDGET_USED.labels(cluster=cluster).set(decision.budget_used)
        BUDGET_CAP.labels(cluster=cluster).set(decision.budget_cap)


def observe_outcome(outcome: FenceOutcome) -> None:
    """Count an actuator outcome."""
    OUTCOMES.labels(action=outcome.action.value, result=outcome_result(outcome)).inc()


_host_states_seen: set[str] = set()


def set_host_states(counts: dict[str, int]) -> None:
    """Publish how many hosts are in each state; states missing from `counts` drop to 0."""
    for state in _host_states_seen - counts.keys():
        HOSTS.labels(state=state).set(0)
    for state, n in counts.items():
        HOSTS.labels(state=state).set(n)
        _host_states_seen.add(state)


@dataclass
class MetricsServer:
    """A running /metrics endpoint."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The bound port (useful when started on port 0)."""
        return int(self.server.server_port)

    def close(self) -> None:
        """Stop serving and release the port."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(port: int, addr: str = "127.0.0.1") -> MetricsServer:
    """Serve every metric at http://addr:port/metrics in a daemon thread (port 0 = a free one)."""
    server, thread = start_http_server(port, addr=addr)
    return MetricsServer(server=server, thread=thread)


def setup_observability(settings: FencerSettings) -> MetricsServer | None:
    """What every fencer process calls first: logging as configured (`log_level`, `log_json`),
    the secret scrubber, and the metrics endpoint if `metrics.enabled`."""
    configure_logging(settings.log_level, json=settings.log_json)
    install_secret_scrubber(settings)
    if not settings.metrics.enabled:
        return None
    return start_metrics_server(settings.metrics.port, addr=settings.metrics.listen)
