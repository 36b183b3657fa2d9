"""The pool as the kernel runs it: its names, what it stands on, its table and its status.

Every device name derives from the pool id, so a daemon finds its own devices, and
only those, after a crash. ``started`` and ``broken`` live here because every part
of the engine must refuse to change a pool that is down or out of step with the store.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from vmtreefs.engine.base import EngineError, PoolUsage
from vmtreefs.engine.dmioctl import DmControl
from vmtreefs.engine.tools import run

log = logging.getLogger("vmtreefs.engine.dmthin")

LAYOUTS = ("loop-files", "devices")
THIN_DIR = "thin"
DATA_NAME = "data.img"
META_NAME = "metadata.img"
SECTOR = 512
BLOCK_SECTORS = 128  # 64 KiB pool blocks: LVM's default for thin pools
LOW_WATER_PERCENT = 10


def check_block_device(role: str, path: str | None) -> None:
    if not path or not Path(path).exists():
        raise EngineError(errno.ENOENT, f"{role} device {path!r} does not exist")
    if not Path(path).is_block_device():
        raise EngineError(errno.EINVAL, f"{role} device {path} is not a block device")


def digits(text: str) -> bool:
    """A number as the kernel and the thin tools print one (``str.isdigit`` takes ``²``)."""
    return text.isascii() and text.isdigit()


def backing_deleted(loop_device: str) -> bool:
    """Whether the file behind a loop device was deleted (the kernel marks it so)."""
    sysfs = Path("/sys/block") / Path(loop_device).name / "loop" / "backing_file"
    try:
        return sysfs.read_text().rstrip("\n").endswith("(deleted)")
    except OSError:
        return False


@dataclass(frozen=True)
class PoolStatus:
    sectors: int  # the table's length: the data size the pool runs with
    transaction_id: int
    metadata_used: int  # blocks of 4 KiB
    metadata_total: int
    data_used: int  # pool blocks
    data_total: int
    mode: str  # rw, ro, out_of_data_space, or Fail
    needs_check: bool = False  # the kernel asks for thin_check before the pool is written

    @classmethod
    def parse(cls, line: str) -> PoolStatus:
        # 0 41943040 thin-pool 3 152/12800 2/327680 - rw discard_passdown ... - 1024
        fields = line.split()
        # A failed pool reports "Fail", or "Error" when even its status cannot be read.
        failed = len(fields) == 4 and fields[2] == "thin-pool" and fields[3] in ("Fail", "Error")
        if failed and digits(fields[1]):
            return cls(int(fields[1]), 0, 0, 0, 0, 0, "Fail")
        if len(fields) < 8 or fields[2] != "thin-pool":
            raise EngineError(errno.EIO, f"unexpected thin-pool status {line.strip()!r}")
        numbers = [fields[1], fields[3], *fields[4].split("/"), *fields[5].split("/")]
        if len(numbers) != 6 or not all(digits(n) for n in numbers):
            raise EngineError(errno.EIO, f"unexpected thin-pool status {line.strip()!r}")
        sectors, transaction, meta_used, meta_total, data_used, data_total = map(int, numbers)
        return cls(
            sectors,
            transaction,
            meta_used,
            meta_total,
            data_used,
            data_total,
            fields[7],
            "needs_check" in fields[8:],
        )


class ThinPool:
    """One pool of this tree, on loop files in ``SOURCE/thin/`` or on given block devices."""

    def __init__(
        self,
        source: Path,
        layout: str,
        data_size: int,
        pool_id: str,
        data_device: str | None = None,
        metadata_device: str | None = None,
    ) -> None:
        if layout not in LAYOUTS:
            raise EngineError(errno.EINVAL, f"unknown dm-thin layout {layout!r}")
        if not re.fullmatch(r"[a-z0-9]{1,16}", pool_id):
            raise EngineError(errno.EINVAL, f"bad pool id {pool_id!r}")
        self.source = Path(source)
        self.layout = layout
        self.data_size = data_size  # as the store records it (the ledger loads it)
        self.pool_id = pool_id
        self.dir = self.source / THIN_DIR
        self.data_file = self.dir / DATA_NAME
        self.meta_file = self.dir / META_NAME
        self.given_data = data_device
        self.given_meta = metadata_device
        self.name = f"vmtree-{pool_id}-pool"
        self.mapper_path = f"/dev/mapper/{self.name}"
        self.data_dev = ""  # the devices under the pool, found at start
        self.meta_dev = ""
        self.loops: list[str] = []  # loop devices under the pool (loop-files layout)
        self.dm = DmControl()  # pool messages and status without a process each
        self.started = False
        self.broken: str | None = None  # why changes are refused until the next start

    def describe(self) -> str:
        where = (
            f"loop files in {self.dir}"
            if self.layout == "loop-files"
            else f"data {self.given_data}, metadata {self.given_meta}"
        )
        return f"dm-thin pool {self.name} ({self.data_size // 2**20} MiB) on {where}"

    def device_name(self, vol_id: int) -> str:
        return f"vmtree-{self.pool_id}-{vol_id}"

    def device_path(self, vol_id: int) -> Path:
        return Path("/dev/mapper") / self.device_name(vol_id)

    def require_started(self) -> None:
        if not self.started:
            raise EngineError(errno.EIO, f"dm-thin pool {self.name} is not started")
        if self.broken is not None:
            raise EngineError(errno.EIO, f"pool {self.name} needs a remount: {self.broken}")

    # What it stands on

    def find_backing(self) -> None:
        """Set ``data_dev`` and ``meta_dev``, attaching the loop files where need be."""
        if self.layout == "devices":
            check_block_device("data", self.given_data)
            check_block_device("metadata", self.given_meta)
            self.data_dev, self.meta_dev = self.given_data or "", self.given_meta or ""
            return
        for path in (self.data_file, self.meta_file):
            if not path.is_file():
                raise EngineError(
                    errno.ENOENT,
                    f"pool file {path} is missing: the pool cannot be assembled. If it was "
                    "deleted while mounted, `losetup -l` still lists its loop device, marked "
                    "(deleted): copy that device back to the file before mounting",
                )
        self.loops = [self._loop_of(self.data_file), self._loop_of(self.meta_file)]
        self.data_dev, self.meta_dev = self.loops

    @staticmethod
    def _loop_of(path: Path) -> str:
        """The loop device of ``path``, attaching one if there is none."""
        out = run(["losetup", "--noheadings", "-O", "NAME", "-j", str(path)], "find loop")
        devices = [line.strip() for line in out.splitlines() if line.strip()]
        if devices:
            return devices[0]
        return run(["losetup", "-f", "--show", str(path)], f"attach {path}").strip()

    def backing_lost(self) -> bool:
        """Whether the loop files were deleted under the pool; if so, logs how to keep the
        data, which then lives only in the loop devices: the pool must stay assembled."""
        if not any(backing_deleted(dev) for dev in self.loops):
            return False
        steps = "; ".join(
            f"dd if={dev} of={path} bs=1M conv=sparse; losetup -d {dev}"
            for dev, path in zip(self.loops, (self.data_file, self.meta_file), strict=True)
        )
        log.error(
            "the pool's loop files in %s were deleted while mounted: pool %s stays "
            "assembled and its data lives only in %s until reboot. To keep it: "
            "dmsetup remove %s; %s; then mount again",
            self.dir,
            self.name,
            " and ".join(self.loops),
            self.name,
            steps,
        )
        return True

    # The kernel's pool

    def active(self) -> bool:
        try:
            self.dm.status(self.name, "pool status")
        except EngineError:
            return False
        return True

    def status(self) -> PoolStatus:
        lines = self.dm.status(self.name, f"status of {self.name}")
        if len(lines) != 1:
            raise EngineError(errno.EIO, f"{self.name} has {len(lines)} targets, not 1")
        return PoolStatus.parse(lines[0])

    def require_healthy(self, status: PoolStatus) -> None:
        """EIO, with what to do, when the kernel has stopped changing the pool: failed
        or read-only after an I/O error on its devices (or a full metadata device)."""
        if status.mode in ("Fail", "ro") or status.needs_check:
            state = {"Fail": "has failed", "ro": "is read-only"}.get(status.mode, "needs a check")
            raise EngineError(
                errno.EIO,
                f"pool {self.name} {state} after an I/O error on its devices (metadata "
                f"{self.meta_dev}, data {self.data_dev}) or a full metadata device: nothing "
                "can be made, deleted or written. Unmount the tree, make the devices healthy, "
                f"run `vmtreefs fsck --repair {self.source}`, then mount again",
            )

    def full(self) -> bool:
        """No free data block. The pool's mode is not asked: it leaves out_of_data_space
        only at its next commit, up to a second after space was freed."""
        status = self.status()
        return status.data_used >= status.data_total

    def usage(self) -> PoolUsage:
        status = self.status()
        block = BLOCK_SECTORS * SECTOR
        meta_block = 4096
        return PoolUsage(
            status.data_total * block,
            status.data_used * block,
            status.metadata_total * meta_block,
            status.metadata_used * meta_block,
        )

    def _table(self) -> str:
        sectors = self.data_size // SECTOR
        low_water = max(1, sectors // BLOCK_SECTORS * LOW_WATER_PERCENT // 100)
        return (
            f"0 {sectors} thin-pool {self.meta_dev} {self.data_dev} {BLOCK_SECTORS} "
            f"{low_water} 1 error_if_no_space"
        )

    def assemble(self) -> None:
        """Create the pool's device unless an earlier daemon left it assembled."""
        if not self.active():
            table = self._table()
            run(["dmsetup", "create", self.name, "--table", table], "assemble pool")
            log.info("assembled %s: %s", self.name, table)

    def reload(self) -> None:
        """Swap in a table for the recorded data size (the kernel grows the metadata's
        record of the data device when the pool resumes)."""
        table = self._table()
        run(["dmsetup", "reload", self.name, "--table", table], "reload the pool")
        run(["dmsetup", "resume", self.name], "resume the pool")
        log.info("reloaded %s: %s", self.name, table)

    def grow_backing(self, new_size: int | None) -> int:
        """Grow the loop file to ``new_size`` (or take the data device's new size), before
        the store records it; returns the new data size."""
        if self.layout == "loop-files":
            if new_size is None:
                raise EngineError(errno.EINVAL, "give the new size of the pool's data")
            new_size -= new_size % (BLOCK_SECTORS * SECTOR)
        else:
            if new_size is not None:
                raise EngineError(errno.EINVAL, "a pool on a device takes its size from the device")
            new_size = int(run(["blockdev", "--getsize64", self.data_dev], "size data"))
        if new_size <= self.data_size:
            raise EngineError(
                errno.EINVAL,
                f"the pool has {self.data_size} bytes of data; it only grows"
                + ("" if self.layout == "loop-files" else ": grow the data device first"),
            )
        if self.layout == "loop-files":
            os.truncate(self.data_file, new_size)
            run(["losetup", "-c", self.data_dev], f"refresh {self.data_dev}")
        return new_size

    def grow_to(self, new_size: int) -> None:
        """Run the pool at the data size the store now records."""
        old, self.data_size = self.data_size, new_size
        self.reload()
        log.info("grew pool %s from %d to %d bytes", self.name, old, new_size)

    def dismantle(self) -> None:
        """Remove the pool's device and detach its loops (its thin devices are gone)."""
        if self.active():
            run(["dmsetup", "remove", "--retry", self.name], "remove pool")
        for dev in self.loops:
            run(["losetup", "-d", dev], f"detach {dev}")
        self.loops = []
        self.dm.close()
