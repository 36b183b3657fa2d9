"""The pool's thin devices in ``/dev/mapper``: active only while something holds them.

An idle volume then costs the kernel nothing and needs no suspend when it is
snapshotted; a device an earlier daemon left active is removed at start, or
adopted as it is when a running VM still holds it.
"""

from __future__ import annotations

import logging
import os

from vmtreefs.engine.base import EngineError
from vmtreefs.engine.dmthin.ledger import PoolLedger
from vmtreefs.engine.dmthin.pool import SECTOR, ThinPool
from vmtreefs.engine.tools import run

log = logging.getLogger("vmtreefs.engine.dmthin")


class ThinDevices:
    """Activation of the pool's thin devices, counted by their holders (open files, VMs)."""

    def __init__(self, pool: ThinPool, ledger: PoolLedger) -> None:
        self.pool = pool
        self.ledger = ledger  # a device's table takes the volume's size from the record
        self._users: dict[int, int] = {}  # holders per active device
        self._writable: set[int] = set()  # devices active read-write

    def active(self, vol_id: int) -> bool:
        return vol_id in self._users

    def held(self, vol_id: int) -> bool:
        return self._users.get(vol_id, 0) > 0

    def any_held(self) -> bool:
        return any(self._users.values())

    def hold(self, vol_id: int, writable: bool) -> None:
        """One holder more, activating the device if it is not yet."""
        self.activate(vol_id, writable)
        self._users[vol_id] += 1

    def open(self, vol_id: int, writable: bool) -> int:
        """An fd on the device, counted as a holder until :meth:`let_go`."""
        self.activate(vol_id, writable)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        fd = os.open(self.pool.device_path(vol_id), flags)
        self._users[vol_id] += 1
        return fd

    def let_go(self, vol_id: int) -> bool:
        """One holder fewer; whether that was the last."""
        self._users[vol_id] -= 1
        return self._users[vol_id] == 0

    def _table(self, vol_id: int) -> str:
        return f"0 {self.ledger.sizes[vol_id] // SECTOR} thin {self.pool.mapper_path} {vol_id}"

    def activate(self, vol_id: int, writable: bool) -> None:
        name = self.pool.device_name(vol_id)
        if vol_id in self._users:
            if writable and vol_id not in self._writable:
                run(["dmsetup", "suspend", name], f"suspend {name}")
                try:
                    run(["dmsetup", "reload", name, "--table", self._table(vol_id)], "reload")
                finally:
                    run(["dmsetup", "resume", name], f"resume {name}")
                self._writable.add(vol_id)
            return
        if self.pool.device_path(vol_id).exists():
            # Left active by an earlier daemon because a VM still runs on it: adopt it
            # as it is (a running VM's disk is writable).
            log.info("volume %d: adopting %s, still active from before", vol_id, name)
            self._users[vol_id] = 0
            self._writable.add(vol_id)
            return
        argv = ["dmsetup", "create", name, "--table", self._table(vol_id)]
        if not writable:
            argv.insert(2, "--readonly")
        run(argv, f"activate volume {vol_id}")
        self._users[vol_id] = 0
        if writable:
            self._writable.add(vol_id)

    def deactivate(self, vol_id: int) -> None:
        run(["dmsetup", "remove", "--retry", self.pool.device_name(vol_id)], f"deactivate {vol_id}")
        self._users.pop(vol_id, None)
        self._writable.discard(vol_id)

    def deactivate_idle(self) -> None:
        for vol_id in list(self._users):
            if self._users[vol_id] == 0:
                self.deactivate(vol_id)

    def grow(self, vol_id: int) -> None:
        """Give an active device the volume's recorded (larger) size."""
        if vol_id not in self._users:
            return
        name = self.pool.device_name(vol_id)
        argv = ["dmsetup", "reload", name, "--table", self._table(vol_id)]
        if vol_id not in self._writable:
            argv.insert(2, "--readonly")
        run(argv, f"grow {name}")
        run(["dmsetup", "resume", name], f"grow {name}")

    def clear_stale(self) -> None:
        """Thin devices a killed daemon left active: remove the idle ones so they can be
        activated afresh; one still open elsewhere (a running VM) stays and is reported."""
        for name in self._ours():
            try:
                run(["dmsetup", "remove", name], f"remove stale {name}")
                log.info("removed %s, left active by an earlier daemon", name)
            except EngineError as e:
                log.warning("%s stays active: %s", name, e.reason)

    def remove_all(self) -> None:
        for name in self._ours():
            run(["dmsetup", "remove", "--retry", name], f"remove {name}")

    def _ours(self) -> list[str]:
        out = run(["dmsetup", "ls"], "list devices")
        prefix = f"vmtree-{self.pool.pool_id}-"
        names = [line.split()[0] for line in out.splitlines() if line.strip()]
        return [n for n in names if n.startswith(prefix) and n != self.pool.name]
