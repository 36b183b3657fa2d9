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
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from vmtreefs.errors import VmtreeError

log = logging.getLogger("vmtreefs.store")

DB_FILENAME = "vmtree.db"

#: ``PRAGMA application_id`` of a vmtreefs store ("vmtr"), so ``file`` and we
#: can tell it from another program's SQLite database.
APPLICATION_ID = 0x766D7472

#: Completed intents and events kept; older ones only grow the file.
INTENTS_KEPT = 1000
EVENTS_KEPT = 1000

#: How long to wait for another process (``vmtreefs fsck``) holding the write lock.
BUSY_TIMEOUT = 30.0

_SCHEMA_V1 = f"""
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE vms (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    origin_id INTEGER REFERENCES vms(id) ON DELETE SET NULL,
    props TEXT NOT NULL DEFAULT '{{}}'
);
CREATE TABLE volumes (
    id INTEGER PRIMARY KEY,
    vm_id INTEGER NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    size INTEGER NOT NULL CHECK (size >= 0),
    policy TEXT NOT NULL,
    created REAL NOT NULL,
    UNIQUE (vm_id, name)
);
CREATE TABLE counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE intents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    created REAL NOT NULL,
    completed REAL
);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    line TEXT NOT NULL
);
CREATE INDEX vms_origin ON vms(origin_id);
INSERT INTO counters (name, value) VALUES ('volume_id', 0);
PRAGMA application_id = {APPLICATION_ID};
"""

# Aliases: symlinks at the top level of the tree, naming a VM or another alias by
# id, so renaming the target needs no update. The targets have no ON DELETE
# action on purpose: the orchestrator deletes or re-targets an alias in the same
# transaction as its target, and a delete that would leave one dangling fails.
# VMs and aliases share the top-level namespace; the triggers keep it so.
_SCHEMA_V2 = """
CREATE TABLE aliases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    target_vm INTEGER REFERENCES vms(id),
    target_alias INTEGER REFERENCES aliases(id),
    system INTEGER NOT NULL DEFAULT 0 CHECK (system IN (0, 1)),
    created REAL NOT NULL,
    CHECK ((target_vm IS NULL) <> (target_alias IS NULL))
);
CREATE INDEX aliases_target_vm ON aliases(target_vm);
CREATE INDEX aliases_target_alias ON aliases(target_alias);
CREATE TRIGGER vms_insert_name_free BEFORE INSERT ON vms
WHEN EXISTS (SELECT 1 FROM aliases WHERE name = NEW.name)
BEGIN
    SELECT RAISE(ABORT, 'an alias has that name');
END;
CREATE TRIGGER vms_rename_name_free BEFORE UPDATE OF name ON vms
WHEN EXISTS (SELECT 1 FROM aliases WHERE name = NEW.name)
BEGIN
    SELECT RAISE(ABORT, 'an alias has that name');
END;
CREATE TRIGGER aliases_insert_name_free BEFORE INSERT ON aliases
WHEN EXISTS (SELECT 1 FROM vms WHERE name = NEW.name)
BEGIN
    SELECT RAISE(ABORT, 'a VM has that name');
END;
CREATE TRIGGER aliases_rename_name_free BEFORE UPDATE OF name ON aliases
WHEN EXISTS (SELECT 1 FROM vms WHERE name = NEW.name)
BEGIN
    SELECT RAISE(ABORT, 'a VM has that name');
END;
"""

# What an engine keeps beside its storage, in the same file as the intent journal:
# for dm-thin the pool's transaction id, the change under way and the volume sizes
# (a thin device has no size of its own). See engine/dmthin.py.
_SCHEMA_V3 = """
CREATE TABLE engine_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE engine_volumes (
    id INTEGER PRIMARY KEY,
    size INTEGER NOT NULL CHECK (size >= 0)
);
"""

# A VM's base libvirt description, when it is not the default one; the tree's
# id makes its libvirt domain names and uuids differ from any other tree's.
_SCHEMA_V4 = """
CREATE TABLE domains (
    vm_id INTEGER PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
    xml TEXT NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('tree_id', lower(hex(randomblob(4))));
"""

# Savestates: a VM's memory (a libvirt save image, a file named in ``image``)
# and snapshots of its volumes taken while it was paused. Their volumes are
# engine volumes like any other, owned by the savestate.
_SCHEMA_V5 = """
CREATE TABLE savestates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_id INTEGER NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    label TEXT NOT NULL,
    created REAL NOT NULL,
    image TEXT NOT NULL,
    info TEXT NOT NULL DEFAULT '{}',
    UNIQUE (vm_id, label)
);
CREATE TABLE savestate_volumes (
    savestate_id INTEGER NOT NULL REFERENCES savestates(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    vol_id INTEGER NOT NULL UNIQUE,
    size INTEGER NOT NULL CHECK (size >= 0),
    PRIMARY KEY (savestate_id, name)
);
"""

# Versions: ``vm_id`` is the immutable NAME-vN of the versioned VM whose writable
# head (NAME-next) is ``head_id``. The head cannot be deleted while it has
# versions (no ON DELETE action): clearing ``versioned`` comes first.
# Templates: a VM's ``template`` link names a VM or an alias by id, like an alias;
# ``used`` is the VM whose volumes its template volumes were last taken from.
_SCHEMA_V6 = """
CREATE TABLE versions (
    vm_id INTEGER PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
    head_id INTEGER NOT NULL REFERENCES vms(id),
    number INTEGER NOT NULL CHECK (number > 0),
    UNIQUE (head_id, number)
);
CREATE TABLE templates (
    vm_id INTEGER PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
    target_vm INTEGER REFERENCES vms(id),
    target_alias INTEGER REFERENCES aliases(id),
    used INTEGER,
    CHECK ((target_vm IS NULL) <> (target_alias IS NULL))
);
CREATE INDEX templates_target_vm ON templates(target_vm);
CREATE INDEX templates_target_alias ON templates(target_alias);
"""


@dataclass(frozen=True)
class SavestateRow:
    id: int
    vm_id: int
    label: str
    created: float
    image: str
    info: dict[str, Any]
    volumes: dict[str, tuple[int, int]]  # name -> (volume id, size)


@dataclass(frozen=True)
class VersionRow:
    vm_id: int
    head_id: int
    number: int


@dataclass(frozen=True)
class TemplateRow:
    vm_id: int
    target_vm: int | None
    target_alias: int | None
    used: int | None


@dataclass(frozen=True)
class VmRow:
    id: int
    name: str
    created: float
    origin_id: int | None
    props: dict[str, str]


@dataclass(frozen=True)
class VolumeRow:
    id: int
    vm_id: int
    name: str
    size: int
    policy: str
    created: float


@dataclass(frozen=True)
class AliasRow:
    """A top-level symlink; exactly one of ``target_vm`` and ``target_alias`` is set."""

    id: int
    name: str
    target_vm: int | None
    target_alias: int | None
    system: bool
    created: float


@dataclass(frozen=True)
class Intent:
    id: int
    kind: str
    payload: dict[str, Any]
    created: float


@dataclass(frozen=True)
class Snapshot:
    vms: list[VmRow]
    volumes: list[VolumeRow]
    open_intents: list[Intent]
    meta: dict[str, str]
    aliases: list[AliasRow] = field(default_factory=list)
    domains: dict[int, str] = field(default_factory=dict)
    savestates: list[SavestateRow] = field(default_factory=list)
    versions: list[VersionRow] = field(default_factory=list)
    templates: list[TemplateRow] = field(default_factory=list)


# sqlite3's primary result codes -> the errno a user or the administrator sees.
_ERRNO_OF_SQLITE = {
    sqlite3.SQLITE_CANTOPEN: errno.EACCES,
    sqlite3.SQLITE_READONLY: errno.EACCES,
    sqlite3.SQLITE_PERM: errno.EACCES,
    sqlite3.SQLITE_AUTH: errno.EACCES,
    sqlite3.SQLITE_NOTADB: errno.EINVAL,
    sqlite3.SQLITE_FULL: errno.ENOSPC,
    sqlite3.SQLITE_BUSY: errno.EBUSY,
    sqlite3.SQLITE_LOCKED: errno.EBUSY,
    sqlite3.SQLITE_CONSTRAINT: errno.EINVAL,
}


def _error(e: sqlite3.Error, what: str) -> VmtreeError:
    """Turn any SQLite failure into a VmtreeError, so none escapes to the FUSE boundary."""
    code = getattr(e, "sqlite_errorcode", None)
    name = getattr(e, "sqlite_errorname", None)
    if name in ("SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"):
        err = errno.EEXIST
    elif name == "SQLITE_CONSTRAINT_FOREIGNKEY":
        err = errno.ENOENT
    elif name == "SQLITE_CONSTRAINT_TRIGGER":
        # Our only triggers keep VM and alias names apart.
        err = errno.EEXIST
    elif code is None:
        err = errno.EIO
    else:
        err = _ERRNO_OF_SQLITE.get(code & 0xFF, errno.EIO)
    return VmtreeError(err, f"{what}: {e}")


def _props_json(props: dict[str, str]) -> str:
    # Checked here because the JSON column would otherwise accept anything and
    # VmRow promises str -> str.
    for k, v in props.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise VmtreeError(errno.EINVAL, f"VM property {k!r}={v!r} is not a string pair")
    return json.dumps(props, sort_keys=True)


def _one_target(target_vm: int | None, target_alias: int | None, what: str) -> None:
    if (target_vm is None) == (target_alias is None):
        raise VmtreeError(
            errno.EINVAL,
            f"{what}: an alias names exactly one VM or alias "
            f"(got VM {target_vm}, alias {target_alias})",
        )


class Txn:
    """The writes of one transaction; valid only inside ``with store.transaction()``."""

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
            err = _error(e, what)
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

    # VMs

    def insert_vm(
        self,
        name: str,
        created: float,
        origin_id: int | None = None,
        props: dict[str, str] | None = None,
    ) -> int:
        cur = self._run(
            "INSERT INTO vms (name, created, origin_id, props) VALUES (?, ?, ?, ?)",
            (name, created, origin_id, _props_json(props or {})),
            f"insert VM {name!r}",
            exists=f"a VM named {name!r} already exists",
            missing=f"origin VM {origin_id} of {name!r} does not exist",
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def rename_vm(self, vm_id: int, new_name: str) -> None:
        cur = self._run(
            "UPDATE vms SET name = ? WHERE id = ?",
            (new_name, vm_id),
            f"rename VM {vm_id} to {new_name!r}",
            exists=f"a VM named {new_name!r} already exists",
        )
        self._one_row(cur, f"no VM with id {vm_id} to rename")

    def set_vm_origin(self, vm_id: int, origin_id: int | None) -> None:
        """Set or clear the VM a VM was cloned from.

        A loop of origins is refused (EINVAL); to reverse a clone relationship,
        clear the old origin before setting the new one.
        """
        if origin_id is not None:
            loop = self._run(
                "WITH RECURSIVE chain(id) AS ("
                "SELECT id FROM vms WHERE id = ? "
                "UNION SELECT vms.origin_id FROM vms JOIN chain ON vms.id = chain.id "
                "WHERE vms.origin_id IS NOT NULL) "
                "SELECT 1 FROM chain WHERE id = ?",
                (origin_id, vm_id),
                f"follow the origins of VM {origin_id}",
            ).fetchone()
            if loop is not None:
                raise VmtreeError(
                    errno.EINVAL,
                    f"VM {origin_id} cannot be the origin of VM {vm_id}: "
                    f"it is VM {vm_id} or descends from it",
                )
        cur = self._run(
            "UPDATE vms SET origin_id = ? WHERE id = ?",
            (origin_id, vm_id),
            f"set origin of VM {vm_id} to {origin_id}",
            missing=f"origin VM {origin_id} of VM {vm_id} does not exist",
        )
        self._one_row(cur, f"no VM with id {vm_id} to set the origin of")

    def set_vm_props(self, vm_id: int, props: dict[str, str]) -> None:
        cur = self._run(
            "UPDATE vms SET props = ? WHERE id = ?",
            (_props_json(props), vm_id),
            f"set properties of VM {vm_id}",
        )
        self._one_row(cur, f"no VM with id {vm_id} to set properties on")

    def delete_vm(self, vm_id: int) -> None:
        """Delete a VM and (by cascade) its volume rows; its clones lose their origin.

        EBUSY, and nothing deleted, while an alias names the VM: delete or
        re-target the aliases first, in the same transaction.
        """
        cur = self._run(
            "DELETE FROM vms WHERE id = ?",
            (vm_id,),
            f"delete VM {vm_id}",
            in_use=lambda: (
                f"VM {vm_id} is still named by alias {self._alias_names('target_vm', vm_id)}, "
                "a template link or its versions; delete or re-target them first"
            ),
        )
        self._one_row(cur, f"no VM with id {vm_id} to delete")

    def set_domain_xml(self, vm_id: int, xml: str | None) -> None:
        """A VM's base description; None goes back to the default."""
        if xml is None:
            self._run("DELETE FROM domains WHERE vm_id = ?", (vm_id,), "reset domain.xml")
            return
        self._run(
            "INSERT INTO domains (vm_id, xml) VALUES (?, ?) "
            "ON CONFLICT (vm_id) DO UPDATE SET xml = excluded.xml",
            (vm_id, xml),
            f"store domain.xml of VM {vm_id}",
            missing=f"no VM with id {vm_id} to store domain.xml for",
        )

    # Savestates

    def insert_savestate(
        self,
        vm_id: int,
        label: str,
        created: float,
        image: str,
        info: dict[str, Any],
        volumes: dict[str, tuple[int, int]],
    ) -> int:
        cur = self._run(
            "INSERT INTO savestates (vm_id, label, created, image, info) VALUES (?, ?, ?, ?, ?)",
            (vm_id, label, created, image, json.dumps(info, sort_keys=True)),
            f"record savestate {label!r} of VM {vm_id}",
            exists=f"VM {vm_id} already has a savestate {label!r}",
            missing=f"no VM with id {vm_id} to record a savestate of",
        )
        assert cur.lastrowid is not None
        for name, (vol_id, size) in volumes.items():
            self._run(
                "INSERT INTO savestate_volumes (savestate_id, name, vol_id, size) "
                "VALUES (?, ?, ?, ?)",
                (cur.lastrowid, name, vol_id, size),
                f"record volume {name!r} of savestate {label!r}",
            )
        return cur.lastrowid

    def delete_savestate(self, savestate_id: int) -> None:
        cur = self._run(
            "DELETE FROM savestates WHERE id = ?", (savestate_id,), "delete a savestate"
        )
        self._one_row(cur, f"no savestate with id {savestate_id} to delete")

    # Versions and templates

    def insert_version(self, vm_id: int, head_id: int, number: int) -> None:
        self._run(
            "INSERT INTO versions (vm_id, head_id, number) VALUES (?, ?, ?)",
            (vm_id, head_id, number),
            f"record VM {vm_id} as version {number} of VM {head_id}",
            exists=f"VM {head_id} already has a version {number}",
            missing=f"no VM {vm_id} or head {head_id} to record a version of",
        )

    def forget_version(self, vm_id: int) -> None:
        """The VM stays, as a VM of its own: it is no longer a version."""
        self._run("DELETE FROM versions WHERE vm_id = ?", (vm_id,), f"forget version {vm_id}")

    def set_template(
        self, vm_id: int, target_vm: int | None, target_alias: int | None, used: int | None = None
    ) -> None:
        """Set (or with no target, clear) a VM's template link."""
        if target_vm is None and target_alias is None:
            self._run("DELETE FROM templates WHERE vm_id = ?", (vm_id,), "clear a template")
            return
        what = f"set the template of VM {vm_id}"
        _one_target(target_vm, target_alias, what)
        self._require_target(target_vm, target_alias, f"the template of VM {vm_id}")
        self._run(
            "INSERT INTO templates (vm_id, target_vm, target_alias, used) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (vm_id) DO UPDATE SET target_vm = excluded.target_vm, "
            "target_alias = excluded.target_alias, used = excluded.used",
            (vm_id, target_vm, target_alias, used),
            what,
            missing=f"no VM with id {vm_id} to set the template of",
        )

    def set_template_used(self, vm_id: int, used: int | None) -> None:
        self._run(
            "UPDATE templates SET used = ? WHERE vm_id = ?",
            (used, vm_id),
            f"record the template version VM {vm_id} started from",
        )

    # Aliases

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
        _one_target(target_vm, target_alias, what)
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
        _one_target(target_vm, target_alias, what)
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

    def _require_target(self, target_vm: int | None, target_alias: int | None, of: str) -> None:
        # Checked explicitly, not left to the foreign key, so the reason names
        # the missing row and an alias cannot name itself by guessing its new id.
        if target_vm is not None and not self._exists("vms", target_vm):
            raise VmtreeError(errno.ENOENT, f"target VM {target_vm} of {of} does not exist")
        if target_alias is not None and not self._exists("aliases", target_alias):
            raise VmtreeError(errno.ENOENT, f"target alias {target_alias} of {of} does not exist")

    # Volumes

    def allocate_volume_ids(self, count: int) -> list[int]:
        """Reserve ids durably, with the rest of the transaction: no crash hands one out twice."""
        if count < 0:
            raise ValueError(f"cannot allocate {count} volume ids")
        if count == 0:
            return []
        cur = self._run(
            "UPDATE counters SET value = value + ? WHERE name = 'volume_id' RETURNING value",
            (count,),
            "allocate volume ids",
        )
        row = cur.fetchone()
        cur.fetchall()  # finish the statement
        if row is None:
            raise VmtreeError(errno.EIO, "the store has no volume id counter; run fsck")
        last = int(row[0])
        return list(range(last - count + 1, last + 1))

    def next_number(self, counter: str) -> int:
        """The next of a named sequence (1, 2, ...): numbers are never handed out twice,
        also after the names that carried them are gone."""
        self._run(
            "INSERT OR IGNORE INTO counters (name, value) VALUES (?, 0)",
            (counter,),
            f"start counter {counter!r}",
        )
        cur = self._run(
            "UPDATE counters SET value = value + 1 WHERE name = ? RETURNING value",
            (counter,),
            f"advance counter {counter!r}",
        )
        row = cur.fetchone()
        cur.fetchall()
        assert row is not None
        return int(row[0])

    def insert_volume(
        self, vol_id: int, vm_id: int, name: str, size: int, policy: str, created: float
    ) -> None:
        self._run(
            "INSERT INTO volumes (id, vm_id, name, size, policy, created) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (vol_id, vm_id, name, size, policy, created),
            f"insert volume {vol_id} {name!r} of VM {vm_id}",
            exists=f"VM {vm_id} already has a volume named {name!r} or volume id {vol_id} "
            "is in use",
            missing=f"no VM with id {vm_id} to add volume {name!r} to",
        )
        # An id that did not come from allocate_volume_ids (an import by fsck)
        # must still never be handed out later.
        self._run(
            "UPDATE counters SET value = max(value, ?) WHERE name = 'volume_id'",
            (vol_id,),
            "advance the volume id counter",
        )

    def set_volume_size(self, vol_id: int, size: int) -> None:
        cur = self._run(
            "UPDATE volumes SET size = ? WHERE id = ?",
            (size, vol_id),
            f"set size of volume {vol_id} to {size}",
        )
        self._one_row(cur, f"no volume with id {vol_id} to resize")

    def set_volume_policy(self, vol_id: int, policy: str) -> None:
        cur = self._run(
            "UPDATE volumes SET policy = ? WHERE id = ?",
            (policy, vol_id),
            f"set policy of volume {vol_id} to {policy!r}",
        )
        self._one_row(cur, f"no volume with id {vol_id} to set the policy of")

    def rename_volume(self, vol_id: int, new_name: str) -> None:
        cur = self._run(
            "UPDATE volumes SET name = ? WHERE id = ?",
            (new_name, vol_id),
            f"rename volume {vol_id} to {new_name!r}",
            exists=f"the VM of volume {vol_id} already has a volume named {new_name!r}",
        )
        self._one_row(cur, f"no volume with id {vol_id} to rename")

    def delete_volume(self, vol_id: int) -> None:
        cur = self._run("DELETE FROM volumes WHERE id = ?", (vol_id,), f"delete volume {vol_id}")
        self._one_row(cur, f"no volume with id {vol_id} to delete")

    # Intent journal

    def begin_intent(self, kind: str, payload: dict[str, Any]) -> int:
        cur = self._run(
            "INSERT INTO intents (kind, payload, created) VALUES (?, ?, ?)",
            (kind, json.dumps(payload, sort_keys=True), time.time()),
            f"record {kind} intent",
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def complete_intent(self, intent_id: int) -> None:
        """Close an intent; completing one twice is harmless, so recovery may retry.

        Completed intents are kept for fsck and post-mortems, but only the
        newest INTENTS_KEPT of them.
        """
        cur = self._run(
            "UPDATE intents SET completed = ? WHERE id = ? AND completed IS NULL",
            (time.time(), intent_id),
            f"complete intent {intent_id}",
        )
        if cur.rowcount == 0:
            known = self._run(
                "SELECT 1 FROM intents WHERE id = ?", (intent_id,), f"look up intent {intent_id}"
            ).fetchone()
            if known is None:
                raise VmtreeError(errno.ENOENT, f"no intent with id {intent_id} to complete")
            return
        self._run(
            "DELETE FROM intents WHERE completed IS NOT NULL AND id < ("
            "SELECT id FROM intents WHERE completed IS NOT NULL ORDER BY id DESC "
            "LIMIT 1 OFFSET ?)",
            (INTENTS_KEPT - 1,),
            "prune completed intents",
        )

    def set_engine_state(
        self, meta: Mapping[str, str | None], sizes: Mapping[int, int | None]
    ) -> None:
        for key, value in meta.items():
            if value is None:
                self._run("DELETE FROM engine_meta WHERE key = ?", (key,), "engine state")
            else:
                self._run(
                    "INSERT INTO engine_meta (key, value) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, value),
                    "engine state",
                )
        for vol_id, size in sizes.items():
            if size is None:
                self._run("DELETE FROM engine_volumes WHERE id = ?", (vol_id,), "engine state")
            else:
                self._run(
                    "INSERT INTO engine_volumes (id, size) VALUES (?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET size = excluded.size",
                    (vol_id, size),
                    "engine state",
                )

    # Miscellany

    def set_meta(self, key: str, value: str) -> None:
        self._run(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
            f"set meta {key!r}",
        )

    def add_event(self, time: float, line: str) -> None:
        """Record an operation for ``.vmtree/events``; only the newest EVENTS_KEPT stay."""
        self._run("INSERT INTO events (time, line) VALUES (?, ?)", (time, line), "record event")
        self._run(
            "DELETE FROM events WHERE id <= ("
            "SELECT id FROM events ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (EVENTS_KEPT,),
            "trim events",
        )


class Store:
    """The open metadata store. Every method blocks; call it from a worker thread."""

    #: MIGRATIONS[i] takes the schema from version i to i + 1.
    MIGRATIONS: ClassVar[tuple[str, ...]] = (
        _SCHEMA_V1,
        _SCHEMA_V2,
        _SCHEMA_V3,
        _SCHEMA_V4,
        _SCHEMA_V5,
        _SCHEMA_V6,
    )
    SCHEMA_VERSION: ClassVar[int] = len(MIGRATIONS)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.SCHEMA_VERSION = len(cls.MIGRATIONS)

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        """Use :meth:`open`; this only wraps an already prepared connection."""
        self.path = path
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.Lock()
        self._owner: int | None = None

    # Opening and closing

    @classmethod
    def open(cls, path: Path) -> Store:
        """Open (creating if missing) and migrate the store at ``path`` (``SOURCE/vmtree.db``)."""
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
            raise cls._open_error(path, e) from e
        try:
            cls._prepare(conn, path)
        except sqlite3.Error as e:
            conn.close()
            raise cls._open_error(path, e) from e
        except BaseException:
            conn.close()
            raise
        return cls(path, conn)

    @staticmethod
    def _open_error(path: Path, e: sqlite3.Error) -> VmtreeError:
        err = _error(e, f"cannot open store {path}")
        if err.errno == errno.EACCES and not os.access(path.parent, os.W_OK):
            # WAL needs to create -wal and -shm files next to the database.
            return VmtreeError(err.errno, f"{err.reason} ({path.parent} is not writable)")
        if err.errno == errno.EINVAL:
            return VmtreeError(err.errno, f"{path} is not a vmtreefs store: {e}")
        return err

    @classmethod
    def _prepare(cls, conn: sqlite3.Connection, path: Path) -> None:
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
                for statement in _statements(cls.MIGRATIONS[version]):
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
                raise _error(e, "begin a store transaction") from e
            txn = Txn(conn)
            try:
                yield txn
                txn._active = False
                conn.execute("COMMIT")
            except BaseException as e:
                txn._active = False
                _rollback(conn)
                if isinstance(e, sqlite3.Error):
                    raise _error(e, "commit a store transaction") from e
                raise

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
                raise _error(e, "read the store") from e
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
                raise _error(e, f"read pragma {name}") from e
        return None if row is None else row[0]


def _rollback(conn: sqlite3.Connection) -> None:
    if not conn.in_transaction:
        return
    try:
        conn.rollback()
    except sqlite3.Error as e:
        # The original exception matters more; SQLite rolls back on close anyway.
        log.error("store rollback failed: %s", e)


def _statements(script: str) -> Iterator[str]:
    """Split a migration script into statements (each must end at the end of a line).

    ``executescript`` would COMMIT first and so break the migration's
    transaction; executing statement by statement keeps the script and its
    version bump atomic.
    """
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            if pending.strip():
                yield pending.strip()
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete statement at the end of a migration: {pending.strip()!r}")
