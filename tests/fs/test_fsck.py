"""``vmtreefs fsck`` on an unmounted SOURCE that was damaged the ways a crash or a hand can.

Each test builds a tree through the mount, unmounts it, breaks what it checks
(files in the reflink pool, rows of the store), and runs the command as an
administrator would: its exit status and its lines.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.helpers.tree import Tree, ctl, head, listing, write_at
from vmtreefs.store import Store


def fsck(tree: Tree, *args: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "vmtreefs", "fsck", str(tree.source), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stdout + done.stderr


def volume_id(vms: Path, vm: str, volume: str) -> int:
    """The engine volume behind a volume file: its inode number says (see fs/inodes.py)."""
    inode = (vms / vm / "volumes" / f"{volume}.img").stat().st_ino
    return (inode - (1 << 52)) // 4


def build(tree: Tree) -> dict[str, int]:
    vms = tree.vms
    os.mkdir(vms / "a")
    write_at(vms / "a/volumes/private.img", b"of a")
    os.mkdir(vms / "a/clones/b")
    os.symlink("b", vms / "stable")
    os.mkdir(vms / "t")
    os.setxattr(vms / "t", "user.vmtree.preserve_history", b"1")
    os.setxattr(vms / "t", "user.vmtree.versioned", b"1")
    ctl(vms, "t-next", "commit")
    ids = {
        "a.private": volume_id(vms, "a", "private"),
        "a.volatile": volume_id(vms, "a", "volatile"),
        "b.root": volume_id(vms, "b", "root"),
    }
    tree.unmount()
    return ids


def test_a_sound_tree_is_clean_and_a_mounted_one_is_refused(tree: Tree) -> None:
    build(tree)
    status, out = fsck(tree)
    assert status == 0, out
    assert "clean (5 vms, 2 aliases, 15 volumes, 0 savestates)" in out
    tree.mount()
    status, out = fsck(tree)
    assert status == 1 and "already in use by vmtreefs" in out and "(EBUSY)" in out


def test_repair_fixes_what_it_can_and_a_second_run_is_clean(tree: Tree) -> None:
    ids = build(tree)
    pool = tree.source / "pool"
    # An engine volume no VM owns (a crash between the engine and the store, long ago).
    shutil.copyfile(pool / f"vol-{ids['a.private']}.img", pool / "vol-9999.img")
    # A grow the store never recorded, and a volume the engine has smaller than recorded.
    os.truncate(pool / f"vol-{ids['b.root']}.img", 11 << 30)
    os.truncate(pool / f"vol-{ids['a.volatile']}.img", 512 << 20)
    # A memory image no savestate names.
    (tree.source / "savestates").mkdir(exist_ok=True)
    (tree.source / "savestates/ss-1-0123456789ab.save").write_bytes(b"memory")
    # The system alias left behind on an older version.
    with contextlib.closing(sqlite3.connect(tree.source / "vmtree.db")) as db, db:
        (v1,) = db.execute("SELECT id FROM vms WHERE name = 't-v1'").fetchone()
        db.execute("UPDATE aliases SET target_vm = ? WHERE name = 't'", (v1,))
    # An operation that never finished: its volume was made, the VM never recorded.
    with Store.open(tree.source / "vmtree.db") as store, store.transaction() as tx:
        (new_id,) = tx.allocate_volume_ids(1)
        tx.begin_intent(
            "create", {"what": "mkdir x", "volumes": [{"id": new_id, "name": "root", "size": 0}]}
        )
    (pool / f"vol-{new_id}.img").touch()

    status, out = fsck(tree)
    assert status == 4, out
    for expected in (
        "1 engine volumes no VM owns: 9999 (--repair: adopt them into the VM lost-found",
        f"b/volumes/root.img (volume {ids['b.root']}) is {11 << 30} bytes in the engine, "
        f"{10 << 30} in the store",
        f"a/volumes/volatile.img (volume {ids['a.volatile']}) is {512 << 20} bytes in the "
        f"engine, {1 << 30} in the store",
        "memory image ss-1-0123456789ab.save belongs to no savestate",
        "the alias t does not name the newest version t-v2",
        "(create mkdir x) is open",
    ):
        assert expected in out, out
    status, out = fsck(tree, "--repair")
    assert status == 1, out
    assert "left" in out and ", 0 left" in out
    status, out = fsck(tree)
    assert status == 0, out

    vms = tree.mount()
    assert listing(vms) == ["a", "b", "lost-found", "stable", "t", "t-next", "t-v1", "t-v2"]
    assert head(vms / "lost-found/volumes/vol-9999.img", 4) == b"of a"
    assert os.readlink(vms / "t") == "t-v2"
    assert (vms / "b/volumes/root.img").stat().st_size == 11 << 30
    assert (vms / "a/volumes/volatile.img").stat().st_size == 1 << 30
    assert (tree.source / "lost+found/ss-1-0123456789ab.save").read_bytes() == b"memory"
    assert tree.status()["inventory"] == "ok"
    os.rmdir(vms / "lost-found")


def test_a_lost_volume_is_reported_and_left(tree: Tree) -> None:
    ids = build(tree)
    os.unlink(tree.source / "pool" / f"vol-{ids['a.private']}.img")
    for args in ((), ("--repair",)):
        status, out = fsck(tree, *args)
        assert status == 4, out
        assert (
            f"a/volumes/private.img (volume {ids['a.private']}) is missing from the engine "
            "(not repairable without guessing)"
        ) in out


def _interrupted_save(tree: Tree, label: str, magic: bytes) -> str:
    """What a crash during `save LABEL` of a leaves: a journalled snapshot of a's private
    volume and a memory image libvirt finished (magic ...Save) or not (...Part)."""
    pool = tree.source / "pool"
    with contextlib.closing(sqlite3.connect(tree.source / "vmtree.db")) as db:
        (a_id,) = db.execute("SELECT id FROM vms WHERE name = 'a'").fetchone()
        (private, size) = db.execute(
            "SELECT id, size FROM volumes WHERE vm_id = ? AND name = 'private'", (a_id,)
        ).fetchone()
    image = f"ss-{a_id}-{label:0>12}.save"
    (tree.source / "savestates").mkdir(exist_ok=True)
    (tree.source / "savestates" / image).write_bytes(magic + b"\0" * 100)
    with Store.open(tree.source / "vmtree.db") as store, store.transaction() as tx:
        (snap,) = tx.allocate_volume_ids(1)
        saved = {"vm_id": a_id, "owner_id": a_id, "label": label, "image": image}
        tx.begin_intent(
            "save",
            {
                "what": f"save a {label}",
                "volumes": [{"id": snap, "name": "private", "size": size}],
                "files": [str(tree.source / "savestates" / image)],
                "savestate": {**saved, "info": {"vm": "a"}, "stop": False, "was_paused": False},
            },
        )
    subprocess.run(
        ["cp", "--reflink=always", pool / f"vol-{private}.img", pool / f"vol-{snap}.img"],
        check=True,
    )
    return image


def test_an_interrupted_save_is_kept_when_libvirt_finished_its_image(tree: Tree) -> None:
    """Without libvirt (fsck, or a mount with libvirt=none) the image decides: whole, the
    savestate is recorded; not whole, it is rolled back. A restore's copy is removed."""
    build(tree)
    kept = _interrupted_save(tree, "kept", b"LibvirtQemudSave")
    dropped = _interrupted_save(tree, "dropped", b"LibvirtQemudPart")
    (tree.source / "savestates/.restore-3-0badcafe.save").write_bytes(b"copy")
    status, out = fsck(tree)
    assert status == 4, out
    for expected in (
        "(save save a kept) is open",
        "(save save a dropped) is open",
        ".restore-3-0badcafe.save is a leftover restore copy",
    ):
        assert expected in out, out
    status, out = fsck(tree, "--repair")
    assert status == 1 and ", 0 left" in out, out
    status, out = fsck(tree)
    assert status == 0 and "1 savestates" in out, out
    assert sorted(os.listdir(tree.source / "savestates")) == [kept]
    assert not (tree.source / "savestates" / dropped).exists()

    vms = tree.mount()
    assert listing(vms / "a/savestates") == ["kept"]
    assert head(vms / "a/savestates/kept/volumes/private.img", 4) == b"of a"
    assert tree.status()["inventory"] == "ok"
