"""The metadata store: one SQLite file, ``SOURCE/vmtree.db``.

It holds the VMs, their volumes, the engine configuration and the intent
journal that brackets every engine or hypervisor action, so that a crash at any
point can be reconciled at the next mount. WAL with ``synchronous=FULL`` makes
a committed transaction survive a crash or power loss.

The store is called from trio worker threads. One connection is shared and a
lock is held for the whole of each transaction or read, so a transaction sees
exactly what it writes and nothing of another thread's half-done work.

Ids of VMs, volumes and aliases are never reused (``AUTOINCREMENT`` and a
durable counter): inode numbers and engine device ids are derived from them, and
a reused id could make a stale handle or a leftover engine volume alias a new one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from vmtreefs.errors import VmtreeError
from vmtreefs.store.damage import check_sound, damaged
from vmtreefs.store.failures import store_error
from vmtreefs.store.reserve import SpaceReserve
from vmtreefs.store.rows import (
    AliasRow,
    Intent,
    SavestateRow,
    Snapshot,
    TemplateRow,
    VersionRow,
    VmRow,
    VolumeRow,
)
from vmtreefs.store.schema import (
    APPLICATION_ID,
    BUSY_TIMEOUT,
    DB_FILENAME,
    MIGRATIONS,
    statements,
)
from vmtreefs.store.txn import Txn

log = logging.getLogger("vmtreefs.store")


class Store:
    """The open metadata store. Every method blocks; call it from a worker thread."""

    #: MIGRATIONS[i] takes the schema from version i to i + 1.
    MIGRATIONS: ClassVar[tuple[str, ...]] = MIGRATIONS
    SCHEMA_VERSION: ClassVar[int] = len(MIGRATIONS)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.SCHEMA_VERSION = len(cls.MIGRATIONS)

    def __init__(
        self, path: Path, conn: sqlite3.Connection, reserve: SpaceReserve | None = None
    ) -> None:
        """Use :meth:`open`; this only wraps an already prepared connection."""
        self.path = path
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._reserve = reserve
        self._complete_later: set[int] = set()

    # Opening and closing

    @classmethod
    def open(
        cls, path: Path, check: bool = False, ours: bool = False, reserve: bool = False
    ) -> Store:
        """Open (creating if missing) and migrate the store at ``path`` (``SOURCE/vmtree.db``).

        ``check``: refuse a damaged file (EUCLEAN) before anything is written to it.
        ``ours``: the file is SOURCE's own store, so one SQLite cannot read is damaged,
        not another program's. ``reserve``: keep room for deletions beside it
        (``store.reserve``).
        """
        path = Path(path)
        if path.is_dir():
            raise VmtreeError(
                errno.EISDIR, f"store {path} is a directory, not a file such as {DB_FILENAME}"
            )
        if not path.parent.is_dir():
            raise VmtreeError(errno.ENOENT, f"directory {path.parent} of store {path} is missing")
        try:
            conn = sqlite3.connect(
                path,
                timeout=BUSY_TIMEOUT,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as e:
            raise cls._openstore_error(path, e, ours) from e
        try:
            cls._prepare(conn, path, check)
        except sqlite3.Error as e:
            conn.close()
            raise cls._openstore_error(path, e, ours) from e
        except BaseException:
            conn.close()
            raise
        space = None
        if reserve:
            space = SpaceReserve(path)
            space.take()
        return cls(path, conn, space)

    @staticmethod
    def _openstore_error(path: Path, e: sqlite3.Error, ours: bool) -> VmtreeError:
        code = getattr(e, "sqlite_errorcode", 0) & 0xFF
        if code == sqlite3.SQLITE_CORRUPT or (ours and code == sqlite3.SQLITE_NOTADB):
            return damaged(path, str(e))
        err = store_error(e, f"cannot open store {path}")
        if err.errno == errno.EACCES and not os.access(path.parent, os.W_OK):
            # WAL needs to create -wal and -shm files next to the database.
            return VmtreeError(err.errno, f"{err.reason} ({path.parent} is not writable)")
        if err.errno == errno.EINVAL:
            return VmtreeError(err.errno, f"{path} is not a vmtreefs store: {e}")
        return err

    @classmethod
    def _prepare(cls, conn: sqlite3.Connection, path: Path, check: bool) -> None:
        # Reading the header first makes "not a database" fail before we write anything.
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        if app_id not in (0, APPLICATION_ID):
            raise VmtreeError(
                errno.EINVAL,
                f"{path} is another program's SQLite database (application_id {app_id:#x})",
            )
        if version > cls.SCHEMA_VERSION:
            raise VmtreeError(
                errno.EINVAL,
                f"store schema version {version} is newer than this vmtreefs "
                f"({cls.SCHEMA_VERSION})",
            )
        if check and version > 0:
            check_sound(conn, path)
        if version == 0:
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables:
                raise VmtreeError(
                    errno.EINVAL, f"{path} is an SQLite database but not a vmtreefs store"
                )
        conn.execute("PRAGMA foreign_keys = ON")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise VmtreeError(errno.EINVAL, f"store {path} cannot use a WAL journal (got {mode!r})")
        conn.execute("PRAGMA synchronous = FULL")
        if conn.execute("PRAGMA foreign_keys").fetchone() != (1,):
            raise VmtreeError(errno.EINVAL, "this SQLite does not enforce foreign keys")
        cls._migrate(conn, path)

    @classmethod
    def _migrate(cls, conn: sqlite3.Connection, path: Path) -> None:
        """Apply each pending migration in its own transaction, with its version bump.

        A new store logs one line; an older one logs each step it is taken through,
        since that is what an administrator upgrading wants to see.
        """
        started_at: int | None = None
        while True:
            # Re-read under the write lock: another process may have migrated meanwhile.
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > cls.SCHEMA_VERSION:
                    raise VmtreeError(
                        errno.EINVAL,
                        f"store schema version {version} is newer than this vmtreefs "
                        f"({cls.SCHEMA_VERSION})",
                    )
                if started_at is None:
                    started_at = version
                if version == cls.SCHEMA_VERSION:
                    # A real write, so a read-only file fails here rather than
                    # at the first operation after the mount.
                    conn.execute(f"PRAGMA user_version = {version:d}")
                    conn.execute("COMMIT")
                    if started_at == 0 and version > 0:
                        log.info("store %s: created store, schema v%d", path, version)
                    return
                for statement in statements(cls.MIGRATIONS[version]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version + 1:d}")
                conn.execute("COMMIT")
                if started_at > 0:
                    log.info("store %s: schema migrated to version %d", path, version + 1)
            except BaseException:
                if conn.in_transaction:
                    conn.rollback()
                raise

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Access

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        if self._owner == threading.get_ident():
            # A plain Lock would deadlock here; say why instead.
            raise RuntimeError("store used again from inside one of its own transactions")
        with self._lock:
            if self._conn is None:
                raise VmtreeError(errno.EIO, f"store {self.path} is closed")
            self._owner = threading.get_ident()
            try:
                yield self._conn
            finally:
                self._owner = None

    @contextmanager
    def transaction(self) -> Iterator[Txn]:
        """One atomic write: everything in the block is committed, or nothing on an exception.

        ``BEGIN IMMEDIATE`` takes the write lock at once, so a transaction
        never fails half-way for lack of it.
        """
        with self._locked() as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise store_error(e, "begin a store transaction") from e
            txn = Txn(conn)
            try:
                yield txn
                for intent_id in sorted(self._complete_later):
                    txn.complete_intent(intent_id)
                txn._active = False
                conn.execute("COMMIT")
                self._complete_later.clear()
                if self._reserve is not None and not self._reserve.held:
                    self._reserve.take()
            except BaseException as e:
                txn._active = False
                _rollback(conn)
                if isinstance(e, sqlite3.Error):
                    raise store_error(e, "commit a store transaction") from e
                raise

    def complete_later(self, intent_id: int) -> None:
        """Record an intent complete in the next transaction that commits: its work is
        done, but the commit that would say so found no room (a full SOURCE)."""
        with self._lock:
            self._complete_later.add(intent_id)

    def release_reserve(self) -> bool:
        """Free the room kept for deletions; True if there was any to free."""
        with self._lock:
            return self._reserve is not None and self._reserve.release()

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """A read transaction, so several SELECTs agree even if another process writes."""
        with self._locked() as conn:
            try:
                conn.execute("BEGIN")
                yield conn
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                _rollback(conn)
                raise store_error(e, "read the store") from e
            except BaseException:
                _rollback(conn)
                raise

    def load(self) -> Snapshot:
        with self._reading() as conn:
            vms = [
                VmRow(vm_id, name, created, origin_id, json.loads(props))
                for vm_id, name, created, origin_id, props in conn.execute(
                    "SELECT id, name, created, origin_id, props FROM vms ORDER BY id"
                )
            ]
            volumes = [
                VolumeRow(*row)
                for row in conn.execute(
                    "SELECT id, vm_id, name, size, policy, created FROM volumes ORDER BY id"
                )
            ]
            intents = [
                Intent(intent_id, kind, json.loads(payload), created)
                for intent_id, kind, payload, created in conn.execute(
                    "SELECT id, kind, payload, created FROM intents "
                    "WHERE completed IS NULL ORDER BY id"
                )
            ]
            meta = dict(conn.execute("SELECT key, value FROM meta"))
            aliases = [
                AliasRow(alias_id, name, target_vm, target_alias, bool(system), created)
                for alias_id, name, target_vm, target_alias, system, created in conn.execute(
                    "SELECT id, name, target_vm, target_alias, system, created "
                    "FROM aliases ORDER BY id"
                )
            ]
            domains = {int(i): str(x) for i, x in conn.execute("SELECT vm_id, xml FROM domains")}
            savestate_volumes: dict[int, dict[str, tuple[int, int]]] = {}
            for ss_id, name, vol_id, size in conn.execute(
                "SELECT savestate_id, name, vol_id, size FROM savestate_volumes"
            ):
                savestate_volumes.setdefault(ss_id, {})[name] = (vol_id, size)
            savestates = [
                SavestateRow(
                    ss_id,
                    vm_id,
                    label,
                    created,
                    image,
                    json.loads(info),
                    savestate_volumes.get(ss_id, {}),
                )
                for ss_id, vm_id, label, created, image, info in conn.execute(
                    "SELECT id, vm_id, label, created, image, info FROM savestates ORDER BY id"
                )
            ]
            versions = [
                VersionRow(*row)
                for row in conn.execute(
                    "SELECT vm_id, head_id, number FROM versions ORDER BY vm_id"
                )
            ]
            templates = [
                TemplateRow(*row)
                for row in conn.execute(
                    "SELECT vm_id, target_vm, target_alias, used FROM templates ORDER BY vm_id"
                )
            ]
        return Snapshot(
            vms, volumes, intents, meta, aliases, domains, savestates, versions, templates
        )

    def get_meta(self, key: str) -> str | None:
        with self._reading() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    # The engine's ledger (EngineLedger in engine/base.py)

    def load_engine_state(self) -> tuple[dict[str, str], dict[int, int]]:
        with self._reading() as conn:
            meta = {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM engine_meta")}
            sizes = {int(i): int(n) for i, n in conn.execute("SELECT id, size FROM engine_volumes")}
        return meta, sizes

    def save_engine_state(
        self,
        meta: Mapping[str, str | None] | None = None,
        sizes: Mapping[int, int | None] | None = None,
    ) -> None:
        """Change some keys and sizes in one commit; None deletes one."""
        with self.transaction() as tx:
            tx.set_engine_state(meta or {}, sizes or {})

    def recent_events(self, limit: int = 100) -> list[tuple[float, str]]:
        """The newest ``limit`` events, oldest first (insertion order, whatever the clock did)."""
        if limit <= 0:
            return []
        with self._reading() as conn:
            rows = conn.execute(
                "SELECT time, line FROM events ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [(t, line) for t, line in reversed(rows)]

    def integrity_check(self) -> list[str]:
        """Problems for fsck: SQLite's own check, plus rows whose foreign keys dangle.

        Foreign keys are enforced on our connection, so dangling ones mean the
        file was edited by something else.
        """
        with self._reading() as conn:
            problems = [
                str(line) for (line,) in conn.execute("PRAGMA integrity_check") if line != "ok"
            ]
            problems += [
                f"row {rowid} of {table} refers to a missing row of {parent}"
                for table, rowid, parent, _ in conn.execute("PRAGMA foreign_key_check")
            ]
        return problems

    _PRAGMA_NAME = re.compile(r"[a-z_]+")

    def pragma(self, name: str) -> Any:
        """Read one pragma of the live connection (for tests and fsck); never sets one."""
        if not self._PRAGMA_NAME.fullmatch(name):
            raise ValueError(f"not a pragma name: {name!r}")
        with self._locked() as conn:
            try:
                row = conn.execute(f"PRAGMA {name}").fetchone()
            except sqlite3.Error as e:
                raise store_error(e, f"read pragma {name}") from e
        return None if row is None else row[0]


def _rollback(conn: sqlite3.Connection) -> None:
    if not conn.in_transaction:
        return
    try:
        conn.rollback()
    except sqlite3.Error as e:
        # The original exception matters more; SQLite rolls back on close anyway.
        log.error("store rollback failed: %s", e)
