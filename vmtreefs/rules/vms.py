"""Rules for VMs: making, cloning, renaming and deleting them, and what keeps one; no I/O."""

from __future__ import annotations

import errno

from vmtreefs.rules.names import (
    HIDDEN_PREFIX,
    HOT_LABEL,
    HOT_RUNNER_PREFIX,
    ModelError,
    check_vm_name,
    is_instance_name,
)
from vmtreefs.rules.namespace import Namespace
from vmtreefs.rules.objects import DEFAULT_VOLUMES, Vm, VolumeSpec
from vmtreefs.rules.plans import CloneVm, CreateVm, DeleteVm, HideVm, RenameVm, SetProperty
from vmtreefs.rules.properties import inherited
from vmtreefs.rules.states import HALTED


def check_writable(vm: Vm, action: str) -> None:
    """What changing a VM's disks or how it is made needs: mutable, and halted."""
    if vm.immutable:
        raise ModelError(errno.EROFS, f"cannot {action}: VM {vm.name!r} is immutable")
    if vm.state != HALTED:
        raise ModelError(errno.EBUSY, f"cannot {action}: VM {vm.name!r} is {vm.state}")


def check_domain_writable(vm: Vm) -> None:
    """A VM's description changes only while it is halted and not immutable (the same
    rule as :func:`check_writable`, in the words domain.xml's users have always seen)."""
    if vm.immutable:
        raise ModelError(errno.EROFS, f"cannot change domain.xml of {vm.name!r}: immutable")
    if vm.state != HALTED:
        raise ModelError(errno.EBUSY, f"cannot change domain.xml of {vm.name!r}: it is {vm.state}")


def plan_create_vm(ns: Namespace, raw_name: str | bytes) -> CreateVm:
    """Check the name and reserve it until :meth:`add_vm` or :meth:`release`."""
    name = check_vm_name(raw_name)
    ns.check_free(name)
    ns.reserve(name)
    return CreateVm(name, DEFAULT_VOLUMES)


def plan_delete_vm(ns: Namespace, name: str) -> DeleteVm:
    vm = ns.get(name)
    if vm.state != HALTED:
        raise ModelError(errno.EBUSY, f"cannot delete VM {name!r}: it is {vm.state}")
    check_deletable(ns, vm)
    return DeleteVm(
        vm.id,
        vm.name,
        tuple(v.id for v in vm.volumes.values())
        + tuple(v.id for ss in vm.savestates.values() for v in ss.volumes.values()),
        new_origin=vm.origin_id,
        reparent=tuple(c.id for c in ns.clones_of(vm)),
        aliases=ns.aliases_standing_for(vm_id=vm.id),
        images=tuple(ss.image for ss in vm.savestates.values()),
    )


def plan_hide(ns: Namespace, name: str) -> HideVm:
    vm = ns.get(name)
    check_deletable(ns, vm)
    return HideVm(
        vm.id,
        vm.name,
        hidden_name=f"{HIDDEN_PREFIX}{vm.id}-{vm.name}",
        new_origin=vm.origin_id,
        # Its running instances stay its clones: they are what keeps it.
        reparent=tuple(c.id for c in ns.clones_of(vm) if not is_instance(c)),
        aliases=ns.aliases_standing_for(vm_id=vm.id),
    )


def plan_instance(ns: Namespace, source_name: str, kind: str, number: int) -> CloneVm:
    """``NAME-instN`` or ``NAME-dispN`` (volatile): a linked clone made by the system."""
    source = ns.get(source_name)
    if kind not in ("inst", "disp", "hot"):
        raise ModelError(errno.EINVAL, f"no instance kind {kind!r}")
    # The runner of a hot savestate is hidden: a name no user can make or see.
    stem, _ = ns.instance_stem(source)
    name = f"{HOT_RUNNER_PREFIX}{source.id}-{number}" if kind == "hot" else f"{stem}-{kind}{number}"
    ns.check_free(name)
    ns.reserve(name)
    props = inherited(source.props)
    props.pop("hot_savestate", None)
    if kind in ("disp", "hot"):
        props["volatile"] = "1"
    hot = source.savestates.get(HOT_LABEL) if kind != "hot" else None
    # From a hot savestate, the instance's disks are the savestate's: they match its memory.
    origin_volumes = hot.volumes.values() if hot is not None else source.volumes.values()
    policies = {vol.name: vol.policy for vol in source.volumes.values()}
    volumes = tuple(
        (vol.id, VolumeSpec(vol.name, vol.size, policies.get(vol.name, vol.policy)))
        for vol in sorted(origin_volumes, key=lambda v: v.name)
    )
    return CloneVm(source.id, name, volumes, props, ())


def plan_clone(
    ns: Namespace, source_name: str, raw_new: str | bytes, replace: bool = False
) -> CloneVm:
    """A linked clone of every volume; reserves the new name."""
    source = ns.get(source_name)
    name = check_vm_name(raw_new)
    ns.check_free(name)
    ns.reserve(name)
    volumes = tuple(
        (vol.id, VolumeSpec(vol.name, vol.size, vol.policy))
        for vol in sorted(source.volumes.values(), key=lambda v: v.id)
    )
    props = inherited(source.props)
    reparent = tuple(c.id for c in ns.clones_of(source)) if replace else ()
    return CloneVm(source.id, name, volumes, props, reparent)


def plan_rename_vm(ns: Namespace, old: str, raw_new: str | bytes) -> RenameVm:
    vm = ns.get(old)
    new = check_vm_name(raw_new)
    if new == old:
        return RenameVm(vm.id, old, new)
    if vm.versioned or vm.version_of is not None:
        raise ModelError(
            errno.EPERM,
            f"{old!r} belongs to a versioned VM, whose names the system keeps "
            "(clear user.vmtree.versioned to rename it)",
        )
    ns.check_free(new)
    ns.reserve(new)
    return RenameVm(vm.id, old, new)


def is_instance(vm: Vm) -> bool:
    """Made by the system to run another VM: NAME-instN, NAME-dispN, a hot runner."""
    return is_instance_name(vm.name)


def needs_of(ns: Namespace, vm: Vm) -> list[str]:
    """What keeps a VM from being destroyed now (it becomes volatile instead)."""
    reasons = [f"it is {vm.state}"] if vm.state != HALTED else []
    for other in ns.by_id.values():
        if other.state != HALTED and other.origin_id == vm.id and is_instance(other):
            reasons.append(f"its instance {other.name} is {other.state}")
        if other.state != HALTED and other.template_used == vm.id and other.id != vm.id:
            reasons.append(f"{other.name} runs from it as its template")
        for ss in other.savestates.values():
            if ss.info.get("template_version") == vm.id:
                reasons.append(f"savestate {other.name}/{ss.label} records it")
    return reasons


def collectable(ns: Namespace) -> list[Vm]:
    """VMs removed while still needed that nothing needs any more."""
    return [
        vm
        for vm in ns.by_id.values()
        if vm.name.startswith(HIDDEN_PREFIX) and vm.volatile and not needs_of(ns, vm)
    ]


def check_deletable(ns: Namespace, vm: Vm) -> None:
    """What rmdir refuses: a versioned head, the newest version, a template in use."""
    if vm.versioned:
        raise ModelError(
            errno.EBUSY,
            f"{vm.name!r} is the head of versioned VM {ns.base_name(vm)!r}: "
            "clear user.vmtree.versioned first",
        )
    head = ns.head_of(vm)
    if head is not None and ns.newest_version(head) is vm:
        raise ModelError(
            errno.EBUSY,
            f"{vm.name!r} is the newest version of {ns.base_name(head)!r} "
            "(the alias names it): commit a newer one first",
        )
    users = ns.template_users(vm_id=vm.id)
    for alias_id in ns.aliases_standing_for(vm_id=vm.id):
        users += ns.template_users(alias_id=alias_id)
    if users:
        raise ModelError(
            errno.EBUSY,
            f"VM {vm.name!r} is the template of {', '.join(sorted({u.name for u in users}))}",
        )


def plan_set_property(ns: Namespace, vm_name: str, name: str, value: str | None) -> SetProperty:
    vm = ns.get(vm_name)
    if vm.version_of is not None and name in ("immutable", "versioned"):
        raise ModelError(errno.EROFS, f"{vm_name!r} is a version: versions stay immutable")
    # How the VM is run may change; what it is may not.
    if vm.immutable and name not in ("immutable", "hot_savestate", "ready"):
        raise ModelError(errno.EROFS, f"cannot change {name} of VM {vm_name!r}: it is immutable")
    if name == "immutable" and value == "1" and vm.versioned:
        raise ModelError(
            errno.EINVAL,
            f"{vm_name!r} is the head of a versioned VM: it stays writable "
            "(its versions are immutable)",
        )
    if name == "immutable" and value == "1" and vm.state != HALTED:
        raise ModelError(errno.EBUSY, f"cannot make VM {vm_name!r} immutable: it is {vm.state}")
    if name == "immutable" and value != "1" and vm.immutable:
        running = [c.name for c in ns.by_id.values() if c.origin_id == vm.id and c.state != HALTED]
        if running or vm.savestates:
            raise ModelError(
                errno.EBUSY,
                f"cannot make VM {vm_name!r} writable: "
                + (f"instances {', '.join(sorted(running))} run from it" if running else "")
                + (" and " if running and vm.savestates else "")
                + (f"{len(vm.savestates)} savestates record it" if vm.savestates else ""),
            )
    return SetProperty(vm.id, name, value)
