"""One round of storage checks: 500 suspect hosts x 20 disks through 10 neighbours, fencer's
one-exec-per-check NFS probe against a baseline of one SSH exec per file, in the same run, over
real SSH (lab asyncssh servers on loopback, a real bash + stat per exec) and real files.

Run: `python -m benchmarks.probe_round --json`. Round trips = SSH exec requests. Both sides use
the same pooled connections (opened before timing) and the same per-connection session limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import time
from typing import Any

import asyncssh

from fencing.settings import FencerSettings
from lab.cloudstack_sim import SimCloud
from lab.kvm_hosts import KvmLab
from probes.base import Neighbour, PoolTarget, ProbeTarget
from probes.nfs_ssh import MAX_SESSIONS_PER_CONNECTION, NfsSshProbe


def _cpu(since: dict[str, float] | None = None) -> dict[str, float]:
    """CPU seconds used by this process (client and lab servers) and its children (shells)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    now = {
        "python": me.ru_utime + me.ru_stime,
        "remote_commands": kids.ru_utime + kids.ru_stime,
    }
    if since is None:
        return now
    return {k: round(v - since[k], 3) for k, v in now.items()}


async def run(hosts: int, disks: int, neighbours: int, baseline: bool) -> dict[str, Any]:
    """Build the files, run both rounds, return the figures."""
    cloud = SimCloud()
    zone = cloud.add_zone()
    cluster = cloud.add_cluster(zone)
    pool = cloud.add_pool(cluster, "nfs1")
    lab = KvmLab(cloud, interval=3600)
    lab_hosts = [lab.add_host(cluster, f"nb{i:02d}") for i in range(neighbours)]
    await lab.start()
    try:
        root = lab.mount_root / pool.uuid
        suspect = time.time() - 300
        targets = []
        for h in range(hosts):
            ip = f"10.1.{h // 250}.{h % 250 + 1}"
            hb = root / "KVMHA" / f"hb-{ip}"
            hb.write_text(f"{int(suspect - 100)}\n")
            files = []
            for d in range(disks):
                f = root / f"h{h:04d}-d{d:02d}.qcow2"
                f.write_bytes(b"")
                os.utime(f, (suspect - 100, suspect - 100))
                files.append(str(f))
            nb = lab_hosts[h % neighbours]
            targets.append(
                ProbeTarget(
                    f"host-{h}",
                    f"kvm{h:04d}",
                    ip,
                    suspect,
                    (PoolTarget(pool.uuid, str(root), str(hb), tuple(files)),),
                    (Neighbour(nb.uuid, nb.name, nb.ip),),
                )
            )
        settings = FencerSettings(ssh={**lab.ssh_settings(), "command_timeout": 60.0})
        probe = NfsSshProbe(settings)
        try:
            for nb in lab_hosts:  # connections are pooled: open them outside the timing
                await probe.pool.get(nb.ip)
            t0, r0 = time.perf_counter(), _cpu()
            outcomes = await asyncio.gather(*(probe.check(t) for t in targets))
            ours_wall = time.perf_counter() - t0
            ours_cpu = _cpu(r0)
            ours = {
                "round_trips": probe.round_trips,
                "wall_seconds": round(ours_wall, 3),
                "connections": probe.pool.connects,
                "cpu_seconds": ours_cpu,
                "complete_readings": sum(o.complete for o in outcomes),
                "files_read": sum(len(o.mtimes) for o in outcomes),
            }
            result: dict[str, Any] = {
                "suspect_hosts": hosts,
                "disks_per_host": disks,
                "neighbours": neighbours,
                "sessions_per_connection": MAX_SESSIONS_PER_CONNECTION,
                "cpus": os.cpu_count(),
                "fencer": ours,
            }
            if baseline:
                result["baseline_one_exec_per_file"] = await _baseline(probe, targets)
                b = result["baseline_one_exec_per_file"]
                result["round_trip_ratio"] = round(b["round_trips"] / ours["round_trips"], 1)
                result["wall_ratio"] = round(b["wall_seconds"] / ours_wall, 1)
            result["targets_met"] = {
                "round_trips_20x_fewer": result.get("round_trip_ratio", 0) >= 20,
                "round_under_2s": ours_wall < 2.0,
            }
            return result
        finally:
            await probe.close()
    finally:
        await lab.stop()


async def _baseline(probe: NfsSshProbe, targets: list[ProbeTarget]) -> dict[str, Any]:
    """The naive way: `stat` each disk and `cat` each heartbeat in its own exec."""
    trips = 0
    failures = 0

    async def one(address: str, command: str) -> None:
        nonlocal trips, failures
        entry = await probe.pool.get(address)
        async with entry.sessions:
            trips += 1
            r = await entry.conn.run(command, stdin=asyncssh.DEVNULL, check=False, timeout=60)
            failures += r.exit_status != 0

    jobs = []
    for t in targets:
        nb = t.neighbours[0].address
        jobs += [one(nb, f"stat -c %Y '{f}'") for f in t.files]
        jobs += [one(nb, f"cat '{h}'") for h in t.heartbeats]
    t0 = time.perf_counter()
    await asyncio.gather(*jobs)
    return {
        "round_trips": trips,
        "wall_seconds": round(time.perf_counter() - t0, 3),
        "failures": failures,
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hosts", type=int, default=500)
    p.add_argument("--disks", type=int, default=20)
    p.add_argument("--neighbours", type=int, default=10)
    p.add_argument("--no-baseline", action="store_true", help="skip the one-exec-per-file round")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    result = asyncio.run(run(args.hosts, args.disks, args.neighbours, not args.no_baseline))
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
