"""Properties as user.vmtree.* extended attributes, read and set with getfattr/setfattr."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.helpers.tree import Tree, error_of

ALL = [
    "user.vmtree.immutable",
    "user.vmtree.versioned",
    "user.vmtree.preserve_history",
    "user.vmtree.hot_savestate",
    "user.vmtree.commit",
    "user.vmtree.memory",
    "user.vmtree.vcpus",
    "user.vmtree.ready",
    "user.vmtree.volatile",
    "user.vmtree.created",
    "user.vmtree.id",
    "user.vmtree.usage",
]


def test_getfattr_dumps_every_property(vms: Path) -> None:
    os.mkdir(vms / "work")
    assert sorted(os.listxattr(vms / "work")) == sorted(ALL)
    dump = subprocess.run(
        ["getfattr", "-d", "-m", "-", "--absolute-names", str(vms / "work")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert 'user.vmtree.immutable="0"' in dump
    assert 'user.vmtree.commit="shutdown"' in dump
    assert 'user.vmtree.usage="0"' in dump
    assert float(os.getxattr(vms / "work", "user.vmtree.created")) > 1.7e9


def test_setfattr_sets_and_a_remount_keeps_it(tree: Tree) -> None:
    work = tree.vms / "work"
    os.mkdir(work)
    subprocess.run(["setfattr", "-n", "user.vmtree.memory", "-v", "2048", str(work)], check=True)
    os.setxattr(work, "user.vmtree.vcpus", b"4")
    os.setxattr(work, "user.vmtree.ready", b"delay:15")
    os.setxattr(work, "user.vmtree.commit", b"manual\n")
    tree.remount()
    values = {n: os.getxattr(work, n) for n in ALL[4:8]}
    assert values == {
        "user.vmtree.commit": b"manual",
        "user.vmtree.memory": b"2048",
        "user.vmtree.vcpus": b"4",
        "user.vmtree.ready": b"delay:15",
    }
    os.removexattr(work, "user.vmtree.memory")  # back to the default
    assert os.getxattr(work, "user.vmtree.memory") == b"256"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("user.vmtree.memory", b"abc"),
        ("user.vmtree.memory", b"-5"),
        ("user.vmtree.memory", b"0"),
        ("user.vmtree.memory", b"99999999999"),
        ("user.vmtree.vcpus", b"1.5"),
        ("user.vmtree.immutable", b"yes"),
        ("user.vmtree.immutable", b"2"),
        ("user.vmtree.commit", b"sometimes"),
        ("user.vmtree.ready", b"console:("),
        ("user.vmtree.ready", b"delay:-1"),
        ("user.vmtree.ready", b"soon"),
        ("user.vmtree.vcpus", "\u0663".encode()),  # an Arabic-Indic digit: not ASCII
        ("user.vmtree.ready", b"console:" + b"x" * 2000),  # too long
        ("user.vmtree.memory", b"1\x002"),
    ],
)
def test_bad_values_are_einval(vms: Path, name: str, value: bytes) -> None:
    os.mkdir(vms / "work")
    before = os.getxattr(vms / "work", name)
    assert error_of(os.setxattr, vms / "work", name, value) == errno.EINVAL
    assert os.getxattr(vms / "work", name) == before


def test_read_only_unknown_and_foreign_names(tree: Tree) -> None:
    work = tree.vms / "work"
    os.mkdir(work)
    for name in ("user.vmtree.created", "user.vmtree.id", "user.vmtree.usage"):
        assert error_of(os.setxattr, work, name, b"1") == errno.EPERM
        assert error_of(os.removexattr, work, name) == errno.EPERM
    assert error_of(os.setxattr, work, "user.vmtree.colour", b"red") == errno.ENOTSUP
    assert error_of(os.getxattr, work, "user.vmtree.colour") == errno.ENODATA
    assert error_of(os.setxattr, work, "user.comment", b"hi") == errno.ENOTSUP
    assert error_of(os.getxattr, work, "user.comment") == errno.ENODATA
    assert error_of(os.setxattr, work / "ctl", "user.vmtree.memory", b"512") == errno.ENOTSUP
    events = (tree.vms / ".vmtree" / "events").read_text()
    assert "read-only" in events and "EPERM" in events


def test_immutable_makes_volumes_read_only(vms: Path) -> None:
    os.mkdir(vms / "work")
    root = vms / "work" / "volumes" / "root.img"
    os.setxattr(vms / "work", "user.vmtree.immutable", b"1")
    assert stat.S_IMODE(root.stat().st_mode) == 0o400
    assert error_of(os.open, root, os.O_WRONLY) == errno.EROFS
    assert error_of(os.truncate, root, 20 * 1024**3) == errno.EROFS
    assert error_of(open, vms / "work" / "volumes" / "new.img", "wb") == errno.EROFS
    assert error_of(os.unlink, root) == errno.EROFS
    with open(root, "rb") as f:
        assert f.read(512) == bytes(512)  # still readable
    os.setxattr(vms / "work", "user.vmtree.immutable", b"0")
    assert stat.S_IMODE(root.stat().st_mode) == 0o600
    fd = os.open(root, os.O_WRONLY)
    os.close(fd)


def test_immutable_stops_writes_on_files_already_open(vms: Path) -> None:
    os.mkdir(vms / "work")
    fd = os.open(vms / "work" / "volumes" / "private.img", os.O_WRONLY)
    try:
        os.pwrite(fd, b"before", 0)
        os.setxattr(vms / "work", "user.vmtree.immutable", b"1")
        assert error_of(os.pwrite, fd, b"after", 0) == errno.EROFS
    finally:
        os.close(fd)


def test_volume_policy(tree: Tree) -> None:
    os.mkdir(tree.vms / "work")
    volumes = tree.vms / "work" / "volumes"
    assert os.listxattr(volumes / "root.img") == ["user.vmtree.policy"]
    assert os.getxattr(volumes / "root.img", "user.vmtree.policy") == b"template"
    assert os.getxattr(volumes / "private.img", "user.vmtree.policy") == b"persistent"
    assert os.getxattr(volumes / "volatile.img", "user.vmtree.policy") == b"volatile"
    os.setxattr(volumes / "root.img", "user.vmtree.policy", b"persistent")
    assert error_of(os.setxattr, volumes / "root.img", "user.vmtree.policy", b"x") == errno.EINVAL
    assert error_of(os.setxattr, volumes / "root.img", "user.vmtree.size", b"1") == errno.ENOTSUP
    tree.remount()
    assert os.getxattr(volumes / "root.img", "user.vmtree.policy") == b"persistent"


def test_usage_counts_bytes_held_only_by_the_vm(vms: Path) -> None:
    os.mkdir(vms / "src")
    data = os.urandom(8 * 1024 * 1024)
    fd = os.open(vms / "src" / "volumes" / "private.img", os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert int(os.getxattr(vms / "src", "user.vmtree.usage")) == len(data)
    os.mkdir(vms / "src" / "clones" / "c")
    assert int(os.getxattr(vms / "c", "user.vmtree.usage")) == 0  # all shared
    assert int(os.getxattr(vms / "src", "user.vmtree.usage")) == 0
    fd = os.open(vms / "c" / "volumes" / "root.img", os.O_WRONLY)
    try:
        os.pwrite(fd, data[: 1024 * 1024], 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert int(os.getxattr(vms / "c", "user.vmtree.usage")) == 1024 * 1024


def test_an_immutable_vm_keeps_its_properties(vms: Path) -> None:
    os.mkdir(vms / "work")
    os.setxattr(vms / "work", "user.vmtree.immutable", b"1")
    assert error_of(os.setxattr, vms / "work", "user.vmtree.memory", b"512") == errno.EROFS
    root = vms / "work" / "volumes" / "root.img"
    assert error_of(os.setxattr, root, "user.vmtree.policy", b"persistent") == errno.EROFS
    os.setxattr(vms / "work", "user.vmtree.immutable", b"0")  # the way back stays open
    os.setxattr(vms / "work", "user.vmtree.memory", b"512")


def test_removing_a_policy_restores_the_volume_default(vms: Path) -> None:
    os.mkdir(vms / "work")
    root = vms / "work" / "volumes" / "root.img"
    os.setxattr(root, "user.vmtree.policy", b"persistent")
    os.removexattr(root, "user.vmtree.policy")
    assert os.getxattr(root, "user.vmtree.policy") == b"template"
