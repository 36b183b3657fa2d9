"""Running VMs: the ctl commands that start and stop them, and their ``state``.

A VM's state lives in memory (``Vm.state``) and follows libvirt's lifecycle
events, which arrive from the hypervisor's event thread through a trio channel;
a command waiting for a VM to stop waits for that event, not on a timer. At
(re)connection the states are read once from libvirt, so a VM that stopped
while vmtreefs was down is seen as halted.

:class:`Lifecycle` is what the rest of vmtreefs holds (the daemon runs it, the
FUSE layer reads consoles, ``control`` hands it commands, the tree holds it as
its ``core.runner.Runner``); it wires the parts, each a module of its own:
``connection`` (keeping it, events into trio), ``devices`` (disks, consoles,
domain descriptions), ``vmstate`` (states, and what a stop sets off),
``commands``, ``hot`` (hot savestates) and ``reconcile`` (each connection's
start, and what a crash cut short). Events are applied here.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from vmtreefs.errors import VmtreeError
from vmtreefs.rules import domain, states
from vmtreefs.rules.commands import Command
from vmtreefs.rules.objects import Vm
from vmtreefs.runtime.commands import Commands
from vmtreefs.runtime.connection import Connection
from vmtreefs.runtime.devices import Devices
from vmtreefs.runtime.hot import HotSavestates
from vmtreefs.runtime.hypervisor import DomainEvent, Hypervisor
from vmtreefs.runtime.reconcile import Reconciler
from vmtreefs.runtime.vmstate import VmStates

if TYPE_CHECKING:
    from vmtreefs.core.tree import VmTree

log = logging.getLogger("vmtreefs.lifecycle")


class Lifecycle:
    """Starts, stops and watches the tree's VMs through one :class:`Hypervisor`."""

    def __init__(
        self,
        tree: VmTree,
        hypervisor: Hypervisor | None,
        run_dir: Path,
        guest_dir: Path,
        accel: str = "auto",
    ) -> None:
        self.tree = tree
        self.hypervisor = hypervisor
        self.tree_id = tree.store.get_meta("tree_id") or "0"
        self.connection = Connection(hypervisor)
        self.settled = self.connection.settled
        self.devices = Devices(tree, self.tree_id, run_dir, guest_dir, accel)
        self.vm_states = VmStates(tree, self.devices, self._wants_hot_savestate)
        self.commands = Commands(tree, self.connection, self.devices, self.vm_states)
        self.hot = HotSavestates(tree, self.connection, self.devices, self.commands)
        self.reconciler = (
            Reconciler(tree, hypervisor, self.devices, self.vm_states, self.commands, self.hot)
            if hypervisor is not None
            else None
        )

    # What the FUSE layer shows

    def read_console(self, vm: Vm, offset: int, size: int) -> bytes:
        return self.devices.read_console(vm, offset, size)

    def console_size(self, vm: Vm) -> int:
        return self.devices.console_size(vm)

    def default_domain_xml_now(self) -> str:
        return self.devices.default_domain_xml_now()

    async def base_domain_xml(self, vm: Vm) -> str:
        return await self.devices.base_domain_xml(vm)

    # What control and the tree ask

    async def run_command(self, vm: Vm, command: Command) -> str:
        return await self.commands.run_command(vm, command)

    def hot_savestate_changed(self, vm: Vm) -> None:
        self.hot.changed(vm)

    def held_still(self, vm: Vm) -> AbstractAsyncContextManager[None]:
        return self.commands.held_still(vm)

    def libvirt_status(self) -> str:
        if self.hypervisor is None:
            return "none"
        if self.connection.connected.is_set():
            return "connected"
        return f"not connected to {self.hypervisor.uri} (retrying)"

    def _wants_hot_savestate(self, vm: Vm) -> None:
        self.hot.schedule(vm)

    # The event pump

    async def run(self) -> None:
        """Connect (again after a drop) and apply events until cancelled."""
        self.connection.listen()
        await self.tree.prune_histories()
        if self.reconciler is None:
            await self.tree.collect()
            self.settled.set()
            return
        reconcile = self.reconciler.reconcile
        async with trio.open_nursery() as nursery:
            self.hot.nursery = nursery
            nursery.start_soon(self.connection.keep, reconcile)
            async for event in self.connection.events:
                if event.state == "disconnected":
                    self.connection.lost()
                    nursery.start_soon(self.connection.keep, reconcile)
                    continue
                self._apply(event, nursery)

    def _apply(self, event: DomainEvent, nursery: trio.Nursery) -> None:
        vm_id = domain.parse_domain_name(self.tree_id, event.name)
        vm = self.tree.ns.by_id.get(vm_id) if vm_id is not None else None
        if vm is None or vm.id in self.vm_states.driving:
            return  # a command carrying the VM through several steps sets its states
        nursery.start_soon(self._confirm, vm, event)

    async def _confirm(self, vm: Vm, event: DomainEvent) -> None:
        """Take the state libvirt gives now, not the event's: events of a command's
        steps (a save stops the domain, the restore starts it again) can arrive
        after the command is done, and must not undo it."""
        assert self.hypervisor is not None
        try:
            actual = await trio.to_thread.run_sync(
                self.hypervisor.state, self.devices.domain_name(vm)
            )
        except VmtreeError as e:
            log.warning("VM %s: asking libvirt its state: %s", vm.name, e.reason)
            actual = event.state
        if vm.id in self.vm_states.driving or vm.id not in self.tree.ns.by_id:
            return
        if vm.state != actual:
            reason = event.reason if actual == event.state else f"libvirt says {actual}"
            log.info("VM %s: %s (%s)", vm.name, actual, reason)
            self.vm_states.set(vm, actual)
        # What a stop sets off waits for libvirt's stop event itself, with its reason.
        if actual == event.state == states.HALTED and vm.id in self.devices.attached:
            self.tree.journal.publish(f"{vm.name} stopped: {event.reason}", time.time())
            await self.vm_states.stopped(vm, event.reason)
