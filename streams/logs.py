"""Logs: plain text or one JSON object per line, and a secret scrubber every line leaves through.

Rules:
- Logs are plain text or one JSON object per line (`configure_logging`). Structured fields go in
  `extra={"fields": {...}}`; `log_decision` writes one line per fence decision with its evidence.
- No configured secret reaches a log: `install_secret_scrubber(settings)` collects every
  `SecretStr` value of the settings and removes it (fencing.redaction, the one redactor and its
  one mask) from each record's message, arguments, traceback, stack and extra fields, both when
  the record is made (a record factory, which survives handlers that others add later) and when
  a handler emits it (a Filter).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import traceback
from collections.abc import Iterable
from datetime import UTC, datetime
from enum import Enum
from typing import TYPE_CHECKING, Any, TextIO

from pydantic import BaseModel

from fencing.redaction import MASK as REDACTED
from fencing.redaction import Redactor, collect_secrets

if TYPE_CHECKING:
    from fencing.records import FenceDecision
    from fencing.settings import FencerSettings

__all__ = ["REDACTED", "collect_secrets"]

# ---------------------------------------------------------------------------------------------
# Structured logs

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


class SecretScrubber(logging.Filter):
    """Replaces every known secret in a log record with the mask of fencing.redaction; never
    drops a record."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._redact = Redactor(secrets)

    def set_secrets(self, secrets: Iterable[str]) -> None:
        """Replace the set of secrets to scrub."""
        self._redact.set_secrets(secrets)

    @property
    def active(self) -> bool:
        """Whether there is anything to scrub."""
        return self._redact.active

    def scrub(self, text: str) -> str:
        """The text with every secret replaced."""
        return self._redact(text)

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
        if not self._redact.active:
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
