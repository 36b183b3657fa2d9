"""Linked clones through the mount, as a shell user makes and uses them."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

from tests.helpers.tree import Tree, error_of, head, listing, read_at, write_at


def private(vms: Path, name: str) -> Path:
    return vms / name / "volumes" / "private.img"


def test_mkdir_in_clones_makes_a_linked_clone(tree: Tree) -> None:
    vms = tree.vms
    os.mkdir(vms / "src")
    write_at(private(vms, "src"), b"from the source")
    os.mkdir(vms / "src" / "clones" / "c")
    assert listing(vms) == ["c", "src"]
    assert os.readlink(vms / "c" / "origin") == "../src"
    link = vms / "src" / "clones" / "c"
    assert link.is_symlink()
    assert os.readlink(link) == "../../c"
    assert os.listdir(vms / "src" / "clones") == ["c"]
    assert (link / "state").read_text() == "halted\n"  # the link leads to the clone
    assert head(private(vms, "c"), 15) == b"from the source"
    sizes = {p.name: p.stat().st_size for p in (vms / "c" / "volumes").iterdir()}
    assert sizes == {p.name: p.stat().st_size for p in (vms / "src" / "volumes").iterdir()}
    assert "origin" not in os.listdir(vms / "src")
    assert "clone src c" in (vms / ".vmtree" / "events").read_text()


def test_clone_and_source_are_independent_both_ways(vms: Path) -> None:
    os.mkdir(vms / "src")
    write_at(private(vms, "src"), b"A" * 4096)
    os.mkdir(vms / "src" / "clones" / "c")
    write_at(private(vms, "c"), b"C" * 4096)
    assert read_at(private(vms, "src"), 4096) == b"A" * 4096
    write_at(private(vms, "src"), b"S" * 4096, 8192)
    assert read_at(private(vms, "c"), 4096, 8192) == bytes(4096)
    assert read_at(private(vms, "c"), 4096) == b"C" * 4096


def test_a_chain_of_three_survives_deleting_the_middle(tree: Tree) -> None:
    vms = tree.vms
    os.mkdir(vms / "a")
    write_at(private(vms, "a"), b"level a")
    os.mkdir(vms / "a" / "clones" / "b")
    write_at(private(vms, "b"), b"level b")
    os.mkdir(vms / "b" / "clones" / "c")
    os.rmdir(vms / "b")
    assert listing(vms) == ["a", "c"]
    assert os.readlink(vms / "c" / "origin") == "../a"
    assert os.listdir(vms / "a" / "clones") == ["c"]
    assert head(private(vms, "c"), 7) == b"level b"
    os.rmdir(vms / "a")
    assert "origin" not in os.listdir(vms / "c")
    assert head(private(vms, "c"), 7) == b"level b"
    tree.remount()
    assert head(private(vms, "c"), 7) == b"level b"
    assert tree.status()["inventory"] == "ok"


def test_clone_through_ctl_reads_back_the_name(vms: Path) -> None:
    os.mkdir(vms / "src")
    fd = os.open(vms / "src" / "ctl", os.O_RDWR)
    try:
        assert os.write(fd, b"clone viactl\n") == len(b"clone viactl\n")
        assert os.read(fd, 100) == b"viactl\n"
    finally:
        os.close(fd)
    assert os.readlink(vms / "viactl" / "origin") == "../src"


def test_clone_replace_moves_the_other_clones(vms: Path) -> None:
    os.mkdir(vms / "src")
    os.mkdir(vms / "src" / "clones" / "old1")
    os.mkdir(vms / "src" / "clones" / "old2")
    fd = os.open(vms / "src" / "ctl", os.O_RDWR)
    try:
        os.write(fd, b"clone new --replace\n")
        assert os.read(fd, 100) == b"new\n"
    finally:
        os.close(fd)
    assert os.listdir(vms / "src" / "clones") == ["new"]
    assert sorted(os.listdir(vms / "new" / "clones")) == ["old1", "old2"]
    assert os.readlink(vms / "old1" / "origin") == "../new"
    assert os.readlink(vms / "new" / "origin") == "../src"


def test_clones_take_properties_but_not_immutability(vms: Path) -> None:
    os.mkdir(vms / "src")
    os.setxattr(vms / "src", "user.vmtree.memory", b"1024")
    os.setxattr(vms / "src", "user.vmtree.immutable", b"1")
    os.mkdir(vms / "src" / "clones" / "c")
    assert os.getxattr(vms / "c", "user.vmtree.memory") == b"1024"
    assert os.getxattr(vms / "c", "user.vmtree.immutable") == b"0"
    write_at(private(vms, "c"), b"writable")


def test_bad_clones_are_refused_and_nothing_is_made(tree: Tree) -> None:
    vms = tree.vms
    os.mkdir(vms / "src")
    os.mkdir(vms / "taken")
    clones = vms / "src" / "clones"
    assert error_of(os.mkdir, vms / "missing" / "clones" / "x") == errno.ENOENT
    assert error_of(os.mkdir, clones / "taken") == errno.EEXIST
    assert error_of(os.mkdir, clones / "bad name") == errno.EINVAL
    assert error_of(os.mkdir, clones / "src-v1") == errno.EINVAL
    assert error_of(os.mkdir, clones / ("x" * 65)) == errno.EINVAL
    assert error_of(os.unlink, vms / "src" / "origin") == errno.ENOENT
    fd = os.open(vms / "src" / "ctl", os.O_WRONLY)
    try:
        assert error_of(os.write, fd, b"clone\n") == errno.EINVAL
        assert error_of(os.write, fd, b"clone a b\n") == errno.EINVAL
        assert error_of(os.write, fd, b"clone a --force\n") == errno.EINVAL
    finally:
        os.close(fd)
    assert listing(vms) == ["src", "taken"]
    assert tree.status()["volumes"] == "6"


def test_a_clone_link_cannot_be_removed_with_rm(vms: Path) -> None:
    os.mkdir(vms / "src")
    os.mkdir(vms / "src" / "clones" / "c")
    assert error_of(os.unlink, vms / "src" / "clones" / "c") == errno.EPERM
    assert error_of(os.unlink, vms / "c" / "origin") == errno.EPERM
    assert listing(vms) == ["c", "src"]


def test_racing_clones_to_one_name_make_one(tree: Tree) -> None:
    os.mkdir(tree.vms / "src")
    results: list[str] = []
    barrier = threading.Barrier(6)

    def racer(n: int) -> None:
        barrier.wait()
        try:
            if n % 2:
                os.mkdir(tree.vms / "src" / "clones" / "race")
            else:
                fd = os.open(tree.vms / "src" / "ctl", os.O_WRONLY)
                try:
                    os.write(fd, b"clone race")
                finally:
                    os.close(fd)
            results.append("ok")
        except OSError as e:
            results.append(errno.errorcode[e.errno or 0])

    threads = [threading.Thread(target=racer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["EEXIST"] * 5 + ["ok"]
    assert tree.status()["volumes"] == "6"


def test_cloning_from_a_vm_being_deleted_is_whole_or_nothing(tree: Tree) -> None:
    for round_ in range(5):
        src = f"src{round_}"
        os.mkdir(tree.vms / src)
        write_at(private(tree.vms, src), b"data")
        outcome: dict[str, object] = {}

        def clone(src: str = src, outcome: dict[str, object] = outcome, n: int = round_) -> None:
            try:
                os.mkdir(tree.vms / src / "clones" / f"c{n}")
                outcome["clone"] = "ok"
            except OSError as e:
                outcome["clone"] = errno.errorcode[e.errno or 0]

        t = threading.Thread(target=clone)
        t.start()
        os.rmdir(tree.vms / src)
        t.join()
        name = f"c{round_}"
        if outcome["clone"] == "ok":
            assert head(private(tree.vms, name), 4) == b"data"
            assert len(os.listdir(tree.vms / name / "volumes")) == 6  # 3 images, 3 .changes
        else:
            assert outcome["clone"] == "ENOENT"
            assert name not in listing(tree.vms)
    tree.remount()
    status = tree.status()
    assert (status["inventory"], status["open_intents"]) == ("ok", "0")
    assert int(status["volumes"]) == 3 * len(listing(tree.vms))


def test_clones_survive_a_remount(tree: Tree) -> None:
    os.mkdir(tree.vms / "src")
    os.mkdir(tree.vms / "src" / "clones" / "c")
    write_at(private(tree.vms, "c"), b"clone data")
    tree.remount()
    assert os.readlink(tree.vms / "c" / "origin") == "../src"
    assert os.listdir(tree.vms / "src" / "clones") == ["c"]
    assert head(private(tree.vms, "c"), 10) == b"clone data"
