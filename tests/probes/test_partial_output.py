"""The NFS probe's remote script and its parser when the answer is cut short or its `stat` dies:
never a complete reading made of a partial one (review3: partial failures).

The remote script runs in the real shells a neighbour may have (bash, dash) with GNU stat and
xargs, as `test_remote_script_gives_the_same_reading_under_bash_and_dash` runs it."""

import os
import subprocess
import time
from pathlib import Path

import pytest

from probes.base import Neighbour, PoolTarget, ProbeTarget, outcome_of
from probes.nfs_ssh import build_command, parse_output

pytestmark = pytest.mark.timeout(30)


def _pool(tmp_path: Path, disks: int = 3) -> tuple[ProbeTarget, list[Path], Path]:
    pool = tmp_path / "mnt" / "pool-1"
    (pool / "KVMHA").mkdir(parents=True)
    old = time.time() - 1000
    files = []
    for i in range(disks):
        d = pool / f"disk-{i}.qcow2"
        d.write_bytes(b"")
        os.utime(d, (old, old))
        files.append(d)
    hb = pool / "KVMHA" / "hb-10.0.0.11"
    hb.write_text(f"{int(old)}\n")
    target = ProbeTarget(
        "h1",
        "kvm01",
        "10.0.0.11",
        old,
        (PoolTarget("pool-1", str(pool), str(hb), tuple(map(str, files))),),
        (Neighbour("n1", "kvm02", "127.0.0.1"),),
    )
    return target, files, hb


def test_an_answer_cut_right_after_a_paths_first_slash_is_not_complete(tmp_path):
    """The end marker is `S <mtime> /`, the stat of "/". An answer cut short just after the
    first "/" of a file's line (a remote process killed with its output flushed in 4 KiB
    blocks, a channel closed mid-line) ends in exactly those characters: a partial answer
    must never pass for a complete one."""
    target, files, _hb = _pool(tmp_path)
    command, stdin = build_command(target)
    out = subprocess.run(
        ["bash", "-c", command], input=stdin, capture_output=True, text=True, check=False
    ).stdout
    full = parse_output(target, out, time.time())
    assert full.complete and len(full.mtimes) == 4
    # cut after "S <mtime> /" of the second disk's line
    line = next(x for x in out.splitlines() if x.endswith(str(files[1])))
    cut = out[: out.index(line) + line.index(" /") + 2]
    assert cut.endswith(" /") and not cut.endswith("\n")
    partial = parse_output(target, cut, time.time())
    assert not partial.complete
    outcome = outcome_of(target, partial, "nfs", "kvm02", 0.1)
    assert not outcome.complete and outcome.missing == ()
    # the whole answer, and the answer cut anywhere else, as before
    for end in range(len(out)):
        assert parse_output(target, out[:end], 0.0).complete is False, repr(out[:end][-40:])


@pytest.mark.parametrize("shell", ["bash", "dash"])
def test_a_stat_killed_by_a_signal_mid_way_gives_no_complete_reading(tmp_path, shell):
    """The neighbour's `stat` dies of a signal part-way through the host's files (OOM killer,
    an operator, a hung NFS call interrupted): the answer lacks the end marker under bash and
    dash alike. (Under dash the files go through xargs, and the script went on to print the
    marker after xargs' command was killed: a reading of some files taken for a complete one.)"""
    target, _files, _hb = _pool(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "stat"
    # stat dies on the host's disks (not on the marker's stat of "/" alone)
    wrapper.write_text(
        '#!/bin/sh\ncase "$*" in *disk-*) kill -KILL $$ ;; esac\nexec /usr/bin/stat "$@"\n'
    )
    wrapper.chmod(0o755)
    command, stdin = build_command(target)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run = subprocess.run(
        [shell, "-c", command], input=stdin, capture_output=True, text=True, env=env, check=False
    )
    reading = parse_output(target, run.stdout, time.time())
    assert not reading.complete, run.stdout
    outcome = outcome_of(target, reading, "nfs", "kvm02", 0.1)
    assert not outcome.complete and outcome.missing == ()
