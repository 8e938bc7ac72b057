"""The committed topic schemas are the generated ones, and real records validate against them."""

from pathlib import Path

import jsonschema

from fencing.events import Evidence, FenceAction
from fencing.records import EvidenceSummary, FenceDecision, GateSignal, HostRef, ProbeResult
from streams.schemas import render_all, topic_schema

DOCS = Path(__file__).resolve().parents[2] / "docs" / "schemas"


def test_committed_schemas_match_the_models():
    generated = render_all()
    committed = {p.name: p.read_text() for p in DOCS.glob("*.schema.json")}
    assert committed == generated, "run: python -m streams.schemas docs/schemas"


def test_records_validate_and_carry_a_schema_version():
    host = HostRef(host_uuid="h1", cluster_uuid="c1")
    ev = EvidenceSummary(suspect_since=1.0, stale_checks=3)
    decision = FenceDecision(
        decision_id="h1/1/1",
        host=host,
        episode=1,
        action=FenceAction.STOP,
        approved=True,
        evidence=ev,
        decided_at=2.0,
    )
    result = ProbeResult(
        host=host, episode=1, check=1, evidence=Evidence.STALE, suspect_since=1.0, finished_at=3.0
    )
    gate = GateSignal(kind="cluster_size", cluster_uuid="c1", at=1.0, host_count=4)
    for field, rec in (
        ("fence_decisions", decision),
        ("probe_results", result),
        ("fence_proposals", gate),
    ):
        data = rec.model_dump(mode="json")
        assert data["schema_version"] == 1
        jsonschema.validate(data, topic_schema(field))
    bad = decision.model_dump(mode="json") | {"action": "explode"}
    try:
        jsonschema.validate(bad, topic_schema("fence_decisions"))
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("an unknown action must not validate")
