"""The engine contract on thin devices: make, delete, grow, open and attach volumes.

Each method takes the engine's lock (calls come from several worker threads) and
checks the request before the pool is touched, so a refusal changes nothing.

A thin device has no size of its own: a volume's size is the ledger's record, or,
while writes past the end grow it, where they reached (``reserve``), recorded at the
next fsync (``commit_size``). After a crash the pool's metadata still shows where
the data reached: ``written_end`` is the end of the highest mapped block, which
recovery records. A reservation is never recorded, so no internal step becomes a
size, and nothing is mapped past a volume's size that recovery does not size.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Sequence

from vmtreefs.engine.base import Attachment, EngineError, NewVolume, OpenVolume
from vmtreefs.engine.dmthin.devices import ThinDevices
from vmtreefs.engine.dmthin.ledger import PoolLedger, Step
from vmtreefs.engine.dmthin.metadata import thin_delta, thin_ls
from vmtreefs.engine.dmthin.pool import SECTOR, ThinPool
from vmtreefs.engine.tools import run
from vmtreefs.rules import blockmap

log = logging.getLogger("vmtreefs.engine.dmthin")

MAX_ID = (1 << 24) - 1  # thin device ids are 24 bits


def check_id(vol_id: int) -> None:
    if isinstance(vol_id, bool) or not isinstance(vol_id, int) or not 0 <= vol_id <= MAX_ID:
        raise EngineError(errno.EINVAL, f"bad volume id {vol_id!r}: thin ids are 0..{MAX_ID}")


class ThinVolumes:
    """The volumes of one pool; ``space_freed`` runs after a deletion, which raises no
    pool event to tell the watcher."""

    def __init__(
        self,
        pool: ThinPool,
        ledger: PoolLedger,
        devices: ThinDevices,
        lock: threading.RLock,
        space_freed: Callable[[], None],
    ) -> None:
        self.pool = pool
        self.ledger = ledger
        self.devices = devices
        self._lock = lock
        self._space_freed = space_freed
        self._doomed: set[int] = set()  # deleted while open: removed at the last close

    def _check_known(self, vol_id: int) -> None:
        check_id(vol_id)
        if vol_id not in self.ledger.sizes:
            raise EngineError(errno.ENOENT, f"volume {vol_id} does not exist")

    def make_volumes(self, volumes: Sequence[NewVolume]) -> None:
        """All the creations and snapshots under one transaction id: a VM's clone is one
        pending record, its messages, one ``set_transaction_id`` and one record."""
        with self._lock:
            sizes = self.ledger.sizes
            steps: list[Step] = []
            for volume in volumes:
                vol_id = volume.vol_id
                check_id(vol_id)
                if vol_id in sizes or any(s.volume == vol_id for s in steps):
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
                    quiet = volume.source if self.devices.active(volume.source) else None
                    message = f"create_snap {vol_id} {volume.source}"
                    size = self.ledger.size(volume.source)
                    steps.append(Step(message, vol_id, size, quiet))
            if not steps:
                return
            self.pool.require_started()
            status = self.pool.status()
            self.pool.require_healthy(status)
            if status.data_used >= status.data_total:
                raise EngineError(errno.ENOSPC, f"pool {self.pool.name} is full")
            made = ", ".join(
                f"snapshot {v.source} as {v.vol_id}" if v.source is not None else f"new {v.vol_id}"
                for v in volumes
            )
            self.ledger.change(steps, f"make volumes {made}")

    def delete(self, vol_id: int, missing_ok: bool = False) -> None:
        with self._lock:
            check_id(vol_id)
            if vol_id not in self.ledger.sizes:
                if missing_ok:
                    return
                raise EngineError(errno.ENOENT, f"volume {vol_id} does not exist")
            if self.devices.held(vol_id):
                self._doomed.add(vol_id)  # freed when its last open file closes
                return
            self._destroy(vol_id)

    def _destroy(self, vol_id: int) -> None:
        if self.devices.active(vol_id):
            self.devices.deactivate(vol_id)
        try:
            self.ledger.change([Step(f"delete {vol_id}", vol_id, None)], f"delete volume {vol_id}")
        except EngineError as e:
            if e.errno != errno.ENOENT:
                raise
            log.warning("volume %d was already gone from pool %s", vol_id, self.pool.name)
            self.ledger.record_sizes({vol_id: None})
        self._doomed.discard(vol_id)
        self._space_freed()

    def resize(self, vol_id: int, new_size: int) -> None:
        with self._lock:
            self._check_known(vol_id)
            if new_size < self.ledger.size(vol_id):
                raise EngineError(errno.EINVAL, f"volume {vol_id}: volumes only grow")
            if new_size % SECTOR:
                raise EngineError(errno.EINVAL, f"volume size {new_size} is not whole sectors")
            self.pool.require_started()
            self.ledger.record_sizes({vol_id: new_size})
            self.devices.grow(vol_id)

    def reserve(self, vol_id: int, end: int) -> None:
        """A write past the end: the size is ``end`` at once, in memory; the device's
        table is reloaded only when ``end`` passes it, and then grown a step ahead."""
        with self._lock:
            self._check_known(vol_id)
            if end <= self.ledger.size(vol_id):
                return
            if end % SECTOR:
                raise EngineError(errno.EINVAL, f"volume size {end} is not whole sectors")
            self.pool.require_started()
            self.ledger.reached[vol_id] = end
            self.devices.extend(vol_id, end)

    def commit_size(self, vol_id: int, size: int) -> None:
        """Record a size writes reached and an fsync made durable (one ledger commit)."""
        with self._lock:
            self._check_known(vol_id)
            if size > self.ledger.sizes[vol_id]:
                self.pool.require_started()
                self.ledger.record_sizes({vol_id: min(size, self.ledger.size(vol_id))})

    def written_end(self, vol_id: int) -> int:
        """After a crash: the recorded size, or the end of the last pool block mapped past
        it (64 KiB blocks: the writes' end rounded up to a block)."""
        with self._lock:
            self._check_known(vol_id)
            self.pool.require_started()
            mapped = self.devices.mapped_end(vol_id)
            if mapped > self.ledger.size(vol_id):
                log.info(
                    "volume %d: data reaches %d bytes, past its recorded size %d",
                    vol_id,
                    mapped,
                    self.ledger.size(vol_id),
                )
            return max(self.ledger.size(vol_id), mapped)

    def discard(self, vol_id: int, size: int) -> None:
        with self._lock:
            self._check_known(vol_id)
            self.pool.require_started()
            if size > self.ledger.size(vol_id):
                self.ledger.record_sizes({vol_id: size})
            if self.ledger.size(vol_id) == 0:
                return
            was_active = self.devices.active(vol_id)
            self.devices.activate(vol_id, writable=True)
            try:
                path = self.pool.device_path(vol_id)
                run(["blkdiscard", "-f", str(path)], f"discard volume {vol_id}")
            finally:
                if not was_active:
                    self.devices.deactivate(vol_id)

    def size(self, vol_id: int) -> int:
        with self._lock:
            self._check_known(vol_id)
            return self.ledger.size(vol_id)

    def open(self, vol_id: int, writable: bool) -> OpenVolume:
        with self._lock:
            self.pool.require_started()
            self._check_known(vol_id)
            opened = DmOpenVolume(self, vol_id, writable)
            if not writable and self.ledger.size(vol_id) > 0:
                # An export's device is active read-only from the open to the last close,
                # so a backup reads one stable device and its reads never wait on dmsetup.
                opened.device_fd()
            return opened

    def acquire(self, vol_id: int, writable: bool) -> int:
        """An fd on the active device (activating it), counted until :meth:`release`."""
        with self._lock:
            return self.devices.open(vol_id, writable)

    def release(self, vol_id: int, fd: int) -> None:
        with self._lock:
            os.close(fd)
            self._let_go(vol_id)

    def _let_go(self, vol_id: int) -> None:
        if self.devices.let_go(vol_id):
            if vol_id in self._doomed:
                self._destroy(vol_id)
            else:
                self.devices.deactivate(vol_id)

    def attach(self, vol_id: int) -> Attachment:
        """The thin device, active and writable while the VM runs."""
        with self._lock:
            self.pool.require_started()
            self._check_known(vol_id)
            if self.ledger.size(vol_id) == 0:
                raise EngineError(errno.EINVAL, f"volume {vol_id} has no size: nothing to attach")
            self.devices.hold(vol_id, writable=True)
            self.devices.fit(vol_id)
            return Attachment(str(self.pool.device_path(vol_id)), block=True)

    def detach(self, vol_id: int) -> None:
        with self._lock:
            if self.devices.held(vol_id):
                self._let_go(vol_id)

    # Reports, from the pool's metadata

    def inventory(self) -> dict[int, int]:
        with self._lock:
            self.pool.require_started()
            known = self.ledger.sizes
            return {v: self.ledger.size(v) if v in known else 0 for v in thin_ls(self.pool)}

    def exclusive_bytes(self, vol_id: int) -> int:
        with self._lock:
            self._check_known(vol_id)
            self.pool.require_started()
            return thin_ls(self.pool).get(vol_id, (0, 0))[1]

    def changed_ranges(self, vol_id: int, other_id: int) -> list[tuple[int, int]]:
        with self._lock:
            self.pool.require_started()
            self._check_known(vol_id)
            self._check_known(other_id)
            ranges = thin_delta(self.pool, vol_id, other_id)
            return blockmap.clip(ranges, self.ledger.size(vol_id))


class DmOpenVolume(OpenVolume):
    """An open thin device; a volume of size 0 has no device until it grows."""

    def __init__(self, volumes: ThinVolumes, vol_id: int, writable: bool) -> None:
        super().__init__(vol_id, -1, writable)
        self.volumes = volumes

    def device_fd(self) -> int:
        """The fd, opening the device at the first use."""
        if self.fd < 0:
            if self.volumes.size(self.vol_id) == 0:
                raise EngineError(errno.EINVAL, "volume has no size yet")
            self.fd = self.volumes.acquire(self.vol_id, self.writable)
        return self.fd

    def pread(self, size: int, offset: int) -> bytes:
        if self.fd < 0 and self.volumes.size(self.vol_id) == 0:
            return b""
        return os.pread(self.device_fd(), size, offset)

    def pwrite(self, data: bytes, offset: int) -> int:
        try:
            return os.pwrite(self.device_fd(), data, offset)
        except OSError as e:
            if e.errno == errno.EIO and self.volumes.pool.full():
                raise EngineError(errno.ENOSPC, "the dm-thin pool is full") from None
            raise

    def fsync(self) -> None:
        """A write into a full pool fails only at write-back: this is where it shows."""
        if self.fd >= 0:
            try:
                os.fsync(self.fd)
            except OSError as e:
                if e.errno in (errno.EIO, errno.ENOSPC) and self.volumes.pool.full():
                    raise EngineError(errno.ENOSPC, "the dm-thin pool is full") from None
                raise

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.fd >= 0:
                self.volumes.release(self.vol_id, self.fd)
                self.fd = -1
