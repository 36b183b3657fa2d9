"""The design's use cases for versioned VMs and templates, with the real guest.

The demo guest prints ``VMTREE-BOOT N`` (a counter it keeps on its private
volume) and ``VMTREE-ROOT TAG`` (what its root volume starts with), so each
test reads off the console which disks a VM really started from.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.helpers.tree import head, listing, write_at
from tests.vm.conftest import VmTree
from tests.vm.test_hot_savestates import wait_hot
from tests.vm.test_instances import volatile, wait_gone


def volume(vms: Path, vm: str, name: str) -> Path:
    return vms / vm / "volumes" / f"{name}.img"


def counter(vms: Path, vm: str) -> bytes:
    """The demo guest's boot counter on a private volume."""
    return head(volume(vms, vm, "private"), 32).strip(b" \n\0")


def boots(vmtree: VmTree, vm: str) -> tuple[int, str]:
    """Wait until the VM is up; its boot counter and the tag of its root volume."""
    boot = vmtree.wait_console(vm, r"VMTREE-BOOT (\d+)")
    root = vmtree.wait_console(vm, r"VMTREE-ROOT (\S+)")
    vmtree.wait_console(vm, r"VMTREE-READY")
    return int(boot.group(1)), root.group(1)


def test_amnesiac_instances_and_a_commit_at_shutdown(vmtree: VmTree) -> None:
    """An instance writes to its private volume; the next one starts clean. The head's
    shutdown commits what it wrote, and instances start from that from then on."""
    vms = vmtree.vms
    (vms / "app").mkdir()
    os.setxattr(vms / "app", "user.vmtree.versioned", b"1")
    assert os.readlink(vms / "app") == "app-v1"

    for expected in ("app-inst1", "app-inst2"):
        assert vmtree.ctl("app", "start") == expected  # through the alias: the newest version
        assert boots(vmtree, expected)[0] == 1, "an instance starts from the version, clean"
        assert os.readlink(vms / expected / "origin") == "../app-v1"
        assert vmtree.ctl(expected, "shutdown") == "halted"
        assert counter(vms, expected) == b"1"  # it did write
    assert counter(vms, "app-v1") == b""

    assert vmtree.ctl("app-next", "start") == "app-next"
    assert boots(vmtree, "app-next")[0] == 1
    assert vmtree.ctl("app-next", "shutdown") == "halted"  # commit = shutdown: app-v2
    assert os.readlink(vms / "app") == "app-v2"
    assert counter(vms, "app-v2") == b"1"
    assert listing(vms) == ["app", "app-inst1", "app-inst2", "app-next", "app-v2"]
    assert vmtree.ctl("app", "start") == "app-inst3"
    assert boots(vmtree, "app-inst3")[0] == 2, "the new version holds what the head wrote"
    assert vmtree.ctl("app-inst3", "kill") == "halted"

    # A kill does not commit (the disks may be half-written); commit = manual needs the command.
    os.setxattr(vms / "app-next", "user.vmtree.commit", b"manual")
    vmtree.ctl("app-next", "start")
    boots(vmtree, "app-next")
    assert vmtree.ctl("app-next", "shutdown") == "halted"
    assert os.readlink(vms / "app") == "app-v2"
    assert vmtree.ctl("app-next", "commit") == "app-v3"
    assert counter(vms, "app-v3") == b"2"


def test_template_based_vms_take_the_version_of_each_start(vmtree: VmTree) -> None:
    """A VM keeps the template version it started from until it restarts; one restored
    from a savestate keeps the savestate's; a version in use is kept until it is free."""
    vms = vmtree.vms
    (vms / "fedora").mkdir()
    write_at(volume(vms, "fedora", "root"), b"ROOTONE")
    os.setxattr(vms / "fedora", "user.vmtree.versioned", b"1")
    (vms / "work").mkdir()
    os.symlink("../fedora", vms / "work" / "template")

    vmtree.ctl("work", "start")
    assert boots(vmtree, "work") == (1, "ROOTONE")
    write_at(volume(vms, "fedora-next", "root"), b"ROOTTWO")
    assert vmtree.ctl("fedora-next", "commit") == "fedora-v2"
    # fedora-v1 is history now, but work runs from it: it waits, hidden.
    assert listing(vms) == ["fedora", "fedora-next", "fedora-v2", "work"]
    assert "fedora-v1" in volatile(vmtree)
    assert head(volume(vms, "work", "root"), 7) == b"ROOTONE"
    assert vmtree.ctl("work", "save before") == "before"
    info = (vms / "work/savestates/before/info").read_text()
    assert "template_version_name: .volatile-" in info and "fedora-v1" in info
    assert vmtree.ctl("work", "shutdown") == "halted"
    assert "fedora-v1" in volatile(vmtree), "the savestate still records it"

    vmtree.ctl("work", "start")
    assert boots(vmtree, "work") == (2, "ROOTTWO"), "a new start takes the newest version"
    assert vmtree.ctl("work", "shutdown") == "halted"

    assert vmtree.ctl("work", "restore before") == "before"
    assert head(volume(vms, "work", "root"), 7) == b"ROOTONE", "the savestate's version"
    tick = vmtree.wait_console("work", r"VMTREE-TICK (\d+)")
    assert "VMTREE-BOOT" not in vmtree.console("work") and int(tick.group(1)) > 0
    assert vmtree.ctl("work", "kill") == "halted"
    os.rmdir(vms / "work/savestates/before")
    wait_gone(vmtree, "fedora-v1")  # nothing uses it any more
    assert vmtree.status()["inventory"] == "ok"


def test_a_disposable_factory(vmtree: VmTree) -> None:
    """Each version gets its own hot savestate; disposables come from the newest, also
    while the head runs and changes; an old version goes with its last disposable."""
    vms = vmtree.vms
    (vms / "dvm").mkdir()
    write_at(volume(vms, "dvm", "root"), b"FACTORYONE")
    os.setxattr(vms / "dvm", "user.vmtree.versioned", b"1")
    os.setxattr(vms / "dvm-next", "user.vmtree.hot_savestate", b"1")  # and on dvm-v1
    assert os.getxattr(vms / "dvm-v1", "user.vmtree.hot_savestate") == b"1"
    wait_hot(vmtree, "dvm-v1")
    assert not (vms / "dvm-next/savestates/hot").exists(), "the head makes no hot savestate"

    first = vmtree.ctl("dvm", "disposable")
    assert first == "dvm-disp1"
    assert os.readlink(vms / first / "origin") == "../dvm-v1"
    vmtree.wait_console(first, r"VMTREE-TICK")
    assert "VMTREE-BOOT" not in vmtree.console(first), "restored, not booted"

    # The head runs and changes meanwhile; a commit of the running head makes v2.
    vmtree.ctl("dvm-next", "start")
    assert boots(vmtree, "dvm-next")[1] == "FACTORYONE"
    assert vmtree.ctl("dvm", "disposable") == "dvm-disp2"  # still v1's hot savestate
    assert vmtree.ctl("dvm-next", "shutdown") == "halted"  # commits dvm-v2
    assert os.readlink(vms / "dvm") == "dvm-v2"
    assert "dvm-v1" in volatile(vmtree), "its disposables still run"
    wait_hot(vmtree, "dvm-v2")

    third = vmtree.ctl("dvm", "disposable")
    assert third == "dvm-disp3"
    assert os.readlink(vms / third / "origin") == "../dvm-v2"
    vmtree.wait_console(third, r"VMTREE-TICK")
    assert vmtree.state(third) == "running"
    assert not os.path.lexists(vms / first / "origin")  # its origin is hidden, waiting
    for name in (first, "dvm-disp2"):
        assert vmtree.ctl(name, "shutdown") == "halted"
        wait_gone(vmtree, name)
    wait_gone(vmtree, "dvm-v1")
    assert vmtree.ctl(third, "kill") == "halted"
    wait_gone(vmtree, third)
    assert listing(vms) == ["dvm", "dvm-next", "dvm-v2"]
    assert vmtree.status()["inventory"] == "ok"


def test_backup_of_a_running_vm(vmtree: VmTree) -> None:
    """Savestate, clone, resume both: the clone's volumes are what the VM held at the save."""
    vms = vmtree.vms
    (vms / "srv").mkdir()
    vmtree.ctl("srv", "start")
    boots(vmtree, "srv")
    assert vmtree.ctl("srv", "save nightly") == "nightly"  # srv runs on
    assert vmtree.ctl("srv", "clone backup") == "backup"
    assert vmtree.ctl("backup", "restore nightly") == "nightly"
    assert vmtree.state("srv") == vmtree.state("backup") == "running"
    vmtree.wait_console("backup", r"VMTREE-TICK")
    with open(volume(vms, "backup", "private"), "rb") as f:
        copy = f.read()
    assert copy[:32].strip(b" \n\0") == b"1"
    assert len(copy) == volume(vms, "srv", "private").stat().st_size
    # The next night's backup is incremental: nightly's copy plus the ranges the map lists.
    assert vmtree.ctl("srv", "save second") == "second"
    saved = vms / "srv" / "savestates"
    newer = saved / "second" / "volumes" / "private.img"
    ranges = [
        tuple(map(int, line.split()))
        for line in (saved / "second" / "volumes" / "private.changes" / "srv@nightly")
        .read_text()
        .splitlines()
    ]
    rebuilt = bytearray((saved / "nightly" / "volumes" / "private.img").read_bytes())
    with open(newer, "rb") as f:
        for offset, length in ranges:
            f.seek(offset)
            rebuilt[offset : offset + length] = f.read(length)
    assert bytes(rebuilt) == newer.read_bytes()
    for name in ("srv", "backup"):
        assert vmtree.ctl(name, "shutdown") == "halted"


def test_a_hot_savestate_is_remade_when_the_template_gets_a_new_version(vmtree: VmTree) -> None:
    vms = vmtree.vms
    (vms / "base").mkdir()
    write_at(volume(vms, "base", "root"), b"BASEONE")
    os.setxattr(vms / "base", "user.vmtree.versioned", b"1")
    (vms / "app").mkdir()
    os.symlink("../base", vms / "app" / "template")
    os.setxattr(vms / "app", "user.vmtree.hot_savestate", b"1")
    first = wait_hot(vmtree, "app")
    assert "template_version_name: base-v1\n" in first
    write_at(volume(vms, "base-next", "root"), b"BASETWO")
    made = os.stat(vms / "app/savestates/hot/info").st_mtime
    assert vmtree.ctl("base-next", "commit") == "base-v2"
    assert "template_version_name: base-v2\n" in wait_hot(vmtree, "app", after=made)
    wait_gone(vmtree, "base-v1")  # the old hot savestate recorded it; it went with it
    name = vmtree.ctl("app", "disposable")
    vmtree.wait_console(name, r"VMTREE-TICK")
    assert head(volume(vms, name, "root"), 7) == b"BASETWO"
    assert vmtree.ctl(name, "kill") == "halted"
