"""Measurement: what SQLite's checks of the store cost, and so what the mount can afford.

Not a test. Run it as root from the checkout:

    .venv/bin/python -m tests.bench.store_check            # --vms 1000 --repeat 5

It makes a tree of ``--vms`` VMs through a real mount (half of them linked
clones, an alias every ten VMs), unmounts it, and times on the unmounted
``vmtree.db``: ``PRAGMA quick_check`` (what every mount runs), ``PRAGMA
integrity_check`` (what fsck runs), and a whole mount to ``ready`` with its
recovery and inventory. It prints the median of ``--repeat`` runs of each.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import time
from contextlib import closing
from pathlib import Path

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers.images import mounted_image
from tests.helpers.tree import Tree


def make(tree: Tree, count: int) -> None:
    vms = tree.vms
    os.mkdir(vms / "base")
    for n in range(1, count):
        if n % 2:
            os.mkdir(vms / "base" / "clones" / f"c{n}")
        else:
            os.mkdir(vms / f"v{n}")
        if n % 10 == 0:
            os.symlink(f"v{n}", vms / f"a{n}")


def timed(sql: str, db: Path) -> tuple[float, list[str]]:
    conn = sqlite3.connect(db)
    try:
        start = time.perf_counter()
        lines = [str(line) for (line,) in conn.execute(sql)]
        return time.perf_counter() - start, lines
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with mounted_image("xfs", "4G") as workdir:
        tree = Tree(workdir)
        tree.mount(["libvirt=none"])
        try:
            start = time.perf_counter()
            make(tree, args.vms)
            print(f"made {args.vms} VMs through the mount in {time.perf_counter() - start:.1f} s")
            tree.unmount()
            db = tree.source / "vmtree.db"
            with closing(sqlite3.connect(db)) as conn:
                pages = conn.execute("PRAGMA page_count").fetchone()[0]
            print(f"vmtree.db: {db.stat().st_size / 2**20:.2f} MiB, {pages} pages")
            for pragma in ("quick_check", "integrity_check"):
                runs = [timed(f"PRAGMA {pragma}", db) for _ in range(args.repeat)]
                assert all(lines == ["ok"] for _, lines in runs)
                ms = statistics.median(t for t, _ in runs) * 1000
                print(f"PRAGMA {pragma}: median {ms:.1f} ms of {args.repeat}")
            mounts = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                tree.mount(["libvirt=none"])
                mounts.append(time.perf_counter() - start)
                tree.unmount()
            print(f"mount to ready: median {statistics.median(mounts) * 1000:.0f} ms")
        finally:
            tree.unmount()


if __name__ == "__main__":
    main()
