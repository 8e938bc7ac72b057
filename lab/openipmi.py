"""OpenIPMI's `ipmi_sim` (Debian package `openipmi`) as an independent BMC on loopback.

Rule: a BMC written by others, so the IPMI driver is tested against more than our own pyghmi
simulator. Power lives in a file that ipmi_sim's `chassis_control` script reads and writes;
the system GUID is set in lan.conf (`guid`). ipmi_sim offers cipher suite 3 only and does not
implement Chassis Identify. See /work/shared/research/openipmi.md for its quirks.

    with IpmiSim(guid="0123...") as sim:   # sim.port, sim.username, sim.password, sim.power
        ...
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

_CHASSIS = """#!/bin/sh
# ipmi_sim chassis_control: called as "get power" (prints power:1|0) or "set power 0|1".
# Faults, switched by files: `refuse` (the BMC answers an error to Chassis Control),
# `off_delay` (seconds before a power-off shows, as on BMCs that report late).
D=$(dirname "$0")
case "$1 $2" in
  "get power") echo "power:$(cat "$D/power")";;
  "set power")
    [ -e "$D/refuse" ] && exit 1
    echo "set $3" >> "$D/commands"
    if [ "$3" = 0 ] && [ -s "$D/off_delay" ]; then
      (sleep "$(cat "$D/off_delay")"; echo 0 > "$D/power") </dev/null >/dev/null 2>&1 &
    else
      echo "$3" > "$D/power"
    fi;;
  *) exit 1;;
esac
"""

_EMU = """mc_setbmc 0x20
mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr
sel_enable 0x20 1000 0x0a
mc_enable 0x20
"""


def available() -> bool:
    """Whether ipmi_sim is installed."""
    return shutil.which("ipmi_sim") is not None


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class IpmiSim:
    """One ipmi_sim process serving a BMC on 127.0.0.1:<free port>."""

    def __init__(
        self,
        username: str = "fence",
        password: str = "sim-fence-pw",
        guid: str | None = None,
        power: str = "on",
    ) -> None:
        self.username = username
        self.password = password
        self.guid = str(uuid.UUID(guid)) if guid else str(uuid.uuid4())
        self.port = 0
        self._initial_power = power
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def power(self) -> str:
        """'on' or 'off', as the chassis script keeps it."""
        assert self._dir is not None
        return "on" if (self._dir / "power").read_text().strip() == "1" else "off"

    @property
    def power_commands(self) -> list[str]:
        """Every Chassis Control the BMC carried out ('set 0', 'set 1'), in order."""
        assert self._dir is not None
        path = self._dir / "commands"
        return path.read_text().split("\n")[:-1] if path.exists() else []

    def refuse_power_control(self, refuse: bool = True) -> None:
        """Make the BMC answer an error (completion code 0xff) to Chassis Control."""
        assert self._dir is not None
        flag = self._dir / "refuse"
        if refuse:
            flag.touch()
        else:
            flag.unlink(missing_ok=True)

    def delay_power_off(self, seconds: float) -> None:
        """Accept a power-off at once but let it show only `seconds` later (0: at once)."""
        assert self._dir is not None
        (self._dir / "off_delay").write_text(f"{seconds:g}\n" if seconds > 0 else "")

    def start(self) -> IpmiSim:
        """Write the configuration, start ipmi_sim, wait until it answers."""
        self._dir = Path(tempfile.mkdtemp(prefix="fencer-ipmi-sim-"))
        d = self._dir
        self.port = _free_udp_port()
        (d / "power").write_text("1\n" if self._initial_power == "on" else "0\n")
        chassis = d / "chassis.sh"
        chassis.write_text(_CHASSIS)
        chassis.chmod(0o700)
        (d / "sim.emu").write_text(_EMU)
        (d / "lan.conf").write_text(
            f'name "fencer-sim"\nset_working_mc 0x20\nstartlan 1\n'
            f"  addr 127.0.0.1 {self.port}\n  priv_limit admin\n"
            "  allowed_auths_callback none md2 md5 straight\n"
            "  allowed_auths_user none md2 md5 straight\n"
            "  allowed_auths_operator none md2 md5 straight\n"
            "  allowed_auths_admin none md2 md5 straight\n"
            f"  guid {uuid.UUID(self.guid).hex}\nendlan\n"
            f'chassis_control "{chassis}"\nstartnow false\n'
            f'user 2 true "{self.username}" "{self.password}" admin 10 none md2 md5 straight\n'
        )
        (d / "state").mkdir()
        log = (d / "sim.log").open("wb")
        # setsid: a stopped ipmi_sim in an orphaned process group dies of SIGHUP otherwise.
        self._proc = subprocess.Popen(
            [
                "ipmi_sim",
                "-c",
                str(d / "lan.conf"),
                "-f",
                str(d / "sim.emu"),
                "-s",
                str(d / "state"),
                "-n",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        # An RMCP presence ping (ASF) answered means the LAN channel is up.
        ping = bytes.fromhex("0600ff06000011be80000000")
        deadline = time.monotonic() + 10
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            while time.monotonic() < deadline:
                if self._proc is not None and self._proc.poll() is not None:
                    raise RuntimeError("ipmi_sim exited: " + self.log()[-500:])
                s.sendto(ping, ("127.0.0.1", self.port))
                with contextlib.suppress(TimeoutError, OSError):
                    s.recvfrom(512)
                    return
        self.stop()
        raise RuntimeError("ipmi_sim did not answer within 10 s")

    def log(self) -> str:
        """What ipmi_sim printed."""
        if self._dir is None:
            return ""
        path = self._dir / "sim.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Stop ipmi_sim and remove its files; idempotent."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=5)
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> IpmiSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
