"""What every entry of the mount shares: its attributes, the refusals that are not
rules, and the per-mount state the entries are resolved against.

The view is the tree as a filesystem, with no pyfuse3 in it (borg's ``vfs.py``
beside its ``fuse.py``): each kind of entry is a class that answers for itself what
it looks like (attributes), what it holds (children, a child by name), where it
hangs (parent), what it points to (a symlink's target) and which properties it
has. The pyfuse3 adapter, ``fs/operations.py``, only translates.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from vmtreefs.core.tree import VmTree
from vmtreefs.errors import VmtreeError
from vmtreefs.fs import inodes
from vmtreefs.rules.namespace import Namespace
from vmtreefs.rules.objects import Alias, Savestate, Vm, Volume
from vmtreefs.rules.properties import Property
from vmtreefs.runtime.lifecycle import Lifecycle

ATTR_TIMEOUT = 1.0
ENTRY_TIMEOUT = 1.0


class QuietError(Exception):
    """An errno the kernel gets that is no decision worth logging: no such entry, not
    a directory. A rule's refusal is a :class:`VmtreeError` and is logged."""

    def __init__(self, code: int) -> None:
        super().__init__(errno.errorcode.get(code, str(code)))
        self.errno = code


@dataclass
class Attrs:
    """What stat() shows of an entry. ``size_from`` measures a size that only a file
    outside the tree knows (a console log, a memory image): the adapter runs it off
    the trio thread, since it is a stat() call."""

    kind: int  # stat.S_IFDIR, S_IFREG or S_IFLNK
    perm: int
    time_ns: int
    size: int = 0
    nlink: int = 1
    entry_timeout: float = ENTRY_TIMEOUT
    attr_timeout: float = ATTR_TIMEOUT
    size_from: Callable[[], int] | None = None

    @property
    def mode(self) -> int:
        return self.kind | self.perm


def directory(time_ns: int, nlink: int = 2) -> Attrs:
    return Attrs(stat.S_IFDIR, 0o755, time_ns, nlink=nlink)


def regular(perm: int, time_ns: int, size: int = 0) -> Attrs:
    return Attrs(stat.S_IFREG, perm, time_ns, size=size)


def symlink(target: str, time_ns: int) -> Attrs:
    return Attrs(stat.S_IFLNK, 0o777, time_ns, size=len(target))


def seconds_to_ns(seconds: float) -> int:
    return int(seconds * 1e9)


class Scope:
    """The tree, and what this mount adds to it: the change-map numbers it handed out,
    the aliases the kernel still holds after they went, volumes' modification times."""

    def __init__(self, tree: VmTree, lifecycle: Lifecycle | None, mount_time_ns: int) -> None:
        self.tree = tree
        self.lifecycle = lifecycle
        self.mount_time_ns = mount_time_ns
        # Aliases removed or replaced while the kernel still holds their inode: a reader
        # that looked the name up just before keeps reading the old target, as on any
        # filesystem, until the kernel forgets the inode.
        self.departed_links: dict[int, str] = {}
        # VOL.changes/OTHER: the (volume, other volume) pair of each number handed out.
        self.change_maps: dict[int, tuple[int, int]] = {}
        self._change_map_serials: dict[tuple[int, int], int] = {}
        self.volume_mtimes: dict[int, int] = {}

    @property
    def ns(self) -> Namespace:
        return self.tree.ns

    def vm(self, vm_id: int) -> Vm:
        vm = self.ns.by_id.get(vm_id)
        if vm is None:
            raise QuietError(errno.ENOENT)
        return vm

    def volume(self, volume_id: int) -> tuple[Vm, Volume]:
        """A VM's own volume (not a savestate's)."""
        try:
            return self.ns.volume_by_id(volume_id)
        except VmtreeError:
            raise QuietError(errno.ENOENT) from None

    def saved_volume(self, volume_id: int) -> tuple[Vm, Savestate, Volume] | None:
        """A savestate's volume (read-only), or None for a VM's own volume."""
        try:
            return self.ns.savestate_volume_by_id(volume_id)
        except VmtreeError:
            return None

    def any_volume(self, volume_id: int) -> tuple[Vm, Volume]:
        """A VM's volume or a savestate's, with the VM that owns it."""
        try:
            vm, _, volume = self.ns.any_volume_by_id(volume_id)
        except VmtreeError:
            raise QuietError(errno.ENOENT) from None
        return vm, volume

    def savestate(self, savestate_id: int) -> tuple[Vm, Savestate]:
        try:
            return self.ns.savestate_by_id(savestate_id)
        except VmtreeError:
            raise QuietError(errno.ENOENT) from None

    def alias(self, alias_id: int) -> Alias:
        alias = self.ns.aliases_by_id.get(alias_id)
        if alias is None:
            raise QuietError(errno.ENOENT)
        return alias

    def change_map(self, serial: int) -> tuple[int, int]:
        pair = self.change_maps.get(serial)
        if pair is None:
            raise QuietError(errno.ENOENT)
        for volume_id in pair:
            self.any_volume(volume_id)
        return pair

    def change_map_inode(self, volume_id: int, other_id: int) -> int:
        serial = self._change_map_serials.get((volume_id, other_id))
        if serial is None:
            serial = len(self.change_maps)
            self.change_maps[serial] = (volume_id, other_id)
            self._change_map_serials[(volume_id, other_id)] = serial
        return inodes.change_map_inode(serial)

    def origin(self, vm: Vm) -> Vm | None:
        """The origin a user can see (not a VM removed while its instances still run)."""
        origin = None if vm.origin_id is None else self.ns.by_id.get(vm.origin_id)
        return None if origin is None or origin.hidden else origin

    def head(self, vm: Vm) -> Vm | None:
        """The head whose versions/ lists this version."""
        head = self.ns.head_of(vm)
        return None if head is None or vm.hidden else head


class Entry:
    """One entry of the mount. The defaults are those of a plain file: no children, not
    a symlink, no properties; each kind overrides what it is."""

    # Part of the fixed layout: rmdir is refused with EPERM rather than ENOTDIR.
    fixed = False
    # Inside a savestate, which is changed only by its removal (rmdir of its directory).
    in_savestate = False
    # The properties (extended attributes) this entry has, by name.
    properties: Mapping[str, Property] | None = None

    def __init__(self, scope: Scope, inode: int) -> None:
        self.scope = scope
        self.inode = inode

    def attrs(self) -> Attrs:
        raise NotImplementedError

    def parent(self) -> int:
        raise NotImplementedError

    def children(self) -> list[tuple[int, str]]:
        """(inode, name) of what a listing shows; any order (the adapter sorts)."""
        raise QuietError(errno.ENOTDIR)

    def child(self, name: str) -> int:
        """The inode of ``name`` here; ENOENT when there is none."""
        raise QuietError(errno.ENOTDIR)

    def target(self) -> str:
        """What a symlink reads: a relative path that stays inside the mount."""
        raise VmtreeError(errno.EINVAL, "not a symbolic link")

    async def property_values(self, wanted: str) -> dict[str, str] | None:
        """The properties' values; ``wanted`` is the one asked for, so that a costly one
        is measured only when it is."""
        return None
