"""Metrics and logs: every Prometheus metric fencer exports is defined here, once, and every log
line leaves through a secret scrubber.

Rules:
- Metric objects are module-level and registered on prometheus-client's default registry; the
  stages update them (directly or through the `observe_*` helpers), `start_metrics_server`
  serves them. Metric names are a public interface (the Grafana dashboard in compose/ queries
  them): rename one only together with the dashboard.
- Logs are plain text or one JSON object per line (`configure_logging`). Structured fields go in
  `extra={"fields": {...}}`; `log_decision` writes one line per fence decision with its evidence.
- No configured secret reaches a log: `install_secret_scrubber(settings)` collects every
  `SecretStr` value of the settings and removes it from each record's message, arguments,
  traceback, stack and extra fields, both when the record is made (a record factory, which
  survives handlers that others add later) and when a handler emits it (a Filter).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import quote, quote_plus
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from pydantic import BaseModel, SecretStr

if TYPE_CHECKING:
    from fencing.records import FenceDecision, FenceOutcome, ProbeResult
    from fencing.settings import FencerSettings

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


# ---------------------------------------------------------------------------------------------
# Structured logs

REDACTED = "**********"

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Enum):
        return _jsonable(value.value)
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the `fields` extra, exc and stack."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record as a single line of JSON."""
        out: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                # The four keys above win: a field never hides the message.
                out.setdefault(str(key), _jsonable(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The human format: time, level, logger, message, then the `fields` extra as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """Render the record on one line (plus any traceback)."""
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            tail = " ".join(
                f"{k}={json.dumps(_jsonable(v), ensure_ascii=False, default=str)}"
                for k, v in fields.items()
            )
            head, sep, rest = line.partition("\n")
            line = f"{head} {tail}{sep}{rest}"
        return line


def configure_logging(
    level: str | int = "INFO", json: bool = False, stream: TextIO | None = None
) -> logging.Handler:
    """Send every log record to stderr (or `stream`), as text or one JSON object per line.

    Replaces the root logger's handlers. The module's secret scrubber sits on the handler, so
    calling `install_secret_scrubber` before or after this works either way.
    """
    handler: logging.Handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    handler.addFilter(SCRUBBER)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler


def logging_config(level: str | int = "INFO", json: bool = False) -> dict[str, Any]:
    """The same setup as `configure_logging`, as a `logging.config.dictConfig` dict.

    For frameworks that configure logging themselves: Faust's `Worker(logging_config=...)`
    (mode clears the root handlers and applies this dict) keeps fencer's format and scrubber.
    """
    formatter = "JsonFormatter" if json else "TextFormatter"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"fencer": {"()": f"{__name__}.{formatter}"}},
        "filters": {"scrub": {"()": f"{__name__}.secret_scrubber"}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "fencer",
                "filters": ["scrub"],
            }
        },
        "root": {
            "level": level.upper() if isinstance(level, str) else level,
            "handlers": ["default"],
        },
    }


def secret_scrubber() -> SecretScrubber:
    """The process-wide scrubber (a factory for dictConfig)."""
    return SCRUBBER


def log_decision(logger: logging.Logger, decision: FenceDecision) -> None:
    """Log one line for a fence decision, with the evidence behind it as fields."""
    ev = decision.evidence
    verdict = "approved" if decision.approved else "withheld"
    host = decision.host
    name = host.host_name or host.host_uuid
    reason = f" ({decision.withheld_reason.value})" if decision.withheld_reason else ""
    logger.log(
        logging.WARNING,
        "fence %s %s for host %s%s after %d stale checks",
        decision.action.value,
        verdict,
        name,
        reason,
        ev.stale_checks,
        extra={
            "fields": {
                "event": "fence_decision",
                "decision_id": decision.decision_id,
                "host_uuid": host.host_uuid,
                "host_name": host.host_name,
                "cluster_uuid": host.cluster_uuid,
                "episode": decision.episode,
                "action": decision.action.value,
                "verdict": verdict,
                "withheld_reason": (
                    decision.withheld_reason.value if decision.withheld_reason else None
                ),
                "budget_used": decision.budget_used,
                "budget_cap": decision.budget_cap,
                "suspect_since": _iso(ev.suspect_since),
                "stale_checks": ev.stale_checks,
                "newest_write": _iso(ev.newest_write) if ev.newest_write is not None else None,
                "files_checked": ev.files_checked,
                "last_neighbour": ev.last_neighbour,
                "decided_at": _iso(decision.decided_at),
            }
        },
    )


# ---------------------------------------------------------------------------------------------
# Secret scrubbing


def collect_secrets(settings: BaseModel) -> set[str]:
    """Every non-empty `SecretStr` value anywhere in the settings (nested models, maps, lists)."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, SecretStr):
            secret = value.get_secret_value()
            if secret:
                found.add(secret)
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name))
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list | tuple | set | frozenset):
            for v in value:
                walk(v)

    walk(settings)
    return found


def _variants(secret: str) -> Iterator[str]:
    """The secret as it may be written: plain, URL-encoded, and as repr/JSON escape it."""
    yield secret
    yield quote(secret, safe="")
    yield quote_plus(secret, safe="")
    yield repr(secret)[1:-1]
    yield json.dumps(secret)[1:-1]


class SecretScrubber(logging.Filter):
    """Replaces every known secret in a log record with '**********'; never drops a record."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._needles: tuple[str, ...] = ()
        self.set_secrets(secrets)

    def set_secrets(self, secrets: Iterable[str]) -> None:
        """Replace the set of secrets to scrub."""
        needles = {v for s in secrets if s for v in _variants(s) if v}
        # Longest first, so a secret that contains another is removed whole.
        self._needles = tuple(sorted(needles, key=len, reverse=True))

    @property
    def active(self) -> bool:
        """Whether there is anything to scrub."""
        return bool(self._needles)

    def scrub(self, text: str) -> str:
        """The text with every secret replaced."""
        for needle in self._needles:
            if needle in text:
                text = text.replace(needle, REDACTED)
        return text

    def _scrub_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {self._scrub_value(k): self._scrub_value(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return type(value)(self._scrub_value(v) for v in value)
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, BaseModel):
            return self._scrub_value(value.model_dump(mode="json"))
        text = str(value)
        cleaned = self.scrub(text)
        return value if cleaned == text else cleaned

    def scrub_record(self, record: logging.LogRecord) -> None:
        """Scrub the record in place: message and args, traceback, stack, extra attributes."""
        if not self._needles:
            return
        try:
            message = record.getMessage()
        except Exception:
            # A broken format string: logging would print msg and args raw in handleError.
            message = f"{record.msg!s} {record.args!r}"
        record.msg, record.args = self.scrub(message), None
        if record.exc_info:
            # Render the traceback now, scrubbed, and drop the live exception so no formatter
            # can render the unscrubbed text again.
            if not record.exc_text:
                record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip()
            record.exc_info = None
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self.scrub(record.stack_info)
        for key, value in list(vars(record).items()):
            if key not in _RECORD_ATTRS:
                setattr(record, key, self._scrub_value(value))

    def filter(self, record: logging.LogRecord) -> bool:
        """Scrub, then let the record through."""
        self.scrub_record(record)
        return True


SCRUBBER = SecretScrubber()
_factory_lock = threading.Lock()
_factory_installed = False


def _install_record_factory() -> None:
    global _factory_installed
    with _factory_lock:
        if _factory_installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            SCRUBBER.scrub_record(record)
            return record

        logging.setLogRecordFactory(factory)
        _factory_installed = True


def install_secret_scrubber(settings: FencerSettings) -> SecretScrubber:
    """Scrub every secret of `settings` from all log output from now on; return the scrubber.

    Call again after the settings change (the UI can store new passwords): the set is replaced.
    The record factory covers message, args and tracebacks of every record however it is
    handled; the filter on the root logger's handlers also covers `extra` fields.
    """
    SCRUBBER.set_secrets(collect_secrets(settings))
    _install_record_factory()
    for handler in logging.getLogger().handlers:
        if SCRUBBER not in handler.filters:
            handler.addFilter(SCRUBBER)
    return SCRUBBER


def setup_observability(settings: FencerSettings) -> MetricsServer | None:
    """What every fencer process calls first: logging as configured (`log_level`, `log_json`),
    the secret scrubber, and the metrics endpoint if `metrics.enabled`."""
    configure_logging(settings.log_level, json=settings.log_json)
    install_secret_scrubber(settings)
    if not settings.metrics.enabled:
        return None
    return start_metrics_server(settings.metrics.port, addr=settings.metrics.listen)
