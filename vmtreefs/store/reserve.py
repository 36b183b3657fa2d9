"""Room kept beside the store, so that a deletion can be recorded on a full filesystem.

On a full SOURCE a commit that must grow the WAL fails (SQLITE_FULL), and so
would ``rmdir``, the one operation that makes room. The store keeps
``vmtree.db-reserve``, a few MiB allocated in advance; a deletion refused for
space gives it back to the filesystem and is tried once more, and the reserve is
taken again after a later commit, once there is room for it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path

log = logging.getLogger("vmtreefs.store")

RESERVE_SUFFIX = "-reserve"
RESERVE_BYTES = 8 << 20
"""A deletion's commits take a few pages of WAL each: room for hundreds."""


class SpaceReserve:
    """The reserve file; every failure is logged, never raised."""

    def __init__(self, db: Path, size: int = RESERVE_BYTES) -> None:
        self.path = db.with_name(db.name + RESERVE_SUFFIX)
        self.size = size
        self.held = False

    def take(self) -> bool:
        """Allocate the reserve; on a filesystem without the room, give back what was taken."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            log.debug("no space reserve %s: %s", self.path, e.strerror)
            return False
        try:
            os.posix_fallocate(fd, 0, self.size)
            os.fsync(fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            if e.errno == errno.ENOSPC:
                log.debug("space reserve %s not taken: the filesystem is full", self.path)
            else:
                log.warning("space reserve %s not taken: %s", self.path, e.strerror)
            return False
        finally:
            os.close(fd)
        if not self.held:
            log.info("space reserve %s: %d MiB kept for deletions", self.path, self.size >> 20)
        self.held = True
        return True

    def release(self) -> bool:
        """Give the reserve to the filesystem; False if it held none."""
        if not self.held:
            return False
        try:
            os.truncate(self.path, 0)
        except OSError as e:
            log.warning("cannot release the space reserve %s: %s", self.path, e.strerror)
            return False
        self.held = False
        log.warning(
            "SOURCE is full: released the %d MiB space reserve %s to record a deletion; "
            "it is taken again once there is room",
            self.size >> 20,
            self.path,
        )
        return True
