"""The numbers every decision is made with. Plain data: the settings build it, the core reads it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    """Decision and gate parameters (feature design defaults where it gives them)."""

    check_interval: float = 60.0  # seconds between storage checks while a host is suspect
    extra_checks: int = 2  # the design's x: stale checks needed after the first stale one
    heartbeat_max_age: float = 61.0  # a heartbeat younger than this means alive (kvmvmactivity)
    unknown_alert_after: int = 3  # unknown results in a row before "cannot verify host"
    fence_cap: int = 3  # power-downs per cluster per window
    fence_window: float = 3600.0  # seconds, sliding
    global_cap: int = 10  # power-downs across all clusters per window
    storm_ratio: float = 0.5  # more than this share of a cluster suspect: withhold every fence
    startup_quiet: float = 120.0  # seconds after start-up in which no fence is approved
    probe_timeout: float = 180.0  # an unanswered probe this old is lost: it counts as unknown
