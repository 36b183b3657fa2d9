"""Versioned VMs and template links: commits, history, revert, templates at start.

A version NAME-vN is an immutable replacement linked clone of the head
NAME-next: made like any clone (one engine batch under a journalled intent),
and recorded in one transaction with everything that moves with it (the
system alias NAME, the head's origin, the head's clones, the version row).
The rules are in ``rules.versions``; this carries them out.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import trio

from vmtreefs.core.journal import Journal
from vmtreefs.core.making import NewVm
from vmtreefs.core.runner import Runner
from vmtreefs.core.savestates import Savestates
from vmtreefs.core.volumes import Volumes
from vmtreefs.errors import VmtreeError
from vmtreefs.rules.commands import parse_version
from vmtreefs.rules.names import HOT_LABEL
from vmtreefs.rules.namespace import Namespace
from vmtreefs.rules.objects import Alias, Vm
from vmtreefs.rules.states import HALTED
from vmtreefs.rules.versions import (
    check_template_removable,
    plan_set_template,
    plan_unversion,
    plan_version,
    prunable,
)
from vmtreefs.store import Store, Txn

log = logging.getLogger("vmtreefs.versions")


class VersionsHost(Protocol):
    """What carrying out versions needs of the tree (``core.tree.VmTree`` has it): named
    here, so this module does not import the tree that builds it."""

    ns: Namespace
    store: Store
    alias_lock: trio.Lock
    runner: Runner | None
    on_names_changed: Callable[[list[str]], None]
    journal: Journal
    volumes: Volumes
    savestates: Savestates

    def locked(self, vm_id: int) -> AbstractAsyncContextManager[Vm]: ...

    async def make_vm(self, new: NewVm) -> Vm: ...

    async def delete_vm(self, vm_id: int, verb: str = "rmdir") -> None: ...

    async def collect(self) -> None: ...


class Versions:
    """The versions and templates of one tree."""

    def __init__(self, tree: VersionsHost) -> None:
        self.tree = tree

    async def commit_version(self, head_id: int) -> Vm:
        """Make the next NAME-vN of a head (the first one makes the VM versioned)."""
        async with self.tree.locked(head_id) as head:
            version = await self._commit(head)
        if HOT_LABEL in head.savestates:
            await self.tree.savestates.delete(head.id, HOT_LABEL)  # its versions have their own
        await self.prune(head_id)
        self._after_commit(version)
        return version

    async def _commit(self, head: Vm) -> Vm:
        """The head's lock is held. A running head is paused while its volumes are
        snapshotted, so the version is what its disks held at one instant."""

        ns = self.tree.ns
        base = ns.base_name(head)
        taken = set(ns.by_name) | set(ns.aliases) | ns.reserved

        def number() -> int:
            """The next number whose NAME-vN is free (another VM may hold an old name)."""
            with self.tree.store.transaction() as tx:
                while True:
                    n = tx.next_number(f"version:{head.id}")
                    if f"{base}-v{n}" not in taken:
                        return n

        plan = plan_version(self.tree.ns, head.id, await trio.to_thread.run_sync(number))
        first = not head.versioned
        made: list[Alias] = []

        def extra_writes(tx: Txn, vm_id: int) -> None:
            made.clear()
            if first:
                tx.rename_vm(head.id, plan.head_name)
                tx.set_vm_props(head.id, {**head.props, "versioned": "1"})
            tx.insert_version(vm_id, head.id, plan.number)
            tx.set_vm_origin(head.id, vm_id)
            if plan.alias_id is None:
                created = time.time()
                alias_id = tx.insert_alias(plan.base, vm_id, None, created, system=True)
                made.append(Alias(alias_id, plan.base, vm_id, None, True, created))
            else:
                tx.retarget_alias(plan.alias_id, vm_id, None)

        what = (
            f"versioned {plan.base}: it is {plan.head_name} now, {plan.base} -> {plan.name}"
            if first
            else f"commit {plan.head_name}: {plan.base} -> {plan.name}"
        )
        async with self.tree.alias_lock, self._held_still(head):
            try:
                new = NewVm.of_snapshots(
                    plan.name,
                    what,
                    plan.volumes,
                    plan.origin,
                    plan.props,
                    plan.reparent,
                    head,
                    extra_writes=extra_writes,
                )
                version = await self.tree.make_vm(new)
            finally:
                self.tree.ns.release(plan.head_name)
            self.tree.ns.apply_version(plan, version, made[0] if made else None)
        if first:
            self.tree.on_names_changed([plan.base, plan.head_name])
        return version

    @asynccontextmanager
    async def _held_still(self, vm: Vm) -> AsyncIterator[None]:
        if vm.state == HALTED or self.tree.runner is None:
            yield
            return
        async with self.tree.runner.held_still(vm):
            yield

    async def prune(self, head_id: int) -> None:
        """Without ``preserve_history``, versions older than the newest go (or wait, hidden,
        until what uses them stops)."""
        head = self.tree.ns.by_id.get(head_id)
        if head is None or not head.versioned or head.props.get("preserve_history") == "1":
            return
        for old in prunable(self.tree.ns, head):
            try:
                await self.tree.delete_vm(old.id, "history: drop")
            except VmtreeError as e:
                log.warning("history of %s: keeping %s: %s", head.name, old.name, e.reason)

    def _after_commit(self, version: Vm) -> None:
        """Hot savestates: the new version's own (a disposable factory), and those of the
        VMs whose template now names it."""
        if self.tree.runner is None:
            return
        if version.props.get("hot_savestate") == "1":
            self.tree.runner.hot_savestate_changed(version)
        for vm in list(self.tree.ns.by_id.values()):
            if vm.template is None or vm.props.get("hot_savestate") != "1" or vm.immutable:
                continue
            try:
                template = self.tree.ns.resolve_template(vm)
            except VmtreeError:
                continue
            if template is version:
                self.tree.runner.hot_savestate_changed(vm)

    async def revert(self, head_id: int, raw: str) -> str:
        """``revert vN``: commit what the head holds now, then its volumes become version N's."""
        async with self.tree.locked(head_id) as head:
            if not head.versioned:
                raise VmtreeError(errno.EINVAL, f"revert: VM {head.name!r} is not versioned")
            if head.state != HALTED:
                raise VmtreeError(
                    errno.EBUSY, f"cannot revert VM {head.name!r}: it is {head.state}, not halted"
                )
            parse_version(raw)
            target = self.tree.ns.by_name.get(f"{self.tree.ns.base_name(head)}-{raw}")
            if target is None or target.version_of != head.id:
                raise VmtreeError(errno.ENOENT, f"{head.name!r} has no version {raw}")
            before = await self._commit(head)
            await self.tree.volumes.swap(
                head,
                list(target.volumes.values()),
                list(head.volumes.values()),
                f"revert {head.name} to {target.name} (what it held is {before.name})",
            )
        await self.prune(head_id)
        self._after_commit(before)
        return f"reverted to {target.name}; what it held before is {before.name}"

    async def unversion(self, head_id: int) -> None:
        """Clearing ``versioned``: NAME-next is NAME again; its versions are kept as
        immutable VMs of their own (``preserve_history`` 1) or deleted."""
        async with self.tree.locked(head_id) as head, self.tree.alias_lock:
            plan = plan_unversion(self.tree.ns, head_id)
            head_name = head.name
            kept = "kept" if plan.keep_history else "deleted"
            what = f"unversioned {plan.base}: {head.name} is {plan.base} again, versions {kept}"
            props = {k: v for k, v in head.props.items() if k != "versioned"}

            def write(tx: Txn) -> None:
                for alias_id in plan.retarget:
                    tx.retarget_alias(alias_id, head.id, None)
                if plan.alias_id is not None:
                    tx.delete_alias(plan.alias_id)
                tx.rename_vm(head.id, plan.base)
                tx.set_vm_props(head.id, props)
                for vm_id in plan.versions:
                    tx.forget_version(vm_id)

            t = await self.tree.journal.commit(what, write)
            self.tree.ns.apply_unversion(plan)
            self.tree.on_names_changed([plan.base, head_name])
            self.tree.journal.publish(what, t)
        if not plan.keep_history:
            for vm_id in plan.versions:
                try:
                    await self.tree.delete_vm(vm_id, "history: drop")
                except VmtreeError as e:
                    log.warning("unversioned %s: keeping VM %d: %s", plan.base, vm_id, e.reason)

    # Templates

    async def set_template(self, vm_id: int, raw_target: str | bytes) -> None:
        async with self.tree.locked(vm_id) as vm, self.tree.alias_lock:
            link = plan_set_template(self.tree.ns, vm_id, raw_target)
            what = f"ln -s ../{self.tree.ns.template_name(link)} {vm.name}/template"
            t = await self.tree.journal.commit(
                what, lambda tx: tx.set_template(vm.id, link.target_vm, link.target_alias)
            )
            self.tree.ns.set_template(vm.id, link)
            self.tree.journal.publish(what, t)

    async def remove_template(self, vm_id: int) -> None:
        async with self.tree.locked(vm_id) as vm:
            check_template_removable(self.tree.ns, vm_id)
            what = f"rm {vm.name}/template"
            t = await self.tree.journal.commit(what, lambda tx: tx.set_template(vm.id, None, None))
            self.tree.ns.set_template(vm.id, None)
            self.tree.journal.publish(what, t)
        await self.tree.collect()

    async def refresh_template_volumes(self, vm: Vm) -> None:
        """At a start: the ``template`` volumes become snapshots of the template's, from the
        version its alias names now (the VM's lock is held)."""
        template = self.tree.ns.resolve_template(vm)
        if template is None:
            return
        sources = [
            template.volumes[v.name]
            for v in sorted(vm.volumes.values(), key=lambda v: v.name)
            if v.policy == "template" and v.name in template.volumes
        ]
        if sources:
            names = ", ".join(v.filename for v in sources)
            # A template that runs (a link to a plain VM or a head) is held still meanwhile.
            async with self._held_still(template):
                await self.tree.volumes.swap(
                    vm,
                    sources,
                    [vm.volumes[v.name] for v in sources],
                    f"start {vm.name}: {names} from template {template.name}",
                )
        await self.set_template_used(vm, template.id)

    async def set_template_used(self, vm: Vm, used: int | None) -> None:
        """Which version a template-based VM runs from: that version is kept while it runs."""
        if vm.template is None or vm.template_used == used:
            return

        def commit() -> None:
            with self.tree.store.transaction() as tx:
                tx.set_template_used(vm.id, used)

        await trio.to_thread.run_sync(commit)
        self.tree.ns.set_template_used(vm.id, used)
