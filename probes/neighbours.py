"""Neighbour choice: who looks at a suspect host's storage.

Rule: only an Up, Enabled KVM host of the suspect's cluster (it mounts the same cluster- and
zone-wide pools), never the suspect itself; at most `max_neighbours` per check, the one that
answered last time first, then the others in a stable order so repeated checks spread nothing
and stay explainable. A neighbour passed over for a suspect (its reading of that suspect failed,
was incomplete, or lacked files: `missing`, `unread_contents`) goes behind the others for that
suspect's next checks, the one passed over longest ago first: a dead host whose busy disk one
neighbour cannot read is read by another at the next check at the latest (rotation), instead of
staying unknown. A clean reading puts the neighbour back in its place.

Readings of one suspect by different neighbours are compared with each other: sound, since
each check's reading comes from one neighbour only (never mixed), and what it compares are
the filer's mtimes (the file server's clock, the same whichever client asks: the probe opens
each file before its stat, so no client's attribute cache answers) and the heartbeat's content
(the suspect's clock, written in the file). A back end whose readings depend on the reader
would need a reference per neighbour.
"""

from __future__ import annotations

from collections.abc import Iterable

from probes.base import Neighbour
from probes.inventory import KvmHost


class NeighbourChooser:
    """Orders candidate neighbours and remembers which one answered, per cluster."""

    def __init__(self, max_neighbours: int) -> None:
        self.max_neighbours = max_neighbours
        self._last_good: dict[str, str] = {}
        # suspect -> neighbour -> when it was last passed over (a rising count: the order)
        self._passed: dict[str, dict[str, int]] = {}
        self._count = 0

    def choose(self, suspect: KvmHost, hosts: Iterable[KvmHost]) -> list[KvmHost]:
        """The neighbours to try, in order."""
        candidates = [
            h
            for h in hosts
            if h.uuid != suspect.uuid
            and h.ip
            and h.ip != suspect.ip
            and h.cluster_uuid is not None
            and h.cluster_uuid == suspect.cluster_uuid
            and h.state == "Up"
            and h.resourcestate == "Enabled"
            and h.hypervisor.upper() == "KVM"
        ]
        preferred = self._last_good.get(suspect.cluster_uuid or "")
        passed = self._passed.get(suspect.uuid, {})
        candidates.sort(key=lambda h: (passed.get(h.uuid, 0), h.uuid != preferred, h.name, h.uuid))
        return candidates[: self.max_neighbours]

    def passed_over(self, suspect_uuid: str, host_uuid: str) -> None:
        """The neighbour's reading of the suspect failed or lacked files: others first."""
        self._count += 1
        self._passed.setdefault(suspect_uuid, {})[host_uuid] = self._count

    def read_cleanly(self, suspect_uuid: str, host_uuid: str) -> None:
        """The neighbour read every file of the suspect: back in its place."""
        passed = self._passed.get(suspect_uuid)
        if passed is not None:
            passed.pop(host_uuid, None)
            if not passed:
                del self._passed[suspect_uuid]

    def answered(self, cluster_uuid: str | None, host_uuid: str) -> None:
        """Remember the neighbour that gave a definite answer."""
        if cluster_uuid:
            self._last_good[cluster_uuid] = host_uuid

    @staticmethod
    def as_neighbours(hosts: Iterable[KvmHost]) -> tuple[Neighbour, ...]:
        """The probe-facing view."""
        return tuple(Neighbour(h.uuid, h.name, h.ip) for h in hosts)
