"""Read a dm-log-writes log and replay it onto a file, up to any entry: a power cut there.

The kernel's format (drivers/md/dm-log-writes.c, Documentation/admin-guide/
device-mapper/log-writes.rst): sector 0 of the log device holds the super block
(magic, version, entry count, the logged device's sector size), and the entries
follow one after another from the next sector. Each entry is one sector: its
header (sector, count of sectors, flags, data length) and, for a mark, the mark's
text; a write's data follows it (count × sector size bytes), a discard has none.

The log holds a write once it has completed, and a flush after the writes that
completed before it, so a replay stopped just after a FLUSH or FUA entry is a
state the disk could be left in by a power cut at that moment (the points
xfstests' generic/482 checks). Debian has no ``replay-log``: this is its part
the tests need, forward only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

FLUSH, FUA, DISCARD, MARK, METADATA = 1, 2, 4, 8, 16
MAGIC = 0x6A736677736872
VERSION = 1
SUPER = struct.Struct("<QQQI")
ENTRY = struct.Struct("<QQQQ")

_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 1, 2
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class LogError(Exception):
    """The log device holds no log of this format, or one cut short."""


@dataclass(frozen=True)
class Entry:
    index: int
    sector: int
    """Where the write or discard went, in the logged device's sectors."""
    sectors: int
    flags: int
    mark: str | None
    data_at: int
    """Byte offset of the written data in the log."""

    @property
    def flushes(self) -> bool:
        """A point a power cut may be checked at: what completed before it is on disk."""
        return bool(self.flags & (FLUSH | FUA))

    @property
    def changes(self) -> bool:
        return self.sectors > 0 and not self.flags & MARK


def read_log(path: Path) -> tuple[int, list[Entry]]:
    """The logged device's sector size and every entry of the log at ``path``."""
    with open(path, "rb") as f:
        magic, version, count, sectorsize = SUPER.unpack(f.read(SUPER.size))
        if magic != MAGIC or version != VERSION or sectorsize < ENTRY.size:
            raise LogError(f"{path} holds no dm-log-writes log (magic {magic:#x})")
        entries = []
        at = sectorsize
        for index in range(count):
            f.seek(at)
            header = f.read(sectorsize)
            if len(header) < sectorsize:
                raise LogError(f"{path} ends in entry {index} of {count}")
            sector, sectors, flags, data_len = ENTRY.unpack_from(header)
            mark = None
            if flags & MARK:
                mark = header[ENTRY.size : ENTRY.size + data_len].decode(errors="replace")
            at += sectorsize
            entries.append(Entry(index, sector, sectors, flags, mark, at))
            if not flags & (DISCARD | MARK):
                at += sectors * sectorsize
        return sectorsize, entries


def flush_points(entries: list[Entry], after_mark: str) -> Iterator[tuple[Entry, list[str]]]:
    """Each flush after ``after_mark`` that follows a change since the previous one (a
    flush with nothing new written leaves the same disk), with the marks before it."""
    marks: list[str] = []
    changed = False
    for entry in entries:
        if entry.mark is not None:
            marks.append(entry.mark)
        changed = changed or entry.changes
        if entry.flushes and changed and after_mark in marks:
            yield entry, list(marks)
            changed = False


class Replay:
    """A file that the log is applied to in order, never backwards."""

    def __init__(self, log: Path, target: Path, size: int) -> None:
        self.sectorsize, self.entries = read_log(log)
        self.log = open(log, "rb")  # noqa: SIM115 - closed in close()
        with open(target, "wb") as f:
            f.truncate(size)
        self.fd = os.open(target, os.O_RDWR | os.O_CLOEXEC)
        self.applied = 0  # entries applied so far

    def to(self, index: int) -> None:
        """Apply the entries up to and including ``index``."""
        if index + 1 < self.applied:
            raise ValueError(f"entry {index} is behind the replay (at {self.applied})")
        for entry in self.entries[self.applied : index + 1]:
            self._apply(entry)
        self.applied = index + 1

    def _apply(self, entry: Entry) -> None:
        start, length = entry.sector * self.sectorsize, entry.sectors * self.sectorsize
        if entry.flags & MARK or length == 0:
            return
        if entry.flags & DISCARD:  # what a loop device on a file does: the range reads zeros
            mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
            if _libc.fallocate(self.fd, mode, start, length) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"punch {length} bytes at {start}: {os.strerror(err)}")
            return
        self.log.seek(entry.data_at)
        data = self.log.read(length)
        if len(data) != length:
            raise LogError(f"entry {entry.index}: {len(data)} of {length} bytes of data")
        os.pwrite(self.fd, data, start)

    def close(self) -> None:
        os.close(self.fd)
        self.log.close()
