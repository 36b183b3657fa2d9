"""Rules for a VM's volumes: making, deleting, renaming, growing and writing them; no I/O."""

from __future__ import annotations

import errno

from vmtreefs.rules.names import ModelError, check_volume_filename, check_volume_size
from vmtreefs.rules.namespace import Namespace
from vmtreefs.rules.objects import DEFAULT_VOLUMES, Vm, Volume, VolumeSpec
from vmtreefs.rules.plans import CreateVolume, DeleteVolume, RenameVolume, ResizeVolume
from vmtreefs.rules.properties import POLICY, VOLUME_PROPERTIES
from vmtreefs.rules.vms import check_writable


def plan_create_volume(ns: Namespace, vm_name: str, raw_filename: str | bytes) -> CreateVolume:
    vm = ns.get(vm_name)
    name = check_volume_filename(raw_filename)
    if name in vm.volumes:
        raise ModelError(errno.EEXIST, f"VM {vm_name!r} already has a volume {name!r}")
    check_writable(vm, f"create volume {name!r}")
    return CreateVolume(vm.id, VolumeSpec(name, 0, "persistent"))


def plan_delete_volume(ns: Namespace, vm_name: str, vol_name: str) -> DeleteVolume:
    vm = ns.get(vm_name)
    vol = ns.volume(vm, vol_name)
    check_writable(vm, f"delete volume {vol_name!r}")
    return DeleteVolume(vm.id, vol.id, vol.name)


def plan_rename_volume(
    ns: Namespace, vm_name: str, vol_name: str, raw_new_filename: str | bytes
) -> RenameVolume:
    vm = ns.get(vm_name)
    vol = ns.volume(vm, vol_name)
    new = check_volume_filename(raw_new_filename)
    if new != vol_name and new in vm.volumes:
        raise ModelError(errno.EEXIST, f"VM {vm_name!r} already has a volume {new!r}")
    check_writable(vm, f"rename volume {vol_name!r}")
    return RenameVolume(vm.id, vol.id, vol_name, new)


def plan_resize_volume(ns: Namespace, vm_name: str, vol_name: str, new_size: int) -> ResizeVolume:
    vm = ns.get(vm_name)
    vol = ns.volume(vm, vol_name)
    check_writable(vm, f"resize volume {vol_name!r}")
    if new_size < vol.size:
        raise ModelError(
            errno.EINVAL,
            f"cannot shrink volume {vm_name}/{vol_name} from {vol.size} to {new_size} bytes: "
            "volumes only grow",
        )
    check_volume_size(new_size)
    return ResizeVolume(vm.id, vol.id, vol.size, new_size)


def check_volume_write(ns: Namespace, vm_name: str, vol_name: str) -> Volume:
    """May this volume's data be changed now? Returns the volume."""
    vm = ns.get(vm_name)
    vol = ns.volume(vm, vol_name)
    check_writable(vm, f"write to volume {vol_name!r}")
    return vol


def check_policy_settable(vm: Vm, vol: Volume) -> None:
    """A volume's policy is how its VM is made: fixed once the VM is immutable."""
    if vm.immutable:
        raise ModelError(errno.EROFS, f"cannot change {vm.name}/{vol.filename}: VM is immutable")


def default_policy(volume_name: str) -> str:
    """The policy a volume of this name starts with (root: template, volatile: volatile)."""
    for spec in DEFAULT_VOLUMES:
        if spec.name == volume_name:
            return spec.policy
    return VOLUME_PROPERTIES[POLICY].default
