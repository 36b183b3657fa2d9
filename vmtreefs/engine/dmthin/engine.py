"""``DmThinEngine``: the dm-thin engine as the tree sees it, put together from its parts.

Start and stop live here because their order is the engine's safety: the store's
record is read and the pool's transaction id compared with it before anything is
touched, and the pool comes down only when nothing holds a device and its loop
files are still there.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from vmtreefs.engine.base import (
    Attachment,
    EngineError,
    EngineLedger,
    NewVolume,
    OpenVolume,
    PoolUsage,
    SnapshotEngine,
)
from vmtreefs.engine.dmthin import provision
from vmtreefs.engine.dmthin.devices import ThinDevices
from vmtreefs.engine.dmthin.ledger import PoolLedger
from vmtreefs.engine.dmthin.metadata import check_inactive, check_live
from vmtreefs.engine.dmthin.pool import SECTOR, PoolStatus, ThinPool
from vmtreefs.engine.dmthin.volumes import ThinVolumes
from vmtreefs.engine.dmthin.watcher import PoolWatcher
from vmtreefs.engine.tools import run

log = logging.getLogger("vmtreefs.engine.dmthin")


class DmThinEngine(SnapshotEngine):
    """Thin devices in a dm-thin pool on loop files (or on given block devices)."""

    name: ClassVar[str] = "dmthin"
    live_check_name = "thin_check of a metadata snapshot of the live pool"

    metadata_size = staticmethod(provision.metadata_size)
    check_request = staticmethod(provision.check_request)

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
        self.pool = ThinPool(source, layout, data_size, pool_id, data_device, metadata_device)
        self.ledger = PoolLedger(self.pool, ledger)
        self.devices = ThinDevices(self.pool, self.ledger)
        self._lock = threading.RLock()  # engine calls come from several worker threads
        self.volumes = ThinVolumes(
            self.pool, self.ledger, self.devices, self._lock, self._space_freed
        )
        self.watcher: PoolWatcher | None = None

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
        data_size = provision.check_request(layout, data_size, data_device, metadata_device)
        engine = cls(source, layout, data_size, pool_id, ledger, data_device, metadata_device)
        provision.prepare_storage(engine.pool)
        engine.ledger.record_new_pool()
        return engine

    def describe(self) -> str:
        return self.pool.describe()

    @property
    def pool_name(self) -> str:
        return self.pool.name

    def status(self) -> PoolStatus:
        return self.pool.status()

    def device_name(self, vol_id: int) -> str:
        return self.pool.device_name(vol_id)

    def path(self, vol_id: int) -> Path:
        return self.pool.device_path(vol_id)

    def start(self) -> None:
        with self._lock:
            pool, ledger = self.pool, self.ledger
            pool.broken = None
            ledger.load()
            pool.find_backing()
            pool.assemble()
            status = pool.status()
            if status.needs_check or status.mode == "Fail":
                status = self._check_and_reassemble()
            if ledger.pending is None and status.transaction_id != ledger.transaction:
                raise ledger.foreign(status.transaction_id)  # before we touch anything
            if status.sectors < pool.data_size // SECTOR:
                log.warning("finishing the growth of %s that a crash interrupted", pool.name)
                pool.reload()
            self.devices.clear_stale()
            ledger.settle_pending(status.transaction_id)
            pool.started = True
            self.watcher = PoolWatcher(pool)
            self.watcher.start()

    def _check_and_reassemble(self) -> PoolStatus:
        """After an I/O error the kernel marks the metadata as needing a check (or fails
        the pool): take the pool down, thin_check it and clear the mark, as LVM does at
        activation, then assemble it again. Damage is EIO with thin_check's report."""
        pool = self.pool
        log.warning("pool %s needs a check (an I/O error on its devices): thin_check", pool.name)
        try:
            self.devices.remove_all()
            run(["dmsetup", "remove", "--retry", pool.name], f"take down {pool.name}")
            run(["thin_check", "--clear-needs-check-flag", pool.meta_dev], "thin_check")
        except EngineError as e:
            raise EngineError(
                errno.EIO,
                f"pool {pool.name} needs a check after an I/O error on its devices, and it "
                f"failed: {e.reason}. Make the devices healthy and mount again; if thin_check "
                f"finds damage, thin_repair the metadata on {pool.meta_dev} (docs/engines.md)",
            ) from None
        pool.assemble()
        status = pool.status()
        pool.require_healthy(status)
        log.warning("pool %s: thin_check found its metadata sound and cleared the mark", pool.name)
        return status

    def stop(self) -> None:
        """Remove idle thin devices and the pool, detach the loops, check the metadata."""
        with self._lock:
            self.pool.started = False
            if self.watcher is not None:
                self.watcher.stop()
                self.watcher = None
            self.devices.deactivate_idle()
            if self.devices.any_held():
                log.warning("pool %s stays up: volumes are still open", self.pool.name)
                return
            if self.pool.backing_lost():
                return
            self.devices.remove_all()
            self.pool.dismantle()
            self.check_metadata()

    def grow_pool(self, new_size: int | None) -> int:
        """Grow the pool's data: the loop file to ``new_size``, or to the whole data device
        after its owner grew it. Recorded before the table is reloaded, so a crash in
        between is finished at the next start, never left as a pool shorter than its
        metadata."""
        with self._lock:
            self.pool.require_started()
            new_size = self.pool.grow_backing(new_size)
            self.ledger.record_data_size(new_size)
            self.pool.grow_to(new_size)
            if self.watcher is not None:
                self.watcher.check()
            return new_size

    def _space_freed(self) -> None:
        if self.watcher is not None and self.watcher.level != "ok":
            self.watcher.check()

    def check_metadata(self) -> str:
        """thin_check the metadata of the pool, taken down; EIO with its report if damaged."""
        return check_inactive(self.pool)

    def check_metadata_live(self) -> str:
        """thin_check a metadata snapshot of the live pool: the pool stays up (a running VM
        may hold its devices) and the check reads a consistent copy of the metadata."""
        with self._lock:
            self.pool.require_started()
            return check_live(self.pool)

    def check_writable(self) -> None:
        with self._lock:
            self.pool.require_started()
            self.pool.require_healthy(self.pool.status())

    def diagnose_io_error(self) -> str | None:
        try:
            self.check_writable()
        except EngineError as e:
            return e.reason
        return (
            f"pool {self.pool.name} still works: the error came from its data device "
            f"{self.pool.data_dev}; the same I/O works again once that device is healthy"
        )

    def usage(self) -> PoolUsage:
        return self.pool.usage()

    # The volumes: volumes.py carries them out

    def create(self, vol_id: int, size: int) -> None:
        self.volumes.make_volumes([NewVolume(vol_id, size)])

    def snapshot(self, src_id: int, new_id: int) -> None:
        self.volumes.make_volumes([NewVolume(new_id, source=src_id)])

    def make_volumes(self, volumes: Sequence[NewVolume]) -> None:
        self.volumes.make_volumes(volumes)

    def delete(self, vol_id: int, missing_ok: bool = False) -> None:
        self.volumes.delete(vol_id, missing_ok)

    def resize(self, vol_id: int, new_size: int) -> None:
        self.volumes.resize(vol_id, new_size)

    def discard(self, vol_id: int, size: int) -> None:
        self.volumes.discard(vol_id, size)

    def reserve(self, vol_id: int, end: int) -> None:
        self.volumes.reserve(vol_id, end)

    def commit_size(self, vol_id: int, size: int) -> None:
        self.volumes.commit_size(vol_id, size)

    def written_end(self, vol_id: int) -> int:
        return self.volumes.written_end(vol_id)

    def size(self, vol_id: int) -> int:
        return self.volumes.size(vol_id)

    def open(self, vol_id: int, writable: bool) -> OpenVolume:
        return self.volumes.open(vol_id, writable)

    def attach(self, vol_id: int) -> Attachment:
        return self.volumes.attach(vol_id)

    def detach(self, vol_id: int) -> None:
        self.volumes.detach(vol_id)

    def inventory(self) -> dict[int, int]:
        return self.volumes.inventory()

    def exclusive_bytes(self, vol_id: int) -> int:
        return self.volumes.exclusive_bytes(vol_id)

    def changed_ranges(self, vol_id: int, other_id: int) -> list[tuple[int, int]]:
        return self.volumes.changed_ranges(vol_id, other_id)
