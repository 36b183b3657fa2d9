"""The writes to the aliases table, part of :class:`~vmtreefs.store.txn.Txn`."""

from __future__ import annotations

import errno

from vmtreefs.errors import VmtreeError
from vmtreefs.store.statements import Statements, one_target


class AliasWrites(Statements):
    def insert_alias(
        self,
        name: str,
        target_vm: int | None,
        target_alias: int | None,
        created: float,
        system: bool = False,
    ) -> int:
        """Add an alias naming exactly one existing VM or alias; returns its new id."""
        what = f"insert alias {name!r}"
        one_target(target_vm, target_alias, what)
        self._require_target(target_vm, target_alias, f"alias {name!r}")
        cur = self._run(
            "INSERT INTO aliases (name, target_vm, target_alias, system, created) "
            "VALUES (?, ?, ?, ?, ?)",
            (name, target_vm, target_alias, int(bool(system)), created),
            what,
            exists=f"an alias named {name!r} already exists",
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def rename_alias(self, alias_id: int, new_name: str) -> None:
        cur = self._run(
            "UPDATE aliases SET name = ? WHERE id = ?",
            (new_name, alias_id),
            f"rename alias {alias_id} to {new_name!r}",
            exists=f"an alias named {new_name!r} already exists",
        )
        self._one_row(cur, f"no alias with id {alias_id} to rename")

    def retarget_alias(
        self, alias_id: int, target_vm: int | None, target_alias: int | None
    ) -> None:
        """Point an alias at another VM or alias; a loop of aliases is refused (ELOOP)."""
        what = f"re-target alias {alias_id}"
        one_target(target_vm, target_alias, what)
        if not self._exists("aliases", alias_id):
            raise VmtreeError(errno.ENOENT, f"no alias with id {alias_id} to re-target")
        self._require_target(target_vm, target_alias, f"alias {alias_id}")
        if target_alias is not None:
            loop = self._run(
                "WITH RECURSIVE chain(id) AS (SELECT ? "
                "UNION SELECT aliases.target_alias FROM aliases JOIN chain "
                "ON aliases.id = chain.id WHERE aliases.target_alias IS NOT NULL) "
                "SELECT 1 FROM chain WHERE id = ?",
                (target_alias, alias_id),
                f"follow alias {target_alias}",
            ).fetchone()
            if loop is not None:
                raise VmtreeError(
                    errno.ELOOP,
                    f"alias {alias_id} cannot name alias {target_alias}: "
                    f"that alias is or leads back to alias {alias_id}",
                )
        self._run(
            "UPDATE aliases SET target_vm = ?, target_alias = ? WHERE id = ?",
            (target_vm, target_alias, alias_id),
            what,
        )

    def delete_alias(self, alias_id: int) -> None:
        """Delete an alias; EBUSY, and nothing deleted, while another alias names it."""
        cur = self._run(
            "DELETE FROM aliases WHERE id = ?",
            (alias_id,),
            f"delete alias {alias_id}",
            in_use=lambda: (
                f"alias {alias_id} is still named by alias "
                f"{self._alias_names('target_alias', alias_id)} or a template link; "
                "delete or re-target them first"
            ),
        )
        self._one_row(cur, f"no alias with id {alias_id} to delete")
