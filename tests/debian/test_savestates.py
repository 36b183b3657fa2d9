"""Savestates of a Debian guest that is busy writing, and disposables from a hot savestate.

The guest's writer reports each file on the serial console once it is fsync'd
(``SYNCED N``), so the test knows which files the guest was promised were on
disk; after a restore and a clean shutdown, the volumes are read through the
mount with e2fsprogs, as an administrator would check them.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.debian.conftest import DebianTree
from tests.debian.timings import TIMINGS
from tests.helpers.tree import listing

WRITER = (
    "mkdir -p /home/w; i=0; while :; do i=$((i+1)); "
    "printf 'file %s\\n' $i > /home/w/f$i; sync /home/w/f$i; "
    "echo SYNCED $i > /dev/ttyS0; sleep 0.2; done"
)
ROOT_PARTITION_OFFSET = 2048 * 512  # the image's one partition (scripts/build-debian-guest.sh)


def synced(tree: DebianTree, vm: str) -> list[int]:
    return [int(n) for n in re.findall(r"SYNCED (\d+)", tree.console(vm))]


def wait_synced(tree: DebianTree, vm: str, beyond: int, timeout: float = 180.0) -> int:
    deadline = time.monotonic() + timeout
    while not synced(tree, vm) or max(synced(tree, vm)) <= beyond:
        if time.monotonic() > deadline:
            raise AssertionError(f"{vm} reported no file past {beyond} in {timeout:.0f} s")
        time.sleep(0.3)
    return max(synced(tree, vm))


@contextmanager
def partition(image: Path, offset: int) -> Iterator[str]:
    """A read-only loop device on a partition of a volume file (read through the mount)."""
    loop = subprocess.run(
        ["losetup", "--read-only", "--find", "--show", "--offset", str(offset), str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        yield loop
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


def fsck(device: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["e2fsck", "-fn", str(device)], capture_output=True, text=True)


def test_a_savestate_of_a_writing_guest_restores_and_its_filesystems_are_clean(
    tree: DebianTree,
) -> None:
    vm = "writer"
    tree.appvm(vm)
    tree.boot(vm, "AppVM start to login")
    tree.run(vm, ["systemd-run", "--unit=writer", "/bin/sh", "-c", WRITER])
    reported = wait_synced(tree, vm, beyond=10)

    started = time.monotonic()
    assert tree.ctl(vm, "save mid") == "mid"
    assert tree.state(vm) == "running", "the VM keeps running"
    TIMINGS.add("save (512 MiB guest, writing)", time.monotonic() - started)
    # Files the savestate does not have: the restore takes the disks back before them.
    before_kill = wait_synced(tree, vm, beyond=max(synced(tree, vm)) + 5)
    tree.ctl(vm, "kill")

    started = time.monotonic()
    tree.ctl(vm, "restore mid")
    assert tree.state(vm) == "running"
    TIMINGS.add("restore", time.monotonic() - started)
    wait_synced(tree, vm, beyond=0)  # the console starts afresh at a restore
    resumed_at = min(synced(tree, vm))
    assert reported < resumed_at <= before_kill, (
        f"the restored guest goes on from the save (after {reported}), not from 1 "
        f"nor from the kill (at {before_kill}): it wrote {resumed_at} first"
    )
    wait_synced(tree, vm, beyond=resumed_at + 5)
    tree.sh(vm, "systemctl stop writer")
    last = max(synced(tree, vm))
    tree.shutdown(vm)

    volumes = tree.vms / vm / "volumes"
    checked = fsck(volumes / "private.img")
    assert checked.returncode == 0, f"e2fsck of private.img:\n{checked.stdout}{checked.stderr}"
    with partition(volumes / "root.img", ROOT_PARTITION_OFFSET) as root:
        checked = fsck(root)
        assert checked.returncode == 0, f"e2fsck of root.img:\n{checked.stdout}{checked.stderr}"

    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            ["debugfs", "-R", f"rdump /w {out}", str(volumes / "private.img")],
            capture_output=True,
            check=True,
        )
        files = {p.name: p.read_text() for p in Path(out, "w").iterdir()}
    missing = [n for n in range(1, last + 1) if files.get(f"f{n}") != f"file {n}\n"]
    assert not missing, f"files the guest had synced are missing or wrong: {missing}"


def test_disposables_from_a_hot_savestate_answer_the_agent_and_do_not_share_randomness(
    tree: DebianTree,
) -> None:
    dvm = tree.appvm("dvm")
    os.setxattr(dvm, "user.vmtree.ready", b"agent")
    started = time.monotonic()
    os.setxattr(dvm, "user.vmtree.hot_savestate", b"1")
    info = dvm / "savestates" / "hot" / "info"
    deadline = time.monotonic() + 600
    while not info.exists():
        assert time.monotonic() < deadline, f"no hot savestate in 600 s:\n{tree.log()[-3000:]}"
        time.sleep(1)
    TIMINGS.add("hot savestate made (boot to agent, save)", time.monotonic() - started)
    assert listing(tree.vms).count("dvm") == 1 and not any(
        n.startswith(".hot") for n in os.listdir(tree.vms)
    )

    names: list[str] = []
    took: list[float] = []

    def hand_out() -> None:
        began = time.monotonic()
        names.append(tree.ctl("dvm", "disposable"))
        took.append(time.monotonic() - began)

    threads = [threading.Thread(target=hand_out) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seconds in took:
        TIMINGS.add("disposable from hot savestate, 3 at once, ctl to running", seconds)
    assert sorted(names) == ["dvm-disp1", "dvm-disp2", "dvm-disp3"]

    randomness = set()
    for name in names:
        assert tree.state(name) == "running"
        began = time.monotonic()
        tree.wait_agent(name)
        TIMINGS.add("disposable running to agent answer", time.monotonic() - began)
        # The guest goes on from the saved moment (getty may print its prompt only now);
        # a boot would begin with the kernel's banner.
        assert "Linux version" not in tree.console(name), f"{name} booted instead of restoring"
        randomness.add(tree.sh(name, "head -c 32 /dev/urandom | od -An -tx1"))
    assert len(randomness) == 3, "each disposable's RNG was reseeded (a fresh generation ID)"

    for name in names:
        tree.shutdown(name)
    deadline = time.monotonic() + 60
    while any(n in listing(tree.vms) for n in names) or any(
        n in (tree.vms / ".vmtree" / "volatile").read_text() for n in names
    ):
        assert time.monotonic() < deadline, "disposables still there 60 s after they stopped"
        time.sleep(0.3)
