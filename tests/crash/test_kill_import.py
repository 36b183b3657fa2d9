"""kill -9 of the daemon while an image is copied into a new volume, and after its fsync.

A write past a volume's end is recorded only at the next fsync or close (one
``grow_volume`` intent for the whole copy); these tests check that what an fsync
acknowledged survives the kill with its size, that the mount rolls the rest of the
growth forward to where the writes reached, and that fsck is clean.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import random
import subprocess
import time
from pathlib import Path

from tests.fs.test_import import ls_size, sparse_image, stored_size
from tests.helpers.crash import killed_during, sound_after_recovery
from tests.helpers.tree import Tree

MiB = 1 << 20
SEED = int(os.environ.get("VMTREE_CRASH_SEED", str(int(time.time()))))


def test_fsynced_growth_survives_kill9_and_the_rest_rolls_forward(workdir: Path) -> None:
    tree = Tree(workdir)
    tree.mount()
    try:
        os.mkdir(tree.vms / "imp")
        target = tree.vms / "imp" / "volumes" / "disk.img"
        fd = os.open(target, os.O_WRONLY | os.O_CREAT)
        for n in range(8):
            os.pwrite(fd, bytes([n + 1]) * MiB, n * MiB)
        os.fsync(fd)  # acknowledged: 8 MiB
        os.pwrite(fd, b"after the fsync", 12 * MiB)  # past the end again, not synced
        # (Not ls: a child process forked here closes its copy of fd, and a close syncs.)
        assert os.stat(target).st_size == 12 * MiB + 512
        assert tree.daemon is not None
        tree.daemon.kill9()
        tree.daemon = None
        with contextlib.suppress(OSError):
            os.close(fd)  # ENOTCONN: its mount is gone
        tree.mount()
        assert tree.status()["recovered_intents"] == "1"  # the growth, rolled forward
        # The page cache outlived the daemon: the engine's size is where the writes got.
        assert ls_size(target) == 12 * MiB + 512
        with target.open("rb") as f:
            for n in range(8):
                assert f.read(MiB) == bytes([n + 1]) * MiB
            f.seek(12 * MiB)
            assert f.read(15) == b"after the fsync"
        sound_after_recovery(tree, "kill -9 after an fsync")
        assert stored_size(tree, "imp", "disk") == 12 * MiB + 512
    finally:
        tree.unmount()


def import_image(image: Path, target: Path) -> None:
    """cp, then sync; a dead mount's failure is the OSError ``killed_during`` expects."""
    for argv in (["cp", "--sparse=always", str(image), str(target)], ["sync", str(target)]):
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            cut = ("Transport endpoint is not connected", "Software caused connection abort")
            if any(message in done.stderr for message in cut):
                raise OSError(errno.ENOTCONN, done.stderr)
            raise AssertionError(f"{argv}: {done.stderr}")


def test_kill9_during_cp_then_sync(workdir: Path) -> None:
    """Rounds of ``cp --sparse=always IMAGE NEW.img && sync NEW.img`` cut by a kill at a
    random moment (seeded: ``VMTREE_CRASH_SEED``)."""
    print(f"VMTREE_CRASH_SEED={SEED}")
    rng = random.Random(SEED)
    tree = Tree(workdir)
    size = 64 * MiB + 3000
    image = tree.workdir / "guest.img"
    data = sparse_image(image, size, pieces=40, seed=SEED)
    digest = hashlib.sha256(data).hexdigest()
    tree.mount()
    try:
        os.mkdir(tree.vms / "imp")
        started = time.perf_counter()
        subprocess.run(
            ["cp", "--sparse=always", str(image), str(tree.vms / "imp" / "volumes" / "t.img")],
            check=True,
        )
        took = time.perf_counter() - started
        for n in range(4):
            target = tree.vms / "imp" / "volumes" / f"disk{n}.img"

            returned, _ = killed_during(
                tree, functools.partial(import_image, image, target), rng.uniform(0, 1.5 * took)
            )
            tree.mount()
            what = f"round {n} (seed {SEED}): {'returned' if returned else 'interrupted'}"
            if returned:
                assert ls_size(target) == size + 72, what
                got = target.read_bytes()[:size]
                assert hashlib.sha256(got).hexdigest() == digest, what
            elif target.exists():
                assert ls_size(target) <= size + 72, what
            print(what)
            sound_after_recovery(tree, what)
            if target.exists():
                assert stored_size(tree, "imp", f"disk{n}") == ls_size(target), what
    finally:
        tree.unmount()
