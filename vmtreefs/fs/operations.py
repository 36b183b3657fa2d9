"""The pyfuse3 adapter: kernel requests in, the view and the tree called, errnos out.

What an entry looks like is the view's business (``fs/view``), what an open file
does is ``fs/files``; here each request is decoded and translated. Only
:class:`pyfuse3.FUSEError` may leave a handler (any other exception would end the
filesystem), so every handler goes through :func:`handler`, which logs the reason of
each refusal where an administrator reads it.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import pyfuse3
import trio

from vmtreefs.control import CtlDispatcher
from vmtreefs.core.tree import VmTree
from vmtreefs.errors import VmtreeError
from vmtreefs.fs import inodes
from vmtreefs.fs.files import Files, refuse
from vmtreefs.fs.handles import VolumeHandle
from vmtreefs.fs.invalidation import Invalidator
from vmtreefs.fs.view import (
    AliasLink,
    Attrs,
    CloneLink,
    ClonesDir,
    ControlDir,
    Entry,
    QuietError,
    RootDir,
    SavedVolumeFile,
    SavestateDir,
    SavestatesDir,
    TemplateLink,
    VersionLink,
    VersionsDir,
    View,
    VmDir,
    VolumeFile,
    VolumesDir,
)
from vmtreefs.rules import properties
from vmtreefs.rules.volumes import default_policy
from vmtreefs.runtime.lifecycle import Lifecycle

log = logging.getLogger("vmtreefs.fs")

BLOCK_SIZE = 4096

P = ParamSpec("P")
R = TypeVar("R")


def _short(value: Any) -> str:
    if isinstance(value, bytes):
        text = value.decode("utf-8", "backslashreplace")
        return repr(text if len(text) <= 40 else text[:40] + "...")
    return str(value)


def handler(
    operation: str,
    quiet: frozenset[int] = frozenset(),
    names: int = 1,
    locked: tuple[int, ...] = (),
) -> Callable[
    [Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]]],
    Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]],
]:
    """Let only FUSEError out; log each refusal (except the expected ``quiet`` ones).

    ``names`` is how many byte-string arguments are names worth logging; ``locked`` the
    positions of the directory inodes that the kernel holds locked until the reply, so
    that no entry invalidation in them is sent meanwhile (``fs/invalidation``).
    """

    def decorate(
        fn: Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]],
    ) -> Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]]:
        async def wrapper(self: Operations, /, *args: P.args, **kwargs: P.kwargs) -> R:
            directories = [cast(int, args[i]) for i in locked]
            self.invalidator.enter(directories)
            try:
                return await fn(self, *args, **kwargs)
            except pyfuse3.FUSEError:
                raise
            except QuietError as e:
                raise pyfuse3.FUSEError(e.errno) from None
            except VmtreeError as e:
                if e.errno not in quiet:
                    # The first ``names`` byte strings are names; never log data or values.
                    shown = [a for a in args if isinstance(a, bytes)][:names]
                    what = " ".join([operation, *(_short(a) for a in shown)])
                    self.tree.journal.refused(what, e)
                if e.errno == errno.EIO:
                    await self.explain_io_error()
                raise pyfuse3.FUSEError(e.errno) from None
            except OSError as e:
                code = e.errno or errno.EIO
                log.warning("%s failed: %s", operation, e)
                self.tree.journal.events.add(f"failed {operation}: {e.strerror or e}")
                if code == errno.EIO:
                    await self.explain_io_error()
                raise pyfuse3.FUSEError(code) from None
            except Exception:
                log.exception("%s failed with an unexpected error; answering EIO", operation)
                raise pyfuse3.FUSEError(errno.EIO) from None
            finally:
                self.invalidator.leave(directories)

        functools.update_wrapper(wrapper, fn)
        return wrapper

    return decorate


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(
        self,
        tree: VmTree,
        lifecycle: Lifecycle | None = None,
        uid: int | None = None,
        gid: int | None = None,
    ) -> None:
        super().__init__()
        self.tree = tree
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.view = View(tree, lifecycle, time.time_ns())
        # Inodes the kernel holds, with how many references (lookup, mkdir, READDIRPLUS).
        self.lookup_counts: dict[int, int] = {}
        self._io_hint: str | None = None  # the last explanation of an I/O error logged
        self.invalidator = Invalidator(self.lookup_counts)
        self.files = Files(self.view, CtlDispatcher(tree, lifecycle), self.invalidator)
        tree.on_volumes_written_outside = self.invalidator.volume_pages
        tree.on_volumes_replaced = self.invalidator.volume_names
        tree.on_names_changed = self.invalidator.top_names

    async def explain_io_error(self) -> None:
        """After an EIO answer: log the state of the engine's storage and what to do, each
        time it changes (a storm of failing reads logs it once)."""
        try:
            hint = await trio.to_thread.run_sync(self.tree.engine.diagnose_io_error)
        except (VmtreeError, OSError) as e:
            hint = f"its state is unknown: {e}"
        if hint is not None and hint != self._io_hint:
            self._io_hint = hint
            log.error("I/O error under the engine: %s", hint)
            self.tree.journal.events.add(f"I/O error under the engine: {hint}")

    async def run_invalidations(self) -> None:
        await self.invalidator.run()

    def close_all(self) -> None:
        self.files.handles.close_all()

    # Attributes

    async def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        return self._translate(inode, await self._measured(self.view.entry(inode).attrs()))

    @staticmethod
    async def _measured(attrs: Attrs) -> Attrs:
        if attrs.size_from is not None:
            attrs.size = await trio.to_thread.run_sync(attrs.size_from)
        return attrs

    def _translate(self, inode: int, attrs: Attrs) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.generation = 0
        attr.entry_timeout = attrs.entry_timeout
        attr.attr_timeout = attrs.attr_timeout
        attr.st_uid = self.uid
        attr.st_gid = self.gid
        attr.st_blksize = BLOCK_SIZE
        attr.st_nlink = attrs.nlink
        attr.st_mode = attrs.mode
        attr.st_size = attrs.size
        # Allocation is the engine's business: 0 tells cp and rsync a file may be sparse.
        attr.st_blocks = 0
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = attrs.time_ns
        return attr

    async def _entry(self, inode: int) -> pyfuse3.EntryAttributes:
        """Attributes for a reply that gives the kernel a new reference (lookup, mkdir, create)."""
        attr = await self._attributes(inode)
        self.lookup_counts[inode] = self.lookup_counts.get(inode, 0) + 1
        return attr

    def _held_links(self) -> dict[int, str]:
        return self.view.held_links(self.lookup_counts)

    def _keep_departed(self, before: dict[int, str]) -> None:
        self.view.keep_departed(before, self.lookup_counts)

    # Lookup and attributes

    @handler("lookup", quiet=frozenset({errno.ENOENT}), locked=(0,))
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return await self._entry(self.view.child(parent_inode, os.fsdecode(name)))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            left = self.lookup_counts.get(inode, 0) - count
            if left > 0:
                self.lookup_counts[inode] = left
            else:
                self.lookup_counts.pop(inode, None)
                self.view.forget(inode)

    @handler("getattr")
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._attributes(inode)

    @handler("setattr")
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        entry = self.view.entry(inode)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise refuse(errno.EPERM, "chmod and chown are not allowed on vmtreefs entries")
        if entry.in_savestate:
            raise refuse(errno.EROFS, "a savestate cannot be changed, only removed (rmdir)")
        if fields.update_size:
            await self.files.truncate(entry, attr.st_size, fh)
        if fields.update_mtime and isinstance(entry, VolumeFile):
            self.view.volume_mtimes[entry.volume.id] = attr.st_mtime_ns
        return await self._attributes(inode)

    @handler("readlink")
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(self.view.entry(inode).target())

    # Directories

    @handler("opendir")
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self.view.children(inode)  # ENOTDIR / ENOENT now rather than at readdir
        return inode

    @handler("readdir", locked=(0,))
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for inode, name in self.view.children(fh):
            if inode <= start_id:
                continue
            try:
                attr = await self._attributes(inode)
            except QuietError:
                continue  # gone while an earlier entry's size was measured off the thread
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, inode):
                break
            # Entries go out as READDIRPLUS: the kernel now holds a reference to each.
            self.lookup_counts[inode] = self.lookup_counts.get(inode, 0) + 1

    async def releasedir(self, fh: int) -> None:
        pass

    @handler("mkdir", locked=(0,))
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.view.entry(parent_inode)
        if isinstance(parent, RootDir):
            vm = await self.tree.create_vm(name)
            return await self._entry(inodes.vm_inode(vm.id))
        if isinstance(parent, ClonesDir):
            clone = await self.tree.clone_vm(parent.vm.id, name)
            # The reply must be a directory, but SRC/clones/NEW is a symlink to ../../NEW:
            # answer with a placeholder the kernel must look up again at once (entry timeout
            # 0), and drop its dentry, so one directory inode never has two names.
            self.invalidator.names(parent_inode, [os.fsdecode(name)])
            return await self._entry(inodes.vm_inode(clone.id, inodes.VmEntry.CLONE_PLACEHOLDER))
        if isinstance(parent, SavestatesDir | VersionsDir):
            raise refuse(errno.EINVAL, f"not by mkdir: {parent.made_by}")
        raise refuse(errno.EPERM, "new directories can only be made at the top level (VMs)")

    @handler("rmdir", locked=(0,))
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        text = os.fsdecode(name)
        entry = self.view.entry(self.view.child(parent_inode, text))
        if isinstance(entry, VmDir):
            before = self._held_links()
            await self.tree.delete_vm(entry.vm.id)
            self._keep_departed(before)
            return
        if isinstance(entry, SavestateDir):
            await self.tree.savestates.delete(entry.vm.id, entry.savestate.label)
            return
        if entry.fixed:
            raise refuse(errno.EPERM, f"{text!r} is part of the fixed layout and cannot be removed")
        raise refuse(errno.ENOTDIR, f"{text!r} is not a directory")

    # Files

    @handler("unlink", locked=(0,))
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        text = os.fsdecode(name)
        entry = self.view.entry(self.view.child(parent_inode, text))
        if entry.in_savestate:
            raise refuse(errno.EROFS, "a savestate cannot be changed, only removed (rmdir)")
        if isinstance(entry, VolumeFile):
            await self.tree.volumes.delete(entry.volume.id)
            return
        if isinstance(entry, AliasLink):
            before = self._held_links()
            await self.tree.aliases.remove(text)
            self._keep_departed(before)
            return
        if isinstance(entry, VmDir | ControlDir):
            raise refuse(errno.EISDIR, f"{text!r} is a directory")
        if isinstance(entry, CloneLink):
            raise refuse(
                errno.EPERM, f"{text!r} lists a linked clone: delete it with rmdir of the VM itself"
            )
        if isinstance(entry, VersionLink):
            raise refuse(
                errno.EPERM, f"{text!r} lists a version: delete it with rmdir of the version itself"
            )
        if isinstance(entry, TemplateLink):
            await self.tree.versions.remove_template(entry.vm.id)
            return
        raise refuse(errno.EPERM, f"{text!r} is part of the fixed layout and cannot be removed")

    @handler("rename", names=2, locked=(0, 2))
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise refuse(errno.EINVAL, "exchanging two entries is not supported")
        old_text = os.fsdecode(name_old)
        entry = self.view.entry(self.view.child(parent_inode_old, old_text))
        if not isinstance(entry, VolumeFile | SavedVolumeFile | AliasLink | VmDir):
            raise refuse(errno.EPERM, f"{old_text!r} is part of the fixed layout")
        if parent_inode_old != parent_inode_new:
            raise refuse(
                errno.EINVAL,
                "a VM can only be renamed within the top level, a volume within its volumes/",
            )
        if isinstance(entry, VolumeFile | SavedVolumeFile):
            await self.tree.volumes.rename(entry.volume.id, name_new)
        elif isinstance(entry, AliasLink):
            before = self._held_links()
            await self.tree.aliases.rename(old_text, name_new)
            self._keep_departed(before)
        else:
            await self.tree.rename_vm(entry.vm.id, name_new)

    @handler("create", locked=(0,))
    async def create(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self.view.entry(parent_inode)
        if not isinstance(parent, VolumesDir):
            raise refuse(
                errno.EPERM, "regular files can only be made in a VM's volumes/ (as NAME.img)"
            )
        volume = await self.tree.volumes.create(parent.vm.id, name)
        opened = await self.tree.volumes.open(volume.id, writable=True)
        fh = self.files.handles.add(VolumeHandle(opened))
        return pyfuse3.FileInfo(fh=fh), await self._entry(inodes.volume_inode(volume.id))

    @handler("open")
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return await self.files.open(self.view.entry(inode), flags)

    @handler("read", names=0)
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.files.read(fh, off, size)

    @handler("write", names=0)
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.files.write(fh, off, buf)

    @handler("flush")
    async def flush(self, fh: int) -> None:
        """Every close() of a written volume syncs it: a write the storage refuses late
        (dm-thin reports a full pool only at write-back) then fails the close, which cp
        and dd report, instead of vanishing."""
        if self.files.unsynced(fh):
            await self.fsync(fh, False)
        await self.files.store_domain(fh)

    @handler("fsync")
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.files.fsync(fh)

    @handler("release")
    async def release(self, fh: int) -> None:
        await self.files.release(fh)

    # Links: aliases at the top, a VM's template link; never hard links or device nodes.

    @handler("symlink", names=2, locked=(0,))
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.view.entry(parent_inode)
        if isinstance(parent, RootDir):
            alias = await self.tree.aliases.create(name, target)
            return await self._entry(inodes.alias_inode(alias.id))
        if isinstance(parent, VmDir):
            if os.fsdecode(name) != "template":
                raise refuse(
                    errno.EINVAL, "the only symlink in a VM directory is its template (template)"
                )
            await self.tree.versions.set_template(parent.vm.id, target)
            return await self._entry(inodes.vm_inode(parent.vm.id, inodes.VmEntry.TEMPLATE))
        raise refuse(errno.EPERM, "symlinks can only be made at the top level (aliases)")

    @handler("link", locked=(1,))
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise refuse(errno.EPERM, "hard links are never allowed")

    @handler("mknod", locked=(0,))
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise refuse(errno.EPERM, "device nodes, fifos and sockets are never allowed")

    # Extended attributes: properties of VMs and volumes.

    @handler("listxattr")
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        table = self.view.entry(inode).properties
        return [] if table is None else [p.xattr.encode() for p in table.values()]

    @handler("getxattr", quiet=frozenset({errno.ENODATA}))
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        text = os.fsdecode(name)
        entry = self.view.entry(inode)
        if not text.startswith(properties.PREFIX):  # ls -l asks for ACLs and SELinux labels
            raise refuse(pyfuse3.ENOATTR, f"no attribute {text!r}")
        wanted = text.removeprefix(properties.PREFIX)
        values = await entry.property_values(wanted)
        value = None if values is None else values.get(wanted)
        if value is None:
            raise refuse(pyfuse3.ENOATTR, f"no attribute {text!r}")
        return value.encode()

    def _settable(self, inode: int, name: bytes) -> tuple[Entry, properties.Property]:
        entry = self.view.entry(inode)
        if entry.properties is None:
            raise refuse(errno.ENOTSUP, "only VM directories and volumes have properties")
        prop = properties.lookup(entry.properties, name)
        if prop is None:
            raise properties.unknown(name)
        return entry, prop

    @handler("setxattr")
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        entry, prop = self._settable(inode, name)
        checked = properties.check_value(prop, value)
        if isinstance(entry, VolumeFile | SavedVolumeFile):
            await self.tree.set_volume_policy(entry.volume.id, checked)
        elif isinstance(entry, VmDir):
            await self.tree.set_property(entry.vm.id, prop.name, checked)
            await self._after_vm_property(entry)

    @handler("removexattr")
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """Removing a property sets it back to its default."""
        entry, prop = self._settable(inode, name)
        if not prop.writable:
            properties.check_value(prop, b"")  # the read-only refusal
        if isinstance(entry, VolumeFile | SavedVolumeFile):
            await self.tree.set_volume_policy(entry.volume.id, default_policy(entry.volume.name))
        elif isinstance(entry, VmDir):
            await self.tree.set_property(entry.vm.id, prop.name, None)
            await self._after_vm_property(entry)

    async def _after_vm_property(self, entry: VmDir) -> None:
        """Volume modes follow immutability: drop the kernel's cached ones; an alias may
        now name another VM."""
        for volume in self.view.vm(entry.vm.id).volumes.values():
            self.invalidator.inode_later(inodes.volume_inode(volume.id))
        await self.invalidator.stale_names_now()

    @handler("statfs")
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        usage = await self.tree.pool_usage()
        data = pyfuse3.StatvfsData()
        data.f_bsize = BLOCK_SIZE
        data.f_frsize = BLOCK_SIZE
        data.f_blocks = usage.total_bytes // BLOCK_SIZE
        data.f_bfree = max(0, usage.total_bytes - usage.used_bytes) // BLOCK_SIZE
        data.f_bavail = data.f_bfree
        inodes_used = len(self.tree.ns) + self.tree.ns.volume_count()
        data.f_files = inodes_used + 1_000_000
        data.f_ffree = 1_000_000
        data.f_favail = data.f_ffree
        data.f_namemax = 255
        return data
