"""Memory per monitored host in the `hosts` table: 10,000 suspect rows, built exactly as
`streams.watch.apply` stores them, held in a plain dict (what Faust's memory store holds: it
keeps the Python values, no serialisation), against the same 10,000 keys with empty rows.

Rule: each row is a realistic suspect row: a HostDisconnected with a full HostRef (name,
cluster, zone, ip), then a Tick one check interval later (so a probe is pending). Both the rows
as `apply` returns them and as a restarted worker holds them after changelog recovery (JSON
decoded) are measured with tracemalloc; the RSS delta of the first is reported too.

    python -m benchmarks.table_memory --json [--hosts N]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
import tracemalloc
import uuid
from collections.abc import Callable
from typing import Any

from fencing.events import HostDisconnected, HostStatus, Tick
from fencing.records import HostRef
from fencing.settings import FencerSettings, PolicySettings
from streams.codec import HostInput
from streams.watch import apply

TARGET_BYTES = 2048


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _inputs(hosts: int) -> list[tuple[str, HostRef]]:
    zone, clusters = str(uuid.uuid4()), [str(uuid.uuid4()) for _ in range(max(1, hosts // 20))]
    refs = []
    for i in range(hosts):
        key = str(uuid.uuid4())
        refs.append(
            (
                key,
                HostRef(
                    host_uuid=key,
                    host_name=f"kvm{i:05d}",
                    cluster_uuid=clusters[i % len(clusters)],
                    zone_uuid=zone,
                    ip_address=f"10.{i // 65536}.{i // 256 % 256}.{i % 256}",
                ),
            )
        )
    return refs


def build_rows(hosts: int) -> dict[str, dict[str, Any]]:
    """`hosts` suspect rows keyed by host uuid, each as `apply` stores it."""
    settings = FencerSettings(policy=PolicySettings(startup_quiet=0))
    policy = settings.policy.to_policy()
    topics = settings.kafka.topics
    now = time.time()
    table: dict[str, dict[str, Any]] = {}
    for key, ref in _inputs(hosts):
        row, _ = apply(
            None, HostInput(HostDisconnected(now, HostStatus.DISCONNECTED), ref), key, policy,
            settings, topics,
        )  # fmt: skip
        row, _ = apply(
            row, HostInput(Tick(now + policy.check_interval)), key, policy, settings, topics
        )
        assert row is not None and row["record"]["state"] == "suspect", row
        table[key] = row
    return table


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def _traced(make: Callable[[], Any]) -> tuple[int, Any]:
    """Bytes still allocated by `make()`'s result (tracemalloc), and the result."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    value = make()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return after - before, value


def run(hosts: int) -> dict[str, Any]:
    """Measure; return the figures."""
    # RSS first, without tracemalloc's own bookkeeping in the process.
    gc.collect()
    rss0 = _rss()
    table = build_rows(hosts)
    gc.collect()
    rss_delta = _rss() - rss0
    sample = next(iter(table.values()))
    keys = list(table)
    del table
    gc.collect()

    inputs_bytes, _ = _traced(lambda: None)  # tracemalloc's floor, for the record
    rows_bytes, table = _traced(lambda: build_rows(hosts))
    dumped = {k: json.dumps(v) for k, v in table.items()}
    recovered_bytes, _recovered = _traced(lambda: {k: json.loads(v) for k, v in dumped.items()})
    dumped.clear()
    _recovered.clear()
    # A proposed compaction, measured, not implemented: rows without their None fields.
    sparse = {k: json.dumps(_without_none(v)) for k, v in table.items()}
    sparse_bytes, _sparse = _traced(lambda: {k: json.loads(v) for k, v in sparse.items()})
    sparse.clear()
    _sparse.clear()
    json_bytes = sum(len(k) + len(json.dumps(v, separators=(",", ":"))) for k, v in table.items())
    del table
    baseline_bytes, _base = _traced(lambda: {str(k): {} for k in keys})

    per_host = rows_bytes / hosts
    per_recovered = recovered_bytes / hosts
    return {
        "benchmark": "table_memory",
        "hosts": hosts,
        "fencer": {
            "bytes_per_host_tracemalloc": round(per_host),
            "bytes_per_host_after_recovery": round(per_recovered),
            "bytes_per_host_rss": round(rss_delta / hosts),
            "bytes_per_host_json_changelog": round(json_bytes / hosts),
            "total_mib": round(rows_bytes / 2**20, 2),
            "bytes_per_host_after_recovery_without_none_fields": round(sparse_bytes / hosts),
            "row_fields": sorted(sample["record"]) + [f"host.{k}" for k in sorted(sample["host"])],
        },
        "baseline_empty_rows": {
            "bytes_per_host_tracemalloc": round(baseline_bytes / hosts),
            "tracemalloc_floor_bytes": inputs_bytes,
        },
        "net_bytes_per_host": round((rows_bytes - baseline_bytes) / hosts),
        "targets_met": {
            "under_2kb_per_host": max(per_host, per_recovered) < TARGET_BYTES,
        },
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hosts", type=int, default=10_000)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    result = run(args.hosts)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
