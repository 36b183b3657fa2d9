"""The real Debian guest under libvirt, through a real mount: the tree, the image, timings.

One tree serves the whole suite (``make test-debian``): the image is imported
into it once, as a user would (``cp --sparse=always`` into
``vms/debian/volumes/root.img``, ``cp domain.xml``), and every test makes the
VMs it needs from it with a ``template`` link, so a test boots only what it
checks. Every domain of the tree is destroyed when the session ends, however
it ends, and the tree is unmounted.

Boots under TCG take about a minute; each one's time is noted in
``tests.debian.timings.TIMINGS`` and printed at the end of the run (they are figures for
docs/benchmarks.md, not assertions).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.debian.timings import TIMINGS
from tests.helpers.agent import GuestResult, guest_exec, wait_for_agent
from tests.helpers.libvirt import connection, ensure_libvirt
from tests.vm.conftest import VmTree, mounted_vm_tree
from vmtreefs.rules import domain

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-debian-guest.sh"
IMAGE_DIR = REPO / "build" / "debian"
BOOT_TIMEOUT = 420.0  # to login: under TCG, on a machine that runs two guests at once
MEMORY_MIB = "512"
LOGIN = r"login: "


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS.seen:
        terminalreporter.section("Debian guest timings (TCG)")
        for line in TIMINGS.lines():
            terminalreporter.write_line(line)


class DebianTree(VmTree):
    """A mounted tree with the Debian guest imported as ``debian``."""

    def ctl(self, vm: str, command: str) -> str:
        """As VmTree's, and a refusal fails with the reason the daemon logged."""
        try:
            return super().ctl(vm, command)
        except OSError as e:
            raise AssertionError(
                f"{command!r} > {vm}/ctl: {e}; the daemon logged:\n{self.log()[-3000:]}"
            ) from None

    def domain(self, vm: str) -> str:
        """The libvirt name of a VM's domain (what ``virsh`` calls it)."""
        vm_id = int(os.getxattr(self.vms / vm, "user.vmtree.id"))
        return domain.domain_name(self.status()["tree_id"], vm_id)

    def appvm(self, name: str, template: str = "debian") -> Path:
        """A VM whose root comes from ``template`` at each start, as a Qubes AppVM's does.

        It gets the guest's domain.xml written, as a user does (``mkdir`` alone
        gives the demo guest's; a linked clone would take its source's).
        """
        path = self.vms / name
        path.mkdir()
        os.setxattr(path, "user.vmtree.memory", MEMORY_MIB.encode())
        os.symlink(f"../{template}", path / "template")
        shutil.copyfile(IMAGE_DIR / "domain.xml", path / "domain.xml")
        return path

    def boot(self, vm: str, what: str = "start to login") -> float:
        """``start``, then until ``login:`` on the console and the guest agent answers."""
        started = time.monotonic()
        assert self.ctl(vm, "start") == vm
        self.wait_console(vm, LOGIN, timeout=BOOT_TIMEOUT)
        took = time.monotonic() - started
        TIMINGS.add(what, took)
        self.wait_agent(vm)
        return took

    def wait_agent(self, vm: str) -> None:
        with connection() as conn:
            wait_for_agent(conn.lookupByName(self.domain(vm)), timeout=BOOT_TIMEOUT)

    def shutdown(self, vm: str) -> float:
        """``shutdown``: the ACPI power button; systemd powers off and the VM is halted."""
        started = time.monotonic()
        result = self.ctl(vm, "shutdown")
        took = time.monotonic() - started
        assert result.endswith("halted"), f"shutdown of {vm}: {result}\n{self.log()[-2000:]}"
        TIMINGS.add("shutdown to halted", took)
        return took

    def sh(self, vm: str, script: str, check: bool = True) -> str:
        """``sh -c SCRIPT`` in the guest, through its agent: what it printed.

        ``check``: a non-zero exit fails the test (else see :meth:`exitcode`)."""
        return self.run(vm, ["/bin/sh", "-c", script], check)

    def run(self, vm: str, argv: list[str], check: bool = True) -> str:
        result = self.run_in(vm, argv)
        if check and result.exitcode != 0:
            raise AssertionError(f"{vm}: {argv} exited {result.exitcode}: {result.stderr!r}")
        return result.stdout.decode(errors="replace")

    def exitcode(self, vm: str, script: str) -> int | None:
        return self.run_in(vm, ["/bin/sh", "-c", script]).exitcode

    def run_in(self, vm: str, argv: list[str]) -> GuestResult:
        with connection() as conn:
            return guest_exec(conn.lookupByName(self.domain(vm)), argv[0], argv[1:])


@pytest.fixture(scope="session")
def debian_image() -> Path:
    """build/debian/root.img and domain.xml: built once, then cached by the script."""
    started = time.monotonic()
    built = subprocess.run(
        ["bash", str(BUILD_SCRIPT), str(IMAGE_DIR)], capture_output=True, text=True
    )
    if built.returncode != 0:
        pytest.fail(f"make debian-guest failed:\n{built.stdout}{built.stderr}", pytrace=False)
    TIMINGS.add("make debian-guest", time.monotonic() - started)
    return IMAGE_DIR


@contextmanager
def debian_tree(image: Path, size: str = "48G") -> Iterator[DebianTree]:
    """A mounted tree with ``vms/debian`` imported from the image through the mount."""
    ensure_libvirt()
    with mounted_vm_tree(lambda workdir: DebianTree(workdir, None), size) as mounted:
        import_debian(mounted, image)
        yield mounted


@pytest.fixture(scope="session")
def tree(debian_image: Path) -> Iterator[DebianTree]:
    with debian_tree(debian_image) as mounted:
        yield mounted


def import_debian(tree: DebianTree, image: Path) -> None:
    """What docs/guests.md tells a user to do, through the mount."""
    vm = tree.vms / "debian"
    vm.mkdir()
    os.setxattr(vm, "user.vmtree.memory", MEMORY_MIB.encode())
    # The image's own size (2 GiB), not the default root's 10 GiB: a backup reads less.
    (vm / "volumes" / "root.img").unlink()
    started = time.monotonic()
    subprocess.run(
        ["cp", "--sparse=always", str(image / "root.img"), str(vm / "volumes" / "root.img")],
        check=True,
    )
    TIMINGS.add("cp --sparse=always root.img (2 GiB, 715 MiB data)", time.monotonic() - started)
    shutil.copyfile(image / "domain.xml", vm / "domain.xml")
