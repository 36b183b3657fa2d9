"""What a running VM is given: its domain's name and identity, its disks, its console.

A VM's volumes are attached in the engine while it runs (a file or a block
device for QEMU) and released when it stops; between the two the guest writes
them behind the tree's back, so the tree is told both times to drop what it
has cached of them. The serial console goes to a file in the run directory,
fresh at every start. A VM without its own ``domain.xml`` boots the demo guest.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from vmtreefs.errors import VmtreeError
from vmtreefs.rules import domain
from vmtreefs.rules.domain import Disk, Identity
from vmtreefs.rules.objects import Vm
from vmtreefs.runtime.accel import resolve_domain_type

if TYPE_CHECKING:
    from vmtreefs.core.tree import VmTree

log = logging.getLogger("vmtreefs.lifecycle")

MAX_CONSOLE_READ = 1024 * 1024


class Devices:
    """The disks and consoles of the tree's running VMs."""

    def __init__(
        self, tree: VmTree, tree_id: str, run_dir: Path, guest_dir: Path, accel: str
    ) -> None:
        self.tree = tree
        self.tree_id = tree_id
        self.run_dir = run_dir
        self.guest_dir = guest_dir
        self.accel = accel
        self._domain_type: str | None = None
        self.attached: dict[int, list[int]] = {}  # VM id -> the volumes attached for it

    # Names and files

    def domain_name(self, vm: Vm) -> str:
        return domain.domain_name(self.tree_id, vm.id)

    def identity(self, vm: Vm) -> Identity:
        return Identity(
            self.domain_name(vm),
            domain.domain_uuid(self.tree_id, vm.id),
            str(self.console_path(vm)),
        )

    def console_path(self, vm: Vm) -> Path:
        return self.run_dir / f"console-{vm.id}.log"

    def read_console(self, vm: Vm, offset: int, size: int) -> bytes:
        try:
            with open(self.console_path(vm), "rb") as f:
                f.seek(offset)
                return f.read(min(size, MAX_CONSOLE_READ))
        except FileNotFoundError:
            return b""

    def console_size(self, vm: Vm) -> int:
        try:
            return self.console_path(vm).stat().st_size
        except FileNotFoundError:
            return 0

    def fresh_console(self, vm: Vm) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.console_path(vm), "wb"):
            pass

    # The base description

    async def default_domain_xml(self) -> str:
        """The demo guest, under KVM where a probe boot shows it works (once per process)."""
        if self._domain_type is None:
            self._domain_type = await trio.to_thread.run_sync(
                resolve_domain_type, self.accel, self.guest_dir
            )
        return domain.demo_domain(str(self.guest_dir), self._domain_type)

    def default_domain_xml_now(self) -> str:
        """The default as far as the accelerator is known yet (for a file size)."""
        return domain.demo_domain(str(self.guest_dir), self._domain_type or "qemu")

    async def base_domain_xml(self, vm: Vm) -> str:
        return vm.domain_xml if vm.domain_xml is not None else await self.default_domain_xml()

    def check_demo_guest(self) -> None:
        for name in (domain.DEMO_KERNEL, domain.DEMO_INITRD):
            if not (self.guest_dir / name).is_file():
                raise VmtreeError(
                    errno.ENOENT,
                    f"the default domain.xml boots the demo guest, but {self.guest_dir / name} "
                    "is missing: build it (scripts/build-demo-guest.sh DIR) and mount with "
                    "-o guest=DIR, or write the VM's own domain.xml",
                )

    # Volumes

    async def attach(self, vm: Vm) -> list[Disk]:
        """Every volume with a size, as the guest's disks in their fixed order."""
        engine = self.tree.engine
        names = domain.disk_targets([n for n, v in vm.volumes.items() if v.size > 0])
        disks: list[Disk] = []
        attached: list[int] = []
        try:
            for name in names:
                volume = vm.volumes[name]
                where = await trio.to_thread.run_sync(engine.attach, volume.id)
                attached.append(volume.id)
                disks.append(Disk(name, where.path, where.block, readonly=vm.immutable))
        except BaseException:
            with trio.CancelScope(shield=True):
                for vol_id in attached:
                    await trio.to_thread.run_sync(engine.detach, vol_id)
            raise
        self.attached[vm.id] = attached
        self.tree.on_volumes_written_outside(attached)
        return disks

    async def release(self, vm: Vm) -> None:
        attached = self.attached.pop(vm.id, [])
        self.tree.on_volumes_written_outside(attached)
        for vol_id in attached:
            try:
                await trio.to_thread.run_sync(self.tree.engine.detach, vol_id)
            except VmtreeError as e:
                log.warning("VM %s: releasing volume %d: %s", vm.name, vol_id, e.reason)

    async def reset_volatile_volumes(self, vm: Vm) -> None:
        """``volatile`` volumes start every boot empty."""
        for volume in list(vm.volumes.values()):
            if volume.policy == "volatile" and volume.size > 0:
                await trio.to_thread.run_sync(self.tree.engine.discard, volume.id, volume.size)
