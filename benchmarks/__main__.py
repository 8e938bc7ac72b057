"""Every benchmark from one entry point: `python -m benchmarks [NAME ...] --json`.

Rule: each benchmark prints one JSON object (one line with --json) holding its figures and the
baseline it ran in the same process or run; a benchmark that fails prints an object with its
`error` instead, the others still run, and the exit status is 1. Benchmarks run one after the
other in this process, in the order named (default: all but `scale`, in the order of
BENCHMARKS; `scale` takes minutes and runs only when named). `--plot` measures and writes the
PNGs of benchmarks/README.md (benchmarks.plot).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from typing import Any


def _probe_round() -> dict[str, Any]:
    from benchmarks import probe_round

    return asyncio.run(probe_round.run(500, 20, 10, True))


def _fence_latency() -> dict[str, Any]:
    from benchmarks import fence_latency

    return fence_latency.run(10)


def _ingest_rate() -> dict[str, Any]:
    from benchmarks import ingest_rate

    return asyncio.run(ingest_rate.run(50_000))


def _decision_latency() -> dict[str, Any]:
    from benchmarks import decision_latency

    return asyncio.run(decision_latency.measure(30, 100, 120.0))


def _crash_to_off() -> dict[str, Any]:
    from benchmarks import crash_to_off

    return asyncio.run(crash_to_off.run(10, 5.0, 2, 180.0))


def _scale() -> dict[str, Any]:
    from benchmarks import scale

    return asyncio.run(scale.run(10_000, 100, 20_000, 50, 500.0, 180.0))


def _table_memory() -> dict[str, Any]:
    from benchmarks import table_memory

    return table_memory.run(10_000)


def _pyghmi_stall() -> dict[str, Any]:
    from benchmarks import pyghmi_stall

    return pyghmi_stall.run(200)


BENCHMARKS: dict[str, Callable[[], dict[str, Any]]] = {
    "probe_round": _probe_round,
    "fence_latency": _fence_latency,
    "ingest_rate": _ingest_rate,
    "decision_latency": _decision_latency,
    "crash_to_off": _crash_to_off,
    "table_memory": _table_memory,
    "pyghmi_stall": _pyghmi_stall,
    "scale": _scale,
}
# Run only when named (`python -m benchmarks scale --json`): it takes minutes on its own.
NAMED_ONLY = {"scale"}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", metavar="NAME", help=f"any of: {', '.join(BENCHMARKS)}")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--plot", action="store_true", help="measure and write the PNGs (plot.py)")
    args = p.parse_args(argv)
    if args.plot:
        from benchmarks import plot

        figures = plot.measure()
        figures["pngs"] = plot.draw(figures)
        print(json.dumps(figures) if args.json else json.dumps(figures, indent=2), flush=True)
        return 0
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark {', '.join(unknown)} (choose from {', '.join(BENCHMARKS)})")
    failed = False
    for name in args.names or [n for n in BENCHMARKS if n not in NAMED_ONLY]:
        started = time.perf_counter()
        try:
            figures = BENCHMARKS[name]()
            if figures.get("benchmark", name) != name:  # fence_latency's is a description
                figures["description"] = figures.pop("benchmark")
            result = {"benchmark": name, **figures}
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            failed = True
            result = {"benchmark": name, "error": f"{type(exc).__name__}: {exc}"}
        result["benchmark_seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(result) if args.json else json.dumps(result, indent=2), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
