"""Aliases, the symlinks at the top level: making, removing and renaming them.

Each is one plan of ``rules.aliases`` and one store transaction. They run under
the tree's alias lock, so that no alias is made, moved or dropped while the VM
it names is being deleted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import trio

from vmtreefs.core.journal import Journal, in_thread
from vmtreefs.rules.aliases import plan_create_alias, plan_remove_alias, plan_rename_alias
from vmtreefs.rules.namespace import Namespace
from vmtreefs.rules.objects import Alias
from vmtreefs.rules.plans import ReplaceAlias
from vmtreefs.store import Store, Txn


class AliasesHost(Protocol):
    """What alias work needs of the tree (``core.tree.VmTree`` has it)."""

    ns: Namespace
    store: Store
    journal: Journal
    alias_lock: trio.Lock
    on_names_changed: Callable[[list[str]], None]


class Aliases:
    """The aliases of one tree."""

    def __init__(self, tree: AliasesHost) -> None:
        self.tree = tree

    async def create(self, raw_name: str | bytes, raw_target: str | bytes) -> Alias:
        async with self.tree.alias_lock:
            return await self._create(raw_name, raw_target)

    async def _create(self, raw_name: str | bytes, raw_target: str | bytes) -> Alias:
        plan = plan_create_alias(self.tree.ns, raw_name, raw_target)
        target = (
            self.tree.ns.get_by_id(plan.target_vm).name
            if plan.target_vm is not None
            else self.tree.ns.aliases_by_id[plan.target_alias or 0].name
        )
        what = f"ln -s {target} {plan.name}"

        def commit() -> tuple[int, float, float]:
            with self.tree.store.transaction() as tx:
                created = time.time()
                alias_id = tx.insert_alias(plan.name, plan.target_vm, plan.target_alias, created)
                return alias_id, created, self.tree.journal.record_event(tx, what)

        try:
            alias_id, created, t = await in_thread(commit)
        except BaseException:
            self.tree.ns.release(plan.name)
            raise
        alias = Alias(alias_id, plan.name, plan.target_vm, plan.target_alias, False, created)
        self.tree.ns.add_alias(alias)
        self.tree.journal.publish(what, t)
        return alias

    async def remove(self, name: str) -> None:
        async with self.tree.alias_lock:
            await self._remove(name)

    async def _remove(self, name: str) -> None:
        plan = plan_remove_alias(self.tree.ns, name)
        what = f"rm {name}"

        t = await self.tree.journal.commit(what, lambda tx: tx.delete_alias(plan.alias_id))
        self.tree.ns.remove_alias(plan.alias_id)
        self.tree.journal.publish(what, t)

    async def rename(self, old: str, raw_new: str | bytes) -> None:
        """Rename an alias, or move it over another (``ln -sfn``), atomically."""
        async with self.tree.alias_lock:
            await self._rename(old, raw_new)

    async def _rename(self, old: str, raw_new: str | bytes) -> None:
        plan = plan_rename_alias(self.tree.ns, old, raw_new)
        if isinstance(plan, ReplaceAlias):
            target = self.tree.ns.alias_target_name(self.tree.ns.get_alias(old))
            what = f"mv {old} {plan.name} (now names {target})"

            def replace(tx: Txn) -> None:
                for alias_id in plan.retarget:
                    tx.retarget_alias(alias_id, None, plan.keep_id)
                tx.delete_alias(plan.drop_id)
                tx.rename_alias(plan.keep_id, plan.name)

            t = await self.tree.journal.commit(what, replace)
            self.tree.ns.apply_replace_alias(plan)
        else:
            if plan.new == plan.old:
                return
            what = f"mv {plan.old} {plan.new}"

            try:
                t = await self.tree.journal.commit(
                    what, lambda tx: tx.rename_alias(plan.alias_id, plan.new)
                )
            except BaseException:
                self.tree.ns.release(plan.new)
                raise
            self.tree.ns.apply_rename_alias(plan)
        self.tree.journal.publish(what, t)
