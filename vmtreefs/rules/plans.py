"""Plans: what an operation turns into, decided by the rules before any I/O.

The orchestrator asks a rule for a plan, carries it out with the store and the
engine, then hands it to :class:`~vmtreefs.rules.namespace.Namespace` to apply.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmtreefs.rules.objects import VolumeSpec


@dataclass(frozen=True)
class CreateVm:
    name: str
    volumes: tuple[VolumeSpec, ...]


@dataclass(frozen=True)
class DeleteVm:
    vm_id: int
    name: str
    volume_ids: tuple[int, ...]
    new_origin: int | None = None  # its clones move to its own origin
    reparent: tuple[int, ...] = ()
    aliases: tuple[int, ...] = ()  # aliases that stand for it, dependents first
    images: tuple[str, ...] = ()  # memory images of its savestates


@dataclass(frozen=True)
class RenameVm:
    vm_id: int
    old: str
    new: str


@dataclass(frozen=True)
class CreateVolume:
    vm_id: int
    spec: VolumeSpec


@dataclass(frozen=True)
class DeleteVolume:
    vm_id: int
    volume_id: int
    name: str


@dataclass(frozen=True)
class RenameVolume:
    vm_id: int
    volume_id: int
    old: str
    new: str


@dataclass(frozen=True)
class ResizeVolume:
    vm_id: int
    volume_id: int
    old_size: int
    new_size: int


@dataclass(frozen=True)
class HideVm:
    """rmdir of a VM that still runs: its name goes now, the VM when it stops."""

    vm_id: int
    name: str
    hidden_name: str
    new_origin: int | None
    reparent: tuple[int, ...]
    aliases: tuple[int, ...]


@dataclass(frozen=True)
class CloneVm:
    source_id: int
    name: str
    volumes: tuple[tuple[int, VolumeSpec], ...]  # (source volume id, the new volume)
    props: dict[str, str]
    reparent: tuple[int, ...]  # --replace: VMs whose origin moves from the source to the clone


@dataclass(frozen=True)
class MakeVersion:
    """The next NAME-vN of a versioned VM: a replacement linked clone of its head.

    The version's origin is the head's (the previous version); the head and
    the VMs cloned from the head then descend from the new version, and the
    system alias NAME moves to it.
    """

    head_id: int
    base: str  # NAME
    name: str  # NAME-vN
    number: int
    volumes: tuple[tuple[int, VolumeSpec], ...]
    props: dict[str, str]
    origin: int | None
    reparent: tuple[int, ...]
    head_name: str  # NAME-next (the head is renamed to it by the first version)
    alias_id: int | None  # the system alias to move; None: the first version makes it


@dataclass(frozen=True)
class Unversion:
    """Clearing ``versioned``: the head is NAME again; versions stay (history) or go."""

    head_id: int
    base: str
    alias_id: int | None
    retarget: tuple[int, ...]  # user aliases that named the system alias name the head now
    versions: tuple[int, ...]
    keep_history: bool


@dataclass(frozen=True)
class SetProperty:
    vm_id: int
    name: str
    value: str | None  # None: back to the default


@dataclass(frozen=True)
class CreateAlias:
    name: str
    target_vm: int | None
    target_alias: int | None


@dataclass(frozen=True)
class RemoveAlias:
    alias_id: int
    name: str


@dataclass(frozen=True)
class RenameAlias:
    alias_id: int
    old: str
    new: str


@dataclass(frozen=True)
class ReplaceAlias:
    """``mv NEW OLD`` over an existing alias (``ln -sfn``): NEW takes OLD's name and place."""

    keep_id: int
    drop_id: int
    name: str
    retarget: tuple[int, ...]  # aliases that named the dropped one now name the kept one
