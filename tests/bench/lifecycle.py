"""Benchmark: a disposable restored from a hot savestate against a cold boot; save time by RAM.

Not a test (pytest does not collect it). Run it as root from the checkout:

    .venv/bin/python -m tests.bench.lifecycle          # or: make bench-lifecycle

It builds the demo guest, starts libvirt's daemons if they are not running
(and stops only those it started), mounts vmtreefs on a loop-mounted XFS, and:

1. **time to ready**, ``--runs`` times each, interleaved: a cold ``start`` of the
   demo VM until ``VMTREE-READY`` is on its console, against ``disposable`` of an
   immutable VM with a hot savestate until the restored guest prints its first
   tick (it was ready when it was saved); both timed from the ``ctl`` write;
2. **save time by guest RAM** (128, 256, 512 MiB): ``save LABEL --stop`` through
   the mount (pause, volume snapshots, libvirt's save, the store), against
   libvirt's own ``virDomainSave`` of the same running domain (the raw operation).

Prints Markdown to stdout, progress to stderr. Everything is torn down at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers.images import mounted_image
from tests.helpers.libvirt import cleanup_domains, connection, ensure_libvirt
from tests.vm.conftest import VmTree

REPO = Path(__file__).resolve().parents[2]


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def timed_until(
    vmtree: VmTree, vm: str, command_vm: str, command: str, pattern: str
) -> tuple[str, float]:
    """Write ``command`` to ``command_vm``'s ctl, then wait for ``pattern`` on ``vm``'s console
    (``vm`` may be ``{result}``: the name the command gives back)."""
    started = time.perf_counter()
    result = vmtree.ctl(command_vm, command)
    target = vm.format(result=result)
    while not re.search(pattern, vmtree.console(target)):
        if time.perf_counter() - started > 300:
            raise RuntimeError(f"{target}: no {pattern!r} after 300 s")
        time.sleep(0.02)
    return target, time.perf_counter() - started


def wait_hot(vmtree: VmTree, vm: str) -> None:
    deadline = time.monotonic() + 600
    while not (vmtree.vms / vm / "savestates/hot/info").exists():
        if time.monotonic() > deadline:
            raise RuntimeError("no hot savestate after 600 s")
        time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    ensure_libvirt()
    guest = Path(tempfile.mkdtemp(prefix="vmtree-bench-guest-", dir="/tmp"))
    os.chmod(guest, 0o755)
    try:
        subprocess.run(
            ["bash", str(REPO / "scripts/build-demo-guest.sh"), str(guest)],
            check=True,
            capture_output=True,
        )
        with mounted_image("xfs", "16G") as workdir:
            vmtree = VmTree(workdir, guest)
            vmtree.mount()
            tree_id = vmtree.status()["tree_id"]
            try:
                run(vmtree, args.runs)
            finally:
                with connection() as conn:
                    cleanup_domains(conn, f"vmtree-{tree_id}-")
                vmtree.unmount()
    finally:
        shutil.rmtree(guest, ignore_errors=True)
    return 0


def run(vmtree: VmTree, runs: int) -> None:
    vms = vmtree.vms
    (vms / "cold").mkdir()
    (vms / "factory").mkdir()
    os.setxattr(vms / "factory", "user.vmtree.hot_savestate", b"1")
    os.setxattr(vms / "factory", "user.vmtree.immutable", b"1")
    progress("waiting for the hot savestate of factory")
    wait_hot(vmtree, "factory")
    # A first restore after libvirtd starts probes capabilities: warm up once.
    name = vmtree.ctl("factory", "disposable")
    vmtree.ctl(name, "kill")
    cold: list[float] = []
    warm: list[float] = []
    for i in range(runs):
        _, seconds = timed_until(vmtree, "cold", "cold", "start", r"VMTREE-READY")
        cold.append(seconds)
        vmtree.ctl("cold", "kill")
        name, seconds = timed_until(vmtree, "{result}", "factory", "disposable", r"VMTREE-TICK \d+")
        warm.append(seconds)
        vmtree.ctl(name, "kill")
        progress(f"run {i + 1}: cold boot {cold[-1]:.2f} s, disposable from hot {warm[-1]:.2f} s")

    saves: list[tuple[int, float, float, int]] = []
    with connection() as conn:
        for mib in (128, 256, 512):
            vm = f"ram{mib}"
            (vms / vm).mkdir()
            os.setxattr(vms / vm, "user.vmtree.memory", str(mib).encode())
            vmtree.ctl(vm, "start")
            vmtree.wait_console(vm, r"VMTREE-READY")
            started = time.perf_counter()
            vmtree.ctl(vm, "save s --stop")
            ours = time.perf_counter() - started
            size = (vms / vm / "savestates/s/memory").stat().st_size
            vmtree.ctl(vm, "restore s")
            domain = next(
                d
                for d in conn.listAllDomains(0)
                if d.isActive() and d.name().startswith(f"vmtree-{vmtree.status()['tree_id']}-")
            )
            raw_image = vmtree.workdir / f"raw-{mib}.save"
            started = time.perf_counter()
            domain.save(str(raw_image))
            raw = time.perf_counter() - started
            raw_image.unlink()
            saves.append((mib, ours, raw, size))
            progress(f"save {mib} MiB: vmtreefs {ours:.2f} s, virDomainSave {raw:.2f} s")

    print("## Lifecycle (`make bench-lifecycle`)\n")
    print(
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, kernel {platform.release()}; "
        "guests under TCG (KVM does not run guests here).\n"
    )
    print("| to ready | runs | median | min | max |")
    print("|---|---|---|---|---|")
    for label, values in (
        ("cold boot (`start`, until VMTREE-READY)", cold),
        ("disposable from a hot savestate (until its first tick)", warm),
    ):
        median = statistics.median(values)
        print(
            f"| {label} | {len(values)} | {median:.2f} s "
            f"| {min(values):.2f} s | {max(values):.2f} s |"
        )
    ratio = statistics.median(warm) / statistics.median(cold)
    print(f"\nRatio of medians, disposable / cold boot: **{ratio:.2f}**\n")
    print("| guest RAM | `save --stop` through vmtreefs | virDomainSave alone | ratio | image |")
    print("|---|---|---|---|---|")
    for mib, ours, raw, size in saves:
        image = f"{size / 2**20:.0f} MiB"
        print(f"| {mib} MiB | {ours:.2f} s | {raw:.2f} s | {ours / raw:.2f} | {image} |")


if __name__ == "__main__":
    sys.exit(main())
