"""Every VM restored from a savestate wakes with a VM generation ID of its own.

Restored VMs share the saved RAM, the guest kernel's RNG state included. QEMU's
vmgenid device tells the guest it was copied: a new generation ID, and Linux
reseeds its RNG. vmtreefs asks for the device at every start (``<genid/>``), so
savestates carry it, and libvirt gives each restore a new value. Checked as an
administrator would: ``virsh save-image-dumpxml`` of the memory image for the
saved ID, and QEMU's ``query-vm-generation-id`` for the ID each VM runs with.
"""

from __future__ import annotations

import json
import os
import time
import xml.etree.ElementTree as ET

import libvirt_qemu

from tests.helpers.libvirt import connection
from tests.helpers.tree import listing
from tests.vm.conftest import VmTree
from tests.vm.test_hot_savestates import wait_hot
from tests.vm.test_instances import wait_gone


def running_generation_id(vmtree: VmTree, vm: str) -> str:
    """`virsh qemu-monitor-command DOMAIN '{"execute":"query-vm-generation-id"}'`."""
    tree_id = vmtree.status()["tree_id"]
    vm_id = os.getxattr(vmtree.vms / vm, "user.vmtree.id").decode()
    with connection() as conn:
        dom = conn.lookupByName(f"vmtree-{tree_id}-{vm_id}")
        answer = libvirt_qemu.qemuMonitorCommand(dom, '{"execute":"query-vm-generation-id"}', 0)
    guid: str = json.loads(answer)["return"]["guid"]
    return guid


def saved_generation_id(vmtree: VmTree, vm: str, label: str) -> str:
    """`virsh save-image-dumpxml vms/VM/savestates/LABEL/memory`: the saved <genid>."""
    with connection() as conn:
        xml = conn.saveImageGetXMLDesc(str(vmtree.vms / vm / "savestates" / label / "memory"), 0)
    genid = ET.fromstring(xml).findtext("genid")
    assert genid, f"the savestate {vm}/{label} has no generation ID:\n{xml}"
    return genid


def test_disposables_and_restores_each_get_a_new_generation_id(vmtree: VmTree) -> None:
    vms = vmtree.vms
    (vms / "g").mkdir()
    os.setxattr(vms / "g", "user.vmtree.hot_savestate", b"1")
    wait_hot(vmtree, "g")
    hot = saved_generation_id(vmtree, "g", "hot")
    disposables = [vmtree.ctl("g", "disposable") for _ in range(2)]
    ids = [running_generation_id(vmtree, name) for name in disposables]
    assert len({hot, *ids}) == 3, f"hot savestate {hot}, disposables {ids}"
    for name in disposables:
        vmtree.ctl(name, "kill")
        wait_gone(vmtree, name)
    os.setxattr(vms / "g", "user.vmtree.hot_savestate", b"0")  # none remade below
    deadline = time.monotonic() + 30
    while "hot" in listing(vms / "g/savestates"):
        assert time.monotonic() < deadline
        time.sleep(0.2)

    # A VM's restore of its own savestate: the same memory again, each time a new ID.
    vmtree.ctl("g", "start")
    vmtree.wait_console("g", "VMTREE-READY")
    booted = running_generation_id(vmtree, "g")
    vmtree.ctl("g", "save s --stop")
    assert saved_generation_id(vmtree, "g", "s") == booted
    seen = {hot, *ids, booted}
    for _ in range(2):
        assert vmtree.ctl("g", "restore s") == "s"
        now = running_generation_id(vmtree, "g")
        assert now not in seen, f"restore of s runs with {now}, seen before"
        seen.add(now)
        vmtree.ctl("g", "kill")
        vmtree.wait_state("g", "halted")
