"""SOURCE's filesystem full: the store's WAL, the reflink pool and the events all live there.

SOURCE is a small XFS of its own, filled to the last block by a filler file; the
mount point and the daemon's log stay on another filesystem (as with the systemd
unit, whose log is the journal). Every operation a user makes then either fails
with ENOSPC and leaves the tree as it was, or succeeds wholly; the mount stays
up; and once the filler is gone every operation works and fsck is clean.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.images import mounted_image
from tests.helpers.tree import Tree, ctl, listing, read_at, write_at

MiB = 1 << 20


@pytest.fixture
def full_tree(workdir: Path) -> Iterator[Tree]:
    with mounted_image("xfs", "300M") as small:
        tree = Tree(workdir, source=small / "source")
        tree.mount(["libvirt=none"])
        try:
            yield tree
        finally:
            tree.unmount()


def fill(path: Path) -> int:
    """Write a filler file until its filesystem refuses even 4 KiB; return its size."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    written = 0
    try:
        for chunk in (b"\xa5" * MiB, b"\xa5" * 4096):
            while True:
                try:
                    written += os.write(fd, chunk)
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    break
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def outcome(op: Callable[[], object]) -> str:
    """'ok', or the errno's name; any errno but ENOSPC fails the test."""
    try:
        op()
    except OSError as e:
        assert e.errno == errno.ENOSPC, f"{op}: {e}"
        return "ENOSPC"
    return "ok"


def repoint(vms: Path, alias: str, target: str) -> None:
    """`ln -sfn TARGET ALIAS`: a new symlink renamed over the old one."""
    os.symlink(target, vms / f"{alias}-tmp")
    try:
        os.rename(vms / f"{alias}-tmp", vms / alias)
    finally:
        if os.path.lexists(vms / f"{alias}-tmp"):
            os.unlink(vms / f"{alias}-tmp")


def operations(vms: Path, n: int) -> dict[str, Callable[[], object]]:
    """What a user does, each on its own names (``n`` tells rounds apart); an rmdir
    must work on a full SOURCE too, with the room the store keeps for it."""
    return {
        "mkdir": lambda: os.mkdir(vms / f"new{n}"),
        "clone": lambda: os.mkdir(vms / "base" / "clones" / f"c{n}"),
        "rename": lambda: os.rename(vms / f"mover{n}", vms / f"moved{n}"),
        "repoint": lambda: repoint(vms, "cur", f"other{n}"),
        "setxattr": lambda: os.setxattr(vms / "base", "user.vmtree.memory", str(300 + n).encode()),
        "write": lambda: write_at(vms / "base/volumes/private.img", b"N" * MiB, (8 + n) * MiB),
        "overwrite": lambda: write_at(vms / "base/volumes/root.img", b"W" * MiB),
        "grow": lambda: os.truncate(vms / "base/volumes/volatile.img", (2048 + n) << 20),
        "commit": lambda: ctl(vms, "t-next", "commit"),
        "rmdir": lambda: os.rmdir(vms / f"victim{n}"),  # last: it makes room
    }


#: What the log's and .vmtree/events's line of each refused operation names.
REFUSAL = {
    "mkdir": "refused mkdir 'new1'",
    "clone": "refused mkdir 'c1'",
    "rmdir": "refused rmdir 'victim1'",
    "rename": "refused rename 'mover1'",
    "repoint": "refused symlink 'cur-tmp'",
    "setxattr": "refused setxattr 'user.vmtree.memory'",
    "write": "of base/private.img",
    "overwrite": "of base/root.img",
    "grow": "refused setattr",
    "commit": "refused write: t-next/ctl: commit:",
}


def prepare(vms: Path, n: int) -> None:
    for name in (f"victim{n}", f"mover{n}", f"other{n}"):
        os.mkdir(vms / name)
    write_at(vms / f"victim{n}/volumes/private.img", b"v" * MiB)


def check_each(vms: Path, n: int, results: dict[str, str]) -> None:
    """A refused operation left no trace; a done one is wholly there."""
    names = listing(vms)
    assert (f"new{n}" in names) == (results["mkdir"] == "ok")
    assert (f"c{n}" in names) == (results["clone"] == "ok")
    assert (f"victim{n}" in names) == (results["rmdir"] != "ok")
    assert (f"moved{n}" in names, f"mover{n}" in names) == (
        (True, False) if results["rename"] == "ok" else (False, True)
    )
    for name in names:
        volumes = sorted(p.name for p in (vms / name / "volumes").glob("*.img"))
        assert volumes == ["private.img", "root.img", "volatile.img"], (name, volumes)
    target = os.readlink(vms / "cur")
    assert target == (f"other{n}" if results["repoint"] == "ok" else "base"), target
    assert not os.path.lexists(vms / "cur-tmp")
    memory = os.getxattr(vms / "base", "user.vmtree.memory")
    assert (memory == str(300 + n).encode()) == (results["setxattr"] == "ok")


def fsck(source: Path) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "vmtreefs", "fsck", str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stdout + done.stderr


def grow_wal(tree: Tree) -> int:
    """Commit until the store's WAL has wrapped once (SQLite checkpoints it at 1000
    pages and then reuses it from its start): commits then need no new blocks."""
    wal = tree.source / "vmtree.db-wal"
    for n in range(2000):
        before = wal.stat().st_size
        os.setxattr(tree.vms / "base", "user.vmtree.vcpus", str(1 + n % 2).encode())
        if wal.stat().st_size < before or (n > 0 and wal.stat().st_size == before):
            break
    return wal.stat().st_size


@pytest.mark.parametrize("wal_room", [False, True], ids=["store-full", "engine-full"])
def test_a_full_source_refuses_with_enospc_and_works_again_with_room(
    full_tree: Tree, wal_room: bool
) -> None:
    """store-full: the WAL must grow for any commit; engine-full: the WAL has room
    (it wrapped before the filler came), so only what needs new blocks is refused."""
    tree, vms = full_tree, full_tree.vms
    os.mkdir(vms / "base")
    write_at(vms / "base/volumes/private.img", b"P" * (4 * MiB))
    write_at(vms / "base/volumes/root.img", b"R" * MiB)
    os.symlink("base", vms / "cur")
    os.mkdir(vms / "t")
    os.setxattr(vms / "t", "user.vmtree.versioned", b"1")
    os.mkdir(vms / "base" / "clones" / "sibling")  # shares root.img's blocks with base
    prepare(vms, 1)
    wal = grow_wal(tree) if wal_room else 0

    filler = tree.source / "filler"
    filled = fill(filler)
    results = {name: outcome(op) for name, op in operations(vms, 1).items()}
    print(f"SOURCE full ({filled // MiB} MiB filler, WAL {wal} bytes): {results}")
    assert "ENOSPC" in results.values(), "nothing needed space: the filler did not fill SOURCE"
    assert results["rmdir"] == "ok", "a full SOURCE refused the rmdir that makes room"
    check_each(vms, 1, results)
    version = 2 if results["commit"] == "ok" else 1
    assert os.readlink(vms / "t") == f"t-v{version}"
    status = tree.status()
    assert status["inventory"] == "ok"
    events = (vms / ".vmtree" / "events").read_text()
    log = tree.log()
    for name, result in results.items():
        if result == "ENOSPC":  # its reason, where the administrator reads
            line = next(line for line in log.splitlines() if REFUSAL[name] in line)
            assert "ENOSPC" in line and "No space left on device" in line, line
            assert REFUSAL[name] in events, events
    assert "Traceback" not in log, log[-3000:]

    # Room again: every operation works, including the ones refused above.
    filler.unlink()
    prepare(vms, 2)
    again = {name: outcome(op) for name, op in operations(vms, 2).items()}
    assert set(again.values()) == {"ok"}, again
    check_each(vms, 2, again)
    # A refused commit may have used up its number (numbers are never handed out
    # twice, as after a crash), so the next version is newer, not always the next.
    assert int(os.readlink(vms / "t").removeprefix("t-v")) > version
    assert read_at(vms / "base/volumes/private.img", 4, 10 * MiB) == b"NNNN"
    status = tree.status()
    assert (status["inventory"], status["open_intents"]) == ("ok", "0"), status
    reserve = (tree.source / "vmtree.db-reserve").stat()
    assert reserve.st_blocks * 512 >= 8 * MiB, "the space reserve was not taken again"
    tree.unmount()
    code, out = fsck(tree.source)
    assert code == 0, out
