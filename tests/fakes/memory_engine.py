"""An in-memory snapshot engine for fast tests of the orchestrator, held to the engine contract.

It keeps each volume as a map from 4 KiB block number to a refcounted block of
data, so a snapshot copies the map and shares every block, and a write to a
shared block copies it: the same sharing, exclusive-bytes and change-map
behaviour as a reflink pool, with no filesystem, loop device or root. The pool
has a capacity; data blocks and the maps themselves (8 bytes an entry) count
against it, so a full pool refuses writes and snapshots with ENOSPC as a real
one does.

``tests/engine/conftest.py`` runs the whole engine contract suite on it
(``engine`` fixture, param ``memory``): passing it is what makes this fake a
fair stand-in. It is never the proof that a feature works; the real engines
are, through the same suite and through real mounts.

What a hypervisor would write goes through :meth:`attach`: the volume is
written out to a sparse file, and read back into the maps at :meth:`detach`.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from vmtreefs.engine.base import (
    Attachment,
    EngineError,
    OpenVolume,
    PoolUsage,
    SnapshotEngine,
)
from vmtreefs.rules import blockmap

BLOCK = 4096
MAP_ENTRY = 8  # bytes of metadata a mapped block costs
ZERO = bytes(BLOCK)


class _Volume:
    def __init__(self, size: int, blocks: dict[int, int] | None = None) -> None:
        self.size = size
        self.blocks: dict[int, int] = blocks if blocks is not None else {}  # block -> data id

    @property
    def metadata(self) -> int:
        return -(-len(self.blocks) * MAP_ENTRY // BLOCK) * BLOCK


class MemoryEngine(SnapshotEngine):
    """Volumes as refcounted 4 KiB blocks in memory; see the module's text."""

    name: ClassVar[str] = "memory"

    def __init__(self, capacity: int = 256 << 20) -> None:
        self.capacity = capacity
        self._volumes: dict[int, _Volume] = {}
        self._data: dict[int, bytes] = {}
        self._refs: dict[int, int] = {}
        self._ids = itertools.count(1)
        self._attached: dict[int, tuple[Path, int]] = {}  # vol id -> (file, attach count)
        self._scratch: Path | None = None

    # Pool

    def describe(self) -> str:
        return f"memory (a test engine, {self.capacity >> 20} MiB)"

    def start(self) -> None:
        """Nothing to assemble: the maps live in this object."""

    def stop(self) -> None:
        for vol_id in list(self._attached):
            self._sync_back(vol_id)
        self._attached.clear()
        if self._scratch is not None:  # the attachment files, all read back
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def _used(self) -> int:
        return len(self._data) * BLOCK + sum(v.metadata for v in self._volumes.values())

    def usage(self) -> PoolUsage:
        return PoolUsage(total_bytes=self.capacity, used_bytes=self._used())

    def inventory(self) -> dict[int, int]:
        return {vol_id: v.size for vol_id, v in self._volumes.items()}

    # Volumes

    def _get(self, vol_id: int) -> _Volume:
        try:
            return self._volumes[vol_id]
        except KeyError:
            raise EngineError(errno.ENOENT, f"memory: no volume {vol_id}") from None

    @staticmethod
    def _check_new(vol_id: int, size: int) -> None:
        if vol_id < 0 or size < 0:
            raise EngineError(errno.EINVAL, f"memory: bad volume id {vol_id} or size {size}")

    def create(self, vol_id: int, size: int) -> None:
        self._check_new(vol_id, size)
        if vol_id in self._volumes:
            raise EngineError(errno.EEXIST, f"memory: volume {vol_id} exists")
        self._volumes[vol_id] = _Volume(size)

    def snapshot(self, src_id: int, new_id: int) -> None:
        src = self._get(src_id)
        self._check_new(new_id, src.size)
        if new_id in self._volumes:
            raise EngineError(errno.EEXIST, f"memory: volume {new_id} exists")
        self._sync_back(src_id)
        copy = _Volume(src.size, dict(src.blocks))
        if self._used() + copy.metadata > self.capacity:
            raise EngineError(errno.ENOSPC, f"memory: no room for the map of volume {new_id}")
        for data_id in copy.blocks.values():
            self._refs[data_id] += 1
        self._volumes[new_id] = copy

    def delete(self, vol_id: int, missing_ok: bool = False) -> None:
        if vol_id not in self._volumes:
            if missing_ok:
                return
            raise EngineError(errno.ENOENT, f"memory: no volume {vol_id}")
        self._attached.pop(vol_id, None)
        for data_id in self._volumes.pop(vol_id).blocks.values():
            self._release(data_id)

    def _release(self, data_id: int) -> None:
        self._refs[data_id] -= 1
        if self._refs[data_id] == 0:
            del self._refs[data_id], self._data[data_id]

    def discard(self, vol_id: int, size: int) -> None:
        vol = self._get(vol_id)
        for data_id in vol.blocks.values():
            self._release(data_id)
        vol.blocks, vol.size = {}, size

    def resize(self, vol_id: int, new_size: int) -> None:
        vol = self._get(vol_id)
        if new_size < vol.size:
            raise EngineError(
                errno.EINVAL, f"memory: cannot shrink volume {vol_id} to {new_size} bytes"
            )
        vol.size = new_size

    def size(self, vol_id: int) -> int:
        return self._get(vol_id).size

    def exclusive_bytes(self, vol_id: int) -> int:
        return BLOCK * sum(1 for d in self._get(vol_id).blocks.values() if self._refs[d] == 1)

    def changed_ranges(self, vol_id: int, other_id: int) -> list[tuple[int, int]]:
        vol, other = self._get(vol_id), self._get(other_id)
        differing = [
            (block * BLOCK, BLOCK)
            for block in sorted(set(vol.blocks) | set(other.blocks))
            if vol.blocks.get(block) != other.blocks.get(block)
        ]
        return blockmap.merge(blockmap.clip(differing, vol.size))

    # Data

    def read(self, vol_id: int, size: int, offset: int) -> bytes:
        vol = self._get(vol_id)
        end = min(offset + size, vol.size)
        out = bytearray()
        for block, start, stop in _pieces(offset, end):
            data_id = vol.blocks.get(block)
            out += (ZERO if data_id is None else self._data[data_id])[start:stop]
        return bytes(out)

    def write(self, vol_id: int, data: bytes, offset: int) -> int:
        """Copy-on-write of each block touched; ENOSPC (as an OSError, like a file's write)
        once the pool holds no free block."""
        vol = self._get(vol_id)
        done = 0
        for block, start, stop in _pieces(offset, offset + len(data)):
            old = vol.blocks.get(block)
            allocates = old is None or self._refs[old] > 1
            if allocates and self._used() + BLOCK > self.capacity:
                if done:
                    break  # a short write, as write(2) gives; the next one fails
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            current = ZERO if old is None else self._data[old]
            new = current[:start] + data[done : done + stop - start] + current[stop:]
            if old is not None and self._refs[old] == 1:
                self._data[old] = new
            else:
                if old is not None:
                    self._release(old)
                data_id = next(self._ids)
                self._data[data_id], self._refs[data_id] = new, 1
                vol.blocks[block] = data_id
            done += stop - start
        vol.size = max(vol.size, offset + done)
        return done

    def open(self, vol_id: int, writable: bool) -> OpenVolume:
        self._get(vol_id)
        self._sync_back(vol_id)
        return MemoryOpenVolume(self, vol_id, writable)

    # A hypervisor's view

    def attach(self, vol_id: int) -> Attachment:
        vol = self._get(vol_id)
        if vol_id in self._attached:
            path, count = self._attached[vol_id]
            self._attached[vol_id] = (path, count + 1)
            return Attachment(str(path), block=False)
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="vmtree-memory-engine-"))
        path = self._scratch / f"vol-{vol_id}.img"
        with open(path, "wb") as f:
            f.truncate(vol.size)
            for block, data_id in vol.blocks.items():
                f.seek(block * BLOCK)
                f.write(self._data[data_id])
            f.truncate(vol.size)
        self._attached[vol_id] = (path, 1)
        return Attachment(str(path), block=False)

    def detach(self, vol_id: int) -> None:
        if vol_id not in self._attached:
            return
        path, count = self._attached[vol_id]
        if count > 1:
            self._attached[vol_id] = (path, count - 1)
            return
        self._sync_back(vol_id)
        del self._attached[vol_id]
        path.unlink(missing_ok=True)

    def _sync_back(self, vol_id: int) -> None:
        """Take what was written through the attachment file into the maps."""
        if vol_id not in self._attached:
            return
        path, _ = self._attached[vol_id]
        vol = self._volumes[vol_id]
        with open(path, "rb") as f:
            for start, end in _data_regions(f.fileno(), vol.size):
                f.seek(start)
                chunk = f.read(end - start)
                for at in range(0, len(chunk), BLOCK):
                    piece = chunk[at : at + BLOCK]
                    if piece != self.read(vol_id, len(piece), start + at):
                        self.write(vol_id, piece, start + at)


class MemoryOpenVolume(OpenVolume):
    """An open volume of the memory engine: no file descriptor, every read is cached."""

    def __init__(self, engine: MemoryEngine, vol_id: int, writable: bool) -> None:
        super().__init__(vol_id, -1, writable)
        self.engine = engine

    def pread(self, size: int, offset: int) -> bytes:
        self._check_open()
        return self.engine.read(self.vol_id, size, offset)

    def cached(self, size: int, offset: int) -> bool:
        return not self.closed

    def pwrite(self, data: bytes, offset: int) -> int:
        self._check_open()
        if not self.writable:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return self.engine.write(self.vol_id, bytes(data), offset)

    def fsync(self) -> None:
        self._check_open()

    def close(self) -> None:
        self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))


def _pieces(start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(block, offset in it, end in it) for each block that [start, end) touches."""
    offset = start
    while offset < end:
        block, within = divmod(offset, BLOCK)
        stop = min(BLOCK, within + end - offset)
        yield block, within, stop
        offset += stop - within


def _data_regions(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The [start, end) ranges of a sparse file that hold data (SEEK_DATA / SEEK_HOLE)."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        offset = end
