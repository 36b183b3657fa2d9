"""Is a file range already in the page cache? (``cachestat(2)``, Linux 6.5 and later.)

A read the page cache can answer costs a memory copy; one that cannot may wait for
the disk. The FUSE handler answers the first kind on the trio loop and sends only
the second to a worker thread, whose hop costs more than the copy of 1 MiB.
Where the kernel has no cachestat every read goes to a thread, as before.
"""

from __future__ import annotations

import ctypes
import errno
import os

_SYS_CACHESTAT = 451  # the same number on every architecture (a "common" syscall)
PAGE = os.sysconf("SC_PAGE_SIZE")


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_supported = True


def cached(fd: int, offset: int, length: int) -> bool:
    """Whether every page of ``[offset, offset + length)`` of ``fd`` is cached now."""
    global _supported
    if not _supported or length <= 0:
        return False
    first = offset - offset % PAGE
    pages = (offset + length - first + PAGE - 1) // PAGE
    span = _Range(first, pages * PAGE)
    stat = _Stat()
    if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(span), ctypes.byref(stat), 0) != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
            _supported = False  # no cachestat here (or a seccomp filter refuses it)
        return False
    return int(stat.nr_cache) >= pages
