"""``vmtreefs fsck``: check SOURCE offline, and repair what can be repaired without guessing.

The checks are the invariants between the store and the engine, and within the
store. A repair never deletes data it cannot account for: engine volumes no VM
owns are adopted by a VM named ``lost-found`` (readable through the mount,
removable with rmdir), and memory images no savestate names are moved to
``SOURCE/lost+found/``. A second run after ``--repair`` is clean.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vmtreefs.engine.base import SnapshotEngine
from vmtreefs.errors import VmtreeError
from vmtreefs.model import MAX_ALIAS_CHAIN, Namespace, Vm
from vmtreefs.store import Store, Txn
from vmtreefs.tree import VmTree

log = logging.getLogger("vmtreefs.fsck")

LOST_FOUND_VM = "lost-found"
LOST_FOUND_DIR = "lost+found"
_IMAGE_RE = re.compile(r"ss-[A-Za-z0-9-]+\.save\Z")

Progress = Callable[[str, int, int], None]


@dataclass
class Finding:
    """One broken invariant: what is wrong, and what ``--repair`` does about it (None: nothing)."""

    check: str
    problem: str
    repair: str | None = None
    repaired: bool = False
    fix: Callable[[Txn], None] | None = field(default=None, repr=False)  # a store repair

    def line(self) -> str:
        if self.repaired:
            return f"{self.check}: {self.problem}: repaired: {self.repair}"
        if self.repair is None:
            return f"{self.check}: {self.problem} (not repairable without guessing)"
        return f"{self.check}: {self.problem} (--repair: {self.repair})"


@dataclass
class FsckReport:
    findings: list[Finding] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)  # volatile VMs that wait, as they should

    @property
    def clean(self) -> bool:
        return not self.findings

    @property
    def left(self) -> list[Finding]:
        return [f for f in self.findings if not f.repaired]


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


def _clear_origin(vm_id: int) -> Callable[[Txn], None]:
    return lambda tx: tx.set_vm_origin(vm_id, None)


def _forget_version(vm_id: int) -> Callable[[Txn], None]:
    return lambda tx: tx.forget_version(vm_id)


def _point_alias(base: str, alias_id: int | None, newest: int) -> Callable[[Txn], None]:
    def point(tx: Txn) -> None:
        if alias_id is None:
            tx.insert_alias(base, newest, None, time.time(), system=True)
        else:
            tx.retarget_alias(alias_id, newest, None)

    return point


# Store, engine and files.


@contextlib.contextmanager
def _step(progress: Progress, what: str, total: int) -> Iterator[Callable[[int], None]]:
    progress(what, 0, total)
    yield lambda done: progress(what, done, total)
    progress(what, total, total)


def fsck(
    store: Store,
    engine: SnapshotEngine,
    savestate_dir: Path,
    repair: bool = False,
    progress: Progress = lambda _what, _done, _total: None,
) -> FsckReport:
    """Check everything; with ``repair``, fix what can be fixed, then check again."""
    report = FsckReport()
    _check(store, engine, savestate_dir, repair, progress, report)
    if repair and any(f.repaired for f in report.findings):
        again = FsckReport()
        _check(store, engine, savestate_dir, False, progress, again)
        report.findings = [f for f in report.findings if f.repaired] + again.findings
        report.counts, report.pending = again.counts, again.pending
    return report


def _check(
    store: Store,
    engine: SnapshotEngine,
    savestate_dir: Path,
    repair: bool,
    progress: Progress,
    report: FsckReport,
) -> None:
    with _step(progress, "store integrity", 1):
        for problem in store.integrity_check():
            report.findings.append(Finding("store", problem))
    tree = VmTree(store, engine, savestate_dir)
    intents = store.load().open_intents
    with _step(progress, "open intents", len(intents)):
        if intents and repair:
            recovered = tree.recover()
            for line in recovered.rolled_back + recovered.rolled_forward:
                report.findings.append(Finding("intents", f"open {line}", "finished", True))
            for line in recovered.left_open:
                report.findings.append(Finding("intents", f"open {line}", None))
        else:
            for intent in intents:
                what = f"{intent.kind} {intent.payload.get('what', '')}".strip()
                report.findings.append(
                    Finding(
                        "intents", f"intent {intent.id} ({what}) is open", "roll it back or forward"
                    )
                )
            tree.load()
    ns = tree.ns
    report.counts = {
        "vms": len(ns),
        "aliases": len(ns.aliases),
        "volumes": ns.volume_count(),
        "savestates": sum(len(vm.savestates) for vm in ns.by_id.values()),
    }
    with _step(progress, "namespace", len(ns)):
        found = check_namespace(ns)
        report.findings += found
        if repair:
            _repair_namespace(store, ns, found)
    journalled = {
        vol_id
        for intent in store.load().open_intents
        for vol_id in [v["id"] for v in intent.payload.get("volumes", [])]
        + list(intent.payload.get("volume_ids", []))
    }
    _check_volumes(store, engine, ns, journalled, repair, progress, report)
    _check_images(savestate_dir, ns, repair, progress, report)
    report.pending = [
        f"{vm.name} waits: {'; '.join(ns.needs_of(vm)) or 'nothing needs it'}"
        for vm in ns.by_id.values()
        if vm.hidden and vm.volatile
    ]


def _check_volumes(
    store: Store,
    engine: SnapshotEngine,
    ns: Namespace,
    journalled: set[int],
    repair: bool,
    progress: Progress,
    report: FsckReport,
) -> None:
    """Every volume the store knows is in the engine, at its size; and nothing else is
    (but the volumes an open intent names: they are its to make or delete)."""
    in_engine = engine.inventory()
    known: dict[int, tuple[str, int]] = {}
    for vm in ns.by_id.values():
        for vol in vm.volumes.values():
            known[vol.id] = (f"{vm.name}/volumes/{vol.filename}", vol.size)
        for ss in vm.savestates.values():
            for vol in ss.volumes.values():
                known[vol.id] = (f"{vm.name}/savestates/{ss.label}/{vol.filename}", vol.size)
    with _step(progress, "volumes", len(known)) as advance:
        for n, (vol_id, (where, size)) in enumerate(sorted(known.items()), 1):
            if vol_id not in in_engine:
                report.findings.append(
                    Finding("volumes", f"{where} (volume {vol_id}) is missing from the engine")
                )
            elif in_engine[vol_id] < size:
                finding = Finding(
                    "volumes",
                    f"{where} is {in_engine[vol_id]} bytes in the engine, {size} in the store",
                    f"grow it to {size} bytes (volumes only grow)",
                )
                if repair:
                    engine.resize(vol_id, size)
                    finding.repaired = True
                report.findings.append(finding)
            elif in_engine[vol_id] > size:
                finding = Finding(
                    "volumes",
                    f"{where} is {in_engine[vol_id]} bytes in the engine, {size} in the store",
                    f"record {in_engine[vol_id]} bytes (a grow the store did not record)",
                )
                if repair:
                    with store.transaction() as tx:
                        tx.set_volume_size(vol_id, in_engine[vol_id])
                    finding.repaired = True
                report.findings.append(finding)
            if n % 256 == 0:
                advance(n)
    orphans = sorted(set(in_engine) - set(known) - journalled)
    if not orphans:
        return
    finding = Finding(
        "volumes",
        f"{len(orphans)} engine volumes no VM owns: {', '.join(map(str, orphans[:10]))}"
        + (" ..." if len(orphans) > 10 else ""),
        f"adopt them into the VM {LOST_FOUND_VM} as vol-ID.img",
    )
    if repair:
        _adopt(store, ns, {vol_id: in_engine[vol_id] for vol_id in orphans})
        finding.repaired = True
    report.findings.append(finding)


def _adopt(store: Store, ns: Namespace, orphans: dict[int, int]) -> None:
    holder = ns.by_name.get(LOST_FOUND_VM)
    with store.transaction() as tx:
        now = time.time()
        if holder is None:
            vm_id = tx.insert_vm(LOST_FOUND_VM, now, None, {})
            taken: set[str] = set()
        else:
            vm_id, taken = holder.id, set(holder.volumes)
        for vol_id, size in orphans.items():
            name = f"vol-{vol_id}"
            while name in taken:
                name += "x"
            tx.insert_volume(vol_id, vm_id, name, size, "persistent", now)
            taken.add(name)
        tx.add_event(now, f"fsck: adopted {len(orphans)} engine volumes into {LOST_FOUND_VM}")


def _check_images(
    savestate_dir: Path, ns: Namespace, repair: bool, progress: Progress, report: FsckReport
) -> None:
    """Every savestate's memory image exists; an image no savestate names is moved aside."""
    named = {ss.image: (vm, ss) for vm in ns.by_id.values() for ss in vm.savestates.values()}
    with _step(progress, "savestate images", len(named)):
        for image, (vm, ss) in sorted(named.items()):
            if not (savestate_dir / image).is_file():
                report.findings.append(
                    Finding(
                        "savestates", f"{vm.name}/savestates/{ss.label}: image {image} is missing"
                    )
                )
        try:
            present = sorted(p.name for p in savestate_dir.iterdir() if _IMAGE_RE.match(p.name))
        except FileNotFoundError:
            present = []
        for name in present:
            if name in named:
                continue
            finding = Finding(
                "savestates",
                f"memory image {name} belongs to no savestate",
                f"move it to {savestate_dir.parent / LOST_FOUND_DIR}",
            )
            if repair:
                aside = savestate_dir.parent / LOST_FOUND_DIR
                aside.mkdir(mode=0o700, exist_ok=True)
                os.rename(savestate_dir / name, aside / name)
                finding.repaired = True
            report.findings.append(finding)


def _repair_namespace(store: Store, ns: Namespace, found: list[Finding]) -> None:
    """The store repairs the namespace checks found, in one transaction."""
    fixes = [f for f in found if f.fix is not None]
    if not fixes:
        return
    with store.transaction() as tx:
        for finding in fixes:
            assert finding.fix is not None
            finding.fix(tx)
        tx.add_event(time.time(), f"fsck: repaired {len(fixes)} namespace problems")
    for finding in fixes:
        finding.repaired = True
