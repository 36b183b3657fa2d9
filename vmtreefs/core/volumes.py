"""A VM's volumes: making, deleting, renaming, growing and discarding them, and their data.

Each change is planned by ``rules.volumes``, journalled around its engine work
and recorded with its event line (``core.journal``), then applied to the
namespace. Reads and writes go to the engine's open volume; a write past the
end grows the volume first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import trio

from vmtreefs.core.journal import Journal, in_thread
from vmtreefs.engine.base import OpenVolume, SnapshotEngine
from vmtreefs.engine.select import format_size
from vmtreefs.errors import VmtreeError
from vmtreefs.rules import blockmap
from vmtreefs.rules.names import VOLUME_SUFFIX, round_up_to_sector
from vmtreefs.rules.namespace import Namespace
from vmtreefs.rules.objects import Vm, Volume, VolumeSpec
from vmtreefs.rules.volumes import (
    check_volume_write,
    plan_create_volume,
    plan_delete_volume,
    plan_rename_volume,
    plan_resize_volume,
)
from vmtreefs.store import Store

log = logging.getLogger("vmtreefs.tree")


class VolumesHost(Protocol):
    """What volume work needs of the tree (``core.tree.VmTree`` has it)."""

    ns: Namespace
    store: Store
    engine: SnapshotEngine
    journal: Journal
    on_volumes_written_outside: Callable[[list[int]], None]
    on_volumes_replaced: Callable[[int, list[str]], None]

    def locked(self, vm_id: int) -> AbstractAsyncContextManager[Vm]: ...


class Volumes:
    """The volumes of one tree, and their data."""

    def __init__(self, tree: VolumesHost) -> None:
        self.tree = tree

    async def create(self, vm_id: int, raw_filename: str | bytes) -> Volume:
        async with self.tree.locked(vm_id) as vm:
            plan = plan_create_volume(self.tree.ns, vm.name, raw_filename)
            what = f"create {vm.name}/{plan.spec.name}{VOLUME_SUFFIX}"
            intent, ids = await self.tree.journal.create_volumes(what, (plan.spec,))

            def commit() -> tuple[float, float]:
                with self.tree.store.transaction() as tx:
                    created = time.time()
                    tx.insert_volume(
                        ids[0], vm.id, plan.spec.name, plan.spec.size, plan.spec.policy, created
                    )
                    tx.complete_intent(intent)
                    return created, self.tree.journal.record_event(tx, what)

            created, t = await self.tree.journal.or_undo(intent, ids, commit)
            volume = Volume(ids[0], plan.spec.name, plan.spec.size, plan.spec.policy, created)
            self.tree.ns.add_volume(vm.id, volume)
            self.tree.journal.publish(what, t)
            return volume

    async def delete(self, volume_id: int) -> None:
        vm, vol = self.tree.ns.volume_by_id(volume_id)
        async with self.tree.locked(vm.id):
            vm, vol = self.tree.ns.volume_by_id(volume_id)
            plan = plan_delete_volume(self.tree.ns, vm.name, vol.name)
            what = f"rm {vm.name}/{vol.filename}"

            intent, t = await self.tree.journal.begin_deletion(
                what, lambda tx: tx.delete_volume(plan.volume_id), [plan.volume_id]
            )
            self.tree.ns.remove_volume(vm.id, vol.name)
            self.tree.journal.publish(what, t)
            with trio.CancelScope(shield=True):
                await self.tree.journal.finish_deletion(intent, [plan.volume_id])

    async def rename(self, volume_id: int, raw_new_filename: str | bytes) -> None:
        vm, vol = self.tree.ns.volume_by_id(volume_id)
        async with self.tree.locked(vm.id):
            vm, vol = self.tree.ns.volume_by_id(volume_id)
            plan = plan_rename_volume(self.tree.ns, vm.name, vol.name, raw_new_filename)
            if plan.new == plan.old:
                return
            what = f"mv {vm.name}/{plan.old}{VOLUME_SUFFIX} {plan.new}{VOLUME_SUFFIX}"
            t = await self.tree.journal.commit(
                what, lambda tx: tx.rename_volume(plan.volume_id, plan.new)
            )
            self.tree.ns.apply_rename_volume(plan)
            self.tree.journal.publish(what, t)

    async def resize(self, volume_id: int, new_size: int, at_least: bool = False) -> None:
        """Grow a volume; with ``at_least`` a volume already that big is left alone.

        Growth caused by a write (``at_least``) is not written to .vmtree/events: a
        copy into a new volume would otherwise push every other line out.
        """
        vm, vol = self.tree.ns.volume_by_id(volume_id)
        async with self.tree.locked(vm.id):
            vm, vol = self.tree.ns.volume_by_id(volume_id)
            if at_least and vol.size >= new_size:
                return
            plan = plan_resize_volume(self.tree.ns, vm.name, vol.name, new_size)
            if plan.new_size == plan.old_size:
                return
            what = f"grow {vm.name}/{vol.filename} to {plan.new_size}"

            def begin() -> int:
                with self.tree.store.transaction() as tx:
                    return tx.begin_intent(
                        "resize_volume",
                        {"what": what, "volume_id": plan.volume_id, "size": plan.new_size},
                    )

            def abandon(intent: int) -> None:
                with self.tree.store.transaction() as tx:
                    tx.complete_intent(intent)

            def commit(intent: int) -> float:
                with self.tree.store.transaction() as tx:
                    tx.set_volume_size(plan.volume_id, plan.new_size)
                    tx.complete_intent(intent)
                    return self.tree.journal.record_event(tx, what) if not at_least else time.time()

            intent = await in_thread(begin)
            try:
                await in_thread(self.tree.engine.resize, plan.volume_id, plan.new_size)
            except VmtreeError:
                # Abandon only when the engine really did not grow (a failed fsync may
                # come after the new size is in place).
                grown = await in_thread(self.tree.engine.size, plan.volume_id)
                if grown < plan.new_size:
                    await in_thread(abandon, intent)
                    raise
                log.warning("%s: the engine reported an error but grew; recording it", what)
            # From here the engine has grown: a failed commit leaves the intent open, and
            # the next mount rolls it forward.
            t = await in_thread(commit, intent)
            self.tree.ns.apply_resize_volume(plan)
            if at_least:
                log.debug("%s", what)
            else:
                self.tree.journal.publish(what, t)

    async def discard(self, volume_id: int) -> None:
        """Make a volume read as zeros again, keeping its size (an O_TRUNC open: cp, >)."""
        vm, vol = self.tree.ns.volume_by_id(volume_id)
        async with self.tree.locked(vm.id):
            vm, vol = self.tree.ns.volume_by_id(volume_id)
            check_volume_write(self.tree.ns, vm.name, vol.name)
            what = f"discard {vm.name}/{vol.filename}"
            size = vol.size

            def begin() -> int:
                with self.tree.store.transaction() as tx:
                    return tx.begin_intent(
                        "discard_volume", {"what": what, "volume_id": volume_id, "size": size}
                    )

            def carry_out(intent: int) -> float:
                self.tree.engine.discard(volume_id, size)
                with self.tree.store.transaction() as tx:
                    tx.complete_intent(intent)
                    return self.tree.journal.record_event(tx, what)

            intent = await in_thread(begin)
            t = await in_thread(carry_out, intent)
            self.tree.journal.publish(what, t)

    async def swap(self, vm: Vm, sources: list[Volume], old: list[Volume], what: str) -> None:
        """Replace ``old`` volumes of a halted VM with fresh snapshots of ``sources``,
        in one transaction: a crash leaves either all the old ones or all the new ones."""
        saved = sorted(sources, key=lambda v: v.id)
        policies = {v.name: v.policy for v in vm.volumes.values()}
        specs = tuple(VolumeSpec(v.name, v.size, policies.get(v.name, v.policy)) for v in saved)
        intent, ids = await self.tree.journal.create_volumes(
            what, specs, tuple(v.id for v in saved)
        )

        def commit() -> tuple[int, float]:
            with self.tree.store.transaction() as tx:
                for volume in old:
                    tx.delete_volume(volume.id)
                for vol_id, spec in zip(ids, specs, strict=True):
                    tx.insert_volume(vol_id, vm.id, spec.name, spec.size, spec.policy, created)
                deletion = tx.begin_intent(
                    "delete_volumes", {"what": what, "volume_ids": [v.id for v in old]}
                )
                tx.complete_intent(intent)
                return deletion, self.tree.journal.record_event(tx, what)

        created = time.time()
        deletion, t = await self.tree.journal.or_undo(intent, ids, commit)
        for volume in old:
            self.tree.ns.remove_volume(vm.id, volume.name)
        for vol_id, spec in zip(ids, specs, strict=True):
            self.tree.ns.add_volume(
                vm.id, Volume(vol_id, spec.name, spec.size, spec.policy, created)
            )
        self.tree.on_volumes_written_outside([v.id for v in old])
        self.tree.on_volumes_replaced(
            vm.id, [v.filename for v in old] + [s.name + VOLUME_SUFFIX for s in specs]
        )
        self.tree.journal.publish(what, t)
        with trio.CancelScope(shield=True):
            await self.tree.journal.finish_deletion(deletion, [v.id for v in old])

    async def open(self, volume_id: int, writable: bool) -> OpenVolume:
        vm, vol = self.tree.ns.volume_by_id(volume_id)
        if writable:
            check_volume_write(self.tree.ns, vm.name, vol.name)
        return await in_thread(self.tree.engine.open, volume_id, writable)

    async def open_saved(self, volume_id: int) -> OpenVolume:
        """A savestate's volume, for reading (backups read these)."""
        self.tree.ns.savestate_volume_by_id(volume_id)
        return await in_thread(self.tree.engine.open, volume_id, False)

    def _label(self, volume_id: int) -> str:
        """VM/VOL.img, or VM@LABEL/VOL.img for a savestate's volume, for the log."""
        vm, savestate, volume = self.tree.ns.any_volume_by_id(volume_id)
        where = vm.name if savestate is None else f"{vm.name}@{savestate.label}"
        return f"{where}/{volume.filename}"

    async def change_map(self, volume_id: int, other_id: int) -> bytes:
        """``VOL.changes/OTHER``: where the volume may differ from the other one."""
        ranges = await in_thread(self.tree.engine.changed_ranges, volume_id, other_id)
        log.info(
            "change map of %s against %s: %d ranges, %s",
            self._label(volume_id),
            self._label(other_id),
            len(ranges),
            format_size(sum(length for _, length in ranges)),
        )
        return blockmap.text(ranges).encode()

    async def read(self, handle: OpenVolume, offset: int, size: int) -> bytes:
        """Cached data is copied on the loop; only a read that may wait goes to a thread."""
        if handle.cached(size, offset):
            return handle.pread(size, offset)
        return await in_thread(handle.pread, size, offset)

    async def write(self, handle: OpenVolume, offset: int, data: bytes) -> int:
        """Write, growing the volume first when the write ends past its size."""
        vm, vol = self.tree.ns.volume_by_id(handle.vol_id)
        check_volume_write(self.tree.ns, vm.name, vol.name)
        end = offset + len(data)
        if end > vol.size:
            await self.resize(vol.id, round_up_to_sector(end), at_least=True)
        return await in_thread(handle.pwrite, data, offset)
