"""A minimal Faust worker for the recovery test: an agent counts events per key into a table.

Run: `python faust_counter.py SETTINGS_JSON OUT_JSON`. The settings decide everything through
`streams.kafka` (prepare_kafka, faust_app_kwargs), exactly as the service does; the source topic
is `settings.kafka.topics.cloudstack`. Once table recovery has completed, the worker writes the
table to OUT_JSON every 0.1 s (atomically), so the test can read what the worker recovered.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import faust

from fencing.settings import FencerSettings
from streams.kafka import faust_app_kwargs, prepare_kafka

settings = FencerSettings.model_validate_json(Path(sys.argv[1]).read_text())
out = Path(sys.argv[2])

prepare_kafka(settings)
# A producer linger makes each partition's last changelog batch hold several records, the case
# Tansu's ListOffsets gets wrong; with Faust's default (no linger) batching is left to timing.
app = faust.App(settings.kafka.group_id, producer_linger=0.2, **faust_app_kwargs(settings))
events = app.topic(settings.kafka.topics.cloudstack, key_serializer="raw", value_serializer="raw")
counts = app.Table("counts", default=int)


@app.agent(events)
async def count(stream: Any) -> None:
    async for event in stream.events():
        counts[event.key.decode()] += 1


@app.timer(interval=0.1)
async def report() -> None:
    if not app.tables.recovery.completed.is_set() or app.in_recovery:
        return
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "counts": dict(counts.items())}))
    tmp.replace(out)


if __name__ == "__main__":
    worker = faust.Worker(app, loglevel="warning", quiet=True)
    worker.execute_from_commandline()
