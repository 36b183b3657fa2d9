"""Versioned VMs and template links through the mount, with halted VMs.

What a running VM adds (commit at shutdown, template volumes taken at start,
disposable factories) is in tests/vm/test_version_use_cases.py.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from tests.helpers.tree import Tree, ctl, error_of, head, listing, write_at


def private(vms: Path, name: str) -> Path:
    return vms / name / "volumes" / "private.img"


def versioned(vms: Path, name: str, history: bool = True) -> None:
    if history:
        os.setxattr(vms / name, "user.vmtree.preserve_history", b"1")
    os.setxattr(vms / name, "user.vmtree.versioned", b"1")


def test_versioned_makes_next_v1_and_the_alias(vms: Path) -> None:
    os.mkdir(vms / "fedora")
    write_at(private(vms, "fedora"), b"first")
    versioned(vms, "fedora")
    assert listing(vms) == ["fedora", "fedora-next", "fedora-v1"]
    assert os.readlink(vms / "fedora") == "fedora-v1"
    assert (vms / "fedora-next").is_dir() and not (vms / "fedora-next").is_symlink()
    assert os.getxattr(vms / "fedora-next", "user.vmtree.versioned") == b"1"
    assert os.getxattr(vms / "fedora-v1", "user.vmtree.immutable") == b"1"
    assert os.getxattr(vms / "fedora-v1", "user.vmtree.versioned") == b"0"
    assert head(private(vms, "fedora"), 5) == b"first"  # through the alias: v1
    assert os.listdir(vms / "fedora-next" / "versions") == ["v1"]
    assert os.readlink(vms / "fedora-next" / "versions" / "v1") == "../../fedora-v1"
    assert os.readlink(vms / "fedora-next" / "origin") == "../fedora-v1"
    # A version cannot change, nor can what makes it one.
    assert error_of(write_at, private(vms, "fedora-v1"), b"x") == errno.EROFS
    assert error_of(os.setxattr, vms / "fedora-v1", "user.vmtree.immutable", b"0") == errno.EROFS
    assert error_of(os.unlink, vms / "fedora") == errno.EPERM  # the system keeps the alias
    assert error_of(os.rmdir, vms / "fedora-next") == errno.EBUSY
    assert error_of(os.rmdir, vms / "fedora-v1") == errno.EBUSY  # the newest version
    assert error_of(os.rename, vms / "fedora-next", vms / "other") == errno.EPERM
    assert error_of(os.unlink, vms / "fedora-next" / "versions" / "v1") == errno.EPERM
    assert error_of(os.mkdir, vms / "fedora-next" / "versions" / "v9") == errno.EINVAL
    # commit is for the head only.
    assert error_of(ctl, vms, "fedora", "commit") == errno.EROFS
    os.mkdir(vms / "plain")
    assert error_of(ctl, vms, "plain", "commit") == errno.EINVAL
    assert error_of(ctl, vms, "plain", "revert v1") == errno.EINVAL


def test_history_holds_what_the_head_had_at_each_commit(tree: Tree) -> None:
    vms = tree.vms
    os.mkdir(vms / "tpl")
    write_at(private(vms, "tpl"), b"one")
    versioned(vms, "tpl")
    write_at(private(vms, "tpl-next"), b"two")
    assert ctl(vms, "tpl-next", "commit") == "tpl-v2"
    write_at(private(vms, "tpl-next"), b"three")
    assert ctl(vms, "tpl-next", "commit") == "tpl-v3"
    write_at(private(vms, "tpl-next"), b"four!")  # not committed yet
    assert os.readlink(vms / "tpl") == "tpl-v3"
    assert sorted(os.listdir(vms / "tpl-next" / "versions")) == ["v1", "v2", "v3"]
    contents = {n: head(private(vms, f"tpl-v{n}"), 5) for n in (1, 2, 3)}
    assert contents == {1: b"one\0\0", 2: b"two\0\0", 3: b"three"}
    # The chain of versions: each one descends from the one before, the head from the newest.
    assert os.readlink(vms / "tpl-v3" / "origin") == "../tpl-v2"
    assert os.readlink(vms / "tpl-v2" / "origin") == "../tpl-v1"
    assert not os.path.lexists(vms / "tpl-v1" / "origin")

    # revert commits what the head holds first, so a revert can itself be undone.
    assert ctl(vms, "tpl-next", "revert v1") == "reverted to tpl-v1; what it held before is tpl-v4"
    assert head(private(vms, "tpl-next"), 5) == b"one\0\0"
    assert head(private(vms, "tpl-v4"), 5) == b"four!"
    assert ctl(vms, "tpl-next", "revert v4").startswith("reverted to tpl-v4")
    assert head(private(vms, "tpl-next"), 5) == b"four!"
    assert error_of(ctl, vms, "tpl-next", "revert v99") == errno.ENOENT
    assert error_of(ctl, vms, "tpl-next", "revert 2") == errno.EINVAL

    # Everything is still there after a remount.
    tree.remount()
    assert os.readlink(vms / "tpl") == "tpl-v5"
    assert sorted(os.listdir(vms / "tpl-next" / "versions")) == [f"v{n}" for n in range(1, 6)]
    assert head(private(vms, "tpl-v2"), 5) == b"two\0\0"


def test_without_history_only_the_newest_version_stays(tree: Tree) -> None:
    vms = tree.vms
    os.mkdir(vms / "app")
    versioned(vms, "app", history=False)
    write_at(private(vms, "app-next"), b"second")
    assert ctl(vms, "app-next", "commit") == "app-v2"
    assert listing(vms) == ["app", "app-next", "app-v2"]
    assert head(private(vms, "app"), 6) == b"second"
    assert os.readlink(vms / "app-next" / "origin") == "../app-v2"
    # Numbers never repeat, also after a remount.
    tree.remount()
    assert ctl(vms, "app-next", "commit") == "app-v3"
    assert listing(vms) == ["app", "app-next", "app-v3"]
    assert "history: drop app-v2" in (vms / ".vmtree" / "events").read_text()


def test_turning_history_off_drops_the_old_versions(vms: Path) -> None:
    os.mkdir(vms / "app")
    versioned(vms, "app")
    ctl(vms, "app-next", "commit")
    ctl(vms, "app-next", "commit")
    assert listing(vms) == ["app", "app-next", "app-v1", "app-v2", "app-v3"]
    os.setxattr(vms / "app-next", "user.vmtree.preserve_history", b"0")
    assert listing(vms) == ["app", "app-next", "app-v3"]


def test_clones_of_the_head_move_to_each_new_version(vms: Path) -> None:
    os.mkdir(vms / "base")
    write_at(private(vms, "base"), b"base")
    os.mkdir(vms / "base" / "clones" / "early")  # a clone from before base was versioned
    versioned(vms, "base")
    assert os.readlink(vms / "early" / "origin") == "../base-v1"
    os.mkdir(vms / "base-next" / "clones" / "later")
    os.mkdir(vms / "base" / "clones" / "fromalias")  # through the alias: a clone of v1
    assert os.readlink(vms / "fromalias" / "origin") == "../base-v1"
    ctl(vms, "base-next", "commit")
    assert os.readlink(vms / "later" / "origin") == "../base-v2"
    assert os.readlink(vms / "early" / "origin") == "../base-v1"
    assert sorted(os.listdir(vms / "base-v2" / "clones")) == ["base-next", "later"]
    assert head(private(vms, "later"), 4) == b"base"


def test_clearing_versioned_keeps_or_drops_history(vms: Path) -> None:
    os.mkdir(vms / "keep")
    versioned(vms, "keep")
    ctl(vms, "keep-next", "commit")
    os.symlink("keep", vms / "mine")  # a user's alias naming the system alias
    os.setxattr(vms / "keep-next", "user.vmtree.versioned", b"0")
    assert listing(vms) == ["keep", "keep-v1", "keep-v2", "mine"]
    assert (vms / "keep").is_dir() and not (vms / "keep").is_symlink()
    assert os.readlink(vms / "mine") == "keep"
    assert os.getxattr(vms / "keep-v1", "user.vmtree.immutable") == b"1"
    assert os.listdir(vms / "keep" / "versions") == []
    os.rmdir(vms / "keep-v2")  # an immutable VM of its own now

    os.mkdir(vms / "drop")
    versioned(vms, "drop", history=False)
    ctl(vms, "drop-next", "commit")
    os.setxattr(vms / "drop-next", "user.vmtree.versioned", b"0")
    assert listing(vms) == ["drop", "keep", "keep-v1", "mine"]
    # Versioning again goes on counting.
    versioned(vms, "drop")
    assert os.readlink(vms / "drop") == "drop-v3"


def test_template_links(vms: Path) -> None:
    os.mkdir(vms / "fedora")
    versioned(vms, "fedora")
    os.mkdir(vms / "work")
    os.symlink("../fedora", vms / "work" / "template")
    assert os.readlink(vms / "work" / "template") == "../fedora"
    assert "template" in os.listdir(vms / "work")
    assert (vms / "work" / "template" / "state").read_text() == "halted\n"  # leads to the VM
    assert error_of(os.symlink, "../fedora", vms / "work" / "template") == errno.EEXIST
    os.mkdir(vms / "other")
    for bad in ("../nothing", "/etc", "../../x", "..", "../other/volumes"):
        assert error_of(os.symlink, bad, vms / "other" / "template") == errno.EINVAL, bad
    # What a template names cannot go while it does.
    assert error_of(os.unlink, vms / "fedora") == errno.EPERM
    os.symlink("fedora-v1", vms / "pinned")
    os.symlink("../pinned", vms / "other" / "template")
    assert error_of(os.unlink, vms / "pinned") == errno.EBUSY
    assert error_of(os.setxattr, vms / "fedora-next", "user.vmtree.versioned", b"0") == errno.EBUSY
    # A clone takes its source's template.
    os.mkdir(vms / "work" / "clones" / "work2")
    assert os.readlink(vms / "work2" / "template") == "../fedora"
    os.unlink(vms / "other" / "template")
    os.unlink(vms / "pinned")
    assert "template" not in os.listdir(vms / "other")
    for name in ("work", "work2"):
        os.unlink(vms / name / "template")
    os.setxattr(vms / "fedora-next", "user.vmtree.versioned", b"0")


def test_template_link_survives_a_remount_and_follows_renames(tree: Tree) -> None:
    vms = tree.vms
    os.mkdir(vms / "base")
    os.mkdir(vms / "work")
    os.symlink("base", vms / "work" / "template")  # a bare name works as well
    assert os.readlink(vms / "work" / "template") == "../base"
    os.rename(vms / "base", vms / "base2")
    assert os.readlink(vms / "work" / "template") == "../base2"
    assert error_of(os.rmdir, vms / "base2") == errno.EBUSY
    tree.remount()
    assert os.readlink(vms / "work" / "template") == "../base2"


def test_a_three_level_tree_survives_deleting_inner_nodes(tree: Tree) -> None:
    """Snapshot tree: root -> versions -> clones -> clones; inner nodes go, leaves keep data."""
    vms = tree.vms
    os.mkdir(vms / "root")
    write_at(private(vms, "root"), b"root")
    versioned(vms, "root")
    write_at(private(vms, "root-next"), b"ver2")
    ctl(vms, "root-next", "commit")
    os.mkdir(vms / "root-v1" / "clones" / "a")
    os.mkdir(vms / "root-v2" / "clones" / "b")
    write_at(private(vms, "a"), b"A", 4)
    os.mkdir(vms / "a" / "clones" / "a1")
    os.mkdir(vms / "b" / "clones" / "b1")
    write_at(private(vms, "b1"), b"B1", 4)
    os.rmdir(vms / "a")
    os.rmdir(vms / "root-v1")
    os.rmdir(vms / "b")
    assert listing(vms) == ["a1", "b1", "root", "root-next", "root-v2"]
    assert not os.path.lexists(vms / "a1" / "origin")  # its whole line of origins is gone
    assert os.readlink(vms / "b1" / "origin") == "../root-v2"
    assert head(private(vms, "a1"), 5) == b"rootA"
    assert head(private(vms, "b1"), 6) == b"ver2B1"
    assert head(private(vms, "root"), 4) == b"ver2"
    tree.remount()
    assert head(private(vms, "a1"), 5) == b"rootA"
    assert head(private(vms, "b1"), 6) == b"ver2B1"


def test_a_head_stays_writable_and_version_names_never_clash(vms: Path) -> None:
    os.mkdir(vms / "x")
    versioned(vms, "x")
    assert error_of(os.setxattr, vms / "x-next", "user.vmtree.immutable", b"1") == errno.EINVAL
    ctl(vms, "x-next", "commit")
    os.setxattr(vms / "x-next", "user.vmtree.versioned", b"0")  # keeps x-v1 and x-v2
    os.rmdir(vms / "x")
    os.mkdir(vms / "x")  # another VM of the same name
    versioned(vms, "x")
    assert os.readlink(vms / "x") == "x-v3"  # x-v1 and x-v2 are someone else's
    assert listing(vms) == ["x", "x-next", "x-v1", "x-v2", "x-v3"]
