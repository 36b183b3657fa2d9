"""Importing a disk image through the mount: ``cp --sparse=always`` into a new volume.

A copy grows the volume with every write past its end. The sizes users see follow
the writes, and the store records the growth once, not once per write: the count
of intents the store began (``SOURCE/vmtree.db``, read-only, as an administrator
can) shows it, each intent being a synchronous commit to begin and one to end.
"""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import subprocess
from pathlib import Path

from tests.helpers.tree import Tree

KiB = 1024
MiB = 1024 * KiB


def sparse_image(path: Path, size: int, pieces: int, seed: int) -> bytes:
    """Random 128 KiB..1 MiB pieces at scattered offsets, holes between, and data up
    to the very end (not a whole sector, so the last write rounds up); its bytes."""
    rng = random.Random(seed)
    data = bytearray(size)
    for _ in range(pieces):
        length = rng.choice((128 * KiB, 512 * KiB, MiB))
        offset = rng.randrange(0, (size - length) // (64 * KiB)) * 64 * KiB
        data[offset : offset + length] = rng.randbytes(length)
    data[size - 3000 :] = rng.randbytes(3000)
    with path.open("wb") as f:
        for offset in range(0, size, 64 * KiB):
            chunk = data[offset : offset + 64 * KiB]
            if any(chunk):
                f.seek(offset)
                f.write(chunk)
        f.truncate(size)
    return bytes(data)


def stored_size(tree: Tree, vm: str, volume: str) -> int:
    conn = sqlite3.connect(f"file:{tree.source / 'vmtree.db'}?mode=ro", uri=True)
    try:
        (size,) = conn.execute(
            "SELECT v.size FROM volumes v JOIN vms m ON v.vm_id = m.id"
            " WHERE m.name = ? AND v.name = ?",
            (vm, volume),
        ).fetchone()
        return int(size)
    finally:
        conn.close()


def ls_size(path: Path) -> int:
    """The size ``ls -l`` shows."""
    out = subprocess.run(["ls", "-l", str(path)], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[4])


def test_cp_sparse_into_a_new_volume_keeps_content_and_size_with_o1_commits(tree: Tree) -> None:
    size = 48 * MiB + 3000
    image = tree.workdir / "guest.img"
    data = sparse_image(image, size, pieces=24, seed=7)
    os.mkdir(tree.vms / "imp")
    target = tree.vms / "imp" / "volumes" / "disk.img"
    before = tree.intents_begun()

    subprocess.run(["cp", "--sparse=always", str(image), str(target)], check=True)

    begun = tree.intents_begun() - before
    # The volume's creation and its one growth (the old code began one per write: ~200).
    assert begun <= 3, f"{begun} intents for one copy"
    assert ls_size(target) == size + 72  # whole sectors, as every volume
    assert stored_size(tree, "imp", "disk") == size + 72
    assert tree.status()["open_intents"] == "0"
    got = target.read_bytes()
    assert hashlib.sha256(got[:size]).hexdigest() == hashlib.sha256(data).hexdigest()
    assert got[size:] == bytes(72)
    tree.remount()
    assert ls_size(target) == size + 72
    assert hashlib.sha256(target.read_bytes()[:size]).digest() == hashlib.sha256(data).digest()


def test_sizes_follow_writes_past_the_end_in_other_handles_and_stat(tree: Tree) -> None:
    os.mkdir(tree.vms / "imp")
    target = tree.vms / "imp" / "volumes" / "disk.img"
    target.touch()
    reader = os.open(target, os.O_RDONLY)
    writer = os.open(target, os.O_WRONLY)
    try:
        for n in range(1, 9):
            os.pwrite(writer, bytes([n]) * MiB, (n - 1) * MiB)
            assert os.stat(target).st_size == n * MiB
            assert os.fstat(reader).st_size == n * MiB
            assert os.pread(reader, 4, (n - 1) * MiB) == bytes([n]) * 4
        assert tree.status()["open_intents"] == "1"  # the growth, not yet synced
        os.fsync(writer)
        assert tree.status()["open_intents"] == "0"
        assert stored_size(tree, "imp", "disk") == 8 * MiB
    finally:
        os.close(writer)
        os.close(reader)
