"""A power cut at every flush: the disk under SOURCE and the engine is logged by dm-log-writes
while a workload runs through a real mount, then replayed to each flush and checked there.

This is xfstests' crash-consistency method (generic/482). One logged disk holds it all,
cut by dm-linear into partitions, so a single log orders every write: for reflink an XFS
that holds SOURCE (the store, its WAL and the pool's files); for dm-thin that XFS with the
store, and the pool's metadata and data devices. After each acknowledged operation a mark
goes into the log. At a flush, every operation marked before it was acknowledged, so it
must be there: the replayed disk is mounted (XFS recovers its log), vmtreefs mounted on
it (its recovery runs), and the tree must look as it did right after the last
acknowledged operation, or after the next one (the operation the cut interrupted, whole
or not at all). Then ``.vmtree/status`` must say inventory ok with no open intent, and
after the unmount ``vmtreefs fsck`` must be clean.

Only in a kernel with device-mapper: ``tests/dmthin`` runs it in the guest. A flush after
which nothing new was written leaves the same disk, so only the flushes that follow a
change count as points. ``make test`` checks a seeded sample of them;
``VMTREE_POWERCUT_POINTS=all`` (or a number) checks more, and
``VMTREE_CRASH_SEED`` picks the sample.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fs.test_dmthin_mount import dm_names
from tests.helpers import mounts
from tests.helpers.images import is_mountpoint, run
from tests.helpers.logwrites import Entry, Replay, flush_points, read_log
from tests.helpers.mounts import MountFailed
from tests.helpers.tree import Tree, ctl, head, listing, write_at
from vmtreefs.app.cli import main as vmtreefs_command
from vmtreefs.engine.select import dmthin_available

MiB = 1 << 20
SECTOR = 512
PARTS = {
    "reflink": [("src", 320 * MiB)],
    "dmthin": [("src", 320 * MiB), ("meta", 48 * MiB), ("data", 256 * MiB)],
}
LOG_SIZE = 2 << 30  # sparse: only what is logged takes room
POINTS = os.environ.get("VMTREE_POWERCUT_POINTS", "2")
SEED = int(os.environ.get("VMTREE_CRASH_SEED", str(int(time.time()))))
PREFIX = f"powercut{os.getpid()}"


def log_writes_available() -> tuple[bool, str]:
    ok, why = dmthin_available()
    if not ok:
        return False, why
    subprocess.run(["modprobe", "dm-log-writes"], capture_output=True, check=False)
    targets = subprocess.run(["dmsetup", "targets"], capture_output=True, text=True).stdout
    return "log-writes" in targets, "the log-writes target does not load"


def block(text: str) -> bytes:
    """One 4 KiB block: a page the kernel writes whole, so a cut leaves it old or new."""
    return text.encode().ljust(4096, b"\0")


def _write(vm: str, text: str) -> Callable[[Path], object]:
    return lambda vms: write_at(vms / vm / "volumes" / "private.img", block(text))


WORKLOAD: list[tuple[str, Callable[[Path], object]]] = [
    ("mkdir base", lambda vms: os.mkdir(vms / "base")),
    ("write base", _write("base", "base one")),
    ("clone base c1", lambda vms: os.mkdir(vms / "base" / "clones" / "c1")),
    ("write c1", _write("c1", "c1 one")),
    ("mkdir h", lambda vms: os.mkdir(vms / "h")),
    ("write h", _write("h", "head one")),
    ("version h", lambda vms: os.setxattr(vms / "h", "user.vmtree.versioned", b"1")),
    ("write h-next", _write("h-next", "head two")),
    ("commit h-next", lambda vms: ctl(vms, "h-next", "commit")),
    ("rmdir c1", lambda vms: os.rmdir(vms / "c1")),
    ("alias latest", lambda vms: os.symlink("base", vms / "latest")),
    ("clone base c2", lambda vms: os.mkdir(vms / "base" / "clones" / "c2")),
    ("write base again", _write("base", "base two")),
    ("unlink latest", lambda vms: os.unlink(vms / "latest")),
    ("rmdir c2", lambda vms: os.rmdir(vms / "c2")),
]


def observe(vms: Path) -> dict[str, str]:
    """What a user sees: each name, an alias's target, the first block of each private.img."""
    seen = {}
    for name in listing(vms):
        path = vms / name
        if path.is_symlink():
            seen[name] = "-> " + os.readlink(path)
        else:
            text = head(path / "volumes" / "private.img", 4096).rstrip(b"\0")
            seen[name] = text.decode(errors="replace")
    return seen


# -- the disk -------------------------------------------------------------------


@contextlib.contextmanager
def loop(path: Path) -> Iterator[str]:
    dev = run("losetup", "-f", "--show", str(path)).strip()
    try:
        yield dev
    finally:
        run("losetup", "-d", dev)


@contextlib.contextmanager
def dm(name: str, table: str) -> Iterator[str]:
    run("dmsetup", "create", name, "--table", table)
    try:
        yield f"/dev/mapper/{name}"
    finally:
        run("dmsetup", "remove", "--retry", name)


@contextlib.contextmanager
def partitions(under: str, parts: list[tuple[str, int]]) -> Iterator[dict[str, str]]:
    """dm-linear partitions of ``under``, by the same names whatever is under them (the
    store records the pool's device paths)."""
    with contextlib.ExitStack() as stack:
        found, start = {}, 0
        for part, size in parts:
            table = f"0 {size // SECTOR} linear {under} {start // SECTOR}"
            found[part] = stack.enter_context(dm(f"{PREFIX}-{part}", table))
            start += size
        yield found


@contextlib.contextmanager
def xfs_mounted(dev: str, where: Path) -> Iterator[None]:
    run("mount", "-t", "xfs", dev, str(where))
    try:
        yield
    finally:
        run("umount", str(where))


def remove_new_dm(before: set[str]) -> None:
    """A pool that a failed mount left assembled, and its thin devices."""
    left = [n for n in dm_names() if n not in before and n.startswith("vmtree-")]
    for name in sorted(left, key=lambda n: n.endswith("-pool")):
        subprocess.run(["dmsetup", "remove", "--retry", name], capture_output=True)


def engine_options(engine: str, devs: dict[str, str]) -> list[str]:
    if engine == "dmthin":
        return [f"data={devs['data']}", f"metadata={devs['meta']}"]
    return ["engine=reflink"]


# -- record, replay, check ----------------------------------------------------------


class Clock:
    """Seconds spent in each step, summed over the points: for the printed figures."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}
        self._at = time.monotonic()

    def lap(self, step: str) -> None:
        now = time.monotonic()
        self.spent[step] = self.spent.get(step, 0.0) + now - self._at
        self._at = now

    def line(self) -> str:
        return ", ".join(f"{step} {seconds:.1f} s" for step, seconds in self.spent.items())


def record(work: Path, engine: str, clock: Clock) -> list[dict[str, str]]:
    """Run the workload on a logged disk; what the tree showed after each operation."""
    parts = PARTS[engine]
    (work / "disk.img").write_bytes(b"")
    os.truncate(work / "disk.img", sum(size for _, size in parts))
    (work / "log.img").write_bytes(b"")
    os.truncate(work / "log.img", LOG_SIZE)
    tree = Tree(work)
    with contextlib.ExitStack() as stack:
        disk = stack.enter_context(loop(work / "disk.img"))
        log_dev = stack.enter_context(loop(work / "log.img"))
        sectors = int(run("blockdev", "--getsz", disk))
        logged = stack.enter_context(
            dm(f"{PREFIX}-logged", f"0 {sectors} log-writes {disk} {log_dev}")
        )
        devs = stack.enter_context(partitions(logged, parts))
        run("mkfs.xfs", "-q", "-K", "-m", "reflink=1", devs["src"])
        stack.enter_context(xfs_mounted(devs["src"], tree.source))
        stack.callback(tree.unmount)
        clock.lap("set-up")
        tree.mount(engine_options(engine, devs))
        clock.lap("first mount")

        def mark(name: str) -> None:
            run("dmsetup", "message", logged, "0", "mark", name)

        mark("ready")
        models = [observe(tree.vms)]
        for n, (_, operation) in enumerate(WORKLOAD, 1):
            operation(tree.vms)
            models.append(observe(tree.vms))
            mark(f"op{n}")
        clock.lap("workload")
        tree.unmount()
    clock.lap("unmount, teardown")
    return models


def check_point(
    work: Path, engine: str, models: list[dict[str, str]], done: int, clock: Clock
) -> str | None:
    """Mount the disk as replayed so far; None if all is there, else what is wrong."""
    point = work / "point.img"
    run("cp", "--sparse=always", str(work / "replay.img"), str(point))
    clock.lap("copy")
    (work / "vms.daemon.log").unlink(missing_ok=True)
    tree = Tree(work, fork=True)
    before = set(dm_names())
    try:
        with contextlib.ExitStack() as stack:
            devs = stack.enter_context(partitions(stack.enter_context(loop(point)), PARTS[engine]))
            stack.callback(remove_new_dm, before)
            try:
                stack.enter_context(xfs_mounted(devs["src"], tree.source))
            except AssertionError as e:
                return f"SOURCE's XFS does not mount: {e}"
            clock.lap("XFS mount")
            stack.callback(tree.unmount)
            try:
                tree.mount()
            except MountFailed as e:
                return f"vmtreefs mount failed:\n{str(e)[-3000:]}"
            clock.lap("vmtreefs mount")
            seen = observe(tree.vms)
            if seen not in models[done : done + 2]:
                after = WORKLOAD[done][0] if done < len(WORKLOAD) else "the end"
                return f"saw {seen},\nacknowledged {models[done]} (then {after})"
            status = tree.status()
            if (status["inventory"], status["open_intents"]) != ("ok", "0"):
                return f"after recovery: {status['inventory']=}, {status['open_intents']=}"
            clock.lap("look")
            tree.unmount()
            clock.lap("unmount")
            code, out = fsck(tree.source)
            clock.lap("fsck")
            if code != 0:
                return f"fsck exit {code}:\n{out}"
        return None
    finally:
        point.unlink(missing_ok=True)
        if is_mountpoint(tree.source):
            subprocess.run(["umount", "-l", str(tree.source)], check=False)
        clock.lap("teardown")


def fsck(source: Path) -> tuple[int, str]:
    """``vmtreefs fsck SOURCE``, in this process: the guest takes seconds to start Python."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = vmtreefs_command(["fsck", str(source)])
    return code, out.getvalue()


def sample(points: list[tuple[Entry, list[str]]]) -> list[tuple[Entry, list[str]]]:
    """The points to check, in log order: all, or a seeded few."""
    if POINTS == "all" or int(POINTS) >= len(points):
        return points
    chosen = random.Random(SEED).sample(points, int(POINTS))
    return sorted(chosen, key=lambda p: p[0].index)


@pytest.mark.parametrize("engine", ["reflink", "dmthin"])
def test_power_cut_at_every_flush(
    tmp_path: Path, engine: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ok, why = log_writes_available()
    if not ok:
        pytest.skip(f"no dm-log-writes here ({why}); tests/dmthin runs this in a guest")
    # A daemon's Python took over 120 s to start in the TCG guest on a loaded machine.
    monkeypatch.setattr(mounts, "READY_TIMEOUT", 600.0)
    started, recording = time.monotonic(), Clock()
    models = record(tmp_path, engine, recording)
    recorded = time.monotonic()
    _, entries = read_log(tmp_path / "log.img")
    points = list(flush_points(entries, after_mark="ready"))
    chosen = sample(points)
    replay = Replay(tmp_path / "log.img", tmp_path / "replay.img", sum(s for _, s in PARTS[engine]))
    failures = []
    clock = Clock()
    try:
        for entry, marks in chosen:
            replay.to(entry.index)
            clock.lap("replay")
            done = sum(1 for m in marks if m.startswith("op"))
            problem = check_point(tmp_path, engine, models, done, clock)
            where = f"cut at log entry {entry.index} (after {marks[-1]})"
            with capsys.disabled():
                print(f"\npower cut on {engine}: {where}: {problem or 'clean'}", flush=True)
            if problem is not None:
                failures.append(f"{where}: {problem}")
    finally:
        replay.close()
    flushes = sum(1 for e in entries if e.flushes)
    with capsys.disabled():
        print(
            f"\npower cut on {engine}: {len(entries)} log entries, {flushes} flushes, "
            f"{len(points)} points after the tree was made, {len(chosen)} checked "
            f"(VMTREE_POWERCUT_POINTS={POINTS}, seed {SEED}); recording "
            f"{recorded - started:.1f} s ({recording.line()}), checking "
            f"{time.monotonic() - recorded:.1f} s ({clock.line()})"
        )
    assert not failures, "\n\n".join(failures)
