"""The tree as a filesystem: an inode number in, the entry that answers for it out.

One class per kind of entry (``top``, ``vms``, ``storage``); :class:`View` is the
only place that knows which class a number decodes to. See ``base`` for why.
"""

from __future__ import annotations

import errno
from collections.abc import Container

from vmtreefs.fs import inodes
from vmtreefs.fs.inodes import CONTROL_DIR, ROOT, SavestateEntry, VmEntry
from vmtreefs.fs.view.base import Attrs, Entry, QuietError, Scope
from vmtreefs.fs.view.storage import (
    ChangeMap,
    ChangesDir,
    InfoFile,
    MemoryFile,
    SavedVolumeFile,
    SavestateDir,
    SavestateVolumesDir,
    VolumeFile,
)
from vmtreefs.fs.view.top import AliasLink, ControlDir, ControlFile, RootDir
from vmtreefs.fs.view.vms import (
    CloneLink,
    ClonePlaceholder,
    ClonesDir,
    ConsoleFile,
    CtlFile,
    DomainFile,
    OriginLink,
    SavestatesDir,
    StateFile,
    TemplateLink,
    VersionLink,
    VersionsDir,
    VmDir,
    VmEntryBase,
    VolumesDir,
)

__all__ = [
    "AliasLink",
    "Attrs",
    "ChangeMap",
    "ChangesDir",
    "CloneLink",
    "ClonePlaceholder",
    "ClonesDir",
    "ConsoleFile",
    "ControlDir",
    "ControlFile",
    "CtlFile",
    "DomainFile",
    "Entry",
    "InfoFile",
    "MemoryFile",
    "OriginLink",
    "QuietError",
    "RootDir",
    "SavedVolumeFile",
    "SavestateDir",
    "SavestateVolumesDir",
    "SavestatesDir",
    "StateFile",
    "TemplateLink",
    "VersionLink",
    "VersionsDir",
    "View",
    "VmDir",
    "VolumeFile",
    "VolumesDir",
]

VM_ENTRY_KINDS: dict[VmEntry, type[VmEntryBase]] = {
    VmEntry.DIR: VmDir,
    VmEntry.CTL: CtlFile,
    VmEntry.STATE: StateFile,
    VmEntry.CLONES: ClonesDir,
    VmEntry.VOLUMES: VolumesDir,
    VmEntry.SAVESTATES: SavestatesDir,
    VmEntry.VERSIONS: VersionsDir,
    VmEntry.ORIGIN: OriginLink,
    VmEntry.CLONE_LINK: CloneLink,
    VmEntry.CLONE_PLACEHOLDER: ClonePlaceholder,
    VmEntry.DOMAIN: DomainFile,
    VmEntry.CONSOLE: ConsoleFile,
    VmEntry.TEMPLATE: TemplateLink,
    VmEntry.VERSION_LINK: VersionLink,
}
SAVESTATE_ENTRY_KINDS = {
    SavestateEntry.DIR: SavestateDir,
    SavestateEntry.VOLUMES: SavestateVolumesDir,
    SavestateEntry.MEMORY: MemoryFile,
    SavestateEntry.INFO: InfoFile,
}


class View(Scope):
    def entry(self, inode: int) -> Entry:
        """The entry ``inode`` names now; ENOENT once what it stood for is gone."""
        node = inodes.decode(inode)
        if isinstance(node, inodes.Control):
            if inode == ROOT:
                return RootDir(self, inode)
            if inode == CONTROL_DIR:
                return ControlDir(self, inode)
            return ControlFile(self, inode)
        if isinstance(node, inodes.VmNode):
            return VM_ENTRY_KINDS[node.entry](self, inode, self.vm(node.vm_id))
        if isinstance(node, inodes.VolumeNode):
            saved = self.saved_volume(node.volume_id)
            if saved is not None:
                return SavedVolumeFile(self, inode, saved[1], saved[2])
            return VolumeFile(self, inode, *self.volume(node.volume_id))
        if isinstance(node, inodes.ChangesDirNode):
            return ChangesDir(self, inode, node.volume_id)
        if isinstance(node, inodes.ChangeMapNode):
            return ChangeMap(self, inode, node.serial)
        if isinstance(node, inodes.SavestateNode):
            return SAVESTATE_ENTRY_KINDS[node.entry](self, inode, node.savestate_id)
        if isinstance(node, inodes.AliasNode):
            return AliasLink(self, inode, node.alias_id)
        raise QuietError(errno.ENOENT)

    def child(self, parent: int, name: str) -> int:
        """The inode of ``name`` in ``parent``, ``.`` and ``..`` included."""
        if name == ".":
            self.entry(parent)
            return parent
        if name == "..":
            return self.entry(parent).parent()
        return self.entry(parent).child(name)

    def children(self, inode: int) -> list[tuple[int, str]]:
        """Sorted by inode, so that readdir offsets stay stable."""
        return sorted(self.entry(inode).children())

    # Aliases the kernel still holds

    def held_links(self, held: Container[int]) -> dict[int, str]:
        """Targets of the aliases the kernel holds, to keep them readable once removed."""
        ns = self.ns
        known = {}
        for alias in ns.aliases_by_id.values():
            inode = inodes.alias_inode(alias.id)
            if inode in held:
                known[inode] = ns.alias_target_name(alias)
        return known

    def keep_departed(self, before: dict[int, str], held: Container[int]) -> None:
        for inode, target in before.items():
            node = inodes.decode(inode)
            assert isinstance(node, inodes.AliasNode)
            if node.alias_id not in self.ns.aliases_by_id and inode in held:
                self.departed_links[inode] = target

    def forget(self, inode: int) -> None:
        """The kernel dropped its last reference to ``inode``."""
        self.departed_links.pop(inode, None)
