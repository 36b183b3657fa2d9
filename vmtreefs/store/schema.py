"""The store's schema, as the migrations that build it, and the file's constants.

``MIGRATIONS[i]`` takes the schema from version i to i + 1; a store is always
made by running them all, so a new and an upgraded store cannot differ.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

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
# (a thin device has no size of its own). See engine/dmthin/ledger.py.
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


MIGRATIONS: tuple[str, ...] = (
    _SCHEMA_V1,
    _SCHEMA_V2,
    _SCHEMA_V3,
    _SCHEMA_V4,
    _SCHEMA_V5,
    _SCHEMA_V6,
)


def statements(script: str) -> Iterator[str]:
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
