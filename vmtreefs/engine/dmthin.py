"""The dm-thin engine: volumes are thin devices of a raw dm-thin pool that vmtreefs manages.

The pool is built from two sparse loop files in ``SOURCE/thin/`` (or from given
block devices). Thin device ids are the store's volume ids.

What the pool's metadata cannot say lives in the store, beside the intent
journal (the :class:`EngineLedger`): the volume sizes (a thin device has none of
its own) and the pool's transaction id. Docker's devicemapper driver is the
precedent. Every change of the pool (one message, or all the creations and
snapshots of a VM together) is bracketed:

1. the ledger records the change as pending, with the transaction id it will bring;
2. the messages, then ``set_transaction_id`` old -> new;
3. the ledger records the new id and sizes, and clears the pending change.

At start, a pending change the pool already carries (its id is the new one) is
recorded; one it does not (the old id) is settled the other way: the devices
its messages created are deleted again, a deletion is finished. A pool with any other id is not
ours and is refused: vmtreefs never touches another program's pool.

Devices are activated on demand as ``/dev/mapper/vmtree-<pool>-<id>`` and
removed when the last open file lets go. A watcher thread sleeps in ``dmsetup
wait`` on the pool and logs when it passes its low-water mark or fills.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from xml.etree import ElementTree

from vmtreefs.engine.base import (
    Attachment,
    EngineError,
    EngineLedger,
    NewVolume,
    OpenVolume,
    PoolUsage,
    SnapshotEngine,
)
from vmtreefs.engine.dmioctl import DmControl
from vmtreefs.engine.tools import run
from vmtreefs.rules import blockmap

log = logging.getLogger("vmtreefs.engine.dmthin")

LAYOUTS = ("loop-files", "devices")
THIN_DIR = "thin"
DATA_NAME = "data.img"
META_NAME = "metadata.img"
LEGACY_STATE_NAME = "state.json"  # the ledger before it moved into the store
SECTOR = 512
BLOCK_SECTORS = 128  # 64 KiB pool blocks: LVM's default for thin pools
MAX_THIN_DEVICES = 10000  # sizes the metadata (thin_metadata_size -m)
LOW_WATER_PERCENT = 10
MIN_DATA_SIZE = 64 * 1024 * 1024
MAX_ID = (1 << 24) - 1  # thin device ids are 24 bits
THIN_MAGIC = 27022010  # thin_disk_superblock.magic, a little-endian u64 at byte 32
# Ledger keys
TRANSACTION = "dmthin.transaction"
DATA_SIZE = "dmthin.data_size"
PENDING = "dmthin.pending"


def check_block_device(role: str, path: str | None) -> None:
    if not path or not Path(path).exists():
        raise EngineError(errno.ENOENT, f"{role} device {path!r} does not exist")
    if not Path(path).is_block_device():
        raise EngineError(errno.EINVAL, f"{role} device {path} is not a block device")


def check_no_thin_metadata(path: str) -> None:
    with open(path, "rb") as f:
        f.seek(32)
        if int.from_bytes(f.read(8), "little") == THIN_MAGIC:
            raise EngineError(
                errno.EEXIST,
                f"metadata device {path} already holds a dm-thin pool's metadata "
                "(another program's?): vmtreefs will not format it (zero its first 4 KiB "
                "if it is really free)",
            )


def backing_deleted(loop_device: str) -> bool:
    """Whether the file behind a loop device was deleted (the kernel marks it so)."""
    sysfs = Path("/sys/block") / Path(loop_device).name / "loop" / "backing_file"
    try:
        return sysfs.read_text().rstrip("\n").endswith("(deleted)")
    except OSError:
        return False


@dataclass(frozen=True)
class Step:
    """One pool message of a change, and what it leaves."""

    message: str
    volume: int
    size: int | None  # the volume's size afterwards; None: deleted
    quiet: int | None = None  # a volume whose active device is suspended around it


@dataclass(frozen=True)
class PoolStatus:
    sectors: int  # the table's length: the data size the pool runs with
    transaction_id: int
    metadata_used: int  # blocks of 4 KiB
    metadata_total: int
    data_used: int  # pool blocks
    data_total: int
    mode: str  # rw, ro, out_of_data_space, or Fail

    @classmethod
    def parse(cls, line: str) -> PoolStatus:
        # 0 41943040 thin-pool 3 152/12800 2/327680 - rw discard_passdown ...
        fields = line.split()
        if len(fields) == 4 and fields[2:] == ["thin-pool", "Fail"]:
            return cls(int(fields[1]), 0, 0, 0, 0, 0, "Fail")
        if len(fields) < 8 or fields[2] != "thin-pool":
            raise EngineError(errno.EIO, f"unexpected thin-pool status {line.strip()!r}")
        meta_used, meta_total = (int(x) for x in fields[4].split("/"))
        data_used, data_total = (int(x) for x in fields[5].split("/"))
        return cls(
            int(fields[1]), int(fields[3]), meta_used, meta_total, data_used, data_total, fields[7]
        )


class DmThinEngine(SnapshotEngine):
    """Thin devices in a dm-thin pool on loop files (or on given block devices)."""

    name: ClassVar[str] = "dmthin"

    def __init__(
        self,
        source: Path,
        layout: str,
        data_size: int,
        pool_id: str,
        ledger: EngineLedger,
        data_device: str | None = None,
        metadata_device: str | None = None,
    ) -> None:
        if layout not in LAYOUTS:
            raise EngineError(errno.EINVAL, f"unknown dm-thin layout {layout!r}")
        if not re.fullmatch(r"[a-z0-9]{1,16}", pool_id):
            raise EngineError(errno.EINVAL, f"bad pool id {pool_id!r}")
        self.source = Path(source)
        self.layout = layout
        self.data_size = data_size
        self.pool_id = pool_id
        self.dir = self.source / THIN_DIR
        self.data_file = self.dir / DATA_NAME
        self.meta_file = self.dir / META_NAME
        self.ledger = ledger
        self.given_data = data_device
        self.given_meta = metadata_device
        self.pool_name = f"vmtree-{pool_id}-pool"
        self.pool_path = f"/dev/mapper/{self.pool_name}"
        self._sizes: dict[int, int] = {}
        self._transaction = 0
        self._broken: str | None = None  # why changes are refused until the next start
        self._pending: dict[str, Any] | None = None  # a change a crash interrupted
        self._loops: list[str] = []  # loop devices under the pool (loop-files layout)
        self._watcher: PoolWatcher | None = None
        self._dm = DmControl()  # pool messages and status without a process each
        self._users: dict[int, int] = {}  # open files per active device
        self._writable: set[int] = set()  # devices active read-write
        self._doomed: set[int] = set()  # deleted while open: removed at the last close
        self._lock = threading.RLock()  # engine calls come from several worker threads
        self._started = False

    # Set-up

    @staticmethod
    def metadata_size(data_size: int) -> int:
        """Bytes of metadata the kernel's tools ask for, rounded up to 4 MiB."""
        out = run(
            [
                "thin_metadata_size",
                "-b",
                f"{BLOCK_SECTORS * SECTOR // 1024}k",
                "-s",
                f"{data_size // 1024}k",
                "-m",
                str(MAX_THIN_DEVICES),
                "-u",
                "b",
                "-n",
            ],
            "size the pool metadata",
        )
        size = int(out.split()[0])
        step = 4 * 1024 * 1024
        return max(2 * step, -(-size // step) * step)

    @classmethod
    def check_request(
        cls,
        layout: str,
        data_size: int,
        data_device: str | None = None,
        metadata_device: str | None = None,
    ) -> int:
        """Refuse a pool that cannot be built, before anything is written; returns its data size."""
        if layout == "loop-files":
            if data_size < MIN_DATA_SIZE:
                raise EngineError(
                    errno.EINVAL, f"a dm-thin pool needs at least {MIN_DATA_SIZE} bytes of data"
                )
            return data_size
        return cls._check_given_devices(data_device, metadata_device)

    @classmethod
    def initialise(
        cls,
        source: Path,
        layout: str,
        data_size: int,
        pool_id: str,
        ledger: EngineLedger,
        data_device: str | None = None,
        metadata_device: str | None = None,
    ) -> DmThinEngine:
        """Prepare a new, empty pool; returns the engine, not started."""
        data_size = cls.check_request(layout, data_size, data_device, metadata_device)
        engine = cls(source, layout, data_size, pool_id, ledger, data_device, metadata_device)
        engine.dir.mkdir(exist_ok=True)
        if layout == "loop-files":
            for path, size in (
                (engine.data_file, data_size),
                (engine.meta_file, cls.metadata_size(data_size)),
            ):
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
                try:
                    os.ftruncate(fd, size)
                    os.fsync(fd)
                finally:
                    os.close(fd)
        else:
            # A new pool starts from zeroed metadata: the kernel then formats it.
            with open(engine.given_meta or "", "r+b") as f:
                f.write(bytes(4096))
                f.flush()
                os.fsync(f.fileno())
        ledger.save_engine_state({TRANSACTION: "0", DATA_SIZE: str(data_size), PENDING: None})
        return engine

    @classmethod
    def _check_given_devices(cls, data: str | None, metadata: str | None) -> int:
        """Refuse devices that are missing, in use, too small or someone else's; returns
        the data size."""
        for role, path in (("data", data), ("metadata", metadata)):
            check_block_device(role, path)
            try:
                fd = os.open(path or "", os.O_RDONLY | os.O_EXCL)
            except OSError as e:
                raise EngineError(
                    errno.EBUSY, f"{role} device {path} is in use: {e.strerror}"
                ) from None
            os.close(fd)
            if role == "metadata":
                check_no_thin_metadata(path or "")
            found = run(["wipefs", "--noheadings", "--output", "TYPE", path or ""], "wipefs")
            if found.split():
                raise EngineError(
                    errno.EEXIST,
                    f"{role} device {path} holds {', '.join(found.split())}: vmtreefs will "
                    "not overwrite it (wipefs -a it first if it is really free)",
                )
        data_bytes = int(run(["blockdev", "--getsize64", data or ""], "size data"))
        meta_bytes = int(run(["blockdev", "--getsize64", metadata or ""], "size metadata"))
        if data_bytes < MIN_DATA_SIZE:
            raise EngineError(
                errno.EINVAL,
                f"data device {data} has {data_bytes} bytes; a pool needs at least {MIN_DATA_SIZE}",
            )
        needed = cls.metadata_size(data_bytes)
        if meta_bytes < needed:
            raise EngineError(
                errno.EINVAL,
                f"metadata device {metadata} has {meta_bytes} bytes; a pool of "
                f"{data_bytes} bytes of data needs {needed}",
            )
        return data_bytes

    def describe(self) -> str:
        where = (
            f"loop files in {self.dir}"
            if self.layout == "loop-files"
            else f"data {self.given_data}, metadata {self.given_meta}"
        )
        return f"dm-thin pool {self.pool_name} ({self.data_size // 2**20} MiB) on {where}"

    def _loop_of(self, path: Path) -> str:
        """The loop device of ``path``, attaching one if there is none."""
        out = run(["losetup", "--noheadings", "-O", "NAME", "-j", str(path)], "find loop")
        devices = [line.strip() for line in out.splitlines() if line.strip()]
        if devices:
            return devices[0]
        return run(["losetup", "-f", "--show", str(path)], f"attach {path}").strip()

    def _devices(self) -> tuple[str, str]:
        if self.layout == "devices":
            check_block_device("data", self.given_data)
            check_block_device("metadata", self.given_meta)
            return self.given_data or "", self.given_meta or ""
        for path in (self.data_file, self.meta_file):
            if not path.is_file():
                raise EngineError(
                    errno.ENOENT,
                    f"pool file {path} is missing: the pool cannot be assembled. If it was "
                    "deleted while mounted, `losetup -l` still lists its loop device, marked "
                    "(deleted): copy that device back to the file before mounting",
                )
        self._loops = [self._loop_of(self.data_file), self._loop_of(self.meta_file)]
        return self._loops[0], self._loops[1]

    def _pool_active(self) -> bool:
        try:
            self._dm.status(self.pool_name, "pool status")
        except EngineError:
            return False
        return True

    def status(self) -> PoolStatus:
        lines = self._dm.status(self.pool_name, f"status of {self.pool_name}")
        if len(lines) != 1:
            raise EngineError(errno.EIO, f"{self.pool_name} has {len(lines)} targets, not 1")
        return PoolStatus.parse(lines[0])

    def start(self) -> None:
        with self._lock:
            self._broken = None
            self._load_state()
            self._data_dev, self._meta_dev = self._devices()
            if not self._pool_active():
                table = self._pool_table()
                run(["dmsetup", "create", self.pool_name, "--table", table], "assemble pool")
                log.info("assembled %s: %s", self.pool_name, table)
            status = self.status()
            if status.mode == "Fail":
                raise EngineError(errno.EIO, f"pool {self.pool_name} has failed; run thin_check")
            if self._pending is None and status.transaction_id != self._transaction:
                raise self._foreign(status.transaction_id)  # before we touch anything
            if status.sectors < self.data_size // SECTOR:
                log.warning("finishing the growth of %s that a crash interrupted", self.pool_name)
                self._reload_pool()
            self._clear_stale_devices()
            if self._pending is not None:
                self._settle_pending(self._pending, status.transaction_id)
            self._started = True
            self._watcher = PoolWatcher(self)
            self._watcher.start()

    def _foreign(self, found: int) -> EngineError:
        return EngineError(
            errno.EINVAL,
            f"pool {self.pool_name} carries transaction id {found}, not {self._transaction} "
            "as the store records: it is not this tree's pool, or not as the store knows it; "
            "vmtreefs leaves it alone",
        )

    def _settle_pending(self, pending: dict[str, Any], found: int) -> None:
        """Finish or undo the change a crash interrupted (see the module docstring)."""
        new = int(pending["transaction"])
        sizes = {int(k): v for k, v in pending["sizes"].items()}
        what = "; ".join(pending["messages"])
        if found == new:
            self._record(new, sizes)
            log.warning("recorded %r: the pool had it, the store not yet", what)
        elif found == self._transaction:
            # Some of the messages may have been taken: delete what they made (undone)
            # and what they were to delete (finished).
            for vol_id in sizes:
                self._delete_thin(vol_id)
            gone = {vol_id: None for vol_id, size in sizes.items() if size is None}
            self.ledger.save_engine_state({PENDING: None}, gone)
            for vol_id in gone:
                self._sizes.pop(vol_id, None)
            self._pending = None
            log.warning("settled %r that a crash interrupted: creations undone", what)
        else:
            raise self._foreign(found)

    def _delete_thin(self, vol_id: int) -> None:
        """Delete a thin device from the pool if it is there."""
        try:
            self._dm.message(self.pool_name, f"delete {vol_id}", f"delete volume {vol_id}")
        except EngineError as e:
            if e.errno != errno.ENOENT:
                raise

    def _set_transaction(self, new: int) -> None:
        self._dm.message(
            self.pool_name,
            f"set_transaction_id {self._transaction} {new}",
            f"set pool transaction id {new}",
        )

    def _record(self, transaction: int, sizes: dict[int, int | None]) -> None:
        """The pool carries ``transaction``: write it, and the volumes' new sizes (None:
        gone), to the ledger."""
        self.ledger.save_engine_state({TRANSACTION: str(transaction), PENDING: None}, sizes)
        self._transaction = transaction
        self._pending = None
        for vol_id, size in sizes.items():
            if size is None:
                self._sizes.pop(vol_id, None)
            else:
                self._sizes[vol_id] = size

    def _pool_table(self) -> str:
        sectors = self.data_size // SECTOR
        low_water = max(1, sectors // BLOCK_SECTORS * LOW_WATER_PERCENT // 100)
        return (
            f"0 {sectors} thin-pool {self._meta_dev} {self._data_dev} {BLOCK_SECTORS} "
            f"{low_water} 1 error_if_no_space"
        )

    def _reload_pool(self) -> None:
        """Swap in a table for the recorded data size (the kernel grows the metadata's
        record of the data device when the pool resumes)."""
        table = self._pool_table()
        run(["dmsetup", "reload", self.pool_name, "--table", table], "reload the pool")
        run(["dmsetup", "resume", self.pool_name], "resume the pool")
        log.info("reloaded %s: %s", self.pool_name, table)

    def grow_pool(self, new_size: int | None) -> int:
        """Grow the pool's data: the loop file to ``new_size``, or to the whole data device
        after its owner grew it. Recorded before the table is reloaded, so a crash in
        between is finished at the next start, never left as a pool shorter than its
        metadata."""
        with self._lock:
            self._require_started()
            if self.layout == "loop-files":
                if new_size is None:
                    raise EngineError(errno.EINVAL, "give the new size of the pool's data")
                new_size -= new_size % (BLOCK_SECTORS * SECTOR)
            else:
                if new_size is not None:
                    raise EngineError(
                        errno.EINVAL, "a pool on a device takes its size from the device"
                    )
                new_size = int(run(["blockdev", "--getsize64", self._data_dev], "size data"))
            if new_size <= self.data_size:
                raise EngineError(
                    errno.EINVAL,
                    f"the pool has {self.data_size} bytes of data; it only grows"
                    + ("" if self.layout == "loop-files" else ": grow the data device first"),
                )
            if self.layout == "loop-files":
                os.truncate(self.data_file, new_size)
                run(["losetup", "-c", self._data_dev], f"refresh {self._data_dev}")
            self.ledger.save_engine_state({DATA_SIZE: str(new_size)})
            old, self.data_size = self.data_size, new_size
            self._reload_pool()
            log.info("grew pool %s from %d to %d bytes", self.pool_name, old, new_size)
            if self._watcher is not None:
                self._watcher.check()
            return new_size

    def _clear_stale_devices(self) -> None:
        """Thin devices a killed daemon left active: remove the idle ones so they can be
        activated afresh; one still open elsewhere (a running VM) stays and is reported."""
        for name in self._our_devices():
            try:
                run(["dmsetup", "remove", name], f"remove stale {name}")
                log.info("removed %s, left active by an earlier daemon", name)
            except EngineError as e:
                log.warning("%s stays active: %s", name, e.reason)

    def stop(self) -> None:
        """Remove idle thin devices and the pool, detach the loops, check the metadata."""
        with self._lock:
            self._started = False
            if self._watcher is not None:
                self._watcher.stop()
                self._watcher = None
            for vol_id in list(self._users):
                if self._users[vol_id] == 0:
                    self._deactivate(vol_id)
            if any(self._users.values()):
                log.warning("pool %s stays up: volumes are still open", self.pool_name)
                return
            if any(backing_deleted(dev) for dev in self._loops):
                steps = "; ".join(
                    f"dd if={dev} of={path} bs=1M conv=sparse; losetup -d {dev}"
                    for dev, path in zip(self._loops, (self.data_file, self.meta_file), strict=True)
                )
                log.error(
                    "the pool's loop files in %s were deleted while mounted: pool %s stays "
                    "assembled and its data lives only in %s until reboot. To keep it: "
                    "dmsetup remove %s; %s; then mount again",
                    self.dir,
                    self.pool_name,
                    " and ".join(self._loops),
                    self.pool_name,
                    steps,
                )
                return
            for name in self._our_devices():
                run(["dmsetup", "remove", "--retry", name], f"remove {name}")
            if self._pool_active():
                run(["dmsetup", "remove", "--retry", self.pool_name], "remove pool")
            for dev in self._loops:
                run(["losetup", "-d", dev], f"detach {dev}")
            self._loops = []
            self._dm.close()
            self.check_metadata()

    def check_metadata(self) -> str:
        """thin_check the (inactive) metadata; EIO with its report if it finds damage.

        A loop file is checked through a read-only loop device: thin_check opens with
        O_DIRECT, which a file on tmpfs or an overlay refuses.
        """
        if self.layout != "loop-files":
            return run(["thin_check", self.given_meta or ""], "thin_check")
        dev = run(["losetup", "-f", "--show", "-r", str(self.meta_file)], "attach").strip()
        try:
            return run(["thin_check", dev], "thin_check")
        finally:
            run(["losetup", "-d", dev], f"detach {dev}")

    live_check_name = "thin_check of a metadata snapshot of the live pool"

    @contextlib.contextmanager
    def _metadata_snapshot(self) -> Iterator[None]:
        """A metadata snapshot of the live pool, reserved for the tools that read it
        (``--metadata-snap``); the pool commits before it is taken. Caller holds the lock."""
        self._dm.message(self.pool_name, "reserve_metadata_snap", "reserve a metadata snap")
        try:
            yield
        finally:
            self._dm.message(self.pool_name, "release_metadata_snap", "release metadata snap")

    def check_metadata_live(self) -> str:
        """thin_check a metadata snapshot of the live pool: the pool stays up (a running VM
        may hold its devices) and the check reads a consistent copy of the metadata."""
        with self._lock:
            self._require_started()
            with self._metadata_snapshot():
                return run(["thin_check", "--metadata-snap", self._meta_dev], "thin_check")

    def changed_ranges(self, vol_id: int, other_id: int) -> list[tuple[int, int]]:
        """thin_delta of the two thin devices, read from a metadata snapshot of the live pool
        (the pool commits before reserving it, so every acknowledged write is in it)."""
        with self._lock:
            self._require_started()
            self._check_known(vol_id)
            self._check_known(other_id)
            with self._metadata_snapshot():
                out = run(
                    [
                        "thin_delta",
                        "--metadata-snap",
                        "--snap1",
                        str(other_id),
                        "--snap2",
                        str(vol_id),
                        self._meta_dev,
                    ],
                    f"thin_delta of volumes {other_id} and {vol_id}",
                )
            return blockmap.clip(parse_thin_delta(out), self._sizes[vol_id])

    def _our_devices(self) -> list[str]:
        out = run(["dmsetup", "ls"], "list devices")
        prefix = f"vmtree-{self.pool_id}-"
        names = [line.split()[0] for line in out.splitlines() if line.strip()]
        return [n for n in names if n.startswith(prefix) and n != self.pool_name]

    # The ledger

    def _load_state(self) -> None:
        meta, sizes = self.ledger.load_engine_state()
        if TRANSACTION not in meta:
            meta, sizes = self._import_legacy_state()
        try:
            self._transaction = int(meta[TRANSACTION])
            self.data_size = int(meta.get(DATA_SIZE, self.data_size))
            self._pending = json.loads(meta[PENDING]) if PENDING in meta else None
        except (KeyError, ValueError) as e:
            raise EngineError(
                errno.EINVAL, f"the store's record of the pool is damaged: {e}"
            ) from None
        self._sizes = sizes

    def _import_legacy_state(self) -> tuple[dict[str, str], dict[int, int]]:
        """Trees made before the ledger moved into the store kept it in thin/state.json."""
        legacy = self.dir / LEGACY_STATE_NAME
        try:
            data = json.loads(legacy.read_text())
            meta = {TRANSACTION: str(int(data["transaction"])), DATA_SIZE: str(data["data_size"])}
            sizes = {int(k): int(v) for k, v in data.get("sizes", {}).items()}
        except FileNotFoundError:
            raise EngineError(
                errno.ENOENT, f"the store holds no record of pool {self.pool_name}"
            ) from None
        except (KeyError, TypeError, ValueError) as e:
            raise EngineError(errno.EINVAL, f"{legacy} is damaged: {e}") from None
        self.ledger.save_engine_state(meta, sizes)
        legacy.rename(legacy.with_name(LEGACY_STATE_NAME + ".imported"))
        log.info("moved the pool's record from %s into the store", legacy)
        return meta, sizes

    def _change(self, steps: Sequence[Step], what: str) -> None:
        """Change the pool by one or more messages under one transaction id, bracketed in
        the ledger (see the module docstring): all of them, or none."""
        self._require_started()
        new = self._transaction + 1
        pending = {
            "transaction": new,
            "messages": [step.message for step in steps],
            "sizes": {str(step.volume): step.size for step in steps},
        }
        self.ledger.save_engine_state({PENDING: json.dumps(pending)})
        sent: list[Step] = []
        try:
            for step in steps:
                self._send(step, what)
                sent.append(step)
        except EngineError:
            if self._broken is None:  # the kernel refused one: take back those before it
                self._take_back(sent, what)
            if self._broken is None:
                self.ledger.save_engine_state({PENDING: None})
            raise
        try:
            self._set_transaction(new)
        except EngineError as e:
            self._broken = f"{what}: {e.reason}"
            raise EngineError(errno.EIO, f"{self._broken}; remount to reconcile") from None
        self._record(new, {step.volume: step.size for step in steps})

    def _send(self, step: Step, what: str) -> None:
        if step.quiet is not None:
            self._dm.suspend(self.device_name(step.quiet), f"{what}: suspend")
        try:
            self._dm.message(self.pool_name, step.message, what)
        finally:
            if step.quiet is not None:
                self._resume(step.quiet, what)

    def _take_back(self, sent: list[Step], what: str) -> None:
        """Delete what the messages sent so far made (only creations come in batches)."""
        for step in reversed(sent):
            try:
                if step.size is None:
                    raise EngineError(errno.EIO, f"{step.message!r} cannot be undone")
                self._delete_thin(step.volume)
            except EngineError as e:
                self._broken = f"{what}: could not take back {step.message!r}: {e.reason}"
                return

    def _resume(self, vol_id: int, what: str) -> None:
        try:
            self._dm.resume(self.device_name(vol_id), f"{what}: resume")
        except EngineError as e:
            self._broken = f"{what}: {e.reason}"
            raise

    def _require_started(self) -> None:
        if not self._started:
            raise EngineError(errno.EIO, f"dm-thin pool {self.pool_name} is not started")
        if self._broken is not None:
            raise EngineError(errno.EIO, f"pool {self.pool_name} needs a remount: {self._broken}")

    def _full(self) -> bool:
        """No free data block. The pool's mode is not asked: it leaves out_of_data_space
        only at its next commit, up to a second after space was freed."""
        status = self.status()
        return status.data_used >= status.data_total

    # Thin devices

    def device_name(self, vol_id: int) -> str:
        return f"vmtree-{self.pool_id}-{vol_id}"

    def path(self, vol_id: int) -> Path:
        return Path("/dev/mapper") / self.device_name(vol_id)

    def _table(self, vol_id: int) -> str:
        return f"0 {self._sizes[vol_id] // SECTOR} thin {self.pool_path} {vol_id}"

    def _activate(self, vol_id: int, writable: bool) -> None:
        name = self.device_name(vol_id)
        if vol_id in self._users:
            if writable and vol_id not in self._writable:
                run(["dmsetup", "suspend", name], f"suspend {name}")
                try:
                    run(["dmsetup", "reload", name, "--table", self._table(vol_id)], "reload")
                finally:
                    run(["dmsetup", "resume", name], f"resume {name}")
                self._writable.add(vol_id)
            return
        if self.path(vol_id).exists():
            # Left active by an earlier daemon because a VM still runs on it: adopt it
            # as it is (a running VM's disk is writable).
            log.info("volume %d: adopting %s, still active from before", vol_id, name)
            self._users[vol_id] = 0
            self._writable.add(vol_id)
            return
        argv = ["dmsetup", "create", name, "--table", self._table(vol_id)]
        if not writable:
            argv.insert(2, "--readonly")
        run(argv, f"activate volume {vol_id}")
        self._users[vol_id] = 0
        if writable:
            self._writable.add(vol_id)

    def _deactivate(self, vol_id: int) -> None:
        run(["dmsetup", "remove", "--retry", self.device_name(vol_id)], f"deactivate {vol_id}")
        self._users.pop(vol_id, None)
        self._writable.discard(vol_id)

    @staticmethod
    def _check_id(vol_id: int) -> None:
        if isinstance(vol_id, bool) or not isinstance(vol_id, int) or not 0 <= vol_id <= MAX_ID:
            raise EngineError(errno.EINVAL, f"bad volume id {vol_id!r}: thin ids are 0..{MAX_ID}")

    def _check_known(self, vol_id: int) -> None:
        self._check_id(vol_id)
        if vol_id not in self._sizes:
            raise EngineError(errno.ENOENT, f"volume {vol_id} does not exist")

    def create(self, vol_id: int, size: int) -> None:
        self.make_volumes([NewVolume(vol_id, size)])

    def snapshot(self, src_id: int, new_id: int) -> None:
        self.make_volumes([NewVolume(new_id, source=src_id)])

    def make_volumes(self, volumes: Sequence[NewVolume]) -> None:
        """All the creations and snapshots under one transaction id: a VM's clone is one
        pending record, its messages, one ``set_transaction_id`` and one record."""
        with self._lock:
            steps: list[Step] = []
            for volume in volumes:
                vol_id = volume.vol_id
                self._check_id(vol_id)
                if vol_id in self._sizes or any(s.volume == vol_id for s in steps):
                    raise EngineError(errno.EEXIST, f"volume {vol_id} already exists")
                if volume.source is None:
                    if volume.size < 0 or volume.size % SECTOR:
                        raise EngineError(
                            errno.EINVAL, f"volume size {volume.size} is not whole sectors"
                        )
                    steps.append(Step(f"create_thin {vol_id}", vol_id, volume.size))
                else:
                    self._check_known(volume.source)
                    # the origin must be quiet while the snapshot is taken
                    quiet = volume.source if volume.source in self._users else None
                    message = f"create_snap {vol_id} {volume.source}"
                    steps.append(Step(message, vol_id, self._sizes[volume.source], quiet))
            if not steps:
                return
            self._require_started()
            if self._full():
                raise EngineError(errno.ENOSPC, f"pool {self.pool_name} is full")
            made = ", ".join(
                f"snapshot {v.source} as {v.vol_id}" if v.source is not None else f"new {v.vol_id}"
                for v in volumes
            )
            self._change(steps, f"make volumes {made}")

    def delete(self, vol_id: int, missing_ok: bool = False) -> None:
        with self._lock:
            self._check_id(vol_id)
            if vol_id not in self._sizes:
                if missing_ok:
                    return
                raise EngineError(errno.ENOENT, f"volume {vol_id} does not exist")
            if self._users.get(vol_id):
                self._doomed.add(vol_id)  # freed when its last open file closes
                return
            self._destroy(vol_id)

    def _destroy(self, vol_id: int) -> None:
        if vol_id in self._users:
            self._deactivate(vol_id)
        try:
            self._change([Step(f"delete {vol_id}", vol_id, None)], f"delete volume {vol_id}")
        except EngineError as e:
            if e.errno != errno.ENOENT:
                raise
            log.warning("volume %d was already gone from pool %s", vol_id, self.pool_name)
            self.ledger.save_engine_state(sizes={vol_id: None})
            self._sizes.pop(vol_id, None)
        self._doomed.discard(vol_id)
        if self._watcher is not None and self._watcher.level != "ok":
            self._watcher.check()  # freeing space raises no pool event to wake the watcher

    def resize(self, vol_id: int, new_size: int) -> None:
        with self._lock:
            self._check_known(vol_id)
            if new_size < self._sizes[vol_id]:
                raise EngineError(errno.EINVAL, f"volume {vol_id}: volumes only grow")
            if new_size % SECTOR:
                raise EngineError(errno.EINVAL, f"volume size {new_size} is not whole sectors")
            self._require_started()
            self.ledger.save_engine_state(sizes={vol_id: new_size})
            self._sizes[vol_id] = new_size
            if vol_id in self._users:
                name = self.device_name(vol_id)
                argv = ["dmsetup", "reload", name, "--table", self._table(vol_id)]
                if vol_id not in self._writable:
                    argv.insert(2, "--readonly")
                run(argv, f"grow {name}")
                run(["dmsetup", "resume", name], f"grow {name}")

    def discard(self, vol_id: int, size: int) -> None:
        with self._lock:
            self._check_known(vol_id)
            self._require_started()
            if size > self._sizes[vol_id]:
                self.ledger.save_engine_state(sizes={vol_id: size})
                self._sizes[vol_id] = size
            if self._sizes[vol_id] == 0:
                return
            was_active = vol_id in self._users
            self._activate(vol_id, writable=True)
            try:
                run(["blkdiscard", "-f", str(self.path(vol_id))], f"discard volume {vol_id}")
            finally:
                if not was_active:
                    self._deactivate(vol_id)

    def size(self, vol_id: int) -> int:
        with self._lock:
            self._check_known(vol_id)
            return self._sizes[vol_id]

    def open(self, vol_id: int, writable: bool) -> OpenVolume:
        with self._lock:
            self._require_started()
            self._check_known(vol_id)
            opened = DmOpenVolume(self, vol_id, writable)
            if not writable and self._sizes[vol_id] > 0:
                # An export's device is active read-only from the open to the last close,
                # so a backup reads one stable device and its reads never wait on dmsetup.
                opened._fd()
            return opened

    def _acquire(self, vol_id: int, writable: bool) -> int:
        """An fd on the active device (activating it), counted until :meth:`_release`."""
        with self._lock:
            self._activate(vol_id, writable)
            flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
            fd = os.open(self.path(vol_id), flags)
            self._users[vol_id] += 1
            return fd

    def _release(self, vol_id: int, fd: int) -> None:
        with self._lock:
            os.close(fd)
            self._drop_user(vol_id)

    def _drop_user(self, vol_id: int) -> None:
        self._users[vol_id] -= 1
        if self._users[vol_id] == 0:
            if vol_id in self._doomed:
                self._destroy(vol_id)
            else:
                self._deactivate(vol_id)

    def attach(self, vol_id: int) -> Attachment:
        """The thin device, active and writable while the VM runs."""
        with self._lock:
            self._require_started()
            self._check_known(vol_id)
            if self._sizes[vol_id] == 0:
                raise EngineError(errno.EINVAL, f"volume {vol_id} has no size: nothing to attach")
            self._activate(vol_id, True)
            self._users[vol_id] += 1
            return Attachment(str(self.path(vol_id)), block=True)

    def detach(self, vol_id: int) -> None:
        with self._lock:
            if self._users.get(vol_id, 0) > 0:
                self._drop_user(vol_id)

    # Reports

    def _thin_ls(self) -> dict[int, tuple[int, int]]:
        """id -> (mapped bytes, exclusive bytes), from a metadata snapshot of the live pool."""
        with self._lock:
            self._require_started()
            with self._metadata_snapshot():
                out = run(
                    [
                        "thin_ls",
                        "--metadata-snap",
                        "--no-headers",
                        "-o",
                        "DEV,MAPPED_BYTES,EXCLUSIVE_BYTES",
                        self._meta_dev,
                    ],
                    "thin_ls",
                )
        found: dict[int, tuple[int, int]] = {}
        for line in out.splitlines():
            fields = line.split()
            if len(fields) == 3 and fields[0].isdigit():
                found[int(fields[0])] = (int(fields[1]), int(fields[2]))
        return found

    def inventory(self) -> dict[int, int]:
        with self._lock:
            return {vol_id: self._sizes.get(vol_id, 0) for vol_id in self._thin_ls()}

    def exclusive_bytes(self, vol_id: int) -> int:
        with self._lock:
            self._check_known(vol_id)
            return self._thin_ls().get(vol_id, (0, 0))[1]

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
    block = int(root.get("data_block_size", "0")) * SECTOR
    if block <= 0:
        raise EngineError(errno.EIO, "thin_delta's report has no data_block_size")
    ranges = []
    for diff in root.iter("diff"):
        for entry in diff:
            if entry.tag != "same":
                ranges.append(
                    (int(entry.get("begin", "0")) * block, int(entry.get("length", "0")) * block)
                )
    return blockmap.merge(ranges)


class DmOpenVolume(OpenVolume):
    """An open thin device; a volume of size 0 has no device until it grows."""

    def __init__(self, engine: DmThinEngine, vol_id: int, writable: bool) -> None:
        super().__init__(vol_id, -1, writable)
        self.engine = engine

    def _fd(self) -> int:
        if self.fd < 0:
            if self.engine.size(self.vol_id) == 0:
                raise EngineError(errno.EINVAL, "volume has no size yet")
            self.fd = self.engine._acquire(self.vol_id, self.writable)
        return self.fd

    def pread(self, size: int, offset: int) -> bytes:
        if self.fd < 0 and self.engine.size(self.vol_id) == 0:
            return b""
        return os.pread(self._fd(), size, offset)

    def pwrite(self, data: bytes, offset: int) -> int:
        try:
            return os.pwrite(self._fd(), data, offset)
        except OSError as e:
            if e.errno == errno.EIO and self.engine._full():
                raise EngineError(errno.ENOSPC, "the dm-thin pool is full") from None
            raise

    def fsync(self) -> None:
        """A write into a full pool fails only at write-back: this is where it shows."""
        if self.fd >= 0:
            try:
                os.fsync(self.fd)
            except OSError as e:
                if e.errno in (errno.EIO, errno.ENOSPC) and self.engine._full():
                    raise EngineError(errno.ENOSPC, "the dm-thin pool is full") from None
                raise

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.fd >= 0:
                self.engine._release(self.vol_id, self.fd)
                self.fd = -1


class PoolWatcher:
    """Logs when the pool passes its low-water mark, fills, or fails.

    dm-thin raises a device event for each; a thread sleeps in ``dmsetup wait``
    for the next one (as dmeventd does), so there is no polling.
    """

    def __init__(self, engine: DmThinEngine) -> None:
        self.engine = engine
        self._stopping = threading.Event()
        self._waiter: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._run, name="pool-watcher", daemon=True)
        self.level = "ok"
        self._checking = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        waiter = self._waiter
        if waiter is not None and waiter.poll() is None:
            waiter.terminate()  # our own child, by its pid
        self._thread.join(timeout=10)

    def _run(self) -> None:
        pool = self.engine.pool_name
        try:
            while not self._stopping.is_set():
                events = run(["dmsetup", "info", "-c", "--noheadings", "-o", "events", pool])
                self.check()
                self._waiter = subprocess.Popen(
                    ["dmsetup", "wait", pool, events.strip()],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                if self._waiter.wait() != 0 and not self._stopping.is_set():
                    self._stopping.wait(1.0)  # the pool went away or dmsetup failed
        except EngineError as e:
            if not self._stopping.is_set():
                log.warning("stopped watching pool %s: %s", pool, e.reason)

    def check(self) -> None:
        """Log a change of level: ok, low (past the low-water mark), full, read-only, failed."""
        with self._checking:
            self._check()

    def _check(self) -> None:
        status = self.engine.status()
        free = status.data_total - status.data_used
        low_water = max(1, status.data_total * LOW_WATER_PERCENT // 100)
        if status.mode == "Fail":
            level = "failed"
        elif status.mode == "ro":
            level = "read-only"
        elif status.mode == "out_of_data_space" or free == 0:
            level = "full"
        elif free <= low_water:
            level = "low"
        else:
            level = "ok"
        if level == self.level:
            return
        self.level = level
        block = BLOCK_SECTORS * SECTOR
        figures = (
            f"{free * block // 2**20} MiB of {status.data_total * block // 2**20} MiB free, "
            f"metadata {status.metadata_used}/{status.metadata_total} blocks"
        )
        pool = self.engine.pool_name
        if level == "ok":
            log.info("pool %s has room again: %s", pool, figures)
        elif level == "low":
            log.warning(
                "pool %s passed its low-water mark (%d%% free): %s; delete VMs or grow the "
                "pool (docs/engines.md)",
                pool,
                LOW_WATER_PERCENT,
                figures,
            )
        elif level == "full":
            log.error("pool %s is full: writes and new snapshots get ENOSPC; %s", pool, figures)
        elif level == "read-only":
            log.error(
                "pool %s went read-only (its metadata is full or damaged): nothing can be "
                "written or made; %s",
                pool,
                figures,
            )
        else:
            log.error("pool %s has failed: run thin_check on its metadata", pool)
