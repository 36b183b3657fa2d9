"""The interface every snapshot engine implements.

Volumes are named by integer ids that the store allocates and never reuses, so
a dm-thin engine can use them as thin device ids and a file engine as file
names. Every method is blocking: callers run them off the trio loop. Every
refusal is an :class:`EngineError` carrying the errno the user should see.
"""

from __future__ import annotations

import abc
import errno
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from vmtreefs import pagecache
from vmtreefs.errors import VmtreeError


class EngineError(VmtreeError):
    """An engine refusal or failure; ``errno`` is what the user sees (ENOSPC, ENOENT, EEXIST...)."""


class EngineLedger(Protocol):
    """Where an engine keeps what its storage cannot record itself, durably and in the
    same store as the intent journal (the store implements it): a crash between an
    engine change and its record is then reconciled from one place."""

    def load_engine_state(self) -> tuple[dict[str, str], dict[int, int]]:
        """(keys, volume sizes) as last saved."""
        ...

    def save_engine_state(
        self,
        meta: Mapping[str, str | None] | None = None,
        sizes: Mapping[int, int | None] | None = None,
    ) -> None:
        """Set or (with None) delete keys and sizes, all in one durable commit."""
        ...


@dataclass(frozen=True)
class NewVolume:
    """One volume of a :meth:`SnapshotEngine.make_volumes` call."""

    vol_id: int
    size: int = 0  # of a new, empty volume
    source: int | None = None  # or a snapshot of this volume (at its size)


@dataclass(frozen=True)
class Attachment:
    """How a hypervisor reaches a volume while a VM runs: a file or a block device."""

    path: str
    block: bool


@dataclass(frozen=True)
class PoolUsage:
    total_bytes: int
    used_bytes: int
    metadata_total_bytes: int = 0  # engines with separate metadata (dm-thin)
    metadata_used_bytes: int = 0


class OpenVolume:
    """A volume opened for I/O. The engine may activate a device on open and release it on close."""

    def __init__(self, vol_id: int, fd: int, writable: bool) -> None:
        self.vol_id = vol_id
        self.fd = fd
        self.writable = writable
        self.closed = False

    def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def cached(self, size: int, offset: int) -> bool:
        """Whether :meth:`pread` of this range would not wait for the disk."""
        return self.fd >= 0 and pagecache.cached(self.fd, offset, size)

    def pwrite(self, data: bytes, offset: int) -> int:
        return os.pwrite(self.fd, data, offset)

    def fsync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)


class SnapshotEngine(abc.ABC):
    """Create, snapshot, delete, grow and open volumes; report what exists and how full it is."""

    name: ClassVar[str]

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for logs and .vmtree/status, e.g. 'reflink on XFS image /s/reflink.xfs'."""

    @abc.abstractmethod
    def start(self) -> None:
        """Make the backing storage usable (attach loop devices, mount); idempotent."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Release what start() set up; idempotent."""

    @abc.abstractmethod
    def create(self, vol_id: int, size: int) -> None:
        """A new volume of ``size`` bytes that reads as zeros and takes no space until written."""

    @abc.abstractmethod
    def snapshot(self, src_id: int, new_id: int) -> None:
        """A copy-on-write copy of ``src_id``; later writes to either never show in the other."""

    def make_volumes(self, volumes: Sequence[NewVolume]) -> None:
        """Create or snapshot several volumes (a VM's) as one step: all, or none.

        Engines that can do it in one transaction override this; here each is
        made in turn, and on a failure the ones made are deleted again.
        """
        made: list[int] = []
        try:
            for volume in volumes:
                if volume.source is None:
                    self.create(volume.vol_id, volume.size)
                else:
                    self.snapshot(volume.source, volume.vol_id)
                made.append(volume.vol_id)
        except BaseException:
            for vol_id in reversed(made):
                self.delete(vol_id, missing_ok=True)
            raise

    @abc.abstractmethod
    def delete(self, vol_id: int, missing_ok: bool = False) -> None:
        """Remove a volume; its snapshots keep their data."""

    @abc.abstractmethod
    def discard(self, vol_id: int, size: int) -> None:
        """Make the volume read as zeros at ``size`` bytes, in place: open files see it too."""

    @abc.abstractmethod
    def resize(self, vol_id: int, new_size: int) -> None:
        """Grow a volume; shrinking is refused with EINVAL."""

    def reserve(self, vol_id: int, end: int) -> None:
        """Let writes reach ``end`` (whole sectors) before the new size is recorded.

        A write past the end grows the volume this way: :meth:`size` is ``end`` at
        once, and the caller makes a size durable later (after an fsync) with
        :meth:`commit_size`. Until then a crash may leave the volume anywhere from the
        last durable size to where the writes reached (:meth:`written_end`); it reads
        as zeros wherever nothing was written. The default is a durable
        :meth:`resize`; an engine where that costs a sync or a reload overrides it.
        """
        if end > self.size(vol_id):
            self.resize(vol_id, end)

    def commit_size(self, vol_id: int, size: int) -> None:
        """Make ``size``, reached by :meth:`reserve` and fsync'd, the volume's durable
        size (never a shrink: a smaller ``size`` changes nothing). Called before the
        store records it, so the engine never holds less than the store. The default
        does nothing: where a reserve is a truncate, the fsync made the size durable."""
        return None

    def written_end(self, vol_id: int) -> int:
        """After a crash: where writes past the last durable size reached, as far as the
        engine can tell, at least :meth:`size`. Recovery rolls a growth by writes
        forward to it; it must never be an internal reservation nobody wrote."""
        return self.size(vol_id)

    @abc.abstractmethod
    def size(self, vol_id: int) -> int:
        """The volume's size in bytes (ENOENT if it does not exist)."""

    @abc.abstractmethod
    def open(self, vol_id: int, writable: bool) -> OpenVolume:
        """Open for reading (and writing when ``writable``)."""

    @abc.abstractmethod
    def attach(self, vol_id: int) -> Attachment:
        """Make the volume usable as a VM's disk until :meth:`detach` (counted, like open)."""

    @abc.abstractmethod
    def detach(self, vol_id: int) -> None:
        """The VM no longer uses the volume; missing volumes are ignored."""

    @abc.abstractmethod
    def inventory(self) -> dict[int, int]:
        """Every volume the engine holds: id -> size in bytes."""

    @abc.abstractmethod
    def usage(self) -> PoolUsage:
        """Pool capacity and bytes in use."""

    def grow_pool(self, new_size: int | None) -> int:
        """Make the pool bigger (``None``: to what its device now holds); returns the size."""
        raise EngineError(
            errno.ENOTSUP,
            f"the {self.name} engine cannot grow its pool: grow its filesystem (docs/engines.md)",
        )

    def check_writable(self) -> None:
        """EIO, saying why and what to do, when the storage cannot take a change now (a
        failed pool, a filesystem shut down by I/O errors). The tree asks before it
        records a change the engine would then have to carry out. The default checks
        nothing: the change itself fails if it must."""
        return None

    def diagnose_io_error(self) -> str | None:
        """After an I/O error from a volume: the state of the storage and what to do,
        in words for the log; None if the engine cannot tell."""
        return None

    live_check_name: ClassVar[str] = ""
    """What :meth:`check_metadata_live` runs, in words (for fsck's report)."""

    def check_metadata_live(self) -> str | None:
        """Check the engine's own metadata while it is in use; None where it keeps none
        (a reflink pool is a filesystem: xfs_repair or btrfs check, unmounted, are its
        checks). EIO with the checker's report if it finds damage."""
        return None

    def changed_ranges(self, vol_id: int, other_id: int) -> list[tuple[int, int]]:
        """(offset, length) byte ranges where ``vol_id`` may differ from ``other_id``,
        from the engine's metadata alone (no data is read); see :mod:`vmtreefs.blockmap`."""
        raise EngineError(errno.EOPNOTSUPP, f"{self.name} cannot map changed blocks")

    @abc.abstractmethod
    def exclusive_bytes(self, vol_id: int) -> int:
        """Bytes of the volume's data that no other volume shares: what deleting it would free.

        Data a snapshot still shares with its origin counts for neither of them,
        so a fresh snapshot and its origin both hold about 0. Once either side
        overwrites a shared range, both copies of that range become exclusive:
        the writer's new copy and the other side's old one. Holes count for
        nothing; space allocated but never written (preallocated zeros) counts,
        because it is held until the volume goes. The figure is rounded to the
        engine's allocation unit (filesystem block, thin-pool chunk), and may
        briefly lag behind writes to other volumes that are not on disk yet and
        behind deletes the storage completes in the background. ENOENT if the
        volume does not exist.
        """
