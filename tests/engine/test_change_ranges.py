"""Changed-block maps from each engine's metadata, checked the way a backup tool uses them:
copy the older volume, apply only the listed ranges read from the newer one, and the
result must equal the newer volume byte for byte. Random write patterns, seeded.

Run against every engine fixture (dm-thin in the guest, through tests/dmthin)."""

from __future__ import annotations

import hashlib
import random
import subprocess

from tests.helpers.changes import rebuild
from vmtreefs.engine.base import SnapshotEngine
from vmtreefs.engine.dmthin import DmThinEngine
from vmtreefs.rules import blockmap

KiB = 1024
MiB = 1024 * KiB
SIZE = 16 * MiB


def scribble(engine: SnapshotEngine, vol_id: int, rng: random.Random, writes: int) -> int:
    """Random writes (1 byte to 300 KiB, anywhere, some past the old end); bytes written."""
    vol = engine.open(vol_id, writable=True)
    total = 0
    try:
        for _ in range(writes):
            length = rng.choice([1, 512, 4 * KiB, rng.randrange(1, 200 * KiB)])
            offset = rng.randrange(0, engine.size(vol_id) - length)
            vol.pwrite(rng.randbytes(length), offset)
            total += length
        vol.fsync()
    finally:
        vol.close()
    return total


def content(engine: SnapshotEngine, vol_id: int) -> bytes:
    vol = engine.open(vol_id, writable=False)
    try:
        return vol.pread(engine.size(vol_id), 0)
    finally:
        vol.close()


def rebuilt(engine: SnapshotEngine, newer: int, older: int) -> tuple[bytes, list[blockmap.Range]]:
    """``older``'s bytes, resized to ``newer``'s size, with the mapped ranges of ``newer``."""
    ranges = engine.changed_ranges(newer, older)
    return rebuild(content(engine, older), content(engine, newer), ranges), ranges


def test_applying_the_map_rebuilds_the_newer_volume(engine: SnapshotEngine) -> None:
    rng = random.Random(1)  # one pattern per engine (the guest is slow); the mount's test
    # and tests/unit/test_blockmap.py add others
    engine.create(1, SIZE)
    scribble(engine, 1, rng, 30)
    engine.snapshot(1, 2)  # the backup taken yesterday
    assert engine.changed_ranges(1, 2) == []  # nothing written since: nothing to send
    written = scribble(engine, 1, rng, 20)
    engine.resize(1, SIZE + 4 * MiB)  # the volume grew, and data went past the old end
    vol = engine.open(1, writable=True)
    try:
        vol.pwrite(b"past the old end", SIZE + MiB)
        vol.fsync()
    finally:
        vol.close()
    written += 16
    engine.snapshot(1, 3)  # today's
    scribble(engine, 2, rng, 5)  # and a write into the old one (a clone used since)

    for newer, older in [(3, 2), (2, 3), (1, 2)]:
        result, ranges = rebuilt(engine, newer, older)
        assert hashlib.sha256(result).digest() == hashlib.sha256(content(engine, newer)).digest(), (
            f"volume {newer} rebuilt from {older} and {len(ranges)} ranges differs"
        )
        assert ranges == blockmap.merge(ranges)  # sorted, no overlaps, none empty
    # Not "everything": the map of today against yesterday is about what was written
    # since, each write rounded out to the engine's block (4 KiB on XFS, 64 KiB on dm-thin).
    mapped = sum(length for _, length in engine.changed_ranges(3, 2))
    assert 0 < mapped <= written + 26 * 2 * 64 * KiB, mapped


def test_unwritten_volumes_have_an_empty_map(engine: SnapshotEngine) -> None:
    engine.create(1, SIZE)
    engine.create(2, SIZE)
    assert engine.changed_ranges(1, 2) == []  # both all zeros
    vol = engine.open(2, writable=True)
    try:
        vol.pwrite(b"x" * 4096, 8 * MiB)
        vol.fsync()
    finally:
        vol.close()
    ranges = engine.changed_ranges(1, 2)
    assert len(ranges) == 1
    offset, length = ranges[0]
    assert offset <= 8 * MiB and 8 * MiB + 4096 <= offset + length


def test_dmthin_an_export_is_active_read_only_from_open_to_last_close(dmthin: DmThinEngine) -> None:
    """A backup reads one stable device: activated read-only at the open (not at the first
    read), removed at the last close."""
    dmthin.create(1, SIZE)
    device = dmthin.path(1)
    assert not device.exists()
    first = dmthin.open(1, writable=False)
    second = dmthin.open(1, writable=False)
    try:
        assert device.exists()
        ro = subprocess.run(["blockdev", "--getro", str(device)], capture_output=True, text=True)
        assert ro.stdout.strip() == "1", ro
        first.close()
        assert device.exists()  # the second reader still has it
    finally:
        first.close()
        second.close()
    assert not device.exists()
