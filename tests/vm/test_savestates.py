"""Savestates with the real guest: memory and disks saved together, restored together.

The demo guest counts its boots on its private volume and ticks once a second
on its console, so a restore shows itself: the ticks go on from where the
save was, no boot happens, and the counter on disk is the one the saved
memory remembers, even after the VM booted again in between.
"""

from __future__ import annotations

import errno
import os

from tests.helpers.tree import error_of, head, listing
from tests.vm.conftest import VmTree


def counter(vmtree: VmTree, vm: str) -> bytes:
    return head(vmtree.vms / vm / "volumes/private.img", 32).split()[0]


def test_restore_goes_on_from_the_save_with_the_disks_of_that_moment(vmtree: VmTree) -> None:
    vms = vmtree.vms
    (vms / "s").mkdir()
    vmtree.ctl("s", "start")
    vmtree.wait_console("s", r"VMTREE-TICK 3\b")
    before = max(vmtree.ticks("s"))
    assert vmtree.ctl("s", "save first") == "first"
    assert vmtree.state("s") == "running"  # save without --stop: it runs on
    after = max(vmtree.ticks("s"))
    vmtree.wait_console("s", rf"VMTREE-TICK {after + 2}\b", timeout=30)

    saved = vms / "s/savestates/first"
    assert listing(vms / "s/savestates") == ["first"]
    assert sorted(os.listdir(saved)) == ["info", "memory", "volumes"]
    assert head(saved / "memory", 16) == b"LibvirtQemudSave"
    info = (saved / "info").read_text()
    assert "label: first\n" in info and "vm: s\n" in info and "paused: False\n" in info
    assert sorted(os.listdir(saved / "volumes"))[1::2] == [
        "private.img",
        "root.img",
        "volatile.img",
    ]
    assert head(saved / "volumes/private.img", 32).split()[0] == b"1"
    assert error_of(os.open, saved / "volumes/private.img", os.O_WRONLY) == errno.EROFS

    # A second boot moves the counter on disk to 2...
    vmtree.ctl("s", "kill")
    vmtree.ctl("s", "start")
    vmtree.wait_console("s", r"VMTREE-BOOT 2\b")
    vmtree.wait_console("s", r"VMTREE-READY")
    vmtree.ctl("s", "kill")
    assert counter(vmtree, "s") == b"2"

    # ...and the restore brings back the memory of boot 1 with the disk of boot 1.
    assert vmtree.ctl("s", "restore first") == "first"
    assert vmtree.state("s") == "running"
    first_tick = int(vmtree.wait_console("s", r"VMTREE-TICK (\d+)").group(1))
    assert before + 1 <= first_tick <= after + 1, (before, first_tick, after)
    assert "VMTREE-BOOT" not in vmtree.console("s"), "a restore must not boot"
    vmtree.ctl("s", "kill")
    assert counter(vmtree, "s") == b"1"
    assert head(saved / "volumes/private.img", 32).split()[0] == b"1", "the savestate kept"


def test_save_stop_rmdir_and_the_wrong_states(vmtree: VmTree) -> None:
    vms = vmtree.vms
    (vms / "t").mkdir()
    assert error_of(vmtree.ctl, "t", "save") == errno.EBUSY  # halted: nothing to save
    assert error_of(vmtree.ctl, "t", "restore") == errno.ENOENT  # no savestate yet
    vmtree.ctl("t", "start")
    vmtree.wait_console("t", r"VMTREE-READY")
    for bad in ("save -x", "save a b", "save hot", "save ../x", "restore a b"):
        assert error_of(vmtree.ctl, "t", bad) == errno.EINVAL, bad
    assert vmtree.ctl("t", "pause") == "paused"
    assert vmtree.ctl("t", "save p") == "p"
    assert vmtree.state("t") == "paused"  # a paused VM stays paused
    assert error_of(vmtree.ctl, "t", "save p") == errno.EEXIST
    assert error_of(vmtree.ctl, "t", "restore p") == errno.EBUSY  # not while it runs
    assert vmtree.ctl("t", "resume") == "running"
    label = vmtree.ctl("t", "save --stop")
    assert label[:2] == "20" and vmtree.state("t") == "halted"
    assert listing(vms / "t/savestates") == sorted(["p", label])

    images = vmtree.source / "savestates"
    assert len(os.listdir(images)) == 2
    vmtree.remount()
    assert listing(vms / "t/savestates") == sorted(["p", label])
    os.rmdir(vms / "t/savestates/p")
    assert listing(vms / "t/savestates") == [label]
    assert len(os.listdir(images)) == 1
    assert "rmdir t/savestates/p" in (vms / ".vmtree/events").read_text()

    assert vmtree.ctl("t", "restore") == label  # the newest
    vmtree.wait_console("t", r"VMTREE-TICK \d+")
    vmtree.ctl("t", "kill")
    os.rmdir(vms / "t")  # the VM goes with its savestates
    assert os.listdir(images) == []
    assert vmtree.status()["inventory"] == "ok"
    vmtree.remount()
    assert vmtree.status()["inventory"] == "ok"


def test_a_running_vm_cloned_through_a_savestate_runs_twice(vmtree: VmTree) -> None:
    vms = vmtree.vms
    (vms / "a").mkdir()
    vmtree.ctl("a", "start")
    vmtree.wait_console("a", r"VMTREE-TICK 2\b")
    assert vmtree.ctl("a", "save s") == "s"
    (vms / "a/clones/b").mkdir()
    assert listing(vms / "b/savestates") == ["s"]
    assert "linked_from: a\n" in (vms / "b/savestates/s/info").read_text()
    images = [
        vmtree.source / "savestates" / name for name in os.listdir(vmtree.source / "savestates")
    ]
    assert len(images) == 2 and len({os.stat(p).st_ino for p in images}) == 1  # a link, no copy

    assert vmtree.ctl("b", "restore s") == "s"
    assert vmtree.state("b") == "running" and vmtree.state("a") == "running"
    first = int(vmtree.wait_console("b", r"VMTREE-TICK (\d+)").group(1))
    assert first > 1 and "VMTREE-BOOT" not in vmtree.console("b")
    ticks_a = max(vmtree.ticks("a"))
    vmtree.wait_console("a", rf"VMTREE-TICK {ticks_a + 1}\b", timeout=30)  # both run
    vmtree.ctl("a", "kill")
    vmtree.ctl("b", "kill")
    assert counter(vmtree, "b") == b"1"
    os.rmdir(vms / "a")
    assert listing(vms / "b/savestates") == ["s"]  # b's savestate is its own
    assert os.stat(vms / "b/savestates/s/memory").st_size > 0
    assert vmtree.status()["inventory"] == "ok"
