"""What making a VM writes: the description of a new VM (:class:`NewVm`), the savestates
it gets from its source, its rows in one transaction, and its objects in memory.

``VmTree.make_vm`` brackets these with the intent (``core.journal``); every way a VM
comes to be (mkdir, a clone, an instance or disposable, a committed version) is one
:class:`NewVm`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmtreefs.rules.objects import SAVED_POLICY, Savestate, TemplateLink, Vm, Volume, VolumeSpec
from vmtreefs.store import Txn


@dataclass(frozen=True)
class NewVm:
    """A VM to make. ``name`` is reserved by the caller's plan; ``what`` is its event
    line (``detail`` is added to the line logged only); ``sources`` make its volumes
    snapshots; ``linked`` are savestates of the source it gets too; ``extra_writes``
    writes what else the operation changes in the same transaction, given the new id."""

    name: str
    what: str
    specs: tuple[VolumeSpec, ...]
    detail: str = ""
    sources: tuple[int, ...] | None = None
    origin_id: int | None = None
    props: dict[str, str] = field(default_factory=dict)
    reparent: tuple[int, ...] = ()
    domain_xml: str | None = None
    linked: tuple[Savestate, ...] = ()
    template: TemplateLink | None = None
    extra_writes: Callable[[Txn, int], None] | None = None

    @classmethod
    def of_snapshots(
        cls,
        name: str,
        what: str,
        volumes: tuple[tuple[int, VolumeSpec], ...],
        origin_id: int | None,
        props: dict[str, str],
        reparent: tuple[int, ...],
        like: Vm,
        linked: tuple[Savestate, ...] = (),
        extra_writes: Callable[[Txn, int], None] | None = None,
    ) -> NewVm:
        """A VM whose volumes are snapshots of (source volume id, new volume) pairs, with
        the description and template of ``like`` (the source of a clone, a version's head)."""
        return cls(
            name,
            what,
            tuple(spec for _, spec in volumes),
            sources=tuple(src for src, _ in volumes),
            origin_id=origin_id,
            props=dict(props),
            reparent=reparent,
            domain_xml=like.domain_xml,
            linked=linked,
            template=like.template,
            extra_writes=extra_writes,
        )


@dataclass(frozen=True)
class LinkedSavestate:
    """A source's savestate as the new VM gets it: a hard link of the memory image
    (never a copy) and a snapshot of each of its volumes."""

    source: Savestate
    image: str
    info: dict[str, Any]
    volumes: tuple[Volume, ...]  # the source's, by name

    @classmethod
    def of(cls, savestate: Savestate) -> LinkedSavestate:
        return cls(
            savestate,
            f"ss-link-{secrets.token_hex(6)}.save",
            {**savestate.info, "linked_from": savestate.info.get("vm", "")},
            tuple(sorted(savestate.volumes.values(), key=lambda v: v.name)),
        )


@dataclass(frozen=True)
class Making:
    """Everything the engine makes for one :class:`NewVm`, in the order of its ids."""

    new: NewVm
    linked: tuple[LinkedSavestate, ...]

    @classmethod
    def of(cls, new: NewVm) -> Making:
        return cls(new, tuple(LinkedSavestate.of(ss) for ss in new.linked))

    @property
    def all_specs(self) -> tuple[VolumeSpec, ...]:
        return self.new.specs + tuple(
            VolumeSpec(v.name, v.size, SAVED_POLICY) for ls in self.linked for v in ls.volumes
        )

    @property
    def all_sources(self) -> tuple[int, ...] | None:
        if self.new.sources is None:
            return None
        return self.new.sources + tuple(v.id for ls in self.linked for v in ls.volumes)

    def image_links(
        self, image_path: Callable[[Savestate], Path], into: Path
    ) -> list[tuple[str, str]]:
        """(existing image, its new hard link) of each linked savestate."""
        return [(str(image_path(ls.source)), str(into / ls.image)) for ls in self.linked]

    def _saved_ids(self, all_ids: list[int]) -> Iterator[int]:
        return iter(all_ids[len(self.new.specs) :])

    def write_rows(self, tx: Txn, all_ids: list[int], created: float) -> tuple[int, list[int]]:
        """The VM's rows, its volumes' and its savestates'; the new VM id and savestate ids."""
        new = self.new
        vm_id = tx.insert_vm(new.name, created, new.origin_id, new.props)
        for vol_id, spec in zip(all_ids, new.specs, strict=False):
            tx.insert_volume(vol_id, vm_id, spec.name, spec.size, spec.policy, created)
        for child in new.reparent:
            tx.set_vm_origin(child, vm_id)
        if new.domain_xml is not None:
            tx.set_domain_xml(vm_id, new.domain_xml)
        if new.template is not None:
            tx.set_template(vm_id, new.template.target_vm, new.template.target_alias)
        if new.extra_writes is not None:
            new.extra_writes(tx, vm_id)
        rest = self._saved_ids(all_ids)
        savestate_ids = [
            tx.insert_savestate(
                vm_id,
                ls.source.label,
                ls.source.created,
                ls.image,
                ls.info,
                {v.name: (next(rest), v.size) for v in ls.volumes},
            )
            for ls in self.linked
        ]
        return vm_id, savestate_ids

    def vm(self, vm_id: int, created: float, all_ids: list[int]) -> Vm:
        new = self.new
        vm = Vm(
            vm_id,
            new.name,
            created,
            new.origin_id,
            new.props,
            domain_xml=new.domain_xml,
            template=new.template,
        )
        for vol_id, spec in zip(all_ids, new.specs, strict=False):
            vm.volumes[spec.name] = Volume(vol_id, spec.name, spec.size, spec.policy, created)
        return vm

    def savestates(self, savestate_ids: list[int], all_ids: list[int]) -> list[Savestate]:
        rest = self._saved_ids(all_ids)
        return [
            Savestate(
                ss_id,
                ls.source.label,
                ls.source.created,
                ls.image,
                ls.info,
                {
                    v.name: Volume(next(rest), v.name, v.size, SAVED_POLICY, ls.source.created)
                    for v in ls.volumes
                },
            )
            for ls, ss_id in zip(self.linked, savestate_ids, strict=True)
        ]
