"""Benchmark: linked clones through vmtreefs, against the raw durable clone they cannot beat.

Not a test (pytest does not collect it). Run it as root from the checkout:

    .venv/bin/python -m tests.bench.clone        # or: .venv/bin/python tests/bench/clone.py

On one sparse, loop-mounted XFS with reflink it:

1. mounts vmtreefs on a fresh SOURCE, makes ``vms/src`` (root 10 GiB, private 2 GiB,
   volatile 1 GiB) and writes 256 MiB of random data at scattered offsets through the
   mount (192 MiB into root, 64 MiB into private), then fsyncs;
2. makes ``--clones`` linked clones of src three ways, interleaved (the order rotates
   every iteration), each one timed with ``time.perf_counter``:

   - **vmtreefs**: ``mkdir vms/src/clones/cN`` through the mount, as a user does;
   - **in-process**: ``VmTree.clone_vm`` called in this process, without FUSE, on a
     second SOURCE whose pool holds hard links to the same three backing files (so
     exactly the same extents are cloned), timing its snapshots, its fsyncs of the pool
     directory and its store transactions, to split the cost;
   - **floor**: what any durable clone pays: FICLONE of the same three files into new
     files (``O_CREAT|O_EXCL``), fsync of each, fsync of their directory, and one
     SQLite commit (WAL, ``synchronous=FULL``) of an INSERT, on the same filesystem,
     each step timed;

   and the CPU time each way used (the daemon's from /proc/PID/task/*/schedstat);
3. times a FUSE round trip (a lookup of a name that does not exist), a trio
   worker-thread hop, a plain ``mkdir`` of a new VM, and the getxattr that ``ls -l``
   makes on each entry;
4. makes new VMs until there are ``--vms`` at the top level, and times ``ls -l vms``
   against ``ls -l`` of a plain directory on the same XFS holding as many
   subdirectories of 6 entries each (a VM directory's size), each ``--ls-runs`` times
   after a remount (of vmtreefs and of the XFS: the first run is cold, the rest warm).

Everything it made (mounts, loop device, image) is torn down at the end, also on a
failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import platform
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

if not __package__:
    # Run as a script: make the checkout (for ``tests.helpers``) importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pyfuse3
import trio

from tests.helpers.images import mounted_image, run
from tests.helpers.tree import Tree
from vmtreefs.core.tree import VmTree
from vmtreefs.engine import fiemap, reflink
from vmtreefs.engine.reflink import FICLONE, ReflinkEngine, mount_of
from vmtreefs.fs import inodes
from vmtreefs.rules.names import MiB
from vmtreefs.rules.objects import DEFAULT_VOLUMES
from vmtreefs.store import Store, Txn

CHUNK = 256 * 1024
"""Random data goes in at this granularity, at random chunk-aligned offsets."""

DATA = {"root": 192 * MiB, "private": 64 * MiB}
"""How much random data each volume of src gets (256 MiB in all)."""

VM_DIRS = ("clones", "volumes", "savestates", "versions")
VM_FILES = ("ctl", "state")
"""A VM directory's 6 entries, mirrored in the plain directory ``ls -l`` is compared with."""


# Figures


def percentile(values: Sequence[float], q: int) -> float:
    """The ``q``-th percentile, interpolated between the closest ranks."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


@dataclass
class Series:
    """Durations of one operation, in seconds."""

    label: str
    seconds: list[float] = field(default_factory=list)

    def add(self, started: float) -> None:
        self.seconds.append(time.perf_counter() - started)

    def ms(self) -> list[float]:
        return [s * 1000 for s in self.seconds]

    @property
    def p50(self) -> float:
        return percentile(self.ms(), 50)

    @property
    def p95(self) -> float:
        return percentile(self.ms(), 95)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.ms())

    @property
    def max(self) -> float:
        return max(self.ms())

    def row(self) -> str:
        return (
            f"| {self.label} | {len(self.seconds)} | {self.p50:.2f} | {self.p95:.2f} "
            f"| {self.mean:.2f} | {self.max:.2f} |"
        )


def table(rows: Sequence[Series]) -> str:
    lines = [
        "| operation | n | p50 ms | p95 ms | mean ms | max ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    return "\n".join(lines + [s.row() for s in rows])


def say(text: str = "") -> None:
    print(text, flush=True)


def progress(what: str, done: int, total: int) -> None:
    if done == total or done % 50 == 0:
        print(f"  {what}: {done}/{total}", file=sys.stderr, flush=True)


# The machine


def machine() -> list[str]:
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with open("/proc/meminfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    host = mount_of(Path(tempfile.gettempdir()))
    xfsprogs = run("mkfs.xfs", "-V").strip()
    return [
        f"cpu: {cpu}",
        f"cores: {os.cpu_count()} (usable here: {len(os.sched_getaffinity(0))})",
        f"memory: {memory}",
        f"kernel: {platform.release()} ({platform.machine()})",
        f"python: {platform.python_version()}",
        f"pyfuse3: {pyfuse3.__version__}, trio: {trio.__version__}",
        f"sqlite: {sqlite3.sqlite_version}",
        f"xfs image: {xfsprogs}, on {host.fstype} ({host.source}) at {tempfile.gettempdir()}",
    ]


# Setting up src


def volume_files(tree: Tree, vm: str) -> dict[str, tuple[int, Path]]:
    """Each volume of ``vm``: its id (decoded from the inode number) and its backing file."""
    found: dict[str, tuple[int, Path]] = {}
    for spec in DEFAULT_VOLUMES:
        st = os.stat(tree.vms / vm / "volumes" / f"{spec.name}.img")
        node = inodes.decode(st.st_ino)
        if not isinstance(node, inodes.VolumeNode):
            raise RuntimeError(f"inode {st.st_ino} of {vm}/{spec.name}.img is not a volume")
        backing = tree.source / "pool" / f"vol-{node.volume_id}.img"
        if backing.stat().st_size != st.st_size:
            raise RuntimeError(f"{backing} is not the backing file of {vm}/{spec.name}.img")
        found[spec.name] = (node.volume_id, backing)
    return found


def write_scattered(path: Path, amount: int, rng: random.Random) -> None:
    """Write ``amount`` bytes of random data in CHUNKs at random offsets, then fsync."""
    slots = sorted(rng.sample(range(path.stat().st_size // CHUNK), amount // CHUNK))
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for slot in slots:
            data = memoryview(os.urandom(CHUNK))
            offset = slot * CHUNK
            while data:
                written = os.pwrite(fd, data, offset)
                data, offset = data[written:], offset + written
        os.fsync(fd)
    finally:
        os.close(fd)


def extent_count(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return sum(1 for _ in fiemap.extents(fd))
    finally:
        os.close(fd)


# Time spent in the steps of an operation


class Steps:
    """Seconds spent in named steps, summed over each operation: one sample per operation."""

    def __init__(self, *names: str) -> None:
        self.names = names
        self._current = dict.fromkeys(names, 0.0)
        self.counts = dict.fromkeys(names, 0)
        self.samples: dict[str, list[float]] = {name: [] for name in names}

    @contextmanager
    def timing(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._current[name] += time.perf_counter() - t0
            self.counts[name] += 1

    def end_operation(self) -> None:
        for name in self.names:
            self.samples[name].append(self._current[name])
            self._current[name] = 0.0


# The floor


class Floor:
    """The raw durable clone of three files, timed step by step."""

    def __init__(self, directory: Path, sources: dict[str, Path]) -> None:
        directory.mkdir()
        self.directory = directory
        self.names = list(sources)
        self.steps = Steps(
            *(f"FICLONE {name}" for name in self.names),
            "fsync of a new file",
            "fsync of the directory",
            "commit",
        )
        self.sources: dict[str, int] = {}
        self.db: sqlite3.Connection | None = None
        try:
            for name, path in sources.items():
                self.sources[name] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self.db = sqlite3.connect(directory / "floor.db", isolation_level=None)
            mode = self.db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise RuntimeError(f"SQLite refused WAL (got {mode!r})")
            self.db.execute("PRAGMA synchronous = FULL")
            self.db.execute(
                "CREATE TABLE clones (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, "
                "created REAL NOT NULL, volumes TEXT NOT NULL)"
            )
        except BaseException:
            self.close()
            raise

    def clone(self, name: str) -> None:
        assert self.db is not None
        steps = self.steps
        made = []
        for volume, src in self.sources.items():
            path = self.directory / f"{name}-{volume}.img"
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            try:
                with steps.timing(f"FICLONE {volume}"):
                    fcntl.ioctl(fd, FICLONE, src)
                with steps.timing("fsync of a new file"):
                    os.fsync(fd)
            finally:
                os.close(fd)
            made.append(path.name)
        with steps.timing("fsync of the directory"):
            dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        with steps.timing("commit"):
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(
                "INSERT INTO clones (name, created, volumes) VALUES (?, ?, ?)",
                (name, time.time(), ",".join(made)),
            )
            self.db.execute("COMMIT")
        steps.end_operation()

    def close(self) -> None:
        while self.sources:
            os.close(self.sources.popitem()[1])
        if self.db is not None:
            self.db.close()
            self.db = None


# vmtreefs in this process, without FUSE

CORE_STEPS = ("snapshot", "fsync of the pool", "transaction")


class TimedEngine(ReflinkEngine):
    """The reflink engine, timing its snapshots."""

    def __init__(self, source: Path, steps: Steps) -> None:
        super().__init__(source, "inplace")
        self.steps = steps

    def snapshot(self, src_id: int, new_id: int) -> None:
        with self.steps.timing("snapshot"):
            super().snapshot(src_id, new_id)


class TimedStore(Store):
    """The store, timing its write transactions (BEGIN IMMEDIATE to COMMIT)."""

    steps: Steps | None = None

    @contextmanager
    def transaction(self) -> Iterator[Txn]:
        if self.steps is None:
            with super().transaction() as tx:
                yield tx
            return
        with self.steps.timing("transaction"), super().transaction() as tx:
            yield tx


@contextmanager
def timed_pool_fsyncs(steps: Steps) -> Iterator[None]:
    """Time the engine's fsyncs of the pool directory (one ends each snapshot), in this
    process only: the module function is swapped for a timed one, and put back."""
    original = reflink._fsync_dir

    def timed(directory: Path) -> None:
        with steps.timing("fsync of the pool"):
            original(directory)

    reflink._fsync_dir = timed
    try:
        yield
    finally:
        reflink._fsync_dir = original


@dataclass
class Core:
    """A VmTree on a second SOURCE whose src shares its backing files with the mount's src."""

    tree: VmTree
    store: TimedStore
    steps: Steps
    src_id: int

    @classmethod
    def open(cls, source: Path, volumes: dict[str, tuple[int, Path]]) -> Core:
        source.mkdir()
        steps = Steps(*CORE_STEPS)
        engine = TimedEngine(source, steps)
        engine.start()
        store = TimedStore.open(source / "vmtree.db")
        assert isinstance(store, TimedStore)
        try:
            created = time.time()
            with store.transaction() as tx:
                vm_id = tx.insert_vm("src", created)
                for spec in DEFAULT_VOLUMES:
                    vol_id, backing = volumes[spec.name]
                    # A hard link: the same inode, so the same extents to clone.
                    os.link(backing, engine.path(vol_id))
                    size = backing.stat().st_size
                    tx.insert_volume(vol_id, vm_id, spec.name, size, spec.policy, created)
            tree = VmTree(store, engine)
            report = tree.recover()
            if report.differences or report.left_open:
                raise RuntimeError(f"the in-process tree does not load cleanly: {report}")
        except BaseException:
            store.close()
            raise
        store.steps = steps
        return cls(tree, store, steps, vm_id)

    def close(self) -> None:
        self.store.close()
        self.tree.engine.stop()


# The phases


def cpu_ns(pid: int) -> int:
    """Nanoseconds on a CPU of all the threads of process ``pid`` (from schedstat)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", encoding="ascii") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            continue  # the thread ended
    return total


@dataclass
class Clones:
    """The clone phase: each way's times, the CPU each used, and trio's thread hop."""

    fuse: Series
    core: Series
    floor: Series
    hop: Series
    cpu_ns: dict[str, int] = field(default_factory=dict)


async def clone_three_ways(count: int, vms: Path, daemon: int, core: Core, floor: Floor) -> Clones:
    """``count`` clones of src each way, interleaved, the order rotating each iteration."""
    result = Clones(
        fuse=Series("vmtreefs: `mkdir vms/src/clones/cN`"),
        core=Series("vmtreefs in-process: `VmTree.clone_vm`, no FUSE"),
        floor=Series("floor: 3 × (FICLONE + fsync), fsync dir, 1 SQLite commit"),
        hop=Series("trio thread hop (`to_thread.run_sync` of a no-op)"),
    )
    cpu = dict.fromkeys(("fuse", "core", "core trio thread", "floor", "daemon"), 0)
    daemon_before = cpu_ns(daemon)
    ways = ("fuse", "core", "floor")
    with timed_pool_fsyncs(core.steps):
        for i in range(count):
            name = f"c{i}"
            for way in ways[i % 3 :] + ways[: i % 3]:
                c0 = time.process_time_ns()
                t0 = time.perf_counter()
                if way == "fuse":
                    os.mkdir(vms / "src" / "clones" / name)
                    result.fuse.add(t0)
                elif way == "core":
                    own = time.thread_time_ns()
                    await core.tree.clone_vm(core.src_id, name)
                    result.core.add(t0)
                    cpu["core trio thread"] += time.thread_time_ns() - own
                    core.steps.end_operation()
                else:
                    floor.clone(name)
                    result.floor.add(t0)
                cpu[way] += time.process_time_ns() - c0
            progress("clones", i + 1, count)
    # Everything the daemon did meanwhile was for the clones through the mount.
    cpu["daemon"] = cpu_ns(daemon) - daemon_before
    for _ in range(count):
        t0 = time.perf_counter()
        await trio.to_thread.run_sync(time.perf_counter)
        result.hop.add(t0)
    result.cpu_ns = cpu
    return result


def round_trips(vms: Path, count: int) -> Series:
    series = Series("FUSE round trip: `stat` of a missing name")
    for i in range(count):
        t0 = time.perf_counter()
        try:
            os.lstat(vms / f"missing-{i}")
        except FileNotFoundError:
            series.add(t0)
        else:
            raise RuntimeError(f"{vms}/missing-{i} exists")
    return series


def foreign_xattr(vms: Path, names: Sequence[str], label: str) -> Series:
    """Time a getxattr that finds nothing, of the kind ``ls -l`` makes 3 times per entry."""
    series = Series(label)
    for name in names:
        t0 = time.perf_counter()
        try:
            os.getxattr(vms / name, "security.selinux", follow_symlinks=False)
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise
            series.add(t0)
        else:
            raise RuntimeError(f"{vms}/{name} has a security.selinux attribute")
    return series


def top_level(directory: Path) -> int:
    return sum(1 for name in os.listdir(directory) if not name.startswith("."))


def fill_with_vms(vms: Path, target: int) -> Series:
    series = Series("vmtreefs: `mkdir vms/vmN` (a new VM, 3 empty volumes)")
    missing = target - top_level(vms)
    for i in range(missing):
        t0 = time.perf_counter()
        os.mkdir(vms / f"vm{i:04d}")
        series.add(t0)
        progress("new VMs", i + 1, missing)
    return series


def plain_directory(directory: Path, count: int) -> None:
    directory.mkdir()
    for i in range(count):
        vm = directory / f"vm{i:04d}"
        vm.mkdir()
        for name in VM_DIRS:
            (vm / name).mkdir()
        for name in VM_FILES:
            (vm / name).touch()


def remount_xfs(mnt: Path) -> None:
    """Unmount and mount the XFS again, so its caches are cold (mounted_image keeps the image
    beside the mount point)."""
    image = mnt.parent / "image.xfs"
    if not image.is_file():
        raise RuntimeError(f"no XFS image at {image}")
    run("umount", str(mnt))
    run("mount", "-t", "xfs", "-o", "loop", str(image), str(mnt))


def ls(directory: Path) -> list[str]:
    """``ls -l`` lists, stats and asks 3 extended attributes of each entry (the SELinux label
    and two ACLs)."""
    return ["ls", "-l", str(directory)]


def find(directory: Path) -> list[str]:
    """``find -ls`` prints much the same as ``ls -l`` (hidden names aside) but asks no
    extended attributes."""
    return ["find", str(directory), "-mindepth", "1", "-maxdepth", "1", "!", "-name", ".*", "-ls"]


def time_listing(argv: list[str], runs: int, expected: int) -> list[float]:
    """Seconds of each run of ``argv`` (output to /dev/null); checks the count once."""
    took = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)
        took.append(time.perf_counter() - t0)
    listed = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    entries = sum(1 for line in listed.splitlines() if not line.startswith("total "))
    if entries != expected:
        raise RuntimeError(f"{' '.join(argv)} listed {entries} entries, not {expected}")
    return took


# The report


def steps_table(total: Series, steps: Steps, labels: dict[str, str], rest: str) -> str:
    """Per operation: how many times each step ran, and its mean and p95 (summed per op)."""
    n = len(total.seconds)
    lines = [
        f"{total.label}: mean {total.mean:.2f} ms",
        "",
        "| step | per clone | mean ms | p95 ms |",
        "|---|---:|---:|---:|",
    ]
    others = [0.0] * n
    for name, label in labels.items():
        ms = [s * 1000 for s in steps.samples[name]]
        others = [o + m for o, m in zip(others, ms, strict=True)]
        count = steps.counts[name] / n
        lines.append(
            f"| {label} | {count:g} | {statistics.fmean(ms):.2f} | {percentile(ms, 95):.2f} |"
        )
    rest_ms = [t - o for t, o in zip(total.ms(), others, strict=True)]
    lines.append(f"| {rest} | | {statistics.fmean(rest_ms):.2f} | {percentile(rest_ms, 95):.2f} |")
    return "\n".join(lines)


def clone_report(
    clones: Clones,
    others: Sequence[Series],
    core: Core,
    floor: Floor,
    extents: dict[str, int],
) -> None:
    n = len(clones.fuse.seconds)
    say(f"## Clones of src ({n} each way, interleaved), and other operations")
    say()
    say(table([clones.fuse, clones.core, clones.floor, *others, clones.hop]))
    say()
    say(
        f"vmtreefs / floor: p50 × {clones.fuse.p50 / clones.floor.p50:.2f}, "
        f"p95 × {clones.fuse.p95 / clones.floor.p95:.2f}, "
        f"mean × {clones.fuse.mean / clones.floor.mean:.2f}"
    )
    say()
    say("## Where a clone's time goes")
    say()
    say(
        steps_table(
            clones.floor,
            floor.steps,
            {
                **{
                    f"FICLONE {name}": f"FICLONE of {name} ({extents[name]} extents)"
                    for name in floor.names
                },
                "fsync of a new file": "fsync of a new file",
                "fsync of the directory": "fsync of the directory",
                "commit": "SQLite commit of one INSERT",
            },
            "the rest (open, close)",
        )
    )
    say()
    # The pool fsyncs happen inside the snapshots: take them out of the snapshot figure.
    steps = core.steps
    steps.samples["snapshot"] = [
        s - f
        for s, f in zip(steps.samples["snapshot"], steps.samples["fsync of the pool"], strict=True)
    ]
    say(
        steps_table(
            clones.core,
            steps,
            {
                "snapshot": "engine snapshot: temp file, FICLONE, fsync, link, unlink",
                "fsync of the pool": "engine snapshot: fsync of the pool directory",
                "transaction": "store transaction (BEGIN IMMEDIATE .. COMMIT)",
            },
            "the rest (worker-thread hops, trio, model)",
        )
    )
    say()
    over = clones.fuse.mean - clones.core.mean
    say(
        f"Through the mount, over in-process: {over:.2f} ms mean "
        f"({clones.fuse.p50 - clones.core.p50:.2f} at p50)."
    )
    cpu = {k: v / n / 1e6 for k, v in clones.cpu_ns.items()}
    say(
        f"CPU per clone: through the mount {cpu['fuse'] + cpu['daemon']:.2f} ms "
        f"(the daemon {cpu['daemon']:.2f}, the mkdir caller {cpu['fuse']:.2f}); "
        f"in-process {cpu['core']:.2f} ms (of which the trio thread: VmTree, model, "
        f"trio {cpu['core trio thread']:.2f}); floor {cpu['floor']:.2f} ms."
    )
    say()


def ls_report(count: int, runs: dict[str, list[float]]) -> None:
    say(f"## Listing {count} directories")
    say()
    say("Each filesystem was remounted first: the first `ls -l` is cold, the rest warm.")
    say()
    say("| listing | run 1 ms | runs 2.. median ms | all runs ms |")
    say("|---|---:|---:|---|")
    for label, seconds in runs.items():
        ms = [s * 1000 for s in seconds]
        rest = f"{statistics.median(ms[1:]):.1f}" if len(ms) > 1 else "-"
        every = ", ".join(f"{m:.1f}" for m in ms)
        say(f"| {label} | {ms[0]:.1f} | {rest} | {every} |")
    say()


# Main


_signalled: list[int] = []


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGINT and SIGTERM: unwind, so that every ``finally`` tears its part down."""
    _signalled.append(signum)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.clone",
        description="Time linked clones through vmtreefs against the raw durable clone.",
    )
    parser.add_argument("--clones", type=int, default=200, help="clones each way (200)")
    parser.add_argument("--vms", type=int, default=1000, help="VMs for `ls -l` (1000)")
    parser.add_argument("--ls-runs", type=int, default=5, help="runs of each `ls -l` (5)")
    parser.add_argument("--image-size", default="12G", help="sparse XFS image size (12G)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the data offsets (1)")
    args = parser.parse_args(argv)
    if args.clones < 1 or args.ls_runs < 1 or args.vms < args.clones + 1:
        parser.error("need --clones >= 1, --ls-runs >= 1 and --vms > --clones")
    return args


def bench(args: argparse.Namespace) -> None:
    started = time.monotonic()
    say("# vmtreefs clone benchmark")
    say()
    for line in machine():
        say(f"- {line}")
    say()
    with mounted_image("xfs", args.image_size) as workdir:
        say(f"- workdir: {workdir} (XFS, reflink=1, sparse image of {args.image_size})")
        tree = Tree(workdir)
        try:
            tree.mount()
            vms = tree.vms
            os.mkdir(vms / "src")
            volumes = volume_files(tree, "src")
            rng = random.Random(args.seed)
            t0 = time.perf_counter()
            for name, amount in DATA.items():
                write_scattered(vms / "src" / "volumes" / f"{name}.img", amount, rng)
            took = time.perf_counter() - t0
            extents = {name: extent_count(path) for name, (_, path) in volumes.items()}
            say(
                f"- src: {sum(DATA.values()) // MiB} MiB of random data written through the "
                f"mount in {CHUNK // 1024} KiB chunks at random offsets in {took:.1f} s "
                f"({sum(DATA.values()) / MiB / took:.0f} MiB/s); extents: "
                + ", ".join(f"{name} {n}" for name, n in extents.items())
            )
            say()

            assert tree.daemon is not None
            core = Core.open(workdir / "core", volumes)
            try:
                floor = Floor(workdir / "floor", {n: path for n, (_, path) in volumes.items()})
                try:
                    clones = trio.run(
                        clone_three_ways, args.clones, vms, tree.daemon.pid, core, floor
                    )
                finally:
                    floor.close()
            finally:
                core.close()
            rtt = round_trips(vms, args.clones)
            new_vms = fill_with_vms(vms, args.vms)
            xattr_clones = foreign_xattr(
                vms,
                [f"c{i}" for i in range(args.clones)],
                "FUSE getxattr `security.selinux` of a clone's directory (as `ls -l`)",
            )
            xattr_new = foreign_xattr(
                vms,
                [f"vm{i:04d}" for i in range(min(args.clones, args.vms - args.clones - 1))],
                "FUSE getxattr `security.selinux` of a new VM's directory (as `ls -l`)",
            )
            clone_report(clones, [rtt, new_vms, xattr_clones, xattr_new], core, floor, extents)

            plain = workdir / "plain"
            plain_directory(plain, args.vms)
            tree.unmount()
            remount_xfs(workdir)
            runs = {
                "`ls -l` of a plain XFS directory": time_listing(ls(plain), args.ls_runs, args.vms),
                "`find -ls` of it": time_listing(find(plain), args.ls_runs, args.vms),
            }
            tree.mount()
            runs["`ls -l vms` (vmtreefs)"] = time_listing(ls(vms), args.ls_runs, args.vms)
            runs["`find vms -ls` (vmtreefs)"] = time_listing(find(vms), args.ls_runs, args.vms)
            ls_report(args.vms, runs)
        finally:
            tree.unmount()
    say(f"(whole run: {time.monotonic() - started:.0f} s)")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("this benchmark needs root: it loop-mounts an XFS image", file=sys.stderr)
        return 2
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    try:
        bench(args)
    except (KeyboardInterrupt, Exception):
        # Ctrl-C reaches the daemon too, which may unmount before this process notices:
        # the error that follows is part of the interruption, not a failure to report.
        if not _signalled:
            raise
        print("interrupted; the mounts and the image were torn down", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
