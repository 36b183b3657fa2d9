"""pyfuse3 request handlers: a thin translation between file operations and the tree.

Each handler decodes inode numbers into tree objects, calls the tree, and turns
refusals into errno. Only :class:`pyfuse3.FUSEError` may leave a handler (any
other exception would end the filesystem), so every handler goes through
:func:`handler`, which logs the reason of each refusal where an administrator
reads it.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio

from vmtreefs.control import CtlDispatcher
from vmtreefs.core.tree import VmTree
from vmtreefs.engine.base import OpenVolume
from vmtreefs.errors import VmtreeError
from vmtreefs.fs import inodes
from vmtreefs.fs.inodes import (
    CONTROL_CTL,
    CONTROL_DIR,
    CONTROL_DIR_NAME,
    CONTROL_EVENTS,
    CONTROL_FILES,
    CONTROL_STATUS,
    CONTROL_VOLATILE,
    ROOT,
    AliasNode,
    ChangeMapNode,
    ChangesDirNode,
    Control,
    SavestateEntry,
    SavestateNode,
    VmEntry,
    VmNode,
    VolumeNode,
)
from vmtreefs.rules import commands, lineage, properties
from vmtreefs.rules.domain import MAX_DOMAIN_XML
from vmtreefs.rules.objects import DEFAULT_VOLUMES, Alias, Savestate, Vm, Volume
from vmtreefs.rules.properties import VM_PROPERTIES, VOLUME_PROPERTIES
from vmtreefs.runtime.lifecycle import Lifecycle

log = logging.getLogger("vmtreefs.fs")

LINK_ENTRIES = frozenset(
    {VmEntry.ORIGIN, VmEntry.CLONE_LINK, VmEntry.TEMPLATE, VmEntry.VERSION_LINK}
)
CHANGES_SUFFIX = ".changes"
ATTR_TIMEOUT = 1.0
ENTRY_TIMEOUT = 1.0
BLOCK_SIZE = 4096

P = ParamSpec("P")
R = TypeVar("R")


def _short(value: Any) -> str:
    if isinstance(value, bytes):
        text = value.decode("utf-8", "backslashreplace")
        return repr(text if len(text) <= 40 else text[:40] + "...")
    return str(value)


def handler(
    operation: str, quiet: frozenset[int] = frozenset(), names: int = 1
) -> Callable[
    [Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]]],
    Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]],
]:
    """Let only FUSEError out; log each refusal (except the expected ``quiet`` ones).

    ``names`` is how many byte-string arguments are names worth logging.
    """

    def decorate(
        fn: Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]],
    ) -> Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]]:
        async def wrapper(self: Operations, /, *args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await fn(self, *args, **kwargs)
            except pyfuse3.FUSEError:
                raise
            except VmtreeError as e:
                if e.errno not in quiet:
                    # The first ``names`` byte strings are names; never log data or values.
                    shown = [a for a in args if isinstance(a, bytes)][:names]
                    what = " ".join([operation, *(_short(a) for a in shown)])
                    self.tree.journal.refused(what, e)
                raise pyfuse3.FUSEError(e.errno) from None
            except OSError as e:
                code = e.errno or errno.EIO
                log.warning("%s failed: %s", operation, e)
                self.tree.journal.events.add(f"failed {operation}: {e.strerror or e}")
                raise pyfuse3.FUSEError(code) from None
            except Exception:
                log.exception("%s failed with an unexpected error; answering EIO", operation)
                raise pyfuse3.FUSEError(errno.EIO) from None

        functools.update_wrapper(wrapper, fn)
        return wrapper

    return decorate


def refuse(errno_: int, reason: str) -> VmtreeError:
    return VmtreeError(errno_, reason)


# Open files


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


def default_policy(volume_name: str) -> str:
    """The policy a volume of this name starts with (root: template, volatile: volatile)."""
    for spec in DEFAULT_VOLUMES:
        if spec.name == volume_name:
            return spec.policy
    return VOLUME_PROPERTIES[properties.POLICY].default


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
        self.lifecycle = lifecycle
        self.ctl = CtlDispatcher(tree, lifecycle)
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.mount_time_ns = time.time_ns()
        self.lookup_counts: dict[int, int] = {}
        self.handles: dict[int, Handle] = {}
        self._fh_counter = itertools.count(1)
        self.volume_mtimes: dict[int, int] = {}
        # Aliases removed or replaced while the kernel still holds their inode: a reader
        # that looked the name up just before keeps reading the old target, as on any
        # filesystem, until the kernel forgets the inode.
        self.departed_links: dict[int, str] = {}
        self._invalidate_send, self._invalidate_receive = trio.open_memory_channel[
            tuple[int, bool]
        ](1000)
        # A running guest writes its volumes behind the kernel's back: what the kernel
        # cached of them is stale once it starts and once it stops.
        tree.on_volumes_written_outside = self._forget_volume_pages
        tree.on_volumes_replaced = self._forget_volume_names
        self._stale_names: set[tuple[int, str]] = set()
        # VOL.changes/OTHER: the (volume, other volume) pair of each number handed out.
        self.change_maps: dict[int, tuple[int, int]] = {}
        self._change_map_serials: dict[tuple[int, int], int] = {}
        tree.on_names_changed = self._forget_top_names

    # Invalidation: done after the reply, from a task of its own, never inside a handler.

    def invalidate_later(self, inode: int, data: bool = False) -> None:
        """Ask the kernel to drop what it caches of ``inode`` (attributes, or also its pages)."""
        try:
            self._invalidate_send.send_nowait((inode, data))
        except trio.WouldBlock:
            log.debug("invalidation queue full; inode %d relies on the attribute timeout", inode)

    def _forget_volume_pages(self, volume_ids: list[int]) -> None:
        for volume_id in volume_ids:
            self.invalidate_later(inodes.volume_inode(volume_id), data=True)

    def _forget_volume_names(self, vm_id: int, names: list[str]) -> None:
        self._forget_names(inodes.vm_inode(vm_id, VmEntry.VOLUMES), names)

    def _forget_top_names(self, names: list[str]) -> None:
        self._forget_names(ROOT, names)

    def _forget_names(self, parent: int, names: list[str]) -> None:
        """Soon in any case (a commit at a VM's shutdown comes from no request); before
        the reply when a handler calls :meth:`forget_stale_names`."""
        for name in set(names):
            self._stale_names.add((parent, name))
            pyfuse3.invalidate_entry_async(parent, os.fsencode(name), ignore_enoent=True)

    async def forget_stale_names(self) -> None:
        """Names that now lead elsewhere are dropped from the kernel's cache before the
        request that changed them is answered, so the caller's next lookup sees the change.
        Called only where the kernel holds no lock on those parents (setxattr, removexattr,
        a ctl write); elsewhere the attribute timeout ends them."""
        stale, self._stale_names = self._stale_names, set()
        for parent, name in sorted(stale):
            try:
                # Without a deleted inode, the kernel locks only the parent.
                await trio.to_thread.run_sync(pyfuse3.invalidate_entry, parent, os.fsencode(name))
            except OSError as e:
                if e.errno != errno.ENOENT:
                    log.debug("invalidating %s in inode %d: %s", name, parent, e)

    async def run_invalidations(self) -> None:
        async for inode, data in self._invalidate_receive:
            if inode not in self.lookup_counts:
                continue
            try:
                await trio.to_thread.run_sync(
                    functools.partial(pyfuse3.invalidate_inode, inode, attr_only=not data)
                )
            except OSError as e:
                if e.errno != errno.ENOENT:
                    log.debug("invalidating inode %d: %s", inode, e)

    # Resolution of inodes

    def _vm(self, vm_id: int) -> Vm:
        vm = self.tree.ns.by_id.get(vm_id)
        if vm is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return vm

    def _volume(self, volume_id: int) -> tuple[Vm, Volume]:
        try:
            return self.tree.ns.volume_by_id(volume_id)
        except VmtreeError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _saved_volume(self, volume_id: int) -> tuple[Vm, Savestate, Volume] | None:
        """A savestate's volume (read-only), or None for a VM's own volume."""
        try:
            return self.tree.ns.savestate_volume_by_id(volume_id)
        except VmtreeError:
            return None

    def _any_volume(self, volume_id: int) -> tuple[Vm, Volume]:
        """A VM's volume or a savestate's, with the VM that owns it."""
        try:
            vm, _, volume = self.tree.ns.any_volume_by_id(volume_id)
        except VmtreeError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        return vm, volume

    def _change_map(self, serial: int) -> tuple[int, int]:
        pair = self.change_maps.get(serial)
        if pair is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        for volume_id in pair:
            self._any_volume(volume_id)
        return pair

    def _change_map_inode(self, volume_id: int, other_id: int) -> int:
        serial = self._change_map_serials.get((volume_id, other_id))
        if serial is None:
            serial = len(self.change_maps)
            self.change_maps[serial] = (volume_id, other_id)
            self._change_map_serials[(volume_id, other_id)] = serial
        return inodes.change_map_inode(serial)

    def _savestate(self, savestate_id: int) -> tuple[Vm, Savestate]:
        try:
            return self.tree.ns.savestate_by_id(savestate_id)
        except VmtreeError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _savestate_info(self, vm: Vm, savestate: Savestate) -> bytes:
        lines = [
            f"label: {savestate.label}",
            f"vm: {vm.name}",
            f"created: {time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(savestate.created))}",
            *(f"{key}: {value}" for key, value in sorted(savestate.info.items()) if key != "vm"),
            *(
                f"volume: {v.filename} {v.size}"
                for v in sorted(savestate.volumes.values(), key=lambda v: v.name)
            ),
        ]
        return "".join(line + "\n" for line in lines).encode()

    def _alias(self, alias_id: int) -> Alias:
        alias = self.tree.ns.aliases_by_id.get(alias_id)
        if alias is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return alias

    def _known_links(self) -> dict[int, str]:
        """Targets of the aliases the kernel holds, to keep them readable once removed."""
        ns = self.tree.ns
        known = {}
        for alias in ns.aliases_by_id.values():
            inode = inodes.alias_inode(alias.id)
            if inode in self.lookup_counts:
                known[inode] = ns.alias_target_name(alias)
        return known

    def _keep_departed(self, before: dict[int, str]) -> None:
        for inode, target in before.items():
            node = inodes.decode(inode)
            assert isinstance(node, AliasNode)
            if node.alias_id not in self.tree.ns.aliases_by_id and inode in self.lookup_counts:
                self.departed_links[inode] = target

    def _origin(self, vm: Vm) -> Vm | None:
        """The origin a user can see (not a VM removed while its instances still run)."""
        origin = None if vm.origin_id is None else self.tree.ns.by_id.get(vm.origin_id)
        return None if origin is None or origin.hidden else origin

    def _head(self, vm: Vm) -> Vm | None:
        """The head whose versions/ lists this version."""
        head = self.tree.ns.head_of(vm)
        return None if head is None or vm.hidden else head

    def _node(self, inode: int) -> inodes.Node:
        node = inodes.decode(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if isinstance(node, VmNode):
            vm = self._vm(node.vm_id)
            if node.entry in (VmEntry.ORIGIN, VmEntry.CLONE_LINK) and self._origin(vm) is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            if node.entry == VmEntry.TEMPLATE and vm.template is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            if node.entry == VmEntry.VERSION_LINK and self._head(vm) is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
        elif isinstance(node, (VolumeNode, ChangesDirNode)):
            self._any_volume(node.volume_id)
        elif isinstance(node, ChangeMapNode):
            self._change_map(node.serial)
        elif isinstance(node, SavestateNode):
            self._savestate(node.savestate_id)
        elif isinstance(node, AliasNode) and inode not in self.departed_links:
            self._alias(node.alias_id)
        return node

    def _parent_of(self, inode: int) -> int:
        node = self._node(inode)
        if isinstance(node, Control):
            return ROOT if inode in (ROOT, CONTROL_DIR) else CONTROL_DIR
        if isinstance(node, AliasNode):
            return ROOT
        if isinstance(node, VmNode):
            if node.entry == VmEntry.DIR:
                return ROOT
            if node.entry in (VmEntry.CLONE_LINK, VmEntry.CLONE_PLACEHOLDER):
                origin = self._origin(self._vm(node.vm_id))
                if origin is None:
                    raise pyfuse3.FUSEError(errno.ENOENT)
                return inodes.vm_inode(origin.id, VmEntry.CLONES)
            if node.entry == VmEntry.VERSION_LINK:
                head = self._head(self._vm(node.vm_id))
                if head is None:
                    raise pyfuse3.FUSEError(errno.ENOENT)
                return inodes.vm_inode(head.id, VmEntry.VERSIONS)
            return inodes.vm_inode(node.vm_id)
        if isinstance(node, SavestateNode):
            vm, savestate = self._savestate(node.savestate_id)
            if node.entry == SavestateEntry.DIR:
                return inodes.vm_inode(vm.id, VmEntry.SAVESTATES)
            return inodes.savestate_inode(savestate.id)
        if isinstance(node, ChangeMapNode):
            return inodes.changes_dir_inode(self._change_map(node.serial)[0])
        saved = self._saved_volume(node.volume_id)
        if saved is not None:
            return inodes.savestate_inode(saved[1].id, SavestateEntry.VOLUMES)
        vm, _ = self._volume(node.volume_id)
        return inodes.vm_inode(vm.id, VmEntry.VOLUMES)

    def _link_target(self, inode: int) -> str:
        """What a symlink reads; a relative path that stays inside the mount."""
        node = self._node(inode)
        if isinstance(node, AliasNode):
            if inode in self.departed_links:
                return self.departed_links[inode]
            return self.tree.ns.alias_target_name(self._alias(node.alias_id))
        if isinstance(node, VmNode):
            vm = self._vm(node.vm_id)
            if node.entry == VmEntry.ORIGIN:
                origin = self._origin(vm)
                assert origin is not None  # _node checked it
                return f"../{origin.name}"
            if node.entry in (VmEntry.CLONE_LINK, VmEntry.VERSION_LINK):
                return f"../../{vm.name}"
            if node.entry == VmEntry.TEMPLATE and vm.template is not None:
                return f"../{self.tree.ns.template_name(vm.template)}"
        raise refuse(errno.EINVAL, "not a symbolic link")

    # Attributes

    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.generation = 0
        attr.entry_timeout = ENTRY_TIMEOUT
        attr.attr_timeout = ATTR_TIMEOUT
        attr.st_uid = self.uid
        attr.st_gid = self.gid
        attr.st_blksize = BLOCK_SIZE
        attr.st_nlink = 1
        attr.st_size = 0
        time_ns = self.mount_time_ns
        directory = False
        if isinstance(node, Control):
            if inode == ROOT:
                directory = True
                attr.st_nlink = 3 + len(self.tree.ns)
            elif inode == CONTROL_DIR:
                directory = True
                attr.st_nlink = 2
            elif inode == CONTROL_CTL:
                attr.st_mode = stat.S_IFREG | 0o600
            else:
                attr.st_mode = stat.S_IFREG | 0o444
        elif isinstance(node, AliasNode):
            if inode not in self.departed_links:
                time_ns = int(self._alias(node.alias_id).created * 1e9)
            # An alias can go, or name another VM, as a side effect of an operation on
            # something else (rmdir of its VM, a commit): the kernel must ask each time.
            attr.entry_timeout = 0
            attr.st_mode = stat.S_IFLNK | 0o777
            attr.st_size = len(self._link_target(inode))
        elif isinstance(node, VmNode):
            vm = self._vm(node.vm_id)
            time_ns = int(vm.created * 1e9)
            if node.entry == VmEntry.DIR:
                directory = True
                attr.st_nlink = 2 + len(inodes.VM_SUBDIRS)
            elif node.entry in inodes.VM_SUBDIRS:
                directory = True
                attr.st_nlink = 2
            elif node.entry == VmEntry.CLONE_PLACEHOLDER:
                # Only the reply to a clone mkdir: the next lookup finds the symlink instead.
                directory = True
                attr.st_nlink = 2
                attr.entry_timeout = 0
                attr.attr_timeout = 0
            elif node.entry in LINK_ENTRIES:
                attr.st_mode = stat.S_IFLNK | 0o777
                attr.st_size = len(self._link_target(inode))
            elif node.entry == VmEntry.CTL:
                attr.st_mode = stat.S_IFREG | 0o600
            elif node.entry == VmEntry.DOMAIN:
                attr.st_mode = stat.S_IFREG | (0o400 if vm.immutable else 0o600)
                attr.st_size = len(self._domain_text_now(vm))
            elif node.entry == VmEntry.CONSOLE:
                attr.st_mode = stat.S_IFREG | 0o400
                lifecycle = self.lifecycle
                attr.st_size = lifecycle.console_size(vm) if lifecycle else 0
            else:
                attr.st_mode = stat.S_IFREG | 0o444
                attr.st_size = len(self._state_text(vm))
        elif isinstance(node, SavestateNode):
            vm, savestate = self._savestate(node.savestate_id)
            time_ns = int(savestate.created * 1e9)
            if node.entry in (SavestateEntry.DIR, SavestateEntry.VOLUMES):
                directory = True
                attr.st_nlink = 3 if node.entry == SavestateEntry.DIR else 2
            elif node.entry == SavestateEntry.MEMORY:
                attr.st_mode = stat.S_IFREG | 0o400
                try:
                    attr.st_size = self.tree.savestates.image_path(savestate).stat().st_size
                except OSError:
                    attr.st_size = 0
            else:
                attr.st_mode = stat.S_IFREG | 0o444
                attr.st_size = len(self._savestate_info(vm, savestate))
        elif isinstance(node, ChangesDirNode):
            directory = True
            attr.st_nlink = 2
            time_ns = int(self._any_volume(node.volume_id)[1].created * 1e9)
        elif isinstance(node, ChangeMapNode):
            # Made at open from the engine's metadata: its size is known only then.
            attr.st_mode = stat.S_IFREG | 0o444
            attr.entry_timeout = attr.attr_timeout = 0
        elif (saved := self._saved_volume(node.volume_id)) is not None:
            _, _, volume = saved
            attr.st_mode = stat.S_IFREG | 0o400
            attr.st_size = volume.size
            attr.st_blocks = 0
            time_ns = int(volume.created * 1e9)
        else:
            vm, volume = self._volume(node.volume_id)
            attr.st_mode = stat.S_IFREG | (0o400 if vm.immutable else 0o600)
            attr.st_size = volume.size
            # Allocation is the engine's business (and shared between snapshots); a
            # zero here tells cp and rsync the file may be sparse, which it usually is.
            attr.st_blocks = 0
            time_ns = self.volume_mtimes.get(volume.id, int(volume.created * 1e9))
        if directory:
            attr.st_mode = stat.S_IFDIR | 0o755
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = time_ns
        return attr

    def _state_text(self, vm: Vm) -> bytes:
        return f"{vm.state}\n".encode()

    def _domain_text_now(self, vm: Vm) -> bytes:
        """For st_size: the stored base, or the default as far as it is known yet."""
        if vm.domain_xml is not None:
            return vm.domain_xml.encode()
        lifecycle = self.lifecycle
        return lifecycle.default_domain_xml_now().encode() if lifecycle else b""

    async def _domain_text(self, vm: Vm) -> bytes:
        lifecycle = self.lifecycle
        if lifecycle is None:
            return (vm.domain_xml or "").encode()
        return (await lifecycle.base_domain_xml(vm)).encode()

    def _entry(self, inode: int) -> pyfuse3.EntryAttributes:
        """Attributes for a reply that gives the kernel a new reference (lookup, mkdir, create)."""
        attr = self._attributes(inode)
        self.lookup_counts[inode] = self.lookup_counts.get(inode, 0) + 1
        return attr

    # Directory contents: (inode, name) sorted by inode, so readdir offsets stay stable.

    def _children(self, inode: int) -> list[tuple[int, str]]:
        node = self._node(inode)
        ns = self.tree.ns
        entries: list[tuple[int, str]]
        if isinstance(node, Control):
            if inode == ROOT:
                entries = [(CONTROL_DIR, CONTROL_DIR_NAME)]
                entries += [(inodes.vm_inode(vm.id), vm.name) for vm in ns.visible()]
                entries += [(inodes.alias_inode(a.id), a.name) for a in ns.aliases_by_id.values()]
            elif inode == CONTROL_DIR:
                entries = [(ino, name) for name, ino in CONTROL_FILES.items()]
            else:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
        elif isinstance(node, VmNode):
            vm = self._vm(node.vm_id)
            if node.entry == VmEntry.DIR:
                entries = [
                    (inodes.vm_inode(vm.id, entry), name)
                    for name, entry in inodes.VM_DIR_ENTRIES.items()
                ]
                if self._origin(vm) is not None:
                    entries.append((inodes.vm_inode(vm.id, VmEntry.ORIGIN), "origin"))
                if vm.template is not None:
                    entries.append((inodes.vm_inode(vm.id, VmEntry.TEMPLATE), "template"))
            elif node.entry == VmEntry.VERSIONS:
                entries = [
                    (inodes.vm_inode(v.id, VmEntry.VERSION_LINK), f"v{v.version}")
                    for v in ns.versions_of(vm)
                ]
            elif node.entry == VmEntry.VOLUMES:
                entries = self._volume_entries(vm.volumes.values())
            elif node.entry == VmEntry.CLONES:
                entries = [
                    (inodes.vm_inode(c.id, VmEntry.CLONE_LINK), c.name) for c in ns.clones_of(vm)
                ]
            elif node.entry == VmEntry.SAVESTATES:
                entries = [
                    (inodes.savestate_inode(ss.id), ss.label) for ss in vm.savestates.values()
                ]
            elif node.entry in inodes.VM_SUBDIRS or node.entry == VmEntry.CLONE_PLACEHOLDER:
                entries = []
            else:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
        elif isinstance(node, SavestateNode):
            _, savestate = self._savestate(node.savestate_id)
            if node.entry == SavestateEntry.DIR:
                entries = [
                    (inodes.savestate_inode(savestate.id, entry), name)
                    for name, entry in inodes.SAVESTATE_DIR_ENTRIES.items()
                ]
            elif node.entry == SavestateEntry.VOLUMES:
                entries = self._volume_entries(savestate.volumes.values())
            else:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
        elif isinstance(node, ChangesDirNode):
            entries = []  # any related VM can be looked up: listing them all would not scale
        else:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        entries.sort()
        return entries

    @staticmethod
    def _volume_entries(volumes: Iterable[Volume]) -> list[tuple[int, str]]:
        entries = []
        for v in volumes:
            entries.append((inodes.volume_inode(v.id), v.filename))
            entries.append((inodes.changes_dir_inode(v.id), v.name + CHANGES_SUFFIX))
        return entries

    @staticmethod
    def _volume_child(volumes: Iterable[Volume], name: str) -> int | None:
        for volume in volumes:
            if name == volume.filename:
                return inodes.volume_inode(volume.id)
            if name == volume.name + CHANGES_SUFFIX:
                return inodes.changes_dir_inode(volume.id)
        return None

    def _child(self, parent: int, name: str) -> int:
        """The inode of ``name`` in ``parent``; ENOENT when there is none."""
        if name == ".":
            self._node(parent)
            return parent
        if name == "..":
            return self._parent_of(parent)
        node = self._node(parent)
        ns = self.tree.ns
        if parent == ROOT:
            if name == CONTROL_DIR_NAME:
                return CONTROL_DIR
            vm = ns.by_name.get(name)
            if vm is not None and not vm.hidden:
                return inodes.vm_inode(vm.id)
            alias = ns.aliases.get(name)
            if alias is not None:
                return inodes.alias_inode(alias.id)
        elif parent == CONTROL_DIR:
            if name in CONTROL_FILES:
                return CONTROL_FILES[name]
        elif isinstance(node, VmNode):
            vm = self._vm(node.vm_id)
            if node.entry == VmEntry.DIR:
                entry = inodes.VM_DIR_ENTRIES.get(name)
                if entry is not None:
                    return inodes.vm_inode(vm.id, entry)
                if name == "origin" and self._origin(vm) is not None:
                    return inodes.vm_inode(vm.id, VmEntry.ORIGIN)
                if name == "template" and vm.template is not None:
                    return inodes.vm_inode(vm.id, VmEntry.TEMPLATE)
            elif node.entry == VmEntry.VERSIONS:
                for version in ns.versions_of(vm):
                    if name == f"v{version.version}":
                        return inodes.vm_inode(version.id, VmEntry.VERSION_LINK)
            elif node.entry == VmEntry.VOLUMES:
                found = self._volume_child(vm.volumes.values(), name)
                if found is not None:
                    return found
            elif node.entry == VmEntry.CLONES:
                clone = ns.by_name.get(name)
                if clone is not None and clone.origin_id == vm.id:
                    return inodes.vm_inode(clone.id, VmEntry.CLONE_LINK)
            elif node.entry == VmEntry.SAVESTATES:
                savestate = vm.savestates.get(name)
                if savestate is not None:
                    return inodes.savestate_inode(savestate.id)
            elif node.entry not in inodes.VM_SUBDIRS and node.entry != VmEntry.CLONE_PLACEHOLDER:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
        elif isinstance(node, SavestateNode):
            _, savestate = self._savestate(node.savestate_id)
            if node.entry == SavestateEntry.DIR:
                ss_entry = inodes.SAVESTATE_DIR_ENTRIES.get(name)
                if ss_entry is not None:
                    return inodes.savestate_inode(savestate.id, ss_entry)
            elif node.entry == SavestateEntry.VOLUMES:
                found = self._volume_child(savestate.volumes.values(), name)
                if found is not None:
                    return found
            else:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
        elif isinstance(node, ChangesDirNode):
            vm, volume = self._any_volume(node.volume_id)
            try:
                other = lineage.comparable_volume(ns, vm, volume, name)
            except VmtreeError as e:
                # A lookup's ENOENT is not logged as a rule; this one says why.
                self.tree.journal.refused(
                    f"change map of {vm.name}/{volume.filename} against {name}", e
                )
                raise pyfuse3.FUSEError(e.errno) from None
            return self._change_map_inode(volume.id, other.id)
        else:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        raise pyfuse3.FUSEError(errno.ENOENT)

    # Handlers: lookup and attributes

    @handler("lookup", quiet=frozenset({errno.ENOENT}))
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._entry(self._child(parent_inode, os.fsdecode(name)))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            left = self.lookup_counts.get(inode, 0) - count
            if left > 0:
                self.lookup_counts[inode] = left
            else:
                self.lookup_counts.pop(inode, None)
                self.departed_links.pop(inode, None)

    @handler("getattr")
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(inode)

    @handler("setattr")
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise refuse(errno.EPERM, "chmod and chown are not allowed on vmtreefs entries")
        if isinstance(node, SavestateNode) or (
            isinstance(node, VolumeNode) and self._saved_volume(node.volume_id) is not None
        ):
            raise refuse(errno.EROFS, "a savestate cannot be changed, only removed (rmdir)")
        if fields.update_size:
            if isinstance(node, VolumeNode):
                handle = self.handles.get(fh) if fh is not None else None
                _, volume = self._volume(node.volume_id)
                if (
                    isinstance(handle, VolumeHandle)
                    and handle.truncated
                    and handle.written_end <= attr.st_size < volume.size
                ):
                    # cp over a bigger volume ends by truncating to its own size; after the
                    # discard everything past what it wrote already reads as zeros.
                    log.debug("volume %d keeps its size over a copy's final truncate", volume.id)
                else:
                    await self.tree.volumes.resize(node.volume_id, attr.st_size)
            elif inode == CONTROL_CTL or (isinstance(node, VmNode) and node.entry == VmEntry.CTL):
                pass  # "echo cmd > ctl" truncates first: a control file has nothing to truncate.
            elif isinstance(node, VmNode) and node.entry == VmEntry.DOMAIN:
                handle = self.handles.get(fh) if fh is not None else None
                if not isinstance(handle, DomainHandle) or attr.st_size > len(handle.data):
                    raise refuse(errno.EINVAL, "domain.xml is replaced by writing it whole (cp, >)")
                if attr.st_size < len(handle.data):
                    del handle.data[attr.st_size :]
                    handle.dirty = True
            else:
                raise refuse(errno.EACCES, "only volumes can be truncated")
        if fields.update_mtime and isinstance(node, VolumeNode):
            self.volume_mtimes[node.volume_id] = attr.st_mtime_ns
        return self._attributes(inode)

    @handler("readlink")
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(self._link_target(inode))

    # Directories

    @handler("opendir")
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._children(inode)  # ENOTDIR / ENOENT now rather than at readdir
        return inode

    @handler("readdir")
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for inode, name in self._children(fh):
            if inode <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attributes(inode), inode):
                break
            # Entries go out as READDIRPLUS: the kernel now holds a reference to each.
            self.lookup_counts[inode] = self.lookup_counts.get(inode, 0) + 1

    async def releasedir(self, fh: int) -> None:
        pass

    @handler("mkdir")
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self._node(parent_inode)
        if parent_inode == ROOT:
            vm = await self.tree.create_vm(name)
            return self._entry(inodes.vm_inode(vm.id))
        if isinstance(node, VmNode) and node.entry == VmEntry.CLONES:
            clone = await self.tree.clone_vm(node.vm_id, name)
            # The reply must be a directory, but SRC/clones/NEW is a symlink to ../../NEW:
            # answer with a placeholder the kernel must look up again at once (entry timeout
            # 0), and drop its dentry, so one directory inode never has two names.
            pyfuse3.invalidate_entry_async(parent_inode, name, ignore_enoent=True)
            return self._entry(inodes.vm_inode(clone.id, VmEntry.CLONE_PLACEHOLDER))
        if isinstance(node, VmNode) and node.entry in (VmEntry.SAVESTATES, VmEntry.VERSIONS):
            how = {
                VmEntry.SAVESTATES: "savestates are made by `save LABEL` written to ctl",
                VmEntry.VERSIONS: "versions are made by commits (`commit` written to ctl)",
            }[node.entry]
            raise refuse(errno.EINVAL, f"not by mkdir: {how}")
        raise refuse(errno.EPERM, "new directories can only be made at the top level (VMs)")

    @handler("rmdir")
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        text = os.fsdecode(name)
        inode = self._child(parent_inode, text)
        node = self._node(inode)
        if isinstance(node, VmNode) and node.entry == VmEntry.DIR:
            before = self._known_links()
            await self.tree.delete_vm(node.vm_id)
            self._keep_departed(before)
            return
        if isinstance(node, SavestateNode) and node.entry == SavestateEntry.DIR:
            vm, savestate = self._savestate(node.savestate_id)
            await self.tree.savestates.delete(vm.id, savestate.label)
            return
        fixed = isinstance(node, ChangesDirNode) or (
            isinstance(node, VmNode) and node.entry in inodes.VM_SUBDIRS
        )
        if inode == CONTROL_DIR or fixed:
            raise refuse(errno.EPERM, f"{text!r} is part of the fixed layout and cannot be removed")
        raise refuse(errno.ENOTDIR, f"{text!r} is not a directory")

    # Files

    @handler("unlink")
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        text = os.fsdecode(name)
        inode = self._child(parent_inode, text)
        node = self._node(inode)
        if isinstance(node, SavestateNode) or (
            isinstance(node, VolumeNode) and self._saved_volume(node.volume_id) is not None
        ):
            raise refuse(errno.EROFS, "a savestate cannot be changed, only removed (rmdir)")
        if isinstance(node, VolumeNode):
            await self.tree.volumes.delete(node.volume_id)
            return
        if isinstance(node, AliasNode):
            before = self._known_links()
            await self.tree.aliases.remove(text)
            self._keep_departed(before)
            return
        if (isinstance(node, VmNode) and node.entry == VmEntry.DIR) or inode == CONTROL_DIR:
            raise refuse(errno.EISDIR, f"{text!r} is a directory")
        if isinstance(node, VmNode) and node.entry == VmEntry.CLONE_LINK:
            raise refuse(
                errno.EPERM, f"{text!r} lists a linked clone: delete it with rmdir of the VM itself"
            )
        if isinstance(node, VmNode) and node.entry == VmEntry.VERSION_LINK:
            raise refuse(
                errno.EPERM, f"{text!r} lists a version: delete it with rmdir of the version itself"
            )
        if isinstance(node, VmNode) and node.entry == VmEntry.TEMPLATE:
            await self.tree.versions.remove_template(node.vm_id)
            return
        raise refuse(errno.EPERM, f"{text!r} is part of the fixed layout and cannot be removed")

    @handler("rename", names=2)
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
        inode = self._child(parent_inode_old, old_text)
        node = self._node(inode)
        movable = isinstance(node, (VolumeNode, AliasNode)) or (
            isinstance(node, VmNode) and node.entry == VmEntry.DIR
        )
        if not movable:
            raise refuse(errno.EPERM, f"{old_text!r} is part of the fixed layout")
        if parent_inode_old != parent_inode_new:
            raise refuse(
                errno.EINVAL,
                "a VM can only be renamed within the top level, a volume within its volumes/",
            )
        if isinstance(node, VolumeNode):
            await self.tree.volumes.rename(node.volume_id, name_new)
        elif isinstance(node, AliasNode):
            before = self._known_links()
            await self.tree.aliases.rename(old_text, name_new)
            self._keep_departed(before)
        elif isinstance(node, VmNode):
            await self.tree.rename_vm(node.vm_id, name_new)

    @handler("create")
    async def create(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node = self._node(parent_inode)
        if not (isinstance(node, VmNode) and node.entry == VmEntry.VOLUMES):
            raise refuse(
                errno.EPERM, "regular files can only be made in a VM's volumes/ (as NAME.img)"
            )
        vm_id = node.vm_id
        volume = await self.tree.volumes.create(vm_id, name)
        opened = await self.tree.volumes.open(volume.id, writable=True)
        fh = self._add_handle(VolumeHandle(opened))
        return pyfuse3.FileInfo(fh=fh), self._entry(inodes.volume_inode(volume.id))

    def close_all(self) -> None:
        """Close the files the kernel never released (it does not, after an unmount)."""
        for handle in self.handles.values():
            if isinstance(handle, VolumeHandle):
                handle.volume.close()
        self.handles.clear()

    def _add_handle(self, handle: Handle) -> int:
        fh = next(self._fh_counter)
        self.handles[fh] = handle
        return fh

    def _handle(self, fh: int) -> Handle:
        try:
            return self.handles[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    @handler("open")
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if isinstance(node, VolumeNode) and self._saved_volume(node.volume_id) is not None:
            if writable:
                raise refuse(errno.EROFS, "a savestate's volumes are read-only")
            opened = await self.tree.volumes.open_saved(node.volume_id)
            # A savestate's volume never changes: what the kernel cached of it stays true.
            return pyfuse3.FileInfo(fh=self._add_handle(VolumeHandle(opened)), keep_cache=True)
        if isinstance(node, ChangeMapNode):
            if writable:
                raise refuse(errno.EACCES, "a change map is read-only")
            volume_id, other_id = self._change_map(node.serial)
            data = await self.tree.volumes.change_map(volume_id, other_id)
            return pyfuse3.FileInfo(fh=self._add_handle(ContentHandle(data)), direct_io=True)
        if isinstance(node, SavestateNode) and node.entry == SavestateEntry.MEMORY:
            if writable:
                raise refuse(errno.EROFS, "a savestate's memory image is read-only")
            _, savestate = self._savestate(node.savestate_id)
            path = self.tree.savestates.image_path(savestate)
            fd = await trio.to_thread.run_sync(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
            return pyfuse3.FileInfo(fh=self._add_handle(FileHandle(fd)))
        if isinstance(node, VolumeNode):
            truncate = writable and bool(flags & os.O_TRUNC)
            if truncate:
                # cp and > over a volume: its old data goes, its size stays (volumes only grow).
                await self.tree.volumes.discard(node.volume_id)
                self.invalidate_later(inode, data=True)
            opened = await self.tree.volumes.open(node.volume_id, writable)
            stable = self._volume(node.volume_id)[0].version_of is not None
            return pyfuse3.FileInfo(
                fh=self._add_handle(VolumeHandle(opened, truncate)), keep_cache=stable
            )
        handle: Handle
        if inode == CONTROL_CTL:
            handle = CtlHandle(None)
        elif isinstance(node, VmNode) and node.entry == VmEntry.CTL:
            handle = CtlHandle(node.vm_id)
        elif isinstance(node, VmNode) and node.entry == VmEntry.DOMAIN and writable:
            vm = self._vm(node.vm_id)
            self.tree.check_domain_writable(vm)
            truncate = bool(flags & os.O_TRUNC)
            start = b"" if truncate else await self._domain_text(vm)
            handle = DomainHandle(vm.id, bytearray(start), dirty=truncate)
        elif isinstance(node, VmNode) and node.entry == VmEntry.CONSOLE and not writable:
            handle = ConsoleHandle(node.vm_id)
        else:
            if writable:
                raise refuse(errno.EACCES, "this file is read-only")
            handle = ContentHandle(await self._content(inode))
        return pyfuse3.FileInfo(fh=self._add_handle(handle), direct_io=True)

    async def _content(self, inode: int) -> bytes:
        node = self._node(inode)
        if inode == CONTROL_STATUS:
            return (await self.tree.status_text()).encode()
        if inode == CONTROL_EVENTS:
            return self.tree.journal.events.text().encode()
        if inode == CONTROL_VOLATILE:
            return self.tree.volatile_text().encode()
        if isinstance(node, VmNode) and node.entry == VmEntry.STATE:
            return self._state_text(self._vm(node.vm_id))
        if isinstance(node, VmNode) and node.entry == VmEntry.DOMAIN:
            return await self._domain_text(self._vm(node.vm_id))
        if isinstance(node, SavestateNode) and node.entry == SavestateEntry.INFO:
            return self._savestate_info(*self._savestate(node.savestate_id))
        raise refuse(errno.EISDIR, "not a regular file")

    @handler("read", names=0)
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handle(fh)
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
            lifecycle = self.lifecycle
            if lifecycle is None:
                return b""
            vm = self._vm(handle.vm_id)
            return await trio.to_thread.run_sync(lifecycle.read_console, vm, off, size)
        return handle.data[off : off + size]

    @handler("write", names=0)
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handle(fh)
        if isinstance(handle, VolumeHandle):
            _, volume = self._volume(handle.volume.vol_id)
            size_before = volume.size
            written = await self.tree.volumes.write(handle.volume, off, buf)
            handle.written_end = max(handle.written_end, off + written)
            handle.unsynced = True
            self.volume_mtimes[volume.id] = time.time_ns()
            if volume.size != size_before:
                # Other open files and cached stat results still hold the old size.
                self.invalidate_later(inodes.volume_inode(volume.id))
            return written
        if isinstance(handle, CtlHandle):
            async with handle.lock:
                handle.result = b""
                handle.read_pos = 0
                if handle.vm_id is not None:
                    self._vm(handle.vm_id)
                known = commands.GLOBAL_COMMANDS if handle.vm_id is None else commands.VM_COMMANDS
                command = commands.parse_command(buf, known)
                try:
                    result = await self.ctl.run(handle.vm_id, command)
                finally:
                    await self.forget_stale_names()
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

    @handler("flush")
    async def flush(self, fh: int) -> None:
        """Every close() of a written volume syncs it: a write the storage refuses late
        (dm-thin reports a full pool only at write-back) then fails the close, which cp
        and dd report, instead of vanishing."""
        handle = self._handle(fh)
        if isinstance(handle, VolumeHandle) and handle.unsynced:
            await self.fsync(fh, False)
        if isinstance(handle, DomainHandle) and handle.dirty:
            # Checked and stored at close: a bad description fails the close (EINVAL).
            handle.dirty = False
            await self.tree.set_domain_xml(handle.vm_id, bytes(handle.data))

    @handler("fsync")
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._handle(fh)
        if isinstance(handle, VolumeHandle):
            handle.unsynced = False
            await trio.to_thread.run_sync(handle.volume.fsync)

    @handler("release")
    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if isinstance(handle, VolumeHandle):
            await trio.to_thread.run_sync(handle.volume.close)
        elif isinstance(handle, FileHandle):
            os.close(handle.fd)

    # What this filesystem never allows, or not yet

    @handler("symlink", names=2)
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self._node(parent_inode)
        if parent_inode == ROOT:
            alias = await self.tree.aliases.create(name, target)
            return self._entry(inodes.alias_inode(alias.id))
        if isinstance(node, VmNode) and node.entry == VmEntry.DIR:
            if os.fsdecode(name) != "template":
                raise refuse(
                    errno.EINVAL, "the only symlink in a VM directory is its template (template)"
                )
            await self.tree.versions.set_template(node.vm_id, target)
            return self._entry(inodes.vm_inode(node.vm_id, VmEntry.TEMPLATE))
        raise refuse(errno.EPERM, "symlinks can only be made at the top level (aliases)")

    @handler("link")
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise refuse(errno.EPERM, "hard links are never allowed")

    @handler("mknod")
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise refuse(errno.EPERM, "device nodes, fifos and sockets are never allowed")

    # Extended attributes: properties of VMs and volumes.

    async def _property_values(self, inode: int, wanted: str) -> dict[str, str] | None:
        """The properties of a VM directory or volume, or None for other entries.

        ``usage`` asks the engine about every extent, so it is measured only when wanted.
        """
        node = self._node(inode)
        if isinstance(node, VmNode) and node.entry == VmEntry.DIR:
            vm = self._vm(node.vm_id)
            values = {name: vm.props.get(name, p.default) for name, p in VM_PROPERTIES.items()}
            values["created"] = f"{vm.created:.6f}"
            values["id"] = str(vm.id)
            if wanted == "usage":
                values["usage"] = str(await self.tree.vm_usage(vm.id))
            return values
        if isinstance(node, VolumeNode):
            _, volume = self._volume(node.volume_id)
            return {properties.POLICY: volume.policy}
        return None

    @handler("listxattr")
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        node = self._node(inode)
        if isinstance(node, VmNode) and node.entry == VmEntry.DIR:
            return [p.xattr.encode() for p in VM_PROPERTIES.values()]
        if isinstance(node, VolumeNode):
            return [p.xattr.encode() for p in VOLUME_PROPERTIES.values()]
        return []

    @handler("getxattr", quiet=frozenset({errno.ENODATA}))
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        text = os.fsdecode(name)
        if not text.startswith(properties.PREFIX):  # ls -l asks for ACLs and SELinux labels
            self._node(inode)
            raise refuse(pyfuse3.ENOATTR, f"no attribute {text!r}")
        values = await self._property_values(inode, text.removeprefix(properties.PREFIX))
        if values is None:
            raise refuse(pyfuse3.ENOATTR, f"no attribute {text!r}")
        value = values.get(text[len(properties.PREFIX) :])
        if value is None:
            raise refuse(pyfuse3.ENOATTR, f"no attribute {text!r}")
        return value.encode()

    def _settable(self, inode: int, name: bytes) -> tuple[inodes.Node, properties.Property]:
        node = self._node(inode)
        table = None
        if isinstance(node, VmNode) and node.entry == VmEntry.DIR:
            table = VM_PROPERTIES
        elif isinstance(node, VolumeNode):
            table = VOLUME_PROPERTIES
        if table is None:
            raise refuse(errno.ENOTSUP, "only VM directories and volumes have properties")
        prop = properties.lookup(table, name)
        if prop is None:
            raise properties.unknown(name)
        return node, prop

    @handler("setxattr")
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        node, prop = self._settable(inode, name)
        checked = properties.check_value(prop, value)
        if isinstance(node, VolumeNode):
            await self.tree.set_volume_policy(node.volume_id, checked)
        elif isinstance(node, VmNode):
            await self.tree.set_property(node.vm_id, prop.name, checked)
            self.invalidate_volumes_later(node.vm_id)
            await self.forget_stale_names()

    @handler("removexattr")
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """Removing a property sets it back to its default."""
        node, prop = self._settable(inode, name)
        if not prop.writable:
            properties.check_value(prop, b"")  # the read-only refusal
        if isinstance(node, VolumeNode):
            _, volume = self._volume(node.volume_id)
            await self.tree.set_volume_policy(node.volume_id, default_policy(volume.name))
        elif isinstance(node, VmNode):
            await self.tree.set_property(node.vm_id, prop.name, None)
            self.invalidate_volumes_later(node.vm_id)
            await self.forget_stale_names()

    def invalidate_volumes_later(self, vm_id: int) -> None:
        """Volume modes follow immutability: drop the kernel's cached ones."""
        for volume in self._vm(vm_id).volumes.values():
            self.invalidate_later(inodes.volume_inode(volume.id))

    @handler("statfs")
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        usage = await trio.to_thread.run_sync(self.tree.engine.usage)
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
