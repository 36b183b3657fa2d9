"""Mounting, unmounting, engine choice, refusals of a bad SOURCE, and recovery at mount."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.images import is_mountpoint, loop_devices, mounted_image
from tests.helpers.mounts import Daemon, MountFailed
from tests.helpers.tree import Tree, head, listing
from vmtreefs.app.fuseconn import running

VMTREEFS = [sys.executable, "-m", "vmtreefs"]


def vmtreefs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VMTREEFS, *args], capture_output=True, text=True, timeout=300)


def test_mount_returns_once_ready_and_umount_waits(workdir: Path) -> None:
    source, vms = workdir / "source", workdir / "vms"
    source.mkdir()
    vms.mkdir()
    done = vmtreefs("mount", str(source), str(vms))
    try:
        assert done.returncode == 0, done.stderr
        assert "mounted" in done.stdout
        os.mkdir(vms / "demo")  # answers at once: no sleep needed
        pid = json.loads((source / "vmtreefs.lock").read_text())["pid"]
        assert running(pid)
    finally:
        done = vmtreefs("umount", str(vms))
    assert done.returncode == 0, done.stderr
    assert not is_mountpoint(vms)
    assert not running(pid)
    assert "mounted" in (source / "vmtreefs.log").read_text()


def test_init_picks_reflink_in_place_on_xfs(workdir: Path) -> None:
    source = workdir / "source"
    source.mkdir()
    done = vmtreefs("init", str(source))
    assert done.returncode == 0, done.stderr
    assert "reflink in place" in done.stdout
    assert stat.S_IMODE((source / "vmtree.db").stat().st_mode) == 0o600
    assert not (source / "reflink.xfs").exists()
    again = vmtreefs("init", str(source))
    assert again.returncode != 0 and "already" in again.stderr


def test_init_makes_an_xfs_image_where_there_is_no_reflink() -> None:
    with mounted_image("ext4", "2G") as ext4:
        tree = Tree(ext4)
        done = vmtreefs("init", str(tree.source), "--size", "1G")
        assert done.returncode == 0, done.stderr
        assert "ext4" in done.stdout and "XFS image" in done.stdout
        image = tree.source / "reflink.xfs"
        assert image.stat().st_size == 1024**3
        assert image.stat().st_blocks * 512 < 100 * 1024**2  # sparse
        tree.mount()
        try:
            assert is_mountpoint(tree.source / "pool")
            assert "XFS image" in tree.status()["engine_detail"]
            os.mkdir(tree.vms / "a")
            (tree.vms / "a" / "volumes" / "private.img").write_bytes(b"kept")
        finally:
            tree.unmount()
        assert not is_mountpoint(tree.source / "pool")
        assert loop_devices(image) == []
        tree.mount()  # re-attached at every mount
        try:
            assert head(tree.vms / "a" / "volumes" / "private.img", 4) == b"kept"
        finally:
            tree.unmount()
        assert loop_devices(image) == []


def test_a_source_that_is_a_file_is_refused(workdir: Path) -> None:
    (workdir / "file").write_text("x")
    (workdir / "vms").mkdir()
    done = vmtreefs("mount", str(workdir / "file"), str(workdir / "vms"))
    assert done.returncode != 0
    assert "not a directory" in done.stderr
    assert not is_mountpoint(workdir / "vms")


def test_an_unwritable_source_is_refused() -> None:
    with mounted_image("xfs", "300M") as mnt:
        (mnt / "source").mkdir()
        (mnt / "vms").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        try:
            done = vmtreefs("mount", str(mnt / "source"), str(mnt / "vms"))
            assert done.returncode != 0
            assert "not writable" in done.stderr
            assert not is_mountpoint(mnt / "vms")
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)


def test_a_source_already_mounted_is_refused(tree: Tree) -> None:
    other = tree.workdir / "other"
    other.mkdir()
    done = vmtreefs("mount", str(tree.source), str(other))
    assert done.returncode != 0
    assert "already in use" in done.stderr and "EBUSY" in done.stderr
    second = Daemon(tree.source, other)
    with pytest.raises(MountFailed, match="already in use"):
        second.start()
    assert not is_mountpoint(other)


def test_a_non_empty_foreign_source_is_refused(workdir: Path) -> None:
    source = workdir / "source"
    source.mkdir()
    (source / "precious.txt").write_text("not ours")
    done = vmtreefs("init", str(source))
    assert done.returncode != 0 and "not empty" in done.stderr
    (workdir / "vms").mkdir()
    done = vmtreefs("mount", str(source), str(workdir / "vms"))
    assert done.returncode != 0 and "not empty" in done.stderr
    assert os.listdir(source) == ["precious.txt"]  # nothing of ours left behind
    assert (source / "precious.txt").read_text() == "not ours"


def test_unknown_mount_option_is_refused(workdir: Path) -> None:
    (workdir / "source").mkdir()
    (workdir / "vms").mkdir()
    done = vmtreefs("mount", str(workdir / "source"), str(workdir / "vms"), "-o", "bogus")
    assert done.returncode != 0 and "unknown mount option 'bogus'" in done.stderr


def test_kill9_then_remount(tree: Tree) -> None:
    os.mkdir(tree.vms / "a")
    (tree.vms / "a" / "volumes" / "private.img").write_bytes(b"before the crash")
    assert tree.daemon is not None
    tree.daemon.kill9()
    tree.daemon = None
    tree.mount()
    assert listing(tree.vms) == ["a"]
    assert head(tree.vms / "a" / "volumes" / "private.img", 16) == b"before the crash"
    assert tree.status()["inventory"] == "ok"


def test_open_intents_are_recovered_and_inventory_differences_shown(tree: Tree) -> None:
    os.mkdir(tree.vms / "a")
    tree.unmount()
    pool = tree.source / "pool"
    # A creation that crashed after the engine made its volume: must be rolled back.
    (pool / "vol-500.img").write_bytes(b"")
    # A volume nobody knows: must be reported, not silently deleted.
    (pool / "vol-900.img").write_bytes(b"")
    db = sqlite3.connect(tree.source / "vmtree.db")
    with db:
        db.execute(
            "INSERT INTO intents (kind, payload, created) VALUES (?, ?, ?)",
            ("create", json.dumps({"what": "mkdir ghost", "volumes": [{"id": 500}]}), time.time()),
        )
    db.close()
    tree.mount()
    status = tree.status()
    assert status["recovered_intents"] == "1"
    assert status["open_intents"] == "0"
    assert status["inventory"] == "1 differences"
    raw = (tree.vms / ".vmtree" / "status").read_text()
    assert "inventory_difference: engine volume 900 belongs to no VM or savestate" in raw
    assert not (pool / "vol-500.img").exists()
    assert (pool / "vol-900.img").exists()
    assert "ghost" not in listing(tree.vms)
    assert "recovered" in (tree.vms / ".vmtree" / "events").read_text()


def test_sigterm_unmounts_cleanly() -> None:
    with mounted_image("ext4", "1G") as ext4:
        tree = Tree(ext4)
        tree.mount(["size=512M"])
        assert tree.daemon is not None and tree.daemon.process is not None
        os.mkdir(tree.vms / "a")
        tree.daemon.process.send_signal(signal.SIGTERM)
        assert tree.daemon.process.wait(timeout=60) == 0
        assert not is_mountpoint(tree.vms)
        assert not is_mountpoint(tree.source / "pool")
        assert loop_devices(tree.source / "reflink.xfs") == []
        assert "received SIGTERM: unmounting" in tree.log()
        tree.mount()
        try:
            assert listing(tree.vms) == ["a"]
        finally:
            tree.unmount()


def mount_options(mountpoint: Path) -> set[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mountpoint):
                sep = fields.index("-")
                return set(fields[5].split(",")) | set(fields[sep + 3].split(","))
    raise AssertionError(f"{mountpoint} is not mounted")


def test_allow_other_only_when_asked_for(workdir: Path) -> None:
    tree = Tree(workdir)
    tree.mount()
    try:
        options = mount_options(tree.vms)
        assert "default_permissions" in options
        assert "allow_other" not in options
    finally:
        tree.unmount()
    tree.mount(["allow_other"])
    try:
        assert {"default_permissions", "allow_other"} <= mount_options(tree.vms)
    finally:
        tree.unmount()
