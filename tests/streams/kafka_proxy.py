"""A Kafka-aware loopback proxy in front of the embedded broker, for faults a real network
makes: requests of some kinds dropped while the others pass (tests of streams.gate_tail and
streams.actuating)."""

from __future__ import annotations

import asyncio
from typing import Any

from streams.broker import EmbeddedBroker

PRODUCE = 0  # Kafka's API keys
FETCH = 1


class KafkaProxy:
    """A loopback TCP proxy in front of a broker that advertises it (every client connection
    goes through it), reading Kafka's request frames (4-byte size, then the API key): with
    the API keys in `drop` it closes a connection when such a request comes (a broker, a
    firewall or a load balancer that lets metadata through and breaks reads, or writes).
    aiokafka then reconnects and sends again without a word: a consumer stays connected and
    never reads (FETCH), a producer's records wait, then expire (PRODUCE)."""

    def __init__(self) -> None:
        self.upstream = 0
        self.drop: set[int] = set()
        self.dropped = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in list(self.writers):
                w.close()
            await self.server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_w}

        async def requests() -> None:
            while True:
                head = await reader.readexactly(4)
                body = await reader.readexactly(int.from_bytes(head, "big"))
                if int.from_bytes(body[:2], "big") in self.drop:
                    self.dropped += 1
                    return
                up_w.write(head + body)
                await up_w.drain()

        async def answers() -> None:
            while data := await up_r.read(65536):
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.ensure_future(requests()), asyncio.ensure_future(answers())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for w in (writer, up_w):
                w.close()
                self.writers.discard(w)


class ProxiedBroker(EmbeddedBroker):
    """The embedded broker (Tansu) advertising `proxy`: clients reach it only through it."""

    def __init__(self, proxy: KafkaProxy) -> None:
        super().__init__()
        self.proxy = proxy

    def _spawn(self, port: int) -> Any:
        # EmbeddedBroker._spawn with the proxy as the advertised listener.
        import os
        import subprocess

        from streams.broker import die_with_parent, tansu_binary

        self.proxy.upstream = port
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RUST_", "TANSU_"))}
        env["RUST_LOG"] = self.log_level
        argv = [
            str(tansu_binary()),
            "broker",
            "--cluster-id",
            self.cluster_id,
            "--listener-url",
            f"tcp://127.0.0.1:{port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{self.proxy.port}",
            "--storage-engine",
            "memory://tansu/",
        ]
        parent = os.getpid()
        return subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=2,
            start_new_session=True,
            preexec_fn=lambda: die_with_parent(parent),
        )

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.proxy.port}"
