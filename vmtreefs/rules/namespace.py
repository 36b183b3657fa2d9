"""The namespace: every VM and alias of a tree, held in memory; no I/O.

Rules (``vms``, ``volumes``, ``aliases``, ``versions``, ``properties``) read it
and return plans; only the methods under "Writing" below change it, each once
the store has what it records. Plans reserve the names they will create, so two
racing ``mkdir`` of one name cannot both succeed even while the first one is
still waiting on the engine.
"""

from __future__ import annotations

import errno

from vmtreefs.rules.names import MAX_ALIAS_CHAIN, ModelError
from vmtreefs.rules.objects import Alias, Savestate, TemplateLink, Vm, Volume
from vmtreefs.rules.plans import (
    HideVm,
    MakeVersion,
    RenameAlias,
    RenameVm,
    RenameVolume,
    ReplaceAlias,
    ResizeVolume,
    SetProperty,
    Unversion,
)
from vmtreefs.rules.states import VM_STATES


class Namespace:
    """Every VM the user can see, by name and by id, plus names reserved by operations in flight."""

    def __init__(self) -> None:
        self.by_name: dict[str, Vm] = {}
        self.by_id: dict[int, Vm] = {}
        self.reserved: set[str] = set()
        self._volume_owner: dict[int, int] = {}
        self._savestate_volume_owner: dict[int, tuple[int, str]] = {}
        self._savestate_owner: dict[int, tuple[int, str]] = {}
        self.aliases: dict[str, Alias] = {}
        self.aliases_by_id: dict[int, Alias] = {}

    # Looking things up

    def __len__(self) -> int:
        return len(self.by_id)

    def get(self, name: str) -> Vm:
        try:
            return self.by_name[name]
        except KeyError:
            raise ModelError(errno.ENOENT, f"there is no VM named {name!r}") from None

    def get_by_id(self, vm_id: int) -> Vm:
        try:
            return self.by_id[vm_id]
        except KeyError:
            raise ModelError(errno.ENOENT, f"there is no VM with id {vm_id}") from None

    def volume(self, vm: Vm, name: str) -> Volume:
        try:
            return vm.volumes[name]
        except KeyError:
            raise ModelError(errno.ENOENT, f"VM {vm.name!r} has no volume {name!r}") from None

    def volume_count(self) -> int:
        return len(self._volume_owner)

    def volume_by_id(self, volume_id: int) -> tuple[Vm, Volume]:
        """The owner and the volume; ENOENT once either is gone."""
        vm_id = self._volume_owner.get(volume_id)
        vm = self.by_id.get(vm_id) if vm_id is not None else None
        if vm is not None:
            for vol in vm.volumes.values():
                if vol.id == volume_id:
                    return vm, vol
        raise ModelError(errno.ENOENT, f"volume id {volume_id} is gone")

    def savestate_volume_by_id(self, volume_id: int) -> tuple[Vm, Savestate, Volume]:
        """A volume of a savestate (read-only); ENOENT once it is gone."""
        found = self._savestate_volume_owner.get(volume_id)
        if found is not None:
            vm = self.by_id.get(found[0])
            ss = vm.savestates.get(found[1]) if vm is not None else None
            for vol in ss.volumes.values() if ss is not None else ():
                if vol.id == volume_id and vm is not None and ss is not None:
                    return vm, ss, vol
        raise ModelError(errno.ENOENT, f"savestate volume id {volume_id} is gone")

    def any_volume_by_id(self, volume_id: int) -> tuple[Vm, Savestate | None, Volume]:
        """A VM's own volume (savestate None) or a savestate's; ENOENT once it is gone."""
        if volume_id in self._volume_owner:
            vm, volume = self.volume_by_id(volume_id)
            return vm, None, volume
        return self.savestate_volume_by_id(volume_id)

    def savestate_by_id(self, savestate_id: int) -> tuple[Vm, Savestate]:
        found = self._savestate_owner.get(savestate_id)
        vm = self.by_id.get(found[0]) if found is not None else None
        if vm is None or found is None or found[1] not in vm.savestates:
            raise ModelError(errno.ENOENT, f"savestate id {savestate_id} is gone")
        return vm, vm.savestates[found[1]]

    def get_savestate(self, vm: Vm, label: str) -> Savestate:
        try:
            return vm.savestates[label]
        except KeyError:
            raise ModelError(errno.ENOENT, f"VM {vm.name!r} has no savestate {label!r}") from None

    def visible(self) -> list[Vm]:
        """The VMs with a name at the top level (not the hidden volatile ones)."""
        return [vm for vm in self.by_id.values() if not vm.hidden]

    def clones_of(self, vm: Vm) -> list[Vm]:
        return sorted(
            (c for c in self.by_id.values() if c.origin_id == vm.id and not c.hidden),
            key=lambda c: c.id,
        )

    def check_free(self, name: str) -> None:
        """EEXIST while a VM, an alias or an operation in flight holds the name."""
        if name in self.by_name:
            raise ModelError(errno.EEXIST, f"a VM named {name!r} already exists")
        if name in self.aliases:
            raise ModelError(errno.EEXIST, f"an alias named {name!r} already exists")
        if name in self.reserved:
            raise ModelError(errno.EEXIST, f"a VM named {name!r} is being created")

    # Versions and templates

    def versions_of(self, head: Vm, hidden: bool = False) -> list[Vm]:
        """A versioned VM's versions, oldest first (with ``hidden``, also those waiting to go)."""
        return sorted(
            (
                v
                for v in self.by_id.values()
                if v.version_of == head.id and (hidden or not v.hidden)
            ),
            key=lambda v: v.version,
        )

    def system_alias_of(self, head: Vm) -> Alias | None:
        """The alias NAME that names the newest version of the head NAME-next."""
        versions = {v.id for v in self.versions_of(head, hidden=True)}
        for alias in self.aliases_by_id.values():
            if alias.system and alias.target_vm in versions:
                return alias
        return None

    def newest_version(self, head: Vm) -> Vm | None:
        alias = self.system_alias_of(head)
        return None if alias is None or alias.target_vm is None else self.by_id[alias.target_vm]

    def head_of(self, vm: Vm) -> Vm | None:
        return None if vm.version_of is None else self.by_id.get(vm.version_of)

    @staticmethod
    def base_name(head: Vm) -> str:
        return head.name.removesuffix("-next") if head.versioned else head.name

    def instance_stem(self, source: Vm) -> tuple[str, int]:
        """The name an instance of ``source`` is numbered after, and whose counter it uses:
        a version's instances are NAME-instN and NAME-dispN, counted per versioned VM."""
        head = self.head_of(source)
        return (self.base_name(head), head.id) if head is not None else (source.name, source.id)

    def template_users(self, vm_id: int | None = None, alias_id: int | None = None) -> list[Vm]:
        """VMs whose template link names this VM or alias itself."""
        return sorted(
            (
                vm
                for vm in self.by_id.values()
                if vm.template is not None
                and (
                    (vm_id is not None and vm.template.target_vm == vm_id)
                    or (alias_id is not None and vm.template.target_alias == alias_id)
                )
            ),
            key=lambda v: v.id,
        )

    def template_name(self, link: TemplateLink) -> str:
        if link.target_vm is not None:
            return self.get_by_id(link.target_vm).name
        assert link.target_alias is not None
        return self.aliases_by_id[link.target_alias].name

    def resolve_template(self, vm: Vm) -> Vm | None:
        """The VM a template link stands for now (an alias: the version it names now)."""
        if vm.template is None:
            return None
        return self.resolve(self.template_name(vm.template))

    # Aliases

    def get_alias(self, name: str) -> Alias:
        try:
            return self.aliases[name]
        except KeyError:
            raise ModelError(errno.ENOENT, f"there is no alias named {name!r}") from None

    def alias_target_name(self, alias: Alias) -> str:
        """What the symlink reads: the current name of the VM or alias it stands for."""
        if alias.target_vm is not None:
            return self.get_by_id(alias.target_vm).name
        assert alias.target_alias is not None
        return self.aliases_by_id[alias.target_alias].name

    def resolve(self, name: str) -> Vm:
        """The VM a name stands for, following aliases."""
        seen = 0
        while name in self.aliases:
            seen += 1
            if seen > MAX_ALIAS_CHAIN:
                raise ModelError(errno.ELOOP, f"alias chain from {name!r} is too long")
            name = self.alias_target_name(self.aliases[name])
        return self.get(name)

    def aliases_standing_for(
        self, vm_id: int | None = None, alias_id: int | None = None
    ) -> tuple[int, ...]:
        """Every alias that ends at this VM or alias, the ones named by others last."""
        doomed: list[int] = []
        frontier_vm = {vm_id} if vm_id is not None else set()
        frontier_alias = {alias_id} if alias_id is not None else set()
        while True:
            found = sorted(
                a.id
                for a in self.aliases_by_id.values()
                if a.id not in doomed
                and (a.target_vm in frontier_vm or a.target_alias in frontier_alias)
            )
            if not found:
                break
            doomed.extend(found)
            frontier_vm = set()
            frontier_alias = set(found)
        return tuple(reversed(doomed))

    # Writing: the only place that changes the model, each after the store has it

    def reserve(self, name: str) -> None:
        """Hold a name for a plan in flight, until :meth:`add_vm`, an apply or :meth:`release`."""
        self.reserved.add(name)

    def release(self, name: str) -> None:
        """Give back a name reserved by a plan that was not carried out."""
        self.reserved.discard(name)

    def add_vm(self, vm: Vm) -> None:
        self.reserved.discard(vm.name)
        vm.hidden = vm.hidden or vm.name.startswith(".")
        if vm.name in self.by_name or vm.name in self.aliases or vm.id in self.by_id:
            raise ModelError(errno.EEXIST, f"VM {vm.name!r} (id {vm.id}) is already present")
        self.by_name[vm.name] = vm
        self.by_id[vm.id] = vm
        for vol in vm.volumes.values():
            self._volume_owner[vol.id] = vm.id

    def remove_vm(self, vm_id: int) -> Vm:
        """Forget a VM; its clones move to its origin and the aliases standing for it go."""
        vm = self.get_by_id(vm_id)
        for alias_id in self.aliases_standing_for(vm_id=vm_id):
            self.remove_alias(alias_id)
        del self.by_id[vm_id]
        del self.by_name[vm.name]
        for vol in vm.volumes.values():
            self._volume_owner.pop(vol.id, None)
        for savestate in vm.savestates.values():
            self._savestate_owner.pop(savestate.id, None)
            for vol in savestate.volumes.values():
                self._savestate_volume_owner.pop(vol.id, None)
        for other in self.by_id.values():
            if other.origin_id == vm_id:
                other.origin_id = vm.origin_id
        return vm

    def set_origin(self, vm_id: int, origin_id: int | None) -> None:
        self.get_by_id(vm_id).origin_id = origin_id

    def apply_rename_vm(self, plan: RenameVm) -> None:
        vm = self.get_by_id(plan.vm_id)
        self.reserved.discard(plan.new)
        del self.by_name[plan.old]
        vm.name = plan.new
        self.by_name[plan.new] = vm

    def apply_hide(self, plan: HideVm) -> None:
        vm = self.get_by_id(plan.vm_id)
        for alias_id in plan.aliases:
            self.remove_alias(alias_id)
        for child in plan.reparent:
            self.by_id[child].origin_id = plan.new_origin
        del self.by_name[vm.name]
        vm.name = plan.hidden_name
        self.by_name[vm.name] = vm  # users cannot make names starting with "."
        vm.hidden = True
        vm.props["volatile"] = "1"

    def set_state(self, vm: Vm, state: str) -> bool:
        """The state libvirt reported (or the lifecycle decided); whether it changed."""
        if state not in VM_STATES:
            raise ValueError(f"no VM state {state!r}")
        changed = vm.state != state
        vm.state = state
        return changed

    def apply_set_property(self, plan: SetProperty) -> None:
        vm = self.get_by_id(plan.vm_id)
        if plan.value is None:
            vm.props.pop(plan.name, None)
        else:
            vm.props[plan.name] = plan.value

    def set_domain_xml(self, vm_id: int, xml: str | None) -> None:
        self.get_by_id(vm_id).domain_xml = xml

    def add_volume(self, vm_id: int, volume: Volume) -> None:
        vm = self.get_by_id(vm_id)
        if volume.name in vm.volumes:
            raise ModelError(errno.EEXIST, f"VM {vm.name!r} already has a volume {volume.name!r}")
        vm.volumes[volume.name] = volume
        self._volume_owner[volume.id] = vm_id

    def remove_volume(self, vm_id: int, name: str) -> None:
        vm = self.get_by_id(vm_id)
        vol = self.volume(vm, name)
        del vm.volumes[name]
        self._volume_owner.pop(vol.id, None)

    def apply_rename_volume(self, plan: RenameVolume) -> None:
        vm = self.get_by_id(plan.vm_id)
        vol = vm.volumes.pop(plan.old)
        vol.name = plan.new
        vm.volumes[plan.new] = vol

    def apply_resize_volume(self, plan: ResizeVolume) -> None:
        _, vol = self.volume_by_id(plan.volume_id)
        vol.size = plan.new_size

    def set_policy(self, volume_id: int, policy: str) -> None:
        _, vol = self.volume_by_id(volume_id)
        vol.policy = policy

    def add_savestate(self, vm_id: int, savestate: Savestate) -> None:
        vm = self.get_by_id(vm_id)
        vm.savestates[savestate.label] = savestate
        self._savestate_owner[savestate.id] = (vm_id, savestate.label)
        for vol in savestate.volumes.values():
            self._savestate_volume_owner[vol.id] = (vm_id, savestate.label)

    def remove_savestate(self, vm_id: int, label: str) -> Savestate:
        vm = self.get_by_id(vm_id)
        savestate = vm.savestates.pop(label)
        self._savestate_owner.pop(savestate.id, None)
        for vol in savestate.volumes.values():
            self._savestate_volume_owner.pop(vol.id, None)
        return savestate

    def add_alias(self, alias: Alias) -> None:
        self.reserved.discard(alias.name)
        if alias.name in self.aliases or alias.name in self.by_name:
            raise ModelError(errno.EEXIST, f"name {alias.name!r} is already taken")
        self.aliases[alias.name] = alias
        self.aliases_by_id[alias.id] = alias

    def remove_alias(self, alias_id: int) -> None:
        alias = self.aliases_by_id.pop(alias_id)
        del self.aliases[alias.name]

    def apply_rename_alias(self, plan: RenameAlias) -> None:
        alias = self.aliases_by_id[plan.alias_id]
        self.reserved.discard(plan.new)
        del self.aliases[plan.old]
        alias.name = plan.new
        self.aliases[plan.new] = alias

    def apply_replace_alias(self, plan: ReplaceAlias) -> None:
        kept = self.aliases_by_id[plan.keep_id]
        self.remove_alias(plan.drop_id)
        for alias_id in plan.retarget:
            self.aliases_by_id[alias_id].target_alias = plan.keep_id
        del self.aliases[kept.name]
        kept.name = plan.name
        self.aliases[plan.name] = kept

    def apply_version(self, plan: MakeVersion, version: Vm, alias: Alias | None) -> None:
        """Record what a commit made: ``version`` is in the namespace; ``alias`` is new."""
        head = self.get_by_id(plan.head_id)
        self.reserved.discard(plan.head_name)
        if head.name != plan.head_name:
            del self.by_name[head.name]
            head.name = plan.head_name
            self.by_name[head.name] = head
        head.props["versioned"] = "1"
        version.version_of = head.id
        version.version = plan.number
        head.origin_id = version.id
        if alias is not None:
            self.add_alias(alias)
        elif plan.alias_id is not None:
            moved = self.aliases_by_id[plan.alias_id]
            moved.target_vm, moved.target_alias = version.id, None

    def apply_unversion(self, plan: Unversion) -> None:
        head = self.get_by_id(plan.head_id)
        for alias_id in plan.retarget:
            retargeted = self.aliases_by_id[alias_id]
            retargeted.target_vm, retargeted.target_alias = head.id, None
        if plan.alias_id is not None:
            self.remove_alias(plan.alias_id)
        del self.by_name[head.name]
        head.name = plan.base
        self.by_name[head.name] = head
        head.props.pop("versioned", None)
        for vm_id in plan.versions:
            self.by_id[vm_id].version_of = None

    def set_template(self, vm_id: int, link: TemplateLink | None) -> None:
        """A new template link (or none); which VM it was last taken from is forgotten."""
        vm = self.get_by_id(vm_id)
        vm.template, vm.template_used = link, None

    def set_template_used(self, vm_id: int, used: int | None) -> None:
        """The VM whose volumes a start took as this VM's template volumes."""
        self.get_by_id(vm_id).template_used = used
