"""Benchmark: importing a disk image through the mount with ``cp``, against ``cp`` on XFS.

Not a test (pytest does not collect it). Run it as root from the checkout:

    .venv/bin/python -m tests.bench.import_image     # --help: --image-gib, --data-mib, --runs

On one sparse, loop-mounted XFS with reflink it:

1. makes a sparse image of ``--image-gib`` GiB (2) holding ``--data-mib`` MiB (700) of
   random data in pieces of 64 KiB to 4 MiB at scattered offsets, the rest holes (a
   guest's disk looks much like this), on the XFS itself, beside the mount, and reads it
   once so every run finds it in the page cache;
2. copies it ``--runs`` times each way, interleaved, with ``cp --sparse=always
   --reflink=never`` (on XFS, cp would otherwise clone the file, which FUSE cannot):

   - **vmtreefs, new volume**: into ``vms/imp/volumes/diskN.img``, which the copy makes
     and grows write by write (128 KiB FUSE writes);
   - **vmtreefs, over root.img**: over the VM's 10 GiB ``root.img``, which is bigger
     (discarded at the open, no growth): the same writes without any growth;
   - **XFS directly**: into a new file in a directory of the same XFS;

   each also followed by ``sync FILE`` (an fsync), timed as a second figure: a copy
   is durable only then, on either side;
3. counts the store's intents begun during each copy through the mount (the
   ``intents`` sequence of ``SOURCE/vmtree.db``, read as an administrator can), each a
   synchronous commit to begin and another to complete, and checks every copy's
   sha256 against the image.

Everything it made is torn down at the end, also on a failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.clone import Series, machine, say
from tests.helpers.images import mounted_image
from tests.helpers.tree import Tree
from vmtreefs.rules.names import GiB, KiB, MiB


def make_image(path: Path, size: int, data: int, seed: int) -> None:
    """A sparse image: ``data`` bytes of random pieces (64 KiB to 4 MiB, each at the start
    of its own 4 MiB slot, slots drawn at random), holes between."""
    rng = random.Random(seed)
    slots = rng.sample(range(size // (4 * MiB)), k=size // (4 * MiB))
    placed = 0
    with path.open("wb") as f:
        f.truncate(size)
        for slot in slots:
            if placed >= data:
                break
            length = min(rng.choice((64 * KiB, 256 * KiB, MiB, 4 * MiB)), data - placed)
            f.seek(slot * 4 * MiB)
            f.write(rng.randbytes(length))
            placed += length
        f.flush()
        os.fsync(f.fileno())


def sha256(path: Path, limit: int) -> str:
    """Of the first ``limit`` bytes (a copy over a bigger volume keeps its size)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while limit > 0 and (chunk := f.read(min(4 * MiB, limit))):
            digest.update(chunk)
            limit -= len(chunk)
    return digest.hexdigest()


def copy(image: Path, target: Path, plain: Series, synced: Series) -> None:
    """``cp``, then ``sync FILE``: both timed from the start of cp."""
    started = time.perf_counter()
    argv = ["cp", "--sparse=always", "--reflink=never", str(image), str(target)]
    subprocess.run(argv, check=True)
    plain.add(started)
    subprocess.run(["sync", str(target)], check=True)
    synced.add(started)


def checked_copy(
    tree: Tree, image: Path, target: Path, pair: tuple[Series, Series], expected: str
) -> int:
    """:func:`copy`, checked against the image's sha256; the store's intents it began."""
    before = tree.intents_begun()
    copy(image, target, *pair)
    begun = tree.intents_begun() - before
    size = os.stat(image).st_size
    got = sha256(target, size)
    if got != expected or os.stat(target).st_size < size:
        raise SystemExit(f"{target}: the copy differs ({got}, {expected})")
    return begun


def report(
    series: dict[str, tuple[Series, Series]], begun: dict[str, list[int]], held: int
) -> None:
    """The Markdown table: median seconds, MiB/s of data, intents per copy."""
    say()
    say("| copy of the image | runs | median s | MiB/s (of data) | store intents per copy |")
    say("|---|---:|---:|---:|---:|")
    for name, pair in series.items():
        for s in pair:
            median = s.p50 / 1000
            say(
                f"| {s.label} | {len(s.seconds)} | {median:.2f} | {held / MiB / median:.1f} "
                f"| {', '.join(map(str, begun[name]))} |"
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-gib", type=int, default=2, help="image size (2)")
    parser.add_argument("--data-mib", type=int, default=700, help="data in it (700)")
    parser.add_argument("--runs", type=int, default=3, help="copies each way (3)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("this benchmark needs root: it loop-mounts an XFS image", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    say("# vmtreefs import benchmark")
    say()
    for line in machine():
        say(f"- {line}")
    size = args.image_gib * GiB
    with mounted_image("xfs", f"{4 * args.image_gib + 12}G") as workdir:
        image = workdir / "guest.img"
        make_image(image, size, args.data_mib * MiB, seed=20261204)
        expected = sha256(image, size)  # also puts the image in the page cache
        held = os.stat(image).st_blocks * 512
        say(f"- image: {size // GiB} GiB, {held / MiB:.0f} MiB of data (du), sparse")
        plain_dir = workdir / "plain"
        plain_dir.mkdir()
        tree = Tree(workdir)
        try:
            vms = tree.mount()
            (vms / "imp").mkdir()
            volumes = vms / "imp" / "volumes"
            series = {
                name: (Series(f"{name}: cp"), Series(f"{name}: cp + sync FILE"))
                for name in ("vmtreefs, new volume", "vmtreefs, over root.img", "XFS directly")
            }
            begun: dict[str, list[int]] = {name: [] for name in series}

            def new_volume(n: int) -> Path:
                return volumes / f"disk{n}.img"

            targets: dict[str, Callable[[int], Path]] = {
                "vmtreefs, new volume": new_volume,
                "vmtreefs, over root.img": lambda n: volumes / "root.img",
                "XFS directly": lambda n: plain_dir / f"disk{n}.img",
            }
            names = list(series)
            for n in range(args.runs):
                for name in names[n % 3 :] + names[: n % 3]:
                    target = targets[name](n)
                    begun[name].append(checked_copy(tree, image, target, series[name], expected))
                    if name != "vmtreefs, over root.img":
                        target.unlink()
                    print(f"  run {n + 1}: {name} done", file=sys.stderr, flush=True)
        finally:
            tree.unmount()
    begun["XFS directly"] = []  # no store there
    report(series, begun, held)
    return 0


if __name__ == "__main__":
    sys.exit(main())
