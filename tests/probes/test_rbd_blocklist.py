"""Storage fencing against a real Ceph: a blocklisted host's watchers vanish and its writes fail;
`verify` says so; `lift` removes the entry; the probe's key cannot blocklist at all."""

from __future__ import annotations

import subprocess
import time

import pytest

from fencing.blocklist import Blocklister, BlocklistError, entry_for, parse_ls
from fencing.settings import RbdSettings

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.2.41"  # the fenced host's storage address (its clients bind to it)
OTHER = "127.0.2.42"  # a healthy host on the same cluster


def settings(ceph, **kw) -> RbdSettings:
    return RbdSettings(**ceph.rbd_settings(**kw))


async def test_blocklist_cuts_the_host_off_verify_says_so_and_lift_removes_it(ceph_clean):
    ceph = ceph_clean
    c = ceph.cluster
    a, b = f"rbd/{ceph.image('fence')}", f"rbd/{ceph.image('fence')}"
    fence = Blocklister(settings(ceph))
    with c.client(a, HOST) as vm, c.client(b, OTHER) as healthy:
        assert vm.write() == "ok"
        before = await fence.verify(HOST, [a, b])
        assert not before.ok and not before.listed and before.watchers
        started = time.monotonic()
        entry = await fence.blocklist(HOST, 600)
        took = time.monotonic() - started
        after = await fence.verify(HOST, [a, b])
        assert entry == f"{HOST}:0/0"
        assert after.ok, after.detail
        assert c.watchers(a) == [] and len(c.watchers(b)) == 1  # only the fenced host is cut off
        assert vm.write() == "err 108"  # ESHUTDOWN: the OSDs refuse a blocklisted client
        assert healthy.write() == "ok"
        until = [e["until"] for e in await fence.listed() if e["addr"] == entry]
        assert len(until) == 1
        await fence.lift(HOST)
        lifted = await fence.verify(HOST, [a, b])
        assert not lifted.listed and not lifted.ok
    print(f"blocklist add took {took:.2f} s")
    # After the lift a new client of that host can open and write again.
    with c.client(a, HOST) as again:
        assert again.write() == "ok"


async def test_verify_fails_while_a_watcher_of_the_host_remains(ceph_clean):
    """Listed is not enough: a watcher of the host still present means not verified (here the
    entry names another address, as a wrong storage_ip setting would)."""
    ceph = ceph_clean
    c = ceph.cluster
    a = f"rbd/{ceph.image('fence')}"
    fence = Blocklister(settings(ceph))
    with c.client(a, HOST):
        await fence.blocklist(OTHER, 60)
        wrong = await fence.verify(OTHER, [a])
        assert wrong.ok  # nothing watched from OTHER
        host = await fence.verify(HOST, [a])
        assert not host.ok and not host.listed and host.watchers[0].startswith(f"{a} {HOST}:0/")
        assert "not in `ceph osd blocklist ls`" in host.detail


async def test_the_probes_key_is_refused_a_blocklist(ceph_clean):
    ceph = ceph_clean
    as_probe = Blocklister(
        settings(ceph, fence_user="fencer-probe", fence_keyring=str(ceph.probe_keyring))
    )
    with pytest.raises(BlocklistError, match=r"exit 13: Error EACCES: access denied"):
        await as_probe.blocklist(HOST, 60)
    assert await Blocklister(settings(ceph)).listed() == []
    # The same with the bare CLI, as an operator would check a key's caps.
    p = subprocess.run(
        ["ceph", "--conf", str(ceph.cluster.conf), "--id", "fencer-probe", "--keyring",
         str(ceph.probe_keyring), "osd", "blocklist", "add", f"{HOST}:0/0"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert p.returncode == 13 and "access denied" in p.stderr


async def test_unreachable_cluster_is_a_failed_verification_not_a_success(ceph_clean):
    ceph = ceph_clean
    ceph.cluster.stop_mon()
    fence = Blocklister(settings(ceph, connect_timeout=2.0))
    v = await fence.verify(HOST, ["rbd/anything"])
    assert not v.ok and v.error and "ceph osd blocklist ls" in v.error
    with pytest.raises(BlocklistError, match="ceph osd blocklist add"):
        await fence.blocklist(HOST, 60)


def test_blocklist_ls_json_is_two_concatenated_arrays():
    out = '\n[{"addr":"127.0.2.41:0/0","until":"2026-11-29T18:23:12.728738+0000"}][]'
    assert parse_ls(out) == [{"addr": "127.0.2.41:0/0", "until": "2026-11-29T18:23:12.728738+0000"}]
    assert parse_ls("\n[][]") == []
    with pytest.raises(BlocklistError, match="unreadable answer"):
        parse_ls("[{")


def test_entries_name_every_client_of_an_ip():
    assert entry_for("10.0.0.5") == "10.0.0.5:0/0"
    assert entry_for("fd00::5") == "[fd00::5]:0/0"
    with pytest.raises(ValueError, match="blocklist address: not an IP"):
        entry_for("10.0.0.5; rm -rf /")
