"""Fixtures for tests that run VMs: libvirt's daemons, the demo guest, a mounted tree.

The demo guest is built once per session into a directory QEMU can reach when
libvirt runs it as its own user (not pytest's 0700 tmp_path). Every tree's
domains are destroyed when its test ends, however it ends: through libvirt,
by the names this tree gives its domains (``vmtree-TREEID-``), so a test never
touches a domain it did not make.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.images import mounted_image
from tests.helpers.libvirt import cleanup_domains, connection, ensure_libvirt
from tests.helpers.tree import Tree

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "scripts" / "build-demo-guest.sh"
BOOT_TIMEOUT = 120.0  # TCG: the demo guest is READY in about 10 s when the machine is idle


@pytest.fixture(scope="session")
def demo_guest() -> Iterator[Path]:
    """The demo guest's vmlinuz and initrd.img, built into a fresh directory QEMU can reach."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: run `make deps-guest`", pytrace=False)
    out = Path(tempfile.mkdtemp(prefix="vmtree-guest-", dir="/tmp"))
    os.chmod(out, 0o755)
    try:
        built = subprocess.run(["bash", str(BUILD), str(out)], capture_output=True, text=True)
        if built.returncode != 0:
            pytest.fail(f"building the demo guest failed: {built.stderr}", pytrace=False)
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="session")
def libvirt_running() -> None:
    ensure_libvirt()


class VmTree(Tree):
    """A mounted tree that runs VMs under libvirt, and a few shell-like helpers."""

    def __init__(self, workdir: Path, guest: Path) -> None:
        super().__init__(workdir)
        self.options = [f"guest={guest}", "accel=tcg"]
        self.tree_ids: set[str] = set()

    def mount(self, options: list[str] | None = None) -> Path:
        vms = super().mount(self.options + (options or []))
        self.tree_ids.add(self.status()["tree_id"])
        return vms

    def remount(self) -> Path:
        self.unmount()
        return self.mount()

    def ctl(self, vm: str, command: str) -> str:
        """`exec 3<>ctl; echo CMD >&3; read -u 3`: the command and its result line."""
        fd = os.open(self.vms / vm / "ctl", os.O_RDWR)
        try:
            os.write(fd, command.encode() + b"\n")
            return os.read(fd, 4096).decode().strip()
        finally:
            os.close(fd)

    def state(self, vm: str) -> str:
        return (self.vms / vm / "state").read_text().strip()

    def console(self, vm: str) -> str:
        return (
            (self.vms / vm / "console").read_bytes().decode(errors="replace").replace("\r\n", "\n")
        )

    def wait_console(self, vm: str, pattern: str, timeout: float = BOOT_TIMEOUT) -> re.Match[str]:
        """Wait for a line on the VM's serial console, as `tail -f console | grep` would."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.console(vm))
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{vm}: no {pattern!r} on the console after {timeout:.0f} s; it shows:\n"
                    + self.console(vm)[-2000:]
                )
            time.sleep(0.2)

    def wait_state(self, vm: str, wanted: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.state(vm) != wanted:
            if time.monotonic() > deadline:
                raise AssertionError(f"{vm} is {self.state(vm)}, not {wanted}, after {timeout} s")
            time.sleep(0.1)

    def ticks(self, vm: str) -> list[int]:
        return [int(n) for n in re.findall(r"VMTREE-TICK (\d+)", self.console(vm))]


@pytest.fixture
def vmtree(libvirt_running: None, demo_guest: Path) -> Iterator[VmTree]:
    with mounted_image("xfs", "4G") as workdir:
        tree = VmTree(workdir, demo_guest)
        try:
            tree.mount()
            yield tree
        finally:
            try:
                with connection() as conn:
                    for tree_id in tree.tree_ids:
                        cleanup_domains(conn, f"vmtree-{tree_id}-")
            finally:
                tree.unmount()
