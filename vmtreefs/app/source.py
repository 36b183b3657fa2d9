"""SOURCE, the state directory: checks, initialisation, and the lock that says who serves it."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import time
from pathlib import Path

from vmtreefs.engine.base import SnapshotEngine
from vmtreefs.engine.select import EngineConfig, choose_engine, make_engine
from vmtreefs.errors import VmtreeError
from vmtreefs.store import Store

log = logging.getLogger("vmtreefs.source")

STORE_NAME = "vmtree.db"
LOCK_NAME = "vmtreefs.lock"
LOG_NAME = "vmtreefs.log"
# Files vmtreefs itself puts in SOURCE; anything else makes SOURCE "not empty".
OWN_NAMES = frozenset(
    {
        STORE_NAME,
        STORE_NAME + "-wal",
        STORE_NAME + "-shm",
        STORE_NAME + "-reserve",
        LOCK_NAME,
        LOG_NAME,
        "pool",
        "reflink.xfs",
        "thin",
    }
)
META_ENGINE = "engine"
META_INITIALISED = "initialised"


def check_source(source: Path) -> None:
    """Refuse a SOURCE we cannot keep state in, with the reason a user can act on."""
    if not source.exists():
        raise VmtreeError(errno.ENOENT, f"SOURCE {source} does not exist")
    if not source.is_dir():
        raise VmtreeError(errno.ENOTDIR, f"SOURCE {source} is not a directory")
    probe = source / f".vmtreefs-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise VmtreeError(
            e.errno or errno.EACCES, f"SOURCE {source} is not writable: {e.strerror}"
        ) from None


def check_mountpoint(mountpoint: Path) -> None:
    if not mountpoint.exists():
        raise VmtreeError(errno.ENOENT, f"mount point {mountpoint} does not exist")
    if not mountpoint.is_dir():
        raise VmtreeError(errno.ENOTDIR, f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise VmtreeError(errno.EBUSY, f"something is already mounted at {mountpoint}")


def is_initialised(source: Path) -> bool:
    return (source / STORE_NAME).exists()


class SourceLock:
    """An flock on SOURCE/vmtreefs.lock held for as long as a daemon serves SOURCE.

    The kernel drops it when the daemon dies, even by kill -9, so a stale lock
    never blocks a remount.
    """

    def __init__(self, source: Path) -> None:
        self.path = source / LOCK_NAME
        self.fd: int | None = None
        self.created = False

    def acquire(self, mountpoint: Path | None) -> None:
        self.created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_lock_info(self.path.parent)
            os.close(fd)
            where = f" (pid {holder.get('pid')}, mounted at {holder.get('mountpoint')})"
            raise VmtreeError(
                errno.EBUSY, f"SOURCE {self.path.parent} is already in use by vmtreefs{where}"
            ) from None
        info = {"pid": os.getpid(), "mountpoint": str(mountpoint) if mountpoint else None}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd

    def release(self, remove: bool = False) -> None:
        """Let go; ``remove`` deletes a lock file this process made (a refused init)."""
        if self.fd is not None:
            if remove and self.created:
                self.path.unlink(missing_ok=True)
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None


def read_lock_info(source: Path) -> dict[str, object]:
    try:
        data = json.loads((source / LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_empty(source: Path) -> None:
    """A new tree never moves in beside someone else's files."""
    foreign = sorted(p.name for p in source.iterdir() if p.name not in OWN_NAMES)
    if foreign:
        raise VmtreeError(
            errno.ENOTEMPTY,
            f"SOURCE {source} is not empty and holds no vmtreefs store "
            f"(found {', '.join(foreign[:5])})",
        )


def initialise(
    source: Path,
    requested_engine: str,
    size: int,
    data_device: str | None = None,
    metadata_device: str | None = None,
) -> tuple[Store, str]:
    """Make SOURCE a new tree: choose the engine, record it, prepare its storage.

    The choice is recorded before the storage is prepared, so a crash in between
    is finished by the next mount rather than leaving an unknown SOURCE.
    """
    if is_initialised(source):
        raise VmtreeError(errno.EEXIST, f"SOURCE {source} is already a vmtreefs tree")
    check_empty(source)
    config, reason = choose_engine(source, requested_engine, size, data_device, metadata_device)
    if config.engine == "dmthin":  # checked before the choice is recorded
        from vmtreefs.engine.dmthin import DmThinEngine

        DmThinEngine.check_request(
            config.layout, config.image_size or 0, data_device, metadata_device
        )
    if config.engine == "reflink" and "device" in config.options:
        from vmtreefs.engine.reflink import check_empty_device

        check_empty_device(config.options["device"])
    # The store names every VM: only the mounting user reads it (SQLite gives its
    # -wal and -shm files the same mode).
    os.close(os.open(source / STORE_NAME, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    store = Store.open(source / STORE_NAME, reserve=True)
    with store.transaction() as tx:
        tx.set_meta(META_ENGINE, config.to_json())
        tx.set_meta("created", str(time.time()))
    _prepare_engine(source, store, config)
    return store, reason


def _prepare_engine(source: Path, store: Store, config: EngineConfig) -> None:
    from vmtreefs.engine.dmthin import DmThinEngine
    from vmtreefs.engine.reflink import ReflinkEngine

    if config.engine == "dmthin":
        thin = source / "thin"
        if thin.exists():  # an initialisation a crash interrupted: start it again
            for leftover in thin.iterdir():
                leftover.unlink()
        DmThinEngine.initialise(
            source,
            config.layout,
            config.image_size or 0,
            config.options["pool"],
            store,
            config.options.get("data"),
            config.options.get("metadata"),
        )
    if config.engine == "reflink":
        leftover = source / "reflink.xfs"
        if leftover.exists() and not os.path.ismount(source / "pool"):
            leftover.unlink()
        ReflinkEngine.initialise(
            source, config.layout, config.image_size, config.options.get("device")
        )
    with store.transaction() as tx:
        tx.set_meta(META_INITIALISED, "1")


def open_source(
    source: Path,
    requested_engine: str = "auto",
    size: int = 20 * 1024**3,
    data_device: str | None = None,
    metadata_device: str | None = None,
) -> tuple[Store, SnapshotEngine, str]:
    """Open (initialising when empty) SOURCE's store and engine; the engine is started.

    A damaged store is refused (EUCLEAN, with the way back) before anything is
    written to it.
    """
    if is_initialised(source):
        # Only init puts a vmtree.db into SOURCE (it refuses one with other files).
        store = Store.open(source / STORE_NAME, check=True, ours=True, reserve=True)
        raw = store.get_meta(META_ENGINE)
        if raw is None:
            store.close()
            raise VmtreeError(errno.EINVAL, f"the store in {source} records no engine")
        config = EngineConfig.from_json(raw)
        if store.get_meta(META_INITIALISED) != "1":
            log.warning("finishing the initialisation of %s that was interrupted", source)
            _prepare_engine(source, store, config)
        reason = f"engine recorded in {source / STORE_NAME}"
    else:
        store, reason = initialise(source, requested_engine, size, data_device, metadata_device)
        config = EngineConfig.from_json(store.get_meta(META_ENGINE) or "")
    engine = make_engine(source, config, store)
    try:
        engine.start()
    except BaseException:
        store.close()
        raise
    return store, engine, reason
