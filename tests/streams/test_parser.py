"""The CloudStack event parser: every shape of the event bus, typed; junk never raises."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.parser import (
    MAX_VALUE_BYTES,
    HostAlertStateAlert,
    HostDisconnectedAlert,
    HostDownAlert,
    Ignored,
    MaintenanceCancel,
    MaintenancePrepare,
    ParsedEvent,
    Rejected,
    parse_record,
    parse_time,
    to_jsonable,
)

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "cloudstack-events.jsonl"
FENCER = Path(sys.executable).parent / "fencer"

HOST = "5b2c6f0e-1d7a-4c1e-9a55-0c1f3e2a9b10"
ZONE = "a7f3e0b2-3c41-4f0e-8d6b-2a9b1c0d4e55"
POD = "0e4d2c1b-77aa-4b6e-9f00-5d3c2b1a0f99"
VM = "e1d2c3b4-5a69-4788-9a0b-1c2d3e4f5a6b"
WHEN = "2025-03-14 10:25:02 +0000"
WHEN_TS = datetime(2025, 3, 14, 10, 25, 2, tzinfo=UTC).timestamp()


def gson(d: dict[str, Any]) -> str:
    """Serialise like CloudStack's `new Gson().toJson(map)`: compact and HTML-safe."""
    text = json.dumps(d, separators=(",", ":"), ensure_ascii=False)
    for ch in "<>&='":
        text = text.replace(ch, f"\\u{ord(ch):04x}")
    return text


def alert(event: str, subject: str, body: str | None, **extra: str) -> str:
    d = {"eventDateTime": WHEN, "subject": subject, "dataCenterId": ZONE, "event": event}
    if body is not None:  # Gson drops nulls
        d["body"] = body
    d["podId"] = POD
    d.update(extra)
    return gson(d)


def action(event: str, status: str, **extra: str) -> str:
    d = {"eventDateTime": WHEN, "event": event, "user": "u-1", "account": "a-1", "status": status}
    d.update(extra)
    return gson(d)


def samples() -> list[tuple[str | None, str]]:
    return [
        (rec["key"], rec["value"])
        for rec in map(json.loads, SAMPLES.read_text().splitlines())
        if rec
    ]


# ---------------------------------------------------------------------------------------------
# The shipped samples, each asserted whole


def test_every_sample_is_classified_exactly() -> None:
    expected: list[ParsedEvent] = [
        HostDisconnectedAlert(
            host_uuid=HOST,
            host_name="kvm03",
            host_id=None,
            zone_uuid=ZONE,
            pod_uuid=POD,
            zone_name="zone1",
            pod_name="pod1",
            at=datetime(2025, 3, 14, 10, 22, 31, tzinfo=UTC).timestamp(),
            subject=f"Host disconnected, name: kvm03 (id:{HOST}), availability zone: zone1, "
            "pod: pod1",
        ),
        HostDownAlert(
            host_uuid=HOST,
            host_name="kvm03",
            host_id=12,
            zone_uuid=ZONE,
            pod_uuid=POD,
            zone_name=None,
            pod_name=None,
            at=WHEN_TS,
            subject="Host down, 12",
            vm_names=(),
        ),
        Ignored("action event HA.STATE.TRANSITION"),
        MaintenancePrepare(
            host_uuid=HOST,
            status="Completed",
            description="completed maintenance for host 12",
            at=datetime(2025, 3, 14, 11, 2, 45, tzinfo=UTC).timestamp(),
        ),
        Ignored("VirtualMachine state change"),
    ]
    got = [parse_record(k, v) for k, v in samples()]
    assert got == expected
    # The same bytes as Kafka delivers them give the same results.
    assert [parse_record(k and k.encode(), v.encode()) for k, v in samples()] == expected


# ---------------------------------------------------------------------------------------------
# Host alerts, both wordings


def test_host_disconnected_older_wording_has_numeric_id_only() -> None:
    subject = "Host disconnected, name: kvm03 (id:12), availability zone: zone1, pod: pod1"
    body = f"If the agent for host [{subject[19:]}] is not restarted within 1800 seconds, ..."
    assert parse_record(None, alert("ALERT.COMPUTE.HOST", subject, body)) == (
        HostDisconnectedAlert(
            host_uuid=None,
            host_name="kvm03",
            host_id=12,
            zone_uuid=ZONE,
            pod_uuid=POD,
            zone_name="zone1",
            pod_name="pod1",
            at=WHEN_TS,
            subject=subject,
        )
    )


def test_host_down_older_body_gives_name_and_id_but_no_uuid() -> None:
    body = "Host is down: 12-kvm03.lab.example. Starting HA on the VMs"
    assert parse_record(None, alert("ALERT.COMPUTE.HOST", "Host down, 12", body)) == (
        HostDownAlert(
            host_uuid=None,
            host_name="kvm03.lab.example",
            host_id=12,
            zone_uuid=ZONE,
            pod_uuid=POD,
            zone_name=None,
            pod_name=None,
            at=WHEN_TS,
            subject="Host down, 12",
        )
    )


def test_host_down_420_body_gives_uuid_from_host_json() -> None:
    host_json = json.dumps(
        {"id": 7, "name": "kvm-a", "type": "Routing", "uuid": HOST}, separators=(",", ":")
    )
    body = f"Host Host {host_json} is down. Starting HA on the VMs"
    got = parse_record(None, alert("ALERT.COMPUTE.HOST", "Host down, 7", body))
    assert got == HostDownAlert(
        host_uuid=HOST,
        host_name="kvm-a",
        host_id=7,
        zone_uuid=ZONE,
        pod_uuid=POD,
        zone_name=None,
        pod_name=None,
        at=WHEN_TS,
        subject="Host down, 7",
    )


def test_host_down_without_body_keeps_the_numeric_id() -> None:
    got = parse_record(None, alert("ALERT.COMPUTE.HOST", "Host down, 31", None))
    assert isinstance(got, HostDownAlert)
    assert (got.host_uuid, got.host_name, got.host_id) == (None, None, 31)


def test_ha_manager_second_alert_is_host_down_with_vm_names() -> None:
    desc = "name: kvm03 (id:12), availability zone: z1, pod: p1"
    body = f"Host [{desc}] is down.  Starting HA on the following VMs: web01 db01"
    assert parse_record(None, alert("ALERT.COMPUTE.HOST", f"Host is down, {desc}", body)) == (
        HostDownAlert(
            host_uuid=None,
            host_name="kvm03",
            host_id=12,
            zone_uuid=ZONE,
            pod_uuid=POD,
            zone_name="z1",
            pod_name="p1",
            at=WHEN_TS,
            subject=f"Host is down, {desc}",
            vm_names=("web01", "db01"),
        )
    )


@pytest.mark.parametrize(
    ("ident", "uuid", "host_id"), [(HOST, HOST, None), ("12", None, 12)], ids=["4.20", "older"]
)
def test_host_in_alert_state_both_wordings(ident: str, uuid: str | None, host_id: int) -> None:
    subject = (
        f"Host in ALERT state, name: kvm03 (id:{ident}), availability zone: zone1, pod: NO POD"
    )
    body = "In availability zone 1, host is in alert state: 12-kvm03"
    assert parse_record(None, alert("ALERT.COMPUTE.HOST", subject, body)) == (
        HostAlertStateAlert(
            host_uuid=uuid,
            host_name="kvm03",
            host_id=host_id,
            zone_uuid=ZONE,
            pod_uuid=POD,
            zone_name="zone1",
            pod_name="NO POD",
            at=WHEN_TS,
            subject=subject,
        )
    )


def test_gson_html_escapes_are_decoded() -> None:
    subject = "Host disconnected, name: kvm03 (id:12), availability zone: Zone 'A' <a&b=c>, pod: p"
    value = alert("ALERT.COMPUTE.HOST", subject, "x")
    assert "\\u003d" in value and "\\u0027" in value and "\\u003c" in value
    got = parse_record(None, value)
    assert isinstance(got, HostDisconnectedAlert)
    assert got.zone_name == "Zone 'A' <a&b=c>"
    assert got.subject == subject


def test_other_host_alerts_and_other_alert_types_are_ignored() -> None:
    other = parse_record(None, alert("ALERT.COMPUTE.HOST", "Unable to add the host", "b"))
    assert other == Ignored("host alert not about an outage: Unable to add the host")
    vm = parse_record(None, alert("ALERT.USERVM", "VM web01 stopped unexpectedly", "b"))
    assert vm == Ignored("alert ALERT.USERVM")


def test_host_alert_with_a_garbled_description_is_rejected() -> None:
    value = alert("ALERT.COMPUTE.HOST", "Host disconnected, kvm03 went away", "b")
    got = parse_record(None, value)
    assert got == Rejected("Host disconnected alert without a host description", value.encode())


# ---------------------------------------------------------------------------------------------
# HA actions, maintenance, reconnect


@pytest.mark.parametrize("word", ["Fencing", "Recovery"])
def test_cloudstack_own_ha_actions_are_ignored(word: str) -> None:
    subject = f"HA {word} of host id=12, in dc id=1 performed"
    body = f"HA {word} has been performed for host id=12, uuid={HOST} in datacenter id=1"
    assert parse_record(None, alert("ALERT.HA.ACTION", subject, body)) == Ignored(
        "alert ALERT.HA.ACTION"
    )
    desc = (
        "Transitioned host HA state from: Fencing to: Fenced due to event:Fenced for the host "
        f'Host {{"id":12,"name":"kvm03","type":"Routing","uuid":"{HOST}"}} with id: 12'
    )
    got = parse_record(None, action("HA.STATE.TRANSITION", "Completed", description=desc))
    assert got == Ignored("action event HA.STATE.TRANSITION")


@pytest.mark.parametrize("status", ["Scheduled", "Started", "Completed"])
def test_maintenance_prepare_each_status(status: str) -> None:
    value = action(
        "MAINT.PREPARE",
        status,
        entity="Host",
        entityuuid=HOST,
        Host=HOST,
        description="preparing host\u003d12 for maintenance",
    )
    assert parse_record(HOST, value) == MaintenancePrepare(
        host_uuid=HOST,
        status=status,
        description="preparing host=12 for maintenance",
        at=WHEN_TS,
    )


def test_maintenance_host_from_host_key_then_record_key() -> None:
    other = "11111111-2222-3333-4444-555555555555"
    only_host_key = action("MAINT.CANCEL", "Completed", Host=HOST)
    assert parse_record(None, only_host_key) == MaintenanceCancel(
        host_uuid=HOST, status="Completed", description=None, at=WHEN_TS
    )
    neither = action("MAINT.CANCEL", "Started", entity="Host")
    assert parse_record(other.encode(), neither) == MaintenanceCancel(
        host_uuid=other, status="Started", description=None, at=WHEN_TS
    )


def test_host_reconnect_is_ignored() -> None:
    value = action("HOST.RECONNECT", "Completed", entity="Host", entityuuid=HOST)
    assert parse_record(HOST, value) == Ignored("action event HOST.RECONNECT")


def test_storage_pool_maintenance_and_other_actions_are_ignored() -> None:
    assert parse_record(None, action("MAINT.PREPARE.PS", "Completed")) == Ignored(
        "action event MAINT.PREPARE.PS"
    )
    assert parse_record(None, action("VM.CREATE", "Created")) == Ignored("action event VM.CREATE")


# ---------------------------------------------------------------------------------------------
# VM and other resource state changes, usage, async jobs


def vm_state(status: str | None, **extra: str) -> str:
    d = {
        "eventDateTime": WHEN,
        "old-state": "Stopped",
        "resource": "VirtualMachine",
        "id": VM,
        "new-state": "Starting",
    }
    if status is not None:
        d["status"] = status
    d.update(extra)
    return gson(d)


def test_vm_state_changes_are_ignored() -> None:
    for status in ("postStateTransitionEvent", "preStateTransitionEvent", None):
        assert parse_record(VM, vm_state(status)) == Ignored("VirtualMachine state change")


def test_volume_and_network_state_changes_are_ignored() -> None:
    for resource in ("Volume", "Network", "Snapshot"):
        value = gson({"resource": resource, "id": VM, "old-state": "Ready", "new-state": "Destroy"})
        assert parse_record(VM, value) == Ignored(f"{resource} state change")


def test_usage_and_async_job_events_are_ignored() -> None:
    usage = gson({"usage type": "VM.START", "zoneId": "1", "resourceName": "web01"})
    assert parse_record(None, usage) == Ignored("usage event")
    job = gson({"command": "x", "jobId": "j", "commandEventType": "VM.START", "user": "u"})
    assert parse_record(None, job) == Ignored("async job event")


# ---------------------------------------------------------------------------------------------
# Dates


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-03-14 10:22:31 +0000", datetime(2025, 3, 14, 10, 22, 31, tzinfo=UTC).timestamp()),
        ("2025-03-14 10:22:31 -0530", datetime(2025, 3, 14, 15, 52, 31, tzinfo=UTC).timestamp()),
        ("2025-02-30 10:22:31 +0000", None),
        ("2025-03-14T10:22:31+00:00", None),
        ("Fri Mar 14 10:22:31 UTC 2025", None),
        ("", None),
        (None, None),
    ],
)
def test_event_date_time(text: str | None, expected: float | None) -> None:
    assert parse_time(text) == expected


def test_garbled_date_leaves_at_unset() -> None:
    value = action("MAINT.PREPARE", "Completed", Host=HOST, eventDateTime="yesterday")
    got = parse_record(HOST, value)
    assert isinstance(got, MaintenancePrepare) and got.at is None


# ---------------------------------------------------------------------------------------------
# Rejections


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "empty value (tombstone)"),
        (b"\xff\xfe{}", "value is not UTF-8 text"),
        (b"{not json", "value is not JSON"),
        ("", "value is not JSON"),
        ("[1, 2]", "value is a JSON list, not an object"),
        ("42", "value is a JSON int, not an object"),
        ('"text"', "value is a JSON str, not an object"),
        ('{"event": "ALERT.COMPUTE.HOST", "subject": null}', "value of 'subject' is a NoneType"),
        ('{"resource": "VirtualMachine", "id": 5}', "value of 'id' is a int"),
        ('{"event": {"nested": "x"}}', "value of 'event' is a dict"),
        ('{"foo": "bar"}', "unknown shape, keys: foo"),
        ('{"event": "X.Y"}', "event without subject (alert) or status (action)"),
        ("[" * 100_000 + "]" * 100_000, "value is not JSON"),
    ],
)
def test_rejections_keep_the_raw_bytes(value: str | bytes | None, reason: str) -> None:
    got = parse_record(None, value)
    assert isinstance(got, Rejected)
    assert got.reason.startswith(reason)
    raw = b"" if value is None else value if isinstance(value, bytes) else value.encode()
    assert got.raw == raw


def test_huge_value_is_rejected_without_parsing() -> None:
    value = gson({"event": "ALERT.COMPUTE.HOST", "subject": "x" * MAX_VALUE_BYTES})
    got = parse_record(None, value)
    assert got == Rejected(f"value too large ({len(value)} bytes)", value.encode())


def test_to_jsonable_puts_kind_first_and_raw_as_base64() -> None:
    assert to_jsonable(Rejected("value is not JSON", b"\xff")) == {
        "kind": "rejected",
        "reason": "value is not JSON",
        "raw_b64": base64.b64encode(b"\xff").decode(),
    }
    for k, v in samples():
        out = to_jsonable(parse_record(k, v))
        assert next(iter(out)) == "kind"
        assert json.loads(json.dumps(out)) == out


# ---------------------------------------------------------------------------------------------
# Junk never raises

KNOWN_KEYS = {
    "new-state",
    "event",
    "subject",
    "usage type",
    "usageType",
    "commandEventType",
    "jobId",
}
json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_leaf,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_junk_result(got: ParsedEvent) -> None:
    assert isinstance(got, (Rejected, Ignored)), got
    json.dumps(to_jsonable(got))


@FAST
@given(key=st.none() | st.binary(max_size=40) | st.text(max_size=40), value=st.binary())
def test_random_bytes_never_raise(key: bytes | str | None, value: bytes) -> None:
    assert_junk_result(parse_record(key, value))


@FAST
@given(value=json_values.filter(lambda v: not isinstance(v, dict)))
def test_json_of_other_shapes_is_rejected(value: Any) -> None:
    got = parse_record(None, json.dumps(value))
    assert isinstance(got, Rejected)


@FAST
@given(
    value=st.dictionaries(st.text(max_size=20), json_values, min_size=1, max_size=6).filter(
        lambda d: any(not isinstance(v, str) for v in d.values())
    )
)
def test_objects_with_non_string_values_are_rejected(value: dict[str, Any]) -> None:
    got = parse_record(None, json.dumps(value))
    assert isinstance(got, Rejected) and "not a string" in got.reason


@FAST
@given(
    value=st.dictionaries(
        st.text(max_size=20).filter(lambda k: k not in KNOWN_KEYS), st.text(), max_size=8
    )
)
def test_flat_objects_of_unknown_shape_are_rejected(value: dict[str, str]) -> None:
    got = parse_record(None, gson(value))
    assert isinstance(got, Rejected) and got.reason.startswith("unknown shape")


@FAST
@given(
    which=st.integers(min_value=0, max_value=4),
    data=st.data(),
)
def test_samples_with_missing_keys_or_garbage_values_never_raise(
    which: int, data: st.DataObject
) -> None:
    key, value = samples()[which]
    d = json.loads(value)
    keys = sorted(d)
    gone = data.draw(st.sets(st.sampled_from(keys)))
    changed = data.draw(st.dictionaries(st.sampled_from(keys), st.text(), max_size=3))
    huge = data.draw(st.booleans())
    for k in gone:
        d.pop(k, None)
    d.update({k: v for k, v in changed.items() if k not in gone})
    if huge and d:
        d[keys[0]] = "\u00e9" * 200_000
    got = parse_record(data.draw(st.sampled_from([key, None, "junk"])), gson(d))
    out = to_jsonable(got)
    json.dumps(out)
    if not d:
        assert got == Rejected("unknown shape, keys: ", b"{}")


@FAST
@given(
    subject=st.text(max_size=200),
    body=st.text(max_size=200),
    event=st.sampled_from(["ALERT.COMPUTE.HOST", "ALERT.HA.ACTION"]),
    prefix=st.sampled_from(
        ["", "Host down, ", "Host is down, ", "Host disconnected, ", "Host in ALERT state, "]
    ),
)
def test_host_alerts_with_random_texts_never_raise(
    subject: str, body: str, event: str, prefix: str
) -> None:
    got = parse_record(None, alert(event, prefix + subject, body))
    json.dumps(to_jsonable(got))


# ---------------------------------------------------------------------------------------------
# fencer events parse, end to end


def run_cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(FENCER), "events", "parse", *args], input=stdin, capture_output=True, timeout=60
    )


def test_cli_parses_the_sample_file() -> None:
    proc = run_cli(str(SAMPLES))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["kind"] for line in lines] == [
        "host_disconnected",
        "host_down",
        "ignored",
        "maintenance_prepare",
        "ignored",
    ]
    assert lines == [
        {"line": n, **to_jsonable(parse_record(k, v))} for n, (k, v) in enumerate(samples(), 1)
    ]


@pytest.mark.parametrize("args", [(), ("-",)], ids=["default", "dash"])
def test_cli_reads_stdin_and_rejects_malformed_lines(args: tuple[str, ...]) -> None:
    good = SAMPLES.read_bytes().splitlines()[1]
    stdin = b"\n".join(
        [
            good,
            b"{broken",
            b"\xff\xfe not utf-8",
            b"",
            b'["a list"]',
            b'{"key": 5, "value": "{}"}',
            json.dumps({"key": None, "value": {"usage type": "VM.START"}}).encode(),
            json.dumps({"key": None, "value": "{}"}).encode(),
        ]
    )
    proc = run_cli(*args, stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    assert b"Traceback" not in proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(o["line"], o["kind"]) for o in out] == [
        (1, "host_down"),
        (2, "rejected"),
        (3, "rejected"),
        (5, "rejected"),
        (6, "rejected"),
        (7, "ignored"),
        (8, "rejected"),
    ]
    assert base64.b64decode(out[1]["raw_b64"]) == b"{broken"
    assert base64.b64decode(out[2]["raw_b64"]) == b"\xff\xfe not utf-8"
    assert out[2]["reason"] == "input line is not JSON"
    assert out[6]["reason"] == "unknown shape, keys: "


def test_cli_missing_file_is_one_clear_line() -> None:
    proc = run_cli("/nonexistent/events.jsonl")
    assert proc.returncode == 1
    assert proc.stdout == b""
    err = proc.stderr.decode()
    assert "/nonexistent/events.jsonl" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_usage_events_as_cloudstack_publishes_them_are_ignored():
    # UsageEventUtils.publishUsageEvent: account, zone, event, resource, id, eventDateTime
    value = (
        '{"eventDateTime":"2025-03-14 10:25:07 +0000","zone":"a7f3e0b2","event":"VM.START",'
        '"resource":"VirtualMachine","id":"e1d2c3b4","account":"c3b1f2d4"}'
    )
    parsed = parse_record(None, value)
    assert isinstance(parsed, Ignored)
    assert "usage" in parsed.reason
