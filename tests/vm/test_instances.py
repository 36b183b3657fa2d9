"""Immutable VMs run as instances, disposables go when they stop, rmdir of a running VM waits.

All with the real guest under libvirt; a VM that "goes" is checked the way a
user would: its name is no longer listed, `.vmtree/volatile` no longer shows
it, and the engine holds no volume the store does not know (inventory ok).
"""

from __future__ import annotations

import errno
import os
import time

from tests.helpers.libvirt import connection
from tests.helpers.tree import error_of, listing, write_at
from tests.vm.conftest import VmTree


def wait_gone(vmtree: VmTree, name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while name in listing(vmtree.vms) or name in volatile(vmtree):
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} is still there after {timeout} s:\n{volatile(vmtree)}")
        time.sleep(0.2)


def volatile(vmtree: VmTree) -> str:
    return (vmtree.vms / ".vmtree/volatile").read_text()


def destroy_behind_our_back(vmtree: VmTree, tree_id: str) -> None:
    """The guest stops without vmtreefs asking: as if it powered off or crashed."""
    with connection() as conn:
        for domain in conn.listAllDomains(0):
            if domain.name().startswith(f"vmtree-{tree_id}-"):
                domain.destroy()


def test_an_immutable_vm_runs_as_instances_and_disposables_go(vmtree: VmTree) -> None:
    vms = vmtree.vms
    (vms / "gold").mkdir()
    os.setxattr(vms / "gold", "user.vmtree.immutable", b"1")
    assert error_of(write_at, vms / "gold/volumes/private.img", b"x") == errno.EROFS

    assert vmtree.ctl("gold", "start") == "gold-inst1"
    assert vmtree.state("gold-inst1") == "running" and vmtree.state("gold") == "halted"
    assert os.readlink(vms / "gold-inst1/origin") == "../gold"
    assert error_of(os.setxattr, vms / "gold", "user.vmtree.immutable", b"0") == errno.EBUSY

    assert vmtree.ctl("gold", "disposable") == "gold-disp1"
    assert "gold-disp1 running\n" in volatile(vmtree)
    vmtree.wait_console("gold-disp1", r"VMTREE-READY")
    assert vmtree.ctl("gold-disp1", "shutdown") == "halted"
    wait_gone(vmtree, "gold-disp1")
    assert vmtree.status()["inventory"] == "ok"

    vmtree.ctl("gold-inst1", "kill")
    assert "gold-inst1" in listing(vms)  # an instance stays until it is removed
    os.setxattr(vms / "gold", "user.vmtree.immutable", b"0")  # nothing depends on it now
    os.setxattr(vms / "gold", "user.vmtree.immutable", b"1")
    os.rmdir(vms / "gold-inst1")
    assert vmtree.ctl("gold", "start") == "gold-inst2"  # numbers never repeat
    assert error_of(vmtree.ctl, "gold-inst2", "disposable") == errno.EBUSY  # it runs
    vmtree.ctl("gold-inst2", "kill")
    events = (vms / ".vmtree/events").read_text()
    assert "disposable gold-disp1 of gold" in events
    assert "instance gold-inst2 of gold" in events


def test_rmdir_of_a_running_vm_hides_it_until_it_stops(vmtree: VmTree) -> None:
    vms = vmtree.vms
    (vms / "r").mkdir()
    (vms / "r/clones/c").mkdir()
    os.symlink("r", vms / "current")
    vmtree.ctl("r", "start")
    volumes_before = int(vmtree.status()["volumes"])
    os.rmdir(vms / "r")
    assert listing(vms) == ["c"]  # the name goes at once, with its alias
    assert not (vms / "c/origin").exists()  # its clone keeps its data, loses its origin
    assert "(removed)" in volatile(vmtree)
    (vms / "r").mkdir()  # the name is free again
    vmtree.remount()  # still hidden, still waiting
    assert "(removed)" in volatile(vmtree) and listing(vms) == ["c", "r"]
    destroy_behind_our_back(vmtree, vmtree.status()["tree_id"])
    deadline = time.monotonic() + 30
    while "(removed)" in volatile(vmtree):
        assert time.monotonic() < deadline, volatile(vmtree)
        time.sleep(0.2)
    assert int(vmtree.status()["volumes"]) == volumes_before  # 3 gone, 3 new for the new r
    assert vmtree.status()["inventory"] == "ok"


def test_disposables_are_cleaned_up_across_a_daemon_crash(vmtree: VmTree) -> None:
    vms = vmtree.vms
    (vms / "d").mkdir()
    tree_id = vmtree.status()["tree_id"]
    assert vmtree.ctl("d", "disposable") == "d-disp1"
    assert vmtree.daemon is not None
    vmtree.daemon.kill9()
    destroy_behind_our_back(vmtree, tree_id)  # it stops while vmtreefs is dead
    vmtree.mount()
    assert listing(vms) == ["d"]
    assert volatile(vmtree) == ""

    assert vmtree.ctl("d", "disposable") == "d-disp2"
    assert vmtree.daemon is not None
    vmtree.daemon.kill9()
    vmtree.mount()  # it still runs, and still goes when it stops
    assert vmtree.state("d-disp2") == "running"
    assert vmtree.ctl("d-disp2", "kill") == "halted"
    wait_gone(vmtree, "d-disp2")
    assert vmtree.status()["inventory"] == "ok"
    assert "volatile VM d-disp1 stopped while vmtreefs was away" in vmtree.log()
