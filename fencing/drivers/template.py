"""The feature design's command template: any tool (ipmitool, an iLO tool, a script) run as
`execution_syntax` with `$IPMI_EXEC`, `$IPMI_USERNAME`, `$IPMI_PASSWORD`, `$IPMI_ACTION`,
`$IPMI_HOST` (and `$IPMI_PORT`, `$IPMI_PASSWORD_FILE`) filled in.

Rule: the template is split into tokens with shlex first, then each token is substituted on
its own, and the argv runs without a shell, so no value (a host name, a password holding
`; rm -rf /`) can add, split or join arguments. The one exception: a token that is exactly
`$IPMI_ACTION` becomes the shlex-split action string, because action strings are operator
configuration ("chassis power off" is three arguments). Variable names match without regard
to case, as the feature design writes `$IPMI_Username`.

The password reaches the tool per `password_via`: argv (`$IPMI_PASSWORD`, visible in /proc),
env (`IPMI_PASSWORD`, ipmitool `-E`) or a 0600 temp file (`$IPMI_PASSWORD_FILE`, ipmitool `-f`).
Logs get `redacted_argv`, where the password reads as the one mask of fencing.redaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from string import Template
from typing import Any

from pydantic import SecretStr

from fencing.drivers.base import (
    BmcAuthError,
    BmcRefused,
    BmcUnreachable,
    DriverConfigError,
    PowerRequest,
    PowerState,
)
from fencing.redaction import MASK as REDACTED
from fencing.redaction import Redactor
from fencing.settings import IpmiSettings, PasswordVia

_POWER_RE = re.compile(r"power\s+is\s+(on|off)\b", re.IGNORECASE)
_AUTH_RE = re.compile(
    r"hmac is invalid|unauthorized name|incorrect password|authentication failed",
    re.IGNORECASE,
)
_UNREACHABLE_RE = re.compile(
    r"no response|timed? ?out|unreachable|no route|connection refused|could not resolve",
    re.IGNORECASE,
)
_ACTION_FIELDS = {
    "off": "action_stop",
    "on": "action_start",
    "reset": "action_reboot",
    "blink": "action_blink",
    "test": "action_test",
}


class _Vars(dict[str, str]):
    """Template variables, looked up without regard to case."""

    def __missing__(self, key: str) -> str:
        upper = key.upper()
        if upper != key and upper in self:
            return self[upper]
        raise KeyError(key)


@dataclass(frozen=True)
class Rendered:
    """A command ready to run: argv, its redacted twin for logs, and extra environment."""

    argv: list[str]
    redacted_argv: list[str]
    env: Mapping[str, str] = field(default_factory=dict)
    password_file: str | None = None


def _substitute(tokens: list[str], variables: Mapping[str, str], action: list[str]) -> list[str]:
    out: list[str] = []
    for token in tokens:
        if token in ("$IPMI_ACTION", "${IPMI_ACTION}"):
            out.extend(Template(t).safe_substitute(variables) for t in action)
        else:
            out.append(Template(token).safe_substitute(variables))
    return out


def render(
    settings: IpmiSettings,
    address: str,
    which: str,
    password_file: str | None = None,
) -> Rendered:
    """Render the command for one action ('off', 'on', 'reset', 'blink', 'test')."""
    try:
        tokens = shlex.split(settings.execution_syntax)
    except ValueError as exc:
        raise DriverConfigError(f"execution_syntax: cannot split it ({exc})") from None
    action_field = _ACTION_FIELDS[which]
    action_text = getattr(settings, action_field)
    try:
        action = shlex.split(action_text)
    except ValueError as exc:
        raise DriverConfigError(f"{action_field}: cannot split it ({exc})") from None
    if not tokens:
        raise DriverConfigError("execution_syntax is empty")
    mentions_password = any(
        re.search(r"\$\{?IPMI_PASSWORD\b(?!_FILE)", t, re.IGNORECASE) for t in tokens + action
    )
    via = PasswordVia(settings.password_via)
    if mentions_password and via != PasswordVia.ARGV:
        raise DriverConfigError(
            f"execution_syntax puts $IPMI_PASSWORD in the command line but password_via is "
            f"{via.value}; remove it (ipmitool: -E for env, -f $IPMI_PASSWORD_FILE for file)"
        )
    password = settings.password.get_secret_value()
    common = {
        "IPMI_EXEC": settings.exec,
        "IPMI_USERNAME": settings.username,
        "IPMI_HOST": address,
        "IPMI_PORT": str(settings.port),
        "IPMI_ACTION": action_text,
        "IPMI_PASSWORD_FILE": password_file or "",
    }
    real = _Vars(common, IPMI_PASSWORD=password if via == PasswordVia.ARGV else "")
    shown = _Vars(common, IPMI_PASSWORD=REDACTED if via == PasswordVia.ARGV else "")
    env = {"IPMI_PASSWORD": password} if via == PasswordVia.ENV else {}
    return Rendered(
        argv=_substitute(tokens, real, action),
        redacted_argv=_substitute(tokens, shown, action),
        env=env,
        password_file=password_file,
    )


@contextlib.contextmanager
def _password_file(password: SecretStr) -> Iterator[str]:
    fd, path = tempfile.mkstemp(prefix="fencer-ipmi-")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(password.get_secret_value())
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@dataclass(frozen=True)
class RunResult:
    """What the tool did."""

    returncode: int
    stdout: str
    stderr: str
    redacted_argv: list[str]


class TemplateDriver:
    """Runs the operator's command template for one host."""

    name = "template"

    def __init__(self, settings: IpmiSettings, address: str, timeout: float = 30.0) -> None:
        self.settings = settings
        self.address = address
        self.timeout = timeout
        self.last: RunResult | None = None

    def render(self, which: str, password_file: str | None = None) -> Rendered:
        """The argv for one action (see `render`)."""
        return render(self.settings, self.address, which, password_file)

    async def run(self, which: str) -> RunResult:
        """Run one action's command; raise a DriverError unless it exits 0."""
        with contextlib.ExitStack() as stack:
            pwfile = None
            if self.settings.password_via == PasswordVia.FILE:
                pwfile = stack.enter_context(_password_file(self.settings.password))
            cmd = self.render(which, pwfile)
            result = await self._exec(cmd)
        self.last = result
        if result.returncode != 0:
            raise self._failure(result)
        return result

    async def _exec(self, cmd: Rendered) -> RunResult:
        env: dict[str, Any] = dict(os.environ)
        env.pop("IPMI_PASSWORD", None)  # only the configured host's password, never ours
        env.update(cmd.env)
        shown = " ".join(shlex.quote(a) for a in cmd.redacted_argv)
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,  # so a timeout can kill the tool's children too
            )
        except OSError as exc:
            raise DriverConfigError(f"exec: cannot run {shown}: {exc.strerror}") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise BmcUnreachable(
                f"{shown} did not finish within {self.timeout:g} s (BMC {self.address})"
            ) from None
        return RunResult(
            returncode=proc.returncode if proc.returncode is not None else -1,
            stdout=out.decode(errors="replace"),
            stderr=err.decode(errors="replace"),
            redacted_argv=cmd.redacted_argv,
        )

    def _failure(self, result: RunResult) -> Exception:
        text = (result.stderr.strip() or result.stdout.strip()).splitlines()
        last = text[-1] if text else "no output"
        first = result.redacted_argv[0] if result.redacted_argv else "command"
        message = f"{first} exited {result.returncode} for BMC {self.address}: {last}"
        message = Redactor([self.settings.password.get_secret_value()])(message)
        joined = result.stderr + result.stdout
        if _UNREACHABLE_RE.search(joined) and "RAKP" not in joined.upper():
            return BmcUnreachable(message)
        if _AUTH_RE.search(joined):
            return BmcAuthError(message)
        return BmcRefused(message)

    async def get_power(self) -> PowerState:
        """Run the test action and read "Chassis Power is on|off" from its output."""
        result = await self.run("test")
        m = _POWER_RE.search(result.stdout)
        if m is None:
            raise BmcRefused(
                f"action_test output has no 'Power is on|off' for BMC {self.address}: "
                f"{result.stdout.strip()[:120]!r}"
            )
        return "on" if m.group(1).lower() == "on" else "off"

    async def set_power(self, state: PowerRequest) -> None:
        """Run action_stop, action_start or action_reboot."""
        await self.run(state)

    async def identify(self, on: bool) -> None:
        """Run action_blink; the template has no action to switch the LED off."""
        if not on:
            raise DriverConfigError("the command template has no action to switch identify off")
        await self.run("blink")

    async def test(self) -> str:
        """Run action_test and return its first line of output."""
        result = await self.run("test")
        lines = result.stdout.strip().splitlines()
        return lines[0] if lines else f"{result.redacted_argv[0]} exited 0"

    async def aclose(self) -> None:
        """Nothing to release."""
