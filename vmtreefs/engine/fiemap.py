"""Read a file's extent map with the FIEMAP ioctl, in pure Python.

Each :class:`Extent` says where a range of the file lives on disk and how: a
``shared`` extent's blocks are also mapped by another file (a reflink clone or
a snapshot), an ``unwritten`` one is allocated but reads as zeros. Holes are
simply absent. The reflink engine sums the extents that are not shared to say
how many bytes a volume alone holds; comparing the extents of two clones tells
which ranges differ between them (a range still shared at the same physical
address is identical in both).

See Documentation/filesystems/fiemap.rst in the kernel tree for the interface.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from vmtreefs.engine.base import EngineError

FS_IOC_FIEMAP = 0xC020660B
"""``_IOWR('f', 11, struct fiemap)``."""

FIEMAP_FLAG_SYNC = 0x1
"""Flush the file's dirty pages first, so delayed allocations show as real extents."""

FIEMAP_EXTENT_LAST = 0x1
"""The last extent of the file."""
FIEMAP_EXTENT_UNKNOWN = 0x2
"""The data's location is not known yet (``physical`` is meaningless)."""
FIEMAP_EXTENT_DELALLOC = 0x4
"""Delayed allocation: no blocks yet (also sets UNKNOWN; FIEMAP_FLAG_SYNC avoids it)."""
FIEMAP_EXTENT_UNWRITTEN = 0x800
"""Allocated but never written: reads as zeros (fallocate, CoW preallocation)."""
FIEMAP_EXTENT_SHARED = 0x2000
"""The blocks are also mapped by another file or snapshot."""

FIEMAP_MAX_OFFSET = (1 << 64) - 1
"""``fm_length`` meaning "to the end of the file"."""

EXTENTS_PER_CALL = 512
"""How many extents one ioctl asks for; a file with more is read in several calls."""

_HEADER = struct.Struct("=QQIIII")
"""struct fiemap: fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, fm_reserved."""
_EXTENT = struct.Struct("=QQQQQIIII")
"""struct fiemap_extent: fe_logical, fe_physical, fe_length, fe_reserved64[2], fe_flags,
fe_reserved[3]."""

assert _HEADER.size == 32 and _EXTENT.size == 56

# The ioctl exists but this file or filesystem cannot answer it; EBADR means a
# requested fm_flags bit is unsupported (the kernel writes the offending bits back).
_UNSUPPORTED_ERRNOS = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS, errno.EBADR})


@dataclass(frozen=True)
class Extent:
    """``length`` bytes of the file from offset ``logical``, stored at disk address ``physical``."""

    logical: int
    physical: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        """The file offset just past the extent."""
        return self.logical + self.length

    @property
    def last(self) -> bool:
        return bool(self.flags & FIEMAP_EXTENT_LAST)

    @property
    def unwritten(self) -> bool:
        return bool(self.flags & FIEMAP_EXTENT_UNWRITTEN)

    @property
    def shared(self) -> bool:
        return bool(self.flags & FIEMAP_EXTENT_SHARED)


def _fiemap(fd: int, start: int, length: int, flags: int, count: int) -> list[Extent]:
    """One FS_IOC_FIEMAP call asking for up to ``count`` extents of [start, start + length)."""
    buf = bytearray(_HEADER.size + count * _EXTENT.size)
    _HEADER.pack_into(buf, 0, start, length, flags, 0, count, 0)
    try:
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
    except OSError as e:
        code = e.errno or errno.EIO
        if code in _UNSUPPORTED_ERRNOS:
            raise EngineError(
                errno.EOPNOTSUPP,
                f"FIEMAP on fd {fd}: the filesystem cannot map extents "
                f"({errno.errorcode.get(code, code)}: {os.strerror(code)})",
            ) from e
        raise EngineError(code, f"FIEMAP on fd {fd}: {e.strerror or e}") from e
    mapped = _HEADER.unpack_from(buf, 0)[3]
    found: list[Extent] = []
    for i in range(min(mapped, count)):
        logical, physical, ext_length, _, _, ext_flags, _, _, _ = _EXTENT.unpack_from(
            buf, _HEADER.size + i * _EXTENT.size
        )
        found.append(Extent(logical, physical, ext_length, ext_flags))
    return found


def extents(
    fd: int,
    start: int = 0,
    length: int | None = None,
    *,
    sync: bool = True,
    batch: int = EXTENTS_PER_CALL,
) -> Iterator[Extent]:
    """The extents of the open file ``fd`` that overlap [start, start + length), in file order.

    ``length`` None means to the end of the file. The first and last extents may
    reach outside the range: they are reported whole, as the kernel does. With
    ``sync`` (the default) the kernel first writes dirty pages back, so data just
    written appears with its real location instead of as a delayed allocation.
    Raises :class:`EngineError` with EOPNOTSUPP when the filesystem cannot map
    extents, and with the kernel's errno on any other failure.
    """
    if start < 0 or (length is not None and length < 0) or batch < 1:
        raise EngineError(errno.EINVAL, f"FIEMAP range start={start} length={length} batch={batch}")
    end = FIEMAP_MAX_OFFSET if length is None else min(start + length, FIEMAP_MAX_OFFSET)
    flags = FIEMAP_FLAG_SYNC if sync else 0
    pos = start
    while pos < end:
        found = _fiemap(fd, pos, end - pos, flags, batch)
        if not found:
            return
        for extent in found:
            if extent.end <= pos:
                continue  # already reported by the previous call: never yield an extent twice
            yield extent
            if extent.last:
                return
        next_pos = found[-1].end
        if next_pos <= pos:
            return  # no progress: never loop forever on a confused filesystem
        pos = next_pos
