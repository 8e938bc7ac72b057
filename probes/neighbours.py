"""Neighbour choice: who looks at a suspect host's storage.

Rule: only an Up, Enabled KVM host of the suspect's cluster (it mounts the same cluster- and
zone-wide pools), never the suspect itself; at most `max_neighbours` per check, the one that
answered last time first, then the others in a stable order so repeated checks spread nothing
and stay explainable.
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
        candidates.sort(key=lambda h: (h.uuid != preferred, h.name, h.uuid))
        return candidates[: self.max_neighbours]

    def answered(self, cluster_uuid: str | None, host_uuid: str) -> None:
        """Remember the neighbour that gave a definite answer."""
        if cluster_uuid:
            self._last_good[cluster_uuid] = host_uuid

    @staticmethod
    def as_neighbours(hosts: Iterable[KvmHost]) -> tuple[Neighbour, ...]:
        """The probe-facing view."""
        return tuple(Neighbour(h.uuid, h.name, h.ip) for h in hosts)
