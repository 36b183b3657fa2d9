"""The tree as a shell user sees it, through a real FUSE mount."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from tests.helpers.tree import Tree, error_of, head, listing

GiB = 1024**3


def test_mkdir_makes_a_vm_with_the_default_layout(vms: Path) -> None:
    os.mkdir(vms / "work")
    assert sorted(listing(vms)) == ["work"]
    assert (
        ".vmtree" in subprocess.run(["ls", "-a", str(vms)], capture_output=True, text=True).stdout
    )
    work = vms / "work"
    assert sorted(os.listdir(work)) == sorted(
        ["ctl", "state", "domain.xml", "console", "clones", "volumes", "savestates", "versions"]
    )
    assert (work / "state").read_text() == "halted\n"
    sizes = {p.name: p.stat().st_size for p in (work / "volumes").glob("*.img")}
    assert sizes == {"root.img": 10 * GiB, "private.img": 2 * GiB, "volatile.img": 1 * GiB}
    changes = sorted(p.name for p in (work / "volumes").iterdir() if p.is_dir())
    assert changes == ["private.changes", "root.changes", "volatile.changes"]
    for sub in ("clones", "savestates", "versions"):
        assert os.listdir(work / sub) == []


def test_modes_and_owner(vms: Path) -> None:
    os.mkdir(vms / "work")
    work = vms / "work"
    assert stat.S_ISDIR(work.stat().st_mode)
    assert stat.S_IMODE((work / "ctl").stat().st_mode) == 0o600
    assert stat.S_IMODE((work / "volumes" / "root.img").stat().st_mode) == 0o600
    assert stat.S_IMODE((work / "state").stat().st_mode) == 0o444
    assert (work / "ctl").stat().st_uid == os.getuid()


def test_volume_data_survives_a_remount(tree: Tree) -> None:
    os.mkdir(tree.vms / "work")
    private = tree.vms / "work" / "volumes" / "private.img"
    payload = os.urandom(3 * 1024 * 1024 + 17)
    fd = os.open(private, os.O_WRONLY)
    try:
        assert os.pwrite(fd, payload, 5 * 1024 * 1024) == len(payload)
        os.fsync(fd)
    finally:
        os.close(fd)
    inode_before = (tree.vms / "work").stat().st_ino
    tree.remount()
    with open(private, "rb") as f:
        assert f.read(4096) == bytes(4096)  # never written: zeros
        f.seek(5 * 1024 * 1024)
        assert f.read(len(payload)) == payload
    assert private.stat().st_size == 2 * GiB
    assert (tree.vms / "work").stat().st_ino == inode_before


def test_dd_reads_and_writes_a_volume(vms: Path) -> None:
    os.mkdir(vms / "a")
    root = vms / "a" / "volumes" / "root.img"
    subprocess.run(
        ["dd", "if=/dev/urandom", f"of={root}", "bs=1M", "count=4", "conv=notrunc,fsync"],
        check=True,
        capture_output=True,
    )
    copy = vms.parent / "copy.raw"
    subprocess.run(
        ["dd", f"if={root}", f"of={copy}", "bs=1M", "count=4"], check=True, capture_output=True
    )
    with open(root, "rb") as f:
        assert f.read(4 * 1024 * 1024) == copy.read_bytes()


def test_truncate_grows_and_refuses_to_shrink(vms: Path) -> None:
    os.mkdir(vms / "a")
    private = vms / "a" / "volumes" / "private.img"
    subprocess.run(["truncate", "-s", "3G", str(private)], check=True)
    assert private.stat().st_size == 3 * GiB
    assert error_of(os.truncate, private, 1 * GiB) == errno.EINVAL
    assert error_of(os.truncate, private, 3 * GiB + 100) == errno.EINVAL  # not whole sectors
    assert private.stat().st_size == 3 * GiB


def test_volumes_can_be_created_renamed_and_removed(tree: Tree) -> None:
    vms = tree.vms
    os.mkdir(vms / "a")
    volumes = vms / "a" / "volumes"
    data = os.urandom(1024 * 1024)
    (volumes / "data.img").write_bytes(data)
    assert (volumes / "data.img").stat().st_size == len(data)
    os.rename(volumes / "data.img", volumes / "home.img")
    assert sorted(os.listdir(volumes)) == [
        "home.changes",  # its change maps' directory follows the volume's name
        "home.img",
        "private.changes",
        "private.img",
        "root.changes",
        "root.img",
        "volatile.changes",
        "volatile.img",
    ]
    assert error_of(os.rename, volumes / "home.img", volumes / "root.img") == errno.EEXIST
    assert error_of(open, volumes / "bad name.img", "wb") == errno.EINVAL
    assert error_of(open, volumes / "data.raw", "wb") == errno.EINVAL
    tree.remount()
    assert (volumes / "home.img").read_bytes() == data
    os.unlink(volumes / "home.img")
    assert "home.img" not in os.listdir(volumes)
    assert tree.status()["volumes"] == "3"


def test_rmdir_deletes_a_vm_and_its_volumes(tree: Tree) -> None:
    os.mkdir(tree.vms / "a")
    os.mkdir(tree.vms / "b")
    assert tree.status()["volumes"] == "6"
    os.rmdir(tree.vms / "a")
    assert listing(tree.vms) == ["b"]
    assert tree.status()["volumes"] == "3"
    assert len(list((tree.source / "pool").glob("vol-*.img"))) == 3
    assert error_of(os.rmdir, tree.vms / "a") == errno.ENOENT
    tree.remount()
    assert listing(tree.vms) == ["b"]
    assert tree.status()["inventory"] == "ok"


def test_mv_renames_a_vm(tree: Tree) -> None:
    os.mkdir(tree.vms / "a")
    os.mkdir(tree.vms / "b")
    (tree.vms / "a" / "volumes" / "private.img").write_bytes(b"hello")
    os.rename(tree.vms / "a", tree.vms / "c")
    assert sorted(listing(tree.vms)) == ["b", "c"]
    assert error_of(os.rename, tree.vms / "c", tree.vms / "b") == errno.EEXIST
    assert error_of(os.rename, tree.vms / "c", tree.vms / "b-v2") == errno.EINVAL
    assert error_of(os.rename, tree.vms / "c", tree.vms / "b" / "clones" / "c") == errno.EINVAL
    tree.remount()
    assert sorted(listing(tree.vms)) == ["b", "c"]
    assert head(tree.vms / "c" / "volumes" / "private.img", 5) == b"hello"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a b", errno.EINVAL),
        ("1abc", errno.EINVAL),
        ("-x", errno.EINVAL),
        ("caf\u00e9", errno.EINVAL),
        ("x" * 65, errno.EINVAL),
        ("x" * 255, errno.EINVAL),
        ("x" * 256, errno.ENAMETOOLONG),
        ("fedora-next", errno.EINVAL),
        ("fedora-v3", errno.EINVAL),
        ("a-inst1", errno.EINVAL),
        ("a-disp2", errno.EINVAL),
        (".hidden", errno.EINVAL),
        ("..", errno.EEXIST),
        (".", errno.EEXIST),
    ],
)
def test_bad_names_are_refused_and_nothing_is_made(tree: Tree, name: str, expected: int) -> None:
    assert error_of(os.mkdir, os.path.join(tree.vms, name)) == expected
    assert listing(tree.vms) == []
    assert tree.status()["volumes"] == "0"


def test_a_64_character_name_is_fine(vms: Path) -> None:
    os.mkdir(vms / ("x" * 64))
    assert listing(vms) == ["x" * 64]


def test_refusals_are_logged_with_a_reason(tree: Tree) -> None:
    assert error_of(os.mkdir, tree.vms / "a b") == errno.EINVAL
    events = (tree.vms / ".vmtree" / "events").read_text()
    assert "refused mkdir 'a b'" in events and "EINVAL" in events
    assert "refused mkdir 'a b'" in tree.log()


def test_mkdir_of_an_existing_name_is_eexist(vms: Path) -> None:
    os.mkdir(vms / "a")
    assert error_of(os.mkdir, vms / "a") == errno.EEXIST
    assert error_of(os.mkdir, vms / ".vmtree") == errno.EEXIST


def test_racing_mkdirs_make_exactly_one_vm(tree: Tree) -> None:
    results: list[str] = []
    barrier = threading.Barrier(8)

    def racer() -> None:
        barrier.wait()
        try:
            os.mkdir(tree.vms / "race")
            results.append("ok")
        except OSError as e:
            results.append(errno.errorcode[e.errno or 0])

    threads = [threading.Thread(target=racer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["EEXIST"] * 7 + ["ok"]
    assert tree.status()["vms"] == "1"
    assert tree.status()["volumes"] == "3"


def test_operations_this_filesystem_never_allows(vms: Path) -> None:
    os.mkdir(vms / "a")
    a = vms / "a"
    assert error_of(os.chmod, a, 0o700) == errno.EPERM
    assert error_of(os.chmod, a / "volumes" / "root.img", 0o644) == errno.EPERM
    assert error_of(os.chown, a / "ctl", 1000, 1000) == errno.EPERM
    assert error_of(os.link, a / "volumes" / "root.img", a / "volumes" / "x.img") == errno.EPERM
    assert error_of(os.mknod, a / "volumes" / "fifo.img", stat.S_IFIFO | 0o600) == errno.EPERM
    assert error_of(os.mkfifo, vms / "fifo") == errno.EPERM
    assert error_of(os.unlink, a / "ctl") == errno.EPERM
    assert error_of(os.rmdir, a / "volumes") == errno.EPERM
    assert error_of(os.rmdir, vms / ".vmtree") == errno.EPERM
    assert error_of(os.rename, a / "ctl", a / "ctl2") == errno.EPERM
    assert error_of(open, vms / "file", "w") == errno.EPERM
    assert error_of(os.mkdir, a / "volumes" / "x") == errno.EPERM
    assert error_of(open, a / "state", "w") == errno.EACCES


def test_what_other_operations_make_answers_einval(vms: Path) -> None:
    os.mkdir(vms / "a")
    a = vms / "a"
    assert error_of(os.mkdir, a / "savestates" / "s1") == errno.EINVAL
    assert error_of(os.mkdir, a / "versions" / "v1") == errno.EINVAL
    assert error_of(os.symlink, "../a", a / "template") == errno.EINVAL  # itself
    assert error_of(os.symlink, "../a", a / "other-link") == errno.EINVAL
    assert sorted(listing(vms)) == ["a"]


def test_ctl_refuses_bad_and_oversized_commands(vms: Path) -> None:
    os.mkdir(vms / "a")
    ctl = vms / "a" / "ctl"
    for command in (b"frobnicate\n", b"start now\n", b"\n"):
        fd = os.open(ctl, os.O_WRONLY)
        try:
            assert error_of(os.write, fd, command) == errno.EINVAL
        finally:
            os.close(fd)
    fd = os.open(ctl, os.O_RDWR)
    try:
        assert error_of(os.write, fd, b"x" * 5000) == errno.EFBIG
    finally:
        os.close(fd)
    fd = os.open(vms / ".vmtree" / "ctl", os.O_WRONLY)
    try:
        assert error_of(os.write, fd, b"start\n") == errno.EINVAL
    finally:
        os.close(fd)


def test_a_thousand_vms_list_correctly(tree: Tree) -> None:
    names = {f"vm{i:04d}" for i in range(1000)}
    for name in sorted(names):
        os.mkdir(tree.vms / name)
    assert set(listing(tree.vms)) == names
    listed = subprocess.run(["ls", "-1", str(tree.vms)], capture_output=True, text=True, check=True)
    assert listed.stdout.split() == sorted(names)
    assert tree.status()["vms"] == "1000"
    tree.remount()
    assert set(listing(tree.vms)) == names


def test_status_and_events(tree: Tree) -> None:
    os.mkdir(tree.vms / "a")
    status = tree.status()
    assert status["engine"] == "reflink"
    assert "in place" in status["engine_detail"]
    assert int(status["pool_size"]) > 3 * GiB
    assert 0 < int(status["pool_used"]) < int(status["pool_size"])
    assert (status["vms"], status["volumes"], status["inventory"]) == ("1", "3", "ok")
    os.rename(tree.vms / "a", tree.vms / "b")
    events = (tree.vms / ".vmtree" / "events").read_text().splitlines()
    assert any(
        line.endswith("mkdir a: root 10.0 GiB, private 2.0 GiB, volatile 1.0 GiB")
        for line in events
    )
    assert events[-1].endswith("mv a b")
    tree.remount()
    assert (tree.vms / ".vmtree" / "events").read_text().splitlines()[-1].endswith("mv a b")


def test_readdir_offsets_are_stable_while_entries_change(vms: Path) -> None:
    for i in range(300):
        os.mkdir(vms / f"v{i:03d}")
    seen: list[str] = []
    with os.scandir(vms) as it:
        for n, entry in enumerate(it):
            seen.append(entry.name)
            if n == 10:
                os.mkdir(vms / "zz-late")
                os.rmdir(vms / "v299")
    expected = {f"v{i:03d}" for i in range(299)}
    assert expected <= set(seen)
    assert len(seen) == len(set(seen))  # nothing listed twice


def test_cp_over_a_volume_replaces_its_data_and_keeps_its_size(tree: Tree) -> None:
    os.mkdir(tree.vms / "a")
    private = tree.vms / "a" / "volumes" / "private.img"
    fd = os.open(private, os.O_WRONLY)
    try:
        os.pwrite(fd, b"old data far out", GiB)
    finally:
        os.close(fd)
    image = tree.workdir / "image.raw"
    image.write_bytes(os.urandom(1024 * 1024))
    subprocess.run(["cp", str(image), str(private)], check=True)
    assert private.stat().st_size == 2 * GiB  # volumes never shrink
    assert head(private, 1024 * 1024) == image.read_bytes()
    with open(private, "rb") as f:
        f.seek(GiB)
        assert f.read(16) == bytes(16)  # the old data is gone
    assert "discard a/private.img" in (tree.vms / ".vmtree" / "events").read_text()
    tree.remount()
    assert head(private, 1024 * 1024) == image.read_bytes()
    assert tree.status()["inventory"] == "ok"


def test_cp_of_a_sparse_image_over_a_bigger_volume_succeeds(tree: Tree) -> None:
    os.mkdir(tree.vms / "a")
    private = tree.vms / "a" / "volumes" / "private.img"
    image = tree.workdir / "sparse.raw"
    with open(image, "wb") as f:
        f.write(b"boot sector")
        f.truncate(64 * 1024 * 1024)  # ends in a hole: cp finishes with ftruncate
    done = subprocess.run(["cp", str(image), str(private)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert private.stat().st_size == 2 * GiB
    assert head(private, 11) == b"boot sector"


def test_a_discard_is_seen_by_files_already_open(vms: Path) -> None:
    os.mkdir(vms / "a")
    private = vms / "a" / "volumes" / "private.img"
    fd = os.open(private, os.O_RDWR)
    try:
        os.pwrite(fd, b"old", 4096)
        assert os.pread(fd, 3, 4096) == b"old"
        with open(private, "wb") as f:  # O_TRUNC: discard
            f.write(b"new")
        assert os.pread(fd, 3, 0) == b"new"
        assert os.pread(fd, 3, 4096) == bytes(3)
    finally:
        os.close(fd)


def test_refused_writes_never_log_the_data(tree: Tree) -> None:
    os.mkdir(tree.vms / "a")
    fd = os.open(tree.vms / "a" / "volumes" / "private.img", os.O_WRONLY)
    try:
        os.setxattr(tree.vms / "a", "user.vmtree.immutable", b"1")
        assert error_of(os.pwrite, fd, b"SECRET-PAYLOAD", 0) == errno.EROFS
    finally:
        os.close(fd)
    assert "SECRET" not in (tree.vms / ".vmtree" / "events").read_text()
    assert "SECRET" not in tree.log()
