"""Run real fencer workers and talk to their topics: the glue the demo and the end-to-end tests
share. Workers are `fencer worker` subprocesses (as an operator runs them), so killing one is a
real crash and a restart is a real changelog recovery."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pydantic import BaseModel, SecretStr

from fencing.settings import FencerSettings
from streams.broker import die_with_parent
from streams.kafka import aiokafka_kwargs, prepare_kafka


def _reveal(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {k: _reveal(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_reveal(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    return value


def write_settings(settings: FencerSettings, path: Path) -> Path:
    """The settings as a YAML file a worker can load (mode 0600: it holds the lab's secrets)."""
    data = _reveal(settings.model_dump(mode="python"))
    path.touch(mode=0o600)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class WorkerProcess:
    """One `fencer worker` subprocess."""

    def __init__(
        self, settings_file: Path, roles: str = "all", log_file: Path | None = None
    ) -> None:
        self.settings_file = settings_file
        self.roles = roles
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        """Start it (returns at once; the worker needs a few seconds to join its group)."""
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        parent = os.getpid()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streams.cli",
                "worker",
                "-c",
                str(self.settings_file),
                "--roles",
                self.roles,
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            # A worker never outlives the demo or test that started it, however that ends.
            preexec_fn=lambda: die_with_parent(parent),
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """A crash: SIGKILL, no clean shutdown."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        """A clean stop: SIGTERM, then SIGKILL after `timeout`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


class Tap:
    """A producer and a tail of fencer's topics, for the demo's timeline and the tests."""

    def __init__(self, settings: FencerSettings) -> None:
        prepare_kafka(settings)
        self.settings = settings
        self.records: dict[str, list[tuple[str | None, dict[str, Any]]]] = {}
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self.on_record: Callable[[str, str | None, dict[str, Any]], Any] | None = None

    async def start(self, topics: list[str]) -> Tap:
        """Start producing, and tail `topics` from their beginning."""
        kw = aiokafka_kwargs(self.settings)
        self._producer = AIOKafkaProducer(**kw)
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            *topics, auto_offset_reset="earliest", enable_auto_commit=False, group_id=None, **kw
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._tail())
        return self

    async def _tail(self) -> None:
        assert self._consumer is not None
        async for msg in self._consumer:
            key = msg.key.decode() if msg.key else None
            try:
                value = json.loads(msg.value)
            except ValueError:
                value = {"_raw": msg.value.decode("utf-8", "replace")}
            self.records.setdefault(msg.topic, []).append((key, value))
            if self.on_record is not None:
                result = self.on_record(msg.topic, key, value)
                if asyncio.iscoroutine(result):
                    await result
            self._changed.set()

    async def send(
        self, topic: str, key: str | bytes | None, value: bytes | str | BaseModel
    ) -> None:
        """Produce one record and wait for the broker's ack."""
        assert self._producer is not None
        if isinstance(value, BaseModel):
            value = value.model_dump_json()
        if isinstance(value, str):
            value = value.encode()
        if isinstance(key, str):
            key = key.encode()
        await self._producer.send_and_wait(topic, value=value, key=key)

    def of(self, topic: str) -> list[tuple[str | None, dict[str, Any]]]:
        """Every record seen on `topic` so far."""
        return self.records.get(topic, [])

    async def wait_for(
        self, predicate: Callable[[], Any], timeout: float, what: str = "condition"
    ) -> Any:
        """Wait until `predicate()` is truthy; raise TimeoutError naming `what`."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
            except TimeoutError:
                pass

    async def stop(self) -> None:
        """Stop tailing and producing."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()
