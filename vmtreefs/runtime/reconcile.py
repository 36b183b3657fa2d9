"""At each (re)connection: the tree takes the states libvirt has, and settles what a crash cut.

While vmtreefs was away (or libvirt was), VMs may have stopped, a daemon may
have died in the middle of a save or a restore, and libvirt may even be
carrying one out still. Before commands may use the connection, saves and
restores that recovery left open are settled (docs/reliability.md), each VM
takes the state libvirt reports (unless an event already told something
newer), and what the stops set off is done.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import TYPE_CHECKING

import trio

from vmtreefs.errors import VmtreeError
from vmtreefs.rules import domain, states
from vmtreefs.rules.names import HOT_LABEL, HOT_RUNNER_PREFIX
from vmtreefs.rules.objects import Savestate, Vm
from vmtreefs.runtime.commands import Commands
from vmtreefs.runtime.devices import Devices
from vmtreefs.runtime.hot import HotSavestates
from vmtreefs.runtime.hypervisor import Hypervisor
from vmtreefs.runtime.vmstate import VmStates

if TYPE_CHECKING:
    from vmtreefs.core.tree import VmTree
    from vmtreefs.store import Intent

log = logging.getLogger("vmtreefs.lifecycle")

JOB_WAIT_SECONDS = 600.0  # a save or restore libvirt carries on after a crash


class Reconciler:
    """Brings the tree's idea of its running VMs in line with libvirt's."""

    def __init__(
        self,
        tree: VmTree,
        hypervisor: Hypervisor,
        devices: Devices,
        vm_states: VmStates,
        commands: Commands,
        hot: HotSavestates,
    ) -> None:
        self.tree = tree
        self.hypervisor = hypervisor
        self.devices = devices
        self.vm_states = vm_states
        self.commands = commands
        self.hot = hot

    async def reconcile(self) -> None:
        """Take the states libvirt has now: VMs that stopped while we were away are halted."""
        serials = self.vm_states.serials()
        prefix = domain.domain_name(self.devices.tree_id, 0)[:-1]
        while (intent := self.tree.recovery.next_deferred()) is not None:
            await self._settle_interrupted(intent)
            self.tree.recovery.settled(intent)
        running = await trio.to_thread.run_sync(self.hypervisor.domains, prefix)
        known: set[str] = set()
        driving = self.vm_states.driving
        for vm in list(self.tree.ns.by_id.values()):
            name = self.devices.domain_name(vm)
            known.add(name)
            state = running.get(name, states.HALTED)
            if state != states.HALTED and vm.id not in self.devices.attached:
                await self.devices.attach(vm)
            if vm.id in driving or self.vm_states.changed_since(vm, serials):
                continue
            was = vm.state
            self.vm_states.set(vm, state)
            if state == states.HALTED and was != states.HALTED and vm.id in self.tree.ns.by_id:
                # It stopped while libvirt (or its connection) was away: what a stop sets
                # off is done, as for a stop event (no commit: how it stopped is unknown).
                self.tree.journal.publish(f"{vm.name} stopped while libvirt was away", time.time())
                await self.vm_states.stopped(vm, "stopped while libvirt was away")
            elif state == states.HALTED:
                await self.devices.release(vm)
        for name in sorted(set(running) - known):
            log.warning("libvirt runs %s, which is not a VM of this tree: left alone", name)
        for vm in list(self.tree.ns.by_id.values()):
            if (
                vm.name.startswith(HOT_RUNNER_PREFIX)
                and vm.state != states.HALTED
                and vm.id not in driving
                and not self.hot.making
            ):
                # Booted to make a hot savestate by a daemon that crashed: nobody will save it.
                log.info("stopping %s, a hot savestate runner a crash left running", vm.name)
                await self.commands.destroy(vm, self.hypervisor)
        for vm in list(self.tree.ns.by_id.values()):
            if vm.props.get("hot_savestate") == "1" and HOT_LABEL not in vm.savestates:
                self.hot.schedule(vm)
            if vm.volatile and vm.state == states.HALTED and vm.id not in driving:
                log.info("volatile VM %s stopped while vmtreefs was away: destroying it", vm.name)
                await self.vm_states.stopped(vm, "stopped while vmtreefs was away")
        await self.tree.collect()
        log.info("libvirt: %d of %d VMs running", sum(1 for n in running if n in known), len(known))

    async def _settle_interrupted(self, intent: Intent) -> None:
        """Finish a save or restore the daemon's crash interrupted.

        libvirt carries on with a save or a restore when its client is gone, so its
        job is waited for first; then the outcome decides. A save whose memory image
        is whole is kept (and the VM runs on, unless it was ``save --stop``); one
        whose image is not is rolled back and the VM, paused for it, resumed. A
        restore whose domain does not run is done again: its volumes may already be
        the savestate's, so only a run makes the VM whole.
        """
        hypervisor = self.hypervisor
        payload = intent.payload
        vm_id = payload["savestate"]["vm_id"] if intent.kind == "save" else payload["vm_id"]
        vm = self.tree.ns.by_id.get(vm_id)
        name = domain.domain_name(self.devices.tree_id, vm_id)
        what = f"interrupted {payload.get('what', intent.kind)}"
        undone = False
        with trio.move_on_after(JOB_WAIT_SECONDS):
            while await trio.to_thread.run_sync(hypervisor.job_running, name):
                log.info("%s: libvirt is still at it, waiting", what)
                await trio.sleep(0.5)
        state = await trio.to_thread.run_sync(hypervisor.state, name)
        if intent.kind == "save":
            saved = payload["savestate"]
            savestate = await self.tree.savestates.settle_interrupted(intent)
            if vm is not None and savestate is not None:
                log.info("%s: libvirt finished the image, the savestate is kept", what)
                if not saved["stop"] and state == states.HALTED:
                    await self._resume_from(vm, savestate, saved["was_paused"])
            elif vm is not None:
                log.info("%s: the image is not whole, the savestate is rolled back", what)
                undone = True
                if state == states.PAUSED and not saved["was_paused"]:
                    await trio.to_thread.run_sync(hypervisor.resume, name)
        elif vm is not None and state == states.HALTED:
            found = [s for s in vm.savestates.values() if s.id == payload["savestate_id"]]
            if found:
                log.info("%s: the VM does not run, restoring it again", what)
                try:
                    await self.commands.restore(vm, hypervisor, found[0].label)
                except VmtreeError as e:
                    log.error("%s: restoring again failed: %s", what, e.describe())
        await trio.to_thread.run_sync(self.tree.journal.complete_intent, intent.id)
        recovery = self.tree.recovery
        (recovery.rolled_back if undone else recovery.rolled_forward).append(what)

    async def _resume_from(self, vm: Vm, savestate: Savestate, paused: bool) -> None:
        """What the interrupted save had still to do: run the VM on from its image."""
        with self.vm_states.driven(vm):
            await self.devices.attach(vm)
            try:
                image = str(self.tree.savestates.image_path(savestate))
                await trio.to_thread.run_sync(
                    functools.partial(self.hypervisor.restore, image, paused=paused)
                )
            except VmtreeError as e:
                await self.devices.release(vm)
                log.error("VM %s: running on after the save failed: %s", vm.name, e.describe())
                return
            self.vm_states.set(vm, states.PAUSED if paused else states.RUNNING)
            self.tree.journal.publish(
                f"{vm.name}: runs on from savestate {savestate.label}", time.time()
            )
