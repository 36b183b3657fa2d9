"""Benchmark: what a backup tool gets from vmtreefs, against the raw operation beneath.

Not a test (pytest does not collect it). Run it as root from the checkout:

    .venv/bin/python -m tests.bench.backup          # --help: --export-gib, --map-gib, --vms

On one sparse, loop-mounted XFS with reflink it measures, side by side in one run:

1. **Export**: a committed version's volume (``vms/src-v1/volumes/data.img``, random
   data) read through the mount against the engine's backing file read directly,
   with the same block sizes (128 KiB, 1 MiB). The backing file is in the page cache
   (read once first), so the direct figure is the machine's copy speed, the hardest
   ceiling there is. The mount is read twice: first with its own page cache dropped
   (every byte crosses FUSE), then again (a version never changes, so the kernel
   keeps what it cached).
2. **Import**: the same data written into a new volume of a halted VM through the
   mount (``cp``-sized 1 MiB writes) against writing a new file on the same XFS.
3. **Change map**: a volume of ``--map-gib`` GiB full of random data, committed,
   1% of it rewritten in 64 KiB pieces at random places, committed again;
   ``cat vms/src-v2/volumes/data.changes/src-v1`` against reading both versions in
   full and comparing them (through the mount, and directly on the backing files).
4. **Scale**: ``mkdir vms/src/clones/cN`` latency and ``ls -l vms`` with 10, 1,000
   and ``--vms`` VMs in the tree.

Everything it made is torn down at the end, also on a failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.clone import Series, machine, say
from tests.helpers.images import mounted_image
from tests.helpers.tree import Tree
from vmtreefs.fs import inodes
from vmtreefs.rules import blockmap

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
PIECE = 64 * KiB
RUNS = 3


def backing_file(tree: Tree, path: Path) -> Path:
    node = inodes.decode(os.stat(path).st_ino)
    if not isinstance(node, inodes.VolumeNode):
        raise RuntimeError(f"{path} is not a volume file")
    found = tree.source / "pool" / f"vol-{node.volume_id}.img"
    if found.stat().st_size != path.stat().st_size:
        raise RuntimeError(f"{found} does not back {path}")
    return found


def fill(path: Path, size: int, seed: int) -> tuple[float, float]:
    """Write ``size`` bytes of random data in 1 MiB writes, as ``cp`` does, then fsync:
    the seconds of the writes and of the fsync (which waits for the disk)."""
    rng = random.Random(seed)
    block = rng.randbytes(MiB)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for offset in range(0, size, MiB):
            # A different block each time, cheaply: rotate the random one.
            cut = rng.randrange(MiB)
            os.pwrite(fd, block[cut:] + block[:cut], offset)
        t1 = time.perf_counter()
        os.fsync(fd)
        return t1 - t0, time.perf_counter() - t1
    finally:
        os.close(fd)


def read_all(path: Path, block: int, drop_cache: bool = False) -> tuple[float, int]:
    """Seconds to read ``path`` to its end with ``block``-sized reads, and the bytes read."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if drop_cache:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        total = 0
        t0 = time.perf_counter()
        while chunk := os.read(fd, block):
            total += len(chunk)
        return time.perf_counter() - t0, total
    finally:
        os.close(fd)


def compare_all(a: Path, b: Path, block: int = 4 * MiB) -> tuple[float, int]:
    """Read both files in full and list the differing blocks: the way without a map."""
    differing = 0
    t0 = time.perf_counter()
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        while True:
            x, y = fa.read(block), fb.read(block)
            if not x and not y:
                break
            if x != y:
                differing += 1
    return time.perf_counter() - t0, differing


def rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e6:,.0f} MB/s"


def versioned_vm(vms: Path, name: str, size: int, seed: int) -> float:
    """A VM whose new volume data.img holds ``size`` bytes of random data, made versioned
    (``NAME-v1`` is that data, ``NAME-next`` the head); seconds the data took."""
    os.mkdir(vms / name)
    data = vms / name / "volumes" / "data.img"
    data.write_bytes(b"")
    os.truncate(data, size)
    took = sum(fill(data, size, seed))
    os.setxattr(vms / name, "user.vmtree.preserve_history", b"1")
    os.setxattr(vms / name, "user.vmtree.versioned", b"1")
    return took


def export_import(tree: Tree, gib: int) -> None:
    vms = tree.vms
    size = gib * GiB
    took = versioned_vm(vms, "src", size, 1)
    say(f"- src: {gib} GiB of random data written through the mount in {took:.1f} s")
    export = vms / "src-v1" / "volumes" / "data.img"
    direct = backing_file(tree, export)
    read_all(direct, MiB)  # into the page cache: the direct figure is a memory copy
    say()
    say(f"### Export: read a version's volume to the end (median of {RUNS})")
    say()
    say("| block | direct (cached file) | mount, first read | ratio | mount, again | ratio |")
    say("|---|---|---|---|---|---|")
    for block in (128 * KiB, MiB):
        # Median of RUNS of each, interleaved: single runs here vary by up to 3x.
        runs: dict[str, list[float]] = {"direct": [], "first": [], "again": []}
        for _ in range(RUNS):
            for way, path, drop in (
                ("direct", direct, False),
                ("first", export, True),
                ("again", export, False),
            ):
                took, got = read_all(path, block, drop_cache=drop)
                if got != size:
                    raise RuntimeError(f"read {got} bytes of {path}, not {size}")
                runs[way].append(took)
        d_s, c_s, w_s = (statistics.median(runs[w]) for w in ("direct", "first", "again"))
        say(
            f"| {block // KiB} KiB | {rate(size, d_s)} | {rate(size, c_s)} | {d_s / c_s:.2f} "
            f"| {rate(size, w_s)} | {d_s / w_s:.2f} |"
        )
    with open(export, "rb") as f:
        head = f.read(MiB)
    with open(direct, "rb") as f:
        if f.read(MiB) != head:
            raise RuntimeError("the export does not read what the engine holds")

    say()
    say("### Import: write the same amount into a new volume of a halted VM")
    say()
    os.mkdir(vms / "dst")
    # `cp image.raw vms/dst/volumes/private.img`: an O_TRUNC open, then writes inside the
    # volume's size (a bigger image than the volume: truncate the volume first, as the
    # docs say, so the copy does not grow it write by write).
    target = vms / "dst" / "volumes" / "private.img"
    if target.stat().st_size < size:
        os.truncate(target, size)
    plain = tree.source / "plain-import.img"
    plain_w, plain_f = fill(plain, size, 2)
    plain.unlink()
    mount_w, mount_f = fill(target, size, 2)
    say("| way | writes (1 MiB, as `cp`) | rate | ratio | then fsync |")
    say("|---|---|---|---|---|")
    say(
        f"| a new file on the same XFS | {plain_w:.2f} s | {rate(size, plain_w)} | 1 "
        f"| {plain_f:.2f} s |"
    )
    say(
        f"| `cp` into `vms/dst/volumes/private.img` | {mount_w:.2f} s | {rate(size, mount_w)} "
        f"| {plain_w / mount_w:.2f} | {mount_f:.2f} s |"
    )


def change_map(tree: Tree, gib: int) -> None:
    vms = tree.vms
    size = gib * GiB
    took = versioned_vm(vms, "big", size, 3)
    rng = random.Random(4)
    pieces = size // 100 // PIECE
    slots = rng.sample(range(size // PIECE), pieces)
    head = vms / "big-next" / "volumes" / "data.img"
    fd = os.open(head, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for slot in slots:
            os.pwrite(fd, rng.randbytes(PIECE), slot * PIECE)
        os.fsync(fd)
    finally:
        os.close(fd)
    (vms / "big-next" / "ctl").write_text("commit\n")
    v1, v2 = (vms / f"big-v{n}" / "volumes" / "data.img" for n in (1, 2))
    changes = vms / "big-v2" / "volumes" / "data.changes" / "big-v1"
    t0 = time.perf_counter()
    ranges = blockmap.parse(changes.read_text())
    map_s = time.perf_counter() - t0
    mapped = sum(length for _, length in ranges)
    direct_s, direct_diff = compare_all(backing_file(tree, v2), backing_file(tree, v1))
    mount_s, mount_diff = compare_all(v2, v1)
    # The map is exact where it matters: every changed piece is in it.
    missing = [s for s in slots if not any(o <= s * PIECE < o + n for o, n in ranges)]
    if missing or direct_diff != mount_diff:
        raise RuntimeError(f"map misses {len(missing)} pieces; compares {direct_diff}/{mount_diff}")
    say()
    say(
        f"### Change map: {gib} GiB volume, {pieces} pieces of 64 KiB rewritten "
        f"({pieces * PIECE / size:.1%}); filled in {took:.0f} s"
    )
    say()
    say("| way | time | ratio to the map |")
    say("|---|---|---|")
    say(
        f"| `cat data.changes/big-v1` ({len(ranges)} ranges, {mapped / MiB:.1f} MiB) "
        f"| {map_s * 1000:.1f} ms | 1 |"
    )
    say(
        f"| read both backing files and compare (direct) | {direct_s:.2f} s "
        f"| {direct_s / map_s:,.0f} |"
    )
    say(
        f"| read both versions through the mount and compare | {mount_s:.2f} s "
        f"| {mount_s / map_s:,.0f} |"
    )
    digest = hashlib.sha256(changes.read_bytes()).hexdigest()[:12]
    say(f"\n(map sha256 {digest}...)")


def listing_s(vms: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["ls", "-l", str(vms)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def scale(tree: Tree, sizes: Sequence[int], clones: int) -> None:
    vms = tree.vms
    os.mkdir(vms / "base")
    made = 1
    rows = []
    for target in sizes:
        while made < target:
            os.mkdir(vms / f"vm{made:05d}")
            made += 1
            if made % 1000 == 0:
                print(f"  VMs: {made}/{target}", file=sys.stderr, flush=True)
        series = Series(f"{target}")
        for i in range(clones):
            t0 = time.perf_counter()
            os.mkdir(vms / "base" / "clones" / f"c{target}-{i}")
            series.add(t0)
        for i in range(clones):
            os.rmdir(vms / f"c{target}-{i}")
        ls = sorted(listing_s(vms) for _ in range(3))[1]
        rows.append((target, series, ls))
    say()
    say(f"### Scale: `mkdir` clone ({clones} each) and `ls -l vms` by VMs in the tree")
    say()
    say("| VMs | clone p50 | clone p95 | `ls -l vms` (median of 3) | per entry |")
    say("|---|---|---|---|---|")
    for target, series, ls in rows:
        say(
            f"| {target:,} | {series.p50:.2f} ms | {series.p95:.2f} ms | {ls:.2f} s "
            f"| {ls / target * 1e6:.0f} µs |"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export-gib", type=int, default=2, help="export/import size (2)")
    parser.add_argument("--map-gib", type=int, default=10, help="change-map volume size (10)")
    parser.add_argument("--vms", type=int, default=10_000, help="largest tree (10000)")
    parser.add_argument("--clones", type=int, default=20, help="clones timed per size (20)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("this benchmark needs root: it loop-mounts an XFS image", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    say("# vmtreefs backup benchmark")
    say()
    for line in machine():
        say(f"- {line}")
    image = f"{2 * args.export_gib + 2 * args.map_gib + 6}G"
    with mounted_image("xfs", image) as workdir:
        tree = Tree(workdir)
        try:
            tree.mount()
            export_import(tree, args.export_gib)
            change_map(tree, args.map_gib)
            tree.unmount()
            (workdir / "scale").mkdir()
            tree = Tree(workdir / "scale")
            tree.mount()
            sizes = sorted({10, min(1000, args.vms), args.vms})
            scale(tree, sizes, args.clones)
        finally:
            tree.unmount()
    say(f"\n(whole run: {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
