"""Neighbour choice (probes.neighbours): pure ordering, no I/O."""

from __future__ import annotations

from probes.inventory import KvmHost
from probes.neighbours import NeighbourChooser


def host(n: int, state: str = "Up") -> KvmHost:
    return KvmHost(f"u{n}", f"kvm0{n}", f"10.0.0.{n}", "c1", "z1", state, "Enabled")


SUSPECT = host(1, "Disconnected")
HOSTS = [host(1, "Disconnected"), host(2), host(3), host(4), host(5, "Alert")]


def names(chooser: NeighbourChooser, suspect: KvmHost = SUSPECT) -> list[str]:
    return [h.name for h in chooser.choose(suspect, HOSTS)]


def test_a_neighbour_passed_over_goes_behind_the_others_for_that_suspect_only() -> None:
    """Rotation: a neighbour whose reading failed or lacked files is asked after the others at
    the suspect's next check; the one passed over longest ago comes first; a clean reading puts
    it back; another suspect's order is untouched; at most max_neighbours."""
    c = NeighbourChooser(max_neighbours=2)
    assert names(c) == ["kvm02", "kvm03"]
    c.passed_over("u1", "u2")
    assert names(c) == ["kvm03", "kvm04"]
    c.passed_over("u1", "u3")
    assert names(c) == ["kvm04", "kvm02"]
    c.passed_over("u1", "u4")
    assert names(c) == ["kvm02", "kvm03"]  # the one passed over longest ago first
    other = host(6, "Disconnected")
    assert [h.name for h in c.choose(other, [*HOSTS, other])] == ["kvm02", "kvm03"]
    c.read_cleanly("u1", "u3")
    assert names(c) == ["kvm03", "kvm02"]
    for n in ("u2", "u4", "u9"):
        c.read_cleanly("u1", n)
    c.read_cleanly("u7", "u2")  # a suspect never passed over: nothing to do
    assert names(c) == ["kvm02", "kvm03"] and c._passed == {}


def test_the_neighbour_that_answered_is_preferred_unless_passed_over_for_the_suspect() -> None:
    c = NeighbourChooser(max_neighbours=1)
    c.answered("c1", "u3")
    assert names(c) == ["kvm03"]
    c.passed_over("u1", "u3")
    assert names(c) == ["kvm02"]
