"""Benchmark: importing a disk image with ``cp`` into a dm-thin tree, new volume vs existing.

Not a test (pytest does not collect it). Run it as root from the checkout:

    .venv/bin/python -m tests.bench.dmthin_import     # --help: --image-gib, --data-mib, --runs

Where the host kernel has no dm-thin it boots the test guest (Debian's kernel under
QEMU, TCG when KVM is unusable) and runs itself there; TCG inflates every absolute
time, so read the ratios. In the guest's memory-backed /tmp it mounts a tree on the
dm-thin engine (a pool on sparse loop files), makes the same sparse image as
``tests/bench/import_image.py`` (``make_image``: ``--image-gib`` GiB holding
``--data-mib`` MiB of random pieces), and copies it ``--runs`` times each way,
interleaved, with ``cp --sparse=always``, each also timed to the end of a ``sync FILE``:

- **new volume**: into ``vms/imp/volumes/diskN.img``, which the copy makes and grows
  write by write (removed after its check, to give the pool its blocks back);
- **over root.img**: over the VM's 10 GiB ``root.img`` (discarded at the open, no
  growth): the same writes without any growth.

It counts the store's intents each copy began and checks every copy's size and
sha256. Everything is torn down at the end, also on a failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.clone import Series, machine, say
from tests.bench.import_image import checked_copy, make_image, report, sha256
from tests.helpers.guest import in_guest, run_module_in_guest
from tests.helpers.tree import Tree
from vmtreefs.engine.select import dmthin_available
from vmtreefs.rules.names import GiB, MiB

NEW = "new volume (grows)"
OVER = "over root.img (no growth)"


def bench(args: argparse.Namespace) -> None:
    say("# vmtreefs import benchmark on dm-thin")
    say()
    for line in machine():
        say(f"- {line}")
    say(f"- kernel: {os.uname().release}; {'guest (TCG or KVM)' if in_guest() else 'native'}")
    size = args.image_gib * GiB
    workdir = Path(tempfile.mkdtemp(prefix="vmtree-import-"))
    image = workdir / "guest.img"
    make_image(image, size, args.data_mib * MiB, seed=20261204)
    expected = sha256(image, size)
    held = os.stat(image).st_blocks * 512
    say(f"- image: {size // GiB} GiB, {held / MiB:.0f} MiB of data (du), sparse")
    tree = Tree(workdir)
    series = {name: (Series(f"{name}: cp"), Series(f"{name}: cp + sync")) for name in (NEW, OVER)}
    begun: dict[str, list[int]] = {name: [] for name in series}
    try:
        vms = tree.mount(["engine=dm-thin", f"size={args.pool_gib}G"])
        say(f"- engine: {tree.status().get('engine_detail', '?')}")
        (vms / "imp").mkdir()
        volumes = vms / "imp" / "volumes"
        for n in range(args.runs):
            for name in (NEW, OVER) if n % 2 == 0 else (OVER, NEW):
                target = volumes / (f"disk{n}.img" if name == NEW else "root.img")
                begun[name].append(checked_copy(tree, image, target, series[name], expected))
                if name == NEW:
                    if os.stat(target).st_size != size:
                        raise SystemExit(f"{target}: size {os.stat(target).st_size}, not {size}")
                    target.unlink()
                print(f"  run {n + 1}: {name} done", file=sys.stderr, flush=True)
    finally:
        tree.unmount()
        for path in sorted(workdir.rglob("*"), reverse=True):
            if path.is_file():
                path.unlink()
    report(series, begun, held)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-gib", type=int, default=2, help="image size (2)")
    parser.add_argument("--data-mib", type=int, default=700, help="data in it (700)")
    parser.add_argument("--runs", type=int, default=3, help="copies each way (3)")
    parser.add_argument("--pool-gib", type=int, default=4, help="the pool's data (4)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("this benchmark needs root: it makes a dm-thin pool", file=sys.stderr)
        return 2
    if not dmthin_available()[0] and not in_guest():
        # The guest's /tmp lives in its memory: the image and the pool's data sit there.
        return run_module_in_guest("tests.bench.dmthin_import", argv, memory="6G", timeout=7200)
    bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
