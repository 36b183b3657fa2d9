"""Benchmark: linked clones on dm-thin, through vmtreefs and by the bare tools.

Not a test (pytest does not collect it). Run it as root from the checkout:

    make bench-dmthin        # or: .venv/bin/python -m tests.bench.dmthin_clone

Where the host kernel has no dm-thin it boots the test guest (Debian's kernel
under QEMU, TCG when KVM is unusable) and runs itself there; TCG inflates every
absolute time, so read the ratios. On three pools of the same size on sparse
loop files it times, interleaved (the order rotates every iteration):

- **vmtreefs**: ``mkdir vms/src/clones/cN`` through the mount, as a user does (a
  VM of three volumes: three thin snapshots, each bracketed in the store);
- **dmsetup**: ``dmsetup message POOL 0 "create_snap NEW ORIGIN"`` for three
  origins, what a shell script driving a raw pool does;
- **ioctl**: the same three messages as direct ioctls on /dev/mapper/control
  from this process: what the kernel itself takes, the floor;
- **lvcreate**: ``lvcreate --snapshot`` of three thin LVs in an LVM thin pool,
  what Qubes' LVM storage does (fewer of them: LVM is slow to start).

Everything it made (mount, pools, volume group, loops, files) is torn down at the
end, also on a failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.clone import Series, say, table
from tests.helpers.guest import in_guest, run_module_in_guest
from tests.helpers.tree import Tree
from vmtreefs.engine.dmioctl import DmControl
from vmtreefs.engine.dmthin import BLOCK_SECTORS, DmThinEngine
from vmtreefs.engine.select import dmthin_available

MiB = 1 << 20
POOL_SIZE = 1024 * MiB
VOLUMES = 3  # a VM's root, private and volatile
LVM_CONFIG = (
    'devices { filter=["a|^/dev/loop|", "r|.*|"] use_devicesfile=0 '
    "obtain_device_list_from_udev=0 } "
    "activation { udev_sync=0 udev_rules=0 monitoring=0 }"
)


def sh(*argv: str) -> str:
    env = dict(os.environ, DM_DISABLE_UDEV="1")
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def lvm(*argv: str) -> str:
    return sh(argv[0], "--config", LVM_CONFIG, *argv[1:])


def sparse_loop(path: Path, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return sh("losetup", "-f", "--show", str(path)).strip()


class RawPool:
    """A dm-thin pool made with dmsetup alone, with three origin thin devices."""

    def __init__(self, workdir: Path) -> None:
        self.name = f"vmbench-{os.getpid()}-pool"
        self.loops: list[str] = []
        self.data = sparse_loop(workdir / "raw-data", POOL_SIZE)
        self.loops.append(self.data)
        self.meta = sparse_loop(workdir / "raw-meta", DmThinEngine.metadata_size(POOL_SIZE))
        self.loops.append(self.meta)
        sh("dd", "if=/dev/zero", f"of={self.meta}", "bs=4096", "count=1", "oflag=direct")
        sectors = POOL_SIZE // 512
        table = (
            f"0 {sectors} thin-pool {self.meta} {self.data} {BLOCK_SECTORS} 1 1 error_if_no_space"
        )
        sh("dmsetup", "create", self.name, "--table", table)
        for origin in range(1, VOLUMES + 1):
            sh("dmsetup", "message", self.name, "0", f"create_thin {origin}")
        self.next_id = 100

    def new_ids(self) -> list[int]:
        ids = list(range(self.next_id, self.next_id + VOLUMES))
        self.next_id += VOLUMES
        return ids

    def close(self) -> None:
        subprocess.run(["dmsetup", "remove", "--retry", self.name], capture_output=True)
        for loop in self.loops:
            subprocess.run(["losetup", "-d", loop], capture_output=True)


class LvmPool:
    """An LVM thin pool on a loop device, with three thin LVs as origins."""

    def __init__(self, workdir: Path) -> None:
        self.vg = f"vmbench{os.getpid()}"
        self.loop = sparse_loop(workdir / "lvm-pv", POOL_SIZE + 64 * MiB)
        lvm("pvcreate", "-q", self.loop)
        lvm("vgcreate", "-q", self.vg, self.loop)
        lvm("lvcreate", "-q", "-T", "-L", f"{POOL_SIZE // MiB - 64}M", f"{self.vg}/pool")
        for origin in range(1, VOLUMES + 1):
            lvm("lvcreate", "-q", "-V", "10G", "-T", f"{self.vg}/pool", "-n", f"origin{origin}")
        self.made = 0

    def snapshot_all(self) -> None:
        self.made += 1
        for origin in range(1, VOLUMES + 1):
            lvm("lvcreate", "-q", "-s", "-n", f"c{self.made}o{origin}", f"{self.vg}/origin{origin}")

    def close(self) -> None:
        subprocess.run(
            ["vgremove", "--config", LVM_CONFIG, "-f", "-q", self.vg],
            capture_output=True,
            env=dict(os.environ, DM_DISABLE_UDEV="1"),
        )
        subprocess.run(["pvremove", "--config", LVM_CONFIG, "-q", self.loop], capture_output=True)
        subprocess.run(["losetup", "-d", self.loop], capture_output=True)


def bench(args: argparse.Namespace) -> None:
    started = time.monotonic()
    say("# dm-thin clone benchmark")
    say()
    say(f"- kernel: {os.uname().release}; {'guest (TCG or KVM)' if in_guest() else 'native'}")
    say(f"- cpus: {os.cpu_count()}; pools: {POOL_SIZE // MiB} MiB on sparse loop files in /tmp")
    workdir = Path(tempfile.mkdtemp(prefix="vmbench-dmthin-", dir="/tmp"))
    tree = Tree(workdir)
    raw: RawPool | None = None
    lvm_pool: LvmPool | None = None
    control = DmControl()
    try:
        tree.mount(["engine=dm-thin", f"size={POOL_SIZE}"])
        os.mkdir(tree.vms / "src")
        for name in ("root", "private"):
            with open(tree.vms / "src" / "volumes" / f"{name}.img", "r+b") as f:
                for offset in range(0, 8 * MiB, MiB):
                    f.seek(offset * 7)
                    f.write(os.urandom(MiB))
        raw = RawPool(workdir)
        lvm_pool = LvmPool(workdir) if args.lvm_clones else None

        series = {
            "vmtreefs": Series("`mkdir src/clones/cN` (vmtreefs, 3 volumes)"),
            "dmsetup": Series("3 × `dmsetup message POOL 0 create_snap` (bare CLI)"),
            "ioctl": Series("3 × create_snap as direct ioctls (the kernel's floor)"),
            "lvcreate": Series("3 × `lvcreate --snapshot` (LVM thin, as Qubes)"),
        }

        def vmtreefs_clone(i: int) -> Callable[[], None]:
            return lambda: os.mkdir(tree.vms / "src" / "clones" / f"c{i}")

        def dmsetup_clone() -> None:
            assert raw is not None
            for origin, new in enumerate(raw.new_ids(), start=1):
                sh("dmsetup", "message", raw.name, "0", f"create_snap {new} {origin}")

        def ioctl_clone() -> None:
            assert raw is not None
            for origin, new in enumerate(raw.new_ids(), start=1):
                control.message(raw.name, f"create_snap {new} {origin}", "create_snap")

        def lvm_clone() -> None:
            assert lvm_pool is not None
            lvm_pool.snapshot_all()

        for i in range(args.clones):
            runs: list[tuple[str, Callable[[], None]]] = [
                ("vmtreefs", vmtreefs_clone(i)),
                ("dmsetup", dmsetup_clone),
                ("ioctl", ioctl_clone),
            ]
            if i < args.lvm_clones:
                runs.append(("lvcreate", lvm_clone))
            shift = i % len(runs)
            for key, run in runs[shift:] + runs[:shift]:
                t0 = time.perf_counter()
                run()
                series[key].add(t0)
            if (i + 1) % 25 == 0:
                print(f"  {i + 1}/{args.clones}", file=sys.stderr, flush=True)

        rows = [s for s in series.values() if s.seconds]
        say()
        say(table(rows))
        say()
        base = series["vmtreefs"]
        say("| against vmtreefs | p50 ratio | p95 ratio |")
        say("|---|---:|---:|")
        for s in rows[1:]:
            say(f"| {s.label} | {base.p50 / s.p50:.2f} | {base.p95 / s.p95:.2f} |")
        say()
        say("(a ratio is vmtreefs's time over the other's: below 1, vmtreefs is faster)")
        status = tree.status()
        say(
            f"- vmtreefs pool after the run: {status.get('volumes')} volumes, inventory "
            f"{status.get('inventory')}, metadata {status.get('metadata_used')} of "
            f"{status.get('metadata_size')} bytes"
        )
    finally:
        tree.unmount()
        control.close()
        if lvm_pool is not None:
            lvm_pool.close()
        if raw is not None:
            raw.close()
        shutil.rmtree(workdir, ignore_errors=True)
    say(f"(whole run: {time.monotonic() - started:.0f} s)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.dmthin_clone",
        description="Time linked clones on dm-thin: vmtreefs, bare dmsetup, ioctl, LVM.",
    )
    parser.add_argument("--clones", type=int, default=200, help="clones each way (200)")
    parser.add_argument("--lvm-clones", type=int, default=40, help="LVM clones (40)")
    args = parser.parse_args(argv)
    if args.clones < 2 or not 0 <= args.lvm_clones <= args.clones:
        parser.error("need --clones >= 2 and 0 <= --lvm-clones <= --clones")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("this benchmark needs root: it makes dm-thin pools", file=sys.stderr)
        return 2
    if not dmthin_available()[0] and not in_guest():
        return run_module_in_guest("tests.bench.dmthin_clone", argv, memory="3G", timeout=5400)
    bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
