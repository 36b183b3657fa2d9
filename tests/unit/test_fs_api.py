"""The request handlers called directly, without a kernel (S3QL's t3_fs_api style).

These check the bookkeeping the kernel relies on but cannot easily show through
a mount: lookup counts, readdir cookies across a full reply buffer, stable inode
numbers, and that nothing but FUSEError ever leaves a handler.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest

from vmtreefs.core.tree import VmTree
from vmtreefs.engine.reflink import ReflinkEngine
from vmtreefs.fs import inodes
from vmtreefs.fs.operations import Operations
from vmtreefs.store import Store


class Ctx:
    uid = 0
    gid = 0
    pid = 1
    umask = 0o022


CTX: Any = Ctx()


@pytest.fixture
def ops(tmp_path: Path) -> Iterator[Operations]:
    engine = ReflinkEngine.initialise(tmp_path, "inplace")
    engine.start()
    store = Store.open(tmp_path / "vmtree.db")
    tree = VmTree(store, engine)
    tree.recover()
    try:
        yield Operations(tree)
    finally:
        store.close()
        engine.stop()


def test_inode_numbers_round_trip() -> None:
    for vm_id in (1, 2, 10**9):
        for entry in inodes.VmEntry:
            node = inodes.decode(inodes.vm_inode(vm_id, entry))
            assert node == inodes.VmNode(vm_id, entry)
    assert inodes.decode(inodes.volume_inode(42)) == inodes.VolumeNode(42, inodes.VolumeEntry.FILE)
    assert inodes.decode(inodes.CONTROL_STATUS) == inodes.Control(inodes.CONTROL_STATUS)
    assert inodes.decode(0) is None
    assert inodes.decode(inodes.vm_inode(1) + 15) is None  # an entry number never handed out
    assert inodes.decode(inodes.volume_inode(1) + 3) is None


async def test_lookup_counts_follow_lookup_mkdir_and_forget(ops: Operations) -> None:
    attr = await ops.mkdir(pyfuse3.ROOT_INODE, b"a", 0o755, CTX)
    assert ops.lookup_counts[attr.st_ino] == 1
    again = await ops.lookup(pyfuse3.ROOT_INODE, b"a", CTX)
    assert again.st_ino == attr.st_ino
    assert ops.lookup_counts[attr.st_ino] == 2
    await ops.forget([(attr.st_ino, 1)])
    assert ops.lookup_counts[attr.st_ino] == 1
    await ops.forget([(attr.st_ino, 1)])
    assert attr.st_ino not in ops.lookup_counts


async def test_failed_lookup_takes_no_reference(ops: Operations) -> None:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.lookup(pyfuse3.ROOT_INODE, b"nope", CTX)
    assert info.value.errno == errno.ENOENT
    assert ops.lookup_counts == {}


async def test_dot_and_dotdot_lookups(ops: Operations) -> None:
    vm = await ops.mkdir(pyfuse3.ROOT_INODE, b"a", 0o755, CTX)
    volumes = await ops.lookup(vm.st_ino, b"volumes", CTX)
    assert (await ops.lookup(volumes.st_ino, b"..", CTX)).st_ino == vm.st_ino
    assert (await ops.lookup(vm.st_ino, b"..", CTX)).st_ino == pyfuse3.ROOT_INODE
    assert (await ops.lookup(vm.st_ino, b".", CTX)).st_ino == vm.st_ino


async def test_readdir_resumes_from_its_cookie(
    ops: Operations, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [f"vm{i:03d}".encode() for i in range(50)]
    for name in names:
        await ops.mkdir(pyfuse3.ROOT_INODE, name, 0o755, CTX)

    listed: list[bytes] = []
    room = 0
    cookie = 0

    def reply(token: object, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        nonlocal room, cookie
        if room == 0:
            return False  # the kernel's buffer is full: this entry was not taken
        room -= 1
        listed.append(name)
        cookie = next_id
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    fh = await ops.opendir(pyfuse3.ROOT_INODE, CTX)
    while True:
        before = len(listed)
        room = 7
        await ops.readdir(fh, cookie, None)  # type: ignore[arg-type]
        if len(listed) == before:
            break
        if before < 20 <= len(listed):
            await ops.rmdir(pyfuse3.ROOT_INODE, b"vm049", CTX)  # removed mid-listing
            await ops.mkdir(pyfuse3.ROOT_INODE, b"late", 0o755, CTX)  # made mid-listing
    assert listed[0] == b".vmtree"
    assert sorted(set(listed)) == sorted(listed)  # nothing twice
    assert set(names[:49]) <= set(listed)
    assert b"vm049" not in listed
    assert listed[-1] == b"late"  # newer entries have higher cookies: seen, not skipped


async def test_unexpected_errors_become_eio(
    ops: Operations, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def explode(raw_name: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ops.tree, "create_vm", explode)
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.mkdir(pyfuse3.ROOT_INODE, b"a", 0o755, CTX)
    assert info.value.errno == errno.EIO


async def test_refusals_are_fuse_errors_with_the_model_errno(ops: Operations) -> None:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.mkdir(pyfuse3.ROOT_INODE, b"bad name", 0o755, CTX)
    assert info.value.errno == errno.EINVAL
    assert "refused mkdir 'bad name'" in ops.tree.journal.events.text()


async def test_stale_handles_and_inodes(ops: Operations) -> None:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.read(12345, 0, 10)
    assert info.value.errno == errno.EBADF
    attr = await ops.mkdir(pyfuse3.ROOT_INODE, b"a", 0o755, CTX)
    await ops.rmdir(pyfuse3.ROOT_INODE, b"a", CTX)
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.getattr(attr.st_ino, CTX)
    assert info.value.errno == errno.ENOENT
