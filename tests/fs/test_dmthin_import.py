"""Importing a disk image into a dm-thin tree: ``cp --sparse=always`` into a new volume.

A write past a volume's end grows the thin device's table a step ahead (no record,
no reload for most writes); the size users see is where the writes reached, and
the store records it once. After a kill -9 the size is where the data reached (the
64 KiB pool block of the last write), fsck is clean, and a later grow reads zeros.

Skipped where the kernel has no dm-thin; ``tests/dmthin`` runs them inside a guest.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from pathlib import Path

from tests.fs.test_dmthin_mount import dm_cleanup  # noqa: F401 (autouse: skip, clean up)
from tests.fs.test_fsck import fsck
from tests.fs.test_import import ls_size, sparse_image, stored_size
from tests.helpers.tree import Tree

KiB = 1024
MiB = 1024 * KiB
SIZE = 150 * MiB + 3000  # past two of the table's steps (64 MiB, then its length)
OPTIONS = ["engine=dm-thin", "size=512M"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def import_image(tree: Tree, seed: int) -> tuple[Path, bytes]:
    """``cp --sparse=always`` of a new image into the new volume ``imp/disk.img``."""
    image = tree.workdir / "guest.img"
    data = sparse_image(image, SIZE, pieces=20, seed=seed)
    os.mkdir(tree.vms / "imp")
    target = tree.vms / "imp" / "volumes" / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(image), str(target)], check=True)
    return target, data


def test_dmthin_cp_into_a_new_volume_keeps_content_and_size_with_o1_intents(
    workdir: Path,
) -> None:
    tree = Tree(workdir)
    tree.mount(OPTIONS)
    try:
        before = tree.intents_begun()
        target, data = import_image(tree, seed=11)
        assert tree.intents_begun() - before <= 3  # its creation and its one growth
        assert ls_size(target) == SIZE + 72  # whole sectors; never a table's step
        assert stored_size(tree, "imp", "disk") == SIZE + 72
        assert tree.status()["open_intents"] == "0"
        got = target.read_bytes()
        assert sha(got[:SIZE]) == sha(data)
        assert got[SIZE:] == bytes(72)
        tree.remount()
        assert ls_size(target) == SIZE + 72
        assert sha(target.read_bytes()[:SIZE]) == sha(data)
    finally:
        tree.unmount()
    code, out = fsck(tree)
    assert code == 0, out


def test_dmthin_kill9_after_an_fsynced_copy_keeps_it_and_sizes_the_rest(workdir: Path) -> None:
    tree = Tree(workdir)
    tree.mount(OPTIONS)
    try:
        target, data = import_image(tree, seed=12)
        subprocess.run(["sync", str(target)], check=True)
        fd = os.open(target, os.O_WRONLY)
        os.pwrite(fd, b"after the fsync", SIZE + 5 * MiB)  # past the end, not synced
        assert os.stat(target).st_size == -(-(SIZE + 5 * MiB + 15) // 512) * 512
        assert tree.daemon is not None
        tree.daemon.kill9()
        tree.daemon = None
        with contextlib.suppress(OSError):
            os.close(fd)  # ENOTCONN: its mount is gone
        tree.mount(OPTIONS)
        assert tree.status()["recovered_intents"] == "1"
        # Where the data reached: the end of the 64 KiB pool block of the last write.
        reached = (SIZE + 5 * MiB) // (64 * KiB) * (64 * KiB) + 64 * KiB
        assert ls_size(target) == reached
        assert stored_size(tree, "imp", "disk") == reached
        got = target.read_bytes()
        assert sha(got[:SIZE]) == sha(data)
        assert got[SIZE + 5 * MiB : SIZE + 5 * MiB + 15] == b"after the fsync"
        assert tree.status()["inventory"] == "ok"
        # A later grow reads zeros past the old end, whatever the table reached before.
        subprocess.run(["truncate", "-s", str(400 * MiB), str(target)], check=True)
        assert ls_size(target) == 400 * MiB
        with target.open("rb") as f:
            f.seek(reached)
            assert f.read() == bytes(400 * MiB - reached)
    finally:
        tree.unmount()
    code, out = fsck(tree)
    assert code == 0, out


def test_dmthin_a_grow_after_writes_past_the_end_reads_zeros(workdir: Path) -> None:
    """The device's table runs a step ahead of the writes; a truncate while it is open,
    and another after the close, must show zeros, never what the table covered."""
    tree = Tree(workdir)
    tree.mount(OPTIONS)
    try:
        os.mkdir(tree.vms / "imp")
        target = tree.vms / "imp" / "volumes" / "disk.img"
        fd = os.open(target, os.O_WRONLY | os.O_CREAT)
        try:
            for n in range(3):
                os.pwrite(fd, bytes([n + 1]) * MiB, n * MiB)
            os.fsync(fd)
            subprocess.run(["truncate", "-s", str(32 * MiB), str(target)], check=True)
            assert ls_size(target) == 32 * MiB
            with target.open("rb") as f:
                f.seek(3 * MiB)
                assert f.read() == bytes(29 * MiB)
        finally:
            os.close(fd)
        subprocess.run(["truncate", "-s", str(300 * MiB), str(target)], check=True)
        with target.open("rb") as f:
            assert f.read(3 * MiB) == b"".join(bytes([n + 1]) * MiB for n in range(3))
            assert f.read() == bytes(297 * MiB)
        assert stored_size(tree, "imp", "disk") == 300 * MiB
    finally:
        tree.unmount()
    code, out = fsck(tree)
    assert code == 0, out
