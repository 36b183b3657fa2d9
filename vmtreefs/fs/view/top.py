"""The top of the mount: the VMs and aliases, and ``.vmtree/`` with the tree's own files."""

from __future__ import annotations

import errno
import stat

from vmtreefs.fs import inodes
from vmtreefs.fs.inodes import CONTROL_CTL, CONTROL_DIR, CONTROL_DIR_NAME, CONTROL_FILES, ROOT
from vmtreefs.fs.view.base import Attrs, Entry, QuietError, Scope, directory, regular, seconds_to_ns


class RootDir(Entry):
    def attrs(self) -> Attrs:
        return directory(self.scope.mount_time_ns, nlink=3 + len(self.scope.ns))

    def parent(self) -> int:
        return ROOT

    def children(self) -> list[tuple[int, str]]:
        ns = self.scope.ns
        entries = [(CONTROL_DIR, CONTROL_DIR_NAME)]
        entries += [(inodes.vm_inode(vm.id), vm.name) for vm in ns.visible()]
        entries += [(inodes.alias_inode(a.id), a.name) for a in ns.aliases_by_id.values()]
        return entries

    def child(self, name: str) -> int:
        if name == CONTROL_DIR_NAME:
            return CONTROL_DIR
        ns = self.scope.ns
        vm = ns.by_name.get(name)
        if vm is not None and not vm.hidden:
            return inodes.vm_inode(vm.id)
        alias = ns.aliases.get(name)
        if alias is not None:
            return inodes.alias_inode(alias.id)
        raise QuietError(errno.ENOENT)


class ControlDir(Entry):
    fixed = True

    def attrs(self) -> Attrs:
        return directory(self.scope.mount_time_ns)

    def parent(self) -> int:
        return ROOT

    def children(self) -> list[tuple[int, str]]:
        return [(ino, name) for name, ino in CONTROL_FILES.items()]

    def child(self, name: str) -> int:
        if name in CONTROL_FILES:
            return CONTROL_FILES[name]
        raise QuietError(errno.ENOENT)


class ControlFile(Entry):
    """``.vmtree/ctl`` (commands for the whole tree), ``status``, ``events``, ``volatile``."""

    @property
    def is_ctl(self) -> bool:
        return self.inode == CONTROL_CTL

    def attrs(self) -> Attrs:
        return regular(0o600 if self.is_ctl else 0o444, self.scope.mount_time_ns)

    def parent(self) -> int:
        return CONTROL_DIR


class AliasLink(Entry):
    """``NAME -> TARGET`` at the top: an alias, or one just removed that the kernel holds."""

    def __init__(self, scope: Scope, inode: int, alias_id: int) -> None:
        super().__init__(scope, inode)
        self.alias_id = alias_id
        self.departed = scope.departed_links.get(inode)
        if self.departed is None:
            scope.alias(alias_id)  # ENOENT when it is gone

    def attrs(self) -> Attrs:
        time_ns = self.scope.mount_time_ns
        if self.departed is None:
            time_ns = seconds_to_ns(self.scope.alias(self.alias_id).created)
        attr = Attrs(stat.S_IFLNK, 0o777, time_ns, size=len(self.target()))
        # An alias can go, or name another VM, as a side effect of an operation on
        # something else (rmdir of its VM, a commit): the kernel must ask each time.
        attr.entry_timeout = 0
        return attr

    def parent(self) -> int:
        return ROOT

    def target(self) -> str:
        if self.departed is not None:
            return self.departed
        return self.scope.ns.alias_target_name(self.scope.alias(self.alias_id))
