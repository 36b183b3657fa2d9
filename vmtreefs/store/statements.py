"""What every store transaction is made of: one statement at a time, its SQLite
failures turned into the errno and reason a user reads."""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Callable
from typing import Any

from vmtreefs.errors import VmtreeError
from vmtreefs.store.failures import store_error


def one_target(target_vm: int | None, target_alias: int | None, what: str) -> None:
    if (target_vm is None) == (target_alias is None):
        raise VmtreeError(
            errno.EINVAL,
            f"{what}: an alias names exactly one VM or alias "
            f"(got VM {target_vm}, alias {target_alias})",
        )


class Statements:
    """Valid only inside ``with store.transaction()``."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._active = True

    def _run(
        self,
        sql: str,
        params: tuple[Any, ...],
        what: str,
        *,
        exists: str | None = None,
        missing: str | None = None,
        in_use: Callable[[], str] | None = None,
    ) -> sqlite3.Cursor:
        """Execute one statement, translating constraint failures into the user's errno.

        ``exists`` replaces the reason of a UNIQUE conflict (a clash with the
        other half of the top-level namespace keeps SQLite's own words),
        ``missing`` that of a reference to a missing row, and ``in_use`` turns
        the failure of a delete that would leave a reference dangling into
        EBUSY; it is called after the failure, so it may query the store.
        """
        if not self._active:
            raise RuntimeError("store transaction used after its block ended")
        try:
            return self._conn.execute(sql, params)
        except sqlite3.Error as e:
            err = store_error(e, what)
            trigger = getattr(e, "sqlite_errorname", None) == "SQLITE_CONSTRAINT_TRIGGER"
            if err.errno == errno.EEXIST and exists is not None and not trigger:
                raise VmtreeError(errno.EEXIST, exists) from e
            if err.errno == errno.ENOENT and in_use is not None:
                raise VmtreeError(errno.EBUSY, in_use()) from e
            if err.errno == errno.ENOENT and missing is not None:
                raise VmtreeError(errno.ENOENT, missing) from e
            raise err from e

    def _exists(self, table: str, row_id: int) -> bool:
        # ``table`` is one of ours, never user input.
        cur = self._run(f"SELECT 1 FROM {table} WHERE id = ?", (row_id,), f"look up {table}")
        return cur.fetchone() is not None

    def _alias_names(self, column: str, row_id: int) -> str:
        rows = self._run(
            f"SELECT name FROM aliases WHERE {column} = ? ORDER BY id",
            (row_id,),
            "look up aliases",
        ).fetchall()
        return ", ".join(repr(name) for (name,) in rows)

    def _one_row(self, cur: sqlite3.Cursor, reason: str) -> None:
        if cur.rowcount == 0:
            raise VmtreeError(errno.ENOENT, reason)

    def _require_target(self, target_vm: int | None, target_alias: int | None, of: str) -> None:
        # Checked explicitly, not left to the foreign key, so the reason names
        # the missing row and an alias cannot name itself by guessing its new id.
        if target_vm is not None and not self._exists("vms", target_vm):
            raise VmtreeError(errno.ENOENT, f"target VM {target_vm} of {of} does not exist")
        if target_alias is not None and not self._exists("aliases", target_alias):
            raise VmtreeError(errno.ENOENT, f"target alias {target_alias} of {of} does not exist")
