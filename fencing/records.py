"""Wire records: the JSON value of every fencer topic, one pydantic model per topic.

Each record carries `schema_version`; `docs/schemas/` is generated from these models so other
systems can consume the topics. Keys: host uuid for host-signals, probe requests and results;
cluster uuid for fence proposals; host uuid for decisions, outcomes and notices.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fencing.events import FenceAction, HostStatus, NoticeKind, WithheldReason

SCHEMA_VERSION = 1


class WireRecord(BaseModel):
    """Base of every topic value."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    schema_version: int = SCHEMA_VERSION


class HostRef(BaseModel):
    """Who a record is about."""

    model_config = ConfigDict(frozen=True)
    host_uuid: str
    host_name: str | None = None
    cluster_uuid: str | None = None
    cluster_name: str | None = None
    zone_uuid: str | None = None
    zone_name: str | None = None
    ip_address: str | None = None


class HostSignal(WireRecord):
    """A fact about a host from the event bus or the listHosts poller (topic host-signals)."""

    kind: Literal["disconnected", "up", "maintenance_started", "maintenance_ended", "tick"]
    host: HostRef
    at: float = Field(
        description="epoch seconds on the fencer worker's clock when the fact arrived (event bus)"
        " or was polled (listHosts); never CloudStack's clock: the core compares these times"
    )
    reported_at: float | None = Field(
        None, description="CloudStack's own time of the event (its clock): shown, never compared"
    )
    status: HostStatus | None = None
    resource_state: str | None = None
    source: Literal["event-bus", "poller", "api", "timer"] = "event-bus"
    clock: str | None = Field(
        None, description="which worker clock stamped `at`: the core compares only its own stamps"
    )


class GateSignal(WireRecord):
    """What the cluster gate learns besides proposals (topic fence-proposals, key cluster uuid):
    the cluster's host count (poller) and which hosts are suspect (the host watcher); and
    `gate_clock` (cluster '*'), the gate owner's own timer asking its agent to keep the gate's
    rows on its clock (streams.gating.keep_clock: a table is written inside its stream)."""

    kind: Literal["cluster_size", "suspect", "cleared", "gate_clock"] = Field(
        description="also tells a GateSignal from a FenceProposal on the same topic"
    )
    cluster_uuid: str
    at: float
    host_uuid: str | None = None
    host_count: int | None = None


class ProbeRequest(WireRecord):
    """Check one suspect host's storage activity (topic probe-requests)."""

    host: HostRef
    episode: int
    check: int
    suspect_since: float
    requested_at: float
    requested_by: str | None = Field(None, description="the worker that owns the host (host:pid)")


class ProbeResult(WireRecord):
    """The answer (topic probe-results): a *reading* of the suspect host's files, never a verdict.

    The watch worker's core compares it with the previous reading of the same files (mtimes are
    the filer's clock, heartbeat contents the host's); this record carries no judgement."""

    host: HostRef
    episode: int
    check: int
    suspect_since: float
    finished_at: float = Field(description="the probe worker's clock (shown, never compared)")
    mtimes: dict[str, float] = Field(
        default_factory=dict, description="file -> mtime (filer clock), every file read"
    )
    heartbeats: dict[str, str] = Field(
        default_factory=dict, description="heartbeat file -> raw content (the host's clock)"
    )
    complete: bool = Field(False, description="every pool answered, output read to its end")
    files_wanted: int = 0
    unreadable: int = Field(0, description="disks on storage this probe cannot read")
    neighbour: str | None = None
    reason: str | None = Field(None, description="why the reading is incomplete")
    neighbour_offset: float | None = Field(
        None, description="the neighbour's clock minus the probe worker's (shown only)"
    )
    filer_offset: float | None = Field(
        None, description="the filer's clock minus the host's: heartbeat mtime minus content"
    )
    live_signs: list[str] = Field(
        default_factory=list, description="direct signs of life seen now (an RBD watch held)"
    )
    min_gap: float = Field(0.0, description="the back end's floor for a stale window, seconds")
    duration: float = 0.0
    probe: str = "nfs"
    missing: list[str] = Field(
        default_factory=list,
        description="requested files the probe could not read now (a stat that failed, an "
        "image that is gone): one read before in the episode makes the reading unknown",
    )
    unread_contents: list[str] = Field(
        default_factory=list,
        description="heartbeat files whose stat worked but whose content could not be read now "
        "(EIO, no read permission, empty): one whose content was read before in the episode "
        "makes the reading unknown",
    )


class EvidenceSummary(BaseModel):
    """The evidence behind a fence, carried on proposals, decisions, outcomes and notices."""

    model_config = ConfigDict(frozen=True)
    suspect_since: float
    stale_checks: int
    newest_write: float | None = None
    files_checked: int = 0
    last_neighbour: str | None = None


class FenceProposal(WireRecord):
    """The host's episode asks its cluster's gate for a fence (topic fence-proposals)."""

    kind: Literal["proposal"] = Field(
        default="proposal",
        description="tells a proposal from a GateSignal on the same topic (a record written "
        "before this field existed has none: it is a proposal when it carries a decision_id)",
    )
    decision_id: str
    host: HostRef
    episode: int
    action: FenceAction
    evidence: EvidenceSummary
    proposed_at: float


class FenceDecision(WireRecord):
    """Approved or withheld (topic fence-decisions)."""

    decision_id: str
    host: HostRef
    episode: int
    action: FenceAction
    approved: bool
    withheld_reason: WithheldReason | None = None
    evidence: EvidenceSummary
    decided_at: float = Field(description="the gate's own clock when it decided")
    budget_used: int = 0
    budget_cap: int = 0
    signature: dict[str, str] | None = Field(
        None, description="the gate's HMAC-SHA256 of the record without it (fencing.signing)"
    )
    decided_clock: str | None = Field(
        None,
        description="which clock decided_at is on: the gate process's (streams.worker_clock); "
        "none in records from before clocks had names",
    )


class FenceOutcome(WireRecord):
    """What the actuator did (topic fence-outcomes)."""

    decision_id: str
    host: HostRef
    episode: int
    action: FenceAction
    driver: str
    success: bool
    verified: bool = False
    power_before: str | None = None
    power_after: str | None = None
    started_at: float
    finished_at: float
    attempts: int = 1
    cloudstack_call: str | None = None
    cloudstack_job: str | None = None
    cloudstack_result: str | None = None
    error: str | None = None
    refused: bool = Field(
        False, description="the actuator's last-moment checks refused it: nothing was done"
    )
    vms: dict[str, str] | None = Field(
        None,
        description="the VMs the host ran when it was fenced (id -> name), followed until they "
        "run again: after an actuator restart too (fencing.actuator `follow`)",
    )


class Notice(WireRecord):
    """Something to tell people (topic notices), rendered by the notifiers."""

    notice_id: str
    kind: NoticeKind
    host: HostRef
    at: float
    action: FenceAction | None = None
    decision_id: str | None = None
    result: str | None = None
    reason: str | None = None
    evidence: EvidenceSummary | None = None
    topic: str | None = Field(None, description="forged_record: where the record was read")
    partition: int | None = None
    offset: int | None = None
    claimed_host: str | None = Field(None, description="forged_record: the host it named")
    blocklist_entry: str | None = Field(
        None,
        description="the Ceph blocklist entry fencer's storage fence added (its fence notice), "
        "or the one an operator lifted (blocklist_lifted)",
    )


class FenceClaim(WireRecord):
    """An actuator's claim on a decision, before any BMC call (topic fence-claims, key decision
    id, one partition): the first `claimed` record of a decision in the log wins; the winner
    renews it while it acts and writes `done` with the outcome (or `released` if it let go)."""

    decision_id: str
    host_uuid: str
    claim_id: str = Field(description="unique per claim attempt")
    claimed_by: str = Field(description="worker host:pid")
    state: Literal["claimed", "renewed", "done", "released"]
    takeover_of: str | None = Field(None, description="the dead claim this one follows")
    outcome: dict[str, Any] | None = Field(None, description="done: the FenceOutcome")
    signature: dict[str, str] | None = Field(
        None, description="the claimant's HMAC-SHA256 of the record without it (fencing.signing)"
    )


class HostStateRecord(WireRecord):
    """A host's record as the core left it (compacted topic host-states, key host uuid): what
    the UI, the metrics and the actuator's last-moment check display or read; they derive
    nothing from other topics."""

    host: HostRef
    record: dict[str, Any] = Field(description="fencing.decision.HostRecord.to_dict()")
    updated_at: float = Field(description="the watch worker's clock when the record changed")


class OperatorAction(WireRecord):
    """An operator's request (topic operator-actions, key host uuid): `retry` runs a failed
    fence's decision again now, `handled` stops the fence_failed reminders, `ipmi_test` asks an
    actuate worker to run the host's test action (reads the BMC, changes nothing) and answer
    on ipmi-tests under `request_id`; `bmc_pin_confirm` asks it to read the BMC's system GUID
    and pin it (topic bmc-pins), answering on ipmi-tests the same way; `lift_blocklist` lifts
    the host's Ceph blocklist once it is repaired (fencing.storage_fence, run by the actuate
    worker, which holds the fence key). Never a secret: the worker reads the BMC's settings."""

    kind: Literal["retry", "handled", "ipmi_test", "lift_blocklist", "bmc_pin_confirm"]
    host_uuid: str
    decision_id: str | None = Field(
        None,
        description="retry, handled: None = the host's latest failed fence; lift_blocklist: the "
        "fence that added `blocklist_entry`",
    )
    address: str | None = Field(
        None,
        description="lift_blocklist: the storage address (None: the host's storage_ip setting, "
        "else CloudStack's address of the host)",
    )
    by: str | None = Field(None, description="who asked (UI user, CLI user)")
    note: str | None = None
    at: float
    request_id: str | None = Field(None, description="ipmi_test: the id its answer carries")
    cluster_uuid: str | None = Field(None, description="ipmi_test: the host's cluster")
    expect: str | None = Field(
        None, description="bmc_pin_confirm: refuse unless the BMC reports this system GUID"
    )
    blocklist_entry: str | None = Field(
        None,
        description="lift_blocklist: the entry the operator saw (with `decision_id`, the fence "
        "that added it): lifted only while fencer's records show that fence's entry",
    )


class IpmiTestAnswer(WireRecord):
    """An actuate worker's answer to an `ipmi_test` or `bmc_pin_confirm` request (topic
    ipmi-tests, key host uuid): what the BMC said, its error with every secret masked. The pin
    itself is on bmc-pins; a `bmc_pin_confirm` answer names only the GUID it pinned, or why not."""

    request_id: str
    kind: Literal["ipmi_test", "bmc_pin_confirm"] = "ipmi_test"
    host_uuid: str
    success: bool
    driver: str
    power_state: str | None = None
    output: str | None = None
    error: str | None = None
    pinned_guid: str | None = Field(
        None, description="bmc_pin_confirm: the system GUID now pinned (success)"
    )
    refused: Literal["bmc", "expect", "pins"] | None = Field(
        None,
        description="bmc_pin_confirm not pinned: the BMC unreadable, not the `expect`ed GUID, "
        "or the bmc-pins topic unreadable (`error` says more)",
    )
    duration: float = Field(description="seconds the test took in the worker")
    at: float = Field(description="when the worker finished (its clock)")


class DeadLetter(WireRecord):
    """Input fencer could not use (topic dead-letter)."""

    topic: str
    partition: int | None = None
    offset: int | None = None
    reason: str
    key: str | None = None
    value_b64: str = Field(description="the original bytes, base64")
    at: float


class BmcPin(WireRecord):
    """The system GUID a host's BMC is known by (compacted topic bmc-pins, key host uuid).

    Pinned at the first successful read (pre-flight or first fence) or by an operator; a BMC
    that reports another GUID is not used for fencing until an operator pins it again."""

    host_uuid: str
    guid: str = Field(description="the pinned system GUID (IPMI Get System GUID, Redfish UUID)")
    address: str | None = Field(default=None, description="the BMC address it was read from")
    driver: str
    pinned_at: float
    pinned_by: str = Field(description="preflight, first-fence, or 'operator <name>'")
    seen_guid: str | None = Field(
        default=None, description="another GUID the BMC reported since; awaits an operator"
    )
    seen_address: str | None = None
    seen_at: float | None = None
    signature: dict[str, str] | None = Field(
        None, description="the writer's HMAC-SHA256 of the record without it (fencing.signing)"
    )
