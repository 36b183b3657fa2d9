"""The FIEMAP reader against real XFS files (4 KiB blocks, reflink on)."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmtreefs.engine import fiemap
from vmtreefs.engine.base import EngineError
from vmtreefs.engine.fiemap import Extent, extents
from vmtreefs.engine.reflink import FICLONE

KiB = 1024
MiB = 1024 * KiB


def file_extents(
    path: Path, start: int = 0, length: int | None = None, batch: int = fiemap.EXTENTS_PER_CALL
) -> list[Extent]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return list(extents(fd, start, length, batch=batch))
    finally:
        os.close(fd)


def make_file(path: Path, size: int, writes: dict[int, bytes], fsync: bool = True) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.ftruncate(fd, size)
        for offset, data in writes.items():
            assert os.pwrite(fd, data, offset) == len(data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def clone(src: Path, dst: Path) -> None:
    src_fd = os.open(src, os.O_RDONLY)
    try:
        dst_fd = os.open(dst, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            fcntl.ioctl(dst_fd, FICLONE, src_fd)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)


@pytest.fixture
def every_other_block(xfs_dir: Path) -> Iterator[Path]:
    """A file whose 40 written 4 KiB blocks are separated by holes: 40 extents."""
    path = xfs_dir / "striped"
    make_file(path, MiB, {i * 8 * KiB: b"s" * 4 * KiB for i in range(40)})
    yield path


def test_extent_struct_layout() -> None:
    assert fiemap._HEADER.size == 32
    assert fiemap._EXTENT.size == 56
    assert fiemap.FS_IOC_FIEMAP == 0xC020660B


def test_sparse_file_with_two_written_regions(xfs_dir: Path) -> None:
    path = xfs_dir / "sparse"
    # No fsync: FIEMAP_FLAG_SYNC must flush the delayed allocations so that
    # real extents come back, not DELALLOC|UNKNOWN placeholders.
    make_file(path, 16 * MiB, {MiB: b"x" * MiB, 9 * MiB: b"y" * (2 * MiB)}, fsync=False)
    found = file_extents(path)
    assert [(e.logical, e.length) for e in found] == [(MiB, MiB), (9 * MiB, 2 * MiB)]
    assert [e.last for e in found] == [False, True]
    for e in found:
        assert not e.shared
        assert not e.unwritten
        assert not e.flags & (fiemap.FIEMAP_EXTENT_DELALLOC | fiemap.FIEMAP_EXTENT_UNKNOWN)
        assert e.physical > 0
        assert e.end == e.logical + e.length


def test_file_of_holes_has_no_extents(xfs_dir: Path) -> None:
    make_file(xfs_dir / "holes", 64 * MiB, {})
    assert file_extents(xfs_dir / "holes") == []
    make_file(xfs_dir / "empty", 0, {})
    assert file_extents(xfs_dir / "empty") == []


def test_partial_block_write_rounds_to_the_block(xfs_dir: Path) -> None:
    make_file(xfs_dir / "f", MiB, {5000: b"z"})
    [e] = file_extents(xfs_dir / "f")
    assert (e.logical, e.length) == (4 * KiB, 4 * KiB)


def test_small_batches_read_every_extent_once(every_other_block: Path) -> None:
    whole = file_extents(every_other_block)
    assert [(e.logical, e.length) for e in whole] == [(i * 8 * KiB, 4 * KiB) for i in range(40)]
    assert [e.last for e in whole] == [False] * 39 + [True]
    for batch in (1, 7, 39, 40, 41):
        assert file_extents(every_other_block, batch=batch) == whole


def test_a_range_returns_the_extents_that_overlap_it(every_other_block: Path) -> None:
    # [18 KiB, 34 KiB) touches the blocks at 16, 24 and 32 KiB; they come back whole.
    found = file_extents(every_other_block, start=18 * KiB, length=16 * KiB)
    assert [e.logical for e in found] == [16 * KiB, 24 * KiB, 32 * KiB]
    assert file_extents(every_other_block, start=4 * KiB, length=4 * KiB) == []
    assert file_extents(every_other_block, start=0, length=0) == []
    # From the middle of the block at 296 KiB to the end, resumed over several calls.
    tail = file_extents(every_other_block, start=298 * KiB, batch=2)
    assert [e.logical for e in tail] == [i * 8 * KiB for i in range(37, 40)]
    assert tail[-1].last


def test_clone_marks_both_sides_shared(xfs_dir: Path) -> None:
    make_file(xfs_dir / "a", 8 * MiB, {0: os.urandom(4 * MiB)})
    clone(xfs_dir / "a", xfs_dir / "b")
    [a] = file_extents(xfs_dir / "a")
    [b] = file_extents(xfs_dir / "b")
    assert a.shared and b.shared
    assert (
        (a.logical, a.physical, a.length)
        == (b.logical, b.physical, b.length)
        == (0, b.physical, 4 * MiB)
    )


def test_changed_ranges_of_two_clones_are_where_the_mappings_differ(xfs_dir: Path) -> None:
    """What a changed-block map is built on: a range still shared maps the same blocks."""
    make_file(xfs_dir / "a", 8 * MiB, {0: os.urandom(4 * MiB)})
    clone(xfs_dir / "a", xfs_dir / "b")
    fd = os.open(xfs_dir / "b", os.O_WRONLY)
    try:
        os.pwrite(fd, b"new" * 1000, MiB + 4 * KiB)  # 3000 bytes inside one block
        # FIEMAP_FLAG_SYNC flushes only the file being mapped. Until b's write
        # reaches the disk, XFS has not moved b's block yet (the copy-on-write is
        # a delayed allocation), so a would still see that block as SHARED.
        os.fsync(fd)
    finally:
        os.close(fd)

    def mapping(path: Path) -> dict[int, tuple[int, bool]]:
        """file block offset -> (disk address, shared), block by block."""
        blocks: dict[int, tuple[int, bool]] = {}
        for e in file_extents(path):
            for off in range(0, e.length, 4 * KiB):
                blocks[e.logical + off] = (e.physical + off, e.shared)
        return blocks

    a, b = mapping(xfs_dir / "a"), mapping(xfs_dir / "b")
    assert a.keys() == b.keys() == set(range(0, 4 * MiB, 4 * KiB))
    changed = [off for off in a if a[off][0] != b[off][0]]
    assert changed == [MiB + 4 * KiB]
    # The copy-on-write gave b a new block and left a's old one to a alone.
    assert not a[MiB + 4 * KiB][1] and not b[MiB + 4 * KiB][1]
    assert all(a[off][1] and b[off][1] for off in a if off not in changed)


def test_preallocated_space_is_unwritten(xfs_dir: Path) -> None:
    fd = os.open(xfs_dir / "f", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.posix_fallocate(fd, 0, 2 * MiB)
        [e] = list(extents(fd))
    finally:
        os.close(fd)
    assert (e.logical, e.length) == (0, 2 * MiB)
    assert e.unwritten and e.last and not e.shared


def test_unsupported_file_is_eopnotsupp() -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(EngineError) as info:
            list(extents(read_end))
        assert info.value.errno == errno.EOPNOTSUPP, info.value
    finally:
        os.close(read_end)
        os.close(write_end)


def test_other_failures_carry_the_kernel_errno() -> None:
    with pytest.raises(EngineError) as info:
        list(extents(1 << 20))  # no such descriptor
    assert info.value.errno == errno.EBADF, info.value


def test_bad_arguments_are_einval() -> None:
    for start, length, batch in ((-1, None, 1), (0, -1, 1), (0, None, 0)):
        with pytest.raises(EngineError) as info:
            list(extents(0, start, length, batch=batch))
        assert info.value.errno == errno.EINVAL
