"""The reflink engine on a given block device (``-o engine=reflink,data=DEV``): vmtreefs
makes its XFS there and mounts it at SOURCE/pool, as it does an image. A device that
holds anything is refused before anything is written (a loop device stands in for a
disk). The tree on such a device is used in tests/fs/test_dmthin_ioerrors.py, in the
guest: mkfs.xfs of a device stats every mount point, so a hung FUSE mount elsewhere on
a shared host would hang it."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.mounts import MountFailed
from tests.helpers.tree import Tree

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
