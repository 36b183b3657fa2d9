"""A VM's directory and everything of its own in it: the fixed files, the four
subdirectories, and the symlinks that tie it to other VMs."""

from __future__ import annotations

import errno

from vmtreefs.fs import inodes
from vmtreefs.fs.inodes import ROOT, VmEntry
from vmtreefs.fs.view.base import (
    Attrs,
    Entry,
    QuietError,
    Scope,
    directory,
    regular,
    seconds_to_ns,
    symlink,
)
from vmtreefs.fs.view.storage import volume_child, volume_entries
from vmtreefs.rules.objects import Vm
from vmtreefs.rules.properties import VM_PROPERTIES


class VmEntryBase(Entry):
    """Anything a VM owns, shown with the VM's creation time."""

    def __init__(self, scope: Scope, inode: int, vm: Vm) -> None:
        super().__init__(scope, inode)
        self.vm = vm

    @property
    def time_ns(self) -> int:
        return seconds_to_ns(self.vm.created)

    def parent(self) -> int:
        return inodes.vm_inode(self.vm.id)


class VmDir(VmEntryBase):
    properties = VM_PROPERTIES

    def attrs(self) -> Attrs:
        return directory(self.time_ns, nlink=2 + len(inodes.VM_SUBDIRS))

    def parent(self) -> int:
        return ROOT

    def children(self) -> list[tuple[int, str]]:
        vm = self.vm
        entries = [
            (inodes.vm_inode(vm.id, entry), name) for name, entry in inodes.VM_DIR_ENTRIES.items()
        ]
        if self.scope.origin(vm) is not None:
            entries.append((inodes.vm_inode(vm.id, VmEntry.ORIGIN), "origin"))
        if vm.template is not None:
            entries.append((inodes.vm_inode(vm.id, VmEntry.TEMPLATE), "template"))
        return entries

    def child(self, name: str) -> int:
        vm = self.vm
        entry = inodes.VM_DIR_ENTRIES.get(name)
        if entry is not None:
            return inodes.vm_inode(vm.id, entry)
        if name == "origin" and self.scope.origin(vm) is not None:
            return inodes.vm_inode(vm.id, VmEntry.ORIGIN)
        if name == "template" and vm.template is not None:
            return inodes.vm_inode(vm.id, VmEntry.TEMPLATE)
        raise QuietError(errno.ENOENT)

    async def property_values(self, wanted: str) -> dict[str, str] | None:
        vm = self.vm
        values = {name: vm.props.get(name, p.default) for name, p in VM_PROPERTIES.items()}
        values["created"] = f"{vm.created:.6f}"
        values["id"] = str(vm.id)
        if wanted == "usage":  # the engine asks about every extent: only when wanted
            values["usage"] = str(await self.scope.tree.vm_usage(vm.id))
        return values


class VmSubdir(VmEntryBase):
    """clones/, volumes/, savestates/, versions/: always there, never removed."""

    fixed = True

    def attrs(self) -> Attrs:
        return directory(self.time_ns)

    def children(self) -> list[tuple[int, str]]:
        return []

    def child(self, name: str) -> int:
        raise QuietError(errno.ENOENT)


class ClonesDir(VmSubdir):
    def children(self) -> list[tuple[int, str]]:
        clones = self.scope.ns.clones_of(self.vm)
        return [(inodes.vm_inode(c.id, VmEntry.CLONE_LINK), c.name) for c in clones]

    def child(self, name: str) -> int:
        clone = self.scope.ns.by_name.get(name)
        if clone is not None and clone.origin_id == self.vm.id:
            return inodes.vm_inode(clone.id, VmEntry.CLONE_LINK)
        raise QuietError(errno.ENOENT)


class VolumesDir(VmSubdir):
    def children(self) -> list[tuple[int, str]]:
        return volume_entries(self.vm.volumes.values())

    def child(self, name: str) -> int:
        return volume_child(self.vm.volumes.values(), name)


class SavestatesDir(VmSubdir):
    made_by = "savestates are made by `save LABEL` written to ctl"

    def children(self) -> list[tuple[int, str]]:
        savestates = self.vm.savestates.values()
        return [(inodes.savestate_inode(ss.id), ss.label) for ss in savestates]

    def child(self, name: str) -> int:
        savestate = self.vm.savestates.get(name)
        if savestate is None:
            raise QuietError(errno.ENOENT)
        return inodes.savestate_inode(savestate.id)


class VersionsDir(VmSubdir):
    made_by = "versions are made by commits (`commit` written to ctl)"

    def children(self) -> list[tuple[int, str]]:
        versions = self.scope.ns.versions_of(self.vm)
        return [(inodes.vm_inode(v.id, VmEntry.VERSION_LINK), f"v{v.version}") for v in versions]

    def child(self, name: str) -> int:
        for version in self.scope.ns.versions_of(self.vm):
            if name == f"v{version.version}":
                return inodes.vm_inode(version.id, VmEntry.VERSION_LINK)
        raise QuietError(errno.ENOENT)


class ClonePlaceholder(VmEntryBase):
    """Only the reply to a clone mkdir: the next lookup finds the symlink instead."""

    def attrs(self) -> Attrs:
        attr = directory(self.time_ns)
        attr.entry_timeout = attr.attr_timeout = 0
        return attr

    def parent(self) -> int:
        return clones_dir_of(self.scope, self.vm)

    def children(self) -> list[tuple[int, str]]:
        return []

    def child(self, name: str) -> int:
        raise QuietError(errno.ENOENT)


def clones_dir_of(scope: Scope, vm: Vm) -> int:
    origin = scope.origin(vm)
    if origin is None:
        raise QuietError(errno.ENOENT)
    return inodes.vm_inode(origin.id, VmEntry.CLONES)


class VmLink(VmEntryBase):
    def attrs(self) -> Attrs:
        return symlink(self.target(), self.time_ns)


class OriginLink(VmLink):
    """``VM/origin -> ../SRC``, while SRC is visible."""

    def __init__(self, scope: Scope, inode: int, vm: Vm) -> None:
        super().__init__(scope, inode, vm)
        origin = scope.origin(vm)
        if origin is None:
            raise QuietError(errno.ENOENT)
        self.origin = origin

    def target(self) -> str:
        return f"../{self.origin.name}"


class CloneLink(VmLink):
    """``SRC/clones/NAME -> ../../NAME``, owned by the clone NAME."""

    def __init__(self, scope: Scope, inode: int, vm: Vm) -> None:
        super().__init__(scope, inode, vm)
        self.clones_dir = clones_dir_of(scope, vm)

    def parent(self) -> int:
        return self.clones_dir

    def target(self) -> str:
        return f"../../{self.vm.name}"


class TemplateLink(VmLink):
    """``VM/template -> ../TEMPLATE``, for a template-based VM."""

    def __init__(self, scope: Scope, inode: int, vm: Vm) -> None:
        super().__init__(scope, inode, vm)
        if vm.template is None:
            raise QuietError(errno.ENOENT)
        self.link = vm.template

    def target(self) -> str:
        return f"../{self.scope.ns.template_name(self.link)}"


class VersionLink(VmLink):
    """``HEAD-next/versions/vN -> ../../NAME-vN``, owned by the version."""

    def __init__(self, scope: Scope, inode: int, vm: Vm) -> None:
        super().__init__(scope, inode, vm)
        head = scope.head(vm)
        if head is None:
            raise QuietError(errno.ENOENT)
        self.head = head

    def parent(self) -> int:
        return inodes.vm_inode(self.head.id, VmEntry.VERSIONS)

    def target(self) -> str:
        return f"../../{self.vm.name}"


class CtlFile(VmEntryBase):
    def attrs(self) -> Attrs:
        return regular(0o600, self.time_ns)


class StateFile(VmEntryBase):
    def text(self) -> bytes:
        return f"{self.vm.state}\n".encode()

    def attrs(self) -> Attrs:
        return regular(0o444, self.time_ns, len(self.text()))


class DomainFile(VmEntryBase):
    """domain.xml: the stored base description, or the default one."""

    def attrs(self) -> Attrs:
        return regular(0o400 if self.vm.immutable else 0o600, self.time_ns, len(self.text_now()))

    def text_now(self) -> bytes:
        """For st_size: the stored base, or the default as far as it is known yet."""
        if self.vm.domain_xml is not None:
            return self.vm.domain_xml.encode()
        lifecycle = self.scope.lifecycle
        return lifecycle.default_domain_xml_now().encode() if lifecycle else b""

    async def text(self) -> bytes:
        lifecycle = self.scope.lifecycle
        if lifecycle is None:
            return (self.vm.domain_xml or "").encode()
        return (await lifecycle.base_domain_xml(self.vm)).encode()


class ConsoleFile(VmEntryBase):
    """The serial console of the current or last run, read where the guest writes it."""

    def attrs(self) -> Attrs:
        attr = regular(0o400, self.time_ns)
        lifecycle = self.scope.lifecycle
        if lifecycle is not None:
            vm = self.vm
            attr.size_from = lambda: lifecycle.console_size(vm)
        return attr
