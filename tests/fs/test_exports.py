"""Exports as a backup tool reads them: large requests, and a stable point's pages kept
by the kernel between opens (a live volume's are dropped at each open, since a running
guest writes it behind the kernel's back)."""

from __future__ import annotations

import os
from pathlib import Path

from tests.helpers.tree import Tree
from vmtreefs import pagecache
from vmtreefs.app.daemon import READAHEAD_KB

MiB = 1024 * 1024


def read_through(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.read()


def cached_after_reopen(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return pagecache.cached(fd, 0, path.stat().st_size)
    finally:
        os.close(fd)


def test_reads_come_in_large_requests_and_stable_points_stay_cached(tree: Tree) -> None:
    vms = tree.vms
    device = os.stat(vms).st_dev
    knob = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
    assert int(knob.read_text()) == READAHEAD_KB == 1024  # the kernel's FUSE default: 128

    os.mkdir(vms / "src")
    data = vms / "src" / "volumes" / "data.img"
    payload = os.urandom(8 * MiB)
    data.write_bytes(payload)
    os.setxattr(vms / "src", "user.vmtree.versioned", b"1")
    version = vms / "src-v1" / "volumes" / "data.img"
    head = vms / "src-next" / "volumes" / "data.img"
    assert read_through(version) == payload
    assert read_through(head) == payload
    assert cached_after_reopen(version)  # a version never changes: the kernel keeps it
    assert not cached_after_reopen(head)  # a head may change under a running guest
