"""``vmtreefs fsck``: check SOURCE offline, and repair what can be repaired without guessing.

The checks are the invariants between the store and the engine, and within the
store. A repair never deletes data it cannot account for: engine volumes no VM
owns are adopted by a VM named ``lost-found`` (readable through the mount,
removable with rmdir), and memory images no savestate names are moved to
``SOURCE/lost+found/``. A second run after ``--repair`` is clean.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vmtreefs.core.tree import VmTree
from vmtreefs.engine.base import SnapshotEngine
from vmtreefs.errors import VmtreeError
from vmtreefs.rules.invariants import Finding, check_namespace, compare_volumes, journalled_volumes
from vmtreefs.rules.namespace import Namespace
from vmtreefs.rules.vms import needs_of
from vmtreefs.saveimage import RESTORE_COPY_PREFIX
from vmtreefs.store import Store

log = logging.getLogger("vmtreefs.fsck")

LOST_FOUND_VM = "lost-found"
LOST_FOUND_DIR = "lost+found"
_IMAGE_RE = re.compile(r"ss-[A-Za-z0-9-]+\.save\Z")

Progress = Callable[[str, int, int], None]


@dataclass
class FsckReport:
    findings: list[Finding] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)  # volatile VMs that wait, as they should
    checked: list[str] = field(default_factory=list)  # checks of the engine's own that passed

    @property
    def clean(self) -> bool:
        return not self.findings

    @property
    def left(self) -> list[Finding]:
        return [f for f in self.findings if not f.repaired]


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
        report.checked = again.checked
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
    journalled = journalled_volumes(store.load().open_intents)
    _check_volumes(store, engine, ns, journalled, repair, progress, report)
    with _step(progress, "engine metadata", 1):
        try:
            if engine.check_metadata_live() is not None:
                report.checked.append(f"{engine.name}: {engine.live_check_name}: sound")
        except VmtreeError as e:
            report.findings.append(Finding("engine", f"{engine.name}: {e.reason}"))
    _check_images(savestate_dir, ns, repair, progress, report)
    report.pending = [
        f"{vm.name} waits: {'; '.join(needs_of(ns, vm)) or 'nothing needs it'}"
        for vm in ns.by_id.values()
        if vm.hidden and vm.volatile
    ]


def _check_volumes(
    store: Store,
    engine: SnapshotEngine,
    ns: Namespace,
    journalled: frozenset[int],
    repair: bool,
    progress: Progress,
    report: FsckReport,
) -> None:
    """Every volume the store knows is in the engine, at its size; and nothing else is
    (but the volumes an open intent names: they are its to make or delete)."""
    with _step(progress, "volumes", len(ns.by_id)):
        differences = compare_volumes(ns, engine.inventory(), journalled)
    orphans = {d.vol_id: d.engine_size for d in differences if d.kind == "orphan"}
    for diff in differences:
        if diff.kind == "missing":
            report.findings.append(Finding("volumes", diff.line()))
        elif diff.kind == "smaller":
            finding = Finding(
                "volumes", diff.line(), f"grow it to {diff.store_size} bytes (volumes only grow)"
            )
            if repair:
                engine.resize(diff.vol_id, diff.store_size)
                finding.repaired = True
            report.findings.append(finding)
        elif diff.kind == "larger":
            finding = Finding(
                "volumes",
                diff.line(),
                f"record {diff.engine_size} bytes (a grow the store did not record)",
            )
            if repair:
                with store.transaction() as tx:
                    tx.set_volume_size(diff.vol_id, diff.engine_size)
                finding.repaired = True
            report.findings.append(finding)
    if not orphans:
        return
    ids = sorted(orphans)
    finding = Finding(
        "volumes",
        f"{len(ids)} engine volumes no VM owns: {', '.join(map(str, ids[:10]))}"
        + (" ..." if len(ids) > 10 else ""),
        f"adopt them into the VM {LOST_FOUND_VM} as vol-ID.img",
    )
    if repair:
        _adopt(store, ns, orphans)
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
            entries = sorted(p.name for p in savestate_dir.iterdir())
        except FileNotFoundError:
            entries = []
        present = [name for name in entries if _IMAGE_RE.match(name)]
        for name in entries:
            if name.startswith(RESTORE_COPY_PREFIX):
                # A restore's rewritten copy of an image, left by a crash (mount removes it too).
                finding = Finding("savestates", f"{name} is a leftover restore copy", "remove it")
                if repair:
                    (savestate_dir / name).unlink(missing_ok=True)
                    finding.repaired = True
                report.findings.append(finding)
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
