"""The lifecycle commands of ``ctl``: start, shutdown, kill, pause, resume, save, restore,
and the instances and disposables a VM runs as.

Each command checks its arguments and the VM's state first (``rules``), then
drives the VM through libvirt. A start and a restore carry a halted VM to
running: on a failure its volumes are released and it is halted again. A
command that sees its VM halt does what the stop sets off before it returns.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, NoReturn

import trio

from vmtreefs import saveimage
from vmtreefs.core.journal import LeftOpen
from vmtreefs.errors import VmtreeError
from vmtreefs.rules import commands, domain, states
from vmtreefs.rules.commands import Command
from vmtreefs.rules.names import HOT_LABEL
from vmtreefs.rules.objects import Savestate, Vm
from vmtreefs.runtime.connection import Connection
from vmtreefs.runtime.devices import Devices
from vmtreefs.runtime.hypervisor import Hypervisor
from vmtreefs.runtime.vmstate import COMMIT_REASON, VmStates

if TYPE_CHECKING:
    from vmtreefs.core.tree import VmTree

log = logging.getLogger("vmtreefs.lifecycle")


def libvirt_lost(error: BaseException) -> bool:
    """The error says libvirt went away (libvirtd died or restarted) during the call."""
    return isinstance(error, VmtreeError) and error.errno == errno.ENOTCONN


def reason_of(error: BaseException) -> str:
    return error.reason if isinstance(error, VmtreeError) else str(error)


class Commands:
    """Carries out the lifecycle commands on the tree's VMs."""

    def __init__(
        self, tree: VmTree, connection: Connection, devices: Devices, vm_states: VmStates
    ) -> None:
        self.tree = tree
        self.connection = connection
        self.devices = devices
        self.vm_states = vm_states

    async def run_command(self, vm: Vm, command: Command) -> str:
        verb = command.verb
        if verb == "shutdown":
            timeout = commands.parse_shutdown_args(command.args)
        elif verb == "save":
            label, stop = commands.parse_save_args(command.args)
        elif verb == "restore":
            label = commands.parse_restore_args(command.args)
        else:
            commands.check_no_args(verb, command.args)
        states.check_command(vm.name, verb, vm.state)
        hypervisor = await self.connection.require()
        if (verb == "start" and vm.immutable) or verb == "disposable":
            return await self.start_instance(
                vm, hypervisor, "disp" if verb == "disposable" else "inst"
            )
        if verb == "save":
            return await self.save(vm, hypervisor, label, stop)
        if verb == "restore":
            return await self.restore(vm, hypervisor, label)
        if verb == "start":
            return await self.start(vm, hypervisor)
        if verb == "shutdown":
            return await self.shutdown(vm, hypervisor, timeout)
        if verb == "kill":
            return await self.kill(vm, hypervisor)
        if verb == "pause":
            await trio.to_thread.run_sync(hypervisor.suspend, self.devices.domain_name(vm))
            self.vm_states.set(vm, states.PAUSED)
            return self.vm_states.done(vm, states.PAUSED)
        if verb == "resume":
            await trio.to_thread.run_sync(hypervisor.resume, self.devices.domain_name(vm))
            self.vm_states.set(vm, states.RUNNING)
            return self.vm_states.done(vm, states.RUNNING)
        raise VmtreeError(errno.EINVAL, f"{verb!r} is not a lifecycle command")

    # Starting

    async def start_instance(self, source: Vm, hypervisor: Hypervisor, kind: str) -> str:
        """An immutable VM runs as ``NAME-instN``; any halted VM as a disposable ``NAME-dispN``.

        The instance is a linked clone made for the run; a disposable is volatile,
        so it goes with its volumes as soon as it stops.
        """
        hot = source.savestates.get(HOT_LABEL)
        if source.domain_xml is None and hot is None:
            self.devices.check_demo_guest()
        instance = await self.tree.make_instance(source.id, kind)
        try:
            async with self.tree.locked(instance.id):
                if hot is not None:
                    await self._restore_as(instance, hypervisor, hot)
                else:
                    await self.start(instance, hypervisor)
        except BaseException as e:
            if libvirt_lost(e):
                # libvirt may start it yet: the reconciliation keeps it running or removes it.
                raise VmtreeError(
                    errno.ENOTCONN,
                    f"VM {instance.name}: libvirt went away while it started ({reason_of(e)}); "
                    "once "
                    "libvirt is back it runs, or it is gone with its volumes",
                ) from None
            if instance.volatile:
                with trio.CancelScope(shield=True):
                    await self.tree.delete_vm(instance.id)
            raise
        return instance.name

    async def start(self, vm: Vm, hypervisor: Hypervisor) -> str:
        if vm.immutable:
            raise VmtreeError(errno.EROFS, f"cannot start VM {vm.name!r} itself: it is immutable")
        if vm.domain_xml is None:
            self.devices.check_demo_guest()
        await self.tree.versions.refresh_template_volumes(vm)
        await self.devices.reset_volatile_volumes(vm)
        async with self._starting(vm):
            base = await self.devices.base_domain_xml(vm)
            disks = await self.devices.attach(vm)
            xml = domain.render(
                base,
                self.devices.identity(vm),
                int(vm.props.get("memory", "256")),
                int(vm.props.get("vcpus", "1")),
                disks,
            )
            await trio.to_thread.run_sync(self.devices.fresh_console, vm)
            await trio.to_thread.run_sync(hypervisor.create, xml)
        if vm.state == states.STARTING:
            self.vm_states.set(vm, states.RUNNING)
        self.vm_states.done(vm, "started")
        return vm.name

    @asynccontextmanager
    async def _starting(self, vm: Vm) -> AsyncIterator[None]:
        """Carry a halted VM to running: on any failure its volumes are released and
        it is halted again; libvirt's events wait until it is done."""
        with self.vm_states.driven(vm):
            self.vm_states.set(vm, states.STARTING)
            try:
                yield
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.devices.release(vm)
                    self.vm_states.set(vm, states.HALTED)
                raise

    # Stopping

    async def shutdown(self, vm: Vm, hypervisor: Hypervisor, timeout: int) -> str:
        name = self.devices.domain_name(vm)
        if vm.state == states.PAUSED:
            await trio.to_thread.run_sync(hypervisor.resume, name)
        await trio.to_thread.run_sync(hypervisor.shutdown, name)
        self.vm_states.set(vm, states.STOPPING)
        log.info("VM %s: asked to shut down, waiting up to %d s", vm.name, timeout)
        if await self.vm_states.wait_for(vm, frozenset({states.HALTED}), timeout):
            await self.vm_states.settle_stop(vm, COMMIT_REASON)
            return states.HALTED
        log.warning("VM %s did not shut down within %d s: forcing it off", vm.name, timeout)
        await self.destroy(vm, hypervisor)
        return self.vm_states.done(vm, f"halted: forced off after {timeout} s")

    async def kill(self, vm: Vm, hypervisor: Hypervisor) -> str:
        await self.destroy(vm, hypervisor)
        return states.HALTED  # the stop event was announced

    async def destroy(self, vm: Vm, hypervisor: Hypervisor) -> None:
        try:
            await trio.to_thread.run_sync(hypervisor.destroy, self.devices.domain_name(vm))
        except VmtreeError as e:
            if e.errno != errno.ENOENT:
                raise
            self.vm_states.set(vm, states.HALTED)
        await self.vm_states.wait_for(vm, frozenset({states.HALTED}), 30)
        if vm.state != states.HALTED:
            # The event did not come (libvirt went away): ask once.
            state = await trio.to_thread.run_sync(hypervisor.state, self.devices.domain_name(vm))
            self.vm_states.set(vm, state)
        if vm.state == states.HALTED:
            await self.vm_states.settle_stop(vm, "killed")

    # Savestates

    async def save(
        self,
        vm: Vm,
        hypervisor: Hypervisor,
        label: str | None,
        stop: bool,
        owner: Vm | None = None,
    ) -> str:
        """Pause, snapshot every volume, write the memory image; then run on unless ``stop``.

        The guest does not run between the snapshots and the memory image, so
        the two agree: a restore finds the disks as the memory remembers them.
        """
        owner = owner or vm
        label = label or self._new_label(owner)
        if label in owner.savestates:
            raise VmtreeError(errno.EEXIST, f"VM {owner.name!r} already has a savestate {label!r}")
        name = self.devices.domain_name(vm)
        was_paused = vm.state == states.PAUSED
        info: dict[str, object] = {
            "vm": vm.name,
            "memory_mib": int(vm.props.get("memory", "256")),
            "vcpus": int(vm.props.get("vcpus", "1")),
            "paused": was_paused,
        }
        used = self.tree.ns.by_id.get(vm.template_used or 0)
        if vm.template is not None and used is not None:
            info["template_version"] = used.id
            info["template_version_name"] = used.name

        async def pause() -> None:
            if not was_paused:
                try:
                    await trio.to_thread.run_sync(hypervisor.suspend, name)
                except VmtreeError as e:  # paused or not: the reconciliation knows
                    if libvirt_lost(e):
                        raise LeftOpen(e) from e
                    raise

        lost = False
        with self.vm_states.driven(vm):
            try:
                try:
                    pending = await self.tree.savestates.snapshot(
                        vm, owner, label, info, stop, was_paused, pause
                    )
                except LeftOpen as e:
                    lost = True
                    await self._defer(vm, f"save {label}", e.intent, e.cause)
                try:
                    started = time.monotonic()
                    await trio.to_thread.run_sync(hypervisor.save, name, pending.image_path)
                    log.info("VM %s: memory saved in %.1f s", vm.name, time.monotonic() - started)
                except BaseException as e:
                    if lost := libvirt_lost(e):
                        await self._defer(vm, f"save {label}", pending.intent, e)
                    await self.tree.savestates.abandon(pending)
                    raise
            except BaseException:
                if not lost:
                    with trio.CancelScope(shield=True):
                        now = await trio.to_thread.run_sync(hypervisor.state, name)
                        if not was_paused and now == states.PAUSED:
                            await trio.to_thread.run_sync(hypervisor.resume, name)
                raise
            await self.tree.savestates.record(owner, pending, keep_open=not stop)
            if stop:
                self.vm_states.set(vm, states.HALTED)
                await self.devices.release(vm)
                self.vm_states.done(vm, f"saved {label} and stopped")
                return label
            try:
                await trio.to_thread.run_sync(
                    functools.partial(hypervisor.restore, pending.image_path, paused=was_paused)
                )
            except BaseException as e:
                with trio.CancelScope(shield=True):
                    await self.devices.release(vm)
                    if libvirt_lost(e):
                        await self._defer(vm, f"save {label}", pending.intent, e)
                    await self.tree.savestates.finish_save(pending)
                raise
            await self.tree.savestates.finish_save(pending)
            self.vm_states.set(vm, states.PAUSED if was_paused else states.RUNNING)
        self.vm_states.done(vm, f"saved {label}")
        return label

    async def _defer(self, vm: Vm, what: str, intent: int, error: BaseException) -> NoReturn:
        """libvirt went away in the middle of ``what``: it may finish it without us, so
        the intent is left to the reconciliation when libvirt is back (as after a crash
        of the daemon), and the command fails saying so."""
        with trio.CancelScope(shield=True):
            await self.tree.savestates.defer(intent)
        log.warning("VM %s: libvirt went away during %s: settled when it is back", vm.name, what)
        raise VmtreeError(
            errno.ENOTCONN,
            f"VM {vm.name}: libvirt went away during {what} ({reason_of(error)}); it is "
            "settled when "
            "libvirt is back, as docs/reliability.md says for an interrupted save or restore",
        ) from None

    @staticmethod
    def _new_label(vm: Vm) -> str:
        base = time.strftime("%Y%m%d-%H%M%S")
        label, n = base, 1
        while label in vm.savestates:
            n += 1
            label = f"{base}-{n}"
        return label

    async def restore(self, vm: Vm, hypervisor: Hypervisor, label: str | None) -> str:
        """Start from a savestate: the volumes go back to the savestate's, then the memory."""
        if vm.immutable:
            raise VmtreeError(
                errno.EROFS, f"cannot restore VM {vm.name!r}: it is immutable (its volumes stay)"
            )
        if label is None:
            if not vm.savestates:
                raise VmtreeError(errno.ENOENT, f"VM {vm.name!r} has no savestate to restore")
            label = max(vm.savestates.values(), key=lambda ss: (ss.created, ss.id)).label
        savestate = self.tree.ns.get_savestate(vm, label)
        paused = bool(savestate.info.get("paused"))
        intent = await self.tree.savestates.begin_restore(vm, savestate)
        try:
            async with self._starting(vm):
                await self.tree.savestates.restore_volumes(vm, savestate)
                await self._restore_image(vm, hypervisor, savestate, paused)
        except BaseException as e:
            if libvirt_lost(e):
                await self._defer(vm, f"restore {label}", intent, e)
            await self.tree.savestates.end_restore(intent)
            raise
        await self.tree.savestates.end_restore(intent)
        await self._runs_from(vm, savestate)
        self.vm_states.set(vm, states.PAUSED if paused else states.RUNNING)
        self.vm_states.done(vm, f"restored {label}")
        return label

    async def _restore_as(self, vm: Vm, hypervisor: Hypervisor, savestate: Savestate) -> None:
        """Start ``vm`` (made from the savestate's volumes) from another VM's savestate."""
        async with self._starting(vm):
            await self._restore_image(vm, hypervisor, savestate, paused=False)
        await self._runs_from(vm, savestate)
        self.vm_states.set(vm, states.RUNNING)
        self.vm_states.done(vm, f"restored from {savestate.label} savestate")

    async def _restore_image(
        self, vm: Vm, hypervisor: Hypervisor, savestate: Savestate, paused: bool
    ) -> None:
        """Attach the VM's volumes and restore the savestate's memory into it.

        libvirt restores an image only under the identity it was saved with; a
        savestate of another VM (a hot savestate, one a clone got from its
        origin) is restored from a reflinked copy of the image whose description
        inside is rewritten: its name, uuid, disks and console (saveimage).
        """
        image = str(self.tree.savestates.image_path(savestate))
        saved_xml = await trio.to_thread.run_sync(hypervisor.saved_description, image)
        disks = await self.devices.attach(vm)
        xml = domain.retarget(saved_xml, self.devices.identity(vm), disks)
        await trio.to_thread.run_sync(self.devices.fresh_console, vm)
        if domain.saved_name(saved_xml) == self.devices.domain_name(vm):
            await trio.to_thread.run_sync(
                functools.partial(hypervisor.restore, image, xml, paused=paused)
            )
            return
        copy = (
            self.tree.savestate_dir
            / f"{saveimage.RESTORE_COPY_PREFIX}{vm.id}-{secrets.token_hex(4)}.save"
        )
        try:
            await trio.to_thread.run_sync(saveimage.rewrite_xml, image, copy, xml)
            await trio.to_thread.run_sync(
                functools.partial(hypervisor.restore, str(copy), paused=paused)
            )
        finally:
            with contextlib.suppress(FileNotFoundError):
                copy.unlink()

    async def _runs_from(self, vm: Vm, savestate: Savestate) -> None:
        """A VM restored from a savestate runs on the template version recorded in it."""
        used = savestate.info.get("template_version")
        if isinstance(used, int):
            await self.tree.versions.set_template_used(vm, used)

    @asynccontextmanager
    async def held_still(self, vm: Vm) -> AsyncIterator[None]:
        """Pause a running VM while its volumes are snapshotted (as a save does), so
        they hold what its disks held at one instant."""
        if vm.state != states.RUNNING:
            yield
            return
        hypervisor = await self.connection.require()
        name = self.devices.domain_name(vm)
        with self.vm_states.driven(vm):
            await trio.to_thread.run_sync(hypervisor.suspend, name)
            try:
                yield
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(hypervisor.resume, name)
