"""The fencer topology on one page: topics, tables, agents and timers, top to bottom.

Nothing here decides. Every decision is `fencing.decision.step` (per host) or
`fencing.gate.decide` (per cluster); this module turns Kafka records into core events, keeps the
core's records in changelog-backed tables (so they survive restarts and move with partitions),
and sends each action to its topic.

    cloudstack ──ingest──▶ host-signals ─┐
    listHosts poller ─────▶ host-signals ─┤
    timer (ticks) ────────▶ host-signals ─┤
                            probe-results ┼─▶ watch (hosts table, step) ─▶ probe-requests ─▶ probe
                          fence-decisions ┤                              ├▶ fence-proposals ─▶ gate
                           fence-outcomes ┘                              └▶ notices
    gate (gates table, one partition: the global cap has one owner) ─▶ fence-decisions
    fence-decisions ─▶ actuate (done table) ─▶ fence-outcomes
    operator-actions (retry / handled / lift_blocklist) ─▶ operator (done table) ─▶ fence-outcomes
    operator-actions (ipmi_test / bmc_pin_confirm, from the API) ─▶ operator ─▶ ipmi-tests
    timer (fence_failed reminders, every renotify_interval) ─▶ notices
    fence-decisions + fence-outcomes + notices ─▶ notify (notified table) ─▶ email, SNMP

Where each agent's work lives: ingest in `streams.ingest`, the poller in `streams.poller`,
watch in `streams.watch`, gate in `streams.gating`, actuate, operator and pre-flight in
`streams.actuating`; records to and from core types in `streams.codec`, table rows in
`streams.tables`, the shared services in `streams.runtime`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer
from faust.types import TP

from fencing.records import (
    FenceOutcome,
    GateSignal,
    IpmiTestAnswer,
    Notice,
    OperatorAction,
    ProbeRequest,
    ProbeResult,
)
from fencing.settings import FencerSettings
from streams import actuating, codec, gate_tail, gating, tables
from streams import observability as obs
from streams import watch as host_watch
from streams.directory import DirectoryLog
from streams.directory import topic_name as directory_topic
from streams.ingest import EventBusConsumer
from streams.kafka import aiokafka_kwargs, faust_app_kwargs, prepare_kafka
from streams.runtime import Runtime, settle_memory
from streams.worker_clock import worker_clock

log = logging.getLogger("fencer.app")

ROLES = ("ingest", "probe", "actuate", "notify")
RAW: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}


def parse_roles(text: str) -> tuple[str, ...]:
    """`all` or a comma list of roles; raise ValueError naming a bad one."""
    if text.strip() in ("", "all"):
        return ROLES
    roles = tuple(r.strip() for r in text.split(",") if r.strip())
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise ValueError(f"--roles: unknown role {', '.join(bad)} (choose from {', '.join(ROLES)})")
    return roles


def _delivery_failed(topic_name: str, delivery: asyncio.Future[Any]) -> None:
    """Log a record the producer could not deliver (its future's exception, retrieved)."""
    if delivery.cancelled():
        log.warning("a record for %s was not delivered: the send was cancelled", topic_name)
        return
    exc = delivery.exception()
    if exc is not None:
        log.warning("a record for %s was not delivered: %s", topic_name, exc)


def require_signing_key(settings: FencerSettings, roles: tuple[str, ...]) -> None:
    """The gate signs decisions, the actuator verifies them: neither runs without a key
    (SettingsError naming `signing.keys_file`)."""
    if {"ingest", "actuate"} & set(roles):
        from fencing.settings import SettingsError
        from fencing.signing import KeyringError, load_keyring

        try:
            load_keyring(settings)
        except KeyringError as exc:
            raise SettingsError(f"roles {','.join(sorted(roles))}: {exc}") from None


def create_app(settings: FencerSettings, roles: tuple[str, ...] = ROLES) -> faust.App:
    """Build the Faust app for these roles (all of them in one process by default)."""
    prepare_kafka(settings)
    require_signing_key(settings, roles)
    # The same role set is the same consumer group whatever the order of --roles.
    app_id = settings.group_for(roles, ROLES)
    app = faust.App(app_id, **faust_app_kwargs(settings))
    names = settings.kafka.topics
    policy = settings.policy.to_policy()
    # The gate's quiet period counts on the gate process's own clock (streams.worker_clock).
    started_at = worker_clock()
    runtime = Runtime(settings=settings, started_at=started_at)
    # Long-lived objects out of the cyclic collector's view once started and recovered.
    app.task(settle_memory)
    app.on_rebalance_complete.connect(settle_memory)

    # -- topics -------------------------------------------------------------------------
    cloudstack = app.topic(names.cloudstack, **RAW)
    host_signals = app.topic(names.host_signals, **RAW)
    probe_requests = app.topic(names.probe_requests, **RAW)
    probe_results = app.topic(names.probe_results, **RAW)
    # One partition: the global fence cap must have exactly one owner.
    fence_proposals = app.topic(names.fence_proposals, partitions=1, **RAW)
    fence_decisions = app.topic(names.fence_decisions, **RAW)
    fence_outcomes = app.topic(names.fence_outcomes, **RAW)
    notices = app.topic(names.notices, **RAW)
    host_states = app.topic(names.host_states, **RAW)
    dead_letter = app.topic(names.dead_letter, **RAW)
    # Everything that changes a host's record, keyed by host uuid and co-partitioned with `hosts`.
    by_name = {
        t.get_topic_name(): t
        for t in (
            host_signals,
            probe_requests,
            probe_results,
            fence_proposals,
            fence_decisions,
            fence_outcomes,
            notices,
            dead_letter,
        )
    }
    host_inputs = app.topic(
        names.host_signals, names.probe_results, names.fence_decisions, names.fence_outcomes, **RAW
    )

    # -- tables (changelog-backed) ------------------------------------------------------
    if "ingest" in roles:
        hosts = app.Table("hosts", help="host uuid -> the core's HostRecord + HostRef (packed)")
        # Before the store and the changelog topic exist (Faust makes both on first use).
        hosts.value_serializer = tables.host_row_serializer()  # type: ignore[attr-defined]
        gate_table = app.Table("gates", partitions=1, help="cluster uuid (and '*') -> gate state")
        gate_table.value_serializer = tables.gate_row_serializer()  # type: ignore[attr-defined]
        # The gate's rows as it wrote them, until the partitions change (streams.tables).
        gates = tables.CachedRows(gate_table)
        app.on_partitions_revoked.connect(gates.on_partitions_changed)
        app.on_partitions_assigned.connect(gates.on_partitions_changed)
        # The watch's own rows, undecoded, until the partitions change (streams.tables).
        rows = tables.RowCache(hosts)
        app.on_partitions_revoked.connect(rows.on_partitions_changed)
        app.on_partitions_assigned.connect(rows.on_partitions_changed)
        # The hosts whose partition this worker holds now (a memory store keeps others' rows).
        held = tables.HeldKeys(names.host_signals)
        app.on_partitions_revoked.connect(held.on_partitions_revoked)
        app.on_partitions_assigned.connect(held.on_partitions_assigned)
        # The gate's shared row is made whole from the cluster rows after each (re)assignment.
        # While it owns the gates partition it reads the log on (a stalled former owner's late
        # decision counts): streams.gate_tail.
        gate_sync = gating.Reconcile(source=(runtime, gates), tail=gate_tail.DecisionTail(runtime))
        app.on_partitions_revoked.connect(gate_sync.on_partitions_changed)
        app.on_partitions_assigned.connect(gate_sync.on_partitions_changed)
        app.on_rebalance_complete.connect(gate_sync.on_rebalance_complete)
    if "actuate" in roles:
        done = app.Table("actuated", help="host uuid -> {decision id: outcome}")
    if "notify" in roles:
        notified = app.Table("notified", help="host uuid -> {notification id: time}")

    async def dead(message: Any, reason: str) -> None:
        await dead_letter.send(value=codec.dead_letter(message, reason))

    async def send_notice(notice: Notice) -> None:
        await notices.send(key=notice.host.host_uuid.encode(), value=codec.dump(notice))

    # Every role's notices (the actuator's, the poller's listHosts outage, the gate's decision
    # log tail) go to the notices topic, whichever roles this worker runs.
    runtime.notice_sink = send_notice

    async def produce(topic_name: str, key: bytes, value: bytes) -> None:
        # The hot path's records straight to the app's producer (the same producer, the same
        # partitioner, flushed before each offset commit as Faust's): Faust's Topic.send builds
        # a future message and runs its sensors per record, ~half of a send's cost (issue 17).
        delivery = await app.producer.send(topic_name, key, value, None, None, None)
        # A delivery that fails after the enqueue (the broker refused it once aiokafka's retries
        # were spent) is logged as Faust's Topic.send logs it, never dropped without a word.
        delivery.add_done_callback(partial(_delivery_failed, topic_name))  # type: ignore[attr-defined]

    # -- ingest: CloudStack's event bus -> host signals ---------------------------------
    if "ingest" in roles:
        # A plain batched consumer, not a Faust agent: >99.9% of the bus is noise skipped on its
        # bytes, and offsets are committed once a batch's signals are delivered (streams.ingest).
        async def bus_send(kind: str, key: bytes | None, value: bytes) -> Any:
            return await (host_signals if kind == "signal" else dead_letter).send(
                key=key, value=value
            )

        bus = EventBusConsumer(
            ingest=runtime.ingest,
            topic=cloudstack.get_topic_name(),
            group_id=f"{app_id}.event-bus",
            previous_group=app_id,
            send=bus_send,
            make_consumer=lambda **kw: AIOKafkaConsumer(
                **aiokafka_kwargs(settings),
                # Named: on the embedded broker it tails at the idle fetch wait (tansu_compat).
                client_id="fencer-event-bus",
                # As Faust's consumer: Tansu's JoinGroup waits half the session timeout.
                session_timeout_ms=int(settings.kafka.session_timeout * 1000),
                heartbeat_interval_ms=int(settings.kafka.heartbeat_interval * 1000),
                **kw,
            ),
            dead_letter=codec.dead_letter,
            encode_signal=codec.dump,
        )
        app.fencer_event_bus = bus  # type: ignore[attr-defined]
        # The poller's memory and every ingest worker's host directory (streams.directory).
        directory_log = DirectoryLog(settings, directory_topic(app_id), runtime.directory)
        runtime.poller.log = runtime.ingest.log = directory_log
        app.fencer_directory_log = directory_log  # type: ignore[attr-defined]

        @app.task
        async def read_directory() -> None:
            # Read it now (a leader's first poll then resumes), and again whenever it stopped.
            try:
                while True:
                    if not directory_log.ready:
                        await directory_log.start()
                    await asyncio.sleep(min(settings.cloudstack.poll_interval, 10.0))
            finally:  # (the worker stops: its tasks are cancelled)
                await asyncio.shield(directory_log.stop())

        @app.task
        async def ingest() -> None:
            await bus.run()

        async def poll_hosts() -> None:
            # CloudStack publishes nothing when a host comes back Up: listHosts tells us.
            signals, sizes = await runtime.poller.poll()
            sent = []
            for s in signals:
                sent.append(
                    await host_signals.send(key=s.host.host_uuid.encode(), value=codec.dump(s))
                )
            for g in sizes:
                await fence_proposals.send(key=g.cluster_uuid.encode(), value=codec.dump(g))
            # What this poll saw is remembered only once its signals are delivered.
            await asyncio.gather(*sent)
            written = await runtime.poller.remember()
            stats = runtime.poller.stats
            if stats:  # (a failed poll was reported by the poller)
                log.info(
                    "listHosts poll: %d hosts, %d host signals, %d directory entries written%s",
                    stats["hosts"],
                    stats["signals"],
                    written,
                    "" if stats["shared_memory"] else " (no directory: this worker's own memory)",
                )

        polling = asyncio.Lock()  # one poll at a time: the start's and the timer's

        @app.timer(interval=settings.cloudstack.poll_interval, on_leader=True)
        async def poll_hosts_now() -> None:
            async with polling:
                await poll_hosts()

        @app.task
        async def first_poll() -> None:
            # Faust's timer first runs a whole poll_interval (30 s by default) after the tables
            # are recovered: a started or restarted leader polls at once instead.
            if app.is_leader():
                async with polling:
                    await poll_hosts()

        # A host gets a tick when its next check is due (streams.watch.TickSchedule), and from
        # a sweep every min(check_interval / 2, 5 s) when it had none for a while
        # (TickSchedule.sweep_wants).
        schedule = host_watch.TickSchedule(period=min(policy.check_interval / 2, 5.0))
        rechecked: set[str] = set()  # open hosts whose recheck this process wrote

        @app.timer(interval=host_watch.TICK_RESOLUTION)
        async def tick() -> None:
            # Ticks are delivered through the topic so the table is written inside a stream.
            # Stamped on the watch's own clock, as probe results arrive (streams.worker_clock).
            now = worker_clock()
            policy_for = partial(host_watch.policy_for, runtime.current)
            if schedule.sweep_due(now):
                open_hosts = set()
                # The keys from the store, each row from the watch's cache when it wrote it
                # since the last assignment (not every row decoded again, every sweep).
                for host_uuid in list(hosts.keys()):
                    if not held.held(host_uuid):
                        continue  # a row another worker owns now (memory store)
                    row = rows.get(host_uuid)
                    schedule.note(host_uuid, row, policy_for)
                    if row is not None and host_watch.wants_tick(row):
                        open_hosts.add(host_uuid)
                        if not schedule.sweep_wants(host_uuid, now):
                            continue  # ticked lately, or its own due tick is to come
                        schedule.sent(host_uuid, now)
                        tick_signal = host_watch.tick(row, now)
                        await produce(
                            names.host_signals, host_uuid.encode(), codec.dump(tick_signal)
                        )
                # The leader's next poll reports each newly open host whatever its state (it
                # may have come back while no leader polled): once per episode and process.
                rechecked.intersection_update(open_hosts)
                if open_hosts - rechecked and await directory_log.recheck(open_hosts - rechecked):
                    rechecked.update(open_hosts)
            for host_uuid in schedule.due_now(now):
                if not held.held(host_uuid):
                    continue
                row = rows.get(host_uuid)
                if row is not None and host_watch.wants_tick(row):
                    tick_signal = host_watch.tick(row, now)
                    await produce(names.host_signals, host_uuid.encode(), codec.dump(tick_signal))

        # -- watch: the per-host state machine ---------------------------------------------
        @app.agent(host_inputs)
        async def watch(stream: Any) -> None:
            async for event in stream.events():
                if event.message.topic == names.fence_decisions and not runtime.decision_is_signed(
                    event.message
                ):
                    # Only the gate's own decisions move a host's record (the actuator reports
                    # the forged record to people).
                    await dead(event.message, "a fence decision without fencer's signature")
                    continue
                parsed = codec.host_input(event.message, names)
                if parsed is None:
                    continue
                if isinstance(parsed, str):
                    await dead(event.message, parsed)
                    continue
                key = event.message.key.decode()
                held.note(key, event.message.partition)
                before = rows.get(key)
                try:
                    live = await runtime.live()
                    # A host signal's place in its partition: one read again after a restart
                    # (at or before what the row has applied) changes nothing.
                    position = (
                        (event.message.partition, event.message.offset)
                        if event.message.topic == names.host_signals
                        else None
                    )
                    row, actions = host_watch.apply(
                        before, parsed, key, policy, live, names, position
                    )
                except Exception as exc:  # a bug must not stop every other host's stream
                    log.exception("host %s: cannot apply %s", key, type(parsed.event).__name__)
                    await dead(event.message, f"watch failed: {type(exc).__name__}")
                    continue
                # An unchanged row (most ticks, repeated poll signals) is not written again: no
                # changelog record, no host-states record.
                if row is not None and row != before:
                    rows.put(key, row)
                    schedule.note(key, row, partial(host_watch.policy_for, runtime.current))
                    await produce(
                        host_states.get_topic_name(), key.encode(), host_watch.host_state(row)
                    )
                    judged = host_watch.judged_check(before, row)
                    if judged is not None:
                        obs.observe_check(judged)
                for topic_name, out_key, value in actions:
                    await produce(topic_name, out_key, value)

        # -- gate: per-cluster budget, storm guard, quiet period, pause -----------------
        @app.agent(fence_proposals)
        async def gate(stream: Any) -> None:
            async for event in stream.events():
                parsed = codec.gate_input(event.message)
                if isinstance(parsed, str):
                    await dead(event.message, parsed)
                    continue
                try:
                    await runtime.live()
                    # After an assignment the first proposal waits for the decision log's read.
                    await gate_sync.prepare(runtime, parsed, gates)
                    # The gate process's own never-stepped clock (streams.worker_clock): never
                    # the proposing worker's stamp. A record read again after a restart (at or
                    # before what its row applied) is skipped.
                    position = (event.message.partition, event.message.offset)
                    decision = gating.apply_gate(
                        gates,
                        parsed,
                        runtime,
                        now=worker_clock(),
                        position=position,
                        sync=gate_sync,
                    )
                except Exception as exc:
                    log.exception("gate: cannot judge a record")
                    await dead(event.message, f"gate failed: {type(exc).__name__}")
                    continue
                if decision is not None:
                    obs.log_decision(log, decision)
                    obs.observe_decision(decision)
                    key = decision.host.host_uuid.encode()
                    await produce(names.fence_decisions, key, codec.dump(decision))

        # The gate's owner keeps its rows on its clock (streams.gating, module rule): it takes
        # them over as soon as the decision log is read after an assignment, and refreshes the
        # shared row's clock when a minute old, also when no proposal comes. Through its own
        # agent: a table is written inside its stream.
        gate_partition = TP(fence_proposals.get_topic_name(), 0)
        clock_sent = [float("-inf")]

        @app.timer(interval=gating.CLOCK_LOOK_EVERY)
        async def gate_clock() -> None:
            if app.rebalancing or gate_partition not in app.consumer.assignment():
                return
            await gate_sync.on_rebalance_complete()  # the log's read, if due and none under way
            now = worker_clock()
            if now - clock_sent[0] < 2 * gating.KEEP_CLOCK_EVERY:
                return  # the last one asked for may not be done yet (the agent is behind)
            if gating.clock_work(gates, gate_sync, now) is None:
                return
            clock_sent[0] = now
            signal = GateSignal(kind="gate_clock", cluster_uuid=gating.GLOBAL_ROW, at=now)
            await fence_proposals.send(key=gating.GLOBAL_ROW.encode(), value=codec.dump(signal))

    # -- probe: ask a neighbour about the suspect host's storage ------------------------
    if "probe" in roles:

        @app.agent(probe_requests, concurrency=8)
        async def probe(stream: Any) -> None:
            async for value in stream:
                request = codec.load(ProbeRequest, value)
                if request is None:
                    continue
                result: ProbeResult = await runtime.run_probe(request)
                obs.observe_probe(result)
                await probe_results.send(
                    key=request.host.host_uuid.encode(), value=codec.dump(result)
                )

    # -- actuate: fence through the BMC, verify, then let CloudStack restart the VMs ----
    if "actuate" in roles:
        operator_actions = app.topic(names.operator_actions, **RAW)
        ipmi_tests = app.topic(names.ipmi_tests, **RAW)

        # A fence retries for up to actuator.fence_deadline: decisions run concurrently (one
        # lock per host inside the actuator), so one host's retries never hold up another's.
        @app.agent(fence_decisions, concurrency=16)
        async def actuate(stream: Any) -> None:
            # Read the host-states and fence-claims topics before the first decision arrives.
            await runtime.start_actuation()
            async for event in stream.events():
                # Signed, fresh, backed, confirmed, claimed: else refused (streams.actuation).
                try:
                    out = await actuating.actuate(runtime, event.message, done)
                except Exception as exc:  # a bug must not stop the stream; nothing was fenced
                    log.exception("actuate: cannot handle a decision")
                    await dead(event.message, f"actuate failed: {type(exc).__name__}")
                    continue
                for topic_name, _out_key, value in out:
                    if topic_name == names.fence_outcomes:
                        outcome = codec.load(FenceOutcome, value)
                        if outcome is not None:
                            obs.observe_outcome(outcome)
                # A failing send is retried in place, never raised out of the agent; the
                # decision read again is answered from its `done`, never acted on again.
                await actuating.send_out(out, actuating.topic_sender(by_name))

        @app.agent(operator_actions, concurrency=4)
        async def operator(stream: Any) -> None:
            # `fencer fence retry|handled HOST` and the web UI's buttons.
            async for event in stream.events():
                action = codec.load(OperatorAction, event.value)
                if action is None:
                    continue
                # A retry, lift or pin confirmation read again after a restart is not run
                # twice (streams.actuating).
                position = (event.message.partition, event.message.offset)
                stamp = actuating.record_stamp(event.message)  # read_again: which log
                if action.kind in ("ipmi_test", "bmc_pin_confirm"):
                    # The UI's "test BMC" and "confirm BMC identity": run here, never in the
                    # API process (issue #15); the pin goes to bmc-pins through this worker.
                    answer: IpmiTestAnswer | None
                    if action.kind == "ipmi_test":
                        answer = await actuating.ipmi_test(runtime, action)
                    else:
                        answer = await actuating.bmc_pin_confirm(
                            runtime, action, done, position, stamp
                        )
                    if answer is not None:
                        key = action.host_uuid.encode()
                        await ipmi_tests.send(key=key, value=codec.dump(answer))
                    continue
                outcome = await actuating.operator_action(
                    runtime, action, done, action.host_uuid, position, stamp
                )
                if outcome is not None:
                    obs.observe_outcome(outcome)
                    key = outcome.host.host_uuid.encode()
                    sent = [(names.fence_outcomes, key, codec.dump(outcome))]
                    await actuating.send_out(sent, actuating.topic_sender(by_name))

        renotify = settings.actuator.renotify_interval

        @app.timer(interval=max(0.5, min(renotify / 4, 60.0)))
        async def remind() -> None:
            # A failed fence nobody acted on is told again every renotify_interval (each
            # reminder has its own stable id: the notify table delivers it once).
            due = runtime.due_reminders(list(done.items()), time.time())
            # A host CloudStack no longer lists gets a last notice instead; its reminders end.
            for notice in await actuating.reminders_of_listed_hosts(runtime, due):
                await send_notice(notice)
            # The VMs of a host fenced before this worker (re)started are followed again.
            try:
                await actuating.resume_follows(runtime, list(done.items()))
            except Exception as exc:  # tried again at the next tick
                log.warning("cannot follow the VMs of fenced hosts again: %s", exc)

        if settings.actuator.preflight_interval > 0:
            from fencing.preflight import PreflightSchedule

            preflight_schedule = PreflightSchedule(settings.actuator.preflight_interval)

            @app.timer(interval=preflight_schedule.tick, on_leader=True)
            async def preflight() -> None:
                # Read every BMC soon after this worker leads, then every preflight_interval
                # (new hosts sooner): pinned while Up, a wrong password found before a fence.
                for notice in await actuating.preflight(runtime, preflight_schedule):
                    await notices.send(key=notice.host.host_uuid.encode(), value=codec.dump(notice))

    # -- notify: email and SNMP for every step ------------------------------------------
    if "notify" in roles:
        # Each record is delivered before its offset is committed (at least once). One agent
        # per channel, each reading every record: a peer that is down holds its own channel's
        # agent only (review4: with one agent for all, a mail server down held four records,
        # then nothing more was read and no trap went out either); the other channels' agents
        # read on (Faust buffers each agent's records).
        def notify_agent(channel: str | None, index: int) -> None:
            @app.agent(
                app.topic(names.fence_decisions, names.fence_outcomes, names.notices, **RAW),
                name=f"notify-{index}",
                concurrency=4,
            )
            async def notify(stream: Any) -> None:
                async for event in stream.events():
                    if (
                        event.message.topic == names.fence_decisions
                        and not runtime.decision_is_signed(event.message, required=False)
                    ):
                        continue  # a forged decision is told as a forged_record notice
                    record = codec.notifiable(event.message, names)
                    if record is not None:
                        key = event.message.key.decode()
                        await runtime.notify(record, notified, key, channel=channel)

        channels = runtime.notifier().channel_keys()
        if not channels:
            log.warning("the notify role has no channel enabled (email, snmp): nothing is sent")
        for index, channel in enumerate(channels or [None]):
            notify_agent(channel, index)

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def close_clients(app: faust.App, **kwargs: Any) -> None:
        if "ingest" in roles:
            await bus.stop()
            await directory_log.stop()
            if gate_sync.tail is not None:
                await gate_sync.tail.stop()
        await runtime.close()

    app.fencer_runtime = runtime  # type: ignore[attr-defined]
    return app
