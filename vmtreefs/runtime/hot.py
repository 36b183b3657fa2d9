"""Hot savestates: a VM saved as soon as it is ready, so its disposables start in a moment.

A VM with ``hot_savestate`` set keeps a savestate ``hot``: made when the
property is set and again whenever the VM's disks may have changed (it
stopped, its template got a new version), dropped when the property is
cleared. A running VM is saved in place once ready; otherwise a hidden
instance (``.hot-…``) is booted for it, saved and stopped. Each is made in a
task of its own, one per VM at a time.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from typing import TYPE_CHECKING

import trio

from vmtreefs.errors import VmtreeError
from vmtreefs.rules import console, states
from vmtreefs.rules.names import HOT_LABEL
from vmtreefs.rules.objects import Vm
from vmtreefs.rules.properties import READY_AGENT
from vmtreefs.runtime.commands import Commands
from vmtreefs.runtime.connection import Connection
from vmtreefs.runtime.devices import MAX_CONSOLE_READ, Devices
from vmtreefs.runtime.hypervisor import AGENT_CHANNEL, Hypervisor

if TYPE_CHECKING:
    from vmtreefs.core.tree import VmTree

log = logging.getLogger("vmtreefs.lifecycle")

READY_TIMEOUT = 600.0  # for a hot savestate's boot: TCG on a busy host is slow
AGENT_PING = 5  # seconds libvirt waits for one guest-ping answer
AGENT_POLL = 0.5  # seconds between pings while the agent is not up


class HotSavestates:
    """Makes and drops the tree's hot savestates."""

    def __init__(
        self, tree: VmTree, connection: Connection, devices: Devices, commands: Commands
    ) -> None:
        self.tree = tree
        self.connection = connection
        self.devices = devices
        self.commands = commands
        self.making: set[int] = set()  # VMs whose hot savestate is being made
        self.nursery: trio.Nursery | None = None  # where they are made; set while running

    def changed(self, vm: Vm) -> None:
        """``hot_savestate`` was set (make one now) or cleared (drop the one there is)."""
        if vm.props.get("hot_savestate") == "1":
            self.schedule(vm)
        elif HOT_LABEL in vm.savestates and self.nursery is not None:
            self.nursery.start_soon(self._drop, vm)

    async def _drop(self, vm: Vm) -> None:
        try:
            await self.tree.savestates.delete(vm.id, HOT_LABEL)
        except VmtreeError as e:
            log.warning("VM %s: dropping the hot savestate: %s", vm.name, e.reason)

    def schedule(self, vm: Vm) -> None:
        # A versioned VM's hot savestates are its versions' (a disposable factory).
        if vm.id in self.making or self.nursery is None or vm.volatile or vm.versioned:
            return
        self.making.add(vm.id)
        self.nursery.start_soon(self._make, vm)

    async def _make(self, vm: Vm) -> None:
        """Boot (a hidden instance of) the VM, save it as soon as it is ready, stop it.

        A running VM is saved in place when ready and keeps running.
        """
        started = time.monotonic()
        try:
            hypervisor = await self.connection.require()
            if HOT_LABEL in vm.savestates:
                await self.tree.savestates.delete(vm.id, HOT_LABEL)
            if vm.versioned:
                return  # it became versioned meanwhile: its versions make their own
            if vm.state in (states.RUNNING, states.PAUSED) and not vm.immutable:
                await self.wait_ready(vm)
                async with self.tree.locked(vm.id):
                    await self.commands.save(vm, hypervisor, HOT_LABEL, stop=False)
            else:
                await self._make_with_runner(vm, hypervisor)
            log.info("VM %s: hot savestate made in %.1f s", vm.name, time.monotonic() - started)
        except VmtreeError as e:
            log.error("VM %s: no hot savestate: %s", vm.name, e.describe())
            self.tree.journal.publish(f"{vm.name}: hot savestate failed: {e.reason}", time.time())
        finally:
            self.making.discard(vm.id)

    async def _make_with_runner(self, vm: Vm, hypervisor: Hypervisor) -> None:
        if vm.domain_xml is None:
            self.devices.check_demo_guest()
        runner = await self.tree.make_instance(vm.id, "hot")
        try:
            async with self.tree.locked(runner.id):
                await self.commands.start(runner, hypervisor)
            await self.wait_ready(runner)
            if vm.versioned or vm.id not in self.tree.ns.by_id:
                raise VmtreeError(errno.ECANCELED, f"{vm.name} became versioned or went away")
            async with self.tree.locked(runner.id):
                await self.commands.save(runner, hypervisor, HOT_LABEL, stop=True, owner=vm)
        finally:
            with trio.CancelScope(shield=True):
                if runner.id in self.tree.ns.by_id and runner.state != states.HALTED:
                    # A volatile VM goes when it stops.
                    await self.commands.destroy(runner, hypervisor)
                if runner.id in self.tree.ns.by_id:
                    await self.devices.release(runner)
                    with contextlib.suppress(VmtreeError):
                        await self.tree.delete_vm(runner.id)

    async def wait_ready(self, vm: Vm, timeout: float = READY_TIMEOUT) -> None:
        """Until the VM counts as ready, by its ``ready`` property: console:REGEX,
        delay:SECONDS or agent. EIO when it halts first, ETIMEDOUT after ``timeout``."""
        ready = vm.props.get("ready", "console:VMTREE-READY")
        kind, _, arg = ready.partition(":")
        with trio.move_on_after(timeout) as scope:
            if kind == "delay":
                await trio.sleep(int(arg))
                return
            if ready == READY_AGENT:
                await self._wait_agent(vm)
                return
            try:
                pattern = console.compile_pattern(arg)
            except console.BadPattern as e:  # stored before patterns were RE2's
                raise VmtreeError(
                    errno.EINVAL, f"VM {vm.name}: ready pattern {arg!r} is not an RE2 regex: {e}"
                ) from None

            def console_shows() -> bool:
                text = self.devices.read_console(vm, 0, MAX_CONSOLE_READ)
                return console.found(pattern, text)

            while True:
                if await trio.to_thread.run_sync(console_shows):
                    return
                self._check_running(vm)
                await trio.sleep(0.1)
        if scope.cancelled_caught:
            raise VmtreeError(errno.ETIMEDOUT, f"VM {vm.name} was not ready after {timeout:.0f} s")

    async def _wait_agent(self, vm: Vm) -> None:
        """Until the guest agent answers ``guest-ping``. A domain with no agent channel
        fails at once: no agent could ever answer there."""
        hypervisor = await self.connection.require()
        name = self.devices.domain_name(vm)
        started = time.monotonic()
        while True:
            try:
                answered = await trio.to_thread.run_sync(hypervisor.agent_ping, name, AGENT_PING)
            except VmtreeError as e:
                if e.errno == errno.EINVAL:
                    raise VmtreeError(
                        errno.EINVAL,
                        f"VM {vm.name}: ready is agent but its domain has no guest-agent "
                        f"channel (<channel type='unix'><target type='virtio' "
                        f"name='{AGENT_CHANNEL}'/></channel> in domain.xml)",
                    ) from None
                if e.errno != errno.ENOENT:  # gone: the state says so in a moment
                    raise
                answered = False
            if answered:
                log.info(
                    "VM %s: guest agent answered after %.1f s", vm.name, time.monotonic() - started
                )
                return
            self._check_running(vm)
            await trio.sleep(AGENT_POLL)

    @staticmethod
    def _check_running(vm: Vm) -> None:
        if vm.state == states.HALTED:
            raise VmtreeError(errno.EIO, f"VM {vm.name} stopped before it was ready")
