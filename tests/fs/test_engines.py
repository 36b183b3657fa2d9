"""The same user story on every engine, through the mount: the engine contract end to end.

The dm-thin case is skipped where the kernel has no dm-thin; ``tests/dmthin``
runs it inside a guest that has one and fails if it is skipped there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.images import loop_devices
from tests.helpers.tree import Tree, head, listing, read_at, write_at
from vmtreefs.engine.select import dmthin_available

MiB = 1024 * 1024


@pytest.mark.parametrize(
    "engine", [pytest.param("reflink", id="reflink"), pytest.param("dm-thin", id="dmthin")]
)
def test_the_user_story_on_every_engine(workdir: Path, engine: str) -> None:
    if engine == "dm-thin" and not dmthin_available()[0]:
        pytest.skip("no dm-thin in this kernel; tests/dmthin runs this in a guest")
    tree = Tree(workdir)
    tree.mount([f"engine={engine}", "size=1G"])
    try:
        status = tree.status()
        assert status["engine"] == engine.replace("-", "")
        if engine == "dm-thin":
            assert 0 < int(status["metadata_used"]) < int(status["metadata_size"])
        vms = tree.vms
        os.mkdir(vms / "origin")
        origin = vms / "origin" / "volumes" / "private.img"
        write_at(origin, b"O" * MiB, 0)
        os.mkdir(vms / "origin" / "clones" / "clone")
        clone = vms / "clone" / "volumes" / "private.img"
        assert read_at(clone, MiB, 0) == b"O" * MiB
        write_at(clone, b"C" * MiB, 0)
        write_at(origin, b"o" * MiB, 4 * MiB)
        assert read_at(origin, MiB, 0) == b"O" * MiB
        assert read_at(clone, MiB, 4 * MiB) == bytes(MiB)
        grown = vms / "clone" / "volumes" / "data.img"
        grown.write_bytes(b"new volume")
        os.truncate(vms / "clone" / "volumes" / "root.img", 11 * 1024**3)
        os.rmdir(vms / "origin")
        assert listing(vms) == ["clone"]
        assert read_at(clone, MiB, 0) == b"C" * MiB
        assert int(os.getxattr(vms / "clone", "user.vmtree.usage")) >= MiB  # its own writes
        assert tree.status()["inventory"] == "ok"
    finally:
        tree.unmount()
    tree.mount()
    try:
        assert read_at(tree.vms / "clone" / "volumes" / "private.img", MiB, 0) == b"C" * MiB
        assert head(tree.vms / "clone" / "volumes" / "data.img", 10) == b"new volume"
        assert (tree.vms / "clone" / "volumes" / "root.img").stat().st_size == 11 * 1024**3
        status = tree.status()
        assert (status["inventory"], status["vms"], status["volumes"]) == ("ok", "1", "4")
    finally:
        daemon = tree.daemon
        tree.unmount()
    assert daemon is not None and daemon.process is not None
    assert daemon.process.returncode == 0, daemon.log()  # thin_check after the teardown passed
    for name in ("data.img", "metadata.img"):
        pool_file = tree.source / "thin" / name
        if pool_file.exists():
            assert loop_devices(pool_file) == []  # the pool came down with the mount
