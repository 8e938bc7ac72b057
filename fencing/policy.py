"""The numbers every decision is made with. Plain data: the settings build it, the core reads it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    """Decision and gate parameters (feature design defaults where it gives them)."""

    check_interval: float = 60.0  # seconds between storage checks while a host is suspect
    extra_checks: int = 2  # the design's x: stale checks needed after the first stale one
    unknown_alert_after: int = 3  # unknown results in a row before "cannot verify host"
    fence_cap: int = 3  # power-downs per cluster per window
    fence_window: float = 3600.0  # seconds, sliding
    global_cap: int = 10  # power-downs across all clusters per window
    storm_ratio: float = 0.5  # more than this share of a cluster suspect: withhold every fence
    startup_quiet: float = 120.0  # seconds after start-up in which no fence is approved
    probe_timeout: float = 180.0  # an unanswered probe this old is lost: it counts as unknown
    judge_readable_only: bool = False  # stale may rest on the readable files alone (opt-in)
    clock_skew_alert: float = 30.0  # seconds of measured skew that raise a clock_skew notice
    suspect_alert_after: float = 1800.0  # suspect this long without a decision: notify
    suspect_renotify: float = 3600.0  # ... and again at this cadence until the episode ends
    fencing_resend_after: float = 900.0  # approved, no outcome this long: re-send the proposal
