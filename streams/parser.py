"""CloudStack event bus records in, typed facts out: `parse_record` never raises.

CloudStack's Kafka event bus sends only the event's description, a flat JSON object of strings
written by Gson (HTML-safe escapes, nulls dropped); the envelope (category, type) is lost, so the
category is told apart by the object's keys (research/cloudstack.md section 2). More than 99% of
real traffic is VM, volume and usage noise, so each record is classified by cheap key checks
first and only the few host-related ones reach a regular expression. Anything that is not a flat
object of strings comes back as `Rejected` (for the dead-letter topic), never as an exception.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, BinaryIO, ClassVar

# CloudStack descriptions are a few hundred bytes; anything this big is not one of them, and
# parsing it would only cost the stream time.
MAX_VALUE_BYTES = 1 << 20

# ---------------------------------------------------------------------------------------------
# Typed results


@dataclass(frozen=True)
class _HostAlert:
    """Fields shared by the three ALERT.COMPUTE.HOST outage alerts."""

    host_uuid: str | None  # None when only the numeric id is known (older wordings)
    host_name: str | None
    host_id: int | None  # CloudStack's internal numeric id, when the text carries it
    zone_uuid: str | None
    pod_uuid: str | None
    zone_name: str | None
    pod_name: str | None
    at: float | None  # eventDateTime, epoch seconds; None = use the Kafka record's timestamp
    subject: str


@dataclass(frozen=True)
class HostDisconnectedAlert(_HostAlert):
    """'Host disconnected, ...': the agent is gone; CloudStack thinks the host may be alive."""

    kind: ClassVar[str] = "host_disconnected"


@dataclass(frozen=True)
class HostDownAlert(_HostAlert):
    """'Host down, N' or the HA manager's 'Host is down, ...': CloudStack starts VM HA."""

    kind: ClassVar[str] = "host_down"
    vm_names: tuple[str, ...] = ()  # HA-enabled VMs named in the HA manager's alert body


@dataclass(frozen=True)
class HostAlertStateAlert(_HostAlert):
    """'Host in ALERT state, ...': CloudStack could not decide what happened."""

    kind: ClassVar[str] = "host_alert"


@dataclass(frozen=True)
class _HostAction:
    """Fields shared by host action events (API calls on a host)."""

    host_uuid: str | None
    status: str | None  # Created | Scheduled | Started | Completed
    description: str | None
    at: float | None


@dataclass(frozen=True)
class MaintenancePrepare(_HostAction):
    """ActionEvent MAINT.PREPARE: the host is being (or has been) put into maintenance."""

    kind: ClassVar[str] = "maintenance_prepare"


@dataclass(frozen=True)
class MaintenanceCancel(_HostAction):
    """ActionEvent MAINT.CANCEL: maintenance is being cancelled."""

    kind: ClassVar[str] = "maintenance_cancel"


@dataclass(frozen=True)
class Ignored:
    """A well-formed record fencer has no use for."""

    kind: ClassVar[str] = "ignored"
    reason: str


@dataclass(frozen=True)
class Rejected:
    """A record that is not a CloudStack description; `raw` is the original value bytes."""

    kind: ClassVar[str] = "rejected"
    reason: str
    raw: bytes


ParsedEvent = (
    HostDisconnectedAlert
    | HostDownAlert
    | HostAlertStateAlert
    | MaintenancePrepare
    | MaintenanceCancel
    | Ignored
    | Rejected
)

# ---------------------------------------------------------------------------------------------
# Texts, from AgentManagerImpl, HighAvailabilityManagerImpl and HAAbstractHostProvider

_DATE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}", re.ASCII)
# hostDesc = "name: <name> (id:<uuid, or numeric id before 4.20>), availability zone: <z>, pod: <p>"
_HOST_DESC = re.compile(
    r"name: (?P<name>.*?) \(id:(?P<id>[^)]*)\)"
    r"(?:, availability zone: (?P<zone>.*?))?(?:, pod: (?P<pod>.*))?$",
    re.DOTALL,
)
_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}", re.ASCII)
_DIGITS = re.compile(r"\d{1,18}", re.ASCII)
# 4.20+: Host.toString() is 'Host {"id":12,"name":"kvm03","type":"Routing","uuid":"..."}'
_HOST_JSON = re.compile(r"Host (\{.*?\})", re.DOTALL)
# before 4.20: "Host is down: 12-kvm03. Starting HA on the VMs"; "host is in alert state: 12-kvm03"
_OLD_ID_NAME = re.compile(r"(?:down|alert state): (?P<id>\d{1,18})-(?P<name>\S+?)\.?(?:\s|$)")
_DOWN_SUBJECT = re.compile(r"Host down, (?P<id>\S+)$")
_VMS = re.compile(r"Starting HA on the following VMs:(?P<vms>.*)$", re.DOTALL)


def parse_time(text: str | None) -> float | None:
    """CloudStack's `yyyy-MM-dd HH:mm:ss Z` as epoch seconds; None if missing or garbled."""
    if text is None or len(text) != 25 or _DATE.fullmatch(text) is None:
        return None
    try:
        return datetime.fromisoformat(text[:19] + text[20:]).timestamp()
    except ValueError:  # 2025-02-30 and the like
        return None


def _int(text: str | None) -> int | None:
    return int(text) if text is not None and _DIGITS.fullmatch(text) else None


def _uuid(text: str | None) -> str | None:
    return text if text is not None and _UUID.fullmatch(text) else None


def _host_json(text: str) -> dict[str, Any] | None:
    m = _HOST_JSON.search(text)
    if m is None:
        return None
    try:
        obj = json.loads(m.group(1))
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _parse_host_alert(d: dict[str, str], subject: str) -> ParsedEvent:
    body = d.get("body", "")
    common: dict[str, Any] = {
        "zone_uuid": d.get("dataCenterId"),
        "pod_uuid": d.get("podId"),
        "at": parse_time(d.get("eventDateTime")),
        "subject": subject,
    }
    if subject.startswith("Host down, "):
        m = _DOWN_SUBJECT.match(subject)
        host_id = _int(m.group("id")) if m else None
        uuid = name = None
        obj = _host_json(body)
        if obj is not None:
            uuid = obj.get("uuid") if isinstance(obj.get("uuid"), str) else None
            name = obj.get("name") if isinstance(obj.get("name"), str) else None
            oid = obj.get("id")
            if host_id is None and isinstance(oid, int) and not isinstance(oid, bool):
                host_id = oid
        else:
            old = _OLD_ID_NAME.search(body)
            if old is not None:
                name = old.group("name")
                host_id = host_id if host_id is not None else int(old.group("id"))
        return HostDownAlert(
            host_uuid=uuid,
            host_name=name,
            host_id=host_id,
            zone_name=None,
            pod_name=None,
            **common,
        )
    found = next(((p, c) for p, c in _DESC_SUBJECTS if subject.startswith(p)), None)
    if found is None:
        return Ignored(f"host alert not about an outage: {subject[:80]}")
    prefix, cls = found
    m = _HOST_DESC.match(subject, len(prefix))
    if m is None:
        return Rejected(f"{prefix.rstrip(', ')} alert without a host description", b"")
    ident = m.group("id")
    fields_: dict[str, Any] = {
        "host_uuid": _uuid(ident),
        "host_name": m.group("name"),
        "host_id": _int(ident),
        "zone_name": m.group("zone"),
        "pod_name": m.group("pod"),
        **common,
    }
    if cls is HostDownAlert:
        vms = _VMS.search(body)
        names = tuple(vms.group("vms").split()) if vms else ()
        return HostDownAlert(**fields_, vm_names=names)
    return cls(**fields_)


_DESC_SUBJECTS: tuple[
    tuple[str, type[HostDisconnectedAlert | HostDownAlert | HostAlertStateAlert]], ...
] = (
    ("Host disconnected, ", HostDisconnectedAlert),
    ("Host is down, ", HostDownAlert),
    ("Host in ALERT state, ", HostAlertStateAlert),
)


def _action_host(d: dict[str, str], key: str | None) -> str | None:
    # entityuuid is the entity the API call acted on; the "Host" key appears only when the
    # CallContext carried the host; the record key is the event's resource uuid.
    return d.get("entityuuid") or d.get("Host") or key


def _parse_action(d: dict[str, str], event: str, key: str | None) -> ParsedEvent:
    cls: type[_HostAction]
    if event == "MAINT.PREPARE":
        cls = MaintenancePrepare
    elif event == "MAINT.CANCEL":
        cls = MaintenanceCancel
    else:
        return Ignored(f"action event {event[:60]}")
    return cls(
        host_uuid=_action_host(d, key),
        status=d.get("status"),
        description=d.get("description"),
        at=parse_time(d.get("eventDateTime")),
    )


def _classify(d: dict[str, str], key: str | None) -> ParsedEvent:
    if "new-state" in d:  # ResourceStateEvent
        resource = d.get("resource")
        return Ignored(f"{(resource or 'resource')[:40]} state change")
    event = d.get("event")
    if event is not None:
        if "subject" in d or event.startswith("ALERT."):  # AlertEvent
            if event == "ALERT.COMPUTE.HOST":
                return _parse_host_alert(d, d.get("subject", ""))
            return Ignored(f"alert {event[:60]}")
        if "status" in d or "entity" in d or "user" in d:  # ActionEvent
            return _parse_action(d, event, key)
        if "resource" in d or "zone" in d:  # UsageEvent (UsageEventUtils.publishUsageEvent)
            return Ignored(f"usage event {event[:60]}")
        return Rejected("event without subject (alert) or status (action)", b"")
    if "usage type" in d or "usageType" in d:
        return Ignored("usage event")
    if "commandEventType" in d or "jobId" in d:
        return Ignored("async job event")
    return Rejected(f"unknown shape, keys: {', '.join(sorted(d)[:8])[:200]}", b"")


def _text(data: bytes | str | None) -> tuple[str | None, bytes]:
    """(decoded text or None, raw bytes) of a record part."""
    if data is None:
        return None, b""
    if isinstance(data, str):
        return data, data.encode("utf-8", "surrogatepass")
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        try:
            return raw.decode("utf-8"), raw
        except UnicodeDecodeError:
            return None, raw
    return None, repr(data).encode()


def parse_record(key: bytes | str | None, value: bytes | str | None) -> ParsedEvent:
    """Classify one record of CloudStack's event bus; never raises."""
    try:
        text, raw = _text(value)
        if value is None:
            return Rejected("empty value (tombstone)", raw)
        if text is None:
            return Rejected("value is not UTF-8 text", raw)
        if len(raw) > MAX_VALUE_BYTES:
            return Rejected(f"value too large ({len(raw)} bytes)", raw)
        try:
            d = json.loads(text)
        except (ValueError, RecursionError):
            return Rejected("value is not JSON", raw)
        if type(d) is not dict:
            return Rejected(f"value is a JSON {type(d).__name__}, not an object", raw)
        for k, v in d.items():
            if type(v) is not str:
                return Rejected(f"value of {k[:40]!r} is a {type(v).__name__}, not a string", raw)
        k_text, _ = _text(key)
        result = _classify(d, k_text or None)
        if type(result) is Rejected and not result.raw:
            return Rejected(result.reason, raw)
        return result
    except Exception as exc:  # the stream must never see an exception from here
        try:
            raw_bytes = _text(value)[1]
        except Exception:
            raw_bytes = b""
        return Rejected(f"parser error: {type(exc).__name__}", raw_bytes)


def to_jsonable(parsed: ParsedEvent) -> dict[str, Any]:
    """A JSON-ready dict of a parse result: `kind` first, bytes as base64."""
    out: dict[str, Any] = {"kind": parsed.kind}
    for f in fields(parsed):
        v = getattr(parsed, f.name)
        if isinstance(v, bytes):
            out[f"{f.name}_b64"] = base64.b64encode(v).decode("ascii")
        elif isinstance(v, tuple):
            out[f.name] = list(v)
        else:
            out[f.name] = v
    return out


# ---------------------------------------------------------------------------------------------
# fencer events parse [FILE]


def parse_lines(lines: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """One output dict per non-blank JSON line `{"key": ..., "value": "..."}`."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        result = _parse_line(line)
        yield {"line": number, **to_jsonable(result)}


def _parse_line(line: bytes) -> ParsedEvent:
    raw = line.rstrip(b"\r\n")
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return Rejected("input line is not JSON", raw)
    if not isinstance(rec, dict) or "value" not in rec:
        return Rejected('input line is not an object with "key" and "value"', raw)
    key, value = rec.get("key"), rec["value"]
    if isinstance(value, dict):  # a convenience for hand-written input: the object itself
        value = json.dumps(value)
    if key is not None and not isinstance(key, str):
        return Rejected("input key is not a string or null", raw)
    if value is not None and not isinstance(value, str):
        return Rejected("input value is not a string, an object or null", raw)
    return parse_record(key, value)


def cli_parse(args: argparse.Namespace) -> int:
    """`fencer events parse [FILE]`: print one JSON line per input record; exit 0."""
    path = getattr(args, "file", "-") or "-"
    stream: BinaryIO
    if path == "-":
        stream = sys.stdin.buffer
    else:
        try:
            stream = open(path, "rb")
        except OSError as exc:
            print(f"fencer: cannot read {path}: {exc.strerror}", file=sys.stderr)
            return 1
    try:
        out = sys.stdout
        for item in parse_lines(stream):
            out.write(json.dumps(item) + "\n")
            out.flush()
    except BrokenPipeError:  # `| head` closed the pipe: not an error
        sys.stdout = open(os.devnull, "w")  # keep the exit flush quiet
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    return 0
