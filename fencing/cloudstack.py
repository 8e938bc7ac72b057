"""The one CloudStack API client of fencer, and the one mapping of a listHosts row to a HostRef.

Rule: every call to the management server goes through `CloudStack`: requests signed by the
`cs` package (its async client, one aiohttp session per client until `close()`), one TLS
convention (`cloudstack.verify_tls: false` turns certificate checks off, nothing else does),
every page of a list fetched and checked whole (`_list`), an optional short cache for the UI,
one deadline per command.
A failure raises `CloudStackError` whose text is safe to log and publish: it names the command,
CloudStack's own error code and text, or the failure's type and the endpoint's host and port;
never the request URL (it carries the API key and the signature), never a key.

Exceptions::

    CloudStackError          any failure; str() is safe anywhere
    ├── CloudStackApiError   CloudStack answered with an error (`code`, `text`)
    └── CloudStackUnreachable no usable answer: transport error, TLS refusal or timeout

Probes, the actuator, the streams worker and the web UI use this module; it imports only the
settings and record models of `fencing`, so the import graph stays one-way.
"""

from __future__ import annotations

import asyncio
import math
import ssl
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from cs import AIOCloudStack, CloudStackApiException, CloudStackException

from fencing.records import HostRef
from fencing.settings import CloudStackSettings, FencerSettings

Row = dict[str, Any]
Rows = list[Row]  # (inside the class, `list` is the method)
PAGE_SIZE = 500  # rows asked per page of a list (the `cs` client's and CloudStack's default)
LIST_TRIES = 3  # readings of a list whose rows moved between pages before giving up


class CloudStackError(Exception):
    """CloudStack could not answer what was asked; the message is safe to publish."""

    def __init__(self, message: str, command: str = "") -> None:
        super().__init__(message)
        self.command = command


class CloudStackApiError(CloudStackError):
    """CloudStack answered with an error of its own."""

    def __init__(self, command: str, code: int | str, text: str) -> None:
        super().__init__(f"CloudStack {command} failed ({code}): {text}", command)
        self.code, self.text = code, text


class CloudStackUnreachable(CloudStackError):
    """No usable answer: the endpoint refused, TLS failed, or the deadline passed."""


def host_from_api(row: Row) -> HostRef:
    """A listHosts row -> HostRef (the one mapping fencer has; names kept when CloudStack
    gives them, empty strings read as absent)."""
    uuid = row.get("id")
    if not uuid:
        raise CloudStackError("CloudStack listHosts: a host row has no id", "listHosts")
    return HostRef(
        host_uuid=str(uuid),
        host_name=row.get("name") or None,
        cluster_uuid=row.get("clusterid") or None,
        cluster_name=row.get("clustername") or None,
        zone_uuid=row.get("zoneid") or None,
        zone_name=row.get("zonename") or None,
        ip_address=row.get("ipaddress") or None,
    )


class CloudStack:
    """Signed calls to the configured management server; `async with` or `close()` when done.

    `ttl` > 0 keeps each list answer (per command and parameters) that many seconds (the UI
    asks for the same host list many times a second); `retries` retries list and job queries
    after a connection error, with the `cs` client's exponential backoff."""

    def __init__(
        self,
        settings: CloudStackSettings | FencerSettings,
        *,
        ttl: float = 0.0,
        retries: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings.cloudstack if isinstance(settings, FencerSettings) else settings
        self.where = urlsplit(self.settings.endpoint).netloc or self.settings.endpoint
        self._ttl = ttl
        self._retries = retries
        self._clock = clock
        self._api: AIOCloudStack | None = None
        self._cache: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[float, Rows]] = {}
        self._lock = asyncio.Lock()

    @property
    def deadline(self) -> float:
        """Seconds one command may take in all (every page of a list included)."""
        return self.settings.timeout * 3

    async def _client(self) -> AIOCloudStack:
        if self._api is None:
            c = self.settings
            self._api = AIOCloudStack(
                c.endpoint,
                key=c.api_key.get_secret_value(),
                secret=c.secret_key.get_secret_value(),
                timeout=max(1, math.ceil(c.timeout)),
                retry=self._retries,
                # The one TLS convention: verify unless the file says verify_tls: false.
                verify=c.verify_tls,
                dangerous_no_tls_verify=not c.verify_tls,
                fetch_result=False,
            )
            await self._api.__aenter__()  # one shared aiohttp session until close()
        return self._api

    async def close(self) -> None:
        """Close the HTTP session (a later call opens a new one)."""
        if self._api is not None:
            api, self._api = self._api, None
            await api.close()

    async def __aenter__(self) -> CloudStack:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def list(self, command: str, **params: Any) -> Rows:
        """Every page of a list command (from the cache while it is younger than `ttl`)."""
        if self._ttl <= 0:
            return await self._list(command, params)
        key = (command, tuple(sorted((k, str(v)) for k, v in params.items())))
        async with self._lock:
            hit = self._cache.get(key)
            if hit is not None and self._clock() - hit[0] < self._ttl:
                return list(hit[1])
            rows = await self._list(command, params)
            self._cache[key] = (self._clock(), rows)
            return list(rows)

    async def _list(self, command: str, params: dict[str, Any]) -> Rows:
        """Every page, whole: listed again while the rows moved between pages (the count changed,
        a row came twice, or a page ended before the count), then an error, never fewer rows
        than CloudStack counts (a VM left out of listVirtualMachines would be a disk never read,
        a host left out of listHosts one never polled)."""
        try:
            async with asyncio.timeout(self.deadline):
                why = ""
                for _ in range(LIST_TRIES):
                    rows, why = await self._pages(command, params)
                    if not why:
                        return rows
        except TimeoutError:
            raise CloudStackUnreachable(
                f"CloudStack {command}: no answer from {self.where} within "
                f"{self.deadline:g} s (cloudstack.timeout)",
                command,
            ) from None
        raise CloudStackError(
            f"CloudStack {command}: no whole list in {LIST_TRIES} readings ({why})", command
        )

    async def _pages(self, command: str, params: dict[str, Any]) -> tuple[Rows, str]:
        """One reading of every page: the rows, and why they are not the whole list ('' when
        they are)."""
        rows: Rows = []
        ids: set[str] = set()
        counts: set[int] = set()
        page = 1
        while True:
            answer = await self._run(
                command, {**params, "page": page, "pagesize": PAGE_SIZE}, fetch_list=False
            )
            items = [k for k in answer if k != "count"]
            if len(items) > 1 or (items and not isinstance(answer[items[0]], list)):
                raise CloudStackError(f"CloudStack {command}: unexpected answer", command)
            chunk = [r for r in answer[items[0]] if isinstance(r, dict)] if items else []
            count = answer.get("count")
            if isinstance(count, int):
                counts.add(count)
            for row in chunk:
                key = row.get("id")
                if isinstance(key, str):
                    if key in ids:
                        return rows, f"{key} came twice"
                    ids.add(key)
                rows.append(row)
            if len(counts) > 1:
                return rows, f"the count changed from {min(counts)} to {max(counts)}"
            total = next(iter(counts), None)
            if not chunk or len(chunk) < PAGE_SIZE or (total is not None and len(rows) >= total):
                break
            page += 1
        if total is not None and len(rows) != total:
            return rows, f"{len(rows)} rows of the {total} counted"
        return rows, ""

    async def call(self, command: str, **params: Any) -> Row:
        """One command, its answer as CloudStack gives it (an async command's `jobid` is not
        followed: see `queryAsyncJobResult`)."""
        result = await self._run(command, params, fetch_list=False)
        if not isinstance(result, dict):
            raise CloudStackError(f"CloudStack {command}: unexpected answer", command)
        return result

    async def _run(self, command: str, params: dict[str, Any], *, fetch_list: bool) -> Any:
        try:
            async with asyncio.timeout(self.deadline):
                api = await self._client()
                return await getattr(api, command)(fetch_list=fetch_list, **params)
        except CloudStackApiException as exc:
            err = exc.error if isinstance(exc.error, dict) else {}
            code = err.get("errorcode", "?")
            text = str(err.get("errortext") or "error")
            raise CloudStackApiError(command, code, text) from None
        except CloudStackException as exc:
            # cs's own messages ("HTTP 502 response from CloudStack") name no URL; its second
            # argument can name the endpoint and the parser's complaint: left out.
            first = str(exc.args[0]) if exc.args else type(exc).__name__
            raise CloudStackError(f"CloudStack {command} failed: {first}", command) from None
        except TimeoutError:
            raise CloudStackUnreachable(
                f"CloudStack {command}: no answer from {self.where} within "
                f"{self.deadline:g} s (cloudstack.timeout)",
                command,
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            # aiohttp's texts can carry the request URL: the type and the host:port only.
            raise CloudStackUnreachable(
                f"CloudStack {command}: cannot reach {self.where} ({_why(exc)})", command
            ) from None


def _why(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError) or isinstance(
        exc, ssl.SSLCertVerificationError
    ):
        return "TLS certificate not trusted; cloudstack.verify_tls"
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return f"TLS failed: {type(exc).__name__}"
    return type(exc).__name__
