"""The demo guest (scripts/build-demo-guest.sh) boots for real and keeps its boot counter.

It is booted here by QEMU directly (TCG where KVM is unusable), the way libvirt will
boot it: direct kernel boot, serial console to a file, the private volume as the
second virtio disk. ``make test`` installs the kernel, busybox-static and QEMU
(``make deps-guest``); without them this fails with that hint, never skips.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "scripts" / "build-demo-guest.sh"
BOOT_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def demo() -> Iterator[Path]:
    """The demo guest's vmlinuz and initrd.img, built into a fresh directory."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: run `make deps-guest`", pytrace=False)
    out = Path(tempfile.mkdtemp(prefix="vmtree-demo-", dir="/tmp"))
    try:
        built = subprocess.run(["bash", str(BUILD), str(out)], capture_output=True, text=True)
        if built.returncode != 0:
            pytest.fail(f"building the demo guest failed: {built.stderr}", pytrace=False)
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


class Boot:
    """One QEMU run of the demo guest, known by its pid, killed when done."""

    def __init__(self, demo: Path, disks: list[Path], serial: Path) -> None:
        self.serial = serial
        serial.unlink(missing_ok=True)
        argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-nodefaults"]
        argv += ["-display", "none", "-no-reboot", "-serial", f"file:{serial}"]
        argv += ["-kernel", str(demo / "vmlinuz"), "-initrd", str(demo / "initrd.img")]
        argv += ["-append", "console=ttyS0 quiet panic=-1"]
        for disk in disks:
            argv += ["-drive", f"file={disk},if=virtio,format=raw"]
        self.process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )

    def console(self) -> str:
        try:
            return self.serial.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str, timeout: float = BOOT_TIMEOUT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.console())
            if found:
                return found
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} on the console:\n{self.console()[-2000:]}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


@pytest.fixture
def disks() -> Iterator[list[Path]]:
    """Sparse root and private volumes, as a VM's first two disks."""
    where = Path(tempfile.mkdtemp(prefix="vmtree-demo-disks-", dir="/tmp"))
    try:
        paths = [where / "root.img", where / "private.img"]
        for path, size in zip(paths, (64 << 20, 16 << 20), strict=True):
            with open(path, "wb") as f:
                f.truncate(size)
        yield paths
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_the_demo_guest_boots_counts_its_boots_and_ticks(demo: Path, disks: list[Path]) -> None:
    for expected_boot in (1, 2):
        boot = Boot(demo, disks, disks[0].parent / "serial.log")
        try:
            boot.wait_for("VMTREE-READY")
            assert f"VMTREE-BOOT {expected_boot}\n" in boot.console()
            boot.wait_for(r"VMTREE-TICK 3\b")
            ticks = [int(n) for n in re.findall(r"VMTREE-TICK (\d+)", boot.console())]
            assert ticks == list(range(1, len(ticks) + 1))
            assert "VMTREE-INSMOD-FAILED" not in boot.console()
        finally:
            boot.kill()
    assert disks[1].read_bytes()[:32].split()[0] == b"2"  # the counter is on the volume
