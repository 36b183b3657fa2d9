"""The kill -9 loop: every operation, interrupted at a random moment, is all there or not at all.

For each round an operation runs in a thread while the daemon is sent SIGKILL
after a random delay (seeded: ``VMTREE_CRASH_SEED``; the seed is printed). The
dead mount is cleared, the tree mounted again, and the outcome checked the way
a user would look: an operation that returned success is there; one that had
not returned is either wholly there or wholly absent. Then the tree is
unmounted and ``vmtreefs fsck`` must find it clean, and the engine must hold
exactly the store's volumes (``.vmtree/status``: inventory ok).

``make test`` runs a short loop; ``make crash-test`` a long one
(``VMTREE_CRASH_KILLS``).
"""

from __future__ import annotations

import functools
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.crash import killed_during, sound_after_recovery
from tests.helpers.tree import Tree, ctl, head, listing, write_at
from vmtreefs.engine.select import dmthin_available

KILLS = int(os.environ.get("VMTREE_CRASH_KILLS", "27"))
# dm-thin runs in a TCG guest, where a round (three mounts and an fsck with thin_check)
# takes about 50 s: 14 kills there took 12 minutes.
KILLS_DMTHIN = int(os.environ.get("VMTREE_CRASH_KILLS", "3"))
SEED = int(os.environ.get("VMTREE_CRASH_SEED", str(int(time.time()))))
MAX_DELAY = 0.04  # seconds: most operations take a few milliseconds


@dataclass
class Operation:
    """``prepare`` runs on a live mount, ``run`` is interrupted, ``check`` looks afterwards
    (``done``: run returned success) and raises AssertionError for a half-made result."""

    name: str
    prepare: Callable[[Path, int], None]
    run: Callable[[Path, int], None]
    check: Callable[[Path, int, bool], None]


def _nothing(vms: Path, n: int) -> None:
    pass


def _mkdir_check(vms: Path, n: int, done: bool) -> None:
    there = f"m{n}" in listing(vms)
    assert there or not done, "mkdir returned but the VM is gone"
    if there:
        images = sorted(p for p in os.listdir(vms / f"m{n}" / "volumes") if p.endswith(".img"))
        assert images == ["private.img", "root.img", "volatile.img"]


def _clone_check(vms: Path, n: int, done: bool) -> None:
    there = f"c{n}" in listing(vms)
    assert there or not done, "the clone returned but is gone"
    if there:
        assert os.readlink(vms / f"c{n}" / "origin") == "../base"
        assert head(vms / f"c{n}" / "volumes" / "private.img", 4) == b"base"


def _rmdir_prepare(vms: Path, n: int) -> None:
    os.mkdir(vms / f"d{n}")
    write_at(vms / f"d{n}" / "volumes" / "private.img", b"gone?")


def _rmdir_check(vms: Path, n: int, done: bool) -> None:
    there = f"d{n}" in listing(vms)
    assert not (there and done), "rmdir returned but the VM is still there"
    if there:
        assert head(vms / f"d{n}" / "volumes" / "private.img", 5) == b"gone?"


def _rename_check(vms: Path, n: int, done: bool) -> None:
    names = listing(vms)
    assert (f"r{n}" in names) != (f"s{n}" in names), "after mv exactly one name is there"
    assert f"s{n}" in names or not done


def _repoint_prepare(vms: Path, n: int) -> None:
    os.symlink("base", vms / f"a{n}")


def _repoint_run(vms: Path, n: int) -> None:
    """``ln -sfn other vms/aN``: a new alias renamed over the old one."""
    os.symlink("other", vms / f"t{n}")
    os.rename(vms / f"t{n}", vms / f"a{n}")


def _repoint_check(vms: Path, n: int, done: bool) -> None:
    target = os.readlink(vms / f"a{n}")
    assert target in ("base", "other")
    assert target == "other" or not done
    if f"t{n}" in listing(vms):
        assert not done and os.readlink(vms / f"t{n}") == "other"
        os.unlink(vms / f"t{n}")


def _grow_run(vms: Path, n: int) -> None:
    os.truncate(vms / "base" / "volumes" / "private.img", (4 + n) << 30)


def _grow_check(vms: Path, n: int, done: bool) -> None:
    size = (vms / "base" / "volumes" / "private.img").stat().st_size
    assert size == (4 + n) << 30 or (not done and size < (4 + n) << 30), size


def _commit_run(vms: Path, n: int) -> None:
    ctl(vms, "h-next", "commit")


def _commit_check(vms: Path, n: int, done: bool) -> None:
    versions = sorted((int(v[1:]) for v in os.listdir(vms / "h-next" / "versions")), key=int)
    newest = f"h-v{versions[-1]}"
    assert os.readlink(vms / "h") == newest, "the alias names the newest version"
    assert os.readlink(vms / "h-next" / "origin") == f"../{newest}"
    assert head(vms / newest / "volumes" / "private.img", 4) == b"head"


OPERATIONS = [
    Operation("mkdir", _nothing, lambda vms, n: os.mkdir(vms / f"m{n}"), _mkdir_check),
    Operation(
        "clone", _nothing, lambda vms, n: os.mkdir(vms / "base" / "clones" / f"c{n}"), _clone_check
    ),
    Operation("rmdir", _rmdir_prepare, lambda vms, n: os.rmdir(vms / f"d{n}"), _rmdir_check),
    Operation(
        "rename",
        lambda vms, n: os.mkdir(vms / f"r{n}"),
        lambda vms, n: os.rename(vms / f"r{n}", vms / f"s{n}"),
        _rename_check,
    ),
    Operation("alias repoint", _repoint_prepare, _repoint_run, _repoint_check),
    Operation("volume grow", _nothing, _grow_run, _grow_check),
    Operation("commit", _nothing, _commit_run, _commit_check),
]


def setup_tree(vms: Path) -> None:
    os.mkdir(vms / "base")
    write_at(vms / "base" / "volumes" / "private.img", b"base")
    os.mkdir(vms / "other")
    os.mkdir(vms / "h")
    write_at(vms / "h" / "volumes" / "private.img", b"head")
    os.setxattr(vms / "h", "user.vmtree.versioned", b"1")


@pytest.mark.parametrize("engine", ["reflink", "dmthin"])
def test_kill9_loop(workdir: Path, engine: str, capsys: pytest.CaptureFixture[str]) -> None:
    if engine == "dmthin" and not dmthin_available()[0]:
        pytest.skip("no dm-thin in this kernel; tests/dmthin runs this in a guest")
    options = ["engine=dm-thin", "size=256M"] if engine == "dmthin" else ["engine=reflink"]
    kills = KILLS_DMTHIN if engine == "dmthin" else KILLS
    tree = Tree(workdir)
    tree.mount(options)
    try:
        loop(tree, kills, engine, capsys)
    finally:
        tree.unmount()


def loop(tree: Tree, kills: int, engine: str, capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(SEED)
    with capsys.disabled():
        print(f"\nkill -9 loop on {engine}: seed {SEED} (VMTREE_CRASH_SEED), {kills} kills")
    setup_tree(tree.vms)
    tally: dict[str, list[int]] = {op.name: [0, 0] for op in OPERATIONS}
    for n in range(kills):
        op = OPERATIONS[n % len(OPERATIONS)]
        delay = rng.uniform(0, MAX_DELAY)
        op.prepare(tree.vms, n)
        done, _ = killed_during(tree, functools.partial(op.run, tree.vms, n), delay)
        tally[op.name][0 if done else 1] += 1
        what = f"round {n}: {op.name} killed after {delay * 1000:.1f} ms, seed {SEED}"
        vms = tree.mount()  # recovery rolls an unfinished operation back or forward
        try:
            op.check(vms, n, done)
        except AssertionError as e:
            raise AssertionError(f"{what} ({'returned' if done else 'interrupted'}): {e}") from e
        sound_after_recovery(tree, what)
    with capsys.disabled():
        print(
            f"kill -9 loop on {engine}: "
            + ", ".join(f"{name} {d} returned/{i} interrupted" for name, (d, i) in tally.items())
        )
