"""VMs run for real: the demo guest under libvirt and QEMU, driven through ctl files.

What a user checks from a shell: `state` says what libvirt says without anyone
asking libvirt, the console shows the guest booting and ticking, the private
volume keeps the guest's boot counter across runs, and each command refused
in the wrong state gets the errno the docs promise.
"""

from __future__ import annotations

import errno
import os
import time

from tests.helpers.libvirt import connection
from tests.helpers.tree import error_of, head, read_at, write_at
from tests.vm.conftest import VmTree

CUSTOM_DOMAIN = """<domain type='qemu'>
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>{guest}/vmlinuz</kernel>
    <initrd>{guest}/initrd.img</initrd>
    <cmdline>console=ttyS0 quiet</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <devices/>
</domain>
"""


def test_start_pause_resume_shutdown_and_the_boot_counter(vmtree: VmTree) -> None:
    vms = vmtree.vms
    (vms / "demo").mkdir()
    assert vmtree.state("demo") == "halted"
    assert vmtree.ctl("demo", "start") == "demo"
    assert vmtree.state("demo") == "running"
    vmtree.wait_console("demo", r"VMTREE-READY")
    assert "VMTREE-BOOT 1\n" in vmtree.console("demo")

    # While it runs: no volume writes, no description changes, no second start.
    assert error_of(write_at, vms / "demo/volumes/private.img", b"x") == errno.EBUSY
    assert error_of((vms / "demo/domain.xml").write_text, "<domain/>") == errno.EBUSY
    assert error_of(vmtree.ctl, "demo", "start") == errno.EBUSY
    assert error_of(vmtree.ctl, "demo", "resume") == errno.EBUSY

    vmtree.wait_console("demo", r"VMTREE-TICK 2\b")
    assert vmtree.ctl("demo", "pause") == "paused"
    assert vmtree.state("demo") == "paused"
    ticks = vmtree.ticks("demo")
    time.sleep(3)
    assert vmtree.ticks("demo") == ticks, "a paused guest went on ticking"
    assert vmtree.ctl("demo", "resume") == "running"
    vmtree.wait_console("demo", rf"VMTREE-TICK {ticks[-1] + 1}\b", timeout=30)

    assert vmtree.ctl("demo", "shutdown") == "halted"
    assert vmtree.state("demo") == "halted"
    assert "VMTREE-SHUTDOWN" in vmtree.console("demo")
    assert error_of(vmtree.ctl, "demo", "shutdown") == errno.EBUSY

    # The guest's own writes to its private volume stay: the counter it keeps there.
    assert head(vms / "demo/volumes/private.img", 32).split()[0] == b"1"
    assert vmtree.ctl("demo", "start") == "demo"
    vmtree.wait_console("demo", r"VMTREE-READY")
    assert "VMTREE-BOOT 2\n" in vmtree.console("demo")
    assert "VMTREE-BOOT 1\n" not in vmtree.console("demo"), "the console is per run"
    assert vmtree.ctl("demo", "kill") == "halted"
    assert vmtree.state("demo") == "halted"
    assert head(vms / "demo/volumes/private.img", 32).split()[0] == b"2"
    events = (vms / ".vmtree/events").read_text()
    for line in (
        "demo: started",
        "demo: paused",
        "demo stopped: shut down",
        "demo stopped: killed",
    ):
        assert line in events


def test_state_follows_libvirt_when_someone_else_stops_the_vm(vmtree: VmTree) -> None:
    (vmtree.vms / "work").mkdir()
    vmtree.ctl("work", "start")
    tree_id = vmtree.status()["tree_id"]
    with connection() as conn:
        names = [d.name() for d in conn.listAllDomains(0)]
        mine = [n for n in names if n.startswith(f"vmtree-{tree_id}-")]
        assert len(mine) == 1, names  # libvirt knows the VM by an internal name only
        assert "work" not in mine[0]
        conn.lookupByName(mine[0]).destroy()
    vmtree.wait_state("work", "halted", timeout=10)
    deadline = time.monotonic() + 10  # the event line follows the state by a moment
    while "work stopped: killed" not in (vmtree.vms / ".vmtree/events").read_text():
        assert time.monotonic() < deadline, (vmtree.vms / ".vmtree/events").read_text()
        time.sleep(0.1)


def test_a_guest_that_ignores_shutdown_is_forced_off(vmtree: VmTree, demo_guest: object) -> None:
    vms = vmtree.vms
    (vms / "deaf").mkdir()
    # Without ACPI the guest never hears the power button.
    (vms / "deaf/domain.xml").write_text(CUSTOM_DOMAIN.format(guest=demo_guest))
    vmtree.ctl("deaf", "start")
    vmtree.wait_console("deaf", r"VMTREE-READY")
    assert error_of(vmtree.ctl, "deaf", "shutdown --timeout x") == errno.EINVAL
    started = time.monotonic()
    assert vmtree.ctl("deaf", "shutdown --timeout 3") == "halted: forced off after 3 s"
    assert time.monotonic() - started < 30
    assert vmtree.state("deaf") == "halted"
    assert "VMTREE-SHUTDOWN" not in vmtree.console("deaf")


def test_volatile_volumes_are_empty_at_every_start(vmtree: VmTree) -> None:
    vms = vmtree.vms
    (vms / "v").mkdir()
    write_at(vms / "v/volumes/volatile.img", b"left from last time", 4096)
    write_at(vms / "v/volumes/private.img", b"kept", 4096)
    vmtree.ctl("v", "start")
    vmtree.wait_console("v", r"VMTREE-READY")
    vmtree.ctl("v", "kill")
    assert read_at(vms / "v/volumes/volatile.img", 19, 4096) == bytes(19)
    assert read_at(vms / "v/volumes/private.img", 4, 4096) == b"kept"


def test_a_running_vm_outlives_a_remount(vmtree: VmTree) -> None:
    (vmtree.vms / "long").mkdir()
    vmtree.ctl("long", "start")
    vmtree.wait_console("long", r"VMTREE-TICK 1\b")
    vmtree.remount()
    assert vmtree.state("long") == "running"
    ticks = vmtree.ticks("long")
    vmtree.wait_console("long", rf"VMTREE-TICK {ticks[-1] + 1}\b", timeout=30)
    assert vmtree.ctl("long", "kill") == "halted"
    assert "libvirt: 1 of 1 VMs running" in vmtree.log()


def test_domain_xml_is_checked_kept_and_cloned(vmtree: VmTree, demo_guest: object) -> None:
    vms = vmtree.vms
    (vms / "d").mkdir()
    default = (vms / "d/domain.xml").read_text()
    assert "<domain type='qemu'>" in default and f"{demo_guest}/vmlinuz" in default
    for bad in (
        "<domain",
        "<vm type='qemu'/>",
        "<domain type='lxc'><os><type>exe</type></os></domain>",
    ):
        assert error_of((vms / "d/domain.xml").write_text, bad) == errno.EINVAL, bad
        assert (vms / "d/domain.xml").read_text() == default, "a refused write changed nothing"
    custom = CUSTOM_DOMAIN.format(guest=demo_guest)
    (vms / "d/domain.xml").write_text(custom)
    assert (vms / "d/domain.xml").read_text() == custom
    os.mkdir(vms / "d/clones/e")
    assert (vms / "e/domain.xml").read_text() == custom
    vmtree.remount()
    assert (vms / "d/domain.xml").read_text() == custom
    (vms / "d/domain.xml").write_text("")
    assert (vms / "d/domain.xml").read_text() == default
    os.setxattr(vms / "e", "user.vmtree.immutable", b"1")
    assert error_of((vms / "e/domain.xml").write_text, custom) == errno.EROFS
    assert "domain.xml: not well-formed XML" in vmtree.log()
