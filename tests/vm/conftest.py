"""Fixtures for tests that run VMs: libvirt's daemons, the demo guest, a mounted tree, and
each hypervisor under the contract (``hypervisor``: libvirt and the fake).

The demo guest is built once per session into a directory QEMU can reach when
libvirt runs it as its own user (not pytest's 0700 tmp_path). Every tree's
domains are destroyed when its test ends, however it ends: through libvirt,
by the names this tree gives its domains (``vmtree-TREEID-``), so a test never
touches a domain it did not make; so are a contract test's (its own prefix).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from tests.fakes.hypervisor import FakeHypervisor, FakeLibvirt
from tests.helpers.images import mounted_image
from tests.helpers.libvirt import cleanup_domains, connection, ensure_libvirt, unique_prefix
from tests.helpers.tree import Tree
from vmtreefs.rules import domain
from vmtreefs.rules.domain import Disk, Identity
from vmtreefs.runtime.hypervisor import DEFAULT_URI, DomainEvent, Hypervisor, LibvirtHypervisor

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

    def __init__(self, workdir: Path, guest: Path | None, source: Path | None = None) -> None:
        """``guest``: the demo guest for VMs without a domain.xml (None: every VM has one);
        ``source``: SOURCE elsewhere than ``workdir/source``."""
        super().__init__(workdir, source)
        self.options = ([f"guest={guest}"] if guest is not None else []) + ["accel=tcg"]
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


T = TypeVar("T", bound=VmTree)


@contextmanager
def mounted_vm_tree(make: Callable[[Path], T], size: str) -> Iterator[T]:
    """A tree mounted on a fresh XFS of ``size``; its domains are destroyed and it is
    unmounted when the block ends, however it ends."""
    with mounted_image("xfs", size) as workdir:
        tree = make(workdir)
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


@pytest.fixture
def vmtree(libvirt_running: None, demo_guest: Path) -> Iterator[VmTree]:
    with mounted_vm_tree(lambda workdir: VmTree(workdir, demo_guest), "4G") as tree:
        yield tree


class Heard:
    """The events a connection delivered, with the thread each came on."""

    def __init__(self) -> None:
        self.events: list[tuple[str, DomainEvent]] = []
        self._cond = threading.Condition()

    def __call__(self, event: DomainEvent) -> None:
        with self._cond:
            self.events.append((threading.current_thread().name, event))
            self._cond.notify_all()

    def of(self, name: str, count: int, timeout: float = 60.0) -> list[tuple[str, DomainEvent]]:
        """The first ``count`` events of the domain once they came (then a moment for any
        extra one to show); they are forgotten, so the next call hears what follows."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._mine(name)) < count and time.monotonic() < deadline:
                self._cond.wait(0.1)
        time.sleep(0.3)
        with self._cond:
            mine = self._mine(name)
            self.events = [e for e in self.events if e[1].name != name]
        return mine

    def _mine(self, name: str) -> list[tuple[str, DomainEvent]]:
        return [e for e in self.events if e[1].name == name]


@dataclass
class Domains:
    """One hypervisor under the contract, connected, and what its domains need."""

    hypervisor: Hypervisor
    heard: Heard
    guest: Path
    workdir: Path  # 0755: disks, serial logs, save images
    prefix: str
    connection: Callable[[], Hypervisor]  # a new connection, not yet connected
    unreachable: Callable[[], Hypervisor]  # a connection to a hypervisor that is away
    boot_timeout: float = BOOT_TIMEOUT
    uuids: dict[str, str] = field(default_factory=dict)

    def xml(self, name: str, uid: str | None = None, devices: str = "") -> str:
        """The demo guest with a root and a private disk, as the lifecycle renders it;
        ``devices`` is XML added to the base's ``<devices>``."""
        disks = []
        for volume in ("root", "private"):
            path = self.workdir / f"{name}-{volume}.img"
            if not path.exists():
                with open(path, "wb") as f:
                    f.truncate(16 << 20)
            disks.append(Disk(volume, str(path), block=False))
        identity = Identity(
            name, uid or self.uuids.setdefault(name, str(uuid.uuid4())), str(self.log(name))
        )
        base = domain.demo_domain(str(self.guest), "qemu")
        base = base.replace("<devices>", "<devices>" + devices)
        return domain.render(base, identity, 128, 1, disks)

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def console(self, name: str) -> str:
        try:
            return self.log(name).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_console(self, name: str, text: str) -> None:
        deadline = time.monotonic() + self.boot_timeout
        while text not in self.console(name):
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}: no {text!r} on the console:\n{self.console(name)}")
            time.sleep(0.2)


def _workdir() -> Path:
    where = Path(tempfile.mkdtemp(prefix="vmtree-contract-", dir="/tmp"))
    os.chmod(where, 0o755)
    return where


@pytest.fixture
def libvirt_domains(libvirt_running: None, demo_guest: Path) -> Iterator[Domains]:
    """libvirt itself, with the demo guest under TCG; this test's domains removed after."""
    workdir, prefix, heard = _workdir(), unique_prefix(), Heard()
    hypervisor = LibvirtHypervisor(DEFAULT_URI)
    try:
        hypervisor.connect(heard)
        yield Domains(
            hypervisor,
            heard,
            demo_guest,
            workdir,
            prefix,
            lambda: LibvirtHypervisor(DEFAULT_URI),
            lambda: LibvirtHypervisor(f"{DEFAULT_URI}?socket=/nonexistent/libvirt-sock"),
        )
    finally:
        try:
            with connection() as conn:
                cleanup_domains(conn, prefix)
        finally:
            hypervisor.close()
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def fake_domains(tmp_path: Path) -> Iterator[Domains]:
    """The in-memory libvirt of tests/fakes/hypervisor.py, held to the same contract so that
    the fast tests of the lifecycle (tests/unit/test_runtime.py) may stand on it."""
    guest = tmp_path / "guest"
    guest.mkdir()
    for name in (domain.DEMO_KERNEL, domain.DEMO_INITRD):
        (guest / name).write_bytes(b"")
    libvirt, heard = FakeLibvirt(), Heard()
    hypervisor = FakeHypervisor(libvirt)
    hypervisor.connect(heard)

    away = FakeLibvirt()
    away.go_away()
    try:
        yield Domains(
            hypervisor,
            heard,
            guest,
            tmp_path,
            unique_prefix(),
            lambda: FakeHypervisor(libvirt),
            lambda: FakeHypervisor(away),
        )
    finally:
        hypervisor.close()
        libvirt.stop()


@pytest.fixture(params=["libvirt", "fake"])
def hypervisor(request: pytest.FixtureRequest) -> Domains:
    """Every hypervisor under the contract tests (tests/vm/test_hypervisor_contract.py)."""
    found: Domains = request.getfixturevalue(f"{request.param}_domains")
    return found
