"""The orchestrator: carries out the rules' plans with the store and the engine.

Each operation asks a rule (``rules/``) for a plan, brackets its engine work
with an intent and records the result with its event line (``core.journal``),
then has the namespace apply the plan. Start-up recovery is ``core.recovery``;
versions and templates are ``core.versions``; running VMs is the runner's
(``core.runner.Runner``, the lifecycle in ``runtime/``).

Blocking calls (SQLite, the engine) run in worker threads; the namespace in
memory is only touched on the trio thread, so a plan and its reservation are
atomic with respect to other requests.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from vmtreefs.core.aliases import Aliases
from vmtreefs.core.journal import Journal, in_thread
from vmtreefs.core.making import Making, NewVm
from vmtreefs.core.recovery import Recovery, RecoveryReport, load_namespace
from vmtreefs.core.runner import Runner
from vmtreefs.core.savestates import Savestates
from vmtreefs.core.versions import Versions
from vmtreefs.core.volumes import Volumes
from vmtreefs.engine.base import PoolUsage, SnapshotEngine
from vmtreefs.engine.select import format_size
from vmtreefs.errors import VmtreeError
from vmtreefs.rules import domain, status
from vmtreefs.rules.names import HOT_LABEL
from vmtreefs.rules.namespace import Namespace
from vmtreefs.rules.objects import Savestate, Vm
from vmtreefs.rules.plans import CloneVm
from vmtreefs.rules.states import HALTED
from vmtreefs.rules.vms import (
    check_domain_writable,
    collectable,
    needs_of,
    plan_clone,
    plan_create_vm,
    plan_delete_vm,
    plan_hide,
    plan_instance,
    plan_rename_vm,
    plan_set_property,
)
from vmtreefs.rules.volumes import check_policy_settable
from vmtreefs.store import Intent, Store, Txn

log = logging.getLogger("vmtreefs.tree")


class VmTree:
    """The tree of VMs as the filesystem sees it."""

    def __init__(
        self, store: Store, engine: SnapshotEngine, savestate_dir: Path | None = None
    ) -> None:
        self.store = store
        self.engine = engine
        # Where savestates keep their memory images (SOURCE/savestates).
        self.savestate_dir = savestate_dir or Path("/nonexistent")
        self.ns = Namespace()
        self.journal = Journal(store, engine)
        self._recovery = Recovery(store, engine, self.journal, self.savestate_dir)
        self.recovery = RecoveryReport()
        self._locks: dict[int, trio.Lock] = collections.defaultdict(trio.Lock)
        # Aliases name VMs by id: making, moving or dropping one must not interleave
        # with deleting the VM it names.
        self.alias_lock = trio.Lock()
        self.runner: Runner | None = None  # runs VMs; set by the daemon when libvirt is used
        self.versions = Versions(self)
        self.savestates = Savestates(self)
        self.volumes = Volumes(self)
        self.aliases = Aliases(self)
        self._collecting = False
        # Set when a lifecycle with libvirt will settle interrupted saves and restores.
        self.defer_vm_intents = False
        self.on_volumes_written_outside: Callable[[list[int]], None] = lambda _ids: None
        # Names in a VM's volumes/ that now lead to other volumes (the kernel caches lookups).
        self.on_volumes_replaced: Callable[[int, list[str]], None] = lambda _vm, _names: None
        # Top-level names that now stand for something else (a VM became NAME-next, NAME an alias).
        self.on_names_changed: Callable[[list[str]], None] = lambda _names: None

    # Start-up (blocking, before the filesystem answers)

    def recover(self) -> RecoveryReport:
        """What a mount does first (``core.recovery``): the namespace it finds is the tree's."""
        self.recovery, self.ns = self._recovery.recover(self.defer_vm_intents)
        return self.recovery

    def load(self) -> None:
        """The namespace as the store has it, with no recovery (fsck reads it this way)."""
        self.ns = load_namespace(self.store.load())

    def settle_save(self, intent: Intent) -> str:
        """Blocking: the store's part of a save a crash interrupted (``Recovery.settle_save``)."""
        return self._recovery.settle_save(intent)

    # Helpers

    @asynccontextmanager
    async def locked(self, vm_id: int) -> AsyncIterator[Vm]:
        """Hold the VM's lock; ENOENT if it went away while we waited."""
        async with self._locks[vm_id]:
            yield self.ns.get_by_id(vm_id)

    # Operations on VMs

    async def create_vm(self, raw_name: str | bytes) -> Vm:
        plan = plan_create_vm(self.ns, raw_name)
        sizes = ", ".join(f"{v.name} {format_size(v.size)}" for v in plan.volumes)
        return await self.make_vm(
            NewVm(plan.name, f"mkdir {plan.name}", plan.volumes, f": {sizes}")
        )

    async def make_vm(self, new: NewVm) -> Vm:
        """Make the volumes (new, or snapshots of ``new.sources``), then record the VM.

        The name is given back on failure, and nothing made in the engine outlives a
        failure: the linked savestates' images and volumes come all or nothing with
        the VM's own.
        """
        making = Making.of(new)
        links = making.image_links(self.savestates.image_path, self.savestate_dir)
        made = tuple(dst for _, dst in links)
        try:
            await in_thread(self.engine.check_writable)
            intent, all_ids = await self.journal.create_volumes(
                new.what, making.all_specs, making.all_sources, made
            )

            def link_and_commit() -> tuple[int, float, float, list[int]]:
                for src, dst in links:
                    os.link(src, dst)
                with self.store.transaction() as tx:
                    created = time.time()
                    vm_id, savestate_ids = making.write_rows(tx, all_ids, created)
                    tx.complete_intent(intent)
                    return vm_id, created, self.journal.record_event(tx, new.what), savestate_ids

            vm_id, created, t, savestate_ids = await self.journal.or_undo(
                intent, all_ids, link_and_commit, made
            )
        except BaseException:
            self.ns.release(new.name)
            raise
        vm = making.vm(vm_id, created, all_ids)
        self.ns.add_vm(vm)
        for savestate in making.savestates(savestate_ids, all_ids):
            self.ns.add_savestate(vm.id, savestate)
        for child in new.reparent:
            self.ns.set_origin(child, vm.id)
        self.journal.publish(new.what + new.detail, t)
        return vm

    async def delete_vm(self, vm_id: int, verb: str = "rmdir") -> None:
        """rmdir: a VM goes now; one that runs, or that something still needs (a running
        instance, a savestate), is hidden and goes when it is free."""
        async with self.locked(vm_id) as vm, self.alias_lock:
            if vm.state != HALTED or needs_of(self.ns, vm):
                if not vm.hidden:
                    await self._hide(vm, verb)
                return
            plan = plan_delete_vm(self.ns, vm.name)
            # Not recorded as gone when the engine could not then free its volumes.
            await in_thread(self.engine.check_writable)
            gone = [self.ns.aliases_by_id[a].name for a in plan.aliases]
            line = f"{verb} {plan.name}" + (f" (and its aliases {', '.join(gone)})" if gone else "")

            def remove_rows(tx: Txn) -> None:
                for alias_id in plan.aliases:
                    tx.delete_alias(alias_id)
                for child in plan.reparent:
                    tx.set_vm_origin(child, plan.new_origin)
                tx.delete_vm(plan.vm_id)

            files = [str(self.savestate_dir / image) for image in plan.images]
            intent, t = await self.journal.begin_deletion(
                line, remove_rows, list(plan.volume_ids), files, what=f"rmdir {plan.name}"
            )
            self.ns.remove_vm(plan.vm_id)
            self.on_names_changed([plan.name, *gone])
            self.journal.publish(line, t)
            with trio.CancelScope(shield=True):
                await self.journal.finish_deletion(intent, list(plan.volume_ids), files)
        await self.collect()

    async def prune_histories(self) -> None:
        """What a mount finishes of a commit: the commit makes its version, then prunes
        the older ones in a step of its own, so a crash between the two left them
        listed. Nothing to do unless it was so."""
        for vm in [vm for vm in self.ns.by_id.values() if vm.versioned]:
            await self.versions.prune(vm.id)

    async def collect(self) -> None:
        """Destroy the VMs that were removed while needed and are free now."""
        if self._collecting:
            return  # the loop below looks again after each deletion
        self._collecting = True
        tried: set[int] = set()
        try:
            while True:
                free = [vm for vm in collectable(self.ns) if vm.id not in tried]
                if not free:
                    return
                tried.add(free[0].id)
                log.info("%s is no longer needed: destroying it", free[0].name)
                try:
                    await self.delete_vm(free[0].id, "destroy")
                except VmtreeError as e:
                    log.error("could not destroy %s: %s", free[0].name, e.describe())
        finally:
            self._collecting = False

    async def _hide(self, vm: Vm, verb: str = "rmdir") -> None:
        plan = plan_hide(self.ns, vm.name)
        gone = [self.ns.aliases_by_id[a].name for a in plan.aliases]
        why = "; ".join(needs_of(self.ns, vm))
        line = f"{verb} {plan.name}: {why}, so it is hidden and goes when it is free" + (
            f" (its aliases {', '.join(gone)} go now)" if gone else ""
        )
        props = {**vm.props, "volatile": "1"}

        def write(tx: Txn) -> None:
            for alias_id in plan.aliases:
                tx.delete_alias(alias_id)
            for child in plan.reparent:
                tx.set_vm_origin(child, plan.new_origin)
            tx.rename_vm(plan.vm_id, plan.hidden_name)
            tx.set_vm_props(plan.vm_id, props)

        t = await self.journal.commit(line, write)
        self.ns.apply_hide(plan)
        self.on_names_changed([plan.name, *gone])
        self.journal.publish(line, t)

    async def make_instance(self, source_id: int, kind: str) -> Vm:
        """``NAME-instN`` (an instance of an immutable VM) or ``NAME-dispN`` (a disposable)."""
        async with self.locked(source_id) as source:

            def number() -> int:
                with self.store.transaction() as tx:
                    return tx.next_number(f"{kind}:{self.ns.instance_stem(source)[1]}")

            plan = plan_instance(self.ns, source.name, kind, await in_thread(number))
            noun = {"disp": "disposable", "inst": "instance", "hot": "hot savestate runner"}[kind]
            return await self._make_from_snapshots(
                source, plan, f"{noun} {plan.name} of {source.name}"
            )

    def volatile_text(self) -> str:
        """.vmtree/volatile: the VMs that go as soon as they stop."""
        return "".join(
            f"{vm.name} {vm.state}{' (removed)' if vm.hidden else ''}\n"
            for vm in sorted(self.ns.by_id.values(), key=lambda v: v.id)
            if vm.volatile
        )

    async def rename_vm(self, vm_id: int, raw_new: str | bytes) -> None:
        async with self.locked(vm_id) as vm:
            plan = plan_rename_vm(self.ns, vm.name, raw_new)
            if plan.new == plan.old:
                return

            try:
                t = await self.journal.commit(
                    f"mv {plan.old} {plan.new}", lambda tx: tx.rename_vm(plan.vm_id, plan.new)
                )
            except BaseException:
                self.ns.release(plan.new)
                raise
            self.ns.apply_rename_vm(plan)
            self.journal.publish(f"mv {plan.old} {plan.new}", t)

    async def clone_vm(self, source_id: int, raw_new: str | bytes, replace: bool = False) -> Vm:
        """A linked clone: a snapshot of every volume, the source's properties and
        savestates (not its hot one: the clone makes its own), origin = source."""
        clone = await self._clone_under_lock(source_id, raw_new, replace)
        if clone.props.get("hot_savestate") == "1" and self.runner is not None:
            self.runner.hot_savestate_changed(clone)
        return clone

    async def _clone_under_lock(self, source_id: int, raw_new: str | bytes, replace: bool) -> Vm:
        async with self.locked(source_id) as source:
            plan = plan_clone(self.ns, source.name, raw_new, replace)
            verb = "clone --replace" if replace else "clone"
            linked = tuple(
                ss for label, ss in sorted(source.savestates.items()) if label != HOT_LABEL
            )
            return await self._make_from_snapshots(
                source, plan, f"{verb} {source.name} {plan.name}", linked
            )

    async def _make_from_snapshots(
        self, source: Vm, plan: CloneVm, what: str, linked: tuple[Savestate, ...] = ()
    ) -> Vm:
        """A VM whose volumes are snapshots of the plan's (the source's, or its hot savestate's)."""
        return await self.make_vm(
            NewVm.of_snapshots(
                plan.name,
                what,
                plan.volumes,
                plan.source_id,
                plan.props,
                plan.reparent,
                source,
                linked,
            )
        )

    # Properties

    async def set_property(self, vm_id: int, name: str, value: str | None) -> None:
        """Store a validated property value (None: back to its default)."""
        if name == "versioned":
            vm = self.ns.get_by_id(vm_id)
            plan_set_property(self.ns, vm.name, name, value)
            if value == "1" and not vm.versioned:
                await self.versions.commit_version(vm_id)
            elif value != "1" and vm.versioned:
                await self.versions.unversion(vm_id)
            return
        async with self.locked(vm_id) as vm:
            plan = plan_set_property(self.ns, vm.name, name, value)
            if vm.props.get(name) == value:
                return
            props = dict(vm.props)
            if value is None:
                props.pop(name, None)
            else:
                props[name] = value
            what = f"set {vm.name} {name}={value if value is not None else '(default)'}"
            t = await self.journal.commit(what, lambda tx: tx.set_vm_props(vm.id, props))
            self.ns.apply_set_property(plan)
            self.journal.publish(what, t)
        if name == "hot_savestate" and self.runner is not None:
            self.runner.hot_savestate_changed(vm)
        newest = self.ns.newest_version(vm) if vm.versioned else None
        if name == "hot_savestate" and newest is not None:
            await self.set_property(newest.id, name, value)  # the factory's current version
        if name == "preserve_history" and value != "1":
            await self.versions.prune(vm.id)

    async def set_volume_policy(self, volume_id: int, policy: str) -> None:
        vm, vol = self.ns.volume_by_id(volume_id)
        async with self.locked(vm.id):
            vm, vol = self.ns.volume_by_id(volume_id)
            check_policy_settable(vm, vol)
            if vol.policy == policy:
                return
            what = f"set {vm.name}/{vol.filename} policy={policy}"
            t = await self.journal.commit(what, lambda tx: tx.set_volume_policy(volume_id, policy))
            self.ns.set_policy(volume_id, policy)
            self.journal.publish(what, t)

    async def vm_usage(self, vm_id: int) -> int:
        """Bytes held only by this VM: what deleting it would free."""
        vm = self.ns.get_by_id(vm_id)
        total = 0
        for vol in list(vm.volumes.values()):
            total += await in_thread(self.engine.exclusive_bytes, vol.id)
        return total

    # domain.xml

    async def set_domain_xml(self, vm_id: int, raw: bytes) -> None:
        """Store a new base description (empty: back to the default), checked first."""
        async with self.locked(vm_id) as vm:
            check_domain_writable(vm)
            xml = domain.check_base(raw) if raw.strip() else None
            what = f"domain.xml of {vm.name} " + ("set" if xml else "reset to the default")
            t = await self.journal.commit(what, lambda tx: tx.set_domain_xml(vm.id, xml))
            self.ns.set_domain_xml(vm.id, xml)
            self.journal.publish(what, t)

    # Reports

    async def pool_usage(self) -> PoolUsage:
        return await in_thread(self.engine.usage)

    async def status_text(self) -> str:
        usage = await self.pool_usage()
        open_intents = len((await in_thread(self.store.load)).open_intents)
        # Both block (a store read; dm-thin asks device-mapper): off the trio thread.
        tree_id = await in_thread(self.store.get_meta, "tree_id")
        detail = await in_thread(self.engine.describe)
        fields: list[tuple[str, object]] = [
            ("engine", self.engine.name),
            ("tree_id", tree_id),
            ("engine_detail", detail),
            ("pool_size", usage.total_bytes),
            ("pool_used", usage.used_bytes),
            ("pool_free", usage.total_bytes - usage.used_bytes),
            *(
                [
                    ("metadata_size", usage.metadata_total_bytes),
                    ("metadata_used", usage.metadata_used_bytes),
                ]
                if usage.metadata_total_bytes
                else []
            ),
            ("libvirt", self.runner.libvirt_status() if self.runner is not None else "none"),
            ("vms", len(self.ns)),
            ("volumes", self.ns.volume_count()),
            ("open_intents", open_intents),
            (
                "recovered_intents",
                len(self.recovery.rolled_back) + len(self.recovery.rolled_forward),
            ),
            (
                "inventory",
                "ok"
                if not self.recovery.differences
                else f"{len(self.recovery.differences)} differences",
            ),
        ]
        fields += [("inventory_difference", d) for d in self.recovery.differences]
        fields += [("intent_left_open", d) for d in self.recovery.left_open]
        return status.render(fields)
