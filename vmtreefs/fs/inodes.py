"""Inode numbers derived from store ids, so they are stable across remounts.

The store never reuses a VM or volume id, so an inode number names one object
for the life of the tree and the kernel never sees a number change meaning.
Decoding is pure arithmetic; the filesystem then asks the namespace whether the
object still exists.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

ROOT = 1
CONTROL_DIR = 2
CONTROL_STATUS = 3
CONTROL_EVENTS = 4
CONTROL_CTL = 5
CONTROL_VOLATILE = 6

CONTROL_DIR_NAME = ".vmtree"
CONTROL_FILES: dict[str, int] = {
    "ctl": CONTROL_CTL,
    "events": CONTROL_EVENTS,
    "status": CONTROL_STATUS,
    "volatile": CONTROL_VOLATILE,
}

_VM_BASE = 1 << 32
_VM_STRIDE = 16
_ALIAS_BASE = 1 << 48
_SAVESTATE_BASE = 1 << 50
_SAVESTATE_STRIDE = 4
_VOLUME_BASE = 1 << 52
_VOLUME_STRIDE = 4
_CHANGES_DIR = 1  # offset in a volume's stride: its VOL.changes/ directory
CHANGE_MAP_BASE = 1 << 62
"""Change maps (VOL.changes/OTHER) get numbers from here on, handed out per mount:
they name a pair of volumes, which does not fit one stable number."""


class VmEntry(enum.IntEnum):
    """The fixed entries of a VM's directory; the value is the inode offset."""

    DIR = 0
    CTL = 1
    STATE = 2
    CLONES = 3
    VOLUMES = 4
    SAVESTATES = 5
    VERSIONS = 6
    ORIGIN = 7  # symlink ../SRC
    CLONE_LINK = 8  # the symlink SRC/clones/NAME -> ../../NAME, owned by the clone NAME
    CLONE_PLACEHOLDER = 9  # the directory a clone mkdir replies with, never looked up again
    DOMAIN = 10  # domain.xml, the base libvirt description
    CONSOLE = 11  # the serial console of the current or last run
    TEMPLATE = 12  # symlink ../TEMPLATE, present for template-based VMs
    VERSION_LINK = 13  # HEAD-next/versions/vN -> ../../NAME-vN, owned by the version


VM_DIR_ENTRIES: dict[str, VmEntry] = {
    "ctl": VmEntry.CTL,
    "state": VmEntry.STATE,
    "domain.xml": VmEntry.DOMAIN,
    "console": VmEntry.CONSOLE,
    "clones": VmEntry.CLONES,
    "volumes": VmEntry.VOLUMES,
    "savestates": VmEntry.SAVESTATES,
    "versions": VmEntry.VERSIONS,
}
VM_SUBDIRS = frozenset({VmEntry.CLONES, VmEntry.VOLUMES, VmEntry.SAVESTATES, VmEntry.VERSIONS})


class SavestateEntry(enum.IntEnum):
    """A savestate's directory and what is in it; its volume files are volume inodes."""

    DIR = 0
    MEMORY = 1
    INFO = 2
    VOLUMES = 3


SAVESTATE_DIR_ENTRIES: dict[str, SavestateEntry] = {
    "memory": SavestateEntry.MEMORY,
    "info": SavestateEntry.INFO,
    "volumes": SavestateEntry.VOLUMES,
}


class VolumeEntry(enum.IntEnum):
    FILE = 0


@dataclass(frozen=True)
class Control:
    inode: int


@dataclass(frozen=True)
class VmNode:
    vm_id: int
    entry: VmEntry


@dataclass(frozen=True)
class VolumeNode:
    volume_id: int
    entry: VolumeEntry


@dataclass(frozen=True)
class ChangesDirNode:
    """``volumes/VOL.changes/``: its entries are looked up by name, never listed."""

    volume_id: int


@dataclass(frozen=True)
class ChangeMapNode:
    """``VOL.changes/OTHER``, by the number the mount handed out for the pair."""

    serial: int


@dataclass(frozen=True)
class AliasNode:
    alias_id: int


@dataclass(frozen=True)
class SavestateNode:
    savestate_id: int
    entry: SavestateEntry


Node = Control | VmNode | VolumeNode | ChangesDirNode | ChangeMapNode | AliasNode | SavestateNode


def vm_inode(vm_id: int, entry: VmEntry = VmEntry.DIR) -> int:
    return _VM_BASE + vm_id * _VM_STRIDE + entry


def volume_inode(volume_id: int, entry: VolumeEntry = VolumeEntry.FILE) -> int:
    return _VOLUME_BASE + volume_id * _VOLUME_STRIDE + entry


def changes_dir_inode(volume_id: int) -> int:
    return _VOLUME_BASE + volume_id * _VOLUME_STRIDE + _CHANGES_DIR


def change_map_inode(serial: int) -> int:
    return CHANGE_MAP_BASE + serial


def savestate_inode(savestate_id: int, entry: SavestateEntry = SavestateEntry.DIR) -> int:
    return _SAVESTATE_BASE + savestate_id * _SAVESTATE_STRIDE + entry


def alias_inode(alias_id: int) -> int:
    return _ALIAS_BASE + alias_id


def decode(inode: int) -> Node | None:
    """What an inode number names, or None for a number we never hand out."""
    if inode >= CHANGE_MAP_BASE:
        return ChangeMapNode(inode - CHANGE_MAP_BASE)
    if inode >= _VOLUME_BASE:
        volume_id, rest = divmod(inode - _VOLUME_BASE, _VOLUME_STRIDE)
        if rest == _CHANGES_DIR:
            return ChangesDirNode(volume_id)
        try:
            return VolumeNode(volume_id, VolumeEntry(rest))
        except ValueError:
            return None
    if inode >= _SAVESTATE_BASE:
        savestate_id, rest = divmod(inode - _SAVESTATE_BASE, _SAVESTATE_STRIDE)
        return SavestateNode(savestate_id, SavestateEntry(rest))
    if inode >= _ALIAS_BASE:
        return AliasNode(inode - _ALIAS_BASE)
    if inode >= _VM_BASE:
        vm_id, rest = divmod(inode - _VM_BASE, _VM_STRIDE)
        try:
            return VmNode(vm_id, VmEntry(rest))
        except ValueError:
            return None
    if ROOT <= inode <= CONTROL_VOLATILE:
        return Control(inode)
    return None
