"""Which VMs share data: the forest of clones, versions and templates. Pure, no I/O.

A VM descends from its origin (a linked clone), its head (a version NAME-vN of
NAME-next) and its template (whose root it is re-snapshotted from). Two VMs are
related when they descend from a common VM, or one from the other; only then may
one's volumes be compared with the other's (``VOL.changes/OTHER``). A VM whose origin was removed
is re-parented to the removed VM's origin, so a chain stays connected; a VM whose
whole ancestry was removed starts a new tree of its own.
"""

from __future__ import annotations

import contextlib
import errno

from vmtreefs.rules.names import ModelError
from vmtreefs.rules.namespace import Namespace
from vmtreefs.rules.objects import Savestate, Vm, Volume

SAVESTATE_SEPARATOR = "@"
"""``VM@LABEL`` names a savestate of VM: ``@`` is never part of a VM name."""


def parents(ns: Namespace, vm: Vm) -> list[Vm]:
    """The VMs ``vm`` was made from (its origin, its head, its template)."""
    ids = [vm.origin_id, vm.version_of, vm.template_used]
    found = [ns.by_id[i] for i in ids if i is not None and i in ns.by_id]
    if vm.template is not None:
        with contextlib.suppress(ModelError):  # a dangling template link: fsck reports it
            found.append(ns.resolve_template(vm) or vm)
    return [p for p in found if p.id != vm.id]


def ancestry(ns: Namespace, vm: Vm) -> set[int]:
    """The ids of ``vm`` and of every VM it descends from.

    A head and its versions name each other (a version's head, the head's origin
    in its newest version), so this is a walk with a visited set, not a climb to a root.
    """
    seen: set[int] = set()
    stack = [vm]
    while stack:
        current = stack.pop()
        if current.id not in seen:
            seen.add(current.id)
            stack.extend(parents(ns, current))
    return seen


def related(ns: Namespace, a: Vm, b: Vm) -> bool:
    """Whether ``a`` and ``b`` descend from a common VM (one may be the other's ancestor)."""
    return bool(ancestry(ns, a) & ancestry(ns, b))


def volume_named(
    ns: Namespace, other: str, volume_name: str
) -> tuple[Vm, Savestate | None, Volume]:
    """The volume ``volume_name`` of ``other``: a VM or alias name, or ``VM@LABEL``."""
    vm_name, at, label = other.partition(SAVESTATE_SEPARATOR)
    if at and not label:
        raise ModelError(errno.ENOENT, f"{other!r} names no savestate (VM@LABEL)")
    vm = ns.resolve(vm_name)
    if vm.hidden:
        raise ModelError(errno.ENOENT, f"there is no VM named {vm_name!r}")
    savestate = ns.get_savestate(vm, label) if label else None
    volumes = savestate.volumes if savestate is not None else vm.volumes
    volume = volumes.get(volume_name)
    if volume is None:
        raise ModelError(errno.ENOENT, f"{other!r} has no volume {volume_name!r}")
    return vm, savestate, volume


def comparable_volume(ns: Namespace, vm: Vm, volume: Volume, other: str) -> Volume:
    """The volume of ``other`` that ``volume`` (of ``vm``) can be compared with.

    ENOENT when ``other`` names nothing, lacks a volume of that name, or is not
    related to ``vm``: an unrelated volume shares no blocks, so a map would only
    say "everything", which a backup tool must not mistake for an increment.
    """
    other_vm, _, other_volume = volume_named(ns, other, volume.name)
    if not related(ns, vm, other_vm):
        raise ModelError(
            errno.ENOENT, f"{other!r} is not related to VM {vm.name!r}: no common ancestor"
        )
    return other_volume
