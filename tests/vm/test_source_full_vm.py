"""SOURCE full under running VMs: ``save``, ``start`` and ``disposable`` refuse with
ENOSPC or work whole, the VMs run on, and everything works again once there is room.

SOURCE holds what the VM commands write besides the volumes: a savestate's memory
image (``SOURCE/savestates``), each VM's console log and runtime files
(``SOURCE/run``), and the store. SOURCE is a small XFS of its own here, filled to
the last block; the mount point and the daemon's log are elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.crash.test_kill_vm_ops import running_domains, vms_running, wait_alive
from tests.fs.test_source_full import fill, fsck
from tests.helpers.images import mounted_image
from tests.vm.conftest import VmTree, mounted_vm_tree

READY = "VMTREE-READY"


@pytest.fixture
def small_source_tree(libvirt_running: None, demo_guest: Path) -> Iterator[VmTree]:
    with (
        mounted_image("xfs", "300M") as small,
        mounted_vm_tree(lambda w: VmTree(w, demo_guest, small / "source"), "1G") as tree,
    ):
        yield tree


def attempt(tree: VmTree, vm: str, command: str) -> str:
    """The ctl result line, or ``ENOSPC``; any other error fails the test."""
    try:
        return tree.ctl(vm, command)
    except OSError as e:
        assert e.errno == 28, f"ctl {vm} {command!r}: {e} (not ENOSPC)\n{tree.log()[-3000:]}"
        return "ENOSPC"


def test_vm_commands_on_a_full_source(small_source_tree: VmTree) -> None:
    tree, vms = small_source_tree, small_source_tree.vms
    os.mkdir(vms / "w")
    os.mkdir(vms / "h")
    os.mkdir(vms / "d")
    tree.ctl("w", "start")
    tree.wait_console("w", READY)
    before = set(os.listdir(vms))
    filler = tree.source / "filler"
    fill(filler)

    saved = attempt(tree, "w", "save s1")
    started = attempt(tree, "h", "start")
    disposable = attempt(tree, "d", "disposable")
    results = {"save": saved, "start": started, "disposable": disposable}
    print(f"\nSOURCE full: {results}")
    assert "ENOSPC" in results.values(), "SOURCE was not full for any VM command"
    # w runs on whatever the save did, and its console goes on.
    assert tree.state("w") == "running"
    assert (saved == "ENOSPC") == (not (vms / "w" / "savestates" / "s1").exists())
    assert tree.state("h") == ("halted" if started == "ENOSPC" else "running")
    made = set(os.listdir(vms)) - before
    assert made == (set() if disposable == "ENOSPC" else {disposable}), made
    assert len(running_domains(tree)) == len(vms_running(tree)), "a domain the tree does not run"
    wait_alive(tree, "w")
    status = tree.status()
    assert (status["inventory"], status["open_intents"]) == ("ok", "0"), status
    log = tree.log()
    for name, result in results.items():  # each refusal's reason, with whose ctl it was
        if result == "ENOSPC":
            vm = "w" if name == "save" else "h" if name == "start" else "d"
            line = next((ln for ln in log.splitlines() if f"refused write: {vm}/ctl" in ln), "")
            assert "No space left on device" in line and "ENOSPC" in line, log[-3000:]
    assert "Traceback" not in log, log[-3000:]

    filler.unlink()
    if saved == "ENOSPC":
        assert tree.ctl("w", "save s1") == "s1"
    if started == "ENOSPC":
        tree.ctl("h", "start")
    tree.wait_console("h", READY)
    tree.ctl("w", "kill")
    assert tree.ctl("w", "restore s1") == "s1"
    assert tree.state("w") == "running"
    assert tree.ctl("d", "disposable").startswith("d-disp")
    for vm in [*sorted(set(os.listdir(vms)) - before), "w", "h"]:
        tree.ctl(vm, "kill")
    status = tree.status()
    assert (status["inventory"], status["open_intents"]) == ("ok", "0"), status
    tree.unmount()
    code, out = fsck(tree.source)
    assert code == 0, out
