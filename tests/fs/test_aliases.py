"""Aliases: symlinks at the top level that name a VM or another alias."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from pathlib import Path

from tests.helpers.tree import Tree, error_of, listing


def test_ln_s_makes_an_alias_that_leads_to_the_vm(vms: Path) -> None:
    os.mkdir(vms / "work")
    os.symlink("work", vms / "stable")
    os.symlink("stable", vms / "current")
    assert listing(vms) == ["current", "stable", "work"]
    assert os.readlink(vms / "stable") == "work"
    assert (vms / "current").is_symlink()
    assert (vms / "current" / "state").read_text() == "halted\n"
    assert os.path.samefile(vms / "current", vms / "work")
    ls = subprocess.run(["ls", "-l", str(vms)], capture_output=True, text=True, check=True)
    assert "stable -> work" in ls.stdout


def test_bad_alias_targets_are_einval(tree: Tree) -> None:
    vms = tree.vms
    os.mkdir(vms / "work")
    # (An empty target never reaches us: the kernel answers ENOENT itself.)
    for target in ["/etc", "../work", "work/volumes", "..", ".", "missing", "a b"]:
        assert error_of(os.symlink, target, vms / "alias") == errno.EINVAL, target
    assert error_of(os.symlink, "work", vms / "bad name") == errno.EINVAL
    assert error_of(os.symlink, "work", vms / "x-v2") == errno.EINVAL
    assert error_of(os.symlink, "work", vms / "work") == errno.EEXIST
    os.symlink("work", vms / "stable")
    assert error_of(os.symlink, "work", vms / "stable") == errno.EEXIST
    assert error_of(os.mkdir, vms / "stable") == errno.EEXIST
    assert listing(vms) == ["stable", "work"]
    assert "refused symlink 'alias'" in (vms / ".vmtree" / "events").read_text()


def test_rm_removes_an_alias_not_the_vm(vms: Path) -> None:
    os.mkdir(vms / "work")
    os.symlink("work", vms / "stable")
    os.unlink(vms / "stable")
    assert listing(vms) == ["work"]
    assert error_of(os.unlink, vms / "stable") == errno.ENOENT


def test_an_alias_named_by_another_cannot_be_removed_first(vms: Path) -> None:
    os.mkdir(vms / "work")
    os.symlink("work", vms / "a1")
    os.symlink("a1", vms / "a2")
    assert error_of(os.unlink, vms / "a1") == errno.EBUSY
    os.unlink(vms / "a2")
    os.unlink(vms / "a1")
    assert listing(vms) == ["work"]


def test_ln_sfn_repoints_atomically(vms: Path) -> None:
    os.mkdir(vms / "v1")
    os.mkdir(vms / "v2")
    os.symlink("v1", vms / "latest")
    subprocess.run(["ln", "-sfn", "v2", str(vms / "latest")], check=True)
    assert os.readlink(vms / "latest") == "v2"
    assert listing(vms) == ["latest", "v1", "v2"]


def test_repointing_never_shows_a_missing_alias(vms: Path) -> None:
    os.mkdir(vms / "v1")
    os.mkdir(vms / "v2")
    os.symlink("v1", vms / "latest")
    seen: set[str] = set()
    failures: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.add(os.readlink(vms / "latest"))
                (vms / "latest" / "state").read_text()
            except OSError as e:
                failures.append(str(e))

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for r in readers:
        r.start()
    try:
        for i in range(40):
            subprocess.run(["ln", "-sfn", f"v{1 + i % 2}", str(vms / "latest")], check=True)
    finally:
        stop.set()
        for r in readers:
            r.join()
    assert failures == []
    assert seen == {"v1", "v2"}


def test_a_repoint_that_would_loop_is_refused(vms: Path) -> None:
    os.mkdir(vms / "work")
    os.symlink("work", vms / "a")
    os.symlink("a", vms / "b")
    os.symlink("b", vms / "tmp")
    assert error_of(os.rename, vms / "tmp", vms / "a") == errno.EINVAL  # a -> b -> a
    assert os.readlink(vms / "a") == "work"


def test_mv_of_a_vm_updates_its_aliases(vms: Path) -> None:
    os.mkdir(vms / "work")
    os.symlink("work", vms / "stable")
    os.rename(vms / "work", vms / "office")
    assert os.readlink(vms / "stable") == "office"
    os.rename(vms / "stable", vms / "prod")
    assert listing(vms) == ["office", "prod"]
    assert error_of(os.rename, vms / "office", vms / "prod") == errno.ENOTDIR  # the kernel's
    assert error_of(os.rename, vms / "prod", vms / "office") == errno.EISDIR  # the kernel's


def test_deleting_a_vm_removes_the_aliases_that_name_it(vms: Path) -> None:
    os.mkdir(vms / "work")
    os.mkdir(vms / "other")
    os.symlink("work", vms / "stable")
    os.symlink("stable", vms / "prod")
    os.symlink("other", vms / "keep")
    os.rmdir(vms / "work")
    assert listing(vms) == ["keep", "other"]
    assert error_of(os.rmdir, vms / "keep") == errno.ENOTDIR
    assert "aliases" in (vms / ".vmtree" / "events").read_text().splitlines()[-1]


def test_aliases_survive_a_remount(tree: Tree) -> None:
    os.mkdir(tree.vms / "work")
    os.symlink("work", tree.vms / "stable")
    os.symlink("stable", tree.vms / "prod")
    inode = os.lstat(tree.vms / "prod").st_ino
    tree.remount()
    assert os.readlink(tree.vms / "prod") == "stable"
    assert os.readlink(tree.vms / "stable") == "work"
    assert os.lstat(tree.vms / "prod").st_ino == inode
