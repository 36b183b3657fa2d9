"""Open files: what each kind holds between open() and release()."""

from __future__ import annotations

import errno
import itertools
from dataclasses import dataclass, field

import pyfuse3
import trio

from vmtreefs.engine.base import OpenVolume


@dataclass
class VolumeHandle:
    volume: OpenVolume
    truncated: bool = False  # opened with O_TRUNC: its old data was discarded
    written_end: int = 0  # the end of the furthest write through this handle
    unsynced: bool = False  # written since the last fsync


@dataclass
class ContentHandle:
    """A read-only virtual file whose text is fixed when it is opened, so reads are consistent."""

    data: bytes


@dataclass
class CtlHandle:
    """A control file: each write is a command; reading returns the result of the last one."""

    vm_id: int | None
    result: bytes = b""
    read_pos: int = 0
    lock: trio.Lock = field(default_factory=trio.Lock)


@dataclass
class DomainHandle:
    """domain.xml opened for writing: the text is gathered here and checked at close."""

    vm_id: int
    data: bytearray
    dirty: bool = False


@dataclass
class FileHandle:
    """A file of SOURCE shown read-only (a savestate's memory image)."""

    fd: int


@dataclass
class ConsoleHandle:
    """The serial console log, read where it is as the guest writes it."""

    vm_id: int


Handle = VolumeHandle | ContentHandle | CtlHandle | DomainHandle | ConsoleHandle | FileHandle


class HandleTable:
    """File handle numbers, as the kernel passes them back."""

    def __init__(self) -> None:
        self.open: dict[int, Handle] = {}
        self._counter = itertools.count(1)

    def add(self, handle: Handle) -> int:
        fh = next(self._counter)
        self.open[fh] = handle
        return fh

    def get(self, fh: int | None) -> Handle | None:
        return None if fh is None else self.open.get(fh)

    def __getitem__(self, fh: int) -> Handle:
        try:
            return self.open[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    def pop(self, fh: int) -> Handle | None:
        return self.open.pop(fh, None)

    def close_all(self) -> None:
        """Close the files the kernel never released (it does not, after an unmount)."""
        for handle in self.open.values():
            if isinstance(handle, VolumeHandle):
                handle.volume.close()
        self.open.clear()
