"""Open, read, write, sync and close: what each kind of entry does as an open file."""

from __future__ import annotations

import errno
import logging
import os
import time

import pyfuse3
import trio

from vmtreefs.control import CtlDispatcher
from vmtreefs.errors import VmtreeError
from vmtreefs.fs import inodes
from vmtreefs.fs.handles import (
    ConsoleHandle,
    ContentHandle,
    CtlHandle,
    DomainHandle,
    FileHandle,
    Handle,
    HandleTable,
    VolumeHandle,
)
from vmtreefs.fs.inodes import CONTROL_EVENTS, CONTROL_STATUS, CONTROL_VOLATILE
from vmtreefs.fs.invalidation import Invalidator
from vmtreefs.fs.view import (
    ChangeMap,
    ConsoleFile,
    ControlFile,
    CtlFile,
    DomainFile,
    Entry,
    InfoFile,
    MemoryFile,
    SavedVolumeFile,
    StateFile,
    View,
    VolumeFile,
)
from vmtreefs.rules import commands
from vmtreefs.rules.domain import MAX_DOMAIN_XML
from vmtreefs.rules.vms import check_domain_writable

log = logging.getLogger("vmtreefs.fs")


def _reason(error: VmtreeError | OSError) -> tuple[int, str]:
    if isinstance(error, VmtreeError):
        return error.errno, error.reason
    where = f" ({error.filename})" if error.filename else ""
    return error.errno or errno.EIO, f"{error.strerror or error}{where}"


def refuse(errno_: int, reason: str) -> VmtreeError:
    return VmtreeError(errno_, reason)


class Files:
    def __init__(self, view: View, ctl: CtlDispatcher, invalidator: Invalidator) -> None:
        self.view = view
        self.tree = view.tree
        self.ctl = ctl
        self.invalidator = invalidator
        self.handles = HandleTable()

    async def open(self, entry: Entry, flags: int) -> pyfuse3.FileInfo:
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if isinstance(entry, SavedVolumeFile):
            if writable:
                raise refuse(errno.EROFS, "a savestate's volumes are read-only")
            opened = await self.tree.volumes.open_saved(entry.volume.id)
            # A savestate's volume never changes: what the kernel cached of it stays true.
            return pyfuse3.FileInfo(fh=self.handles.add(VolumeHandle(opened)), keep_cache=True)
        if isinstance(entry, ChangeMap):
            if writable:
                raise refuse(errno.EACCES, "a change map is read-only")
            data = await self.tree.volumes.change_map(entry.volume_id, entry.other_id)
            return pyfuse3.FileInfo(fh=self.handles.add(ContentHandle(data)), direct_io=True)
        if isinstance(entry, MemoryFile):
            if writable:
                raise refuse(errno.EROFS, "a savestate's memory image is read-only")
            fd = await trio.to_thread.run_sync(os.open, entry.path, os.O_RDONLY | os.O_CLOEXEC)
            return pyfuse3.FileInfo(fh=self.handles.add(FileHandle(fd)))
        if isinstance(entry, VolumeFile):
            truncate = writable and bool(flags & os.O_TRUNC)
            if truncate:
                # cp and > over a volume: its old data goes, its size stays (volumes only grow).
                await self.tree.volumes.discard(entry.volume.id)
                self.invalidator.inode_later(entry.inode, data=True)
            opened = await self.tree.volumes.open(entry.volume.id, writable)
            stable = self.view.volume(entry.volume.id)[0].version_of is not None
            handle: Handle = VolumeHandle(opened, truncate)
            return pyfuse3.FileInfo(fh=self.handles.add(handle), keep_cache=stable)
        if isinstance(entry, ControlFile) and entry.is_ctl:
            handle = CtlHandle(None)
        elif isinstance(entry, CtlFile):
            handle = CtlHandle(entry.vm.id)
        elif isinstance(entry, DomainFile) and writable:
            vm = entry.vm
            check_domain_writable(vm)
            truncate = bool(flags & os.O_TRUNC)
            start = b"" if truncate else await entry.text()
            handle = DomainHandle(vm.id, bytearray(start), dirty=truncate)
        elif isinstance(entry, ConsoleFile) and not writable:
            handle = ConsoleHandle(entry.vm.id)
        else:
            if writable:
                raise refuse(errno.EACCES, "this file is read-only")
            handle = ContentHandle(await self._content(entry))
        return pyfuse3.FileInfo(fh=self.handles.add(handle), direct_io=True)

    async def _content(self, entry: Entry) -> bytes:
        """The text of a read-only virtual file, fixed at open."""
        if entry.inode == CONTROL_STATUS:
            return (await self.tree.status_text()).encode()
        if entry.inode == CONTROL_EVENTS:
            return self.tree.journal.events.text().encode()
        if entry.inode == CONTROL_VOLATILE:
            return self.tree.volatile_text().encode()
        if isinstance(entry, StateFile | InfoFile):
            return entry.text()
        if isinstance(entry, DomainFile):
            return await entry.text()
        raise refuse(errno.EISDIR, "not a regular file")

    async def truncate(self, entry: Entry, size: int, fh: int | None) -> None:
        """setattr's size: volumes resize; ``echo cmd > ctl`` and ``> domain.xml`` truncate."""
        handle = self.handles.get(fh)
        if isinstance(entry, VolumeFile):
            volume = entry.volume
            if (
                isinstance(handle, VolumeHandle)
                and handle.truncated
                and handle.written_end <= size < volume.size
            ):
                # cp over a bigger volume ends by truncating to its own size; after the
                # discard everything past what it wrote already reads as zeros.
                log.debug("volume %d keeps its size over a copy's final truncate", volume.id)
            else:
                await self.tree.volumes.resize(volume.id, size)
        elif isinstance(entry, CtlFile) or (isinstance(entry, ControlFile) and entry.is_ctl):
            pass  # "echo cmd > ctl" truncates first: a control file has nothing to truncate.
        elif isinstance(entry, DomainFile):
            if not isinstance(handle, DomainHandle) or size > len(handle.data):
                raise refuse(errno.EINVAL, "domain.xml is replaced by writing it whole (cp, >)")
            if size < len(handle.data):
                del handle.data[size:]
                handle.dirty = True
        else:
            raise refuse(errno.EACCES, "only volumes can be truncated")

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.handles[fh]
        if isinstance(handle, VolumeHandle):
            return await self.tree.volumes.read(handle.volume, off, size)
        if isinstance(handle, CtlHandle):
            # The file offset moved past the command that was written: the result is read
            # from where the last read stopped, whatever the offset (Plan 9 clone files).
            chunk = handle.result[handle.read_pos : handle.read_pos + size]
            handle.read_pos += len(chunk)
            return chunk
        if isinstance(handle, DomainHandle):
            return bytes(handle.data[off : off + size])
        if isinstance(handle, FileHandle):
            return await trio.to_thread.run_sync(os.pread, handle.fd, size, off)
        if isinstance(handle, ConsoleHandle):
            lifecycle = self.view.lifecycle
            if lifecycle is None:
                return b""
            vm = self.view.vm(handle.vm_id)
            return await trio.to_thread.run_sync(lifecycle.read_console, vm, off, size)
        return handle.data[off : off + size]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles[fh]
        if isinstance(handle, VolumeHandle):
            _, volume = self.view.volume(handle.volume.vol_id)
            size_before = volume.size
            written = await self.tree.volumes.write(handle.volume, off, buf)
            handle.written_end = max(handle.written_end, off + written)
            handle.unsynced = True
            self.view.volume_mtimes[volume.id] = time.time_ns()
            if volume.size != size_before:
                # Other open files and cached stat results still hold the old size.
                self.invalidator.inode_later(inodes.volume_inode(volume.id))
            return written
        if isinstance(handle, CtlHandle):
            async with handle.lock:
                handle.result = b""
                handle.read_pos = 0
                if handle.vm_id is not None:
                    self.view.vm(handle.vm_id)
                known = commands.GLOBAL_COMMANDS if handle.vm_id is None else commands.VM_COMMANDS
                command = commands.parse_command(buf, known)
                try:
                    result = await self.ctl.run(handle.vm_id, command)
                except (VmtreeError, OSError) as e:
                    # The log line of a write names no file: say whose ctl it was. An
                    # OSError is a file of SOURCE the command could not write (ENOSPC).
                    vm = self.tree.ns.by_id.get(handle.vm_id) if handle.vm_id else None
                    where = ".vmtree/ctl" if vm is None else f"{vm.name}/ctl"
                    code, reason = _reason(e)
                    raise VmtreeError(code, f"{where}: {command}: {reason}") from e
                finally:
                    await self.invalidator.stale_names_now()
                handle.result = (result + "\n").encode()
            return len(buf)
        if isinstance(handle, DomainHandle):
            end = off + len(buf)
            if end > MAX_DOMAIN_XML:
                raise refuse(errno.EFBIG, f"domain.xml may hold at most {MAX_DOMAIN_XML} bytes")
            if len(handle.data) < off:
                handle.data.extend(bytes(off - len(handle.data)))
            handle.data[off:end] = buf
            handle.dirty = True
            return len(buf)
        raise pyfuse3.FUSEError(errno.EBADF)

    def unsynced(self, fh: int) -> bool:
        handle = self.handles[fh]
        return isinstance(handle, VolumeHandle) and handle.unsynced

    async def store_domain(self, fh: int) -> None:
        """domain.xml is checked and stored at close: a bad description fails the close
        (EINVAL)."""
        handle = self.handles[fh]
        if isinstance(handle, DomainHandle) and handle.dirty:
            handle.dirty = False
            await self.tree.set_domain_xml(handle.vm_id, bytes(handle.data))

    async def fsync(self, fh: int) -> None:
        handle = self.handles[fh]
        if isinstance(handle, VolumeHandle):
            handle.unsynced = False
            await self.tree.volumes.sync(handle.volume)

    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        if isinstance(handle, VolumeHandle):
            await self.tree.volumes.close(handle.volume)
        elif isinstance(handle, FileHandle):
            os.close(handle.fd)
