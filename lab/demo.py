"""`fencer demo`: the lab cloud, real `fencer worker` processes, and scenarios that show every
decision with the evidence behind it.

Rule: a scenario only injects faults into the lab and watches; every verdict comes from the
real workers through the real topics, and a scenario passes only on what the peers saw (the BMC's
power-offs, CloudStack's API calls and VM states, the mails and traps received). Each scenario
gets a fresh `LabCloud` (own topics, own consumer group) on one shared embedded broker. The
scenarios are also the end-to-end tests (tests/e2e).

Scenarios marked `ceph` run their lab cloud's RBD pool on a real single-node Ceph
(lab.ceph.CephCluster: tests pass the session's, `fencer demo` starts one): the VMs' disks are
images, their qemu processes librbd clients holding watches from their host's address, and the
workers read watchers with the probe's read-only key and blocklist with the fence key. The
cluster is shared between scenarios: each one leaves it with its monitor running and an empty
blocklist.

The checks the timeline shows are the core's judgements, read from the compacted
`fencer.host-states` topic (one per (episode, check) the record reports as judged); a probe
result is only a reading (files and their mtimes), shown as the detail of the check it answered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.ceph import LAB_WATCH_TIMEOUT, CephCluster
from lab.cloud import LabCloud
from lab.pipeline import Tap, WorkerProcess, write_settings
from streams.broker import BrokerError, EmbeddedBroker

Printer = Callable[[dict[str, Any]], None]

# What the pipeline may add to check_interval x (1 + extra_checks) in the lab, on a shared
# two-core machine. Per check: the tick's granularity, the request's and the result's topic hops,
# CloudStack's lookups and the SSH reading (about 0.5 s measured; the next check waits a full
# interval after the previous result *arrived*, so this adds up with every check). Once: the
# event bus hop before the baseline, the gate, IPMI set-then-verify and declareHostAsDegraded.
PIPELINE_PER_CHECK = 1.5
PIPELINE_ONCE = 6.0


# ---------------------------------------------------------------------------------------------
# One scenario's run: the cloud, the workers, the tap and the timeline


class Run:
    """A scenario being played: its lab cloud, workers, topic tap and timeline."""

    def __init__(
        self, name: str, lab: LabCloud, workdir: Path, fast: bool, printer: Printer | None
    ) -> None:
        self.name = name
        self.lab = lab
        self.workdir = workdir
        self.fast = fast
        self.printer = printer
        self.t0 = time.time()
        self.timeline: list[dict[str, Any]] = []
        self.workers: list[WorkerProcess] = []
        self.settings: Any = None
        self.file: Path | None = None
        self.tap: Tap | None = None
        self.marks: dict[str, float] = {}
        self.facts: dict[str, Any] = {}  # what a scenario read from a peer (e.g. Ceph), by name
        self.moved_disks: dict[str, float] = {}  # disk file -> its mtime when its VM moved
        self._seen_mails = 0
        self._seen_traps = 0
        self._seen_offs = 0
        self._watch: asyncio.Task[None] | None = None
        self._suspects: set[str] = set()
        # (host uuid, episode, check) -> the reading a probe reported for that check
        self.readings: dict[tuple[str, Any, Any], dict[str, Any]] = {}
        # the core's judged checks, in arrival order (see `_judged`)
        self.judged: list[dict[str, Any]] = []
        self._judged_seen: set[tuple[str, Any, Any]] = set()
        self.states: dict[str, list[tuple[float, str]]] = {}  # host name -> (time, state)

    # -- setup ----------------------------------------------------------------------------------

    async def start(self, **policy: Any) -> Run:
        """Write the settings, start the tap and one all-roles worker, wait until it polls."""
        self.settings = self.lab.settings(**policy)
        self.file = write_settings(self.settings, self.workdir / f"{self.name}.yaml")
        t = self.settings.kafka.topics
        self.tap = Tap(self.settings)
        self.tap.on_record = self._on_record
        await self.tap.start(
            [
                t.host_signals,
                t.probe_results,
                t.host_states,
                t.fence_proposals,
                t.fence_decisions,
                t.fence_outcomes,
                t.notices,
            ]
        )
        self._watch = asyncio.create_task(self._watch_receivers())
        p = self.settings.policy
        on = "NFS" if self.lab.rbd is None else "NFS and on Ceph RBD (a real cluster)"
        self.event(
            "lab",
            None,
            f"cloud up: {len(self.lab.names())} KVM hosts in one cluster, "
            f"{len(self.lab.cloud.vms)} VMs on {on}; check every {p.check_interval:g} s, "
            f"fence after {1 + p.extra_checks} stale checks, cap {p.fence_cap} per cluster",
        )
        await self.start_worker()
        return self

    async def start_worker(self) -> WorkerProcess:
        """Start one more `fencer worker` (all roles) and wait until it polls CloudStack."""
        assert self.file is not None and self.tap is not None
        seen = len(self.sizes())
        w = WorkerProcess(
            self.file, "all", self.workdir / f"{self.name}-worker{len(self.workers)}.log"
        ).start()
        self.workers.append(w)
        await self.tap.wait_for(lambda: len(self.sizes()) > seen, 90, "the worker to start")
        self.event("worker", None, f"fencer worker pid {w.pid} running (all roles)", pid=w.pid)
        return w

    def worker_log_tail(self, lines: int = 3) -> str:
        """The last lines the newest worker logged (for a failure message), or ''."""
        if not self.workers or self.workers[-1].log_file is None:
            return ""
        try:
            text = self.workers[-1].log_file.read_text(errors="replace")
        except OSError:
            return ""
        tail = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
        return ("; worker log: " + " | ".join(tail)) if tail else ""

    def kill_worker(self) -> None:
        """SIGKILL the newest worker (a crash, no clean shutdown)."""
        w = self.workers[-1]
        w.kill()
        self.event("worker", None, f"fencer worker pid {w.pid} killed (SIGKILL)")

    async def stop(self) -> None:
        """Stop the workers, the tap and the receiver watcher."""
        await asyncio.gather(*(asyncio.to_thread(w.stop, 10) for w in self.workers))
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        self._poll_receivers()
        if self.tap is not None:
            await self.tap.stop()

    # -- timeline -------------------------------------------------------------------------------

    def event(self, kind: str, host: str | None, text: str, **data: Any) -> None:
        """Add one line to the timeline (and print it)."""
        e = {
            "scenario": self.name,
            "t": round(time.time() - self.t0, 2),
            "kind": kind,
            "host": host,
            "text": text,
        }
        if data:
            e["data"] = data
        self.timeline.append(e)
        if self.printer is not None:
            self.printer(e)

    def fault(self, text: str, host: str | None = None) -> None:
        """Record a fault the scenario injects."""
        self.marks[f"fault:{host}"] = time.time()
        self.event("fault", host, text)

    def _name(self, value: dict[str, Any]) -> str:
        h = value.get("host") or {}
        return str(h.get("host_name") or h.get("host_uuid") or "?")

    async def _on_record(self, topic: str, key: str | None, v: dict[str, Any]) -> None:
        t = self.settings.kafka.topics
        if topic == t.host_signals:
            kind, name = v.get("kind"), self._name(v)
            if kind == "disconnected":
                if name not in self._suspects:
                    self._suspects.add(name)
                    self.event(
                        "signal",
                        name,
                        f"CloudStack reports {name} {v.get('status')} (from {v.get('source')})",
                    )
            elif kind == "up" and name in self._suspects:
                self._suspects.discard(name)
                self.event("signal", name, f"CloudStack reports {name} Up again")
        elif topic == t.probe_results:
            seen = (str((v.get("host") or {}).get("host_uuid")), v.get("episode"), v.get("check"))
            if seen in self.readings:
                name = self._name(v)
                self.event("probe", name, f"reading {seen[2]} of {name} redelivered: ignored")
            self.readings[seen] = v
        elif topic == t.host_states:
            self._host_state(v)
        elif topic == t.fence_decisions:
            name = self._name(v)
            ev = v.get("evidence") or {}
            if v.get("approved"):
                self.event(
                    "decision",
                    name,
                    f"FENCE {name}: {v.get('action')} approved after {ev.get('stale_checks')} "
                    f"stale checks (budget {v.get('budget_used')}/{v.get('budget_cap')})",
                    approved=True,
                    decision_id=v.get("decision_id"),
                )
            else:
                self.event(
                    "decision",
                    name,
                    f"fence of {name} WITHHELD: {v.get('withheld_reason')} "
                    f"(budget {v.get('budget_used')}/{v.get('budget_cap')})",
                    approved=False,
                    reason=v.get("withheld_reason"),
                )
        elif topic == t.fence_outcomes:
            name = self._name(v)
            if v.get("success"):
                text = (
                    f"{name} powered {v.get('power_after')} through its BMC ({v.get('driver')}, "
                    f"verified {v.get('verified')}); CloudStack {v.get('cloudstack_call')}: "
                    f"{v.get('cloudstack_result')}"
                )
            else:
                text = f"fencing {name} FAILED: {v.get('error')}"
            self.event(
                "outcome",
                name,
                text,
                success=v.get("success"),
                verified=v.get("verified"),
                error=v.get("error"),
            )
        elif topic == t.notices:
            name = self._name(v)
            self.event(
                "notice",
                name,
                f"notice {v.get('kind')} for {name}"
                + (f": {v['reason']}" if v.get("reason") else ""),
                notice=v.get("kind"),
            )

    def _host_state(self, v: dict[str, Any]) -> None:
        """A new value of a host's record: note its state, and the check it just judged."""
        name, r = self._name(v), v.get("record") or {}
        states = self.states.setdefault(name, [])
        state = str(r.get("state"))
        if not states or states[-1][1] != state:
            states.append((time.time(), state))
        ev, check = r.get("last_evidence"), r.get("last_check") or 0
        key = (str((v.get("host") or {}).get("host_uuid")), r.get("episode"), check)
        if ev is None or check < 1 or key in self._judged_seen:
            return
        self._judged_seen.add(key)
        check_row = {
            "host": key[0],
            "name": name,
            "episode": key[1],
            "check": check,
            "evidence": ev,
            "reason": r.get("reason"),
            "stale_count": r.get("stale_count"),
            "neighbour": r.get("neighbour"),
            "state": state,
            "requested_at": r.get("last_request_at"),
            "files_checked": r.get("files_checked"),
            "filer_offset": r.get("filer_offset"),
            "at": time.time(),
            "key": key,
            "reading": self.readings.get(key) or {},
        }
        self.judged.append(check_row)
        # The detail comes from the record (the reading's own record may still be on its way).
        p = self.settings.policy
        detail = f"{r.get('files_checked') or 0} files read"
        beats = [b for _path, b in r.get("ref_heartbeats") or []]
        if beats and ev != "unknown":
            detail += ", heartbeat " + ", ".join(str(b).strip() for b in beats)
        if r.get("unreadable"):
            detail += f", {r['unreadable']} disks on storage it cannot read"
        if r.get("filer_offset") is not None:
            detail += f", filer clock {r['filer_offset']:+g} s"
        if ev == "stale":
            detail += f"; stale {r.get('stale_count')}/{1 + p.extra_checks}"
        if r.get("reason"):
            # "<mount root>/<pool>/<file> changed" reads better without the lab's temp path.
            detail += "; " + str(r["reason"]).replace(f"{self.lab.kvm.mount_root}/", "")
        self.event(
            "probe",
            name,
            f"check {check} of {name} via {r.get('neighbour') or 'no neighbour'}: "
            f"{str(ev).upper()} ({detail})",
            evidence=ev,
            check=check,
            episode=key[1],
            neighbour=r.get("neighbour"),
            reason=r.get("reason"),
            stale_count=r.get("stale_count"),
        )

    def _poll_receivers(self) -> None:
        offs = self.lab.power_offs
        for _at, name in offs[self._seen_offs :]:
            self.event("bmc", name, f"{name}'s BMC powered the host off: its writes stop")
        self._seen_offs = len(offs)
        mails, traps = self.lab.mail.mails, self.lab.traps.traps
        for m in mails[self._seen_mails :]:
            self.event("mail", None, f"mail to {', '.join(m.to)}: {m.subject}")
        self._seen_mails = len(mails)
        for tr in traps[self._seen_traps :]:
            host = tr.varbinds.get("fencerHostName")
            self.event(
                "trap",
                host,
                f"SNMP trap {tr.kind} for {host} ({tr.varbinds.get('fencerResult') or ''})",
            )
        self._seen_traps = len(traps)

    async def _watch_receivers(self) -> None:
        while True:
            self._poll_receivers()
            await asyncio.sleep(0.2)

    # -- what the topics and peers say ----------------------------------------------------------

    def _of(self, topic: str) -> list[dict[str, Any]]:
        assert self.tap is not None
        return [v for _k, v in self.tap.of(topic)]

    def sizes(self) -> list[dict[str, Any]]:
        """cluster_size records (the poller is alive)."""
        return [
            v
            for v in self._of(self.settings.kafka.topics.fence_proposals)
            if v.get("kind") == "cluster_size"
        ]

    def uuid(self, name: str) -> str:
        return self.lab.host(name).uuid

    def results(self, name: str | None = None, evidence: str | None = None) -> list[dict[str, Any]]:
        """The core's judged checks, from fencer.host-states (for one host, of one evidence):
        dicts with host, name, episode, check, evidence, reason, stale_count, neighbour,
        state, requested_at, at (when the demo saw it) and the probe's `reading`."""
        for c in self.judged:
            if not c["reading"]:
                c["reading"] = self.readings.get(c["key"]) or {}
        return [
            c
            for c in self.judged
            if (name is None or c["host"] == self.uuid(name))
            and (evidence is None or c["evidence"] == evidence)
        ]

    def decisions(self, name: str | None = None) -> list[dict[str, Any]]:
        """Fence decisions (for one host), one per decision id and verdict: a proposal the core
        re-sent (unanswered for an interval, or proposed again after a temporary withhold) gets
        the gate's verdict again, under the same decision id."""
        seen: set[tuple[Any, ...]] = set()
        out = []
        for v in self._of(self.settings.kafka.topics.fence_decisions):
            if name is not None and v["host"]["host_uuid"] != self.uuid(name):
                continue
            verdict = (v.get("decision_id"), v.get("approved"), v.get("withheld_reason"))
            if verdict not in seen:
                seen.add(verdict)
                out.append(v)
        return out

    def outcomes(self, name: str | None = None) -> list[dict[str, Any]]:
        """Fence outcomes (for one host)."""
        return [
            v
            for v in self._of(self.settings.kafka.topics.fence_outcomes)
            if name is None or v["host"]["host_uuid"] == self.uuid(name)
        ]

    def notices(self, kind: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
        """Notices (of one kind, for one host)."""
        return [
            v
            for v in self._of(self.settings.kafka.topics.notices)
            if (kind is None or v.get("kind") == kind)
            and (name is None or v["host"]["host_uuid"] == self.uuid(name))
        ]

    def fenced(self) -> list[dict[str, Any]]:
        """Fences carried out and verified, one per decision: an outcome re-published for a
        re-sent decision (at-least-once, the claim log answers with the stored outcome) is the
        same fence."""
        done = {
            o.get("decision_id"): o
            for o in self.outcomes()
            if o.get("success") and o.get("verified")
        }
        return list(done.values())

    def withheld(self) -> list[dict[str, Any]]:
        """Decisions the gate withheld."""
        return [d for d in self.decisions() if not d.get("approved")]

    async def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """Wait for a condition on the topics or the peers."""
        assert self.tap is not None
        deadline = time.monotonic() + timeout
        while True:
            self._poll_receivers()
            got = predicate()
            if got:
                return got
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
            with contextlib.suppress(TimeoutError):
                await self.tap.wait_for(predicate, min(0.5, deadline - time.monotonic()), what)

    async def checks(self, name: str, n: int, evidence: str | None = None) -> None:
        """Wait until `n` checks of host `name` finished (with that evidence)."""
        ci = self.settings.policy.check_interval
        await self.wait(
            lambda: len(self.results(name, evidence)) >= n,
            ci * (n + 3) + 20,
            f"{n} {evidence or ''} checks of {name}",
        )

    @property
    def fence_ideal(self) -> float:
        """check_interval x (1 + extra_checks): crash to proposal with no pipeline at all (the
        baseline is read at the disconnect, then 1 + extra_checks stale checks)."""
        p = self.settings.policy
        return float(p.check_interval * (1 + p.extra_checks))

    @property
    def cloudstack_notices(self) -> float:
        """How long CloudStack may take to notice a crash: nothing closes the agent's
        connection, so the host stays Up until its monitor finds the agent behind on ping
        (ping.interval x ping.timeout, and up to one monitor pass more). 0 without the
        simulator's host state machine (it showed the crash at once)."""
        c = self.lab.cloud
        return c.ping_interval * (c.ping_timeout + 1) if c.host_fsm else 0.0

    @property
    def fence_deadline(self) -> float:
        """The ideal plus the pipeline's slack (baseline and 1 + extra_checks checks) and the
        time CloudStack takes to notice: the verified power-off must be done by then after a
        crash that causes the disconnect."""
        return self._fence_deadline_after_disconnect + self.cloudstack_notices

    @property
    def _fence_deadline_after_disconnect(self) -> float:
        checks = 2 + self.settings.policy.extra_checks
        return self.fence_ideal + checks * PIPELINE_PER_CHECK + PIPELINE_ONCE

    @property
    def fence_deadline_mid_episode(self) -> float:
        """The same for a crash of a host already suspect (CloudStack shows it disconnected
        already): the first check after the crash may still see the writes it made just before
        dying, which costs at most one check more."""
        return (
            self._fence_deadline_after_disconnect
            + self.settings.policy.check_interval
            + PIPELINE_PER_CHECK
        )


# ---------------------------------------------------------------------------------------------
# The scenarios


@dataclass(frozen=True)
class Scenario:
    """A stable name, what it must show, how to play it and how to judge it."""

    name: str
    expected: str
    play: Callable[[Run], Awaitable[None]]
    judge: Callable[[Run], list[str]]
    lab: dict[str, Any] = field(default_factory=dict)
    policy: dict[str, Any] = field(default_factory=dict)
    filer_offset_checks: float = 0.0  # the filer's clock offset, in check intervals
    ceph: bool = False  # the lab's RBD pool is a real Ceph cluster (play's `ceph`)


def _expect(failures: list[str], ok: bool, text: str) -> None:
    if not ok:
        failures.append(text)


# -- agent-dies


async def _agent_dies(run: Run) -> None:
    run.fault("kvm02's CloudStack agent dies; the host and its VMs keep running", "kvm02")
    run.lab.agent_dies("kvm02")
    need = 2 + run.settings.policy.extra_checks
    await run.checks("kvm02", need)


def _judge_agent_dies(run: Run) -> list[str]:
    f: list[str] = []
    need = 2 + run.settings.policy.extra_checks
    _expect(f, len(run.results("kvm02")) >= need, f"fewer than {need} checks of kvm02")
    _expect(f, run.results("kvm02", "stale") == [], "a check of a live host said stale")
    _expect(f, run.decisions() == [], "a fence was decided for a live host")
    _expect(f, run.lab.bmc_power_offs("kvm02") == 0, "kvm02's BMC got a power-off")
    _expect(f, run.lab.degraded_calls("kvm02") == [], "CloudStack was told kvm02 is degraded")
    return f


# -- host-crash


async def _host_crash(run: Run) -> None:
    run.fault("kvm03 crashes: its disks and heartbeat stop, SSH is gone, BMC still up", "kvm03")
    await run.lab.crash("kvm03")
    await run.wait(lambda: run.outcomes("kvm03"), run.fence_deadline + 10, "kvm03 fenced")
    await run.wait(
        lambda: run.lab.mail.mails and run.lab.traps.traps and run.lab.restarted_elsewhere("kvm03"),
        15,
        "a mail, a trap and the VMs restarted",
    )
    run.event(
        "cloud",
        "kvm03",
        f"CloudStack restarted {len(run.lab.restarted_elsewhere('kvm03'))} VMs of kvm03 on "
        + ", ".join(
            sorted(
                {
                    run.lab.cloud.hosts[run.lab.cloud.vms[u].host_uuid or ""].name
                    for u in run.lab.restarted_elsewhere("kvm03")
                }
            )
        ),
    )
    await asyncio.sleep(run.settings.policy.check_interval * 2)  # nothing more may happen


def _judge_host_crash(run: Run) -> list[str]:
    f: list[str] = []
    outs = run.outcomes("kvm03")
    _expect(f, len(run.decisions("kvm03")) == 1, "not exactly one decision for kvm03")
    _expect(f, len(outs) == 1 and bool(outs[0].get("success")), "kvm03 was not fenced once")
    _expect(f, bool(outs) and bool(outs[0].get("verified")), "the power-off was not verified")
    _expect(f, run.lab.bmc_power_offs("kvm03") == 1, "kvm03's BMC did not get exactly 1 power-off")
    _expect(f, run.lab.bmcs["kvm03"].power == "off", "kvm03's BMC does not report power off")
    _expect(f, len(run.lab.degraded_calls("kvm03")) == 1, "no single declareHostAsDegraded")
    vms = run.lab.vms_of("kvm03")
    _expect(f, sorted(run.lab.restarted_elsewhere("kvm03")) == sorted(vms), "VMs not restarted")
    _expect(f, len(run.lab.mail.mails) >= 1, "no mail arrived")
    _expect(f, len(run.lab.traps.traps) >= 1, "no trap arrived")
    crashed = run.marks.get("fault:kvm03")
    if outs and crashed:
        took = outs[0]["finished_at"] - crashed
        _expect(
            f, took <= run.fence_deadline, f"fenced after {took:.1f} s (> {run.fence_deadline:g})"
        )
    _expect(f, len(run.fenced()) == 1, "some other host was fenced")
    return f


# -- storage-outage


async def _storage_outage(run: Run) -> None:
    run.fault("the cluster's NFS storage becomes unreadable for every host")
    run.lab.storage_outage()
    run.fault("kvm04 and kvm05 crash during the outage", "kvm04")
    await run.lab.crash("kvm04")
    await run.lab.crash("kvm05")
    after = run.settings.policy.unknown_alert_after
    await run.wait(
        lambda: run.notices("cannot_verify") or run.notices("fence_withheld") or run.withheld(),
        run.settings.policy.check_interval * (after + 3) + 20,
        "a cannot-verify or storm-guard notice",
    )
    await run.checks("kvm04", 2 + run.settings.policy.extra_checks)


def _judge_storage_outage(run: Run) -> list[str]:
    f: list[str] = []
    _expect(f, run.fenced() == [], "a host was fenced during a storage outage")
    _expect(f, run.results(evidence="stale") == [], "an unreadable pool was taken as stale")
    warned = run.notices("cannot_verify") or any(
        d.get("withheld_reason") == "storm_guard" for d in run.withheld()
    )
    _expect(f, bool(warned), "no cannot-verify or storm-guard notice")
    _expect(f, run.lab.bmc_power_offs("kvm04") + run.lab.bmc_power_offs("kvm05") == 0, "power-off")
    _expect(f, len(run.lab.mail.mails) >= 1, "the operators got no mail")
    return f


# -- cap-reached

CAP_HOSTS = ("kvm02", "kvm04", "kvm06", "kvm08")


async def _cap_reached(run: Run) -> None:
    run.fault(f"{', '.join(CAP_HOSTS)} crash together (fence cap 3 per cluster)")
    for n in CAP_HOSTS:
        await run.lab.crash(n)
    await run.wait(
        lambda: len(run.decisions()) >= 4 and len(run.outcomes()) >= 3,
        run.fence_deadline + 30,
        "four decisions and three outcomes",
    )
    await run.wait(lambda: run.notices("fence_withheld") or _withheld_mail(run), 15, "withheld")
    await asyncio.sleep(run.settings.policy.check_interval * 2)


def _withheld_mail(run: Run) -> bool:
    return any("withheld" in m.subject.lower() for m in run.lab.mail.mails)


def _judge_cap_reached(run: Run) -> list[str]:
    f: list[str] = []
    _expect(f, len(run.fenced()) == 3, f"{len(run.fenced())} hosts fenced, not 3")
    w = run.withheld()
    _expect(f, len(w) == 1, f"{len(w)} fences withheld, not 1")
    _expect(f, all(d.get("withheld_reason") == "cap_reached" for d in w), "not withheld by cap")
    offs = sum(run.lab.bmc_power_offs(n) for n in CAP_HOSTS)
    _expect(f, offs == 3, f"{offs} power-offs on the BMCs, not 3")
    kinds = {t.kind for t in run.lab.traps.traps}
    _expect(f, "fence_withheld" in kinds, "no withheld trap")
    _expect(f, _withheld_mail(run), "no withheld mail")
    return f


# -- neighbour-unreachable


async def _neighbour_unreachable(run: Run) -> None:
    run.fault("every other host refuses SSH, then kvm04 crashes", "kvm04")
    await run.lab.neighbours_unreachable("kvm04")
    await run.lab.crash("kvm04")
    await run.wait(
        lambda: run.notices("cannot_verify", "kvm04"),
        run.settings.policy.check_interval * 8 + 20,
        "a cannot-verify notice",
    )
    await run.wait(lambda: run.lab.mail.mails and run.lab.traps.traps, 15, "mail and trap")


def _judge_neighbour_unreachable(run: Run) -> list[str]:
    f: list[str] = []
    _expect(f, run.decisions() == [], "a fence was decided without evidence")
    _expect(f, run.results(evidence="stale") == [], "a check without a neighbour said stale")
    _expect(f, bool(run.notices("cannot_verify", "kvm04")), "no cannot-verify notice")
    _expect(f, run.lab.bmc_power_offs("kvm04") == 0, "kvm04's BMC got a power-off")
    kinds = {t.kind for t in run.lab.traps.traps}
    _expect(f, kinds == {"cannot_verify"}, f"traps {sorted(kinds)}, not one cannot_verify")
    _expect(f, len(run.lab.mail.mails) >= 1, "the operators got no mail")
    return f


# -- host-recovers


async def _host_recovers(run: Run) -> None:
    run.fault("kvm06 crashes", "kvm06")
    await run.lab.crash("kvm06")
    await run.checks("kvm06", 1, "stale")
    run.fault("kvm06 comes back before the next check", "kvm06")
    await run.lab.recovers("kvm06")
    await run.wait(
        lambda: run.notices("host_recovered", "kvm06"),
        run.settings.policy.check_interval * 4 + 15,
        "kvm06 to be seen back",
    )
    await asyncio.sleep(run.settings.policy.check_interval * (run.settings.policy.extra_checks + 2))


def _judge_host_recovers(run: Run) -> list[str]:
    f: list[str] = []
    _expect(f, run.decisions() == [], "a host that came back was fenced")
    _expect(f, bool(run.notices("host_recovered", "kvm06")), "no host-recovered notice")
    _expect(f, run.lab.bmc_power_offs("kvm06") == 0, "kvm06's BMC got a power-off")
    return f


# -- worker-restart


async def _worker_restart(run: Run) -> None:
    run.fault("kvm05 crashes", "kvm05")
    await run.lab.crash("kvm05")
    await run.checks("kvm05", 2, "stale")
    run.kill_worker()
    await run.start_worker()
    await run.wait(lambda: run.outcomes("kvm05"), run.fence_deadline + 40, "kvm05 fenced")
    await asyncio.sleep(run.settings.policy.check_interval * 3)


def _judge_worker_restart(run: Run) -> list[str]:
    f: list[str] = []
    n = len(run.fenced())
    _expect(f, n == 1, f"{n} fences after the restart, not exactly 1")
    offs = run.lab.bmc_power_offs("kvm05")
    _expect(f, offs == 1, f"kvm05's BMC got {offs} power-offs, not 1")
    _expect(f, len(run.lab.degraded_calls("kvm05")) == 1, "not one declareHostAsDegraded")
    eps = {r["episode"] for r in run.results("kvm05")}
    _expect(f, len(eps) == 1, f"the restart opened a new episode: {sorted(eps)}")
    return f


# -- bmc-unreachable


async def _bmc_unreachable(run: Run) -> None:
    run.fault("kvm07's BMC stops answering, then kvm07 crashes", "kvm07")
    run.lab.bmc_unreachable("kvm07")
    await run.lab.crash("kvm07")
    await run.wait(lambda: run.outcomes("kvm07"), run.fence_deadline + 40, "the fence outcome")
    await run.wait(lambda: run.lab.mail.mails and run.lab.traps.traps, 15, "mail and trap")
    await asyncio.sleep(1.0)


def _judge_bmc_unreachable(run: Run) -> list[str]:
    f: list[str] = []
    outs = run.outcomes("kvm07")
    _expect(f, bool(outs) and not any(o.get("success") for o in outs), "the fence did not fail")
    _expect(f, bool(outs) and all(o.get("error") for o in outs), "the failure gives no reason")
    _expect(f, run.lab.degraded_calls("kvm07") == [], "CloudStack was told to restart the VMs")
    _expect(f, run.lab.restarted_elsewhere("kvm07") == [], "VMs restarted without a fence")
    kinds = {t.kind for t in run.lab.traps.traps}
    _expect(f, "fence_failed" in kinds, "no fence-failed trap")
    _expect(f, any("fail" in m.subject.lower() for m in run.lab.mail.mails), "no failure mail")
    return f


# -- no-vms


async def _no_vms(run: Run) -> None:
    run.fault("kvm08 (no VMs) crashes: only its heartbeat file stops", "kvm08")
    await run.lab.crash("kvm08")
    await run.wait(lambda: run.outcomes("kvm08"), run.fence_deadline + 10, "kvm08 fenced")


def _judge_no_vms(run: Run) -> list[str]:
    f: list[str] = []
    stale = run.results("kvm08", "stale")
    _expect(f, len(stale) >= 1 + run.settings.policy.extra_checks, "not enough stale checks")
    _expect(f, all(r["reading"].get("heartbeats") for r in stale), "stale without a heartbeat read")
    outs = run.outcomes("kvm08")
    _expect(f, len(outs) == 1 and bool(outs[0].get("success")), "kvm08 was not fenced once")
    _expect(f, run.lab.bmc_power_offs("kvm08") == 1, "kvm08's BMC did not get one power-off")
    return f


# -- agent-dies-then-crash


def _checks_between(run: Run, name: str, start: float, end: float | None = None) -> list[str]:
    """Evidence of the checks of `name` requested in [start, end) (worker clock = lab clock:
    one machine; only the demo's judges compare them, never fencer)."""
    return [
        c["evidence"]
        for c in run.results(name)
        if c["requested_at"] is not None
        and c["requested_at"] >= start
        and (end is None or c["requested_at"] < end)
    ]


def _fenced_once(run: Run, f: list[str], name: str, deadline: float, since: str) -> None:
    """One approved decision, one verified power-off by the BMC, one declareHostAsDegraded,
    the VMs running elsewhere, within `deadline` seconds of mark `since`."""
    outs = run.outcomes(name)
    _expect(f, len(run.decisions(name)) == 1, f"not exactly one decision for {name}")
    _expect(f, len(outs) == 1 and bool(outs[0].get("success")), f"{name} was not fenced once")
    _expect(f, bool(outs) and bool(outs[0].get("verified")), "the power-off was not verified")
    offs = run.lab.bmc_power_offs(name)
    _expect(f, offs == 1, f"{name}'s BMC got {offs} power-offs, not 1")
    _expect(f, run.lab.bmcs[name].power == "off", f"{name}'s BMC does not report power off")
    _expect(f, len(run.lab.degraded_calls(name)) == 1, "not one declareHostAsDegraded")
    vms = run.lab.vms_of(name)
    _expect(f, sorted(run.lab.restarted_elsewhere(name)) == sorted(vms), "VMs not restarted")
    _expect(f, len(run.fenced()) == 1, "some other host was fenced")
    at = run.marks.get(since)
    if outs and at is not None:
        took = outs[0]["finished_at"] - at
        _expect(f, took <= deadline, f"fenced {took:.1f} s after the {since} (> {deadline:g})")
    stale = run.results(name, "stale")
    need = 1 + run.settings.policy.extra_checks
    _expect(f, len(stale) >= need, f"fenced after {len(stale)} stale checks, not {need}")


async def _then_crash(run: Run, name: str, alive: int) -> None:
    """Wait for `alive` alive checks of `name` (agent dead, VMs writing), crash it, wait for
    its fence, the mail, the trap and the VMs restarted."""
    await run.checks(name, alive, "alive")
    run.marks[f"crash:{name}"] = time.time()
    run.fault(f"{name} crashes: its VMs stop writing too", name)
    await run.lab.crash(name)
    await run.wait(
        lambda: run.outcomes(name), run.fence_deadline_mid_episode + 20, f"{name} fenced"
    )
    await run.wait(
        lambda: run.lab.mail.mails and run.lab.traps.traps and run.lab.restarted_elsewhere(name),
        15,
        "a mail, a trap and the VMs restarted",
    )
    await asyncio.sleep(run.settings.policy.check_interval * 2)  # nothing more may happen


async def _agent_dies_then_crash(run: Run) -> None:
    run.fault("kvm02's agent dies (its heartbeat with it); its VMs keep writing", "kvm02")
    run.marks["agent:kvm02"] = time.time()
    run.lab.agent_dies("kvm02")
    await _then_crash(run, "kvm02", 2 + run.settings.policy.extra_checks)


def _judge_then_crash(run: Run, name: str) -> list[str]:
    f: list[str] = []
    crashed = run.marks.get(f"crash:{name}")
    if crashed is None:
        return [f"{name} never crashed"]
    before = _checks_between(run, name, 0.0, crashed)
    alive = before.count("alive")
    need = 2 + run.settings.policy.extra_checks
    _expect(f, alive >= need, f"{alive} alive checks while the VMs wrote, not {need}")
    _expect(f, "stale" not in before, f"a live host's check said stale: {before}")
    decided = [d for d in run.decisions(name) if float(d.get("decided_at") or 0) < crashed]
    _expect(f, decided == [], "a fence was decided while the host lived")
    _fenced_once(run, f, name, run.fence_deadline_mid_episode, f"crash:{name}")
    return f


# -- filer-clock-behind / filer-clock-ahead

FILER_OFFSET_CHECKS = 8  # the filer's clock is off by 8 check intervals (8 min at the default)


async def _filer_clock(run: Run) -> None:
    off = run.lab.kvm.filer_offset
    run.event(
        "lab",
        None,
        f"the NFS filer's clock is {abs(off):g} s {'behind' if off < 0 else 'ahead of'} "
        "the hosts' (every mtime a neighbour reads is on it)",
    )
    run.fault("kvm04's agent dies; its VMs keep writing", "kvm04")
    run.lab.agent_dies("kvm04")
    await _then_crash(run, "kvm04", 2 + run.settings.policy.extra_checks)


def _judge_filer_clock(run: Run) -> list[str]:
    f = _judge_then_crash(run, "kvm04")
    skew = run.notices("clock_skew", "kvm04")
    _expect(f, bool(skew), "no clock-skew notice although the filer is off by minutes")
    kinds = [t.kind for t in run.lab.traps.traps]
    _expect(f, "clock_skew" in kinds, "no clock-skew trap")
    return f


# -- vms-restarted-elsewhere


async def _vms_restarted_elsewhere(run: Run) -> None:
    run.fault("kvm05 crashes", "kvm05")
    run.marks["crash:kvm05"] = time.time()
    await run.lab.crash("kvm05")
    await run.checks("kvm05", 1, "baseline")
    moved = run.lab.vms_restarted_elsewhere("kvm05")
    run.marks["moved:kvm05"] = time.time()
    host = run.lab.host("kvm05")
    run.moved_disks = {
        str(d): d.stat().st_mtime for d in host.disk_files(list(moved)) if d.exists()
    }
    run.event(
        "cloud",
        "kvm05",
        f"CloudStack's own HA restarted {len(moved)} VMs of kvm05 on "
        f"{', '.join(sorted(set(moved.values())))}: their disks are written there now",
    )
    await run.wait(
        lambda: run.outcomes("kvm05"),
        run.fence_deadline_mid_episode + run.cloudstack_notices + 20,
        "kvm05 fenced",
    )
    await run.wait(lambda: run.lab.mail.mails and run.lab.traps.traps, 15, "a mail and a trap")
    await asyncio.sleep(run.settings.policy.check_interval * 2)


def _judge_vms_restarted_elsewhere(run: Run) -> list[str]:
    f: list[str] = []
    moved_at = run.marks.get("moved:kvm05")
    if moved_at is None:
        return ["CloudStack never restarted kvm05's VMs"]
    after = _checks_between(run, "kvm05", moved_at)
    _expect(f, "alive" not in after, f"the moved VMs' writes kept kvm05 alive: {after}")
    for c in run.results("kvm05"):
        if c["requested_at"] is not None and c["requested_at"] >= moved_at:
            read = set((c["reading"].get("mtimes") or {}).keys())
            if read & set(run.moved_disks) or c["files_checked"] != 1:
                f.append(f"check {c['check']} still read a moved VM's disk")
    written = [p for p, m in run.moved_disks.items() if Path(p).stat().st_mtime > m]
    _expect(
        f,
        len(written) == len(run.moved_disks) > 0,
        "the new host did not keep writing the moved VMs' disks",
    )
    # From the crash: CloudStack notices it at the ping timeout, the VMs move mid-episode.
    deadline = run.fence_deadline_mid_episode + run.cloudstack_notices
    _fenced_once(run, f, "kvm05", deadline, "crash:kvm05")
    return f


# -- rbd-disks


async def _rbd_disks(run: Run) -> None:
    run.fault("kvm06 (a VM on Ceph RBD, which no neighbour can read; one on NFS) crashes", "kvm06")
    await run.lab.crash("kvm06")
    await run.wait(
        lambda: run.notices("cannot_verify", "kvm06"),
        run.settings.policy.check_interval * (run.settings.policy.unknown_alert_after + 3) + 30,
        "a cannot-verify notice",
    )
    await run.checks("kvm06", 2 + run.settings.policy.extra_checks + 1)
    await run.wait(lambda: run.lab.mail.mails and run.lab.traps.traps, 15, "mail and trap")


def _judge_rbd_disks(run: Run) -> list[str]:
    f: list[str] = []
    checks = run.results("kvm06")
    evidence = {c["evidence"] for c in checks}
    _expect(f, evidence == {"unknown"}, f"checks of a host with an RBD disk said {evidence}")
    # Unknown because of the RBD disk: counted as unreadable, or the RBD back end could not
    # read it (the lab's neighbours have no Ceph client and the lab no Ceph cluster).
    _expect(
        f,
        all(c["reading"].get("unreadable") or "rbd" in str(c["reason"]).lower() for c in checks),
        f"an unknown that does not name the RBD disk: {[c['reason'] for c in checks]}",
    )
    _expect(f, run.decisions() == [], "a fence was decided without evidence")
    _expect(f, run.lab.bmc_power_offs("kvm06") == 0, "kvm06's BMC got a power-off")
    _expect(f, bool(run.notices("cannot_verify", "kvm06")), "no cannot-verify notice")
    kinds = {t.kind for t in run.lab.traps.traps}
    _expect(f, "cannot_verify" in kinds, "no cannot-verify trap")
    subjects = [m.subject for m in run.lab.mail.mails]
    _expect(f, any("CANNOT-VERIFY" in s for s in subjects), f"no cannot-verify mail: {subjects}")
    return f


# -- suspect-too-long


async def _suspect_too_long(run: Run) -> None:
    p = run.settings.policy
    run.fault("kvm07 (a VM on Ceph RBD: never judged stale) crashes and stays suspect", "kvm07")
    await run.lab.crash("kvm07")
    await run.wait(
        lambda: (
            len(_too_long_traps(run)) >= 2
            and len([m for m in run.lab.mail.mails if "SUSPECT-TOO-LONG" in m.subject]) >= 2
        ),
        p.suspect_alert_after + 2 * p.suspect_renotify + 40,
        "two suspect-too-long mails and traps",
    )


def _too_long_traps(run: Run) -> list[Any]:
    return [t for t in run.lab.traps.traps if t.kind == "suspect_too_long"]


def _judge_suspect_too_long(run: Run) -> list[str]:
    f: list[str] = []
    notices = run.notices("suspect_too_long", "kvm07")
    _expect(f, len(notices) >= 2, f"{len(notices)} suspect-too-long notices, not a repeat")
    ats = [float(n["at"]) for n in notices]
    p = run.settings.policy
    _expect(
        f,
        all(b - a >= p.suspect_renotify - 1.0 for a, b in itertools.pairwise(ats)),
        f"suspect-too-long repeated faster than every {p.suspect_renotify:g} s",
    )
    mails = [m for m in run.lab.mail.mails if "SUSPECT-TOO-LONG" in m.subject]
    _expect(f, len(mails) >= 2, f"{len(mails)} suspect-too-long mails")
    traps = _too_long_traps(run)
    _expect(f, len(traps) >= 2, f"{len(traps)} suspect-too-long traps")
    _expect(
        f,
        all(t.varbinds.get("fencerHostName") == "kvm07" for t in traps),
        "a suspect-too-long trap names another host",
    )
    _expect(f, run.decisions() == [], "a fence was decided without evidence")
    _expect(f, run.lab.bmc_power_offs("kvm07") == 0, "kvm07's BMC got a power-off")
    return f


# -- pause-then-resume


async def _pause_then_resume(run: Run) -> None:
    # As the UI does it: a pause record on the settings topic, which every worker reads.
    from streams.settings_store import SettingsStore

    cluster = run.lab.cluster
    store = SettingsStore(run.settings, secrets_key=None, client_id="fencer-demo")
    await store.start()
    try:
        await store.pause(cluster.uuid, reason="demo: storage maintenance", by="demo")
        run.event("operator", None, f"fencing paused for {cluster.name} (settings topic)")
        run.marks["crash:kvm06"] = time.time()
        run.fault("kvm06 crashes while fencing is paused", "kvm06")
        await run.lab.crash("kvm06")
        await run.wait(
            lambda: [d for d in run.withheld() if d.get("withheld_reason") == "paused"],
            run.fence_deadline + 20,
            "the fence withheld because of the pause",
        )
        withheld_at = time.time()
        await run.wait(
            lambda: len([c for c in run.results("kvm06") if c["at"] > withheld_at]) >= 2,
            run.settings.policy.check_interval * 4 + 20,
            "kvm06 to be checked on while paused",
        )
        run.marks["resume:kvm06"] = time.time()
        await store.resume(cluster.uuid, by="demo")
        run.event("operator", None, f"fencing resumed for {cluster.name}")
        await run.wait(
            lambda: run.outcomes("kvm06"),
            run.settings.policy.check_interval + 2 * PIPELINE_PER_CHECK + PIPELINE_ONCE + 20,
            "kvm06 fenced after the resume",
        )
    finally:
        await store.stop()
    await run.wait(lambda: run.lab.restarted_elsewhere("kvm06"), 15, "the VMs restarted")
    await asyncio.sleep(run.settings.policy.check_interval * 2)


def _judge_pause_then_resume(run: Run) -> list[str]:
    f: list[str] = []
    resumed = run.marks.get("resume:kvm06")
    paused = [d for d in run.withheld() if d.get("withheld_reason") == "paused"]
    _expect(f, bool(paused), "nothing was withheld while paused")
    _expect(
        f,
        {d.get("withheld_reason") for d in run.withheld()} <= {"paused"},
        "withheld for another reason than the pause",
    )
    early = [at for at, n in run.lab.power_offs if resumed is None or at < resumed]
    _expect(f, early == [], "a host was powered off while fencing was paused")
    states = [s for _at, s in run.states.get("kvm06", [])]
    _expect(f, "withheld" in states, f"kvm06 never showed withheld: {states}")
    kinds = {t.kind for t in run.lab.traps.traps}
    _expect(f, "fence_withheld" in kinds, "no withheld trap")
    _expect(f, _withheld_mail(run), "no withheld mail")
    outs = run.outcomes("kvm06")
    _expect(f, len(outs) == 1 and bool(outs[0].get("success")), "kvm06 was not fenced once")
    _expect(f, bool(outs) and bool(outs[0].get("verified")), "the power-off was not verified")
    _expect(f, run.lab.bmc_power_offs("kvm06") == 1, "kvm06's BMC did not get one power-off")
    _expect(f, len(run.lab.degraded_calls("kvm06")) == 1, "not one declareHostAsDegraded")
    _expect(f, len(run.fenced()) == 1, "some other host was fenced")
    ids = {d.get("decision_id") for d in run.decisions("kvm06")}
    _expect(f, len(ids) == 1, f"the re-proposals carried {len(ids)} decision ids, not one")
    if outs and resumed is not None:
        took = outs[0]["finished_at"] - resumed
        limit = run.settings.policy.check_interval + 2 * PIPELINE_PER_CHECK + PIPELINE_ONCE
        _expect(f, took <= limit, f"fenced {took:.1f} s after the resume (> {limit:g})")
    return f


# -- the Ceph RBD scenarios (a real cluster; lab.ceph)


def _min_gap(run: Run) -> float:
    """The RBD back end's stale window: a dead client's watch must have expired."""
    rbd = run.settings.rbd
    return float(rbd.watch_timeout + rbd.watch_margin)


# What one RBD check may add on a loaded two-core machine: the neighbour starts Python, loads
# librados and connects to the monitor (about 0.5 s idle, 2-3 s under a parallel test run).
PIPELINE_PER_RBD_CHECK = 3.0
# The RBD scenarios check every min_gap (rbd.watch_timeout + rbd.watch_margin of the lab: 5 + 1
# s): a check sooner after the previous reading could not call the host stale ("too soon", an
# unknown that counts toward cannot_verify), as check_interval 60 s >= 30 + 5 s is on a real
# cloud with Ceph's defaults.
RBD_POLICY = {"check_interval": LAB_WATCH_TIMEOUT + 1.0}


def _rbd_fence_deadline(run: Run) -> float:
    """Crash to verified fence of an RBD-only host: its watches linger `watch_timeout`, then
    1 + extra_checks stale checks, each on the first tick at least `min_gap` after the previous
    reading arrived, plus the pipeline's slack."""
    p = run.settings.policy
    ci, gap = p.check_interval, _min_gap(run)
    # The next check is requested an interval after the previous result arrived: with
    # check_interval >= min_gap each one may be stale; below it, the first tick past min_gap.
    per_check = (ci if ci >= gap else gap + ci) + PIPELINE_PER_RBD_CHECK
    return (
        run.cloudstack_notices
        + run.settings.rbd.watch_timeout
        + PIPELINE_PER_RBD_CHECK
        + (1 + p.extra_checks) * per_check
        + PIPELINE_ONCE
    )


def _watches(run: Run, name: str, when: str) -> list[str]:
    """Note (and show) the watches host `name` holds now."""
    watches = run.lab.rbd_watchers(name)
    run.facts[f"watches:{name}:{when}"] = len(watches)
    run.event("ceph", name, f"{name} holds {len(watches)} RBD watches ({when})")
    return watches


def _blocklist(run: Run) -> list[str]:
    """`ceph osd blocklist ls` (as client.admin): the listed addresses."""
    from fencing.blocklist import parse_ls

    assert run.lab.ceph is not None
    out = run.lab.ceph.run("ceph", "osd", "blocklist", "ls", "--format", "json").stdout
    return [str(e.get("addr")) for e in parse_ls(out)]


async def _rbd_host_crash(run: Run) -> None:
    _watches(run, "kvm03", "before the crash")
    run.fault(
        "kvm03 (every VM disk on Ceph RBD, no NFS disk, no heartbeat) crashes: its qemu "
        f"processes die, their watches linger {run.settings.rbd.watch_timeout:g} s",
        "kvm03",
    )
    run.marks["crash:kvm03"] = time.time()
    await run.lab.crash("kvm03")
    await run.wait(
        lambda: not run.lab.rbd_watchers("kvm03"),
        run.settings.rbd.watch_timeout + 10,
        "kvm03's watches to expire",
    )
    run.marks["expired:kvm03"] = time.time()
    run.event("ceph", "kvm03", "kvm03's watches expired (osd client watch timeout)")
    await run.wait(lambda: run.outcomes("kvm03"), _rbd_fence_deadline(run) + 20, "kvm03 fenced")
    await run.wait(
        lambda: run.lab.mail.mails and run.lab.traps.traps and run.lab.restarted_elsewhere("kvm03"),
        15,
        "a mail, a trap and the VMs restarted",
    )
    # CloudStack started the VMs on other hosts: their qemu opens the images there.
    cloud = run.lab.cloud
    moved = {cloud.hosts[cloud.vms[u].host_uuid or ""].name for u in run.lab.vms_of("kvm03")}
    await run.wait(
        lambda: sum(len(run.lab.rbd_watchers(n)) for n in moved) >= 2,
        15,
        "the restarted VMs' images watched from their new hosts",
    )
    run.facts["watches of the restarted VMs"] = sum(len(run.lab.rbd_watchers(n)) for n in moved)
    run.event("ceph", None, f"the restarted VMs' images are watched from {', '.join(moved)}")
    await asyncio.sleep(run.settings.policy.check_interval * 2)  # nothing more may happen


def _judge_rbd_host_crash(run: Run) -> list[str]:
    f: list[str] = []
    _expect(f, run.facts.get("watches:kvm03:before the crash") == 2, "kvm03 held no watches")
    crashed, expired = run.marks.get("crash:kvm03"), run.marks.get("expired:kvm03")
    if crashed is None or expired is None:
        return [*f, "kvm03's watches never expired"]
    stale = [c for c in run.results("kvm03", "stale")]
    # (`expired` is when the scenario's own polling of `rbd status` saw them gone.)
    early = [c["check"] for c in stale if c["requested_at"] < expired - 1.5]
    _expect(f, early == [], f"stale while kvm03's watches still lingered: checks {early}")
    _fenced_once(run, f, "kvm03", _rbd_fence_deadline(run), "crash:kvm03")
    _expect(f, run.lab.rbd_watchers("kvm03") == [], "kvm03 still watches an image")
    moved = run.facts.get("watches of the restarted VMs")
    _expect(f, moved == 2, f"{moved} watches of the restarted VMs' images from their new hosts")
    return f


async def _rbd_agent_dies(run: Run) -> None:
    _watches(run, "kvm02", "before the agent dies")
    run.fault("kvm02's CloudStack agent dies; qemu keeps its RBD images open (watches)", "kvm02")
    run.marks["agent:kvm02"] = time.time()
    run.lab.agent_dies("kvm02")
    p = run.settings.policy
    # Longer than a crashed host would need to be fenced: the watches alone keep it alive.
    span = run.settings.rbd.watch_timeout + (1 + p.extra_checks) * _min_gap(run)
    await run.checks("kvm02", 2)
    first = run.results("kvm02")[0]["at"]
    await run.wait(
        lambda: run.results("kvm02") and run.results("kvm02")[-1]["at"] - first >= span,
        span + 30,
        f"{span:g} s of checks of kvm02",
    )
    _watches(run, "kvm02", "at the end")


def _judge_rbd_agent_dies(run: Run) -> list[str]:
    f: list[str] = []
    checks = run.results("kvm02")
    p = run.settings.policy
    need = 2 + p.extra_checks
    _expect(f, len(checks) >= need, f"{len(checks)} checks of kvm02, not {need}")
    ev = [c["evidence"] for c in checks]
    _expect(f, "stale" not in ev, f"a check of a host whose VMs run said stale: {ev}")
    _expect(f, set(ev[1:]) <= {"alive"}, f"checks of a live RBD host not all alive: {ev}")
    by_watch = [c for c in checks if "watcher" in str(c["reason"] or "")]
    _expect(f, len(by_watch) >= need - 1, "the alive checks do not name a watcher")
    for when in ("before the agent dies", "at the end"):
        held = run.facts.get(f"watches:kvm02:{when}")
        _expect(f, held == 2, f"kvm02 held {held} watches {when}, not 2")
    _expect(f, run.decisions() == [], "a fence was decided for a live host")
    _expect(f, run.lab.bmc_power_offs("kvm02") == 0, "kvm02's BMC got a power-off")
    _expect(f, run.lab.degraded_calls("kvm02") == [], "CloudStack was told kvm02 is degraded")
    return f


async def _rbd_bmc_unreachable(run: Run) -> None:
    _watches(run, "kvm07", "before the crash")
    run.fault(
        "kvm07's BMC stops answering, then kvm07 (every VM disk on Ceph RBD) crashes; its "
        "ladder: blocklist as the fallback",
        "kvm07",
    )
    run.lab.bmc_unreachable("kvm07")
    run.marks["crash:kvm07"] = time.time()
    await run.lab.crash("kvm07")
    deadline = _rbd_fence_deadline(run) + run.settings.actuator.fence_deadline + 30
    await run.wait(lambda: run.outcomes("kvm07"), deadline, "kvm07's fence outcome")
    await run.wait(
        lambda: run.lab.restarted_elsewhere("kvm07") and _lift_mail(run),
        20,
        "the VMs restarted and a mail that says how to lift the blocklist",
    )
    listed = _blocklist(run)
    run.event("ceph", "kvm07", f"ceph osd blocklist ls: {', '.join(listed) or 'empty'}")
    run.facts["blocklist"] = listed
    await asyncio.sleep(run.settings.policy.check_interval * 2)


def _lift_mail(run: Run) -> bool:
    return any("fencer rbd lift" in m.body for m in run.lab.mail.mails)


def _judge_rbd_bmc_unreachable(run: Run) -> list[str]:
    f: list[str] = []
    ip = run.lab.host("kvm07").ip
    entry = f"{ip}:0/0"
    outs = run.outcomes("kvm07")
    _expect(f, len(outs) == 1, f"{len(outs)} fence outcomes for kvm07, not 1")
    out = outs[0] if outs else {}
    error = str(out.get("error") or "")
    _expect(f, bool(out.get("success")), f"kvm07 was not storage-fenced: {error}")
    _expect(f, "storage-fenced instead" in error and entry in error, f"outcome: {error}")
    _expect(f, run.lab.bmc_power_offs("kvm07") == 0, "kvm07's unreachable BMC got a power-off")
    _expect(f, run.lab.bmcs["kvm07"].power == "on", "kvm07's BMC says its power went off")
    listed = run.facts.get("blocklist") or []
    _expect(f, entry in listed, f"{entry} is not in ceph osd blocklist ls: {listed}")
    _expect(f, len(run.lab.degraded_calls("kvm07")) == 1, "not one declareHostAsDegraded")
    vms = run.lab.vms_of("kvm07")
    _expect(f, sorted(run.lab.restarted_elsewhere("kvm07")) == sorted(vms), "VMs not restarted")
    notes = [n for n in run.notices(None, "kvm07") if entry in str(n.get("reason") or "")]
    _expect(f, bool(notes), f"no notice names the blocklist {entry}")
    _expect(
        f,
        any("fencer rbd lift" in str(n.get("reason")) for n in notes),
        "no notice says how to lift the blocklist",
    )
    _expect(f, _lift_mail(run), "no mail says how to lift the blocklist")
    _expect(f, run.lab.rbd_watchers("kvm07") == [], "kvm07 still watches an image")
    return f


async def _ceph_unreachable(run: Run) -> None:
    run.fault("the Ceph monitor stops: nobody can ask the cluster any more")
    await run.lab.ceph_unreachable()
    run.fault("kvm05 (every VM disk on Ceph RBD) crashes while Ceph cannot be asked", "kvm05")
    await run.lab.crash("kvm05")
    p = run.settings.policy
    await run.wait(
        lambda: run.notices("cannot_verify", "kvm05"),
        (p.check_interval + 2 * run.settings.rbd.connect_timeout) * (p.unknown_alert_after + 3)
        + 30,
        "a cannot-verify notice",
    )
    await run.checks("kvm05", 2 + p.extra_checks + 1)
    await run.wait(lambda: run.lab.mail.mails and run.lab.traps.traps, 15, "mail and trap")


def _judge_ceph_unreachable(run: Run) -> list[str]:
    f: list[str] = []
    checks = run.results("kvm05")
    ev = {c["evidence"] for c in checks}
    _expect(f, ev == {"unknown"}, f"checks while Ceph could not be asked said {ev}")
    _expect(
        f,
        all("ceph unreachable" in str(c["reason"]) for c in checks),
        f"an unknown that does not say Ceph is unreachable: {[c['reason'] for c in checks]}",
    )
    _expect(f, run.decisions() == [], "a fence was decided without evidence")
    _expect(f, run.lab.bmc_power_offs("kvm05") == 0, "kvm05's BMC got a power-off")
    _expect(f, run.lab.degraded_calls("kvm05") == [], "CloudStack was told kvm05 is degraded")
    _expect(f, bool(run.notices("cannot_verify", "kvm05")), "no cannot-verify notice")
    _expect(f, "cannot_verify" in {t.kind for t in run.lab.traps.traps}, "no cannot-verify trap")
    subjects = [m.subject for m in run.lab.mail.mails]
    _expect(f, any("CANNOT-VERIFY" in s for s in subjects), f"no cannot-verify mail: {subjects}")
    return f


# -- busy-disk-unreadable


async def _busy_disk_unreadable(run: Run) -> None:
    host = run.lab.host("kvm02")
    busy, *idle = host.vms()
    for vm in idle:
        run.lab.kvm.set_vm_idle(vm)
    run.fault(
        f"kvm02's agent dies (its heartbeat with it); one VM writes its disk, {len(idle)} idle",
        "kvm02",
    )
    run.lab.agent_dies("kvm02")
    await run.checks("kvm02", 1)  # the baseline read the busy disk
    (disk,) = host.disk_files([busy])
    # On the lab's one shared export the path is gone (ENOENT) for every reader; on a real NFS
    # client a stale file handle (ESTALE) or EIO fails the neighbour's stat the same way.
    disk.rename(disk.with_name(f".{disk.name}.unreadable"))
    run.marks["unreadable:kvm02"] = time.time()
    run.facts["unreadable:kvm02"] = str(disk)
    run.fault(f"the neighbours can no longer stat kvm02's busy disk {disk.name}", "kvm02")
    p = run.settings.policy
    await run.wait(
        lambda: run.notices("cannot_verify", "kvm02"),
        p.check_interval * (p.unknown_alert_after + 3) + 30,
        "a cannot-verify notice",
    )
    await run.checks("kvm02", 2 + p.extra_checks + 1)
    await run.wait(lambda: run.lab.mail.mails and run.lab.traps.traps, 15, "mail and trap")


def _judge_busy_disk_unreadable(run: Run) -> list[str]:
    f: list[str] = []
    at = run.marks.get("unreadable:kvm02")
    if at is None:
        return ["kvm02's busy disk was never made unreadable"]
    disk = run.facts["unreadable:kvm02"]
    p = run.settings.policy
    after = [
        c for c in run.results("kvm02") if c["requested_at"] is not None and c["requested_at"] >= at
    ]
    ev = [c["evidence"] for c in after]
    need = 1 + p.extra_checks
    _expect(f, len(after) >= need, f"{len(after)} checks after the disk went unreadable")
    _expect(f, set(ev) == {"unknown"}, f"checks lacking the busy disk said {ev}")
    _expect(f, run.results("kvm02", "stale") == [], "a check of a live host said stale")
    _expect(
        f,
        all(disk in (c["reading"].get("missing") or []) for c in after),
        "a check after the disk went unreadable does not list it missing",
    )
    _expect(
        f,
        all(
            "could not be read now" in str(c["reason"]) and disk in str(c["reason"]) for c in after
        ),
        f"an unknown that does not name the unreadable disk: {[c['reason'] for c in after]}",
    )
    _expect(f, run.decisions() == [], "a fence was decided for a live host")
    _expect(f, run.lab.bmc_power_offs("kvm02") == 0, "kvm02's BMC got a power-off")
    _expect(f, run.lab.degraded_calls("kvm02") == [], "CloudStack was told kvm02 is degraded")
    _expect(f, bool(run.notices("cannot_verify", "kvm02")), "no cannot-verify notice")
    _expect(f, "cannot_verify" in {t.kind for t in run.lab.traps.traps}, "no cannot-verify trap")
    subjects = [m.subject for m in run.lab.mail.mails]
    _expect(f, any("CANNOT-VERIFY" in s for s in subjects), f"no cannot-verify mail: {subjects}")
    return f


# -- cloudstack-marks-down (CloudStack's KVM investigator and VM-HA on)


def _cloudstack_state(run: Run, name: str) -> str:
    return run.lab.cloud.hosts[run.uuid(name)].state


async def _cloudstack_marks_down(run: Run) -> None:
    run.marks["crash:kvm03"] = time.time()
    run.fault("kvm03 crashes (CloudStack's KVM investigator is on)", "kvm03")
    await run.lab.crash("kvm03")
    await run.wait(
        lambda: _cloudstack_state(run, "kvm03") == "Down",
        run.cloudstack_notices + 10,
        "CloudStack to find kvm03 Down",
    )
    run.marks["down:kvm03"] = time.time()
    run.event(
        "cloud",
        "kvm03",
        "CloudStack's investigator: the neighbours find kvm03's heartbeat stale, Down; "
        "'Host down ... Starting HA on the VMs': its own VM-HA restarts them, no fence",
    )
    await run.wait(lambda: run.outcomes("kvm03"), run.fence_deadline + 10, "kvm03 fenced")
    vms = sorted(run.lab.vms_of("kvm03"))
    await run.wait(
        lambda: (
            sorted(run.lab.restarted_elsewhere("kvm03")) == vms
            and run.lab.mail.mails
            and run.lab.traps.traps
        ),
        15,
        "the VMs restarted, a mail and a trap",
    )
    await asyncio.sleep(run.settings.policy.check_interval * 2)  # nothing more may happen


def _judge_cloudstack_marks_down(run: Run) -> list[str]:
    f: list[str] = []
    if run.marks.get("down:kvm03") is None:
        return ["CloudStack never found kvm03 Down"]
    outs = run.outcomes("kvm03")
    _expect(f, len(run.decisions("kvm03")) == 1, "not exactly one decision for kvm03")
    _expect(f, len(outs) == 1 and bool(outs[0].get("success")), "kvm03 was not fenced once")
    _expect(f, bool(outs) and bool(outs[0].get("verified")), "the power-off was not verified")
    offs = run.lab.bmc_power_offs("kvm03")
    _expect(f, offs == 1, f"kvm03's BMC got {offs} power-offs, not 1")
    _expect(f, run.lab.bmcs["kvm03"].power == "off", "kvm03's BMC does not report power off")
    result = str(outs[0].get("cloudstack_result")) if outs else ""
    _expect(
        f,
        "CloudStack marked the host Down" in result,
        f"the outcome does not say CloudStack's own HA restarts the VMs: {result}",
    )
    vms = run.lab.vms_of("kvm03")
    _expect(f, sorted(run.lab.restarted_elsewhere("kvm03")) == sorted(vms), "VMs not restarted")
    _expect(f, len(run.fenced()) == 1, "some other host was fenced")
    stale = run.results("kvm03", "stale")
    need = 1 + run.settings.policy.extra_checks
    _expect(f, len(stale) >= need, f"fenced after {len(stale)} stale checks, not {need}")
    at = run.marks["crash:kvm03"]
    if outs:
        took = outs[0]["finished_at"] - at
        _expect(f, took <= run.fence_deadline, f"fenced {took:.1f} s after the crash")
    return f


# -- agent-dies-cloudstack-says-down (#2890: the investigator takes a live host for Down)


async def _agent_dies_cloudstack_says_down(run: Run) -> None:
    run.marks["agent:kvm02"] = time.time()
    run.fault(
        "kvm02's agent dies (its NFS heartbeat with it); the host and its VMs keep running "
        "(CloudStack's KVM investigator is on)",
        "kvm02",
    )
    run.lab.agent_dies("kvm02")
    await run.wait(
        lambda: _cloudstack_state(run, "kvm02") == "Down",
        run.cloudstack_notices + 10,
        "CloudStack to take kvm02 for Down",
    )
    run.marks["down:kvm02"] = time.time()
    run.event(
        "cloud",
        "kvm02",
        "CloudStack's investigator: kvm02's heartbeat is stale, Down (it is alive: #2890); "
        "its own VM-HA restarts the VMs elsewhere while kvm02 still runs them",
    )
    vms = sorted(run.lab.vms_of("kvm02"))
    await run.wait(
        lambda: sorted(run.lab.restarted_elsewhere("kvm02")) == vms,
        15,
        "CloudStack's VM-HA to restart kvm02's VMs",
    )
    run.marks["moved:kvm02"] = time.time()
    # Long enough for a fence on fresh evidence after the VMs moved, and then some.
    await asyncio.sleep(run.fence_deadline_mid_episode + run.settings.policy.check_interval * 2)


def _judge_agent_dies_cloudstack_says_down(run: Run) -> list[str]:
    """What fencer must not do whatever it makes of the split brain: judge the live host dead
    or decide a fence while its VMs were its own and writing, fence it more than once, or ask
    CloudStack for a restart that would start the VMs a third time. What it did after the
    move is recorded (`facts`), for the test and the report to state."""
    f: list[str] = []
    down, moved = run.marks.get("down:kvm02"), run.marks.get("moved:kvm02")
    if down is None or moved is None:
        return ["CloudStack never took kvm02 for Down and restarted its VMs"]
    started = run.marks["agent:kvm02"]
    before = _checks_between(run, "kvm02", started, down)
    _expect(f, "stale" not in before, f"a check of the live host said stale: {before}")
    # (Under load CloudStack may take it for Down before a second check: only the baseline.)
    _expect(
        f,
        "alive" in before or len(before) < 2,
        f"no alive check while kvm02's VMs were its own: {before}",
    )
    early = [d for d in run.decisions("kvm02") if float(d.get("decided_at") or 0) < down]
    _expect(f, early == [], "a fence was decided before CloudStack took the host for Down")
    offs = run.lab.bmc_power_offs("kvm02")
    _expect(f, offs <= 1, f"kvm02's BMC got {offs} power-offs")
    _expect(f, len(run.outcomes("kvm02")) <= 1, "more than one outcome for kvm02")
    for o in run.outcomes("kvm02"):
        result = str(o.get("cloudstack_result"))
        _expect(f, "CloudStack marked the host Down" in result, f"a restart was asked: {result}")
    _expect(f, len(run.fenced()) == offs, "some other host was fenced")
    run.facts["after the move"] = _checks_between(run, "kvm02", moved)
    run.facts["fenced the live host"] = offs == 1
    run.facts["files read after the move"] = [
        r.get("files_checked")
        for r in run.results("kvm02")
        if r["requested_at"] is not None and r["requested_at"] >= moved
    ]
    return f


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "agent-dies",
            "the agent dies but the host keeps writing: checked, never fenced",
            _agent_dies,
            _judge_agent_dies,
        ),
        Scenario(
            "host-crash",
            "one verified power-off, declareHostAsDegraded, VMs restarted elsewhere, "
            "a mail and a trap, in time",
            _host_crash,
            _judge_host_crash,
        ),
        Scenario(
            "storage-outage",
            "storage unreadable: nothing fenced, a cannot-verify (or storm-guard) notice",
            _storage_outage,
            _judge_storage_outage,
        ),
        Scenario(
            "cap-reached",
            "four hosts crash with a cap of 3: three fenced, the fourth withheld and notified",
            _cap_reached,
            _judge_cap_reached,
            policy={"fence_cap": 3},
        ),
        Scenario(
            "neighbour-unreachable",
            "no neighbour can check: no fence, a cannot-verify notice",
            _neighbour_unreachable,
            _judge_neighbour_unreachable,
        ),
        Scenario(
            "host-recovers",
            "the host comes back between checks: no fence",
            _host_recovers,
            _judge_host_recovers,
        ),
        Scenario(
            "worker-restart",
            "the worker is killed mid-episode and restarted: exactly one fence",
            _worker_restart,
            _judge_worker_restart,
        ),
        Scenario(
            "bmc-unreachable",
            "the fence fails and is reported; the VMs are not restarted elsewhere",
            _bmc_unreachable,
            _judge_bmc_unreachable,
        ),
        Scenario(
            "no-vms",
            "a crashed host without VMs is fenced on its stale heartbeat",
            _no_vms,
            _judge_no_vms,
            lab={"hosts_without_vms": ("kvm08",)},
        ),
        Scenario(
            "agent-dies-then-crash",
            "the agent dies, the VMs keep writing: alive; a few checks later the host crashes: "
            "fenced once, in time",
            _agent_dies_then_crash,
            lambda run: _judge_then_crash(run, "kvm02"),
        ),
        Scenario(
            "filer-clock-behind",
            "the filer's clock is 8 intervals behind; agent dead, VMs writing: never fenced; "
            "then a crash: fenced once; a clock-skew notice",
            _filer_clock,
            _judge_filer_clock,
            policy={"clock_skew_alert": 4.0},
            filer_offset_checks=-FILER_OFFSET_CHECKS,
        ),
        Scenario(
            "filer-clock-ahead",
            "the filer's clock is 8 intervals ahead; agent dead, VMs writing: never fenced; "
            "then a crash: fenced once; a clock-skew notice",
            _filer_clock,
            _judge_filer_clock,
            policy={"clock_skew_alert": 4.0},
            filer_offset_checks=FILER_OFFSET_CHECKS,
        ),
        Scenario(
            "vms-restarted-elsewhere",
            "CloudStack's HA restarted the dead host's VMs elsewhere: their new writes do not "
            "keep it alive; fenced once",
            _vms_restarted_elsewhere,
            _judge_vms_restarted_elsewhere,
        ),
        Scenario(
            "rbd-disks",
            "a host with a disk on Ceph RBD crashes: only unknown, a cannot-verify notice, "
            "no fence",
            _rbd_disks,
            _judge_rbd_disks,
            lab={"rbd_hosts": ("kvm06",)},
        ),
        Scenario(
            "suspect-too-long",
            "a host stays suspect without a decision: a suspect-too-long mail and trap, repeated",
            _suspect_too_long,
            _judge_suspect_too_long,
            lab={"rbd_hosts": ("kvm07",)},
            policy={"suspect_alert_after": 3.0, "suspect_renotify": 4.0},
        ),
        Scenario(
            "rbd-host-crash",
            "a host whose VMs are on Ceph RBD crashes: its watches expire, then fenced once, "
            "VMs restarted elsewhere",
            _rbd_host_crash,
            _judge_rbd_host_crash,
            lab={"rbd_only_hosts": ("kvm03",)},
            policy=RBD_POLICY,
            ceph=True,
        ),
        Scenario(
            "rbd-agent-dies",
            "the agent of a host whose VMs are on Ceph RBD dies: its watches stay, never fenced",
            _rbd_agent_dies,
            _judge_rbd_agent_dies,
            lab={"rbd_only_hosts": ("kvm02",)},
            policy=RBD_POLICY,
            ceph=True,
        ),
        Scenario(
            "rbd-bmc-unreachable",
            "an RBD-only host crashes with its BMC unreachable: Ceph blocklist as the fallback, "
            "verified, VMs restarted, a notice says how to lift it",
            _rbd_bmc_unreachable,
            _judge_rbd_bmc_unreachable,
            lab={"rbd_only_hosts": ("kvm07",), "storage_fence": {"kvm07": "fallback"}},
            policy=RBD_POLICY,
            ceph=True,
        ),
        Scenario(
            "ceph-unreachable",
            "Ceph cannot be asked when an RBD host crashes: only unknown, a cannot-verify "
            "notice, no fence",
            _ceph_unreachable,
            _judge_ceph_unreachable,
            lab={"rbd_only_hosts": ("kvm05",)},
            ceph=True,
        ),
        Scenario(
            "pause-then-resume",
            "fencing paused: the crashed host is withheld and still checked; after the resume "
            "it is fenced once",
            _pause_then_resume,
            _judge_pause_then_resume,
        ),
        Scenario(
            "cloudstack-marks-down",
            "CloudStack's investigator finds a crashed host Down and restarts its VMs itself: "
            "fenced once all the same (verified off), the restart left to CloudStack",
            _cloudstack_marks_down,
            _judge_cloudstack_marks_down,
            lab={"investigator": True},
        ),
        Scenario(
            "agent-dies-cloudstack-says-down",
            "the agent dies, the host lives, CloudStack's investigator takes it for Down and "
            "restarts its VMs elsewhere (#2890)",
            _agent_dies_cloudstack_says_down,
            _judge_agent_dies_cloudstack_says_down,
            lab={"investigator": True},
        ),
        Scenario(
            "busy-disk-unreadable",
            "the agent dies, the one busy VM's disk becomes unreadable to the neighbours, the "
            "other VMs idle: only unknown, a cannot-verify notice, never fenced",
            _busy_disk_unreadable,
            _judge_busy_disk_unreadable,
        ),
    )
}
DEFAULT_STORY = ("agent-dies", "host-crash")


def summary_of(run: Run, scenario: Scenario, failures: list[str]) -> dict[str, Any]:
    """One scenario's line of the summary."""
    lab = run.lab
    restarted = {n: len(lab.restarted_elsewhere(n)) for n in lab.names()}
    crash_to_fence = {}
    for o in run.fenced():
        name = o["host"].get("host_name")
        if f"fault:{name}" in run.marks:
            crash_to_fence[name] = round(o["finished_at"] - run.marks[f"fault:{name}"], 1)
    over_ideal = {n: round(t - run.fence_ideal, 1) for n, t in crash_to_fence.items()}
    # CloudStack's own part (lab.cloudstack_sim: a crash is noticed at the ping timeout): from
    # the fault to the first signal that it reports the host down.
    noticed = {}
    for n in crash_to_fence:
        fault = round(run.marks[f"fault:{n}"] - run.t0, 2)
        first = next(
            (
                e["t"]
                for e in run.timeline
                if e["kind"] == "signal"
                and e["host"] == n
                and e["t"] >= fault
                and "Up again" not in e["text"]
            ),
            None,
        )
        if first is not None:
            noticed[n] = round(first - fault, 1)
    return {
        "fences_executed": len(run.fenced()),
        "fences_withheld": len(run.withheld()),
        "fences_failed": len([o for o in run.outcomes() if not o.get("success")]),
        "emails": len(run.lab.mail.mails),
        "traps": len(run.lab.traps.traps),
        "vms_restarted_elsewhere": sum(restarted.values()),
        "expected": scenario.expected,
        # What the peers saw, per host (only hosts where something happened).
        "bmc_power_offs": {n: c for n in lab.names() if (c := lab.bmc_power_offs(n))},
        "declare_degraded": {n: c for n in lab.names() if (c := len(lab.degraded_calls(n)))},
        "restarted": {n: c for n, c in restarted.items() if c},
        # From the host's last fault (its crash) to the verified power-off, against the ideal
        # check_interval x (1 + extra_checks) and the deadline (ideal + pipeline slack).
        "crash_to_fence_seconds": crash_to_fence,
        "fence_ideal_seconds": round(run.fence_ideal, 1),
        "fence_over_ideal_seconds": over_ideal,
        "cloudstack_noticed_seconds": noticed,
        "fence_deadline_seconds": round(run.fence_deadline, 1),
        "fence_deadline_mid_episode_seconds": round(run.fence_deadline_mid_episode, 1),
        # Seconds from the scenario's start: its marks (crash:<host>, resume:<host>, ...) and
        # every power-off a BMC carried out.
        "marks": {k: round(v - run.t0, 2) for k, v in run.marks.items()},
        "facts": run.facts,
        "bmc_power_off_at": [[round(at - run.t0, 2), n] for at, n in lab.power_offs],
        "mail_subjects": [m.subject for m in lab.mail.mails],
        "trap_kinds": [t.kind for t in lab.traps.traps],
        "notices": [v.get("kind") for v in run.notices()],
        "notices_by_host": {
            n: kinds
            for n in lab.names()
            if (kinds := [v.get("kind") for v in run.notices(None, n)])
        },
        "withheld_reasons": [d.get("withheld_reason") for d in run.withheld()],
        "checks": {
            n: [r.get("evidence") for r in run.results(n)] for n in lab.names() if run.results(n)
        },
        # Per judged check, as the host record reported it: files read, measured filer offset.
        "files_read": {
            n: [r.get("files_checked") for r in run.results(n)]
            for n in lab.names()
            if run.results(n)
        },
        "filer_offsets": {
            n: [r.get("filer_offset") for r in run.results(n)]
            for n in lab.names()
            if run.results(n)
        },
        "passed": not failures,
        "failures": failures,
        "seconds": round(time.time() - run.t0, 1),
    }


async def play(
    name: str,
    broker: EmbeddedBroker,
    workdir: Path,
    *,
    fast: bool = True,
    printer: Printer | None = None,
    ceph: CephCluster | None = None,
) -> tuple[Run, dict[str, Any]]:
    """Play one scenario on a fresh lab cloud; its run and its summary (never raises on a
    failed expectation: the summary says what failed). A `ceph` scenario needs `ceph`, a
    running cluster started from this thread (it is left as found: monitor up, no blocklist)."""
    scenario = SCENARIOS[name]
    if scenario.ceph:
        if ceph is None:
            raise ValueError(f"scenario {name} needs a running Ceph cluster (play's ceph)")
        try:
            return await _play(scenario, broker, workdir, fast, printer, ceph)
        finally:
            ceph.reset()
    return await _play(scenario, broker, workdir, fast, printer, None)


async def _play(
    scenario: Scenario,
    broker: EmbeddedBroker,
    workdir: Path,
    fast: bool,
    printer: Printer | None,
    ceph: CephCluster | None,
) -> tuple[Run, dict[str, Any]]:
    name = scenario.name
    interval = 0.5 if fast else 1.0
    lab_kw: dict[str, Any] = {"interval": interval, **scenario.lab}
    if ceph is not None:
        lab_kw["ceph"] = ceph
    if scenario.filer_offset_checks:
        ci = scenario.policy.get("check_interval", LabCloud.default_check_interval(interval))
        lab_kw["filer_offset"] = scenario.filer_offset_checks * ci
    async with LabCloud(broker, root=workdir / name, **lab_kw) as lab:
        run = Run(name, lab, workdir, fast, printer)
        failures: list[str] = []
        try:
            await run.start(**scenario.policy)
            await scenario.play(run)
        except TimeoutError as exc:
            failures.append(str(exc) + run.worker_log_tail())
        finally:
            await run.stop()
        failures.extend(scenario.judge(run))
        return run, summary_of(run, scenario, failures)


# ---------------------------------------------------------------------------------------------
# The command


def _human(e: dict[str, Any]) -> None:
    host = f"{e['host']:<6} " if e.get("host") else " " * 7
    print(f"  +{e['t']:6.1f}s  {e['kind']:<8} {host}{e['text']}", flush=True)


def _json_line(e: dict[str, Any]) -> None:
    print(json.dumps(e), flush=True)


async def _main(names: list[str], as_json: bool, fast: bool, workdir: Path) -> int:
    printer = _json_line if as_json else _human
    results: dict[str, Any] = {}
    if not as_json:
        print("starting the embedded Kafka broker ...", flush=True)
    broker = EmbeddedBroker(create_topics=False)
    with _quiet_stderr():  # Tansu prints a banner; its failures still raise BrokerError
        await broker.astart()
    ceph: CephCluster | None = None
    try:
        if any(SCENARIOS[n].ceph for n in names):
            if not as_json:
                print("starting a single-node Ceph (one monitor, one OSD) ...", flush=True)
            # Started from this thread, which outlives it (its daemons die with their thread).
            ceph = CephCluster(watch_timeout=LAB_WATCH_TIMEOUT)  # stopped below, even half-built
            ceph.start()
        for name in names:
            if not as_json:
                print(f"\n== {name}: {SCENARIOS[name].expected}", flush=True)
            _run, summary = await play(name, broker, workdir, fast=fast, printer=printer, ceph=ceph)
            results[name] = summary
            if not as_json:
                verdict = "PASSED" if summary["passed"] else "FAILED"
                print(
                    f"  -> {verdict}: {summary['fences_executed']} fenced, "
                    f"{summary['fences_withheld']} withheld, {summary['emails']} mails, "
                    f"{summary['traps']} traps, {summary['vms_restarted_elsewhere']} VMs "
                    f"restarted elsewhere ({summary['seconds']} s)",
                    flush=True,
                )
                for host, took in summary["crash_to_fence_seconds"].items():
                    over = summary["fence_over_ideal_seconds"][host]
                    seen = summary["cloudstack_noticed_seconds"].get(host)
                    part = (
                        f" ({seen:g} s of it CloudStack noticing the host down, at its ping "
                        f"timeout; fencer {round(over - seen, 1):g} s)"
                        if seen is not None
                        else ""
                    )
                    print(
                        f"     {host}: crash to verified power-off {took:g} s; ideal "
                        f"check_interval x (1 + extra_checks) = {summary['fence_ideal_seconds']:g}"
                        f" s, {over:g} s more{part}",
                        flush=True,
                    )
                for why in summary["failures"]:
                    print(f"     - {why}", flush=True)
    finally:
        if ceph is not None:
            ceph.stop()
        await broker.astop()
    passed = all(s["passed"] for s in results.values())
    if as_json:
        print(json.dumps({"summary": {"passed": passed, "scenarios": results}}), flush=True)
    else:
        print(f"\n{'all scenarios passed' if passed else 'some scenarios FAILED'}", flush=True)
    return 0 if passed else 1


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 on /dev/null meanwhile (children started meanwhile keep it)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cli_demo(args: argparse.Namespace) -> int:
    """`fencer demo`: play the story (or --scenario NAME ...) and print the timeline."""
    if args.list:
        for s in SCENARIOS.values():
            print(f"{s.name:<22} {s.expected}")
        return 0
    names = list(args.scenario) or list(DEFAULT_STORY)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(
            f"fencer demo: unknown scenario {', '.join(unknown)} (see fencer demo --list)",
            file=sys.stderr,
        )
        return 2
    # The lab's own chatter (aiosmtpd, aiokafka) would drown the timeline.
    logging.basicConfig(level=logging.CRITICAL)
    workdir = Path(tempfile.mkdtemp(prefix="fencer-demo-"))
    try:
        return asyncio.run(_main(names, args.json, args.fast, workdir))
    except KeyboardInterrupt:
        print("\nfencer demo: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    except BrokerError as exc:
        print(f"fencer demo: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the operator sees one line, never a traceback
        print(f"fencer demo: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
