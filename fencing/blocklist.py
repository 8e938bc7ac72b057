"""Storage fencing for Ceph RBD: blocklist a host's address, verify it took, lift it.

Rule: only this module runs `ceph osd blocklist`, with its own key (`rbd.fence_user`, caps
`mon 'allow r, allow command "osd blocklist"' osd 'profile rbd-read-only'`), on the worker that
holds it; the probe's key cannot blocklist. A blocklist entry `IP:0/0` cuts every client of
that IP off every OSD: their watches drop at once and their writes fail (errno 108), whether or
not the host's BMC answers. So a blocklist is never silent and never lifted silently: `lift` is
an operator's action.

`verify` says a blocklist holds only when BOTH the address is listed (`ceph osd blocklist ls`)
AND none of the given images shows a watcher from that IP (`rbd status`); anything it cannot
read is a failed verification with the reason, never a success.

Wired into the actuator's ladder by fencing.storage_fence (setting `storage_fence`: blocklist
before the BMC action, or as its fallback); `fencer rbd lift HOST` is the operator's lift; see
docs/operators-guide.md.

Errors::

    BlocklistError        a ceph command failed or did not answer; the message names it
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import math
from dataclasses import dataclass
from typing import Any

from fencing.settings import RbdSettings

_SPEC_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-/")


class BlocklistError(Exception):
    """A ceph command failed or did not answer; the message names the command, never a key."""


@dataclass(frozen=True)
class Verification:
    """Whether a blocklist of `address` holds for `images`, and why not."""

    address: str
    listed: bool
    watchers: tuple[str, ...]  # "<image> <watcher address>" of the host still watching
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Listed, and no image watched from the address any more."""
        return self.listed and not self.watchers and self.error is None

    @property
    def detail(self) -> str:
        """One line for notices and logs."""
        if self.error:
            return f"blocklist of {self.address} not verified: {self.error}"
        if not self.listed:
            return f"blocklist of {self.address} not verified: not in `ceph osd blocklist ls`"
        if self.watchers:
            return f"blocklist of {self.address} not verified: still watching {self.watchers[0]}"
        return f"blocklist of {self.address} verified: listed, no watcher left"


def entry_for(address: str) -> str:
    """The blocklist entry covering every client of an IP (`1.2.3.4:0/0`, `[fd00::1]:0/0`)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"blocklist address: not an IP address: {address[:60]!r}") from None
    return f"[{ip}]:0/0" if ip.version == 6 else f"{ip}:0/0"


def parse_ls(stdout: str) -> list[dict[str, Any]]:
    """`ceph osd blocklist ls --format json` prints a leading newline and TWO concatenated
    arrays (addresses, then ranges), not one JSON document: every entry of both."""
    decoder = json.JSONDecoder()
    text, pos = stdout, 0
    out: list[dict[str, Any]] = []
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return out
        try:
            doc, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise BlocklistError(f"ceph osd blocklist ls: unreadable answer ({exc.msg})") from None
        if isinstance(doc, list):
            out.extend(d for d in doc if isinstance(d, dict))


def _ip_of(watcher: str) -> str:
    addr = watcher.split("/", 1)[0]
    for proto in ("v1:", "v2:", "any:"):
        addr = addr.removeprefix(proto)
    host = addr.rsplit(":", 1)[0].strip("[]") if ":" in addr else addr
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


class Blocklister:
    """`blocklist`, `verify`, `lift` through the Ceph CLI on this worker, with the fence key."""

    def __init__(self, settings: RbdSettings) -> None:
        self.settings = settings

    async def _ceph(self, tool: str, *args: str) -> str:
        s = self.settings
        t = s.connect_timeout
        argv = [tool, "--conf", s.fence_conf, "--id", s.fence_user, "--keyring", s.fence_keyring]
        if tool == "ceph":
            argv += ["--connect-timeout", f"{math.ceil(t)}"]
        else:
            argv += ["--client_mount_timeout", f"{t:g}", "--rados_osd_op_timeout", f"{t:g}"]
        argv += list(args)
        what = f"{tool} {' '.join(a for a in args if not a.startswith('-'))}"
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise BlocklistError(f"{what}: cannot run {tool} ({exc.strerror})") from None
        try:
            async with asyncio.timeout(t * 2 + 10):
                out, err = await proc.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise BlocklistError(f"{what}: no answer within {t * 2 + 10:g} s") from None
        if proc.returncode != 0:
            lines = err.decode(errors="replace").strip().splitlines()
            raise BlocklistError(
                f"{what}: exit {proc.returncode}: {lines[-1][:200] if lines else ''}"
            )
        return out.decode(errors="replace")

    async def blocklist(self, address: str, expire_seconds: float) -> str:
        """Cut every client of `address` off the cluster for `expire_seconds`; the entry."""
        entry = entry_for(address)
        if expire_seconds <= 0:
            raise ValueError("blocklist expire_seconds: must be positive")
        await self._ceph("ceph", "osd", "blocklist", "add", entry, f"{math.ceil(expire_seconds)}")
        return entry

    async def listed(self) -> list[dict[str, Any]]:
        """Every blocklist entry (`addr`, `until`)."""
        return parse_ls(await self._ceph("ceph", "osd", "blocklist", "ls", "--format", "json"))

    async def verify(self, address: str, images: list[str]) -> Verification:
        """Listed, and none of `images` (`pool/image`) watched from `address` any more."""
        entry = entry_for(address)
        ip = entry.rsplit(":", 1)[0].strip("[]")
        try:
            listed = any(e.get("addr") == entry for e in await self.listed())
            still: list[str] = []
            for spec in images:
                if not spec or not set(spec) <= _SPEC_CHARS or spec.startswith("-"):
                    raise BlocklistError(f"not an RBD image spec: {spec[:80]!r}")
                status = json.loads(await self._ceph("rbd", "status", "--format", "json", spec))
                still += [
                    f"{spec} {w.get('address')}"
                    for w in status.get("watchers", [])
                    if _ip_of(str(w.get("address", ""))) == ip
                ]
        except (BlocklistError, json.JSONDecodeError, AttributeError) as exc:
            return Verification(entry, False, (), error=str(exc) or type(exc).__name__)
        return Verification(entry, listed, tuple(still))

    async def watchers(self, images: list[str]) -> list[str]:
        """`<image> <watcher address>` of every watcher of `images`, from any address."""
        out: list[str] = []
        for spec in images:
            if not spec or not set(spec) <= _SPEC_CHARS or spec.startswith("-"):
                raise BlocklistError(f"not an RBD image spec: {spec[:80]!r}")
            try:
                status = json.loads(await self._ceph("rbd", "status", "--format", "json", spec))
                out += [f"{spec} {w.get('address')}" for w in status.get("watchers", [])]
            except (json.JSONDecodeError, AttributeError) as exc:
                raise BlocklistError(f"rbd status {spec}: unreadable answer ({exc})") from None
        return out

    async def lift(self, address: str) -> str:
        """Remove the blocklist of `address` (an operator's action, once the host is repaired)."""
        entry = entry_for(address)
        await self._ceph("ceph", "osd", "blocklist", "rm", entry)
        return entry


async def blocklist(settings: RbdSettings, address: str, expire_seconds: float) -> str:
    """`Blocklister(settings).blocklist(address, expire_seconds)`."""
    return await Blocklister(settings).blocklist(address, expire_seconds)


async def verify(settings: RbdSettings, address: str, images: list[str]) -> Verification:
    """`Blocklister(settings).verify(address, images)`."""
    return await Blocklister(settings).verify(address, images)


async def lift(settings: RbdSettings, address: str) -> str:
    """`Blocklister(settings).lift(address)`."""
    return await Blocklister(settings).lift(address)
