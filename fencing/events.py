"""The core's vocabulary: events (facts, past tense) that enter `decision.step`, actions
(imperatives) that leave it, and the small enums every stage shares.

Standard library only: the streams, probes, actuator and notifiers convert their wire records to
and from these types, never the other way round. Times are epoch seconds (float), carried on
the events; the core never reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Evidence(str, Enum):  # noqa: UP042 - str() of a member is its qualified name, as everywhere
    """What one storage-activity check found, judged by the core against the previous reading."""

    BASELINE = "baseline"  # the episode's first complete reading: what later checks compare with
    ALIVE = "alive"  # a file's mtime or a heartbeat's content changed since the previous reading
    STALE = "stale"  # nothing changed over at least one check interval, on a complete reading
    UNKNOWN = "unknown"  # could not look (fully): never evidence of death, never of life


class FenceAction(str, Enum):  # noqa: UP042 - str() of a member is its qualified name, as everywhere
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


class HostStatus(str, Enum):  # noqa: UP042 - str() of a member is its qualified name, as everywhere
    """CloudStack's agent status of a host (`listHosts` `state`), as far as fencer cares."""

    UP = "Up"
    DISCONNECTED = "Disconnected"
    ALERT = "Alert"
    DOWN = "Down"
    CONNECTING = "Connecting"
    OTHER = "Other"


class WithheldReason(str, Enum):  # noqa: UP042 - str() of a member is its qualified name, as everywhere
    """Why the cluster gate refused a proposed fence."""

    CAP_REACHED = "cap_reached"
    GLOBAL_CAP_REACHED = "global_cap_reached"
    STORM_GUARD = "storm_guard"
    QUIET_PERIOD = "quiet_period"
    PAUSED = "paused"
    CLUSTER_SIZE_UNKNOWN = "cluster_size_unknown"  # the storm guard cannot judge: withhold
    # Not the gate's: the actuator refused the approved fence at the last moment (the decision
    # too old, fencer's record or CloudStack not backing it now, CloudStack not answering).
    REFUSED = "refused"


class NoticeKind(str, Enum):  # noqa: UP042 - str() of a member is its qualified name, as everywhere
    """Every kind of notification the notifiers can render."""

    FENCE_DECIDED = "fence_decided"
    FENCE_WITHHELD = "fence_withheld"
    FENCE_SUCCEEDED = "fence_succeeded"
    FENCE_FAILED = "fence_failed"
    CANNOT_VERIFY = "cannot_verify"
    PREFLIGHT_FAILED = "preflight_failed"
    HOST_RECOVERED = "host_recovered"
    CLOCK_SKEW = "clock_skew"  # measured and shown, never used in a verdict
    SUSPECT_TOO_LONG = "suspect_too_long"  # suspect without a decision: repeated until it ends
    FORGED_RECORD = "forged_record"  # a decision or settings record fencer did not sign
    FENCE_REFUSED = "fence_refused"  # the actuator's last-moment checks refused a decision
    VMS_NOT_RESTARTED = "vms_not_restarted"
    BMC_IDENTITY_CHANGED = "bmc_identity_changed"  # the BMC reports another system GUID
    LOGIN_BURST = "login_burst"  # failed API logins from one client beyond api.login_max_failures
    BLOCKLIST_LIFTED = "blocklist_lifted"  # an operator lifted a host's Ceph blocklist
    BLOCKLIST_NOT_LIFTED = "blocklist_not_lifted"  # an operator's lift failed: still cut off
    DECISION_LOG_UNREAD = "decision_log_unread"  # the gate's decision-log tail keeps failing


# ---------------------------------------------------------------------------------------------
# Events into the per-host state machine (decision.step)


@dataclass(frozen=True)
class HostDisconnected:
    """CloudStack reported the host Disconnected, Alert or Down at `at`."""

    at: float
    status: HostStatus = HostStatus.DISCONNECTED
    clock: str = ""  # which worker clock stamped `at` (see `Tick.clock`)


@dataclass(frozen=True)
class HostCameBack:
    """`listHosts` saw the host Up again at `at`."""

    at: float
    clock: str = ""  # which worker clock stamped `at` (see `Tick.clock`)


@dataclass(frozen=True)
class MaintenanceStarted:
    """The host entered (or is preparing for) maintenance."""

    at: float


@dataclass(frozen=True)
class MaintenanceEnded:
    """Maintenance was cancelled or ended."""

    at: float
    clock: str = ""  # which worker clock stamped `at` (see `Tick.clock`)


@dataclass(frozen=True)
class Tick:
    """The check interval's clock, delivered by the shell."""

    at: float
    # Which clock `at` is (the worker process that stamped it): an interval is only measured
    # between two stamps of the same clock (a check requested on one worker's clock is never
    # judged against a reference stamped on another's).
    clock: str = ""


@dataclass(frozen=True)
class ProbeFinished:
    """A storage-activity check came back with a *reading*, not a verdict: the core judges.

    `at` is the watch worker's own clock when the result arrived (never the probe's or the
    filer's). `mtimes` are the filer's clock, `heartbeats` the suspect host's clock: each is only
    ever compared with an earlier reading of the same file."""

    at: float
    episode: int
    # Which RunProbe this answers: required, so a redelivered result can never count twice.
    check: int = field(kw_only=True)
    mtimes: tuple[tuple[str, float], ...] = ()  # file -> mtime, every file that could be read
    heartbeats: tuple[tuple[str, str], ...] = ()  # heartbeat file -> raw content
    complete: bool = False  # every pool answered and the output was read to its end
    files_wanted: int = 0  # disks and heartbeat files CloudStack places on the host now
    unreadable: int = 0  # disks on storage this probe cannot read (RBD, local, ...)
    neighbour: str | None = None
    reason: str | None = None  # why the reading is incomplete
    neighbour_offset: float | None = None  # neighbour clock minus probe worker clock (shown only)
    filer_offset: float | None = None  # filer clock minus the host's (heartbeat mtime - content)
    live_signs: tuple[str, ...] = ()  # direct signs of life seen now (an RBD watch of the host)
    min_gap: float = 0.0  # a back end's own floor for a stale window (RBD: the watch timeout)
    clock: str = ""  # which worker clock stamped `at` (see `Tick.clock`)
    # Requested files the probe could not read now (a stat that failed: gone, ESTALE, EIO, a
    # directory it cannot search). One the reference holds makes the reading unknown.
    missing: tuple[str, ...] = ()
    # Heartbeat files whose stat worked but whose content could not be read now (EIO, no read
    # permission, empty). One whose content the reference holds makes the reading unknown.
    unread_contents: tuple[str, ...] = ()


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
    refused: bool = False  # nothing was done: the last-moment checks refused the decision


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
    newest_write: float | None  # the newest disk mtime of the last reading (filer clock, shown)
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
