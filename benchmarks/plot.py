"""`python -m benchmarks --plot`: the two pictures of benchmarks/README.md, from runs made now.

Rule: every point is measured in this run (nothing is read from an earlier one), each beside its
baseline from the same run, and the figures are printed as one JSON object as well:
- decision_lag.png: decision latency p50 / p99 (last stale result -> decision record, a real
  ingest worker) against the number of hosts suspect at once, beside the produce -> consume
  round trip of one record on the same broker;
- memory_per_host.png: bytes per host of the `hosts` table after changelog recovery against
  the number of hosts, packed rows (the current row version, with and without a 20-file
  reference) beside the same rows as version 1 stored them.
Needs matplotlib (`pip install fencer[bench]`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SUSPECTS = (5, 15, 30)
HOSTS = (1_000, 5_000, 10_000)


def measure() -> dict[str, Any]:
    """Both series, measured now."""
    from benchmarks import decision_latency, table_memory

    lag = []
    for n in SUSPECTS:
        r = asyncio.run(decision_latency.run(n, 30, 180.0))
        base = r["baseline_produce_consume"]["fetch_max_wait_500ms_aiokafka_default"]["after"]
        lag.append(
            {
                "suspects": n,
                "p50_ms": r["fencer"]["seen"]["p50_ms"],
                "p99_ms": r["fencer"]["seen"]["p99_ms"],
                "baseline_round_trip_p99_ms": base["p99_ms"],
            }
        )
    memory = []
    for n in HOSTS:
        r = table_memory.run(n)
        memory.append(
            {
                "hosts": n,
                "bytes_per_host": r["fencer"]["bytes_per_host_after_recovery"],
                "bytes_per_host_20_files": r["fencer"]["with_20_files"][
                    "bytes_per_host_after_recovery"
                ],
                "baseline_version_1": r["baseline_version_1_rows"]["bytes_per_host_after_recovery"],
            }
        )
    return {"benchmark": "plot", "decision_lag": lag, "memory_per_host": memory}


def draw(figures: dict[str, Any], where: Path = HERE) -> list[str]:
    """Write the PNGs; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lag = figures["decision_lag"]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["suspects"] for p in lag]
    ax.plot(xs, [p["p50_ms"] for p in lag], "o-", label="fencer p50")
    ax.plot(xs, [p["p99_ms"] for p in lag], "s-", label="fencer p99")
    ax.plot(
        xs, [p["baseline_round_trip_p99_ms"] for p in lag], "x--", label="one hop p99 (baseline)"
    )
    ax.axhline(100, color="grey", linestyle=":", label="target p99 100 ms")
    ax.set_xlabel("hosts suspect at once")
    ax.set_ylabel("last stale result -> decision (ms)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Decision lag (embedded broker, 2 vCPUs)")
    fig.tight_layout()
    lag_png = where / "decision_lag.png"
    fig.savefig(lag_png, dpi=100)
    plt.close(fig)

    mem = figures["memory_per_host"]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["hosts"] for p in mem]
    from streams.codec import ROW_VERSION

    ax.plot(xs, [p["bytes_per_host"] for p in mem], "o-", label=f"packed row (v{ROW_VERSION})")
    ax.plot(xs, [p["bytes_per_host_20_files"] for p in mem], "s-", label="packed, 20 files read")
    ax.plot(xs, [p["baseline_version_1"] for p in mem], "x--", label="version 1 row (baseline)")
    ax.axhline(2048, color="grey", linestyle=":", label="target 2 KB")
    ax.set_xlabel("suspect hosts in the table")
    ax.set_ylabel("bytes per host after changelog recovery")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title("hosts table memory per host")
    fig.tight_layout()
    mem_png = where / "memory_per_host.png"
    fig.savefig(mem_png, dpi=100)
    plt.close(fig)
    return [str(lag_png), str(mem_png)]
