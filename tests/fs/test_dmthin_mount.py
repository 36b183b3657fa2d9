"""dm-thin through the mount: a full pool, given block devices, bad devices, a foreign pool,
and a kill -9 of the daemon.

Skipped where the kernel has no dm-thin; ``tests/dmthin`` runs them inside a guest with
a real dm-thin and fails if any is skipped there.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fs.test_fsck import fsck
from tests.helpers.mounts import MountFailed
from tests.helpers.tree import Tree, error_of, listing, read_at, write_at
from vmtreefs.app.source import open_source
from vmtreefs.engine.base import EngineError
from vmtreefs.engine.dmthin import DmThinEngine
from vmtreefs.engine.select import dmthin_available

MiB = 1 << 20


@pytest.fixture(autouse=True)
def dm_cleanup(workdir: Path) -> Iterator[None]:
    """Skip without dm-thin; afterwards remove the dm devices and loops this test left."""
    ok, why = dmthin_available()
    if not ok:
        pytest.skip(f"no dm-thin here ({why}); tests/dmthin runs this in a guest")
    before = set(dm_names())
    yield
    left = [n for n in dm_names() if n not in before and n.startswith(("vmtree-", "foreign-"))]
    for name in sorted(left, key=lambda n: n.endswith("-pool") or n.startswith("foreign-")):
        subprocess.run(["dmsetup", "remove", "--retry", name], capture_output=True)
    for dev in loops_under(workdir):
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def dm_names() -> list[str]:
    out = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True).stdout
    return [
        line.split()[0] for line in out.splitlines() if line.strip() and "No devices" not in line
    ]


def loops_under(directory: Path) -> list[str]:
    out = subprocess.run(
        ["losetup", "--noheadings", "-O", "NAME,BACK-FILE"], capture_output=True, text=True
    ).stdout
    found = []
    for line in out.splitlines():
        fields = line.split(None, 1)
        if len(fields) == 2 and fields[1].strip().startswith(str(directory)):
            found.append(fields[0])
    return found


def loop_device(path: Path, size: int) -> str:
    """A loop device over a new sparse file: a stand-in for a disk partition."""
    with open(path, "wb") as f:
        f.truncate(size)
    return subprocess.run(
        ["losetup", "-f", "--show", str(path)], check=True, capture_output=True, text=True
    ).stdout.strip()


def test_a_full_pool_gives_enospc_and_a_clone_leaves_nothing(workdir: Path) -> None:
    tree = Tree(workdir)
    tree.mount(["engine=dm-thin", "size=128M"])
    try:
        vms = tree.vms
        os.mkdir(vms / "filler")
        os.mkdir(vms / "keep")
        write_at(vms / "keep" / "volumes" / "private.img", b"kept")
        root = vms / "filler" / "volumes" / "root.img"
        fd = os.open(root, os.O_WRONLY)
        failure = None
        try:
            for offset in range(0, 256 * MiB, MiB):
                os.pwrite(fd, b"\xaa" * MiB, offset)
        except OSError as e:
            failure = e
        finally:
            try:
                os.close(fd)
            except OSError as e:
                failure = failure or e
        assert failure is not None and failure.errno == errno.ENOSPC, failure

        assert error_of(os.mkdir, vms / "keep" / "clones" / "copy") == errno.ENOSPC
        assert listing(vms) == ["filler", "keep"]
        status = tree.status()
        assert (status["inventory"], status["volumes"], status["open_intents"]) == ("ok", "6", "0")
        assert "ENOSPC" in (vms / ".vmtree" / "events").read_text()

        os.close(os.open(root, os.O_WRONLY | os.O_TRUNC))  # discard the filler's data
        os.mkdir(vms / "keep" / "clones" / "copy")
        assert read_at(vms / "copy" / "volumes" / "private.img", 4) == b"kept"
    finally:
        tree.unmount()
    assert "is full: writes and new snapshots get ENOSPC" in tree.log()


def test_given_devices_hold_a_tree_across_remounts(workdir: Path) -> None:
    data = loop_device(workdir / "disk-data", 256 * MiB)
    meta = loop_device(workdir / "disk-meta", 48 * MiB)  # thin_metadata_size asks 40
    tree = Tree(workdir)
    devices = [f"data={data}", f"metadata={meta}"]
    tree.mount(devices)
    try:
        assert tree.status()["engine"] == "dmthin"
        assert data in tree.status()["engine_detail"]
        os.mkdir(tree.vms / "a")
        write_at(tree.vms / "a" / "volumes" / "private.img", b"on a disk", 5 * MiB)
        os.mkdir(tree.vms / "a" / "clones" / "b")
    finally:
        tree.unmount()
    assert not (tree.source / "thin" / "data.img").exists()
    tree.mount()  # the devices are recorded in the store
    try:
        assert read_at(tree.vms / "b" / "volumes" / "private.img", 9, 5 * MiB) == b"on a disk"
        assert tree.status()["inventory"] == "ok"
    finally:
        tree.unmount()


def refusal(tree: Tree, options: list[str]) -> str:
    """What the daemon logged for a mount that must fail."""
    already = len(tree.log())
    with pytest.raises(MountFailed):
        tree.mount(options)
    tree.unmount()
    return tree.log()[already:]


def assert_nothing_made(tree: Tree) -> None:
    assert not {"vmtree.db", "thin"} & set(os.listdir(tree.source))


def refused_devices(data: str, metadata: str) -> str:
    """Why the pool's device checks refuse (the code a mount runs before writing anything)."""
    with pytest.raises(EngineError) as refused:
        DmThinEngine.check_request("devices", 0, data, metadata)
    return str(refused.value)


def test_bad_devices_are_refused_before_anything_is_written(workdir: Path) -> None:
    tree = Tree(workdir)
    data = loop_device(workdir / "disk-data", 256 * MiB)
    meta = loop_device(workdir / "disk-meta", 48 * MiB)  # thin_metadata_size asks 40
    small_data = loop_device(workdir / "disk-small-data", 32 * MiB)
    small_meta = loop_device(workdir / "disk-small-meta", 1 * MiB)

    # Through the mount once: the refusal reaches the user, and SOURCE stays empty.
    log = refusal(tree, ["data=/dev/vmtree-no-such-disk", f"metadata={meta}"])
    assert "data device '/dev/vmtree-no-such-disk' does not exist (ENOENT)" in log
    assert_nothing_made(tree)

    assert "is not a block device" in refused_devices(str(workdir / "disk-data"), meta)
    assert "a pool needs at least" in refused_devices(small_data, meta)
    assert f"metadata device {small_meta} has 1048576 bytes" in refused_devices(data, small_meta)
    holder = os.open(data, os.O_RDONLY | os.O_EXCL)  # as a mounted filesystem would
    try:
        assert f"data device {data} is in use" in refused_devices(data, meta)
    finally:
        os.close(holder)
    subprocess.run(["mkswap", data], check=True, capture_output=True)
    assert "holds swap" in refused_devices(data, meta)
    subprocess.run(["wipefs", "-a", data], check=True, capture_output=True)

    # Another program's pool on these devices: its metadata carries the thin superblock.
    table = f"0 {256 * MiB // 512} thin-pool {meta} {data} 128 0"
    subprocess.run(["dmsetup", "create", "foreign-pool", "--table", table], check=True)
    subprocess.run(["dmsetup", "remove", "foreign-pool"], check=True)
    assert "already holds a dm-thin pool's metadata" in refused_devices(data, meta)

    with open(meta, "r+b") as f:  # what the message tells the owner to do
        f.write(bytes(4096))
    tree.mount([f"data={data}", f"metadata={meta}"])
    tree.unmount()


def test_a_pool_changed_by_another_program_is_refused(workdir: Path) -> None:
    tree = Tree(workdir)
    tree.mount(["engine=dm-thin", "size=128M"])
    try:
        os.mkdir(tree.vms / "a")
        write_at(tree.vms / "a" / "volumes" / "private.img", b"mine")
        pool = tree.status()["engine_detail"].split()[2]
    finally:
        tree.unmount()
    data, meta = (tree.source / "thin" / n for n in ("data.img", "metadata.img"))
    loops = [
        subprocess.run(["losetup", "-f", "--show", str(p)], check=True, capture_output=True)
        .stdout.decode()
        .strip()
        for p in (data, meta)
    ]
    table = f"0 {data.stat().st_size // 512} thin-pool {loops[1]} {loops[0]} 128 0"
    subprocess.run(["dmsetup", "create", pool, "--table", table], check=True)
    status = subprocess.run(["dmsetup", "status", pool], check=True, capture_output=True)
    ours = int(status.stdout.split()[3])
    subprocess.run(["dmsetup", "message", pool, "0", f"set_transaction_id {ours} 999"], check=True)

    log = refusal(tree, [])
    assert "carries transaction id 999" in log and "not this tree's pool" in log
    status = subprocess.run(["dmsetup", "status", pool], check=True, capture_output=True)
    assert int(status.stdout.split()[3]) == 999  # left as the other program made it

    subprocess.run(["dmsetup", "message", pool, "0", f"set_transaction_id 999 {ours}"], check=True)
    tree.mount()
    try:
        assert read_at(tree.vms / "a" / "volumes" / "private.img", 4) == b"mine"
    finally:
        tree.unmount()


def test_kill_9_leaves_every_acknowledged_change(workdir: Path) -> None:
    tree = Tree(workdir)
    tree.mount(["engine=dm-thin", "size=128M"])
    try:
        os.mkdir(tree.vms / "a")
        write_at(tree.vms / "a" / "volumes" / "private.img", b"before the crash")
        os.mkdir(tree.vms / "a" / "clones" / "b")
        write_at(tree.vms / "b" / "volumes" / "private.img", b"B")
        os.symlink("b", tree.vms / "latest")
        assert tree.daemon is not None
        tree.daemon.kill9()
        tree.daemon = None
        tree.mount()  # the pool was left assembled: it is taken over, not rebuilt
        assert listing(tree.vms) == ["a", "b", "latest"]
        assert read_at(tree.vms / "a" / "volumes" / "private.img", 16) == b"before the crash"
        assert read_at(tree.vms / "latest" / "volumes" / "private.img", 16) == (b"Before the crash")
        status = tree.status()
        assert (status["inventory"], status["open_intents"]) == ("ok", "0")
    finally:
        tree.unmount()


def ctl(vms: Path, command: str) -> str:
    """Write a command to .vmtree/ctl and read its result back from the same open file."""
    with open(vms / ".vmtree" / "ctl", "r+b", buffering=0) as f:
        f.write(command.encode() + b"\n")
        return f.read().decode().strip()


def test_a_full_pool_grows_and_keeps_its_data(workdir: Path) -> None:
    tree = Tree(workdir)
    tree.mount(["engine=dm-thin", "size=64M"])
    try:
        vms = tree.vms
        os.mkdir(vms / "a")
        root = vms / "a" / "volumes" / "root.img"
        fd = os.open(root, os.O_WRONLY)
        try:
            with pytest.raises(OSError) as full:
                for offset in range(0, 96 * MiB, MiB):
                    os.pwrite(fd, b"\xab" * MiB, offset)
                os.fsync(fd)
            assert full.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        assert int(tree.status()["pool_free"]) == 0
        assert error_of(ctl, vms, "grow-pool 32M") == errno.EINVAL  # it only grows

        assert ctl(vms, "grow-pool 128M") == f"pool size {128 * MiB}"
        assert int(tree.status()["pool_size"]) == 128 * MiB
        write_at(root, b"\xcd" * (32 * MiB), 64 * MiB)  # room again
        assert read_at(root, MiB, 80 * MiB) == b"\xcd" * MiB
    finally:
        tree.unmount()
    tree.mount()  # the new size is recorded: the pool assembles at 128 MiB
    try:
        assert int(tree.status()["pool_size"]) == 128 * MiB
        assert read_at(tree.vms / "a" / "volumes" / "root.img", MiB, 80 * MiB) == b"\xcd" * MiB
        assert "grew the pool to 128.0 MiB" in (tree.vms / ".vmtree" / "events").read_text()
    finally:
        daemon = tree.daemon
        tree.unmount()
    assert daemon is not None and daemon.process is not None
    assert daemon.process.returncode == 0, tree.log()  # thin_check passed after the teardown


def test_versions_history_and_revert_on_thin_devices(workdir: Path) -> None:
    """Each version is a thin snapshot of the head; dropped history frees its devices."""
    tree = Tree(workdir)
    tree.mount(["engine=dm-thin", "size=128M"])
    try:
        vms = tree.vms
        os.mkdir(vms / "tpl")
        private = vms / "tpl" / "volumes" / "private.img"
        write_at(private, b"one")
        os.setxattr(vms / "tpl", "user.vmtree.preserve_history", b"1")
        os.setxattr(vms / "tpl", "user.vmtree.versioned", b"1")
        head = vms / "tpl-next" / "volumes" / "private.img"
        for text in (b"two", b"six"):
            write_at(head, text)
            fd = os.open(vms / "tpl-next" / "ctl", os.O_RDWR)
            os.write(fd, b"commit\n")
            os.close(fd)
        assert [read_at(vms / f"tpl-v{n}" / "volumes" / "private.img", 3) for n in (1, 2, 3)] == [
            b"one",
            b"two",
            b"six",
        ]
        fd = os.open(vms / "tpl-next" / "ctl", os.O_RDWR)
        os.write(fd, b"revert v1\n")
        assert os.read(fd, 100) == b"reverted to tpl-v1; what it held before is tpl-v4\n"
        os.close(fd)
        assert read_at(head, 3) == b"one"
        os.setxattr(vms / "tpl-next", "user.vmtree.preserve_history", b"0")
        assert listing(vms) == ["tpl", "tpl-next", "tpl-v4"]
        status = tree.status()
        assert (status["inventory"], status["volumes"], status["open_intents"]) == ("ok", "6", "0")
        tree.remount()
        assert read_at(vms / "tpl" / "volumes" / "private.img", 3) == b"six"
        assert tree.status()["inventory"] == "ok"
    finally:
        tree.unmount()


def test_fsck_adopts_an_orphan_thin_device_and_checks_the_metadata(workdir: Path) -> None:
    tree = Tree(workdir)
    tree.mount(["engine=dm-thin", "size=128M"])
    os.mkdir(tree.vms / "a")
    tree.unmount()
    status, out = fsck(tree)
    assert status == 0, out
    assert "thin_check found the pool's metadata sound" in out  # the pool's, once down
    assert "checked: dmthin: thin_check of a metadata snapshot of the live pool: sound" in out
    store, engine, _ = open_source(tree.source)  # a thin device the store never heard of
    try:
        engine.create(9999, 4 * MiB)
    finally:
        engine.stop()
        store.close()
    status, out = fsck(tree)
    assert status == 4 and "1 engine volumes no VM owns: 9999" in out, out
    assert fsck(tree, "--repair")[0] == 1
    assert fsck(tree)[0] == 0
    tree.mount()
    try:
        assert listing(tree.vms) == ["a", "lost-found"]
        assert (tree.vms / "lost-found" / "volumes" / "vol-9999.img").stat().st_size == 4 * MiB
    finally:
        tree.unmount()
