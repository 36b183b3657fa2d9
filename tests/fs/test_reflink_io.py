"""The reflink engine's own XFS: shut down under a mount, and on a given block device.

An XFS that shuts itself down (as after an I/O error in its log; ``xfs_io -x -c
shutdown`` does the same at once) makes every change fail with EIO and a logged
reason saying what to do; after an unmount, ``vmtreefs fsck --repair`` mounts the XFS
again and the tree works.

On a given block device (``-o engine=reflink,data=DEV``) vmtreefs makes its XFS there and
mounts it at SOURCE/pool, as it does an image. A device that holds anything is refused
before anything is written (a loop device stands in for a disk). A tree on such a
device is used in tests/fs/test_dmthin_ioerrors.py, in the guest: mkfs.xfs of a device
stats every mount point, so a hung FUSE mount elsewhere on a shared host would hang it."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fs.test_fsck import fsck
from tests.helpers.images import mounted_image
from tests.helpers.mounts import MountFailed
from tests.helpers.tree import Tree, ctl, error_of, listing, read_at, write_at

MiB = 1 << 20


@pytest.fixture
def disk(workdir: Path) -> Iterator[str]:
    image = workdir / "disk.img"
    with open(image, "wb") as f:
        f.truncate(320 * MiB)
    dev = subprocess.run(
        ["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_a_device_that_holds_a_filesystem_is_refused(workdir: Path, disk: str) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-F", disk], check=True)
    tree = Tree(workdir)
    with pytest.raises(MountFailed) as refused:
        tree.mount(["engine=reflink", f"data={disk}"])
    assert f"{disk} holds ext4: vmtreefs makes its XFS only on an empty device" in str(
        refused.value
    )
    assert "vmtree.db" not in os.listdir(tree.source)


def test_a_shut_down_xfs_gives_eio_and_comes_back_after_fsck_repair() -> None:
    with mounted_image("ext4", "1G") as ext4:  # no reflink here: the XFS image layout
        tree = Tree(ext4)
        tree.mount(["size=320M"])
        try:
            vms = tree.vms
            os.mkdir(vms / "a")
            write_at(vms / "a" / "volumes" / "private.img", b"kept", MiB)
            os.mkdir(vms / "tpl")
            os.setxattr(vms / "tpl", "user.vmtree.versioned", b"1")
            subprocess.run(
                ["xfs_io", "-x", "-c", "shutdown", str(tree.source / "pool")], check=True
            )
            assert error_of(os.mkdir, vms / "a" / "clones" / "b") == errno.EIO
            assert error_of(os.rmdir, vms / "a") == errno.EIO
            assert error_of(ctl, vms, "tpl-next", "commit") == errno.EIO
            assert error_of(read_at, vms / "a" / "volumes" / "private.img", 4, MiB) == errno.EIO
            assert listing(vms) == ["a", "tpl", "tpl-next", "tpl-v1"]
        finally:
            tree.unmount()
        log = tree.log()
        assert "has shut down after an I/O error" in log
        assert "the tree's next mount mounts its XFS again" in log
        assert "refused mkdir 'b': the filesystem holding" in log
        code, out = fsck(tree, "--repair")
        assert code in (0, 1), out
        code, out = fsck(tree)
        assert code == 0, out
        tree.mount()
        try:
            assert read_at(tree.vms / "a" / "volumes" / "private.img", 4, MiB) == b"kept"
            os.mkdir(tree.vms / "a" / "clones" / "b")
            ctl(tree.vms, "tpl-next", "commit")
        finally:
            tree.unmount()
