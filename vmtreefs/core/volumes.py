"""A VM's volumes: making, deleting, renaming, growing and discarding them, and their data.

Each change is planned by ``rules.volumes``, journalled around its engine work
and recorded with its event line (``core.journal``), then applied to the
namespace. Reads and writes go to the engine's open volume; a write past the
end grows the volume first, without a commit: the first such write opens a
``grow_volume`` intent and the size is recorded when the data is synced (fsync,
close), so a copy into a new volume costs two commits, not two per write. A crash
in between is rolled forward from the engine's size (``core.recovery``).
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
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


@dataclass
class Growth:
    """Writes past a volume's recorded size: their open ``grow_volume`` intent, and the
    size recorded so far (a later sync may finish first; the size never goes back)."""

    intent: int
    recorded: int


class Volumes:
    """The volumes of one tree, and their data."""

    def __init__(self, tree: VolumesHost) -> None:
        self.tree = tree
        # Volume id -> writes past its recorded size, not yet recorded.
        self.growing: dict[int, Growth] = {}

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

    async def resize(self, volume_id: int, new_size: int) -> None:
        """Grow a volume (truncate); it also records a growth by writes still pending."""
        vm, vol = self.tree.ns.volume_by_id(volume_id)
        async with self.tree.locked(vm.id):
            vm, vol = self.tree.ns.volume_by_id(volume_id)
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
                    # The engine's resize was durable and covers what writes reserved.
                    if growth is not None:
                        tx.complete_intent(growth.intent)
                    return self.tree.journal.record_event(tx, what)

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
            growth = self.growing.pop(plan.volume_id, None)
            try:
                t = await in_thread(commit, intent)
            except BaseException:
                if growth is not None:
                    self.growing[plan.volume_id] = growth
                raise
            self.tree.ns.apply_resize_volume(plan)
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
        try:
            return await in_thread(handle.pread, size, offset)
        except OSError as e:
            raise self._io_failure(e, f"read of {size} bytes at {offset}", handle) from None

    async def write(self, handle: OpenVolume, offset: int, data: bytes) -> int:
        """Write, growing the volume first when the write ends past its size."""
        vm, vol = self.tree.ns.volume_by_id(handle.vol_id)
        check_volume_write(self.tree.ns, vm.name, vol.name)
        end = offset + len(data)
        if end > vol.size:
            await self._grow(vol.id, round_up_to_sector(end))
        try:
            return await in_thread(handle.pwrite, data, offset)
        except OSError as e:
            raise self._io_failure(e, f"write of {len(data)} bytes at {offset}", handle) from None

    def _io_failure(self, e: OSError, what: str, handle: OpenVolume) -> VmtreeError:
        """The errno the user gets, with the volume and the I/O named for the log."""
        try:
            label = self._label(handle.vol_id)
        except VmtreeError:
            label = f"volume {handle.vol_id} (gone)"
        return VmtreeError(e.errno or errno.EIO, f"{what} of {label}: {e.strerror or e}")

    async def _grow(self, volume_id: int, new_size: int) -> None:
        """Grow for a write, unrecorded: only the first write past the recorded size
        commits (its intent); the size users see is the new one at once.

        Not written to .vmtree/events: a copy into a new volume would otherwise push
        every other line out."""
        vm, vol = self.tree.ns.volume_by_id(volume_id)
        async with self.tree.locked(vm.id):
            vm, vol = self.tree.ns.volume_by_id(volume_id)
            if vol.size >= new_size:
                return
            plan = plan_resize_volume(self.tree.ns, vm.name, vol.name, new_size)
            if volume_id not in self.growing:
                what = f"grow {vm.name}/{vol.filename} by writes from {vol.size}"

                def begin() -> int:
                    with self.tree.store.transaction() as tx:
                        return tx.begin_intent(
                            "grow_volume", {"what": what, "volume_id": volume_id, "size": vol.size}
                        )

                self.growing[volume_id] = Growth(await in_thread(begin), vol.size)
            await in_thread(self.tree.engine.reserve, volume_id, plan.new_size)
            self.tree.ns.apply_resize_volume(plan)

    async def sync(self, handle: OpenVolume) -> None:
        """fsync: the data, then the size writes grew the volume to, so what an fsync
        acknowledged survives a crash with its size."""
        volume_id = handle.vol_id
        size = self._size_now(volume_id)
        try:
            await in_thread(handle.fsync)
        except OSError as e:
            raise self._io_failure(e, "fsync", handle) from None
        if volume_id in self.growing:
            await self._record_growth(volume_id, size)

    async def close(self, handle: OpenVolume) -> None:
        """Close; a growth still pending (a failed flush) is synced and recorded first."""
        try:
            if handle.writable and handle.vol_id in self.growing:
                await self.sync(handle)
        finally:
            await in_thread(handle.close)

    def _size_now(self, volume_id: int) -> int | None:
        """The volume's size as users see it, None once it is gone."""
        try:
            return self.tree.ns.volume_by_id(volume_id)[1].size
        except VmtreeError:
            return None

    async def _record_growth(self, volume_id: int, synced: int | None) -> None:
        """Record ``synced``, the size before the fsync that made it durable; the intent
        closes unless writes grew the volume further meanwhile."""
        if synced is None or self._size_now(volume_id) is None:
            # Deleted: its deletion settled the engine; only the intent is left.
            gone = self.growing.pop(volume_id, None)
            if gone is not None:
                await in_thread(self.tree.journal.complete_intent, gone.intent)
            return
        vm, vol = self.tree.ns.volume_by_id(volume_id)
        async with self.tree.locked(vm.id):
            growth = self.growing.get(volume_id)
            if growth is None or synced <= growth.recorded:
                return  # a resize or a later sync recorded as much
            done = self._size_now(volume_id) == synced
            # The engine's record first: a crash before the store's leaves the intent
            # open, and recovery finds the engine at least as big.
            await in_thread(self.tree.engine.commit_size, volume_id, synced)

            def commit() -> None:
                with self.tree.store.transaction() as tx:
                    tx.set_volume_size(volume_id, synced)
                    if done:
                        tx.complete_intent(growth.intent)

            await in_thread(commit)
            growth.recorded = synced
            if done:
                del self.growing[volume_id]
            log.debug("grow %s/%s to %d, recorded", vm.name, vol.filename, synced)
