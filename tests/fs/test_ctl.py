"""Control files: one command per write, its result read back from the same open file."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

from tests.helpers.tree import Tree


def test_the_shell_idiom_reads_back_the_result(vms: Path) -> None:
    os.mkdir(vms / "x")
    script = f'exec 3<>{vms}/x/ctl; echo clone y >&3; read r <&3; echo "$r"'
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout == "y\n"
    assert os.readlink(vms / "y" / "origin") == "../x"


def test_echo_into_ctl_works_without_reading(vms: Path) -> None:
    os.mkdir(vms / "x")
    subprocess.run(["bash", "-c", f"echo 'clone z' > {vms}/x/ctl"], check=True)
    assert os.readlink(vms / "z" / "origin") == "../x"


def test_each_open_file_has_its_own_result(vms: Path) -> None:
    os.mkdir(vms / "x")
    first = os.open(vms / "x" / "ctl", os.O_RDWR)
    second = os.open(vms / "x" / "ctl", os.O_RDWR)
    try:
        os.write(first, b"clone one\n")
        os.write(second, b"clone two\n")
        assert os.read(second, 100) == b"two\n"
        assert os.read(first, 100) == b"one\n"
        assert os.read(first, 100) == b""  # one result per command
    finally:
        os.close(first)
        os.close(second)


def test_refused_commands_are_logged_with_their_reason(tree: Tree) -> None:
    os.mkdir(tree.vms / "x")
    fd = os.open(tree.vms / "x" / "ctl", os.O_RDWR)
    try:
        for command, expected in [
            (b"frobnicate\n", errno.EINVAL),
            (b"start now\n", errno.EINVAL),  # start takes no arguments
            (b"clone\n", errno.EINVAL),
            (b"clone x\n", errno.EEXIST),
            (b"x" * (1 << 20), errno.EFBIG),
        ]:
            try:
                os.write(fd, command)
                raise AssertionError(f"{command[:20]!r} was accepted")
            except OSError as e:
                assert e.errno == expected, command[:20]
        assert os.read(fd, 100) == b""  # a refused command leaves no result
    finally:
        os.close(fd)
    events = (tree.vms / ".vmtree" / "events").read_text()
    assert "unknown command 'frobnicate'" in events
    assert "EFBIG" in events
    assert "unknown command 'frobnicate'" in tree.log()


def test_global_ctl(vms: Path) -> None:
    fd = os.open(vms / ".vmtree" / "ctl", os.O_RDWR)
    try:
        os.write(fd, b"gc\n")
        assert os.read(fd, 100) == b"nothing to collect\n"
        assert "gc: nothing to collect" in (vms / ".vmtree" / "events").read_text()
        try:
            os.write(fd, b"clone x\n")
            raise AssertionError("a VM command was accepted by the global ctl")
        except OSError as e:
            assert e.errno == errno.EINVAL
    finally:
        os.close(fd)


def test_grow_pool_on_reflink_says_how_instead(tree: Tree) -> None:
    fd = os.open(tree.vms / ".vmtree" / "ctl", os.O_RDWR)
    try:
        for command, expected in (
            (b"grow-pool 8G\n", errno.ENOTSUP),
            (b"grow-pool lots\n", errno.EINVAL),
            (b"grow-pool 1G 2G\n", errno.EINVAL),
        ):
            try:
                os.write(fd, command)
                raise AssertionError(f"{command!r} was accepted")
            except OSError as e:
                assert e.errno == expected, command
    finally:
        os.close(fd)
    assert "cannot grow its pool: grow its filesystem" in tree.log()
