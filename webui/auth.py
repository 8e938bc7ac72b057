"""Who is calling: API tokens (kept only as SHA-256 hashes), the client's address (through the
reverse proxies the operator trusts), whether the request came over TLS, and the per-client
limit on failed logins.

Rules: a presented token is hashed and compared with every configured hash in constant time;
the process never keeps a token in clear (`api.token` from the file is hashed at start).
`X-Forwarded-Proto` and `X-Forwarded-For` count only when the peer is in `api.trusted_proxies`.
A client that fails `api.login_max_failures` times in `api.login_window` seconds is refused
(429) until the window has passed; the first refusal of a burst is reported once.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from fencing.settings import ApiSettings

DEFAULT_TOKEN_NAME = "api.token"  # noqa: S105 - a name, not a token


def hash_token(token: str) -> str:
    """`sha256:<hex>` of a token, as `api.tokens` holds it."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenBook:
    """Token hashes by name; never a token in clear."""

    hashes: tuple[tuple[str, bytes], ...]

    @classmethod
    def from_settings(cls, api: ApiSettings) -> TokenBook:
        """`api.tokens` plus `api.token` (hashed here, named api.token)."""
        items = [(name, value) for name, value in api.tokens.items()]
        if api.token is not None and api.token.get_secret_value():
            items.append((DEFAULT_TOKEN_NAME, hash_token(api.token.get_secret_value())))
        return cls(tuple((name, value.encode()) for name, value in items))

    def __bool__(self) -> bool:
        return bool(self.hashes)

    def who(self, presented: str) -> str | None:
        """The name of the token presented, or None; every hash is compared (constant time)."""
        digest = hash_token(presented.strip()).encode()
        found = None
        for name, value in self.hashes:
            if hmac.compare_digest(digest, value):
                found = name
        return found

    def __repr__(self) -> str:
        return f"TokenBook({', '.join(n for n, _ in self.hashes)})"


def _in(networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network], addr: str | None) -> bool:
    if not addr:
        return False
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return False
    return any(ip in n for n in networks)


class ProxyRules:
    """What a request says about its client, believed only from trusted proxies."""

    def __init__(self, trusted: list[str]) -> None:
        self.networks = [ipaddress.ip_network(p, strict=False) for p in trusted]

    def from_proxy(self, request: web.Request) -> bool:
        """Whether the peer is a trusted proxy."""
        return _in(self.networks, request.remote)

    def is_tls(self, request: web.Request) -> bool:
        """TLS here, or at a trusted proxy that says so in X-Forwarded-Proto."""
        if request.secure:
            return True
        if not self.from_proxy(request):
            return False
        proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
        return proto == "https"

    def client(self, request: web.Request) -> str:
        """The client's address: the peer, or the last untrusted hop of X-Forwarded-For."""
        peer = request.remote or "unknown"
        if not self.from_proxy(request):
            return peer
        hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",")]
        for hop in reversed([h for h in hops if h]):
            if not _in(self.networks, hop):
                return hop[:64]
        return peer


@dataclass
class LoginLimiter:
    """Failed logins per client in a sliding window."""

    max_failures: int
    window: float
    clock: Callable[[], float] = time.monotonic
    failures: dict[str, deque[float]] = field(default_factory=dict)
    reported: dict[str, float] = field(default_factory=dict)  # client -> burst start reported
    max_clients: int = 10000

    def _recent(self, client: str) -> deque[float]:
        now = self.clock()
        q = self.failures.get(client)
        if q is None:
            return deque()
        while q and q[0] <= now - self.window:
            q.popleft()
        if not q:
            self.failures.pop(client, None)
            self.reported.pop(client, None)
        return q

    def retry_after(self, client: str) -> float | None:
        """Seconds until this client may try again, or None if it may now."""
        q = self._recent(client)
        if len(q) < self.max_failures:
            return None
        return max(1.0, q[0] + self.window - self.clock())

    def failed(self, client: str) -> bool:
        """Count a failure; True when this failure starts a burst (report it, once)."""
        if len(self.failures) >= self.max_clients and client not in self.failures:
            self.failures.pop(next(iter(self.failures)))
        q = self._recent(client)
        q.append(self.clock())
        self.failures[client] = q
        if len(q) >= self.max_failures and client not in self.reported:
            self.reported[client] = q[0]
            return True
        return False

    def succeeded(self, client: str) -> None:
        """A good login clears the client's count."""
        self.failures.pop(client, None)
        self.reported.pop(client, None)
