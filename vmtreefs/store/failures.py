"""SQLite's failures as the errno a user or an administrator sees."""

from __future__ import annotations

import errno
import sqlite3

from vmtreefs.errors import VmtreeError

# sqlite3's primary result codes -> the errno a user or the administrator sees.
_ERRNO_OF_SQLITE = {
    sqlite3.SQLITE_CANTOPEN: errno.EACCES,
    sqlite3.SQLITE_READONLY: errno.EACCES,
    sqlite3.SQLITE_PERM: errno.EACCES,
    sqlite3.SQLITE_AUTH: errno.EACCES,
    sqlite3.SQLITE_NOTADB: errno.EINVAL,
    sqlite3.SQLITE_FULL: errno.ENOSPC,
    sqlite3.SQLITE_CORRUPT: errno.EUCLEAN,
    sqlite3.SQLITE_BUSY: errno.EBUSY,
    sqlite3.SQLITE_LOCKED: errno.EBUSY,
    sqlite3.SQLITE_CONSTRAINT: errno.EINVAL,
}


def store_error(e: sqlite3.Error, what: str) -> VmtreeError:
    """Turn any SQLite failure into a VmtreeError, so none escapes to the FUSE boundary."""
    code = getattr(e, "sqlite_errorcode", None)
    name = getattr(e, "sqlite_errorname", None)
    if name in ("SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"):
        err = errno.EEXIST
    elif name == "SQLITE_CONSTRAINT_FOREIGNKEY":
        err = errno.ENOENT
    elif name == "SQLITE_CONSTRAINT_TRIGGER":
        # Our only triggers keep VM and alias names apart.
        err = errno.EEXIST
    elif code is None:
        err = errno.EIO
    else:
        err = _ERRNO_OF_SQLITE.get(code & 0xFF, errno.EIO)
    if err == errno.ENOSPC:
        # SQLite says "database or disk is full"; here it is always the disk.
        return VmtreeError(err, f"{what}: the filesystem of the store (SOURCE) is full ({e})")
    if err == errno.EUCLEAN:
        return VmtreeError(
            err, f"{what}: the store is damaged ({e}); unmount and run vmtreefs fsck"
        )
    return VmtreeError(err, f"{what}: {e}")
