"""I/O errors under the engine: its devices switched to device-mapper's ``error`` target
and back (``dmsetup suspend/load/resume`` of a linear table), through a real mount.

Reads and writes that fail give EIO and a logged reason; a clone, a deletion and a
commit that need the failed device fail with EIO and leave nothing half-made; once the
device is healthy again, ``vmtreefs fsck --repair`` of the unmounted SOURCE brings the
tree back, a second fsck is clean, and the tree mounts and works.

Skipped where the kernel has no dm-thin; ``tests/dmthin`` runs them inside a guest.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fs.test_dmthin_mount import dm_cleanup, dm_names, loop_device  # noqa: F401
from tests.fs.test_fsck import fsck, volume_id
from tests.helpers.tree import Tree, ctl, error_of, listing, read_at
from vmtreefs.engine import fiemap

MiB = 1 << 20
SECTOR = 512
PATTERN = bytes(range(256)) * (MiB // 256)


@dataclass
class Flaky:
    """A dm device over a loop device whose table is switched between linear and error."""

    name: str
    under: str
    sectors: int
    switches: int = 0  # how many faults were injected

    @property
    def path(self) -> str:
        return f"/dev/mapper/{self.name}"

    def _load(self, table: str) -> None:
        # --nolockfs: a disk fails under a filesystem that is not frozen first (and a
        # shut-down XFS cannot be frozen).
        for step in (["suspend", "--nolockfs"], ["load", "--table", table], ["resume"]):
            subprocess.run(["dmsetup", step[0], self.name, *step[1:]], check=True)

    def fail(self, start: int = 0, length: int | None = None) -> None:
        """Errors for sectors [start, start + length) (all of it by default), linear elsewhere."""
        end = self.sectors if length is None else start + length
        pieces = [(0, start, "linear"), (start, end, "error"), (end, self.sectors, "linear")]
        table = "\n".join(
            f"{a} {b - a} {kind}" + (f" {self.under} {a}" if kind == "linear" else "")
            for a, b, kind in pieces
            if b > a
        )
        self._load(table)
        self.switches += 1

    def heal(self) -> None:
        self._load(f"0 {self.sectors} linear {self.under} 0")


def make_flaky(name: str, backing: Path, size: int) -> Flaky:
    under = loop_device(backing, size)
    flaky = Flaky(name, under, size // SECTOR)
    table = f"0 {flaky.sectors} linear {under} 0"
    subprocess.run(["dmsetup", "create", name, "--table", table], check=True)
    return flaky


def remove_dm(names: list[str]) -> None:
    for name in names:
        subprocess.run(["dmsetup", "remove", "--retry", name], capture_output=True)


@pytest.fixture
def flaky(workdir: Path) -> Iterator[Callable[[str, int], Flaky]]:
    """Makes flaky devices; afterwards the tree's dm devices go first (thin devices, then
    the pool), then these (dm_cleanup detaches the loops)."""
    made: list[Flaky] = []

    def make(name: str, size: int) -> Flaky:
        made.append(make_flaky(f"flaky-{name}", workdir / f"disk-{name}", size))
        return made[-1]

    try:
        yield make
    finally:
        ours = [n for n in dm_names() if n.startswith("vmtree-")]
        remove_dm(sorted(ours, key=lambda n: n.endswith("-pool")))
        remove_dm([f.name for f in made])


def drop_caches() -> None:
    """So that a read goes to the device, not to the page cache of the thin device."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def write_and_fsync(path: Path, data: bytes, offset: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(vms: Path, head: str) -> None:
    ctl(vms, head, "commit")


def fail_each_change(vms: Path) -> None:
    """A clone, a deletion and a commit each fail with EIO, and none shows half-made."""
    before = listing(vms)
    assert error_of(os.mkdir, vms / "a" / "clones" / "c") == errno.EIO
    assert error_of(os.rmdir, vms / "b") == errno.EIO
    assert error_of(commit, vms, "tpl-next") == errno.EIO
    assert listing(vms) == before


def make_vms(vms: Path) -> Path:
    """a (1 MiB written and synced), its clone b, and the versioned tpl; a's private.img."""
    os.mkdir(vms / "a")
    private = vms / "a" / "volumes" / "private.img"
    write_and_fsync(private, PATTERN, 0)
    os.mkdir(vms / "a" / "clones" / "b")
    os.mkdir(vms / "tpl")
    os.setxattr(vms / "tpl", "user.vmtree.versioned", b"1")
    return private


def repair_and_check(tree: Tree) -> str:
    """fsck --repair of the unmounted SOURCE, then a clean fsck; the tree works again."""
    code, out = fsck(tree, "--repair")
    assert code in (0, 1), out
    code, again = fsck(tree)
    assert code == 0, again
    tree.mount()
    try:
        vms = tree.vms
        assert listing(vms) == ["a", "b", "tpl", "tpl-next", "tpl-v1"]
        for vm in ("a", "b"):
            assert read_at(vms / vm / "volumes" / "private.img", MiB) == PATTERN
        os.mkdir(vms / "a" / "clones" / "c")
        assert read_at(vms / "c" / "volumes" / "private.img", MiB) == PATTERN
        os.rmdir(vms / "b")
        commit(vms, "tpl-next")
    finally:
        tree.unmount()
    return out


def test_dmthin_io_errors_give_eio_and_fsck_repair_brings_the_pool_back(
    workdir: Path, flaky: Callable[[str, int], Flaky]
) -> None:
    data, meta = flaky("data", 256 * MiB), flaky("meta", 48 * MiB)
    tree = Tree(workdir)
    tree.mount([f"data={data.path}", f"metadata={meta.path}"])
    try:
        vms = tree.vms
        private = make_vms(vms)

        data.fail()  # reads and writes of the data fail; the pool itself goes on
        drop_caches()
        assert error_of(read_at, private, MiB) == errno.EIO
        b_private = vms / "b" / "volumes" / "private.img"
        assert error_of(write_and_fsync, b_private, PATTERN, 4 * MiB) == errno.EIO
        data.heal()
        drop_caches()
        assert read_at(private, MiB) == PATTERN

        # Bad sectors past the superblock: the pool's next commit fails, and the kernel
        # marks the metadata as needing a check and stops changing the pool.
        meta.fail(start=8)
        fail_each_change(vms)
        meta.heal()
        fail_each_change(vms)  # until the pool is taken down and checked
    finally:
        tree.unmount()
    log = tree.log()
    print(log[-5000:])
    assert "read of 1048576 bytes at 0 of a/private.img: Input/output error" in log
    assert "fsync of b/private.img: Input/output error" in log
    assert "still works: the error came from its data device /dev/mapper/flaky-data" in log
    assert "after an I/O error on its devices (metadata /dev/mapper/flaky-meta" in log
    assert f"run `vmtreefs fsck --repair {tree.source}`" in log
    out = repair_and_check(tree)
    print(out)
    print(f"faults injected: data {data.switches}, metadata {meta.switches}")


def test_dmthin_reflink_io_errors_give_eio_and_a_shut_down_xfs_comes_back(
    workdir: Path, flaky: Callable[[str, int], Flaky]
) -> None:
    """The reflink engine's XFS on a flaky device (``data=DEV``): an error in a volume's
    blocks fails that read only; one in XFS's own metadata shuts the XFS down."""
    disk = flaky("xfs", 320 * MiB)
    tree = Tree(workdir)
    tree.mount(["engine=reflink", f"data={disk.path}"])
    try:
        vms = tree.vms
        private = make_vms(vms)
        engine_file = tree.source / "pool" / f"vol-{volume_id(vms, 'a', 'private')}.img"
        fd = os.open(engine_file, os.O_RDONLY)
        try:
            first = next(iter(fiemap.extents(fd)))
        finally:
            os.close(fd)

        disk.fail(first.physical // SECTOR, first.length // SECTOR)  # a's data only
        drop_caches()
        assert error_of(read_at, private, MiB) == errno.EIO
        disk.heal()
        drop_caches()
        assert read_at(private, MiB) == PATTERN
        os.mkdir(vms / "a" / "clones" / "d")  # nothing else was hurt
        os.rmdir(vms / "d")

        disk.fail()  # the next write of XFS's log fails: XFS shuts itself down
        assert error_of(write_and_fsync, private, b"lost" * 1024, 0) == errno.EIO
        fail_each_change(vms)
        disk.heal()
        fail_each_change(vms)  # until the XFS is mounted again
    finally:
        tree.unmount()
    log = tree.log()
    print(log[-5000:])
    assert "read of 1048576 bytes at 0 of a/private.img: Input/output error" in log
    assert "still takes changes: the error was in the data of a volume" in log
    assert "has shut down after an I/O error" in log
    assert "the tree's next mount mounts its XFS again" in log
    out = repair_and_check(tree)
    print(out)
    print(f"faults injected: {disk.switches}")
