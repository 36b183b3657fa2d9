"""Measurement: do disposables restored from one savestate share their random numbers?

Not a test (pytest does not collect it): what happens *without* a fresh VM
generation ID is a weakness to show, not a behaviour to expect. Run it as root
from the checkout, after ``make debian-guest``:

    .venv/bin/python -m tests.bench.genid            # --help: --disposables

In one tree on a loop-mounted XFS, with the Debian guest (build/debian) imported
as docs/guests.md says, it makes two disposable factories from it:

- **with genid**: the guest's own ``domain.xml``; vmtreefs writes ``<genid/>``
  and libvirt gives every restored domain a new generation ID;
- **without genid**: the same ``domain.xml`` without ``<acpi/>``, so vmtreefs
  writes no ``<genid/>`` (the vmgenid device needs ACPI) and the guest cannot
  hear that it was restored;

each with ``ready=agent`` and a hot savestate; then it restores
``--disposables`` (3) disposables from each, one after the other, and as soon
as each one's guest agent answers reads 32 bytes of its ``/dev/urandom``
through the agent. It prints, for each factory, how many of the reads were
distinct and the first bytes of each.

Everything it made is torn down at the end, also on a failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.clone import machine
from tests.debian.conftest import IMAGE_DIR, DebianTree, debian_tree

HOT_TIMEOUT = 900.0


def factory(tree: DebianTree, name: str, acpi: bool) -> None:
    """An AppVM of debian with a hot savestate made once its agent answers."""
    vm = tree.appvm(name)
    if not acpi:
        xml = (IMAGE_DIR / "domain.xml").read_text().replace("<acpi/>", "")
        (vm / "domain.xml").write_text(xml)
    os.setxattr(vm, "user.vmtree.ready", b"agent")
    os.setxattr(vm, "user.vmtree.hot_savestate", b"1")
    deadline = time.monotonic() + HOT_TIMEOUT
    while not (vm / "savestates" / "hot" / "info").exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"no hot savestate of {name} in {HOT_TIMEOUT:.0f} s:\n{tree.log()}")
        time.sleep(1)


def urandom_of_disposables(tree: DebianTree, source: str, count: int) -> list[str]:
    seen = []
    for _ in range(count):
        name = tree.ctl(source, "disposable")
        tree.wait_agent(name)
        seen.append(tree.sh(name, "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'"))
        tree.ctl(name, "kill")
    return seen


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--disposables", type=int, default=3, help="from each factory (3)")
    args = parser.parse_args(argv)
    if not (IMAGE_DIR / "root.img").exists():
        raise SystemExit(f"{IMAGE_DIR}/root.img is missing: run `make debian-guest` first")
    results: dict[str, list[str]] = {}
    with debian_tree(IMAGE_DIR, "24G") as tree:
        for label, name, acpi in (("with genid", "fresh", True), ("without genid", "same", False)):
            print(f"{label}: hot savestate of {name}, then disposables", file=sys.stderr)
            factory(tree, name, acpi)
            results[label] = urandom_of_disposables(tree, name, args.disposables)
    print("# Disposables from one hot savestate: /dev/urandom\n")
    print("\n".join(machine()) + "\n")
    print("| factory | distinct reads | first 8 bytes of each read (hex) |")
    print("|---|---|---|")
    for label, seen in results.items():
        firsts = ", ".join(s[:16] for s in seen)
        print(f"| {label} | {len(set(seen))} of {len(seen)} | {firsts} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
