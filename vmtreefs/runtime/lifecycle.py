"""Running VMs: the ctl commands that start and stop them, and their ``state``.

A VM's state lives in memory (``Vm.state``) and follows libvirt's lifecycle
events, which arrive from the hypervisor's event thread through a trio channel;
a command waiting for a VM to stop waits for that event, not on a timer. At
(re)connection the states are read once from libvirt, so a VM that stopped
while vmtreefs was down is seen as halted.

While a command is carrying a VM through several libvirt steps it *drives*
the VM: events still update the state, but what a stop would set off (releasing
the volumes) is left to the command.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import math
import re
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from vmtreefs import saveimage
from vmtreefs.errors import VmtreeError
from vmtreefs.rules import commands, domain, states
from vmtreefs.rules.commands import Command
from vmtreefs.rules.domain import Disk, Identity
from vmtreefs.rules.names import HOT_LABEL, HOT_RUNNER_PREFIX
from vmtreefs.rules.objects import Savestate, Vm
from vmtreefs.runtime.accel import resolve_domain_type
from vmtreefs.runtime.hypervisor import DomainEvent, Hypervisor

if TYPE_CHECKING:
    from vmtreefs.core.tree import VmTree
    from vmtreefs.store import Intent

log = logging.getLogger("vmtreefs.lifecycle")

RECONNECT_SECONDS = 5.0
CONNECT_WAIT_SECONDS = 10.0  # a command waits this long for libvirt to come (back)
MAX_CONSOLE_READ = 1024 * 1024
JOB_WAIT_SECONDS = 600.0  # a save or restore libvirt carries on after a crash
READY_TIMEOUT = 600.0  # for a hot savestate's boot: TCG on a busy host is slow
# The one stop after which a versioned VM's head commits: a clean shutdown. Not after a
# kill, a crash, a failed start or a save: its disks may be half-written.
COMMIT_REASON = "shut down"


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
        self.run_dir = run_dir
        self.guest_dir = guest_dir
        self.accel = accel
        self.tree_id = tree.store.get_meta("tree_id") or "0"
        self._domain_type: str | None = None
        self._attached: dict[int, list[int]] = {}
        self._driving: set[int] = set()
        self._changed = trio.Event()
        self._events_in, self._events_out = trio.open_memory_channel[DomainEvent](math.inf)
        self._token: trio.lowlevel.TrioToken | None = None
        self._connected = trio.Event()
        self._nursery: trio.Nursery | None = None
        # Set once the first connection attempt is over: the mount answers only then,
        # so the first `state` anyone reads is libvirt's.
        self.settled = trio.Event()
        # Bumped at every state change: a reconciliation does not undo a newer event.
        self._state_serial: dict[int, int] = {}
        self._hot_tasks: set[int] = set()  # VMs whose hot savestate is being made
        # Set when what a VM's stop sets off (release, commit, destruction) is done.
        self._settling: dict[int, trio.Event] = {}

    # Names and files

    def domain_name(self, vm: Vm) -> str:
        return domain.domain_name(self.tree_id, vm.id)

    def console_path(self, vm: Vm) -> Path:
        return self.run_dir / f"console-{vm.id}.log"

    def read_console(self, vm: Vm, offset: int, size: int) -> bytes:
        try:
            with open(self.console_path(vm), "rb") as f:
                f.seek(offset)
                return f.read(min(size, MAX_CONSOLE_READ))
        except FileNotFoundError:
            return b""

    def console_size(self, vm: Vm) -> int:
        try:
            return self.console_path(vm).stat().st_size
        except FileNotFoundError:
            return 0

    async def default_domain_xml(self) -> str:
        """The demo guest, under KVM where a probe boot shows it works (once per process)."""
        if self._domain_type is None:
            self._domain_type = await trio.to_thread.run_sync(
                resolve_domain_type, self.accel, self.guest_dir
            )
        return domain.demo_domain(str(self.guest_dir), self._domain_type)

    def default_domain_xml_now(self) -> str:
        """The default as far as the accelerator is known yet (for a file size)."""
        return domain.demo_domain(str(self.guest_dir), self._domain_type or "qemu")

    async def base_domain_xml(self, vm: Vm) -> str:
        return vm.domain_xml if vm.domain_xml is not None else await self.default_domain_xml()

    # The event pump

    async def run(self) -> None:
        """Connect (again after a drop) and apply events until cancelled."""
        self._token = trio.lowlevel.current_trio_token()
        if self.hypervisor is None:
            await self.tree.collect()
            self.settled.set()
            return
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._keep_connected)
            async for event in self._events_out:
                if event.state == "disconnected":
                    self._connected = trio.Event()
                    nursery.start_soon(self._keep_connected)
                    continue
                self._apply(event)

    def _deliver(self, event: DomainEvent) -> None:
        """Called on libvirt's event thread."""
        token = self._token
        if token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(self._events_in.send_nowait, event)

    async def _keep_connected(self) -> None:
        assert self.hypervisor is not None
        warned = False
        while True:
            try:
                await trio.to_thread.run_sync(self.hypervisor.connect, self._deliver)
                await self._reconcile()
                self._connected.set()
                self.settled.set()
                return
            except VmtreeError as e:
                if not warned:
                    log.warning("%s; VMs cannot start until it answers (retrying)", e.reason)
                    warned = True
            self.settled.set()
            await trio.sleep(RECONNECT_SECONDS)

    async def _reconcile(self) -> None:
        """Take the states libvirt has now: VMs that stopped while we were away are halted."""
        assert self.hypervisor is not None
        serials = dict(self._state_serial)
        prefix = domain.domain_name(self.tree_id, 0)[:-1]
        while self.tree.recovery.deferred:
            await self._settle_interrupted(self.tree.recovery.deferred[0])
            self.tree.recovery.deferred.pop(0)
        running = await trio.to_thread.run_sync(self.hypervisor.domains, prefix)
        known: set[str] = set()
        for vm in list(self.tree.ns.by_id.values()):
            name = self.domain_name(vm)
            known.add(name)
            state = running.get(name, states.HALTED)
            if state != states.HALTED and vm.id not in self._attached:
                await self._attach(vm)
            if vm.id in self._driving or self._state_serial.get(vm.id) != serials.get(vm.id):
                continue
            self._set_state(vm, state)
            if state == states.HALTED:
                await self._release(vm)
        for name in sorted(set(running) - known):
            log.warning("libvirt runs %s, which is not a VM of this tree: left alone", name)
        for vm in list(self.tree.ns.by_id.values()):
            if (
                vm.name.startswith(HOT_RUNNER_PREFIX)
                and vm.state != states.HALTED
                and vm.id not in self._driving
                and not self._hot_tasks
            ):
                # Booted to make a hot savestate by a daemon that crashed: nobody will save it.
                log.info("stopping %s, a hot savestate runner a crash left running", vm.name)
                await self._destroy(vm, self.hypervisor)
        for vm in list(self.tree.ns.by_id.values()):
            if vm.props.get("hot_savestate") == "1" and HOT_LABEL not in vm.savestates:
                self._schedule_hot(vm)
            if vm.volatile and vm.state == states.HALTED and vm.id not in self._driving:
                log.info("volatile VM %s stopped while vmtreefs was away: destroying it", vm.name)
                await self._stopped(vm, "stopped while vmtreefs was away")
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
        assert self.hypervisor is not None
        hypervisor = self.hypervisor
        payload = intent.payload
        vm_id = payload["savestate"]["vm_id"] if intent.kind == "save" else payload["vm_id"]
        vm = self.tree.ns.by_id.get(vm_id)
        name = domain.domain_name(self.tree_id, vm_id)
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
                    await self._resume_from(vm, hypervisor, savestate, saved["was_paused"])
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
                    await self.restore(vm, hypervisor, found[0].label)
                except VmtreeError as e:
                    log.error("%s: restoring again failed: %s", what, e.describe())
        await trio.to_thread.run_sync(self.tree.journal.complete_intent, intent.id)
        recovery = self.tree.recovery
        (recovery.rolled_back if undone else recovery.rolled_forward).append(what)

    async def _resume_from(
        self, vm: Vm, hypervisor: Hypervisor, savestate: Savestate, paused: bool
    ) -> None:
        """What the interrupted save had still to do: run the VM on from its image."""
        self._driving.add(vm.id)
        try:
            await self._attach(vm)
            try:
                image = str(self.tree.savestates.image_path(savestate))
                await trio.to_thread.run_sync(
                    functools.partial(hypervisor.restore, image, paused=paused)
                )
            except VmtreeError as e:
                await self._release(vm)
                log.error("VM %s: running on after the save failed: %s", vm.name, e.describe())
                return
            self._set_state(vm, states.PAUSED if paused else states.RUNNING)
            self.tree.journal.publish(
                f"{vm.name}: runs on from savestate {savestate.label}", time.time()
            )
        finally:
            self._driving.discard(vm.id)

    def _apply(self, event: DomainEvent) -> None:
        vm_id = domain.parse_domain_name(self.tree_id, event.name)
        vm = self.tree.ns.by_id.get(vm_id) if vm_id is not None else None
        if vm is None or vm.id in self._driving or self._nursery is None:
            return  # a command carrying the VM through several steps sets its states
        self._nursery.start_soon(self._confirm, vm, event)

    async def _confirm(self, vm: Vm, event: DomainEvent) -> None:
        """Take the state libvirt gives now, not the event's: events of a command's
        steps (a save stops the domain, the restore starts it again) can arrive
        after the command is done, and must not undo it."""
        assert self.hypervisor is not None
        try:
            actual = await trio.to_thread.run_sync(self.hypervisor.state, self.domain_name(vm))
        except VmtreeError as e:
            log.warning("VM %s: asking libvirt its state: %s", vm.name, e.reason)
            actual = event.state
        if vm.id in self._driving or vm.id not in self.tree.ns.by_id:
            return
        if vm.state != actual:
            reason = event.reason if actual == event.state else f"libvirt says {actual}"
            log.info("VM %s: %s (%s)", vm.name, actual, reason)
            self._set_state(vm, actual)
        # What a stop sets off waits for libvirt's stop event itself, with its reason.
        if actual == event.state == states.HALTED and vm.id in self._attached:
            self.tree.journal.publish(f"{vm.name} stopped: {event.reason}", time.time())
            await self._stopped(vm, event.reason)

    async def _stopped(self, vm: Vm, reason: str) -> None:
        """What a stop sets off: the volumes are released, the head of a versioned VM
        commits (not after a kill or a crash: its disks may be half-written), a volatile
        VM is destroyed, a hot savestate is made again (its disks have changed)."""
        done = self._settling.setdefault(vm.id, trio.Event())
        try:
            await self._release(vm)
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
                self._schedule_hot(vm)
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

    def _set_state(self, vm: Vm, state: str) -> None:
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

    # Volumes while running

    async def _attach(self, vm: Vm) -> list[Disk]:
        """Every volume with a size, as the guest's disks in their fixed order."""
        engine = self.tree.engine
        names = domain.disk_targets([n for n, v in vm.volumes.items() if v.size > 0])
        disks: list[Disk] = []
        attached: list[int] = []
        try:
            for name in names:
                volume = vm.volumes[name]
                where = await trio.to_thread.run_sync(engine.attach, volume.id)
                attached.append(volume.id)
                disks.append(Disk(name, where.path, where.block, readonly=vm.immutable))
        except BaseException:
            with trio.CancelScope(shield=True):
                for vol_id in attached:
                    await trio.to_thread.run_sync(engine.detach, vol_id)
            raise
        self._attached[vm.id] = attached
        self.tree.on_volumes_written_outside(attached)
        return disks

    async def _release(self, vm: Vm) -> None:
        attached = self._attached.pop(vm.id, [])
        self.tree.on_volumes_written_outside(attached)
        for vol_id in attached:
            try:
                await trio.to_thread.run_sync(self.tree.engine.detach, vol_id)
            except VmtreeError as e:
                log.warning("VM %s: releasing volume %d: %s", vm.name, vol_id, e.reason)

    # Commands

    async def _require_hypervisor(self) -> Hypervisor:
        if self.hypervisor is None:
            raise VmtreeError(errno.ENOTCONN, "this mount runs no VMs (mounted with libvirt=none)")
        with trio.move_on_after(CONNECT_WAIT_SECONDS):
            await self._connected.wait()
        if not self._connected.is_set():
            raise VmtreeError(
                errno.ENOTCONN,
                f"libvirt at {self.hypervisor.uri} does not answer; is libvirtd running?",
            )
        return self.hypervisor

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
        hypervisor = await self._require_hypervisor()
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
            await trio.to_thread.run_sync(hypervisor.suspend, self.domain_name(vm))
            self._set_state(vm, states.PAUSED)
            return self._done(vm, states.PAUSED)
        if verb == "resume":
            await trio.to_thread.run_sync(hypervisor.resume, self.domain_name(vm))
            self._set_state(vm, states.RUNNING)
            return self._done(vm, states.RUNNING)
        raise VmtreeError(errno.EINVAL, f"{verb!r} is not a lifecycle command")

    def _done(self, vm: Vm, result: str) -> str:
        self.tree.journal.publish(f"{vm.name}: {result}", time.time())
        return result

    async def start_instance(self, source: Vm, hypervisor: Hypervisor, kind: str) -> str:
        """An immutable VM runs as ``NAME-instN``; any halted VM as a disposable ``NAME-dispN``.

        The instance is a linked clone made for the run; a disposable is volatile,
        so it goes with its volumes as soon as it stops.
        """
        hot = source.savestates.get(HOT_LABEL)
        if source.domain_xml is None and hot is None:
            self._check_demo_guest()
        instance = await self.tree.make_instance(source.id, kind)
        try:
            async with self.tree.locked(instance.id):
                if hot is not None:
                    await self._restore_as(instance, hypervisor, hot)
                else:
                    await self.start(instance, hypervisor)
        except BaseException:
            if instance.volatile:
                with trio.CancelScope(shield=True):
                    await self.tree.delete_vm(instance.id)
            raise
        return instance.name

    async def _restore_as(self, vm: Vm, hypervisor: Hypervisor, savestate: Savestate) -> None:
        """Start ``vm`` (made from the savestate's volumes) from another VM's savestate."""
        async with self._starting(vm):
            await self._restore_image(vm, hypervisor, savestate, paused=False)
        await self._runs_from(vm, savestate)
        self._set_state(vm, states.RUNNING)
        self._done(vm, f"restored from {savestate.label} savestate")

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
        disks = await self._attach(vm)
        xml = domain.retarget(saved_xml, self._identity(vm), disks)
        await trio.to_thread.run_sync(self._fresh_console, vm)
        if domain.saved_name(saved_xml) == self.domain_name(vm):
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

    # Hot savestates

    def hot_savestate_changed(self, vm: Vm) -> None:
        """``hot_savestate`` was set (make one now) or cleared (drop the one there is)."""
        if vm.props.get("hot_savestate") == "1":
            self._schedule_hot(vm)
        elif HOT_LABEL in vm.savestates and self._nursery is not None:
            self._nursery.start_soon(self._drop_hot, vm)

    async def _drop_hot(self, vm: Vm) -> None:
        try:
            await self.tree.savestates.delete(vm.id, HOT_LABEL)
        except VmtreeError as e:
            log.warning("VM %s: dropping the hot savestate: %s", vm.name, e.reason)

    def _schedule_hot(self, vm: Vm) -> None:
        # A versioned VM's hot savestates are its versions' (a disposable factory).
        if vm.id in self._hot_tasks or self._nursery is None or vm.volatile or vm.versioned:
            return
        self._hot_tasks.add(vm.id)
        self._nursery.start_soon(self._make_hot, vm)

    async def _make_hot(self, vm: Vm) -> None:
        """Boot (a hidden instance of) the VM, save it as soon as it is ready, stop it.

        A running VM is saved in place when ready and keeps running.
        """
        started = time.monotonic()
        try:
            hypervisor = await self._require_hypervisor()
            if HOT_LABEL in vm.savestates:
                await self.tree.savestates.delete(vm.id, HOT_LABEL)
            if vm.versioned:
                return  # it became versioned meanwhile: its versions make their own
            if vm.state in (states.RUNNING, states.PAUSED) and not vm.immutable:
                await self.wait_ready(vm)
                async with self.tree.locked(vm.id):
                    await self.save(vm, hypervisor, HOT_LABEL, stop=False)
            else:
                await self._make_hot_with_runner(vm, hypervisor)
            log.info("VM %s: hot savestate made in %.1f s", vm.name, time.monotonic() - started)
        except VmtreeError as e:
            log.error("VM %s: no hot savestate: %s", vm.name, e.describe())
            self.tree.journal.publish(f"{vm.name}: hot savestate failed: {e.reason}", time.time())
        finally:
            self._hot_tasks.discard(vm.id)

    async def _make_hot_with_runner(self, vm: Vm, hypervisor: Hypervisor) -> None:
        if vm.domain_xml is None:
            self._check_demo_guest()
        runner = await self.tree.make_instance(vm.id, "hot")
        try:
            async with self.tree.locked(runner.id):
                await self.start(runner, hypervisor)
            await self.wait_ready(runner)
            if vm.versioned or vm.id not in self.tree.ns.by_id:
                raise VmtreeError(errno.ECANCELED, f"{vm.name} became versioned or went away")
            async with self.tree.locked(runner.id):
                await self.save(runner, hypervisor, HOT_LABEL, stop=True, owner=vm)
        finally:
            with trio.CancelScope(shield=True):
                if runner.id in self.tree.ns.by_id and runner.state != states.HALTED:
                    await self._destroy(runner, hypervisor)  # a volatile VM goes when it stops
                if runner.id in self.tree.ns.by_id:
                    await self._release(runner)
                    with contextlib.suppress(VmtreeError):
                        await self.tree.delete_vm(runner.id)

    async def wait_ready(self, vm: Vm, timeout: float = READY_TIMEOUT) -> None:
        """Until the VM counts as ready: its ``ready`` property, console:REGEX or delay:SECONDS."""
        kind, _, arg = vm.props.get("ready", "console:VMTREE-READY").partition(":")
        with trio.move_on_after(timeout) as scope:
            if kind == "delay":
                await trio.sleep(int(arg))
                return
            pattern = re.compile(arg.encode())
            while True:
                text = await trio.to_thread.run_sync(self.read_console, vm, 0, MAX_CONSOLE_READ)
                if pattern.search(text):
                    return
                if vm.state == states.HALTED:
                    raise VmtreeError(errno.EIO, f"VM {vm.name} stopped before it was ready")
                await trio.sleep(0.1)
        if scope.cancelled_caught:
            raise VmtreeError(errno.ETIMEDOUT, f"VM {vm.name} was not ready after {timeout:.0f} s")

    async def start(self, vm: Vm, hypervisor: Hypervisor) -> str:
        if vm.immutable:
            raise VmtreeError(errno.EROFS, f"cannot start VM {vm.name!r} itself: it is immutable")
        if vm.domain_xml is None:
            self._check_demo_guest()
        await self.tree.versions.refresh_template_volumes(vm)
        await self._reset_volatile_volumes(vm)
        async with self._starting(vm):
            base = await self.base_domain_xml(vm)
            disks = await self._attach(vm)
            xml = domain.render(
                base,
                self._identity(vm),
                int(vm.props.get("memory", "256")),
                int(vm.props.get("vcpus", "1")),
                disks,
            )
            await trio.to_thread.run_sync(self._fresh_console, vm)
            await trio.to_thread.run_sync(hypervisor.create, xml)
        if vm.state == states.STARTING:
            self._set_state(vm, states.RUNNING)
        self._done(vm, "started")
        return vm.name

    def _check_demo_guest(self) -> None:
        for name in (domain.DEMO_KERNEL, domain.DEMO_INITRD):
            if not (self.guest_dir / name).is_file():
                raise VmtreeError(
                    errno.ENOENT,
                    f"the default domain.xml boots the demo guest, but {self.guest_dir / name} "
                    "is missing: build it (scripts/build-demo-guest.sh DIR) and mount with "
                    "-o guest=DIR, or write the VM's own domain.xml",
                )

    @asynccontextmanager
    async def _starting(self, vm: Vm) -> AsyncIterator[None]:
        """Carry a halted VM to running: on any failure its volumes are released and
        it is halted again; libvirt's events wait until it is done."""
        self._driving.add(vm.id)
        self._set_state(vm, states.STARTING)
        try:
            yield
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._release(vm)
                self._set_state(vm, states.HALTED)
            raise
        finally:
            self._driving.discard(vm.id)

    def _identity(self, vm: Vm) -> Identity:
        return Identity(
            self.domain_name(vm),
            domain.domain_uuid(self.tree_id, vm.id),
            str(self.console_path(vm)),
        )

    def _fresh_console(self, vm: Vm) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.console_path(vm), "wb"):
            pass

    async def _reset_volatile_volumes(self, vm: Vm) -> None:
        """``volatile`` volumes start every boot empty."""
        for volume in list(vm.volumes.values()):
            if volume.policy == "volatile" and volume.size > 0:
                await trio.to_thread.run_sync(self.tree.engine.discard, volume.id, volume.size)

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
        name = self.domain_name(vm)
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
                await trio.to_thread.run_sync(hypervisor.suspend, name)

        self._driving.add(vm.id)
        try:
            try:
                pending = await self.tree.savestates.snapshot(
                    vm, owner, label, info, stop, was_paused, pause
                )
                try:
                    started = time.monotonic()
                    await trio.to_thread.run_sync(hypervisor.save, name, pending.image_path)
                    log.info("VM %s: memory saved in %.1f s", vm.name, time.monotonic() - started)
                except BaseException:
                    await self.tree.savestates.abandon(pending)
                    raise
            except BaseException:
                with trio.CancelScope(shield=True):
                    now = await trio.to_thread.run_sync(hypervisor.state, name)
                    if not was_paused and now == states.PAUSED:
                        await trio.to_thread.run_sync(hypervisor.resume, name)
                raise
            await self.tree.savestates.record(owner, pending, keep_open=not stop)
            if stop:
                self._set_state(vm, states.HALTED)
                await self._release(vm)
                self._done(vm, f"saved {label} and stopped")
                return label
            try:
                await trio.to_thread.run_sync(
                    functools.partial(hypervisor.restore, pending.image_path, paused=was_paused)
                )
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._release(vm)
                raise
            finally:
                await self.tree.savestates.finish_save(pending)
            self._set_state(vm, states.PAUSED if was_paused else states.RUNNING)
        finally:
            self._driving.discard(vm.id)
        self._done(vm, f"saved {label}")
        return label

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
        finally:
            await self.tree.savestates.end_restore(intent)
        await self._runs_from(vm, savestate)
        self._set_state(vm, states.PAUSED if paused else states.RUNNING)
        self._done(vm, f"restored {label}")
        return label

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
        hypervisor = await self._require_hypervisor()
        name = self.domain_name(vm)
        self._driving.add(vm.id)
        try:
            await trio.to_thread.run_sync(hypervisor.suspend, name)
            try:
                yield
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(hypervisor.resume, name)
        finally:
            self._driving.discard(vm.id)

    async def shutdown(self, vm: Vm, hypervisor: Hypervisor, timeout: int) -> str:
        name = self.domain_name(vm)
        if vm.state == states.PAUSED:
            await trio.to_thread.run_sync(hypervisor.resume, name)
        await trio.to_thread.run_sync(hypervisor.shutdown, name)
        self._set_state(vm, states.STOPPING)
        log.info("VM %s: asked to shut down, waiting up to %d s", vm.name, timeout)
        if await self.wait_for(vm, frozenset({states.HALTED}), timeout):
            await self._settle_stop(vm, COMMIT_REASON)
            return states.HALTED
        log.warning("VM %s did not shut down within %d s: forcing it off", vm.name, timeout)
        await self._destroy(vm, hypervisor)
        return self._done(vm, f"halted: forced off after {timeout} s")

    async def kill(self, vm: Vm, hypervisor: Hypervisor) -> str:
        await self._destroy(vm, hypervisor)
        return states.HALTED  # the stop event was announced

    async def _destroy(self, vm: Vm, hypervisor: Hypervisor) -> None:
        try:
            await trio.to_thread.run_sync(hypervisor.destroy, self.domain_name(vm))
        except VmtreeError as e:
            if e.errno != errno.ENOENT:
                raise
            self._set_state(vm, states.HALTED)
        await self.wait_for(vm, frozenset({states.HALTED}), 30)
        if vm.state != states.HALTED:
            # The event did not come (libvirt went away): ask once.
            state = await trio.to_thread.run_sync(hypervisor.state, self.domain_name(vm))
            self._set_state(vm, state)
        if vm.state == states.HALTED:
            await self._settle_stop(vm, "killed")

    async def _settle_stop(self, vm: Vm, reason: str) -> None:
        """A command saw its VM halt: what the stop sets off is done before it returns
        (unless libvirt's stop event got there first), so a read of a volume right
        after `shutdown` or `kill` sees what the guest wrote."""
        if vm.id in self._attached:
            self.tree.journal.publish(f"{vm.name} stopped: {reason}", time.time())
            await self._stopped(vm, reason)
        elif vm.id in self._settling:
            await self._settling[vm.id].wait()  # libvirt's stop event got there first
