"""The core's vocabulary: events (facts, past tense) that enter `decision.step`, actions
(imperatives) that leave it, and the small enums every stage shares.

Standard library only: the streams, probes, actuator and notifiers convert their wire records to
and from these types, never the other way round. Times are epoch seconds (float), carried on
the events; the core never reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Evidence(str, Enum):
    """What one storage-activity check found."""

    ALIVE = "alive"  # a write newer than the suspect time, or a fresh heartbeat
    STALE = "stale"  # every file older than the suspect time, heartbeat old
    UNKNOWN = "unknown"  # could not look: never evidence of death, never of life


class FenceAction(str, Enum):
    """The feature design's four fencing actions, plus the operator-only ones."""

    NOTHING = "nothing"
    STOP = "stop"
    REBOOT = "reboot"
    BLINK = "blink"
    START = "start"  # operator only, never chosen by a decision
    TEST = "test"  # operator only: read, change nothing

    @property
    def powers_down(self) -> bool:
        """Whether the action takes the host down (and so counts against the fence cap)."""
        return self in (FenceAction.STOP, FenceAction.REBOOT)


class HostStatus(str, Enum):
    """CloudStack's agent status of a host (`listHosts` `state`), as far as fencer cares."""

    UP = "Up"
    DISCONNECTED = "Disconnected"
    ALERT = "Alert"
    DOWN = "Down"
    CONNECTING = "Connecting"
    OTHER = "Other"


class WithheldReason(str, Enum):
    """Why the cluster gate refused a proposed fence."""

    CAP_REACHED = "cap_reached"
    GLOBAL_CAP_REACHED = "global_cap_reached"
    STORM_GUARD = "storm_guard"
    QUIET_PERIOD = "quiet_period"
    PAUSED = "paused"
    CLUSTER_SIZE_UNKNOWN = "cluster_size_unknown"  # the storm guard cannot judge: withhold


class NoticeKind(str, Enum):
    """Every kind of notification the notifiers can render."""

    FENCE_DECIDED = "fence_decided"
    FENCE_WITHHELD = "fence_withheld"
    FENCE_SUCCEEDED = "fence_succeeded"
    FENCE_FAILED = "fence_failed"
    CANNOT_VERIFY = "cannot_verify"
    PREFLIGHT_FAILED = "preflight_failed"
    HOST_RECOVERED = "host_recovered"
    BMC_IDENTITY_CHANGED = "bmc_identity_changed"  # the BMC reports another system GUID


# ---------------------------------------------------------------------------------------------
# Events into the per-host state machine (decision.step)


@dataclass(frozen=True)
class HostDisconnected:
    """CloudStack reported the host Disconnected, Alert or Down at `at`."""

    at: float
    status: HostStatus = HostStatus.DISCONNECTED


@dataclass(frozen=True)
class HostCameBack:
    """`listHosts` saw the host Up again at `at`."""

    at: float


@dataclass(frozen=True)
class MaintenanceStarted:
    """The host entered (or is preparing for) maintenance."""

    at: float


@dataclass(frozen=True)
class MaintenanceEnded:
    """Maintenance was cancelled or ended."""

    at: float


@dataclass(frozen=True)
class Tick:
    """The check interval's clock, delivered by the shell."""

    at: float


@dataclass(frozen=True)
class ProbeFinished:
    """A storage-activity check came back."""

    at: float
    episode: int
    evidence: Evidence
    newest_write: float | None = None
    heartbeat: float | None = None
    files_checked: int = 0
    files_missing: int = 0
    neighbour: str | None = None
    reason: str | None = None
    # Which RunProbe this answers: required, so a redelivered result can never count twice.
    check: int = field(kw_only=True)


@dataclass(frozen=True)
class FenceApproved:
    """The cluster gate approved this episode's fence."""

    at: float
    episode: int
    decision_id: str


@dataclass(frozen=True)
class FenceWithheld:
    """The cluster gate refused this episode's fence (final for the episode)."""

    at: float
    episode: int
    decision_id: str
    reason: WithheldReason


@dataclass(frozen=True)
class FenceFinished:
    """The actuator reported the outcome of this episode's fence."""

    at: float
    episode: int
    decision_id: str
    success: bool
    power_state: str | None = None
    error: str | None = None


HostEvent = (
    HostDisconnected
    | HostCameBack
    | MaintenanceStarted
    | MaintenanceEnded
    | Tick
    | ProbeFinished
    | FenceApproved
    | FenceWithheld
    | FenceFinished
)


# ---------------------------------------------------------------------------------------------
# Actions out of the core, carried out by the shell


@dataclass(frozen=True)
class RunProbe:
    """Ask a neighbour whether the host still writes to shared storage."""

    episode: int
    suspect_since: float
    check: int  # 1-based count of checks in this episode


@dataclass(frozen=True)
class ProposeFence:
    """Ask the cluster gate to fence the host for this episode."""

    episode: int
    suspect_since: float
    stale_checks: int
    newest_write: float | None
    files_checked: int
    decision_id: str = ""  # always set by the core: "<host>/<episode>/<suspect second>"
    neighbour: str | None = None  # who saw the last stale check


@dataclass(frozen=True)
class Notify:
    """Tell people something (the notifiers render it)."""

    kind: NoticeKind
    episode: int
    details: tuple[tuple[str, str], ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class MarkSuspect:
    """The host's episode opened: the cluster gate counts it for the storm guard."""

    episode: int
    at: float


@dataclass(frozen=True)
class ClearSuspect:
    """The host's episode ended (back Up or in maintenance): the gate stops counting it."""

    episode: int
    at: float


HostAction = RunProbe | ProposeFence | Notify | MarkSuspect | ClearSuspect
