"""A damaged store file: how it is found, and what the administrator is told to do.

The mount and fsck check the file before they write anything, with ``PRAGMA
integrity_check``: every page read, every b-tree walked, and every index
compared with its table (``quick_check`` skips the last, and so misses an index
that disagrees with its table). It costs 3.3 ms on a store of 1,000 VMs and
60 ms on one of 10,000 (quick_check 1.9 and 29 ms; ``tests/bench/store_check.py``),
against a mount of 0.5 and 3.4 s, so the mount runs the whole check. A damaged store is refused
with EUCLEAN, the errno of a filesystem that "needs cleaning", and the way back.
"""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

from vmtreefs.errors import VmtreeError

#: Lines of SQLite's check quoted in the refusal; fsck lists them all.
QUOTED = 3


def way_back(path: Path) -> str:
    """What the administrator can do, with SOURCE's own paths in it.

    SQLite's own salvage is not offered: ``sqlite3 .recover`` of Debian's 3.40.1
    fails ("SQL logic error"), and ``.dump`` of a damaged file gives a script
    that stops at the damage.
    """
    source = path.parent
    return (
        f"The way back, with SOURCE unmounted: `vmtreefs fsck {source}` shows the damage; "
        f"put back {path} from a backup of SOURCE (and delete {path}-wal and {path}-shm), "
        f"then `vmtreefs fsck --repair {source}` makes the engine and the store agree "
        "(volumes made since the backup go to the VM lost-found). Without a backup, keep "
        "SOURCE as it is: the volumes themselves are untouched (with the reflink engine, "
        f"the files {source}/pool/vol-ID.img)"
    )


def damaged(path: Path, detail: str) -> VmtreeError:
    return VmtreeError(
        errno.EUCLEAN,
        f"store {path} is damaged ({detail}): refused, and nothing was written to it. "
        + way_back(path),
    )


def check_sound(conn: sqlite3.Connection, path: Path) -> None:
    """Raise EUCLEAN unless SQLite's integrity_check passes."""
    try:
        lines = [str(line) for (line,) in conn.execute("PRAGMA integrity_check")]
    except sqlite3.DatabaseError as e:
        raise damaged(path, f"integrity_check: {e}") from e
    if lines != ["ok"]:
        more = f" and {len(lines) - QUOTED} more" if len(lines) > QUOTED else ""
        raise damaged(path, "integrity_check: " + "; ".join(lines[:QUOTED]) + more)
