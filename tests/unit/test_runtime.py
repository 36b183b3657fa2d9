"""The lifecycle's decisions, fast: ``runtime.lifecycle.Lifecycle`` on the in-memory libvirt.

A mount here is what the daemon wires, without FUSE: a real store (SQLite in a
temporary directory), the in-memory engine, recovery, the lifecycle on a
``FakeHypervisor`` and the ``ctl`` dispatcher. What outlives a mount is what
outlives a daemon: the store's file, the savestate images, the engine's
volumes and the fake libvirt with its running domains, so an unmount and a
mount again is a daemon's restart, and changing the store or libvirt between
the two is a crash. Both fakes pass the contract suites of what they stand for
(tests/engine, tests/vm/test_hypervisor_contract.py); that the features work
for real is shown by tests/vm and tests/crash, with QEMU under libvirt.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.fakes.hypervisor import FakeHypervisor, FakeLibvirt
from tests.fakes.memory_engine import MemoryEngine
from vmtreefs import saveimage
from vmtreefs.control import CtlDispatcher
from vmtreefs.core.savestates import PendingSavestate
from vmtreefs.core.tree import VmTree
from vmtreefs.core.versions import Versions
from vmtreefs.errors import VmtreeError
from vmtreefs.rules import commands, domain
from vmtreefs.rules.domain import Identity
from vmtreefs.rules.objects import Vm
from vmtreefs.runtime import connection
from vmtreefs.runtime.lifecycle import Lifecycle
from vmtreefs.store import Store

LOGGER = "vmtreefs.lifecycle"


@dataclass
class World:
    """What outlives a daemon: SOURCE (store and savestates), the pool, libvirt."""

    source: Path
    guest: Path
    engine: MemoryEngine
    libvirt: FakeLibvirt


@dataclass
class Mount:
    """One daemon's tree, lifecycle and ctl files."""

    world: World
    tree: VmTree
    lifecycle: Lifecycle
    dispatcher: CtlDispatcher

    def vm(self, name: str) -> Vm:
        return self.tree.ns.get(name)

    def domain(self, name: str) -> str:
        return domain.domain_name(self.lifecycle.tree_id, self.vm(name).id)

    async def ctl(self, name: str, line: str) -> str:
        """``echo LINE > vms/NAME/ctl``: the result line, or the refusal raised."""
        command = commands.parse_command(line.encode(), commands.VM_COMMANDS)
        return await self.dispatcher.run(self.vm(name).id, command)

    def state(self, name: str) -> str:
        return self.vm(name).state

    def events(self) -> str:
        return self.tree.journal.events.text()

    def console(self, name: str) -> str:
        return self.lifecycle.read_console(self.vm(name), 0, 1 << 20).decode()

    def private_disk(self, name: str) -> bytes:
        """The first bytes of the VM's private volume: the demo guest's boot counter."""
        return self.world.engine.read(self.vm(name).volumes["private"].id, 32, 0)

    def libvirt_runs(self) -> dict[str, str]:
        return self.world.libvirt.domains("vmtree-")


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    guest = tmp_path / "guest"
    guest.mkdir()
    for name in (domain.DEMO_KERNEL, domain.DEMO_INITRD):
        (guest / name).write_bytes(b"")
    source = tmp_path / "source"
    source.mkdir()
    engine, libvirt = MemoryEngine(), FakeLibvirt()
    engine.start()
    try:
        yield World(source, guest, engine, libvirt)
    finally:
        libvirt.stop()
        engine.stop()


@pytest.fixture
def quick_reconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seconds, not minutes, for a libvirt that is away: the same logic on a shorter clock."""
    monkeypatch.setattr(connection, "RECONNECT_SECONDS", 0.05)
    monkeypatch.setattr(connection, "CONNECT_WAIT_SECONDS", 0.3)


@asynccontextmanager
async def mounted(world: World) -> AsyncIterator[Mount]:
    """What the daemon does, FUSE aside: recovery, then the lifecycle, ready once settled."""
    store = Store.open(world.source / "vmtree.db")
    tree = VmTree(store, world.engine, world.source / "savestates")
    tree.defer_vm_intents = True
    tree.recover()
    hypervisor = FakeHypervisor(world.libvirt)
    lifecycle = Lifecycle(
        tree, hypervisor, run_dir=world.source / "run", guest_dir=world.guest, accel="tcg"
    )
    tree.runner = lifecycle
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lifecycle.run)
            with trio.fail_after(10):
                await lifecycle.settled.wait()
            yield Mount(world, tree, lifecycle, CtlDispatcher(tree, lifecycle))
            nursery.cancel_scope.cancel()
    finally:
        hypervisor.close()
        store.close()


async def left_running(world: World, vm_name: str) -> str:
    """A new VM started by a daemon that has gone since (it runs on); its domain's name."""
    async with mounted(world) as mount:
        await mount.tree.create_vm(vm_name)
        await mount.ctl(vm_name, "start")
        return mount.domain(vm_name)


async def save_cut_short(world: World, vm_name: str, stop: bool) -> PendingSavestate:
    """A daemon's ``save`` up to where it died: the VM paused, its volumes snapshotted
    under the save's intent, the memory image still to come."""
    with Store.open(world.source / "vmtree.db") as store:
        tree = VmTree(store, world.engine, world.source / "savestates")
        tree.load()
        vm = tree.ns.get(vm_name)
        name = domain.domain_name(store.get_meta("tree_id") or "0", vm.id)

        async def pause() -> None:
            await trio.to_thread.run_sync(world.libvirt.suspend, name)

        return await tree.savestates.snapshot(vm, vm, "s", {}, stop, False, pause)


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for what libvirt's events set off (they arrive on their own time)."""
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.01)


async def events_heard(world: World) -> None:
    """Until libvirt's events so far were delivered and checked against libvirt.

    A command that does not drive its VM (pause, resume) races the check of its own
    late event: a command given right after it may be overruled (left alone here).
    """
    await trio.to_thread.run_sync(world.libvirt.drain)
    await trio.sleep(0.2)


def other_connection(world: World) -> FakeHypervisor:
    """Someone else's client of the same libvirt (virsh, say)."""
    hypervisor = FakeHypervisor(world.libvirt)
    hypervisor.connect(lambda _event: None)
    return hypervisor


# Running and stopping


async def test_a_vm_runs_on_its_own_volumes_and_a_shutdown_halts_it(world: World) -> None:
    async with mounted(world) as mount:
        await mount.tree.create_vm("work")
        assert await mount.ctl("work", "start") == "work"
        assert mount.state("work") == "running"
        assert mount.libvirt_runs() == {mount.domain("work"): "running"}
        assert "VMTREE-BOOT 1" in mount.console("work")
        assert await mount.ctl("work", "shutdown") == "halted"
        assert mount.state("work") == "halted"
        assert mount.libvirt_runs() == {}
        # The guest's write is in the volume once the shutdown returns: its disks are released.
        assert mount.private_disk("work").startswith(b"1 ")
        await mount.ctl("work", "start")
        assert "VMTREE-BOOT 2" in mount.console("work")
        assert "VMTREE-BOOT 1" not in mount.console("work")  # each start, a fresh console
        lines = mount.events()
        assert "work: started" in lines and "work stopped: shut down" in lines


async def test_a_guest_that_ignores_the_power_button_is_forced_off(world: World) -> None:
    async with mounted(world) as mount:
        await mount.tree.create_vm("deaf")
        await mount.ctl("deaf", "start")
        world.libvirt.deaf.add(mount.domain("deaf"))
        assert await mount.ctl("deaf", "shutdown --timeout 1") == "halted: forced off after 1 s"
        assert mount.state("deaf") == "halted"
        assert mount.libvirt_runs() == {}


async def test_pause_and_resume_and_the_states_each_command_needs(world: World) -> None:
    async with mounted(world) as mount:
        await mount.tree.create_vm("work")
        with pytest.raises(VmtreeError) as halted:
            await mount.ctl("work", "pause")
        assert halted.value.errno == errno.EBUSY
        await mount.ctl("work", "start")
        assert await mount.ctl("work", "pause") == "paused"
        assert world.libvirt.state(mount.domain("work")) == "paused"
        with pytest.raises(VmtreeError) as paused:
            await mount.ctl("work", "start")
        assert paused.value.errno == errno.EBUSY
        await events_heard(world)
        assert await mount.ctl("work", "resume") == "running"
        assert world.libvirt.state(mount.domain("work")) == "running"
        await events_heard(world)
        # A paused VM is resumed to hear the power button.
        await mount.ctl("work", "pause")
        await events_heard(world)
        assert await mount.ctl("work", "shutdown") == "halted"


async def test_the_state_follows_what_libvirt_says_happened(world: World) -> None:
    async with mounted(world) as mount:
        await mount.tree.create_vm("work")
        await mount.ctl("work", "start")
        name = mount.domain("work")
        virsh = other_connection(world)
        virsh.suspend(name)
        await until(lambda: mount.state("work") == "paused")
        virsh.resume(name)
        await until(lambda: mount.state("work") == "running")
        # A late event is checked against libvirt: the VM still runs, so it stays running.
        world.libvirt.emit(name, "halted", "killed")
        await trio.sleep(0.2)
        assert mount.state("work") == "running"
        world.libvirt.qemu_dies(name)
        await until(lambda: "work stopped: failed" in mount.events())
        assert mount.state("work") == "halted"
        await mount.ctl("work", "start")
        world.libvirt.power_off(name)  # the guest shuts itself down
        await until(lambda: "work stopped: shut down" in mount.events())
        assert mount.private_disk("work").startswith(b"2 ")
        virsh.close()


async def test_without_libvirt_the_mount_answers_and_commands_wait_for_it(
    world: World, quick_reconnect: None
) -> None:
    world.libvirt.go_away()
    async with mounted(world) as mount:  # settled all the same
        await mount.tree.create_vm("work")
        with pytest.raises(VmtreeError) as away:
            await mount.ctl("work", "start")
        assert away.value.errno == errno.ENOTCONN
        assert away.value.reason == (
            "libvirt at fake:///system does not answer; is libvirtd running?"
        )
        world.libvirt.come_back()
        assert await mount.ctl("work", "start") == "work"
        await events_heard(world)
        # libvirtd restarts while the guest powers off: the state is read again on reconnection.
        world.libvirt.go_away()
        world.libvirt.power_off(mount.domain("work"))
        world.libvirt.come_back()
        await until(lambda: mount.state("work") == "halted")
        await until(lambda: mount.private_disk("work").startswith(b"1 "))  # released


# Instances and disposables


async def test_disposables_are_numbered_on_and_go_with_their_volumes_when_they_stop(
    world: World,
) -> None:
    async with mounted(world) as mount:
        await mount.tree.create_vm("fedora")
        assert await mount.ctl("fedora", "disposable") == "fedora-disp1"
        assert await mount.ctl("fedora", "disposable") == "fedora-disp2"
        assert mount.state("fedora-disp1") == mount.state("fedora-disp2") == "running"
        assert mount.state("fedora") == "halted"  # the source itself never ran
        second = {v.id for v in mount.vm("fedora-disp2").volumes.values()}
        assert await mount.ctl("fedora-disp2", "kill") == "halted"
        assert "fedora-disp2" not in mount.tree.ns.by_name
        assert not second & set(world.engine.inventory())
        world.libvirt.power_off(mount.domain("fedora-disp1"))
        await until(lambda: "fedora-disp1" not in mount.tree.ns.by_name)
        assert await mount.ctl("fedora", "disposable") == "fedora-disp3"
        assert sorted(mount.libvirt_runs().values()) == ["running"]


async def test_an_immutable_vm_runs_as_an_instance(world: World) -> None:
    async with mounted(world) as mount:
        base = await mount.tree.create_vm("base")
        await mount.tree.set_property(base.id, "immutable", "1")
        assert await mount.ctl("base", "start") == "base-inst1"
        assert mount.state("base") == "halted"
        assert mount.state("base-inst1") == "running"
        assert not mount.vm("base-inst1").volatile  # an instance stays when it stops
        await mount.ctl("base-inst1", "shutdown")
        assert mount.state("base-inst1") == "halted"


# Versions


async def test_a_versioned_head_commits_at_a_clean_shutdown_only(world: World) -> None:
    async with mounted(world) as mount:
        work = await mount.tree.create_vm("work")
        await mount.tree.set_property(work.id, "versioned", "1")
        newest = mount.tree.ns.alias_target_name
        system_alias = mount.tree.ns.get_alias("work")
        assert newest(system_alias) == "work-v1"
        await mount.ctl("work-next", "start")
        await mount.ctl("work-next", "shutdown")
        assert newest(system_alias) == "work-v2"
        await mount.ctl("work-next", "start")
        await mount.ctl("work-next", "kill")  # its disks may be half-written: no version
        await mount.ctl("work-next", "start")
        world.libvirt.qemu_dies(mount.domain("work-next"))  # nor after a crash
        await until(lambda: mount.state("work-next") == "halted")
        assert newest(system_alias) == "work-v2"
        await mount.ctl("work-next", "start")
        world.libvirt.power_off(mount.domain("work-next"))  # the guest's own shutdown is clean
        await until(lambda: newest(system_alias) == "work-v3")
        await until(lambda: sorted(mount.tree.ns.by_name) == ["work-next", "work-v3"])  # pruned


async def test_a_mount_prunes_the_history_a_crash_kept_from_its_commit(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the power-cut test: a cut after a commit's version was made and before
    the older ones were pruned listed both, h-v1 beside h-v2, after the remount."""
    async with mounted(world) as mount:
        head = await mount.tree.create_vm("h")
        await mount.tree.set_property(head.id, "versioned", "1")
        with monkeypatch.context() as crashed:  # the daemon died between the two steps
            crashed.setattr(Versions, "prune", lambda self, head_id: trio.lowlevel.checkpoint())
            assert await mount.ctl("h-next", "commit") == "h-v2"
        assert sorted(mount.tree.ns.by_name) == ["h-next", "h-v1", "h-v2"]
    async with mounted(world) as mount:
        assert sorted(mount.tree.ns.by_name) == ["h-next", "h-v2"]
        assert mount.tree.ns.alias_target_name(mount.tree.ns.get_alias("h")) == "h-v2"
        assert "history: drop h-v1" in mount.events()


async def test_a_commit_of_a_running_head_pauses_it_only_for_the_snapshot(world: World) -> None:
    async with mounted(world) as mount:
        work = await mount.tree.create_vm("work")
        await mount.tree.set_property(work.id, "versioned", "1")
        await mount.ctl("work-next", "start")
        heard: list[tuple[str, str]] = []
        virsh = FakeHypervisor(world.libvirt)
        virsh.connect(lambda event: heard.append((event.state, event.reason)))
        assert await mount.ctl("work-next", "commit") == "work-v2"
        await until(lambda: len(heard) >= 2)
        assert heard == [("paused", "paused"), ("running", "resumed")]
        assert mount.state("work-next") == "running"
        virsh.close()


# Savestates


async def test_save_and_restore_go_on_from_the_moment_of_the_save(world: World) -> None:
    async with mounted(world) as mount:
        await mount.tree.create_vm("work")
        await mount.ctl("work", "start")
        assert await mount.ctl("work", "save first") == "first"
        assert mount.state("work") == "running"
        saved = mount.vm("work").savestates["first"]
        assert saveimage.is_complete(mount.tree.savestates.image_path(saved))
        assert await mount.ctl("work", "save --stop") != "first"
        assert mount.state("work") == "halted"
        assert await mount.ctl("work", "restore first") == "first"
        assert mount.state("work") == "running"
        assert "VMTREE-BOOT" not in mount.console("work")  # no boot: the memory goes on
        with pytest.raises(VmtreeError) as taken:
            await mount.ctl("work", "save first")
        assert taken.value.errno == errno.EEXIST


async def test_libvirt_dying_inside_the_pause_of_a_save_leaves_no_vm_paused(
    world: World, quick_reconnect: None, caplog: pytest.LogCaptureFixture
) -> None:
    """QEMU paused the domain, libvirtd died before it answered: the save's intent is
    left open, and once libvirt is back the reconciliation resumes the VM."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with mounted(world) as mount:
        await mount.tree.create_vm("work")
        await mount.ctl("work", "start")
        own = set(world.engine.inventory())
        name = mount.domain("work")
        world.libvirt.dies_in_next_suspend()
        with pytest.raises(VmtreeError) as away:
            await mount.ctl("work", "save s")
        assert away.value.errno == errno.ENOTCONN
        assert "libvirt went away during save s" in away.value.reason
        assert world.libvirt.state(name) == "paused"  # what libvirtd's death left
        assert len(mount.tree.store.load().open_intents) == 1
        world.libvirt.come_back()
        await until(lambda: mount.tree.store.load().open_intents == [])
        await until(lambda: world.libvirt.state(name) == "running")
        await events_heard(world)
        assert mount.state("work") == "running"
        assert mount.vm("work").savestates == {}
        assert set(world.engine.inventory()) == own
    assert "interrupted save work s: the image is not whole, the savestate is rolled back" in (
        caplog.text
    )


async def test_a_hot_savestate_is_made_by_a_hidden_runner_and_disposables_restore_it(
    world: World,
) -> None:
    async with mounted(world) as mount:
        base = await mount.tree.create_vm("base")
        await mount.tree.set_property(base.id, "hot_savestate", "1")
        await until(lambda: "hot" in base.savestates)
        await until(lambda: [vm.name for vm in mount.tree.ns.by_id.values()] == ["base"])
        assert mount.libvirt_runs() == {}  # the runner went, with its domain
        assert base.state == "halted"
        assert await mount.ctl("base", "disposable") == "base-disp1"
        assert mount.state("base-disp1") == "running"
        assert "VMTREE-BOOT" not in mount.console("base-disp1")
        assert "base-disp1: restored from hot savestate" in mount.events()
        await mount.tree.set_property(base.id, "hot_savestate", None)
        await until(lambda: "hot" not in base.savestates)


async def test_a_running_vm_gets_its_hot_savestate_in_place_and_again_after_it_stops(
    world: World,
) -> None:
    async with mounted(world) as mount:
        work = await mount.tree.create_vm("work")
        await mount.ctl("work", "start")
        await mount.tree.set_property(work.id, "hot_savestate", "1")
        await until(lambda: "hot" in work.savestates)
        first = work.savestates["hot"].id
        assert mount.state("work") == "running"
        assert len(mount.libvirt_runs()) == 1  # saved in place, no runner
        await mount.ctl("work", "shutdown")  # its disks changed: made again, by a runner
        await until(lambda: "hot" in work.savestates and work.savestates["hot"].id != first)
        await until(lambda: mount.libvirt_runs() == {})


# ready=agent: the guest agent answers


AGENT_CHANNEL_XML = (
    "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
)


async def with_agent_channel(mount: Mount, name: str) -> Vm:
    """A new VM whose domain.xml has the guest agent's channel, and ready=agent."""
    vm = await mount.tree.create_vm(name)
    base = domain.demo_domain(str(mount.world.guest), "qemu")
    xml = base.replace("<devices>", "<devices>" + AGENT_CHANNEL_XML)
    await mount.tree.set_domain_xml(vm.id, xml.encode())
    await mount.tree.set_property(vm.id, "ready", "agent")
    return vm


async def test_ready_agent_saves_the_hot_savestate_only_once_the_agent_answers(
    world: World,
) -> None:
    async with mounted(world) as mount:
        base = await with_agent_channel(mount, "base")
        await mount.tree.set_property(base.id, "hot_savestate", "1")
        await until(lambda: len(mount.libvirt_runs()) == 1)  # the runner booted
        [runner] = mount.libvirt_runs()
        await trio.sleep(1.0)  # its console said VMTREE-READY long ago: not enough
        assert "hot" not in base.savestates
        world.libvirt.start_agent(runner)
        await until(lambda: "hot" in base.savestates)
        await until(lambda: mount.libvirt_runs() == {})
        assert await mount.ctl("base", "disposable") == "base-disp1"
        assert "base-disp1: restored from hot savestate" in mount.events()


async def test_ready_agent_without_the_agent_channel_fails_at_once(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    async with mounted(world) as mount:
        plain = await mount.tree.create_vm("plain")  # the demo guest's description
        await mount.tree.set_property(plain.id, "ready", "agent")
        with caplog.at_level(logging.INFO, logger=LOGGER):
            await mount.tree.set_property(plain.id, "hot_savestate", "1")
            await until(lambda: "hot savestate failed" in mount.events(), timeout=3)
        assert (
            "plain: hot savestate failed: VM .hot-" in mount.events()
            and "ready is agent but its domain has no guest-agent channel" in mount.events()
        )
        assert "hot" not in plain.savestates
        await until(lambda: mount.libvirt_runs() == {})  # the runner was stopped


async def test_ready_agent_times_out_and_fails_when_the_vm_halts(world: World) -> None:
    world.libvirt.agent_delay = None  # the channel is there, no agent runs (the demo guest)
    async with mounted(world) as mount:
        vm = await with_agent_channel(mount, "work")
        await mount.ctl("work", "start")
        with pytest.raises(VmtreeError) as late:
            await mount.lifecycle.hot.wait_ready(vm, timeout=1.0)
        assert late.value.errno == errno.ETIMEDOUT
        assert late.value.reason == "VM work was not ready after 1 s"

        caught: list[VmtreeError] = []

        async def wait() -> None:
            try:
                await mount.lifecycle.hot.wait_ready(vm, timeout=30)
            except VmtreeError as e:
                caught.append(e)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.sleep(0.3)
            await mount.ctl("work", "kill")
        assert [(e.errno, e.reason) for e in caught] == [
            (errno.EIO, "VM work stopped before it was ready")
        ]

        world.libvirt.agent_delay = 0.2  # guests run an agent that answers after a moment
        await mount.ctl("work", "start")
        with trio.fail_after(5):
            await mount.lifecycle.hot.wait_ready(vm)


@pytest.mark.parametrize("pattern", ["(a|aa)+b", ".*login", "(x+x+)+y"])
async def test_a_hostile_ready_pattern_on_a_hostile_console_does_not_hold_the_daemon(
    world: World, pattern: str
) -> None:
    """Each would backtrack for hours in Python's re over one long line a guest printed
    (and re holds the GIL): RE2 searches the whole 1 MiB read in milliseconds."""
    async with mounted(world) as mount:
        vm = await mount.tree.create_vm("work")
        await mount.tree.set_property(vm.id, "ready", "console:" + pattern)
        await mount.ctl("work", "start")
        await until(lambda: "VMTREE-READY" in mount.console("work"))
        with open(mount.lifecycle.devices.console_path(vm), "ab") as console:
            console.write(b"b" + b"a" * (1 << 20) + b"x" * 64 + b"\n")
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await trio.sleep(0.05)
                ticks += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(tick)
            with trio.fail_after(10), pytest.raises(VmtreeError) as late:
                await mount.lifecycle.hot.wait_ready(vm, timeout=1.0)
            nursery.cancel_scope.cancel()
        assert late.value.errno == errno.ETIMEDOUT
        assert ticks >= 10  # the trio thread kept serving while the console was searched


# Start-up: what libvirt did while no daemon listened


def run_behind_the_trees_back(world: World, mount: Mount, vm: Vm) -> None:
    """Start the VM's domain through another client, as a crashed daemon left it."""
    virsh = other_connection(world)
    tree_id = mount.lifecycle.tree_id
    identity = Identity(
        domain.domain_name(tree_id, vm.id),
        domain.domain_uuid(tree_id, vm.id),
        str(world.source / f"console-{vm.id}.log"),
    )
    base = domain.demo_domain(str(world.guest), "qemu")
    virsh.create(domain.render(base, identity, 128, 1, []))
    virsh.close()


async def test_a_mount_takes_the_states_libvirt_has(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    async with mounted(world) as mount:
        for name in ("up", "down", "fedora"):
            await mount.tree.create_vm(name)
        await mount.ctl("up", "start")
        await mount.ctl("down", "start")
        await mount.ctl("fedora", "disposable")
        tree_id = mount.lifecycle.tree_id
        domains = {name: mount.domain(name) for name in ("up", "down", "fedora-disp1")}
        disposable = {v.id for v in mount.vm("fedora-disp1").volumes.values()}
    # No daemon: two guests power off, someone starts a domain with the tree's prefix.
    world.libvirt.power_off(domains["down"])
    world.libvirt.power_off(domains["fedora-disp1"])
    stranger = domain.domain_name(tree_id, 999)
    virsh = other_connection(world)
    virsh.create(f"<domain><name>{stranger}</name><uuid>0-0</uuid></domain>")
    virsh.close()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        async with mounted(world) as mount:
            assert mount.state("up") == "running"
            assert mount.state("down") == "halted"
            assert "fedora-disp1" not in mount.tree.ns.by_name
            assert not disposable & set(world.engine.inventory())
            assert mount.libvirt_runs() == {domains["up"]: "running", stranger: "running"}
            assert await mount.ctl("up", "shutdown") == "halted"  # it is the tree's again
    assert f"libvirt runs {stranger}, which is not a VM of this tree: left alone" in caplog.text
    assert "volatile VM fedora-disp1 stopped while vmtreefs was away: destroying it" in caplog.text
    assert "libvirt: 1 of 4 VMs running" in caplog.text


async def test_a_hot_savestate_runner_a_crash_left_running_is_stopped(world: World) -> None:
    async with mounted(world) as mount:
        base = await mount.tree.create_vm("base")
        runner = await mount.tree.make_instance(base.id, "hot")
        run_behind_the_trees_back(world, mount, runner)
        runner_domain = domain.domain_name(mount.lifecycle.tree_id, runner.id)
    async with mounted(world) as mount:
        await until(lambda: runner.id not in mount.tree.ns.by_id)
        assert runner_domain not in mount.libvirt_runs()
        assert sorted(mount.tree.ns.by_name) == ["base"]


async def test_a_save_libvirt_finished_after_the_crash_is_kept_and_the_vm_runs_on(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    name = await left_running(world, "w")
    pending = await save_cut_short(world, "w", stop=False)
    # The daemon died there; libvirt goes on writing the image for a while.
    world.libvirt.save_in_background(name, pending.image_path, 0.3)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        async with mounted(world) as mount:
            assert mount.state("w") == "running"
            assert world.libvirt.state(name) == "running"
            assert "s" in mount.vm("w").savestates
            assert mount.tree.store.load().open_intents == []
            assert "w: runs on from savestate s" in mount.events()
            assert mount.console("w").count("VMTREE-BOOT") == 1  # no boot since the first
    assert "interrupted save w s: libvirt is still at it, waiting" in caplog.text
    assert "interrupted save w s: libvirt finished the image, the savestate is kept" in caplog.text


async def test_a_save_cut_before_the_image_was_whole_is_undone_and_the_vm_resumed(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    name = await left_running(world, "w")
    own = set(world.engine.inventory())
    pending = await save_cut_short(world, "w", stop=False)
    # libvirt had begun the image when the daemon died, and gave up with it.
    Path(pending.image_path).write_bytes(saveimage.PARTIAL_MAGIC + bytes(100))
    assert world.libvirt.state(name) == "paused"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        async with mounted(world) as mount:
            assert mount.state("w") == "running"
            assert world.libvirt.state(name) == "running"
            assert mount.vm("w").savestates == {}
            assert not os.path.exists(pending.image_path)
            assert set(world.engine.inventory()) == own
            assert mount.tree.store.load().open_intents == []
    assert "interrupted save w s: the image is not whole, the savestate is rolled back" in (
        caplog.text
    )


async def test_an_interrupted_save_and_stop_keeps_the_savestate_and_the_vm_halted(
    world: World,
) -> None:
    name = await left_running(world, "w")
    pending = await save_cut_short(world, "w", stop=True)
    world.libvirt.save_in_background(name, pending.image_path, 0.0)
    async with mounted(world) as mount:
        assert "s" in mount.vm("w").savestates
        assert mount.state("w") == "halted"
        assert mount.libvirt_runs() == {}
        assert await mount.ctl("w", "restore s") == "s"


async def test_a_restore_cut_before_the_domain_ran_is_done_again(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    async with mounted(world) as mount:
        await mount.tree.create_vm("r")
        await mount.ctl("r", "start")
        await mount.ctl("r", "save base --stop")
        vm_id, saved = mount.vm("r").id, mount.vm("r").savestates["base"]
    with Store.open(world.source / "vmtree.db") as store, store.transaction() as tx:
        tx.begin_intent(
            "restore", {"what": "restore r base", "vm_id": vm_id, "savestate_id": saved.id}
        )
    with caplog.at_level(logging.INFO, logger=LOGGER):
        async with mounted(world) as mount:
            assert mount.state("r") == "running"
            assert "VMTREE-BOOT" not in mount.console("r")
            assert mount.tree.store.load().open_intents == []
            assert "interrupted restore r base" in mount.tree.recovery.rolled_forward
    assert "interrupted restore r base: the VM does not run, restoring it again" in caplog.text
