"""A SASL-speaking gate in front of the embedded broker (Tansu has no working SASL).

It speaks the broker's side of Kafka's SASL exchange (SaslHandshake, SaslAuthenticate) for PLAIN,
SCRAM-SHA-256 and SCRAM-SHA-512 (RFC 5802/7677: salted password, client proof, server
signature), over TLS with a required client certificate if given an SSL context, then pipes the
authenticated connection to the broker. ApiVersions before authentication is forwarded (Kafka
allows it); any other request before authentication closes the connection. It records who
authenticated (user, mechanism, certificate CN) and every refusal.

With `allow` set, it also enforces topic ACLs on the two requests that move records: every
Produce (Write) and Fetch (Read) is decoded (aiokafka's own request classes) and checked against
`allow(user, operation, topic)`; a denied one is recorded and its connection closed, as Kafka
refuses it. Other requests (metadata, groups, offsets) pass unchecked.

This tests fencer's clients (aiokafka and Faust as fencer configures them) against a real SASL
exchange and a per-principal topic table; it is not Kafka's authenticator nor its authorizer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka.protocol import admin, fetch, produce

API_VERSIONS, SASL_HANDSHAKE, SASL_AUTHENTICATE = 18, 17, 36
UNSUPPORTED_SASL_MECHANISM, ILLEGAL_SASL_STATE, SASL_AUTHENTICATION_FAILED = 33, 34, 58
ITERATIONS = 4096


async def read_frame(r: asyncio.StreamReader) -> bytes:
    (n,) = struct.unpack(">i", await r.readexactly(4))
    return await r.readexactly(n)


def frame(correlation_id: int, body: bytes) -> bytes:
    payload = struct.pack(">i", correlation_id) + body
    return struct.pack(">i", len(payload)) + payload


class Scram:
    """The server side of one SCRAM exchange."""

    def __init__(self, mechanism: str, users: dict[str, str]) -> None:
        self.hash = hashlib.sha256 if mechanism == "SCRAM-SHA-256" else hashlib.sha512
        self.name = "sha256" if mechanism == "SCRAM-SHA-256" else "sha512"
        self.users = users
        self.user: str | None = None
        self.salt = os.urandom(16)
        self.first_bare = ""
        self.server_first = ""
        self.nonce = ""

    def _hmac(self, key: bytes, msg: bytes) -> bytes:
        return hmac.new(key, msg, self.hash).digest()

    def first(self, client_first: bytes) -> bytes:
        text = client_first.decode()
        gs2, _, bare = text.partition(",,")  # "n,,n=user,r=nonce"
        if gs2 != "n" and not gs2.startswith("n,"):
            raise ValueError("channel binding is not supported")
        attrs = dict(a.split("=", 1) for a in bare.split(","))
        self.user = attrs["n"].replace("=2C", ",").replace("=3D", "=")
        self.first_bare = bare
        self.nonce = attrs["r"] + base64.b64encode(os.urandom(18)).decode()
        self.server_first = (
            f"r={self.nonce},s={base64.b64encode(self.salt).decode()},i={ITERATIONS}"
        )
        return self.server_first.encode()

    def final(self, client_final: bytes) -> bytes | None:
        """The server-final message, or None if the proof is wrong."""
        text = client_final.decode()
        without_proof, _, proof_attr = text.rpartition(",p=")
        attrs = dict(a.split("=", 1) for a in without_proof.split(","))
        if attrs.get("r") != self.nonce or self.user not in self.users:
            return None
        salted = hashlib.pbkdf2_hmac(
            self.name, self.users[self.user].encode(), self.salt, ITERATIONS
        )
        client_key = self._hmac(salted, b"Client Key")
        stored_key = self.hash(client_key).digest()
        auth_message = f"{self.first_bare},{self.server_first},{without_proof}".encode()
        signature = self._hmac(stored_key, auth_message)
        proof = base64.b64decode(proof_attr)
        recovered = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(self.hash(recovered).digest(), stored_key):
            return None
        server_key = self._hmac(salted, b"Server Key")
        return f"v={base64.b64encode(self._hmac(server_key, auth_message)).decode()}".encode()


@dataclass
class SaslGate:
    """Listens on `port` (TLS with a required client certificate if `tls` is given)."""

    port: int
    upstream_port: int
    users: dict[str, str]
    tls: ssl.SSLContext | None = None
    mechanisms: tuple[str, ...] = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
    authenticated: list[tuple[str, str, str | None]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    allow: Callable[[str, str, str], bool] | None = None
    accesses: set[tuple[str, str, str]] = field(default_factory=set)  # (user, op, topic)
    violations: list[tuple[str, str, str]] = field(default_factory=list)
    undecoded: list[str] = field(default_factory=list)
    _server: Any = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def start(self) -> SaslGate:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self.tls)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        cn = None
        peer = w.get_extra_info("peercert")
        if peer:
            cn = dict(x[0] for x in peer["subject"]).get("commonName")
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            w.close()
            return
        try:
            user = await self._authenticate(r, w, up_r, up_w, cn)
            if user is None:
                return
            if self.allow is None:
                await asyncio.gather(self._pipe(r, up_w), self._pipe(up_r, w))
            else:
                await asyncio.gather(self._checked(r, up_w, user), self._pipe(up_r, w))
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            for writer in (w, up_w):
                with contextlib.suppress(Exception):
                    writer.close()
            self._tasks.discard(task)

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        finally:
            with contextlib.suppress(Exception):
                w.close()

    def _topics(self, api_key: int, version: int, body: bytes) -> tuple[str, list[str]] | None:
        """(operation, topics) of a Produce or Fetch request; None for any other request."""
        if api_key not in (0, 1):
            return None
        if api_key == 0:
            module, name, op = produce, "ProduceRequest", "Write"
        else:
            module, name, op = fetch, "FetchRequest", "Read"
        cls = getattr(module, f"{name}_v{version}", None)
        if cls is None:
            self.undecoded.append(f"{name} v{version}")
            return op, []
        return op, [t[0] for t in cls.decode(body).topics]

    async def _checked(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, user: str) -> None:
        assert self.allow is not None
        try:
            while True:
                request = await read_frame(r)
                api_key, version, _corr = struct.unpack(">hhi", request[:8])
                (cid_len,) = struct.unpack(">h", request[8:10])
                found = self._topics(api_key, version, request[10 + max(cid_len, 0) :])
                if found is not None:
                    op, topics = found
                    for topic in topics:
                        self.accesses.add((user, op, topic))
                        if not self.allow(user, op, topic):
                            self.violations.append((user, op, topic))
                            return  # Kafka answers TOPIC_AUTHORIZATION_FAILED; here: closed
                w.write(struct.pack(">i", len(request)) + request)
                await w.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            with contextlib.suppress(Exception):
                w.close()

    async def _authenticate(
        self,
        r: asyncio.StreamReader,
        w: asyncio.StreamWriter,
        up_r: asyncio.StreamReader,
        up_w: asyncio.StreamWriter,
        cn: str | None,
    ) -> str | None:
        mechanism: str | None = None
        scram: Scram | None = None
        while True:
            request = await read_frame(r)
            api_key, version, corr = struct.unpack(">hhi", request[:8])
            (cid_len,) = struct.unpack(">h", request[8:10])
            body = request[10 + max(cid_len, 0) :]
            if api_key == API_VERSIONS:
                up_w.write(struct.pack(">i", len(request)) + request)
                await up_w.drain()
                response = await read_frame(up_r)
                w.write(struct.pack(">i", len(response)) + response)
                await w.drain()
                continue
            if api_key == SASL_HANDSHAKE:
                (n,) = struct.unpack(">h", body[:2])
                mechanism = body[2 : 2 + n].decode()
                ok = mechanism in self.mechanisms
                cls = admin.SaslHandShakeResponse_v1 if version else admin.SaslHandShakeResponse_v0
                resp = cls(
                    error_code=0 if ok else UNSUPPORTED_SASL_MECHANISM,
                    enabled_mechanisms=list(self.mechanisms),
                )
                w.write(frame(corr, resp.encode()))
                await w.drain()
                if not ok:
                    self.refused.append(f"mechanism {mechanism}")
                    return None
                if mechanism.startswith("SCRAM-"):
                    scram = Scram(mechanism, self.users)
                continue
            if api_key == SASL_AUTHENTICATE and mechanism is not None:
                (n,) = struct.unpack(">i", body[:4])
                token = body[4 : 4 + n]
                user, reply, done = self._step(mechanism, scram, token)
                cls = (
                    admin.SaslAuthenticateResponse_v1
                    if version
                    else admin.SaslAuthenticateResponse_v0
                )
                fields: dict[str, Any] = {
                    "error_code": 0 if reply is not None else SASL_AUTHENTICATION_FAILED,
                    "error_message": None if reply is not None else "Authentication failed",
                    "sasl_auth_bytes": reply or b"",
                }
                if version:
                    fields["session_lifetime_ms"] = 0
                w.write(frame(corr, cls(**fields).encode()))
                await w.drain()
                if reply is None:
                    self.refused.append(f"{mechanism} user {user}: wrong password")
                    return None
                if done:
                    assert user is not None
                    self.authenticated.append((user, mechanism, cn))
                    return user
                continue
            self.refused.append(f"api key {api_key} before authentication")
            return None

    def _step(
        self, mechanism: str, scram: Scram | None, token: bytes
    ) -> tuple[str | None, bytes | None, bool]:
        """(user, reply or None if refused, done)."""
        if mechanism == "PLAIN":
            _authz, user, password = token.decode().split("\0")
            ok = user in self.users and hmac.compare_digest(self.users[user], password)
            return user, (b"" if ok else None), True
        assert scram is not None
        if not scram.first_bare:
            try:
                return scram.user, scram.first(token), False
            except (ValueError, KeyError):
                return None, None, True
        final = scram.final(token)
        return scram.user, final, True
