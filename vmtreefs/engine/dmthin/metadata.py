"""What the pool's metadata says, read by the kernel's thin tools: mappings, deltas, checks.

The tools read a metadata snapshot of the live pool (``--metadata-snap``), so the
pool stays up (a running VM may hold its devices) and they read a consistent copy.
The live readers expect their caller to hold the engine's lock and to have checked
that the pool is started.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from xml.etree import ElementTree

from vmtreefs.engine.base import EngineError
from vmtreefs.engine.dmthin.pool import SECTOR, ThinPool, digits
from vmtreefs.engine.tools import run
from vmtreefs.rules import blockmap


@contextlib.contextmanager
def metadata_snapshot(pool: ThinPool) -> Iterator[None]:
    """A metadata snapshot of the live pool, reserved for the tools that read it; the pool
    commits before it is taken, so every acknowledged write is in it."""
    pool.dm.message(pool.name, "reserve_metadata_snap", "reserve a metadata snap")
    try:
        yield
    finally:
        pool.dm.message(pool.name, "release_metadata_snap", "release metadata snap")


def thin_ls(pool: ThinPool) -> dict[int, tuple[int, int]]:
    """id -> (mapped bytes, exclusive bytes) of every thin device in the pool."""
    with metadata_snapshot(pool):
        out = run(
            [
                "thin_ls",
                "--metadata-snap",
                "--no-headers",
                "-o",
                "DEV,MAPPED_BYTES,EXCLUSIVE_BYTES",
                pool.meta_dev,
            ],
            "thin_ls",
        )
    return parse_thin_ls(out)


def parse_thin_ls(out: str) -> dict[int, tuple[int, int]]:
    """thin_ls's ``DEV MAPPED_BYTES EXCLUSIVE_BYTES`` table, by device id."""
    found: dict[int, tuple[int, int]] = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) != 3 or not digits(fields[0]):
            continue
        if not (digits(fields[1]) and digits(fields[2])):
            raise EngineError(errno.EIO, f"unexpected thin_ls line {line[:80]!r}")
        found[int(fields[0])] = (int(fields[1]), int(fields[2]))
    return found


def thin_delta(pool: ThinPool, vol_id: int, other_id: int) -> list[tuple[int, int]]:
    """Where ``vol_id`` may differ from ``other_id``, from their mappings alone."""
    with metadata_snapshot(pool):
        out = run(
            [
                "thin_delta",
                "--metadata-snap",
                "--snap1",
                str(other_id),
                "--snap2",
                str(vol_id),
                pool.meta_dev,
            ],
            f"thin_delta of volumes {other_id} and {vol_id}",
        )
    return parse_thin_delta(out)


def parse_thin_delta(xml_text: str) -> list[tuple[int, int]]:
    """Byte ranges of thin_delta's report where the two devices' mappings differ.

    Its ranges are in data blocks (``data_block_size`` sectors, on the superblock);
    everything but ``same`` counts as changed (a block only one side maps differs
    from the zeros the other side reads).
    """
    try:
        root = ElementTree.fromstring(xml_text)
    except ElementTree.ParseError as e:
        raise EngineError(errno.EIO, f"thin_delta wrote what is not XML: {e}") from None
    block_size = root.get("data_block_size", "0")
    if not digits(block_size) or int(block_size) == 0:
        raise EngineError(errno.EIO, "thin_delta's report has no data_block_size")
    block = int(block_size) * SECTOR
    ranges = []
    for diff in root.iter("diff"):
        for entry in diff:
            if entry.tag == "same":
                continue
            begin, length = entry.get("begin", "0"), entry.get("length", "0")
            if not (digits(begin) and digits(length)):
                raise EngineError(
                    errno.EIO, f"thin_delta's report has a range {begin!r}+{length!r}"
                )
            ranges.append((int(begin) * block, int(length) * block))
    return blockmap.merge(ranges)


def check_live(pool: ThinPool) -> str:
    """thin_check a metadata snapshot of the live pool."""
    with metadata_snapshot(pool):
        return run(["thin_check", "--metadata-snap", pool.meta_dev], "thin_check")


def check_inactive(pool: ThinPool) -> str:
    """thin_check the metadata of the pool, taken down; EIO with its report if it finds damage.

    A loop file is checked through a read-only loop device: thin_check opens with
    O_DIRECT, which a file on tmpfs or an overlay refuses.
    """
    if pool.layout != "loop-files":
        return run(["thin_check", pool.given_meta or ""], "thin_check")
    dev = run(["losetup", "-f", "--show", "-r", str(pool.meta_file)], "attach").strip()
    try:
        return run(["thin_check", dev], "thin_check")
    finally:
        run(["losetup", "-d", dev], f"detach {dev}")
