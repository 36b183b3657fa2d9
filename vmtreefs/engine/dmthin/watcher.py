"""The pool watcher: a full pool must show in the log before writes start failing."""

from __future__ import annotations

import logging
import subprocess
import threading

from vmtreefs.engine.base import EngineError
from vmtreefs.engine.dmthin.pool import BLOCK_SECTORS, LOW_WATER_PERCENT, SECTOR, ThinPool
from vmtreefs.engine.tools import run

log = logging.getLogger("vmtreefs.engine.dmthin")


class PoolWatcher:
    """Logs when the pool passes its low-water mark, fills, or fails.

    dm-thin raises a device event for each; a thread sleeps in ``dmsetup wait``
    for the next one (as dmeventd does), so there is no polling.
    """

    def __init__(self, pool: ThinPool) -> None:
        self.pool = pool
        self._stopping = threading.Event()
        self._waiter: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._run, name="pool-watcher", daemon=True)
        self.level = "ok"
        self._checking = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        waiter = self._waiter
        if waiter is not None and waiter.poll() is None:
            waiter.terminate()  # our own child, by its pid
        self._thread.join(timeout=10)

    def _run(self) -> None:
        pool = self.pool.name
        try:
            while not self._stopping.is_set():
                events = run(["dmsetup", "info", "-c", "--noheadings", "-o", "events", pool])
                self.check()
                self._waiter = subprocess.Popen(
                    ["dmsetup", "wait", pool, events.strip()],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                if self._waiter.wait() != 0 and not self._stopping.is_set():
                    self._stopping.wait(1.0)  # the pool went away or dmsetup failed
        except EngineError as e:
            if not self._stopping.is_set():
                log.warning("stopped watching pool %s: %s", pool, e.reason)

    def check(self) -> None:
        """Log a change of level: ok, low (past the low-water mark), full, read-only, failed."""
        with self._checking:
            self._check()

    def _check(self) -> None:
        status = self.pool.status()
        free = status.data_total - status.data_used
        low_water = max(1, status.data_total * LOW_WATER_PERCENT // 100)
        if status.mode == "Fail":
            level = "failed"
        elif status.mode == "ro":
            level = "read-only"
        elif status.mode == "out_of_data_space" or free == 0:
            level = "full"
        elif free <= low_water:
            level = "low"
        else:
            level = "ok"
        if level == self.level:
            return
        self.level = level
        block = BLOCK_SECTORS * SECTOR
        figures = (
            f"{free * block // 2**20} MiB of {status.data_total * block // 2**20} MiB free, "
            f"metadata {status.metadata_used}/{status.metadata_total} blocks"
        )
        pool = self.pool.name
        if level == "ok":
            log.info("pool %s has room again: %s", pool, figures)
        elif level == "low":
            log.warning(
                "pool %s passed its low-water mark (%d%% free): %s; delete VMs or grow the "
                "pool (docs/engines.md)",
                pool,
                LOW_WATER_PERCENT,
                figures,
            )
        elif level == "full":
            log.error("pool %s is full: writes and new snapshots get ENOSPC; %s", pool, figures)
        elif level == "read-only":
            log.error(
                "pool %s went read-only (its metadata is full or damaged): nothing can be "
                "written or made; %s",
                pool,
                figures,
            )
        else:
            log.error("pool %s has failed: run thin_check on its metadata", pool)
