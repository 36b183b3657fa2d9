"""Hot savestates with the real guest: made in the background, restored as disposables.

A disposable restored from a hot savestate shows it: its console has ticks but
no boot (the memory came back), and several of them run at once from one
image, each under its own libvirt name and uuid, on its own disks.
"""

from __future__ import annotations

import os
import re
import time
import xml.etree.ElementTree as ET

from tests.helpers.libvirt import connection
from tests.helpers.tree import listing
from tests.vm.conftest import VmTree
from tests.vm.test_instances import volatile, wait_gone

HOT_TIMEOUT = 240.0  # a background boot to READY, then the save, under TCG


def wait_hot(vmtree: VmTree, vm: str, after: float = 0.0) -> str:
    """Wait for savestates/hot (made after ``after``, a time.time()); returns its info."""
    info = vmtree.vms / vm / "savestates/hot/info"
    deadline = time.monotonic() + HOT_TIMEOUT
    while True:
        try:
            if os.stat(info).st_mtime > after:
                return info.read_text()
        except FileNotFoundError:
            pass  # none yet, or the old one just dropped to be made again
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no hot savestate of {vm} after {HOT_TIMEOUT} s:\n{vmtree.log()[-3000:]}"
            )
        time.sleep(0.5)


def test_three_disposables_run_at_once_from_one_hot_savestate(vmtree: VmTree) -> None:
    vms = vmtree.vms
    (vms / "f").mkdir()
    os.setxattr(vms / "f", "user.vmtree.hot_savestate", b"1")
    os.setxattr(vms / "f", "user.vmtree.immutable", b"1")  # it may be made immutable meanwhile
    assert listing(vms) == ["f"]  # the VM booted for it is hidden
    info = wait_hot(vmtree, "f")
    assert "label: hot\n" in info
    assert vmtree.state("f") == "halted"
    assert listing(vms) == ["f"] and volatile(vmtree) == ""  # the runner is gone

    names = [vmtree.ctl("f", "disposable") for _ in range(3)]
    assert names == ["f-disp1", "f-disp2", "f-disp3"]
    for name in names:
        assert vmtree.state(name) == "running"
        # It runs on from the saved moment: ticks, and no boot. (The save came at READY,
        # which may be just before the first tick: the first tick seen may be 1.)
        vmtree.wait_console(name, r"VMTREE-TICK \d+", timeout=60)
        assert "VMTREE-BOOT" not in vmtree.console(name), f"{name} booted instead of restoring"
    tree_id = vmtree.status()["tree_id"]
    with connection() as conn:
        domains = [d for d in conn.listAllDomains(0) if d.name().startswith(f"vmtree-{tree_id}-")]
        assert len(domains) == 3 and all(d.isActive() for d in domains)
        assert len({d.UUIDString() for d in domains}) == 3
        disks = set()
        consoles = set()
        for d in domains:
            desc = ET.fromstring(d.XMLDesc(0))
            disks |= {s.get("file") for s in desc.findall("devices/disk/source")}
            consoles |= {s.get("path") for s in desc.findall("devices/serial/source")}
        assert len(disks) == 9 and len(consoles) == 3  # three volumes each, none shared

    assert vmtree.ctl("f-disp2", "shutdown") == "halted"
    wait_gone(vmtree, "f-disp2")
    for name in ("f-disp1", "f-disp3"):
        vmtree.ctl(name, "kill")
        wait_gone(vmtree, name)
    assert listing(vms) == ["f"]
    assert vmtree.status()["inventory"] == "ok"

    # An immutable VM's start restores the hot savestate too.
    assert vmtree.ctl("f", "start") == "f-inst1"
    vmtree.wait_console("f-inst1", r"VMTREE-TICK \d+", timeout=60)
    assert "VMTREE-BOOT" not in vmtree.console("f-inst1")
    vmtree.ctl("f-inst1", "kill")


def test_a_running_vm_is_saved_when_ready_and_again_after_it_stops(vmtree: VmTree) -> None:
    vms = vmtree.vms
    (vms / "m").mkdir()
    os.setxattr(vms / "m", "user.vmtree.ready", b"console:VMTREE-TICK 2")
    vmtree.ctl("m", "start")
    os.setxattr(vms / "m", "user.vmtree.hot_savestate", b"1")
    first = wait_hot(vmtree, "m")
    vmtree.wait_state("m", "running", timeout=30)  # saved in place, and it runs on
    assert re.search(r"VMTREE-TICK 2\b", vmtree.console("m"))
    made = os.stat(vms / "m/savestates/hot/info").st_mtime
    vmtree.ctl("m", "shutdown")
    second = wait_hot(vmtree, "m", after=made)  # remade from what the disks are now
    assert first != second
    assert vmtree.state("m") == "halted" and listing(vms) == ["m"]
    os.setxattr(vms / "m", "user.vmtree.hot_savestate", b"0")
    deadline = time.monotonic() + 30
    while "hot" in listing(vms / "m/savestates"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
