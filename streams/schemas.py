"""The JSON schema of every fencer topic, generated from the wire models (fencing/records.py).

`python -m streams.schemas docs/schemas` writes one file per topic; a test keeps the committed
files equal to the generated ones, so other systems can consume the topics from the docs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from fencing.records import (
    SCHEMA_VERSION,
    BmcPin,
    DeadLetter,
    FenceClaim,
    FenceDecision,
    FenceOutcome,
    FenceProposal,
    GateSignal,
    HostSignal,
    HostStateRecord,
    IpmiTestAnswer,
    Notice,
    OperatorAction,
    ProbeRequest,
    ProbeResult,
)
from fencing.settings import TopicNames

# Topic field name -> the models its values can be (the gate's topic carries two).
TOPIC_MODELS: dict[str, tuple[type[BaseModel], ...]] = {
    "host_signals": (HostSignal,),
    "probe_requests": (ProbeRequest,),
    "probe_results": (ProbeResult,),
    "fence_proposals": (FenceProposal, GateSignal),
    "fence_decisions": (FenceDecision,),
    "fence_outcomes": (FenceOutcome,),
    "notices": (Notice,),
    "host_states": (HostStateRecord,),
    "dead_letter": (DeadLetter,),
    "fence_claims": (FenceClaim,),
    "operator_actions": (OperatorAction,),
    "bmc_pins": (BmcPin,),
    "ipmi_tests": (IpmiTestAnswer,),
}


def topic_schema(field: str) -> dict[str, Any]:
    """The JSON schema of one topic's record values."""
    topic = getattr(TopicNames(), field)
    models = TOPIC_MODELS[field]
    if len(models) == 1:
        schema = models[0].model_json_schema(mode="serialization")
    else:
        parts = [m.model_json_schema(mode="serialization") for m in models]
        defs: dict[str, Any] = {}
        for p in parts:
            defs.update(p.pop("$defs", {}))
        schema = {"oneOf": parts, **({"$defs": defs} if defs else {})}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"fencer/{topic}/v{SCHEMA_VERSION}",
        "title": f"{topic} record value",
        "description": f"Kafka topic '{topic}' (default name), schema_version {SCHEMA_VERSION}.",
        **schema,
    }


def render_all() -> dict[str, str]:
    """File name -> contents for every topic."""
    out = {}
    for field in TOPIC_MODELS:
        name = getattr(TopicNames(), field)
        out[f"{name}.schema.json"] = (
            json.dumps(topic_schema(field), indent=2, sort_keys=True) + "\n"
        )
    return out


def main(argv: list[str]) -> int:
    target = Path(argv[0] if argv else "docs/schemas")
    target.mkdir(parents=True, exist_ok=True)
    for name, text in render_all().items():
        (target / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
