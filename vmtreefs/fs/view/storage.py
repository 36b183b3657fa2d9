"""Volumes, savestates and change maps: the entries that stand for stored data."""

from __future__ import annotations

import errno
import time
from collections.abc import Iterable
from pathlib import Path

from vmtreefs.errors import VmtreeError
from vmtreefs.fs import inodes
from vmtreefs.fs.inodes import SavestateEntry, VmEntry
from vmtreefs.fs.view.base import (
    Attrs,
    Entry,
    QuietError,
    Scope,
    directory,
    regular,
    seconds_to_ns,
)
from vmtreefs.rules import lineage
from vmtreefs.rules.objects import Savestate, Vm, Volume
from vmtreefs.rules.properties import POLICY, VOLUME_PROPERTIES

CHANGES_SUFFIX = ".changes"


def volume_entries(volumes: Iterable[Volume]) -> list[tuple[int, str]]:
    """Each volume's file and its ``VOL.changes/`` directory."""
    entries = []
    for v in volumes:
        entries.append((inodes.volume_inode(v.id), v.filename))
        entries.append((inodes.changes_dir_inode(v.id), v.name + CHANGES_SUFFIX))
    return entries


def volume_child(volumes: Iterable[Volume], name: str) -> int:
    """A volume's file or its ``VOL.changes/``, by name; ENOENT when there is neither."""
    for volume in volumes:
        if name == volume.filename:
            return inodes.volume_inode(volume.id)
        if name == volume.name + CHANGES_SUFFIX:
            return inodes.changes_dir_inode(volume.id)
    raise QuietError(errno.ENOENT)


def volumes_dir_of(scope: Scope, volume_id: int) -> int:
    """The volumes/ a volume is listed in: its VM's, or its savestate's."""
    saved = scope.saved_volume(volume_id)
    if saved is not None:
        return inodes.savestate_inode(saved[1].id, SavestateEntry.VOLUMES)
    vm, _ = scope.volume(volume_id)
    return inodes.vm_inode(vm.id, VmEntry.VOLUMES)


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class VolumeFile(Entry):
    """A VM's own volume: its data, read and written through the engine."""

    properties = VOLUME_PROPERTIES

    def __init__(self, scope: Scope, inode: int, vm: Vm, volume: Volume) -> None:
        super().__init__(scope, inode)
        self.vm = vm
        self.volume = volume

    def attrs(self) -> Attrs:
        volume = self.volume
        time_ns = self.scope.volume_mtimes.get(volume.id, seconds_to_ns(volume.created))
        # Allocation is the engine's business (and shared between snapshots); a zero
        # st_blocks tells cp and rsync the file may be sparse, which it usually is.
        return regular(0o400 if self.vm.immutable else 0o600, time_ns, volume.size)

    def parent(self) -> int:
        return inodes.vm_inode(self.vm.id, VmEntry.VOLUMES)

    async def property_values(self, wanted: str) -> dict[str, str] | None:
        return {POLICY: self.volume.policy}


class SavedVolumeFile(Entry):
    """A savestate's volume: read-only, the disk as it was when the RAM was saved."""

    properties = VOLUME_PROPERTIES
    in_savestate = True

    def __init__(self, scope: Scope, inode: int, savestate: Savestate, volume: Volume) -> None:
        super().__init__(scope, inode)
        self.savestate = savestate
        self.volume = volume

    def attrs(self) -> Attrs:
        return regular(0o400, seconds_to_ns(self.volume.created), self.volume.size)

    def parent(self) -> int:
        return inodes.savestate_inode(self.savestate.id, SavestateEntry.VOLUMES)

    async def property_values(self, wanted: str) -> dict[str, str] | None:
        # Its policy was its VM's, which a savestate does not keep.
        raise QuietError(errno.ENOENT)


class ChangesDir(Entry):
    """``volumes/VOL.changes/``: its entries are looked up by name, never listed (any
    related VM can be named: listing them all would not scale)."""

    fixed = True

    def __init__(self, scope: Scope, inode: int, volume_id: int) -> None:
        super().__init__(scope, inode)
        self.vm, self.volume = scope.any_volume(volume_id)

    def attrs(self) -> Attrs:
        return directory(seconds_to_ns(self.volume.created))

    def parent(self) -> int:
        return volumes_dir_of(self.scope, self.volume.id)

    def children(self) -> list[tuple[int, str]]:
        return []

    def child(self, name: str) -> int:
        vm, volume = self.vm, self.volume
        try:
            other = lineage.comparable_volume(self.scope.ns, vm, volume, name)
        except VmtreeError as e:
            # A lookup's ENOENT is not logged as a rule; this one says why.
            self.scope.tree.journal.refused(
                f"change map of {vm.name}/{volume.filename} against {name}", e
            )
            raise QuietError(e.errno) from None
        return self.scope.change_map_inode(volume.id, other.id)


class ChangeMap(Entry):
    """``VOL.changes/OTHER``, by the number the mount handed out for the pair."""

    def __init__(self, scope: Scope, inode: int, serial: int) -> None:
        super().__init__(scope, inode)
        self.volume_id, self.other_id = scope.change_map(serial)

    def attrs(self) -> Attrs:
        # Made at open from the engine's metadata: its size is known only then.
        attr = regular(0o444, self.scope.mount_time_ns)
        attr.entry_timeout = attr.attr_timeout = 0
        return attr

    def parent(self) -> int:
        return inodes.changes_dir_inode(self.volume_id)


class SavestateEntryBase(Entry):
    in_savestate = True

    def __init__(self, scope: Scope, inode: int, savestate_id: int) -> None:
        super().__init__(scope, inode)
        self.vm, self.savestate = scope.savestate(savestate_id)

    @property
    def time_ns(self) -> int:
        return seconds_to_ns(self.savestate.created)

    def parent(self) -> int:
        return inodes.savestate_inode(self.savestate.id)


class SavestateDir(SavestateEntryBase):
    def attrs(self) -> Attrs:
        return directory(self.time_ns, nlink=3)

    def parent(self) -> int:
        return inodes.vm_inode(self.vm.id, VmEntry.SAVESTATES)

    def children(self) -> list[tuple[int, str]]:
        return [
            (inodes.savestate_inode(self.savestate.id, entry), name)
            for name, entry in inodes.SAVESTATE_DIR_ENTRIES.items()
        ]

    def child(self, name: str) -> int:
        entry = inodes.SAVESTATE_DIR_ENTRIES.get(name)
        if entry is None:
            raise QuietError(errno.ENOENT)
        return inodes.savestate_inode(self.savestate.id, entry)


class SavestateVolumesDir(SavestateEntryBase):
    def attrs(self) -> Attrs:
        return directory(self.time_ns)

    def children(self) -> list[tuple[int, str]]:
        return volume_entries(self.savestate.volumes.values())

    def child(self, name: str) -> int:
        return volume_child(self.savestate.volumes.values(), name)


class MemoryFile(SavestateEntryBase):
    """The saved RAM image, a file of SOURCE shown read-only."""

    @property
    def path(self) -> Path:
        return self.scope.tree.savestates.image_path(self.savestate)

    def attrs(self) -> Attrs:
        attr = regular(0o400, self.time_ns)
        path = self.path
        attr.size_from = lambda: file_size(path)
        return attr


class InfoFile(SavestateEntryBase):
    def text(self) -> bytes:
        vm, savestate = self.vm, self.savestate
        created = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(savestate.created))
        lines = [
            f"label: {savestate.label}",
            f"vm: {vm.name}",
            f"created: {created}",
            *(f"{key}: {value}" for key, value in sorted(savestate.info.items()) if key != "vm"),
            *(
                f"volume: {v.filename} {v.size}"
                for v in sorted(savestate.volumes.values(), key=lambda v: v.name)
            ),
        ]
        return "".join(line + "\n" for line in lines).encode()

    def attrs(self) -> Attrs:
        return regular(0o444, self.time_ns, len(self.text()))
