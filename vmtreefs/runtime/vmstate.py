"""Each VM's ``state``, and what a VM's stop sets off.

The state lives in memory (``Vm.state``, written through the namespace) and
changes on libvirt's events and on commands. While a command is carrying a VM
through several libvirt steps it *drives* the VM: events are not applied to it,
and what a stop would set off is left to the command. Every change bumps the
VM's state serial, so that a reconciliation does not undo a newer event, and
wakes whoever waits for a state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import trio

from vmtreefs.errors import VmtreeError
from vmtreefs.rules import states
from vmtreefs.rules.objects import Vm
from vmtreefs.runtime.devices import Devices

if TYPE_CHECKING:
    from vmtreefs.core.tree import VmTree

log = logging.getLogger("vmtreefs.lifecycle")

# The one stop after which a versioned VM's head commits: a clean shutdown. Not after a
# kill, a crash, a failed start or a save: its disks may be half-written.
COMMIT_REASON = "shut down"


class VmStates:
    """The VMs' states, who drives which, and the consequences of a stop."""

    def __init__(
        self, tree: VmTree, devices: Devices, wants_hot_savestate: Callable[[Vm], None]
    ) -> None:
        self.tree = tree
        self.devices = devices
        # A stop changed the VM's disks: its hot savestate is made again (hot.py).
        self.wants_hot_savestate = wants_hot_savestate
        self.driving: set[int] = set()
        # Bumped at every state change: a reconciliation does not undo a newer event.
        self._state_serial: dict[int, int] = {}
        self._changed = trio.Event()
        # Set when what a VM's stop sets off (release, commit, destruction) is done.
        self._settling: dict[int, trio.Event] = {}

    @contextmanager
    def driven(self, vm: Vm) -> Iterator[None]:
        """While inside, the VM's states are the command's, not the events'."""
        self.driving.add(vm.id)
        try:
            yield
        finally:
            self.driving.discard(vm.id)

    def serials(self) -> dict[int, int]:
        """Where each VM's state stands now, for :meth:`changed_since`."""
        return dict(self._state_serial)

    def changed_since(self, vm: Vm, serials: dict[int, int]) -> bool:
        return self._state_serial.get(vm.id) != serials.get(vm.id)

    def set(self, vm: Vm, state: str) -> None:
        if self.tree.ns.set_state(vm, state):
            self._state_serial[vm.id] = self._state_serial.get(vm.id, 0) + 1
            self._changed.set()
            self._changed = trio.Event()
            self.tree.journal.changed.unpark_all()

    async def wait_for(self, vm: Vm, wanted: frozenset[str], timeout: float) -> bool:
        """Wait until the VM is in one of ``wanted``; False on timeout."""
        with trio.move_on_after(timeout):
            while vm.state not in wanted:
                await self._changed.wait()
            return True
        return vm.state in wanted

    def done(self, vm: Vm, result: str) -> str:
        self.tree.journal.publish(f"{vm.name}: {result}", time.time())
        return result

    async def stopped(self, vm: Vm, reason: str) -> None:
        """What a stop sets off: the volumes are released, the head of a versioned VM
        commits (not after a kill or a crash: its disks may be half-written), a volatile
        VM is destroyed, a hot savestate is made again (its disks have changed)."""
        done = self._settling.setdefault(vm.id, trio.Event())
        try:
            await self.devices.release(vm)
            if (
                vm.versioned
                and vm.props.get("commit", "shutdown") == "shutdown"
                and reason == COMMIT_REASON
                and vm.id in self.tree.ns.by_id
            ):
                try:
                    await self.tree.versions.commit_version(vm.id)
                except VmtreeError as e:
                    log.error("VM %s stopped but could not commit: %s", vm.name, e.describe())
                    self.tree.journal.publish(f"{vm.name}: commit failed: {e.reason}", time.time())
            if vm.props.get("hot_savestate") == "1" and not vm.immutable:
                self.wants_hot_savestate(vm)
            if vm.volatile and vm.state == states.HALTED and vm.id in self.tree.ns.by_id:
                try:
                    await self.tree.delete_vm(vm.id)
                except VmtreeError as e:
                    log.error("volatile VM %s stopped but could not be destroyed: %s", vm.name, e)
            await self.tree.collect()
        finally:
            done.set()
            if self._settling.get(vm.id) is done:
                del self._settling[vm.id]

    async def settle_stop(self, vm: Vm, reason: str) -> None:
        """A command saw its VM halt: what the stop sets off is done before it returns
        (unless libvirt's stop event got there first), so a read of a volume right
        after `shutdown` or `kill` sees what the guest wrote."""
        if vm.id in self.devices.attached:
            self.tree.journal.publish(f"{vm.name} stopped: {reason}", time.time())
            await self.stopped(vm, reason)
        elif vm.id in self._settling:
            await self._settling[vm.id].wait()  # libvirt's stop event got there first
