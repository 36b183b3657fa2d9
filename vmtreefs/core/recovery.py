"""Start-up: finish or undo what a crash interrupted, load the namespace, check it.

Runs blocking, before the filesystem answers. Each open intent is rolled back
(a creation: what it made goes) or forward (a deletion, a grow, a discard, a
growth by writes: to the engine's size);
saves and restores are left to the lifecycle when libvirt will settle them
(``VM_INTENTS``). Then the namespace is loaded from the store and compared with
the engine's inventory, with the same checks ``vmtreefs fsck`` makes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from vmtreefs import saveimage
from vmtreefs.core.journal import Journal, remove_files
from vmtreefs.engine.base import SnapshotEngine
from vmtreefs.errors import VmtreeError
from vmtreefs.rules import invariants
from vmtreefs.rules.names import round_up_to_sector
from vmtreefs.rules.namespace import Namespace
from vmtreefs.rules.objects import SAVED_POLICY, Alias, Savestate, TemplateLink, Vm, Volume
from vmtreefs.store import Intent, SavestateRow, Snapshot, Store

log = logging.getLogger("vmtreefs.tree")

VM_INTENTS = frozenset({"save", "restore"})
"""Intents whose outcome depends on libvirt: a running mount settles them with it."""


@dataclass
class RecoveryReport:
    rolled_back: list[str] = field(default_factory=list)
    rolled_forward: list[str] = field(default_factory=list)
    left_open: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    # Saves and restores a crash interrupted, for the lifecycle: what became of them
    # depends on libvirt, which may still be carrying them out.
    deferred: list[Intent] = field(default_factory=list)

    def next_deferred(self) -> Intent | None:
        """The oldest save or restore still to settle; it stays until :meth:`settled`."""
        return self.deferred[0] if self.deferred else None

    def settled(self, intent: Intent) -> None:
        self.deferred.remove(intent)


def savestate_of(row: SavestateRow) -> Savestate:
    volumes = {
        name: Volume(vol_id, name, size, SAVED_POLICY, row.created)
        for name, (vol_id, size) in row.volumes.items()
    }
    return Savestate(row.id, row.label, row.created, row.image, row.info, volumes)


def load_namespace(snapshot: Snapshot) -> Namespace:
    """The namespace as the store has it (no recovery: fsck reads it this way)."""
    vms = {
        row.id: Vm(
            row.id,
            row.name,
            row.created,
            row.origin_id,
            dict(row.props),
            hidden=row.name.startswith("."),
        )
        for row in snapshot.vms
    }
    for vol in snapshot.volumes:
        vms[vol.vm_id].volumes[vol.name] = Volume(
            vol.id, vol.name, vol.size, vol.policy, vol.created
        )
    for vm_id, xml in snapshot.domains.items():
        vms[vm_id].domain_xml = xml
    ns = Namespace()
    for vm in vms.values():
        ns.add_vm(vm)
    for saved in snapshot.savestates:
        ns.add_savestate(saved.vm_id, savestate_of(saved))
    for row in snapshot.aliases:
        ns.add_alias(
            Alias(row.id, row.name, row.target_vm, row.target_alias, row.system, row.created)
        )
    for version in snapshot.versions:
        vms[version.vm_id].version_of = version.head_id
        vms[version.vm_id].version = version.number
    for link in snapshot.templates:
        vms[link.vm_id].template = TemplateLink(link.target_vm, link.target_alias)
        vms[link.vm_id].template_used = link.used
    return ns


class Recovery:
    """What a mount does before it answers, on the store, the engine and the journal."""

    def __init__(
        self, store: Store, engine: SnapshotEngine, journal: Journal, savestate_dir: Path
    ) -> None:
        self.store = store
        self.engine = engine
        self.journal = journal
        self.savestate_dir = savestate_dir

    def recover(self, defer_vm_intents: bool) -> tuple[RecoveryReport, Namespace]:
        """Finish or undo what a crash interrupted, load the namespace, compare with the engine.

        With ``defer_vm_intents``, saves and restores stay open for the lifecycle, which
        settles them with libvirt (``report.deferred``)."""
        report = RecoveryReport()
        for intent in self.store.load().open_intents:
            if intent.kind in VM_INTENTS and defer_vm_intents:
                report.deferred.append(intent)
            else:
                self._recover_intent(intent, report)
        self._remove_restore_copies()
        ns = load_namespace(self.store.load())
        self._compare_inventory(ns, report)
        for line in report.rolled_back:
            self.journal.events.add(f"recovered: rolled back {line}")
        for line in report.rolled_forward:
            self.journal.events.add(f"recovered: rolled forward {line}")
        return report, ns

    def _recover_intent(self, intent: Intent, report: RecoveryReport) -> None:
        payload = intent.payload
        what = f"intent {intent.id} ({intent.kind} {payload.get('what', '')})".replace(" )", ")")
        try:
            if intent.kind == "create":
                for vol in payload["volumes"]:
                    self.engine.delete(vol["id"], missing_ok=True)
                remove_files(payload.get("files", []))
                with self.store.transaction() as tx:
                    tx.complete_intent(intent.id)
                report.rolled_back.append(what)
            elif intent.kind == "delete_volumes":
                for vol_id in payload["volume_ids"]:
                    self.engine.delete(vol_id, missing_ok=True)
                remove_files(payload.get("files", []))
                with self.store.transaction() as tx:
                    tx.complete_intent(intent.id)
                report.rolled_forward.append(what)
            elif intent.kind == "discard_volume":
                vol_id, size = payload["volume_id"], payload["size"]
                known = {v.id for v in self.store.load().volumes}
                if vol_id in known:
                    self.engine.discard(vol_id, size)
                with self.store.transaction() as tx:
                    tx.complete_intent(intent.id)
                report.rolled_forward.append(what)
            elif intent.kind == "save":
                if self.settle_save(intent) == "recorded":
                    report.rolled_forward.append(what)
                else:
                    report.rolled_back.append(what)
                self.journal.complete_intent(intent.id)
            elif intent.kind == "restore":
                # Without libvirt nothing can be started: the VM stays halted, with the
                # volumes the crash left (the restore swaps them in one transaction).
                self.journal.complete_intent(intent.id)
                report.rolled_back.append(what)
            elif intent.kind == "resize_volume":
                vol_id, size = payload["volume_id"], payload["size"]
                known = {v.id for v in self.store.load().volumes}
                if vol_id in known and self.engine.size(vol_id) < size:
                    self.engine.resize(vol_id, size)
                with self.store.transaction() as tx:
                    if vol_id in known:
                        tx.set_volume_size(vol_id, size)
                    tx.complete_intent(intent.id)
                report.rolled_forward.append(what)
            elif intent.kind == "grow_volume":
                size = self._roll_growth_forward(intent.id, payload["volume_id"])
                report.rolled_forward.append(what if size is None else f"{what} to {size}")
            else:
                log.error("%s: unknown intent kind, left open for fsck", what)
                report.left_open.append(what)
                return
            log.info("recovered %s", what)
        except VmtreeError as e:
            log.error("could not recover %s: %s; left open", what, e.describe())
            report.left_open.append(what)

    def _roll_growth_forward(self, intent_id: int, vol_id: int) -> int | None:
        """Writes past the end that no sync recorded: the engine's ``written_end`` (whole
        sectors) is where they reached, at least what the store holds. Returns the size
        recorded."""
        recorded = {v.id: v.size for v in self.store.load().volumes}.get(vol_id)
        size = None
        if recorded is not None:
            size = max(recorded, round_up_to_sector(self.engine.written_end(vol_id)))
            if self.engine.size(vol_id) < size:
                self.engine.resize(vol_id, size)
            # The size the writes left may still be only in the page cache (kill -9).
            opened = self.engine.open(vol_id, True)
            try:
                opened.fsync()
            finally:
                opened.close()
        with self.store.transaction() as tx:
            if size is not None and size != recorded:
                tx.set_volume_size(vol_id, size)
            tx.complete_intent(intent_id)
        return size

    def settle_save(self, intent: Intent) -> str:
        """The store's part of a save a crash interrupted: ``recorded`` when libvirt
        finished the memory image (the savestate is kept), else ``rolled back``.

        Blocking; the intent stays open (the lifecycle may still resume the VM).
        """
        saved = intent.payload["savestate"]
        snapshot = self.store.load()
        if any(row.image == saved["image"] for row in snapshot.savestates):
            return "recorded"
        owner_known = any(row.id == saved["owner_id"] for row in snapshot.vms)
        if owner_known and saveimage.is_complete(self.savestate_dir / saved["image"]):
            with self.store.transaction() as tx:
                tx.insert_savestate(
                    saved["owner_id"],
                    saved["label"],
                    time.time(),
                    saved["image"],
                    saved["info"],
                    {v["name"]: (v["id"], v["size"]) for v in intent.payload["volumes"]},
                )
                self.journal.record_event(
                    tx, f"recovered: {intent.payload['what']}: the image is whole, kept"
                )
            return "recorded"
        for vol in intent.payload["volumes"]:
            self.engine.delete(vol["id"], missing_ok=True)
        remove_files(intent.payload.get("files", []))
        return "rolled back"

    def _remove_restore_copies(self) -> None:
        """A restore's rewritten copy of an image outlives a crash; libvirt, if it is
        still reading one, holds it open."""
        with contextlib.suppress(FileNotFoundError):
            for path in self.savestate_dir.glob(f"{saveimage.RESTORE_COPY_PREFIX}*"):
                log.info("removing %s, left by an interrupted restore", path)
                remove_files([str(path)])

    def _compare_inventory(self, ns: Namespace, report: RecoveryReport) -> None:
        """The same checks as ``vmtreefs fsck`` (without repairs): the engine's volumes
        against the store's, and the namespace's own rules."""
        journalled = invariants.journalled_volumes(report.deferred)
        differences = invariants.compare_volumes(ns, self.engine.inventory(), journalled)
        report.differences += [d.line() for d in differences]
        report.differences += [f.problem for f in invariants.check_namespace(ns)]
        for line in report.differences:
            log.warning("inventory: %s; run vmtreefs fsck", line)
        if not report.differences:
            log.info(
                "inventory: engine and store agree (%d volumes of %d VMs)",
                len(invariants.known_volumes(ns)),
                len(ns),
            )
