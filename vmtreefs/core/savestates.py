"""Savestates: what the store and the engine keep of a VM's saved RAM and disks.

The lifecycle (``runtime/``) drives the VM through libvirt; these journal and
record what it makes: the volume snapshots taken with the VM paused, under a
``save`` intent that names the memory image still to come; the savestate's
rows; the ``restore`` intent around a restore; deletion.
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio

from vmtreefs.core.journal import Journal, in_thread
from vmtreefs.core.recovery import RecoveryReport, savestate_of
from vmtreefs.core.volumes import Volumes
from vmtreefs.rules.namespace import Namespace
from vmtreefs.rules.objects import SAVED_POLICY, Savestate, Vm, Volume, VolumeSpec
from vmtreefs.store import Intent, Store


@dataclass(frozen=True)
class PendingSavestate:
    """Volume snapshots made for a savestate whose memory image is being written."""

    label: str
    image: str  # file name in the savestate directory
    image_path: str
    intent: int
    specs: tuple[VolumeSpec, ...]
    ids: list[int]
    info: dict[str, Any]


class SavestatesHost(Protocol):
    """What savestates need of the tree (``core.tree.VmTree`` has it)."""

    ns: Namespace
    store: Store
    journal: Journal
    volumes: Volumes
    savestate_dir: Path
    recovery: RecoveryReport

    def locked(self, vm_id: int) -> AbstractAsyncContextManager[Vm]: ...

    async def collect(self) -> None: ...

    def settle_save(self, intent: Intent) -> str: ...


class Savestates:
    """The savestates of one tree."""

    def __init__(self, tree: SavestatesHost) -> None:
        self.tree = tree

    async def settle_interrupted(self, intent: Intent) -> Savestate | None:
        """``VmTree.settle_save`` on a live tree: the savestate kept, or None."""
        outcome = await in_thread(self.tree.settle_save, intent)
        saved = intent.payload["savestate"]
        owner = self.tree.ns.by_id.get(saved["owner_id"])
        if outcome != "recorded" or owner is None:
            return None
        for savestate in owner.savestates.values():
            if savestate.image == saved["image"]:
                return savestate
        rows = (await in_thread(self.tree.store.load)).savestates
        row = next(r for r in rows if r.image == saved["image"])
        savestate = savestate_of(row)
        self.tree.ns.add_savestate(owner.id, savestate)
        self.tree.journal.publish(
            f"recovered: {intent.payload['what']}: libvirt finished the image", time.time()
        )
        return savestate

    async def snapshot(
        self,
        vm: Vm,
        owner: Vm,
        label: str,
        info: dict[str, Any],
        stop: bool,
        was_paused: bool,
        pause: Callable[[], Awaitable[None]],
    ) -> PendingSavestate:
        """Pause the VM (``pause``) and snapshot every volume, journalled with the image
        still to come.

        The intent (kind ``save``) holds all a recovery needs to finish the save if
        libvirt completes the image after a crash: whose savestate, and whether the
        VM was to run on (``stop``, ``was_paused``).
        """
        volumes = sorted(vm.volumes.values(), key=lambda v: v.id)
        specs = tuple(VolumeSpec(v.name, v.size, v.policy) for v in volumes)
        image = f"ss-{vm.id}-{secrets.token_hex(6)}.save"
        image_path = str(self.tree.savestate_dir / image)
        await in_thread(functools.partial(self.tree.savestate_dir.mkdir, exist_ok=True))
        saved = {
            "vm_id": vm.id,
            "owner_id": owner.id,
            "label": label,
            "image": image,
            "info": info,
            "stop": stop,
            "was_paused": was_paused,
        }
        intent, ids = await self.tree.journal.create_volumes(
            f"save {owner.name} {label}",
            specs,
            tuple(v.id for v in volumes),
            (image_path,),
            kind="save",
            extra={"savestate": saved},
            prepare=pause,
        )
        return PendingSavestate(label, image, image_path, intent, specs, ids, info)

    async def defer(self, intent_id: int) -> None:
        """libvirt went away in the middle of a save or a restore, and may finish it
        without us: the intent stays open, and the reconciliation at the next
        connection settles it as after a crash (``runtime.reconcile``)."""
        snapshot = await in_thread(self.tree.store.load)
        for intent in snapshot.open_intents:
            if intent.id == intent_id:
                self.tree.recovery.deferred.append(intent)

    async def abandon(self, pending: PendingSavestate) -> None:
        with trio.CancelScope(shield=True):
            await self.tree.journal.undo_creation(
                pending.intent, pending.ids, (pending.image_path,)
            )

    async def record(self, vm: Vm, pending: PendingSavestate, keep_open: bool = False) -> Savestate:
        """Record the savestate as ``vm``'s (for a hot savestate: the VM it was made for).

        ``keep_open``: the save's intent stays open until :meth:`finish_save`, so that a
        crash before the VM runs again is followed by a resume at the next mount.
        """
        what = f"save {vm.name} {pending.label}"
        info = pending.info

        def commit() -> tuple[int, float, float]:
            with self.tree.store.transaction() as tx:
                created = time.time()
                ss_id = tx.insert_savestate(
                    vm.id,
                    pending.label,
                    created,
                    pending.image,
                    info,
                    {
                        spec.name: (vol_id, spec.size)
                        for spec, vol_id in zip(pending.specs, pending.ids, strict=True)
                    },
                )
                if not keep_open:
                    tx.complete_intent(pending.intent)
                return ss_id, created, self.tree.journal.record_event(tx, what)

        try:
            ss_id, created, t = await in_thread(commit)
        except BaseException:
            await self.abandon(pending)
            raise
        savestate = Savestate(
            ss_id,
            pending.label,
            created,
            pending.image,
            info,
            {
                spec.name: Volume(vol_id, spec.name, spec.size, SAVED_POLICY, created)
                for spec, vol_id in zip(pending.specs, pending.ids, strict=True)
            },
        )
        self.tree.ns.add_savestate(vm.id, savestate)
        self.tree.journal.publish(what, t)
        return savestate

    async def finish_save(self, pending: PendingSavestate) -> None:
        with trio.CancelScope(shield=True):
            await in_thread(self.tree.journal.complete_intent, pending.intent)

    async def begin_restore(self, vm: Vm, savestate: Savestate) -> int:
        """Journal a restore: a crash before the VM runs is followed by the restore at
        the next mount (its volumes may already be the savestate's)."""

        def begin() -> int:
            with self.tree.store.transaction() as tx:
                return tx.begin_intent(
                    "restore",
                    {
                        "what": f"restore {vm.name} {savestate.label}",
                        "vm_id": vm.id,
                        "savestate_id": savestate.id,
                    },
                )

        return await in_thread(begin)

    async def end_restore(self, intent: int) -> None:
        with trio.CancelScope(shield=True):
            await in_thread(self.tree.journal.complete_intent, intent)

    def image_path(self, savestate: Savestate) -> Path:
        return self.tree.savestate_dir / savestate.image

    async def delete(self, vm_id: int, raw_label: str | bytes) -> None:
        async with self.tree.locked(vm_id) as vm:
            label = raw_label.decode() if isinstance(raw_label, bytes) else raw_label
            savestate = self.tree.ns.get_savestate(vm, label)
            ids = [v.id for v in savestate.volumes.values()]
            files = [str(self.image_path(savestate))]
            what = f"rmdir {vm.name}/savestates/{label}"

            intent, t = await self.tree.journal.begin_deletion(
                what, lambda tx: tx.delete_savestate(savestate.id), ids, files
            )
            self.tree.ns.remove_savestate(vm.id, label)
            self.tree.journal.publish(what, t)
            with trio.CancelScope(shield=True):
                await self.tree.journal.finish_deletion(intent, ids, files)
        await self.tree.collect()

    async def restore_volumes(self, vm: Vm, savestate: Savestate) -> None:
        """The VM's volumes become fresh snapshots of the savestate's (the VM is halted)."""
        await self.tree.volumes.swap(
            vm,
            list(savestate.volumes.values()),
            list(vm.volumes.values()),
            f"restore {vm.name} {savestate.label}: volumes",
        )
