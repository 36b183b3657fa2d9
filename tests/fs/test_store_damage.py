"""A damaged store: pages of a real tree's ``vmtree.db`` overwritten while it is unmounted.

The mount (in the foreground, and in the background that prints its log's end)
must refuse with EUCLEAN, the reason and the way back, and write nothing;
``vmtreefs fsck`` must report it (exit 4) and repair nothing. The damaged pages
are found with SQLite's ``dbstat``: the header page, a leaf in the middle of a
table's b-tree, that b-tree's interior page, and an index page, each
overwritten with random bytes; and one name changed in an index, which only
``integrity_check`` sees. Putting the file back (a backup) mounts again.
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from tests.helpers.images import is_mountpoint, mounted_image
from tests.helpers.mounts import MountFailed
from tests.helpers.tree import Tree, listing

VMS = 60  # three volume rows each: the volumes table needs interior pages


@pytest.fixture(scope="module")
def pristine() -> Iterator[tuple[Path, list[str]]]:
    """A real tree's store, made through a mount and unmounted; and its VMs."""
    with mounted_image("xfs", "1G") as workdir:
        tree = Tree(workdir)
        tree.mount(["libvirt=none"])
        try:
            os.mkdir(tree.vms / "base")
            for n in range(VMS):
                os.mkdir(tree.vms / "base" / "clones" / f"c{n}")
            os.symlink("c1", tree.vms / "stable")
            names = listing(tree.vms)
        finally:
            tree.unmount()
        yield workdir, names


def run(*argv: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "vmtreefs", *argv], capture_output=True, text=True, timeout=300
    )
    return done.returncode, done.stdout + done.stderr


def page_of(db: Path, name: str, pagetype: str) -> int:
    """A page of the b-tree ``name`` of that type (the middle one of several)."""
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        pages = [
            int(p)
            for (p,) in conn.execute(
                "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = ? ORDER BY pageno",
                (name, pagetype),
            )
        ]
    assert pages, f"{name} has no {pagetype} page"
    return pages[len(pages) // 2]


def overwrite_page(db: Path, page: int, seed: int) -> None:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    garbage = random.Random(seed).randbytes(size)
    with open(db, "r+b") as f:
        f.seek((page - 1) * size)
        f.write(garbage)


def change_an_index_entry(db: Path) -> int:
    """One VM name in the name index changed, the b-tree still in order: the page is
    sound, only the index disagrees with its table (what quick_check does not see)."""
    page = page_of(db, "sqlite_autoindex_vms_1", "leaf")
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        before = [line for (line,) in conn.execute("PRAGMA quick_check")]
    with open(db, "r+b") as f:
        f.seek((page - 1) * size)
        data = f.read(size)
        assert data.count(b"base") == 1
        f.seek((page - 1) * size)
        f.write(data.replace(b"base", b"basf"))
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        quick = [line for (line,) in conn.execute("PRAGMA quick_check")]
    assert before == quick == ["ok"], quick
    return page


DAMAGE = {
    "header": ("", ""),
    "table-leaf": ("volumes", "leaf"),
    "table-interior": ("volumes", "internal"),
    "index": ("sqlite_autoindex_volumes_1", "leaf"),
    "index-entry": ("sqlite_autoindex_vms_1", "leaf"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_store_is_refused_with_the_way_back(
    pristine: tuple[Path, list[str]], kind: str
) -> None:
    workdir, names = pristine
    tree = Tree(workdir)
    db = tree.source / "vmtree.db"
    backup = workdir / "vmtree.db.backup"
    shutil.copyfile(db, backup)
    try:
        name, pagetype = DAMAGE[kind]
        if kind == "index-entry":
            page = change_an_index_entry(db)
        else:
            page = 1 if kind == "header" else page_of(db, name, pagetype)
            overwrite_page(db, page, seed=page)
        damaged = db.read_bytes()

        code, out = run("fsck", str(tree.source))
        print(f"{kind} (page {page}): fsck exit {code}:\n{out}")
        assert code == 4, out
        assert f"store {db} is damaged" in out and "The way back" in out, out
        assert "repaired" not in out.replace("0 repaired", ""), out

        with pytest.raises(MountFailed) as failed:
            tree.mount(["libvirt=none"])
        assert "(EUCLEAN)" in str(failed.value) and "The way back" in str(failed.value)
        assert not is_mountpoint(tree.vms)

        if kind in ("header", "table-leaf"):  # the background form is the same refusal
            code, out = run("mount", str(tree.source), str(tree.vms), "-o", "libvirt=none")
            if is_mountpoint(tree.vms):
                run("umount", str(tree.vms))
            print(f"background mount exit {code}:\n{out}")
            assert code == 1, out
            assert "mount failed; the end of" in out, out
            last = out.splitlines()[-1]  # the log's last line: this refusal
            assert f"store {db} is damaged" in last and "(EUCLEAN)" in last, out
            assert f"`vmtreefs fsck {tree.source}`" in last, out
        assert db.read_bytes() == damaged, "a refused mount or fsck wrote to the store"

        if kind == "header":  # the way back from a backup: put the file back, and it mounts
            shutil.copyfile(backup, db)
            tree.mount(["libvirt=none"])
            assert listing(tree.vms) == names
    finally:
        tree.unmount()
        shutil.copyfile(backup, db)
        backup.unlink()
