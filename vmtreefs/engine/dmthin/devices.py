"""The pool's thin devices in ``/dev/mapper``: active only while something holds them.

An idle volume then costs the kernel nothing and needs no suspend when it is
snapshotted; a device an earlier daemon left active is removed at start, or
adopted as it is when a running VM still holds it.

A device being grown by writes (a copy into a new volume) gets a table longer than
the volume, in steps of its own length (at least ``STEP_MIN``, at most
``STEP_MAX``), so most writes past the end need no reload. The table is never
recorded: the next activation takes the volume's size again, and a VM's disk
(``fit``) is never longer than the volume.
"""

from __future__ import annotations

import errno
import logging
import os

from vmtreefs.engine.base import EngineError
from vmtreefs.engine.dmthin.ledger import PoolLedger
from vmtreefs.engine.dmthin.pool import BLOCK_SECTORS, SECTOR, ThinPool, digits
from vmtreefs.engine.tools import run

log = logging.getLogger("vmtreefs.engine.dmthin")

MiB = 1 << 20
STEP_MIN = 64 * MiB  # a table grown for writes past the end grows by its length,
STEP_MAX = 1024 * MiB  # but by this much at least and at most


class ThinDevices:
    """Activation of the pool's thin devices, counted by their holders (open files, VMs)."""

    def __init__(self, pool: ThinPool, ledger: PoolLedger) -> None:
        self.pool = pool
        self.ledger = ledger  # a device's table takes the volume's size from the record
        self._users: dict[int, int] = {}  # holders per active device
        self._writable: set[int] = set()  # devices active read-write
        self._lengths: dict[int, int] = {}  # bytes each active device's table maps

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

    def _table(self, vol_id: int, length: int) -> str:
        return f"0 {length // SECTOR} thin {self.pool.mapper_path} {vol_id}"

    def activate(self, vol_id: int, writable: bool) -> None:
        name = self.pool.device_name(vol_id)
        if vol_id in self._users:
            if writable and vol_id not in self._writable:
                length = max(self._lengths[vol_id], self.ledger.size(vol_id))
                table = self._table(vol_id, length)
                run(["dmsetup", "suspend", name], f"suspend {name}")
                try:
                    run(["dmsetup", "reload", name, "--table", table], "reload")
                finally:
                    run(["dmsetup", "resume", name], f"resume {name}")
                self._writable.add(vol_id)
                self._lengths[vol_id] = length
            return
        if self.pool.device_path(vol_id).exists():
            # Left active by an earlier daemon because a VM still runs on it: adopt it
            # as it is (a running VM's disk is writable).
            log.info("volume %d: adopting %s, still active from before", vol_id, name)
            self._users[vol_id] = 0
            self._writable.add(vol_id)
            self._lengths[vol_id] = self._status(vol_id)[0]
            return
        length = self.ledger.size(vol_id)
        argv = ["dmsetup", "create", name, "--table", self._table(vol_id, length)]
        if not writable:
            argv.insert(2, "--readonly")
        run(argv, f"activate volume {vol_id}")
        self._users[vol_id] = 0
        self._lengths[vol_id] = length
        if writable:
            self._writable.add(vol_id)

    def deactivate(self, vol_id: int) -> None:
        run(["dmsetup", "remove", "--retry", self.pool.device_name(vol_id)], f"deactivate {vol_id}")
        self._users.pop(vol_id, None)
        self._writable.discard(vol_id)
        self._lengths.pop(vol_id, None)

    def deactivate_idle(self) -> None:
        for vol_id in list(self._users):
            if self._users[vol_id] == 0:
                self.deactivate(vol_id)

    def grow(self, vol_id: int) -> None:
        """Give an active device the volume's (larger) size, unless its table has it."""
        if vol_id in self._users and self._lengths[vol_id] < self.ledger.size(vol_id):
            self._reload(vol_id, self.ledger.size(vol_id), "grow")

    def extend(self, vol_id: int, end: int) -> None:
        """Let an active device reach ``end`` for writes past the volume's end: a table
        reload only when ``end`` is past the table, and then a step ahead."""
        if vol_id not in self._users or end <= self._lengths[vol_id]:
            return
        length = self._lengths[vol_id]
        step = min(max(length, STEP_MIN), STEP_MAX)
        self._reload(vol_id, -(-max(end, length + step) // MiB) * MiB, "extend")

    def fit(self, vol_id: int) -> None:
        """Cut an active device's table back to the volume's size (a VM's disk must not
        be bigger than the volume)."""
        if vol_id in self._users and self._lengths[vol_id] > self.ledger.size(vol_id):
            self._reload(vol_id, self.ledger.size(vol_id), "fit")

    def _reload(self, vol_id: int, length: int, what: str) -> None:
        name = self.pool.device_name(vol_id)
        argv = ["dmsetup", "reload", name, "--table", self._table(vol_id, length)]
        if vol_id not in self._writable:
            argv.insert(2, "--readonly")
        run(argv, f"{what} {name}")
        run(["dmsetup", "resume", name], f"{what} {name}")
        log.debug(
            "%s %s: table of %d bytes for a volume of %d",
            what,
            name,
            length,
            self.ledger.size(vol_id),
        )
        self._lengths[vol_id] = length

    def _status(self, vol_id: int) -> tuple[int, int]:
        """(bytes the device's table maps, end of its highest mapped pool block or 0)."""
        name = self.pool.device_name(vol_id)
        return parse_thin_status(self.pool.dm.status(name, f"status of {name}"), name)

    def mapped_end(self, vol_id: int) -> int:
        """Where the volume's data ends in the pool's metadata: the end of its highest
        mapped block (0 for none), whatever the table; activates it read-only a moment."""
        if vol_id in self._users or self.pool.device_path(vol_id).exists():
            return self._status(vol_id)[1]
        name = self.pool.device_name(vol_id)
        table = self._table(vol_id, max(self.ledger.size(vol_id), BLOCK_SECTORS * SECTOR))
        run(["dmsetup", "create", "--readonly", name, "--table", table], f"look at {name}")
        try:
            return self._status(vol_id)[1]
        finally:
            run(["dmsetup", "remove", "--retry", name], f"deactivate {vol_id}")

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


def parse_thin_status(lines: list[str], name: str) -> tuple[int, int]:
    """A thin device's status: (bytes its table maps, end of its highest mapped block or 0)."""
    # 0 LENGTH thin MAPPED_SECTORS HIGHEST_MAPPED_SECTOR (- if none), or Fail
    fields = lines[0].split() if len(lines) == 1 else []
    numbers = [fields[1], fields[3], "0" if fields[4] == "-" else fields[4]] if fields[4:] else []
    if len(fields) != 5 or fields[2] != "thin" or not all(digits(n) for n in numbers):
        raise EngineError(errno.EIO, f"unexpected status of {name}: {lines!r}")
    highest = 0 if fields[4] == "-" else (int(fields[4]) + 1) * SECTOR
    return int(fields[1]) * SECTOR, highest
