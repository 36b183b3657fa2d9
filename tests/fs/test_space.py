"""A full pool: the operation gets ENOSPC and nothing half-made is left behind."""

from __future__ import annotations

import errno
import os

from tests.helpers.images import mounted_image
from tests.helpers.tree import Tree, listing


def test_a_full_pool_gives_enospc_and_leaves_nothing_half_made() -> None:
    with mounted_image("xfs", "300M") as workdir:
        tree = Tree(workdir)
        tree.mount()
        try:
            os.mkdir(tree.vms / "a")
            fd = os.open(tree.vms / "a" / "volumes" / "root.img", os.O_WRONLY)
            chunk = os.urandom(1 << 20)
            offset = 0
            try:
                with_room = True
                while with_room and offset < 1 << 30:
                    try:
                        os.pwrite(fd, chunk, offset)
                        offset += len(chunk)
                    except OSError as e:
                        assert e.errno == errno.ENOSPC
                        with_room = False
            finally:
                os.close(fd)
            assert not with_room, "the 300 MiB pool never filled"

            refused = None
            for i in range(200):
                try:
                    os.mkdir(tree.vms / f"b{i}")
                except OSError as e:
                    refused = e.errno
                    break
            assert refused == errno.ENOSPC
            made = listing(tree.vms)
            assert f"b{i}" not in made
            assert int(tree.status()["volumes"]) == 3 * len(made)
            assert len(list((tree.source / "pool").glob("vol-*.img"))) == 3 * len(made)
            assert "ENOSPC" in (tree.vms / ".vmtree" / "events").read_text()

            tree.remount()
            assert listing(tree.vms) == made
            status = tree.status()
            assert (status["inventory"], status["open_intents"]) == ("ok", "0")
        finally:
            tree.unmount()
