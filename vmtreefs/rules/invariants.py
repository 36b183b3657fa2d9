"""The invariants of a tree, checked with no I/O: used by the mount's recovery and by fsck.

A check takes what was loaded (the namespace, and the engine's inventory) and
returns :class:`Finding` s; a finding may carry the store change that repairs
it, which only ``vmtreefs fsck --repair`` applies.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vmtreefs.errors import VmtreeError
from vmtreefs.rules.names import MAX_ALIAS_CHAIN
from vmtreefs.rules.namespace import Namespace
from vmtreefs.rules.objects import Vm


class RepairTxn(Protocol):
    """What a repair needs of a store transaction (``vmtreefs.store.Txn`` has it)."""

    def set_vm_origin(self, vm_id: int, origin_id: int | None) -> None: ...

    def forget_version(self, vm_id: int) -> None: ...

    def insert_alias(
        self,
        name: str,
        target_vm: int | None,
        target_alias: int | None,
        created: float,
        system: bool = False,
    ) -> int: ...

    def retarget_alias(
        self, alias_id: int, target_vm: int | None, target_alias: int | None
    ) -> None: ...


class JournalEntry(Protocol):
    """An open intent as the store keeps it (``vmtreefs.store.Intent``)."""

    @property
    def payload(self) -> dict[str, Any]: ...


@dataclass
class Finding:
    """One broken invariant: what is wrong, and what ``--repair`` does about it (None: nothing)."""

    check: str
    problem: str
    repair: str | None = None
    repaired: bool = False
    fix: Callable[[RepairTxn], None] | None = field(default=None, repr=False)  # a store repair

    def line(self) -> str:
        if self.repaired:
            return f"{self.check}: {self.problem}: repaired: {self.repair}"
        if self.repair is None:
            return f"{self.check}: {self.problem} (not repairable without guessing)"
        return f"{self.check}: {self.problem} (--repair: {self.repair})"


# The rules within the namespace: pure, no I/O.


def check_namespace(ns: Namespace) -> list[Finding]:
    """Lineage, aliases and versions, as loaded from the store."""
    findings: list[Finding] = []
    for vm in sorted(ns.by_id.values(), key=lambda v: v.id):
        seen = {vm.id}
        step = vm.origin_id
        while step is not None:
            if step in seen:
                findings.append(
                    Finding(
                        "lineage",
                        f"VM {vm.name} (id {vm.id}) is its own ancestor",
                        f"clear the origin of {vm.name}",
                        fix=_clear_origin(vm.id),
                    )
                )
                break
            seen.add(step)
            origin = ns.by_id.get(step)
            if origin is None:
                findings.append(
                    Finding(
                        "lineage",
                        f"VM {vm.name} names a missing origin {step}",
                        "clear it",
                        fix=_clear_origin(vm.id),
                    )
                )
                break
            step = origin.origin_id
    for alias in sorted(ns.aliases_by_id.values(), key=lambda a: a.id):
        step_alias = alias
        try:
            for _ in range(MAX_ALIAS_CHAIN + 1):
                if step_alias.target_vm is not None:
                    ns.get_by_id(step_alias.target_vm)
                    break
                assert step_alias.target_alias is not None
                step_alias = ns.aliases_by_id[step_alias.target_alias]
            else:
                raise VmtreeError(errno.ELOOP, "its chain does not end")
        except (VmtreeError, KeyError) as e:
            reason = e.reason if isinstance(e, VmtreeError) else "it names a missing alias"
            findings.append(Finding("aliases", f"alias {alias.name}: {reason}", None))
    for head in sorted((v for v in ns.by_id.values() if v.versioned), key=lambda v: v.id):
        versions = ns.versions_of(head)
        newest = versions[-1] if versions else None
        system = ns.system_alias_of(head)
        if newest is None:
            findings.append(Finding("versions", f"{head.name} is versioned but has no version"))
        elif system is None or system.target_vm != newest.id:
            base = ns.base_name(head)

            findings.append(
                Finding(
                    "versions",
                    f"the alias {base} does not name the newest version {newest.name}",
                    f"point {base} at {newest.name}",
                    fix=_point_alias(base, None if system is None else system.id, newest.id),
                )
            )
    for vm in ns.by_id.values():
        if vm.version_of is not None and not ns.by_id.get(vm.version_of, Vm(0, "", 0)).versioned:
            findings.append(
                Finding(
                    "versions",
                    f"{vm.name} is a version of VM {vm.version_of}, which is not versioned",
                    f"keep {vm.name} as a VM of its own",
                    fix=_forget_version(vm.id),
                )
            )
    return findings


def _clear_origin(vm_id: int) -> Callable[[RepairTxn], None]:
    return lambda tx: tx.set_vm_origin(vm_id, None)


def _forget_version(vm_id: int) -> Callable[[RepairTxn], None]:
    return lambda tx: tx.forget_version(vm_id)


def _point_alias(base: str, alias_id: int | None, newest: int) -> Callable[[RepairTxn], None]:
    def point(tx: RepairTxn) -> None:
        if alias_id is None:
            tx.insert_alias(base, newest, None, time.time(), system=True)
        else:
            tx.retarget_alias(alias_id, newest, None)

    return point


@dataclass(frozen=True)
class VolumeDifference:
    """A volume where the store and the engine disagree."""

    kind: str  # "missing" (in the store only), "smaller"/"larger" (in the engine), "orphan"
    vol_id: int
    where: str  # the path a user sees, or "" for an orphan
    store_size: int
    engine_size: int

    def line(self) -> str:
        if self.kind == "missing":
            return f"{self.where} (volume {self.vol_id}) is missing from the engine"
        if self.kind == "orphan":
            return f"engine volume {self.vol_id} belongs to no VM or savestate"
        return (
            f"{self.where} (volume {self.vol_id}) is {self.engine_size} bytes in the engine, "
            f"{self.store_size} in the store"
        )


def known_volumes(ns: Namespace) -> dict[int, tuple[str, int]]:
    """Every volume the store knows: id -> (where a user sees it, size)."""
    known: dict[int, tuple[str, int]] = {}
    for vm in ns.by_id.values():
        for vol in vm.volumes.values():
            known[vol.id] = (f"{vm.name}/volumes/{vol.filename}", vol.size)
        for ss in vm.savestates.values():
            for vol in ss.volumes.values():
                known[vol.id] = (f"{vm.name}/savestates/{ss.label}/{vol.filename}", vol.size)
    return known


def journalled_volumes(intents: Iterable[JournalEntry]) -> frozenset[int]:
    """The engine volumes open intents name: theirs to make or delete, not orphans."""
    return frozenset(
        vol_id
        for intent in intents
        for vol_id in [v["id"] for v in intent.payload.get("volumes", [])]
        + list(intent.payload.get("volume_ids", []))
    )


def compare_volumes(
    ns: Namespace, in_engine: dict[int, int], journalled: frozenset[int] = frozenset()
) -> list[VolumeDifference]:
    """Store against engine; ``journalled`` volumes belong to open intents, not orphans."""
    known = known_volumes(ns)
    found = []
    for vol_id, (where, size) in sorted(known.items()):
        if vol_id not in in_engine:
            found.append(VolumeDifference("missing", vol_id, where, size, 0))
        elif in_engine[vol_id] != size:
            kind = "smaller" if in_engine[vol_id] < size else "larger"
            found.append(VolumeDifference(kind, vol_id, where, size, in_engine[vol_id]))
    for vol_id in sorted(set(in_engine) - set(known) - journalled):
        found.append(VolumeDifference("orphan", vol_id, "", 0, in_engine[vol_id]))
    return found
