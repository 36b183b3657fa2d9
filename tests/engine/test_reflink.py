"""Engine contract tests (run against every engine fixture) and reflink-specific tests.

The contract tests use only the SnapshotEngine interface, so the dm-thin engine
joins them by adding its fixture to ``engine``'s params in conftest.py.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers.images import is_mountpoint, loop_devices, run
from vmtreefs.engine import reflink
from vmtreefs.engine.base import EngineError, NewVolume, SnapshotEngine
from vmtreefs.engine.reflink import ReflinkEngine, filesystem_type

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


def write(engine: SnapshotEngine, vol_id: int, data: bytes, offset: int = 0) -> None:
    vol = engine.open(vol_id, writable=True)
    try:
        assert vol.pwrite(data, offset) == len(data)
        vol.fsync()
    finally:
        vol.close()


def read(engine: SnapshotEngine, vol_id: int, size: int, offset: int = 0) -> bytes:
    vol = engine.open(vol_id, writable=False)
    try:
        return vol.pread(size, offset)
    finally:
        vol.close()


@contextmanager
def expect_errno(code: int) -> Iterator[pytest.ExceptionInfo[EngineError]]:
    """Expect an EngineError carrying ``code``; a different errno fails with the reason shown."""
    with pytest.raises(EngineError) as info:
        yield info
    assert info.value.errno == code, f"expected {errno.errorcode[code]}, got {info.value}"


# -- contract -------------------------------------------------------------------


def test_create_reads_zeros_and_takes_no_space(engine: SnapshotEngine) -> None:
    before = engine.usage().used_bytes
    engine.create(1, 4 * GiB)  # larger than the pool: volumes are thin
    assert engine.size(1) == 4 * GiB
    for offset in (0, 2 * GiB + 12345, 4 * GiB - 4096):
        assert read(engine, 1, 4096, offset) == bytes(4096)
    assert read(engine, 1, 4096, 4 * GiB) == b""
    assert engine.usage().used_bytes - before < 1 * MiB
    assert engine.inventory() == {1: 4 * GiB}


def test_attached_volume_is_the_disk_a_vm_writes(engine: SnapshotEngine) -> None:
    """What a hypervisor writes through the attachment is the volume's data, and it stays."""
    engine.create(1, 4 * MiB)
    engine.snapshot(1, 2)
    attachment = engine.attach(2)
    try:
        fd = os.open(attachment.path, os.O_RDWR)
        try:
            os.pwrite(fd, b"written by the VM", MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        engine.detach(2)
    assert read(engine, 2, 17, MiB) == b"written by the VM"
    assert read(engine, 1, 17, MiB) == bytes(17)
    engine.detach(2)  # a second detach is harmless
    with expect_errno(errno.ENOENT):
        engine.attach(99)


def test_create_existing_is_eexist(engine: SnapshotEngine) -> None:
    engine.create(1, MiB)
    write(engine, 1, b"keep")
    with expect_errno(errno.EEXIST):
        engine.create(1, 2 * MiB)
    assert engine.size(1) == MiB
    assert read(engine, 1, 4) == b"keep"


def test_bad_arguments_are_einval(engine: SnapshotEngine) -> None:
    with expect_errno(errno.EINVAL):
        engine.create(1, -1)
    with expect_errno(errno.EINVAL):
        engine.create(-1, MiB)
    assert engine.inventory() == {}


def test_snapshot_keeps_old_data_when_origin_is_written(engine: SnapshotEngine) -> None:
    engine.create(1, 8 * MiB)
    write(engine, 1, b"A" * 4096, 0)
    write(engine, 1, b"a" * 4096, 5 * MiB)
    engine.snapshot(1, 2)
    assert engine.size(2) == 8 * MiB
    write(engine, 1, b"B" * 4096, 0)
    assert read(engine, 2, 4096, 0) == b"A" * 4096
    assert read(engine, 2, 4096, 5 * MiB) == b"a" * 4096
    assert read(engine, 1, 4096, 0) == b"B" * 4096


def test_origin_keeps_its_data_when_snapshot_is_written(engine: SnapshotEngine) -> None:
    engine.create(1, 8 * MiB)
    write(engine, 1, b"A" * 4096, 0)
    engine.snapshot(1, 2)
    write(engine, 2, b"C" * 4096, 0)
    write(engine, 2, b"D" * 4096, 7 * MiB)
    assert read(engine, 1, 4096, 0) == b"A" * 4096
    assert read(engine, 1, 4096, 7 * MiB) == bytes(4096)
    assert read(engine, 2, 4096, 0) == b"C" * 4096


def test_deleting_the_origin_keeps_the_snapshot(engine: SnapshotEngine) -> None:
    engine.create(1, 4 * MiB)
    write(engine, 1, b"origin data" * 100, 3 * MiB)
    engine.snapshot(1, 2)
    engine.snapshot(2, 3)
    engine.delete(1)
    engine.delete(2)
    assert read(engine, 3, 1100, 3 * MiB) == b"origin data" * 100
    assert engine.inventory() == {3: 4 * MiB}


def test_snapshot_of_missing_volume_is_enoent(engine: SnapshotEngine) -> None:
    with expect_errno(errno.ENOENT):
        engine.snapshot(7, 8)
    assert engine.inventory() == {}


def test_snapshot_onto_existing_volume_is_eexist(engine: SnapshotEngine) -> None:
    engine.create(1, MiB)
    engine.create(2, 2 * MiB)
    write(engine, 1, b"one")
    write(engine, 2, b"two")
    with expect_errno(errno.EEXIST):
        engine.snapshot(1, 2)
    assert read(engine, 2, 3) == b"two"
    assert engine.inventory() == {1: MiB, 2: 2 * MiB}


def test_delete_missing(engine: SnapshotEngine) -> None:
    with expect_errno(errno.ENOENT):
        engine.delete(5)
    engine.delete(5, missing_ok=True)


def test_grow_keeps_data_and_reads_zeros_beyond(engine: SnapshotEngine) -> None:
    engine.create(1, MiB)
    write(engine, 1, b"tail" * 1024, MiB - 4096)
    engine.resize(1, 3 * MiB)
    assert engine.size(1) == 3 * MiB
    assert read(engine, 1, 4096, MiB - 4096) == b"tail" * 1024
    assert read(engine, 1, 2 * MiB, MiB) == bytes(2 * MiB)
    engine.resize(1, 3 * MiB)  # same size: nothing to do
    assert engine.inventory() == {1: 3 * MiB}


def test_reserve_lets_writes_past_the_end_and_resize_then_records_it(
    engine: SnapshotEngine,
) -> None:
    """What a write past the end of a volume does: reserve (no sync), write, resize."""
    engine.create(1, MiB)
    engine.reserve(1, 2 * MiB + 512)
    assert engine.size(1) == 2 * MiB + 512
    write(engine, 1, b"past" * 128, 2 * MiB)
    engine.reserve(1, MiB)  # smaller: nothing to do, never a shrink
    engine.resize(1, 2 * MiB + 512)
    assert engine.inventory() == {1: 2 * MiB + 512}
    assert read(engine, 1, 512, 2 * MiB) == b"past" * 128
    assert read(engine, 1, MiB, MiB) == bytes(MiB)


def test_writes_far_past_the_end_commit_their_size_and_a_vm_sees_exactly_it(
    engine: SnapshotEngine,
) -> None:
    """A copy into a new volume: one open file writing past the end, reserve by reserve,
    past any step an engine may grow its device by; the committed size survives a stop
    and start, a VM's disk is the volume's size, and a later grow reads zeros."""
    engine.create(1, 0)
    vol = engine.open(1, writable=True)
    try:
        for n in range(70):  # 70 MiB: past a dm-thin table's first step of 64 MiB
            engine.reserve(1, (n + 1) * MiB)
            assert engine.size(1) == (n + 1) * MiB
            if n % 23 == 0:
                assert vol.pwrite(bytes([n + 1]) * 4096, n * MiB) == 4096
        vol.fsync()
        engine.commit_size(1, 70 * MiB)
        engine.commit_size(1, MiB)  # smaller: never a shrink
        attachment = engine.attach(1)
        try:
            if attachment.block:
                with open(attachment.path, "rb") as disk:
                    assert disk.seek(0, os.SEEK_END) == 70 * MiB
            else:
                assert os.stat(attachment.path).st_size == 70 * MiB
        finally:
            engine.detach(1)
    finally:
        vol.close()
    engine.stop()
    engine.start()
    assert engine.inventory() == {1: 70 * MiB}
    engine.resize(1, 200 * MiB)
    for n in range(0, 70, 23):
        assert read(engine, 1, 4096, n * MiB) == bytes([n + 1]) * 4096
    assert read(engine, 1, 130 * MiB, 70 * MiB) == bytes(130 * MiB)


def test_shrink_and_negative_sizes_are_einval(engine: SnapshotEngine) -> None:
    engine.create(1, 2 * MiB)
    with expect_errno(errno.EINVAL):
        engine.resize(1, MiB)
    with expect_errno(errno.EINVAL):
        engine.resize(1, -1)
    assert engine.size(1) == 2 * MiB
    with expect_errno(errno.ENOENT):
        engine.resize(9, 4 * MiB)


def test_missing_volume_is_enoent(engine: SnapshotEngine) -> None:
    with expect_errno(errno.ENOENT):
        engine.size(4)
    with expect_errno(errno.ENOENT):
        engine.open(4, writable=False)


def test_read_only_open_refuses_writes(engine: SnapshotEngine) -> None:
    engine.create(1, MiB)
    vol = engine.open(1, writable=False)
    try:
        assert not vol.writable
        with pytest.raises(OSError) as info:
            vol.pwrite(b"x", 0)
        assert info.value.errno == errno.EBADF
    finally:
        vol.close()
    vol.close()  # closing twice is harmless
    assert read(engine, 1, 1) == b"\0"


def test_stop_and_start_reassemble_the_pool_with_everything_in_it(
    engine: SnapshotEngine,
) -> None:
    engine.create(1, 4 * MiB)
    write(engine, 1, b"first")
    engine.snapshot(1, 2)
    write(engine, 2, b"second", MiB)
    engine.resize(2, 8 * MiB)
    before = engine.inventory()
    engine.stop()
    engine.start()
    assert engine.inventory() == before == {1: 4 * MiB, 2: 8 * MiB}
    assert read(engine, 2, 5) == b"first"
    assert read(engine, 2, 6, MiB) == b"second"
    assert read(engine, 1, 6, MiB) == bytes(6)
    engine.snapshot(2, 3)  # and it still changes
    assert read(engine, 3, 6, MiB) == b"second"


def test_making_several_volumes_is_all_or_nothing(engine: SnapshotEngine) -> None:
    engine.create(1, MiB)
    write(engine, 1, b"one")
    engine.make_volumes([NewVolume(2, 2 * MiB), NewVolume(3, source=1)])
    assert engine.inventory() == {1: MiB, 2: 2 * MiB, 3: MiB}
    assert read(engine, 3, 3) == b"one"
    with expect_errno(errno.ENOENT):  # the last one's source is missing
        engine.make_volumes([NewVolume(4, MiB), NewVolume(5, source=1), NewVolume(6, source=99)])
    assert engine.inventory() == {1: MiB, 2: 2 * MiB, 3: MiB}


def test_inventory_follows_creates_snapshots_and_deletes(engine: SnapshotEngine) -> None:
    expected: dict[int, int] = {}
    for vol_id in (1, 2, 10, 11):
        engine.create(vol_id, vol_id * MiB)
        expected[vol_id] = vol_id * MiB
    engine.snapshot(10, 20)
    expected[20] = 10 * MiB
    engine.resize(2, 5 * MiB)
    expected[2] = 5 * MiB
    engine.delete(1)
    del expected[1]
    engine.delete(10)
    del expected[10]
    assert engine.inventory() == expected


def test_usage_grows_when_data_is_written(engine: SnapshotEngine) -> None:
    start = engine.usage()
    assert 0 <= start.used_bytes < start.total_bytes
    engine.create(1, 64 * MiB)
    write(engine, 1, os.urandom(16 * MiB), 8 * MiB)
    after = engine.usage()
    assert after.total_bytes == start.total_bytes
    assert after.used_bytes - start.used_bytes >= 12 * MiB
    engine.snapshot(1, 2)  # shares the blocks: almost free
    assert engine.usage().used_bytes - after.used_bytes < 4 * MiB


SLACK = 256 * KiB
"""How far above the bytes written an exclusive-bytes figure may be: allocation rounds up
to whole filesystem blocks (4 KiB on these XFS pools) or thin-pool chunks (64 KiB and up)."""


def assert_about(actual: int, expected: int) -> None:
    assert expected <= actual <= expected + SLACK, (
        f"{actual} exclusive bytes ({actual / MiB:.3f} MiB), expected about {expected / MiB} MiB"
    )


def settled_exclusive_bytes(engine: SnapshotEngine, vol_id: int, expected: int) -> int:
    """exclusive_bytes once a delete has finished freeing: XFS releases an unlinked
    file's blocks in the background (inode inactivation, milliseconds later), and
    until then the volumes that shared them still see them as SHARED."""
    deadline = time.monotonic() + 10
    while True:
        got = engine.exclusive_bytes(vol_id)
        if expected <= got <= expected + SLACK or time.monotonic() > deadline:
            return got
        time.sleep(0.01)


def test_exclusive_bytes_count_written_data_only(engine: SnapshotEngine) -> None:
    engine.create(1, 4 * GiB)
    assert engine.exclusive_bytes(1) == 0  # all holes
    write(engine, 1, os.urandom(8 * MiB), 4 * MiB)
    assert_about(engine.exclusive_bytes(1), 8 * MiB)
    write(engine, 1, os.urandom(8 * MiB), 4 * MiB)  # overwriting takes no more
    assert_about(engine.exclusive_bytes(1), 8 * MiB)
    write(engine, 1, b"x" * 100, 3 * GiB + 5)  # a partial block still allocates a block
    assert_about(engine.exclusive_bytes(1), 8 * MiB + 100)
    assert engine.exclusive_bytes(1) > 8 * MiB


def test_exclusive_bytes_of_missing_volume_is_enoent(engine: SnapshotEngine) -> None:
    with expect_errno(errno.ENOENT):
        engine.exclusive_bytes(3)


def test_exclusive_bytes_follow_copy_on_write(engine: SnapshotEngine) -> None:
    engine.create(1, 64 * MiB)
    write(engine, 1, os.urandom(8 * MiB), 0)
    assert_about(engine.exclusive_bytes(1), 8 * MiB)

    # A snapshot shares every block: XFS marks the extents SHARED in both files,
    # so neither holds anything alone, and deleting either would free nothing.
    engine.snapshot(1, 2)
    assert_about(engine.exclusive_bytes(1), 0)
    assert_about(engine.exclusive_bytes(2), 0)

    # 3 MiB written to the snapshot over shared data: the snapshot gets new
    # blocks (copy-on-write), and the origin's old blocks for that range lose
    # their only other user. XFS then reports the range unshared in BOTH files,
    # at different disk addresses; the rest (0-2 and 5-8 MiB) stays SHARED.
    write(engine, 2, os.urandom(3 * MiB), 2 * MiB)
    assert_about(engine.exclusive_bytes(2), 3 * MiB)
    assert_about(engine.exclusive_bytes(1), 3 * MiB)

    # Writing where both have a hole allocates for the writer only.
    write(engine, 2, os.urandom(2 * MiB), 16 * MiB)
    assert_about(engine.exclusive_bytes(2), 5 * MiB)
    assert_about(engine.exclusive_bytes(1), 3 * MiB)

    # The origin writing over still-shared data unshares both sides again.
    write(engine, 1, os.urandom(MiB), 6 * MiB)
    assert_about(engine.exclusive_bytes(1), 4 * MiB)
    assert_about(engine.exclusive_bytes(2), 6 * MiB)

    # Writing again where a volume already has its own copy changes nothing.
    write(engine, 2, os.urandom(MiB), 2 * MiB)
    assert_about(engine.exclusive_bytes(2), 6 * MiB)
    assert_about(engine.exclusive_bytes(1), 4 * MiB)

    # With the snapshot gone, everything the origin maps is its alone again.
    engine.delete(2)
    assert_about(settled_exclusive_bytes(engine, 1, 8 * MiB), 8 * MiB)


def test_data_two_others_still_share_is_not_exclusive(engine: SnapshotEngine) -> None:
    engine.create(1, 16 * MiB)
    write(engine, 1, os.urandom(4 * MiB), 0)
    engine.snapshot(1, 2)
    engine.snapshot(2, 3)
    # Volume 2 copies 1 MiB on write: the old blocks drop from three users to
    # two (volumes 1 and 3), so they stay shared and count for neither.
    write(engine, 2, os.urandom(MiB), MiB)
    assert_about(engine.exclusive_bytes(2), MiB)
    assert_about(engine.exclusive_bytes(1), 0)
    assert_about(engine.exclusive_bytes(3), 0)
    engine.delete(3)
    assert_about(settled_exclusive_bytes(engine, 1, MiB), MiB)
    assert_about(engine.exclusive_bytes(2), MiB)


def fill(engine: SnapshotEngine, vol_id: int, limit: int) -> OSError | EngineError:
    """Write until the pool is full; the error it gave, at a write or at an fsync."""
    vol = engine.open(vol_id, writable=True)
    offset = 0
    try:
        with pytest.raises((OSError, EngineError)) as info:
            while offset < limit:
                offset += vol.pwrite(b"\xff" * MiB, offset)
                if offset % (32 * MiB) == 0:
                    vol.fsync()  # dm-thin reports a full pool only at write-back
            vol.fsync()
    finally:
        vol.close()
    assert isinstance(info.value, (OSError, EngineError))
    return info.value


def test_a_full_pool_is_enospc_and_leaves_nothing_half_made(engine: SnapshotEngine) -> None:
    # Many small extents make each reflink clone need fresh metadata blocks.
    engine.create(1, 32 * MiB)
    vol = engine.open(1, writable=True)
    try:
        for offset in range(0, 32 * MiB, 8 * KiB):
            vol.pwrite(b"f" * 4096, offset)
        vol.fsync()
    finally:
        vol.close()
    engine.create(2, 2 * GiB)  # bigger than every test pool
    assert fill(engine, 2, 2 * GiB).errno == errno.ENOSPC

    failure: EngineError | None = None
    for new_id in range(100, 1100):
        before = engine.inventory()
        try:
            engine.snapshot(1, new_id)
        except EngineError as e:
            failure = e
            break
    assert failure is not None, "the pool never filled up"
    assert failure.errno == errno.ENOSPC, failure
    assert engine.inventory() == before

    engine.delete(2)  # frees the filler: the same snapshot now works
    engine.snapshot(1, new_id)
    assert read(engine, new_id, 4096) == b"f" * 4096
    assert read(engine, new_id, 4096, 4096) == bytes(4096)


# -- reflink specifics ----------------------------------------------------------


def test_created_file_is_sparse(reflink_inplace: ReflinkEngine) -> None:
    engine = reflink_inplace
    engine.create(3, GiB)
    st = engine.path(3).stat()
    assert st.st_size == GiB
    assert st.st_blocks * 512 <= 64 * KiB
    assert engine.path(3) == engine.pool / "vol-3.img"


def test_preallocated_space_counts_as_exclusive(reflink_inplace: ReflinkEngine) -> None:
    engine = reflink_inplace
    engine.create(1, 8 * MiB)
    vol = engine.open(1, writable=True)
    try:
        os.posix_fallocate(vol.fd, 0, 2 * MiB)  # UNWRITTEN extents: reads as zeros
        vol.fsync()
    finally:
        vol.close()
    assert engine.exclusive_bytes(1) == 2 * MiB  # held until the volume goes
    # XFS does not clone unwritten extents: the snapshot gets a hole there, so
    # the preallocation stays the origin's alone and the snapshot holds nothing.
    engine.snapshot(1, 2)
    assert engine.exclusive_bytes(1) == 2 * MiB
    assert engine.exclusive_bytes(2) == 0
    assert read(engine, 2, 2 * MiB) == bytes(2 * MiB)


def test_inventory_ignores_other_files(reflink_inplace: ReflinkEngine) -> None:
    engine = reflink_inplace
    engine.create(4, MiB)
    for name in ("vol-x.img", "vol-01.img", "vol-5.img.tmp", "notes.txt", ".tmp-vol-6-1-ab.img"):
        (engine.pool / name).write_bytes(b"")
    (engine.pool / "lost+found").mkdir()
    (engine.pool / "vol-7.img").mkdir()
    assert engine.inventory() == {4: MiB}


def test_start_sweeps_temporaries_of_a_crash(reflink_inplace: ReflinkEngine) -> None:
    engine = reflink_inplace
    stale = engine.pool / ".tmp-vol-6-1234-abcd.img"
    stale.write_bytes(b"half made")
    engine.stop()
    engine.start()
    assert not stale.exists()


def test_failed_clone_leaves_nothing(
    reflink_inplace: ReflinkEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = reflink_inplace
    engine.create(1, MiB)

    def no_space(fd: int, request: int, arg: int = 0) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fcntl, "ioctl", no_space)
    with expect_errno(errno.ENOSPC):
        engine.snapshot(1, 2)
    assert sorted(os.listdir(engine.pool)) == ["vol-1.img"]
    assert engine.inventory() == {1: MiB}


def test_not_started_engine_refuses_io(xfs_dir: Path) -> None:
    engine = ReflinkEngine.initialise(xfs_dir, "inplace")
    with expect_errno(errno.EIO):
        engine.create(1, MiB)
    engine.start()
    engine.start()  # idempotent
    engine.create(1, MiB)
    engine.stop()
    engine.stop()
    with expect_errno(errno.EIO):
        engine.inventory()


def test_describe(reflink_inplace: ReflinkEngine, reflink_image: ReflinkEngine) -> None:
    assert reflink_inplace.describe() == f"reflink in place on {reflink_inplace.pool} (xfs)"
    assert reflink_image.describe() == (
        f"reflink on XFS image {reflink_image.image} (1.0 GiB) mounted at {reflink_image.pool}"
    )


def test_bad_layout_is_einval(xfs_dir: Path) -> None:
    with expect_errno(errno.EINVAL):
        ReflinkEngine(xfs_dir, "zfs")


def test_xfs_image_too_small_or_existing(ext4_dir: Path) -> None:
    with expect_errno(errno.EINVAL):
        ReflinkEngine.initialise(ext4_dir, "xfs-image", 100 * MiB)
    with expect_errno(errno.EINVAL):
        ReflinkEngine.initialise(ext4_dir, "xfs-image", None)
    assert not (ext4_dir / "reflink.xfs").exists()
    ReflinkEngine.initialise(ext4_dir, "xfs-image", 512 * MiB)
    with expect_errno(errno.EEXIST):
        ReflinkEngine.initialise(ext4_dir, "xfs-image", 512 * MiB)


def test_xfs_image_on_ext4_survives_stop_and_start(ext4_dir: Path) -> None:
    assert filesystem_type(ext4_dir) == "ext4"
    engine = ReflinkEngine.initialise(ext4_dir, "xfs-image", 512 * MiB)
    image = ext4_dir / "reflink.xfs"
    assert image.stat().st_size == 512 * MiB
    # Sparse: only metadata and the log (mkfs writes the 64 MiB log out) take space.
    assert image.stat().st_blocks * 512 < 100 * MiB
    with expect_errno(errno.EIO):
        engine.create(1, MiB)
    engine.start()
    try:
        assert is_mountpoint(engine.pool)
        assert filesystem_type(engine.pool) == "xfs"
        assert len(loop_devices(image)) == 1
        engine.create(1, 8 * MiB)
        write(engine, 1, b"persist")
        engine.snapshot(1, 2)
        write(engine, 2, b"PERSIST")
    finally:
        engine.stop()
    assert not is_mountpoint(engine.pool)
    assert loop_devices(image) == []
    engine.stop()  # idempotent

    again = ReflinkEngine(ext4_dir, "xfs-image")
    again.start()
    try:
        assert again.inventory() == {1: 8 * MiB, 2: 8 * MiB}
        assert read(again, 1, 7) == b"persist"
        assert read(again, 2, 7) == b"PERSIST"
    finally:
        again.stop()
    assert loop_devices(image) == []


def mounts_at(path: Path) -> int:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return sum(line.split()[4] == real for line in f)


def test_start_after_a_crash_reuses_the_mount(ext4_dir: Path) -> None:
    first = ReflinkEngine.initialise(ext4_dir, "xfs-image", 512 * MiB)
    first.start()
    try:
        first.create(1, MiB)
        write(first, 1, b"before the crash")
        # The daemon dies here without stop(): the image stays mounted.
        second = ReflinkEngine(ext4_dir, "xfs-image")
        second.start()
        assert mounts_at(second.pool) == 1
        assert len(loop_devices(second.image)) == 1
        assert read(second, 1, 16) == b"before the crash"
        second.stop()
        assert mounts_at(second.pool) == 0
        assert loop_devices(second.image) == []
    finally:
        first.stop()


def test_start_refuses_a_pool_that_is_someone_elses_mount(ext4_dir: Path) -> None:
    engine = ReflinkEngine.initialise(ext4_dir, "xfs-image", 512 * MiB)
    run("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(engine.pool))
    try:
        with expect_errno(errno.EBUSY):
            engine.start()
        engine.stop()  # leaves the foreign mount alone
        assert is_mountpoint(engine.pool)
    finally:
        run("umount", str(engine.pool))
    assert loop_devices(engine.image) == []


def test_unmounted_behind_its_back_is_eio(reflink_image: ReflinkEngine) -> None:
    engine = reflink_image
    engine.create(1, MiB)
    run("umount", str(engine.pool))
    with expect_errno(errno.EIO):
        engine.create(2, MiB)
    with expect_errno(errno.EIO):
        engine.inventory()


def test_a_vms_volumes_share_one_fsync_of_the_pool_directory(
    reflink_inplace: ReflinkEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = reflink_inplace
    engine.create(1, MiB)
    synced: list[Path] = []
    real = reflink._fsync_dir

    def counting(directory: Path) -> None:
        synced.append(directory)
        real(directory)

    monkeypatch.setattr(reflink, "_fsync_dir", counting)
    engine.make_volumes([NewVolume(2, MiB), NewVolume(3, source=1), NewVolume(4, source=1)])
    assert synced == [engine.pool]  # after all three names, not once per volume
    engine.create(5, MiB)  # outside a batch, each volume syncs its own name
    assert synced == [engine.pool, engine.pool]
