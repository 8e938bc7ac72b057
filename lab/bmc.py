"""A simulated BMC that speaks real IPMI 2.0 (RMCP+, lanplus) on loopback, built on pyghmi.

Rule: the simulator tracks power and identify state exactly as a client would observe it and
never lies about it; faults (unreachable, wrong password) are injected by the lab, not faked
by the client. It binds 127.0.0.1 on a free UDP port and serves from a thread, so ipmitool,
fence_ipmilan and the pyghmi client all talk to the same state.

Two patches to pyghmi's server side, applied once on import:
- pyghmi's server only implements cipher suite 3 (HMAC-SHA1) but answers OK to any proposal,
  so pyghmi's own client (which proposes suite 17, SHA-256 first) fails in RAKP 2 with
  `struct.error`. Refusing non-SHA1 proposals (status 0x11, "invalid integrity algorithm")
  makes the client fall back to suite 3; ipmitool works either way.
- a paused or stopped simulator must drop every packet, including those of sessions it
  already opened, so a client sees a dead BMC rather than a half-answering one.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import pyghmi.ipmi.bmc as ipmibmc
import pyghmi.ipmi.private.serversession as serversession
import pyghmi.ipmi.private.session as ipmisession

PowerCallback = Callable[[str, str], None]
"""Called as callback(new_state, cause) after every power change ('on'/'off'; cause names
the IPMI directive: 'off', 'on', 'cycle', 'reset', 'shutdown')."""

_original_open_session_response = serversession.ServerSession.create_open_session_response
_original_process_pktqueue = serversession.ServerSession.process_pktqueue


def _sha1_only_open_session_response(self: Any, request: bytearray) -> bytearray:
    # Byte 12 is the authentication algorithm, byte 20 the integrity algorithm of the RMCP+
    # open session request; 1 = HMAC-SHA1 / HMAC-SHA1-96, the only ones pyghmi's server does.
    if request[12] != 1 or request[20] != 1:
        return bytearray([request[0], 0x11, 0, 0]) + request[4:8]
    response: bytearray = _original_open_session_response(self, request)
    return response


def _process_pktqueue_unless_down(self: Any) -> None:
    bmc = getattr(self, "bmc", None)
    if isinstance(bmc, SimBmc) and not bmc.reachable:
        self.pktqueue.clear()
        return
    _original_process_pktqueue(self)


serversession.ServerSession.create_open_session_response = _sha1_only_open_session_response
serversession.ServerSession.process_pktqueue = _process_pktqueue_unless_down

_DIRECTIVES = {0: "off", 1: "on", 2: "cycle", 3: "reset", 4: "diag", 5: "shutdown"}


class SimBmc(ipmibmc.Bmc):
    """One simulated BMC: power, identify and boot device state, plus a command log."""

    def __init__(
        self,
        users: Mapping[str, str],
        port: int = 0,
        address: str = "127.0.0.1",
        power: str = "on",
        on_power_change: PowerCallback | None = None,
    ) -> None:
        super().__init__(dict(users), port=port, address=address)
        # pyghmi routes session packets by the server socket's real port, so a port-0 bind must
        # record the port the kernel chose.
        self.port = self.serversocket.getsockname()[1]
        self.address = address
        self.powerstate = power
        self.identify: str | None = None
        self.bootdevice = "default"
        self.on_power_change = on_power_change
        self.reachable = True
        self.resets = 0  # power resets and cycles seen while on
        self.commands: Counter[str] = Counter()
        self.history: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    # -- state the lab reads --------------------------------------------------------------

    def _record(self, name: str) -> None:
        with self._lock:
            self.commands[name] += 1
            self.history.append((time.time(), name))

    def _set_power(self, state: str, cause: str) -> None:
        changed = state != self.powerstate
        self.powerstate = state
        if self.on_power_change is not None and (changed or cause in ("reset", "cycle")):
            self.on_power_change(state, cause)

    # -- pyghmi Bmc hooks ----------------------------------------------------------------

    def get_power_state(self) -> str:
        self._record("get_power")
        return self.powerstate

    def is_active(self) -> bool:
        return self.powerstate == "on"

    def power_off(self) -> None:
        self._record("power_off")
        self._set_power("off", "off")

    def power_on(self) -> None:
        self._record("power_on")
        self._set_power("on", "on")

    def power_shutdown(self) -> None:
        self._record("power_shutdown")
        self._set_power("off", "shutdown")

    def power_cycle(self) -> int | None:
        self._record("power_cycle")
        if self.powerstate == "off":
            return 0xD5  # "not supported in present state", as real BMCs answer
        self.resets += 1
        self._set_power("on", "cycle")
        return None

    def power_reset(self) -> int | None:
        self._record("power_reset")
        if self.powerstate == "off":
            return 0xD5
        self.resets += 1
        self._set_power("on", "reset")
        return None

    def get_boot_device(self) -> str:
        return self.bootdevice

    def set_boot_device(self, bootdevice: str) -> None:
        self._record("set_boot_device")
        self.bootdevice = bootdevice

    def get_system_guid(self) -> Any:
        return self.uuid

    def handle_raw_request(self, request: dict[str, Any], session: Any) -> Any:
        self._record(f"netfn{request['netfn']:#x}/cmd{request['command']:#x}")
        if request["netfn"] == 0 and request["command"] == 4:  # Chassis Identify
            data = list(request["data"])
            force = len(data) > 1 and data[1] & 1
            interval = data[0] if data else 15
            self.identify = "on" if (force or interval) else "off"
            self._record(f"identify_{self.identify}")
            return session.send_ipmi_response()
        return super().handle_raw_request(request, session)

    def sessionless_data(self, data: bytes, sockaddr: Any) -> None:
        if not self.reachable:
            return
        self._record("sessionless")
        super().sessionless_data(data, sockaddr)

    # -- lab controls --------------------------------------------------------------------

    def pause(self) -> None:
        """Drop every packet from now on: the BMC looks dead on the network."""
        self.reachable = False

    def resume(self) -> None:
        """Answer again."""
        self.reachable = True

    def close(self) -> None:
        """Stop serving and release the UDP port."""
        self.reachable = False
        sock = self.serversocket
        with contextlib.suppress(ValueError):
            ipmisession.iosockets.remove(sock)
        ipmisession.Session.bmc_handlers.pop(sock, None)
        # Wake pyghmi's IO thread so its next select() no longer includes this socket.
        with contextlib.suppress(Exception):
            wake = ipmisession.iosockets[0]
            wake.sendto(b"\x01", (ipmisession.myself, wake.getsockname()[1]))
        sock.close()


class BmcSimulator:
    """Runs a SimBmc on 127.0.0.1 in a thread: `with BmcSimulator(...) as sim: sim.port`."""

    def __init__(
        self,
        username: str = "admin",
        password: str = "password",
        power: str = "on",
        on_power_change: PowerCallback | None = None,
        address: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.username = username
        self.password = password
        self._args = (power, on_power_change, address, port)
        self.bmc: SimBmc | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The UDP port the BMC listens on."""
        return self._sim.port

    @property
    def address(self) -> str:
        """The address the BMC listens on."""
        return self._sim.address

    @property
    def _sim(self) -> SimBmc:
        if self.bmc is None:
            raise RuntimeError("the BMC simulator is not started")
        return self.bmc

    @property
    def power(self) -> str:
        """'on' or 'off' as the BMC would report it."""
        return self._sim.powerstate

    @power.setter
    def power(self, state: str) -> None:
        self._sim.powerstate = state

    @property
    def identify(self) -> str | None:
        """'on'/'off' after a Chassis Identify, None if never asked."""
        return self._sim.identify

    @property
    def resets(self) -> int:
        """Resets and cycles applied while the host was on."""
        return self._sim.resets

    @property
    def commands(self) -> Counter[str]:
        """How many of each command the BMC received (power_off, get_power, identify_on, ...)."""
        return self._sim.commands

    def count(self, name: str | None = None) -> int:
        """Commands received, of one name or in total."""
        c = self._sim.commands
        return c[name] if name else sum(c.values())

    def start(self) -> BmcSimulator:
        """Bind and serve in a daemon thread."""
        power, callback, address, port = self._args
        self.bmc = SimBmc(
            {self.username: self.password},
            port=port,
            address=address,
            power=power,
            on_power_change=callback,
        )
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name=f"bmc-{self.port}", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        # pyghmi serves every in-process session from one event loop; any thread that calls
        # wait_for_rsp moves it along, so a short timeout keeps stop() prompt.
        while not self._stop.is_set():
            ipmisession.Session.wait_for_rsp(0.2)

    def pause(self) -> None:
        """Make the BMC unreachable (drops every packet, keeps its state)."""
        self._sim.pause()

    def resume(self) -> None:
        """Make it reachable again."""
        self._sim.resume()

    def stop(self) -> None:
        """Stop serving and free the port; idempotent."""
        if self.bmc is not None:
            self.bmc.close()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> BmcSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 nothing listens on (for 'unreachable BMC' cases)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="serve a simulated IPMI BMC on loopback")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--username", default="admin")
    ap.add_argument("--password", default="password")
    a = ap.parse_args()
    sim = BmcSimulator(a.username, a.password, port=a.port).start()
    print(f"BMC simulator on 127.0.0.1:{sim.port} ({a.username})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        sim.stop()
