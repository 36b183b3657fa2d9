"""The metadata store: schema, migrations, id allocation, atomicity, durability, threads."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
)

from vmtreefs.errors import VmtreeError
from vmtreefs.store import (
    APPLICATION_ID,
    DB_FILENAME,
    EVENTS_KEPT,
    INTENTS_KEPT,
    AliasRow,
    Snapshot,
    Store,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / DB_FILENAME


@pytest.fixture
def store(db: Path) -> Iterator[Store]:
    s = Store.open(db)
    yield s
    s.close()


def raw(db: Path) -> sqlite3.Connection:
    """A second, independent connection: what another process would see."""
    return sqlite3.connect(db, isolation_level=None)


def run_child(
    script: str, *args: str, prefix: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(prefix or []), sys.executable, "-c", textwrap.dedent(script), *args],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def user_meta(snap: Snapshot) -> dict[str, str]:
    """The meta keys a test wrote: the store adds its own tree_id."""
    assert len(snap.meta.get("tree_id", "")) == 8
    return {k: v for k, v in snap.meta.items() if k != "tree_id"}


# Schema and pragmas


def test_fresh_store_has_the_current_schema(store: Store, db: Path) -> None:
    assert Store.SCHEMA_VERSION == len(Store.MIGRATIONS) == 6
    assert store.pragma("user_version") == Store.SCHEMA_VERSION
    assert store.pragma("application_id") == APPLICATION_ID
    assert store.pragma("journal_mode") == "wal"
    assert store.pragma("synchronous") == 2  # FULL
    assert store.pragma("foreign_keys") == 1
    with raw(db) as other:
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        tables = {r[0] for r in other.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"meta", "vms", "volumes", "counters", "intents", "events", "aliases"} <= tables


def test_fresh_store_is_empty_and_sound(store: Store) -> None:
    snap = store.load()
    assert (snap.vms, snap.volumes, snap.open_intents, user_meta(snap)) == ([], [], [], {})
    assert snap.aliases == []
    assert store.integrity_check() == []
    assert store.recent_events() == []


def test_pragma_helper_only_reads(store: Store) -> None:
    with pytest.raises(ValueError):
        store.pragma("user_version = 7")
    assert store.pragma("user_version") == Store.SCHEMA_VERSION


# Migrations and refusals


def test_empty_version_0_database_is_migrated(db: Path) -> None:
    with raw(db) as c:
        c.execute("PRAGMA user_version = 0")
        c.execute("VACUUM")  # make it a real, non-empty database file
    assert db.stat().st_size > 0
    with Store.open(db) as s:
        assert s.pragma("user_version") == Store.SCHEMA_VERSION
        with s.transaction() as tx:
            assert tx.allocate_volume_ids(2) == [1, 2]


_NEXT = """
CREATE TABLE tags (
    name TEXT PRIMARY KEY,
    vm_id INTEGER NOT NULL REFERENCES vms(id) ON DELETE CASCADE
);
INSERT INTO meta (key, value) VALUES ('migrated', 'next');
"""


class FutureStore(Store):
    MIGRATIONS: ClassVar[tuple[str, ...]] = (*Store.MIGRATIONS, _NEXT)


class V1Store(Store):
    """The store of the previous release: only the first migration."""

    MIGRATIONS: ClassVar[tuple[str, ...]] = Store.MIGRATIONS[:1]


class BrokenFutureStore(Store):
    MIGRATIONS: ClassVar[tuple[str, ...]] = (
        *Store.MIGRATIONS,
        "CREATE TABLE half_done (x INTEGER);\nINSERT INTO no_such_table VALUES (1);\n",
    )


def test_pending_migrations_run_and_keep_data(db: Path) -> None:
    with Store.open(db) as s, s.transaction() as tx:
        tx.insert_vm("keep", 1.0)
    assert FutureStore.SCHEMA_VERSION == Store.SCHEMA_VERSION + 1
    with FutureStore.open(db) as s:
        assert s.pragma("user_version") == FutureStore.SCHEMA_VERSION
        assert [v.name for v in s.load().vms] == ["keep"]
        assert s.get_meta("migrated") == "next"
    with raw(db) as c:
        assert c.execute("SELECT count(*) FROM tags").fetchone() == (0,)


def test_v1_store_upgrades_to_current_in_place_keeping_its_data(db: Path) -> None:
    with V1Store.open(db) as s:
        with s.transaction() as tx:
            base = tx.insert_vm("base", 1.0, props={"template": "1"})
            clone = tx.insert_vm("clone", 2.0, origin_id=base)
            gone = tx.insert_vm("gone", 3.0)
            v1, v2, v3 = tx.allocate_volume_ids(3)
            tx.insert_volume(v1, base, "root", 512, "persistent", 1.0)
            tx.insert_volume(v2, clone, "root", 512, "cow", 2.0)
            intent = tx.begin_intent("create", {"what": "mkdir clone"})
            tx.set_meta("engine", "reflink")
            tx.add_event(2.0, "mkdir clone")
        with s.transaction() as tx:
            tx.delete_vm(gone)
    with raw(db) as c:
        assert c.execute("PRAGMA user_version").fetchone() == (1,)
        assert c.execute("SELECT 1 FROM sqlite_master WHERE name = 'aliases'").fetchone() is None

    with Store.open(db) as s:
        assert s.pragma("user_version") == Store.SCHEMA_VERSION
        assert s.load_engine_state() == ({}, {})
        snap = s.load()
        assert [(v.id, v.name, v.created, v.origin_id, v.props) for v in snap.vms] == [
            (base, "base", 1.0, None, {"template": "1"}),
            (clone, "clone", 2.0, base, {}),
        ]
        assert [(v.id, v.vm_id, v.name, v.policy) for v in snap.volumes] == [
            (v1, base, "root", "persistent"),
            (v2, clone, "root", "cow"),
        ]
        assert [i.id for i in snap.open_intents] == [intent]
        assert user_meta(snap) == {"engine": "reflink"}
        assert snap.aliases == []
        assert s.recent_events() == [(2.0, "mkdir clone")]
        assert s.integrity_check() == []
        with s.transaction() as tx:
            # The id counters carry on from where version 1 left them.
            assert tx.insert_vm("new", 4.0) > gone
            assert tx.allocate_volume_ids(1) == [v3 + 1]
            alias = tx.insert_alias("latest", clone, None, 4.0)
        assert s.load().aliases == [AliasRow(alias, "latest", clone, None, False, 4.0)]
    with Store.open(db) as s:  # already current: opening again changes nothing
        assert s.pragma("user_version") == Store.SCHEMA_VERSION
        assert [a.name for a in s.load().aliases] == ["latest"]


def test_a_new_store_logs_one_line_and_an_upgrade_logs_each_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What an administrator reads in the log: one line for a new store, a line per upgrade."""
    now = Store.SCHEMA_VERSION

    def store_lines() -> list[str]:
        lines = [r.getMessage() for r in caplog.records if r.name == "vmtreefs.store"]
        caplog.clear()
        return lines

    new, old = tmp_path / "new.db", tmp_path / "old.db"
    with caplog.at_level("INFO", logger="vmtreefs.store"):
        Store.open(new).close()
        assert store_lines() == [f"store {new}: created store, schema v{now}"]
        Store.open(new).close()
        assert store_lines() == []
        V1Store.open(old).close()
        assert store_lines() == [f"store {old}: created store, schema v1"]
        Store.open(old).close()
        assert store_lines() == [
            f"store {old}: schema migrated to version {v}" for v in range(2, now + 1)
        ]


def test_snapshot_aliases_default_to_empty() -> None:
    assert Snapshot([], [], [], {}).aliases == []


def test_newer_schema_is_refused(db: Path) -> None:
    FutureStore.open(db).close()
    with pytest.raises(VmtreeError) as e:
        Store.open(db)
    assert e.value.errno == errno.EINVAL
    now = Store.SCHEMA_VERSION
    assert e.value.reason == f"store schema version {now + 1} is newer than this vmtreefs ({now})"


def test_failed_migration_leaves_the_old_version(db: Path) -> None:
    Store.open(db).close()
    with pytest.raises(VmtreeError) as e:
        BrokenFutureStore.open(db)
    assert "no_such_table" in e.value.reason
    with raw(db) as c:
        assert c.execute("PRAGMA user_version").fetchone() == (Store.SCHEMA_VERSION,)
        assert c.execute("SELECT name FROM sqlite_master WHERE name='half_done'").fetchone() is None
    Store.open(db).close()


def test_not_a_database_is_refused(db: Path) -> None:
    db.write_bytes(b"this is not an SQLite database, just some text\n" * 100)
    with pytest.raises(VmtreeError) as e:
        Store.open(db)
    assert e.value.errno == errno.EINVAL
    assert "not a vmtreefs store" in e.value.reason


def test_another_programs_database_is_refused(db: Path) -> None:
    with raw(db) as c:
        c.execute("CREATE TABLE theirs (x)")
    with pytest.raises(VmtreeError) as e:
        Store.open(db)
    assert e.value.errno == errno.EINVAL
    with raw(db) as c:
        assert c.execute("SELECT count(*) FROM sqlite_master").fetchone() == (1,)


def test_foreign_application_id_is_refused(db: Path) -> None:
    with raw(db) as c:
        c.execute("PRAGMA application_id = 1234")
        c.execute("PRAGMA user_version = 1")
    with pytest.raises(VmtreeError) as e:
        Store.open(db)
    assert e.value.errno == errno.EINVAL


def test_missing_directory_and_directory_path(tmp_path: Path) -> None:
    with pytest.raises(VmtreeError) as e:
        Store.open(tmp_path / "nope" / DB_FILENAME)
    assert e.value.errno == errno.ENOENT
    with pytest.raises(VmtreeError) as e:
        Store.open(tmp_path)
    assert e.value.errno == errno.EISDIR


def _unprivileged_prefix() -> list[str]:
    """Root ignores permission bits; drop the capabilities that let it."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"]


@pytest.mark.parametrize("case", ["new file", "existing file", "read-only file"])
def test_unwritable_store_gives_eacces_at_open(tmp_path: Path, case: str) -> None:
    source = tmp_path / "source"
    source.mkdir()
    db = source / DB_FILENAME
    if case != "new file":
        Store.open(db).close()
    if case == "read-only file":
        db.chmod(0o444)
    else:
        source.chmod(0o555)
    try:
        child = run_child(
            """
            import json, sqlite3, sys
            from pathlib import Path
            from vmtreefs.errors import VmtreeError
            from vmtreefs.store import Store
            try:
                Store.open(Path(sys.argv[1])).close()
            except VmtreeError as e:
                print(json.dumps([e.errno, e.reason]))
            except sqlite3.Error as e:
                print(json.dumps(["raw", repr(e)]))
            else:
                print(json.dumps(["opened", ""]))
            """,
            str(db),
            prefix=_unprivileged_prefix(),
        )
    finally:
        source.chmod(0o755)
    assert child.returncode == 0, child.stderr
    err, reason = json.loads(child.stdout)
    assert err == errno.EACCES, reason
    assert str(source) in reason


# Ids


def test_vm_ids_are_never_reused(db: Path) -> None:
    with Store.open(db) as s:
        with s.transaction() as tx:
            a = tx.insert_vm("a", 1.0)
            b = tx.insert_vm("b", 1.0)
        with s.transaction() as tx:
            tx.delete_vm(b)
            c = tx.insert_vm("b", 2.0)
        assert a < b < c
        with s.transaction() as tx:
            tx.delete_vm(c)
    with Store.open(db) as s, s.transaction() as tx:
        d = tx.insert_vm("b", 3.0)
    assert d > c


def test_volume_ids_are_never_reused(db: Path) -> None:
    with Store.open(db) as s:
        with s.transaction() as tx:
            vm = tx.insert_vm("a", 1.0)
            ids = tx.allocate_volume_ids(3)
            assert ids == [1, 2, 3]
            for i, vol_id in enumerate(ids):
                tx.insert_volume(vol_id, vm, f"v{i}", 4096, "persistent", 1.0)
        with s.transaction() as tx:
            tx.delete_vm(vm)
            assert tx.allocate_volume_ids(0) == []
            assert tx.allocate_volume_ids(1) == [4]
        assert s.load().volumes == []
    with Store.open(db) as s, s.transaction() as tx:
        assert tx.allocate_volume_ids(2) == [5, 6]
        with pytest.raises(ValueError):
            tx.allocate_volume_ids(-1)


def test_imported_volume_id_advances_the_counter(store: Store) -> None:
    with store.transaction() as tx:
        vm = tx.insert_vm("a", 1.0)
        tx.insert_volume(41, vm, "root", 512, "persistent", 1.0)
        assert tx.allocate_volume_ids(1) == [42]


# Atomicity


class Boom(Exception):
    pass


def test_exception_rolls_back_everything(store: Store) -> None:
    with store.transaction() as tx:
        tx.add_event(1.0, "before")
    with pytest.raises(Boom), store.transaction() as tx:
        vm = tx.insert_vm("a", 1.0)
        (vol_id,) = tx.allocate_volume_ids(1)
        tx.insert_volume(vol_id, vm, "root", 512, "persistent", 1.0)
        tx.begin_intent("create", {"volumes": [vol_id]})
        tx.set_meta("engine", "reflink")
        tx.add_event(2.0, "inside")
        raise Boom
    snap = store.load()
    assert (snap.vms, snap.volumes, snap.open_intents, user_meta(snap)) == ([], [], [], {})
    assert store.recent_events() == [(1.0, "before")]
    with store.transaction() as tx:
        # The rolled-back allocation was never durable, so nothing can hold id 1.
        assert tx.allocate_volume_ids(1) == [1]


def test_refusal_inside_a_transaction_rolls_back_its_earlier_writes(store: Store) -> None:
    with store.transaction() as tx:
        tx.insert_vm("a", 1.0)
    with pytest.raises(VmtreeError), store.transaction() as tx:
        tx.insert_vm("b", 1.0)
        tx.insert_vm("a", 1.0)
    assert [v.name for v in store.load().vms] == ["a"]


def test_txn_is_dead_after_its_block(store: Store) -> None:
    with store.transaction() as tx:
        pass
    with pytest.raises(RuntimeError):
        tx.insert_vm("late", 1.0)


def test_reentering_the_store_fails_instead_of_deadlocking(store: Store) -> None:
    with pytest.raises(RuntimeError), store.transaction():
        store.load()
    assert store.load().vms == []


def test_closed_store_refuses(db: Path) -> None:
    s = Store.open(db)
    s.close()
    s.close()
    with pytest.raises(VmtreeError) as e:
        s.load()
    assert e.value.errno == errno.EIO


# Rows, conflicts and missing rows


def test_rows_round_trip(store: Store) -> None:
    with store.transaction() as tx:
        base = tx.insert_vm("base", 10.5, props={"template": "1"})
        clone = tx.insert_vm("clone", 11.0, origin_id=base)
        (v,) = tx.allocate_volume_ids(1)
        tx.insert_volume(v, clone, "root", 1 << 30, "cow", 11.0)
        tx.set_meta("engine", "dmthin")
        tx.set_meta("engine", "reflink")
    snap = store.load()
    assert [(r.id, r.name, r.created, r.origin_id, r.props) for r in snap.vms] == [
        (base, "base", 10.5, None, {"template": "1"}),
        (clone, "clone", 11.0, base, {}),
    ]
    (vol,) = snap.volumes
    assert (vol.id, vol.vm_id, vol.name, vol.size, vol.policy, vol.created) == (
        v,
        clone,
        "root",
        1 << 30,
        "cow",
        11.0,
    )
    assert user_meta(snap) == {"engine": "reflink"}
    assert store.get_meta("engine") == "reflink"
    assert store.get_meta("missing") is None

    with store.transaction() as tx:
        tx.rename_vm(clone, "renamed")
        tx.rename_vm(clone, "renamed")  # to its own name: a no-op, not a conflict
        tx.set_vm_props(clone, {"b": "2", "a": "1"})
        tx.rename_volume(v, "private")
        tx.set_volume_size(v, 2 << 30)
    snap = store.load()
    assert snap.vms[1].name == "renamed" and snap.vms[1].props == {"a": "1", "b": "2"}
    assert (snap.volumes[0].name, snap.volumes[0].size) == ("private", 2 << 30)

    with store.transaction() as tx:
        tx.delete_vm(base)
    snap = store.load()
    assert [(r.name, r.origin_id) for r in snap.vms] == [("renamed", None)]
    assert len(snap.volumes) == 1


def test_delete_vm_cascades_to_its_volumes(store: Store) -> None:
    with store.transaction() as tx:
        a = tx.insert_vm("a", 1.0)
        b = tx.insert_vm("b", 1.0)
        ids = tx.allocate_volume_ids(3)
        tx.insert_volume(ids[0], a, "root", 1, "p", 1.0)
        tx.insert_volume(ids[1], a, "private", 1, "p", 1.0)
        tx.insert_volume(ids[2], b, "root", 1, "p", 1.0)
    with store.transaction() as tx:
        tx.delete_vm(a)
    assert [(v.id, v.vm_id) for v in store.load().volumes] == [(ids[2], b)]
    assert store.integrity_check() == []


def _expect(err: int, fn: object, *args: object) -> VmtreeError:
    with pytest.raises(VmtreeError) as e:
        fn(*args)  # type: ignore[operator]
    assert e.value.errno == err, e.value.reason
    return e.value


def test_duplicates_are_eexist(store: Store) -> None:
    with store.transaction() as tx:
        a = tx.insert_vm("a", 1.0)
        b = tx.insert_vm("b", 1.0)
        v1, v2, v3 = tx.allocate_volume_ids(3)
        tx.insert_volume(v1, a, "root", 1, "p", 1.0)
        tx.insert_volume(v2, a, "private", 1, "p", 1.0)
        tx.insert_volume(v3, b, "root", 1, "p", 1.0)  # same name, other VM: fine
        e = _expect(errno.EEXIST, tx.insert_vm, "a", 2.0)
        assert "'a'" in e.reason
        _expect(errno.EEXIST, tx.rename_vm, b, "a")
        _expect(errno.EEXIST, tx.insert_volume, 99, a, "root", 1, "p", 1.0)
        _expect(errno.EEXIST, tx.insert_volume, v3, a, "other", 1, "p", 1.0)
        _expect(errno.EEXIST, tx.rename_volume, v2, "root")
    # Refusals caught inside the block leave the rest of the transaction intact.
    assert len(store.load().volumes) == 3


def test_missing_rows_are_enoent(store: Store) -> None:
    with store.transaction() as tx:
        _expect(errno.ENOENT, tx.rename_vm, 7, "x")
        _expect(errno.ENOENT, tx.set_vm_props, 7, {})
        _expect(errno.ENOENT, tx.delete_vm, 7)
        _expect(errno.ENOENT, tx.set_volume_size, 7, 1)
        _expect(errno.ENOENT, tx.rename_volume, 7, "x")
        _expect(errno.ENOENT, tx.delete_volume, 7)
        _expect(errno.ENOENT, tx.complete_intent, 7)
        _expect(errno.ENOENT, tx.insert_volume, 1, 7, "root", 1, "p", 1.0)
        _expect(errno.ENOENT, tx.insert_vm, "clone", 1.0, 7)


def test_bad_values_are_einval(store: Store) -> None:
    with store.transaction() as tx:
        vm = tx.insert_vm("a", 1.0)
        _expect(errno.EINVAL, tx.insert_volume, 1, vm, "root", -1, "p", 1.0)
        _expect(errno.EINVAL, tx.set_vm_props, vm, {"k": 1})


# Aliases, origins and policies (schema version 2)


def test_alias_rows_round_trip(store: Store) -> None:
    with store.transaction() as tx:
        vm = tx.insert_vm("vm", 1.0)
        a = tx.insert_alias("a", vm, None, 2.5)
        b = tx.insert_alias("b", None, a, 3.0, system=True)
    assert store.load().aliases == [
        AliasRow(a, "a", vm, None, False, 2.5),
        AliasRow(b, "b", None, a, True, 3.0),
    ]
    with store.transaction() as tx:
        tx.rename_alias(a, "first")
        tx.rename_alias(a, "first")  # to its own name: a no-op, not a conflict
        tx.rename_vm(vm, "renamed")  # aliases name the id, so nothing else changes
    snap = store.load()
    assert [(r.id, r.name, r.target_vm, r.target_alias) for r in snap.aliases] == [
        (a, "first", vm, None),
        (b, "b", None, a),
    ]
    with store.transaction() as tx:
        tx.delete_alias(b)
        tx.delete_alias(a)
        tx.delete_vm(vm)
    assert store.load().aliases == []
    assert store.integrity_check() == []


def test_alias_refusals(store: Store) -> None:
    with store.transaction() as tx:
        vm = tx.insert_vm("vm", 1.0)
        a = tx.insert_alias("a", vm, None, 1.0)
        e = _expect(errno.EEXIST, tx.insert_alias, "a", vm, None, 1.0)
        assert "'a'" in e.reason
        b = tx.insert_alias("b", None, a, 1.0)
        _expect(errno.EEXIST, tx.rename_alias, b, "a")
        for targets in [(None, None), (vm, a)]:
            _expect(errno.EINVAL, tx.insert_alias, "c", *targets, 1.0)
            _expect(errno.EINVAL, tx.retarget_alias, a, *targets)
        e = _expect(errno.ENOENT, tx.insert_alias, "c", 99, None, 1.0)
        assert "VM 99" in e.reason
        e = _expect(errno.ENOENT, tx.insert_alias, "c", None, 99, 1.0)
        assert "alias 99" in e.reason
        # The id the next alias would get does not exist yet: no alias names itself.
        _expect(errno.ENOENT, tx.insert_alias, "c", None, b + 1, 1.0)
        _expect(errno.ENOENT, tx.rename_alias, 99, "x")
        _expect(errno.ENOENT, tx.retarget_alias, 99, vm, None)
        _expect(errno.ENOENT, tx.retarget_alias, a, 99, None)
        _expect(errno.ENOENT, tx.retarget_alias, a, None, 99)
        _expect(errno.ENOENT, tx.delete_alias, 99)
    # Refusals caught inside the block left the rest of the transaction intact.
    assert [(r.id, r.name) for r in store.load().aliases] == [(a, "a"), (b, "b")]


def test_alias_chains_retarget_and_loops(store: Store) -> None:
    with store.transaction() as tx:
        vm1 = tx.insert_vm("vm1", 1.0)
        vm2 = tx.insert_vm("vm2", 1.0)
        a = tx.insert_alias("a", vm1, None, 1.0)
        b = tx.insert_alias("b", None, a, 1.0)
        c = tx.insert_alias("c", None, b, 1.0)
    with store.transaction() as tx:
        tx.retarget_alias(b, vm2, None)  # c -> b -> vm2 now
        tx.retarget_alias(a, None, c)  # a -> c -> b -> vm2
    targets = {r.name: (r.target_vm, r.target_alias) for r in store.load().aliases}
    assert targets == {"a": (None, c), "b": (vm2, None), "c": (None, b)}
    with store.transaction() as tx:
        _expect(errno.ELOOP, tx.retarget_alias, a, None, a)
        e = _expect(errno.ELOOP, tx.retarget_alias, b, None, a)  # b -> a -> c -> b
        assert f"alias {b}" in e.reason
        tx.retarget_alias(c, vm1, None)  # retargeting to a VM never loops
        tx.retarget_alias(b, None, a)  # b -> a -> c -> vm1: fine now
    targets = {r.name: (r.target_vm, r.target_alias) for r in store.load().aliases}
    assert targets == {"a": (None, c), "b": (None, a), "c": (vm1, None)}
    assert store.integrity_check() == []


def test_alias_ids_are_never_reused(db: Path) -> None:
    with Store.open(db) as s:
        with s.transaction() as tx:
            vm = tx.insert_vm("vm", 1.0)
            a = tx.insert_alias("a", vm, None, 1.0)
            b = tx.insert_alias("b", vm, None, 1.0)
        with s.transaction() as tx:
            tx.delete_alias(b)
            c = tx.insert_alias("b", vm, None, 2.0)
        assert a < b < c
        with s.transaction() as tx:
            tx.delete_alias(c)
    with Store.open(db) as s, s.transaction() as tx:
        d = tx.insert_alias("b", vm, None, 3.0)
    assert d > c


def test_deleting_a_vm_an_alias_names_is_ebusy_and_rolls_back(store: Store) -> None:
    with store.transaction() as tx:
        vm = tx.insert_vm("vm", 1.0)
        clone = tx.insert_vm("clone", 1.0, origin_id=vm)
        (vol,) = tx.allocate_volume_ids(1)
        tx.insert_volume(vol, vm, "root", 512, "persistent", 1.0)
        a = tx.insert_alias("latest", vm, None, 1.0)
        tx.insert_alias("stable", vm, None, 1.0)
        tx.insert_alias("chained", None, a, 1.0)
    before = store.load()
    with pytest.raises(VmtreeError) as e, store.transaction() as tx:
        tx.insert_vm("other", 1.0)
        tx.add_event(1.0, "rmdir vm")
        tx.delete_vm(vm)
    assert e.value.errno == errno.EBUSY
    assert "'latest', 'stable'" in e.value.reason and "'chained'" not in e.value.reason
    assert store.load() == before
    assert store.recent_events() == []

    # Refused within the block, the delete took nothing with it (not the
    # volume by cascade, nor the clone's origin) and the transaction carries on.
    with store.transaction() as tx:
        _expect(errno.EBUSY, tx.delete_vm, vm)
        e2 = _expect(errno.EBUSY, tx.delete_alias, a)
        assert "'chained'" in e2.reason
    assert store.load() == before

    # The orchestrator's way: re-target or delete the aliases in the same transaction.
    with store.transaction() as tx:
        for alias in before.aliases:
            if alias.name == "stable":
                tx.retarget_alias(alias.id, clone, None)
            elif alias.name == "chained":
                tx.delete_alias(alias.id)
        tx.delete_alias(a)
        tx.delete_vm(vm)
    snap = store.load()
    assert [(r.name, r.target_vm) for r in snap.aliases] == [("stable", clone)]
    assert [(v.name, v.origin_id) for v in snap.vms] == [("clone", None)]
    assert snap.volumes == []
    assert store.integrity_check() == []


def test_vm_and_alias_names_share_one_namespace(store: Store) -> None:
    with store.transaction() as tx:
        vm = tx.insert_vm("vm", 1.0)
        other = tx.insert_vm("other", 1.0)
        a = tx.insert_alias("a", vm, None, 1.0)
        e = _expect(errno.EEXIST, tx.insert_alias, "other", vm, None, 1.0)
        assert "'other'" in e.reason and "a VM has that name" in e.reason
        e = _expect(errno.EEXIST, tx.insert_vm, "a", 1.0)
        assert "'a'" in e.reason and "an alias has that name" in e.reason
        _expect(errno.EEXIST, tx.rename_vm, other, "a")
        _expect(errno.EEXIST, tx.rename_alias, a, "other")
        # A missing row is ENOENT whatever the name.
        _expect(errno.ENOENT, tx.rename_vm, 99, "a")
        _expect(errno.ENOENT, tx.rename_alias, 99, "vm")
        # Once a name is freed in one table, the other may take it.
        tx.rename_alias(a, "b")
        tx.rename_vm(other, "a")
        tx.insert_alias("other", vm, None, 1.0)
    snap = store.load()
    assert [v.name for v in snap.vms] == ["vm", "a"]
    assert [r.name for r in snap.aliases] == ["b", "other"]


def test_set_vm_origin(store: Store) -> None:
    with store.transaction() as tx:
        a = tx.insert_vm("a", 1.0)
        b = tx.insert_vm("b", 1.0)
        c = tx.insert_vm("c", 1.0)
        tx.set_vm_origin(b, a)
        tx.set_vm_origin(c, b)  # a <- b <- c
    assert {v.name: v.origin_id for v in store.load().vms} == {"a": None, "b": a, "c": b}
    with store.transaction() as tx:
        _expect(errno.ENOENT, tx.set_vm_origin, 99, a)
        e = _expect(errno.ENOENT, tx.set_vm_origin, b, 99)
        assert "origin VM 99" in e.reason
        _expect(errno.ENOENT, tx.set_vm_origin, 99, None)
        _expect(errno.EINVAL, tx.set_vm_origin, a, a)
        _expect(errno.EINVAL, tx.set_vm_origin, a, c)  # c descends from a
        # Reversing a clone relationship: clear first, then set.
        tx.set_vm_origin(b, None)
        tx.set_vm_origin(a, b)  # b <- a, b <- c
    assert {v.name: v.origin_id for v in store.load().vms} == {"a": b, "b": None, "c": b}
    assert store.integrity_check() == []


def test_set_volume_policy(store: Store) -> None:
    with store.transaction() as tx:
        vm = tx.insert_vm("vm", 1.0)
        (vol,) = tx.allocate_volume_ids(1)
        tx.insert_volume(vol, vm, "root", 512, "persistent", 1.0)
        tx.set_volume_policy(vol, "ephemeral")
        _expect(errno.ENOENT, tx.set_volume_policy, vol + 1, "ephemeral")
    assert [(v.id, v.policy) for v in store.load().volumes] == [(vol, "ephemeral")]


def test_integrity_check_reports_a_dangling_alias(store: Store, db: Path) -> None:
    with store.transaction() as tx:
        vm = tx.insert_vm("vm", 1.0)
        a = tx.insert_alias("a", vm, None, 1.0)
    with raw(db) as c:  # another program, without foreign keys
        c.execute("DELETE FROM vms")
    assert store.integrity_check() == [f"row {a} of aliases refers to a missing row of vms"]


# Intent journal


def test_intents_open_complete_and_survive_reopen(db: Path) -> None:
    with Store.open(db) as s:
        with s.transaction() as tx:
            i1 = tx.begin_intent("create", {"what": "mkdir a", "volumes": [{"id": 1}]})
            i2 = tx.begin_intent("delete_volumes", {"volume_ids": [2, 3]})
        with s.transaction() as tx:
            tx.complete_intent(i1)
            tx.complete_intent(i1)  # recovery may retry; harmless
        (open_,) = s.load().open_intents
    assert (open_.id, open_.kind, open_.payload) == (i2, "delete_volumes", {"volume_ids": [2, 3]})
    with Store.open(db) as s:
        assert s.load().open_intents == [open_]
        with s.transaction() as tx:
            tx.complete_intent(i2)
            i3 = tx.begin_intent("x", {})
        assert i3 > i2
        assert [i.id for i in s.load().open_intents] == [i3]


def test_completed_intents_are_pruned_open_ones_kept(store: Store, db: Path) -> None:
    with store.transaction() as tx:
        kept_open = tx.begin_intent("old", {"n": -1})
        for n in range(INTENTS_KEPT + 200):
            tx.complete_intent(tx.begin_intent("k", {"n": n}))
    with raw(db) as c:
        assert c.execute("SELECT count(*) FROM intents WHERE completed IS NOT NULL").fetchone() == (
            INTENTS_KEPT,
        )
        oldest = c.execute("SELECT min(payload) FROM intents WHERE kind = 'k'").fetchone()[0]
        newest = c.execute("SELECT payload FROM intents ORDER BY id DESC LIMIT 1").fetchone()[0]
    assert json.loads(newest) == {"n": INTENTS_KEPT + 199}
    assert json.loads(oldest)["n"] >= 200
    assert [i.id for i in store.load().open_intents] == [kept_open]


# Events


def test_events_keep_the_newest(store: Store) -> None:
    with store.transaction() as tx:
        for n in range(EVENTS_KEPT + 50):
            tx.add_event(float(n), f"e{n}")
    for n in range(EVENTS_KEPT + 50, EVENTS_KEPT + 53):
        with store.transaction() as tx:
            tx.add_event(float(n), f"e{n}")
    every = store.recent_events(10 * EVENTS_KEPT)
    assert len(every) == EVENTS_KEPT
    assert every[0] == (53.0, "e53")
    assert every[-1] == (EVENTS_KEPT + 52.0, f"e{EVENTS_KEPT + 52}")
    assert store.recent_events(2) == every[-2:]
    assert store.recent_events(0) == []


def test_events_are_in_insertion_order_whatever_the_clock(store: Store) -> None:
    with store.transaction() as tx:
        tx.add_event(5.0, "first")
        tx.add_event(1.0, "clock went back")
    assert store.recent_events() == [(5.0, "first"), (1.0, "clock went back")]


# Durability


def test_committed_data_survives_sigkill_and_uncommitted_does_not(db: Path) -> None:
    child = run_child(
        """
        import os, signal, sys
        from pathlib import Path
        from vmtreefs.store import Store
        store = Store.open(Path(sys.argv[1]))
        with store.transaction() as tx:
            vm = tx.insert_vm("committed", 1.0)
            (vol,) = tx.allocate_volume_ids(1)
            tx.insert_volume(vol, vm, "root", 4096, "persistent", 1.0)
            tx.begin_intent("create", {"what": "mkdir committed"})
            tx.add_event(1.0, "mkdir committed")
        with store.transaction() as tx:
            tx.insert_vm("uncommitted", 2.0)
            tx.allocate_volume_ids(5)
            os.kill(os.getpid(), signal.SIGKILL)
        """,
        str(db),
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    # The commit is only in the WAL: reopening must replay it.
    assert db.with_name(DB_FILENAME + "-wal").stat().st_size > 0
    with Store.open(db) as s:
        snap = s.load()
        assert [v.name for v in snap.vms] == ["committed"]
        assert [(v.id, v.name) for v in snap.volumes] == [(1, "root")]
        assert [i.payload for i in snap.open_intents] == [{"what": "mkdir committed"}]
        assert s.recent_events() == [(1.0, "mkdir committed")]
        assert s.integrity_check() == []
        with s.transaction() as tx:
            assert tx.allocate_volume_ids(1) == [2]


# Threads


def test_concurrent_threads(store: Store) -> None:
    threads, per_thread = 8, 25
    errors: list[BaseException] = []
    allocated: list[int] = []
    start = threading.Barrier(threads + 1)

    def writer(t: int) -> None:
        try:
            start.wait()
            for n in range(per_thread):
                with store.transaction() as tx:
                    vm = tx.insert_vm(f"t{t}-{n}", float(n))
                    ids = tx.allocate_volume_ids(2)
                    tx.insert_volume(ids[0], vm, "root", 512, "p", 0.0)
                    tx.add_event(0.0, f"mkdir t{t}-{n}")
                allocated.extend(ids)
        except BaseException as e:
            errors.append(e)

    def reader() -> None:
        try:
            start.wait()
            for _ in range(50):
                snap = store.load()
                # A reader never sees a VM without the volume written in its transaction.
                assert len(snap.vms) == len(snap.volumes)
                store.recent_events(5)
        except BaseException as e:
            errors.append(e)

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    workers.append(threading.Thread(target=reader))
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert errors == []
    snap = store.load()
    assert len(snap.vms) == len({v.name for v in snap.vms}) == threads * per_thread
    assert sorted(allocated) == list(range(1, 2 * threads * per_thread + 1))
    assert store.integrity_check() == []


# A model-based check: whatever the sequence of operations, failures and
# reopenings, the store holds what the model says and never repeats an id.


class StoreMachine(RuleBasedStateMachine):
    vms = Bundle("vms")
    volumes = Bundle("volumes")
    aliases = Bundle("aliases")

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="vmtree-store-")
        self.db = Path(self.dir) / DB_FILENAME
        self.store = Store.open(self.db)
        self.model_vms: dict[int, str] = {}
        self.model_origins: dict[int, int | None] = {}
        self.model_volumes: dict[int, tuple[int, str, int]] = {}
        # id -> (name, target VM, target alias)
        self.model_aliases: dict[int, tuple[str, int | None, int | None]] = {}
        self.seen_vm_ids: set[int] = set()
        self.seen_volume_ids: set[int] = set()
        self.seen_alias_ids: set[int] = set()

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir)

    names = st.sampled_from(["a", "b", "c", "d"])

    # The model's view of the shared top-level namespace and of the references.

    def name_taken(self, name: str) -> bool:
        return name in self.model_vms.values() or any(
            a[0] == name for a in self.model_aliases.values()
        )

    def named_by_alias(self, target_vm: int | None, target_alias: int | None) -> bool:
        return any(a[1:] == (target_vm, target_alias) for a in self.model_aliases.values())

    def target_exists(self, target_vm: int | None, target_alias: int | None) -> bool:
        if target_vm is not None:
            return target_vm in self.model_vms
        return target_alias in self.model_aliases

    def leads_to(self, start: int | None, alias_id: int) -> bool:
        seen: set[int] = set()
        while start is not None and start not in seen:
            if start == alias_id:
                return True
            seen.add(start)
            start = self.model_aliases[start][2] if start in self.model_aliases else None
        return False

    @rule(target=vms, name=names)
    def create_vm(self, name: str) -> int:
        try:
            with self.store.transaction() as tx:
                vm_id = tx.insert_vm(name, 1.0)
        except VmtreeError as e:
            assert e.errno == errno.EEXIST
            assert self.name_taken(name)
            return -1
        assert not self.name_taken(name)
        assert vm_id not in self.seen_vm_ids
        self.seen_vm_ids.add(vm_id)
        self.model_vms[vm_id] = name
        self.model_origins[vm_id] = None
        return vm_id

    @rule(vm_id=vms, name=names)
    def rename_vm(self, vm_id: int, name: str) -> None:
        try:
            with self.store.transaction() as tx:
                tx.rename_vm(vm_id, name)
        except VmtreeError as e:
            if vm_id not in self.model_vms:
                assert e.errno == errno.ENOENT
            else:
                assert e.errno == errno.EEXIST
                assert self.name_taken(name) and self.model_vms[vm_id] != name
            return
        self.model_vms[vm_id] = name

    @rule(vm_id=vms, origin_id=st.none() | vms)
    def set_origin(self, vm_id: int, origin_id: int | None) -> None:
        try:
            with self.store.transaction() as tx:
                tx.set_vm_origin(vm_id, origin_id)
        except VmtreeError as e:
            if vm_id not in self.model_vms or (
                origin_id is not None and origin_id not in self.model_vms
            ):
                assert e.errno == errno.ENOENT
            else:
                assert e.errno == errno.EINVAL
                ancestor: int | None = origin_id
                while ancestor is not None and ancestor != vm_id:
                    ancestor = self.model_origins[ancestor]
                assert ancestor == vm_id
            return
        self.model_origins[vm_id] = origin_id

    @rule(vm_id=vms)
    def delete_vm(self, vm_id: int) -> None:
        try:
            with self.store.transaction() as tx:
                tx.delete_vm(vm_id)
        except VmtreeError as e:
            if vm_id not in self.model_vms:
                assert e.errno == errno.ENOENT
            else:
                assert e.errno == errno.EBUSY and self.named_by_alias(vm_id, None)
            return
        assert not self.named_by_alias(vm_id, None)
        del self.model_vms[vm_id]
        del self.model_origins[vm_id]
        for clone, origin in self.model_origins.items():
            if origin == vm_id:
                self.model_origins[clone] = None
        for vol_id in [k for k, v in self.model_volumes.items() if v[0] == vm_id]:
            del self.model_volumes[vol_id]

    @rule(target=volumes, vm_id=vms, name=names, size=st.integers(0, 1 << 40))
    def create_volume(self, vm_id: int, name: str, size: int) -> int:
        try:
            with self.store.transaction() as tx:
                (vol_id,) = tx.allocate_volume_ids(1)
                tx.insert_volume(vol_id, vm_id, name, size, "p", 1.0)
        except VmtreeError as e:
            taken = any(v[:2] == (vm_id, name) for v in self.model_volumes.values())
            assert e.errno == (errno.EEXIST if taken else errno.ENOENT)
            return -1
        assert vol_id not in self.seen_volume_ids
        assert all(vol_id > seen for seen in self.seen_volume_ids)
        self.seen_volume_ids.add(vol_id)
        self.model_volumes[vol_id] = (vm_id, name, size)
        return vol_id

    @rule(vol_id=consumes(volumes))
    def delete_volume(self, vol_id: int) -> None:
        try:
            with self.store.transaction() as tx:
                tx.delete_volume(vol_id)
        except VmtreeError as e:
            assert e.errno == errno.ENOENT and vol_id not in self.model_volumes
            return
        del self.model_volumes[vol_id]

    def create_alias(self, name: str, target_vm: int | None, target_alias: int | None) -> int:
        try:
            with self.store.transaction() as tx:
                alias_id = tx.insert_alias(name, target_vm, target_alias, 1.0)
        except VmtreeError as e:
            if not self.target_exists(target_vm, target_alias):
                assert e.errno == errno.ENOENT
            else:
                assert e.errno == errno.EEXIST and self.name_taken(name)
            return -1
        assert self.target_exists(target_vm, target_alias) and not self.name_taken(name)
        assert all(alias_id > seen for seen in self.seen_alias_ids)
        self.seen_alias_ids.add(alias_id)
        self.model_aliases[alias_id] = (name, target_vm, target_alias)
        return alias_id

    @rule(target=aliases, name=names, vm_id=vms)
    def create_alias_of_vm(self, name: str, vm_id: int) -> int:
        return self.create_alias(name, vm_id, None)

    @rule(target=aliases, name=names, alias_id=aliases)
    def create_alias_of_alias(self, name: str, alias_id: int) -> int:
        return self.create_alias(name, None, alias_id)

    @rule(alias_id=aliases, name=names)
    def rename_alias(self, alias_id: int, name: str) -> None:
        try:
            with self.store.transaction() as tx:
                tx.rename_alias(alias_id, name)
        except VmtreeError as e:
            if alias_id not in self.model_aliases:
                assert e.errno == errno.ENOENT
            else:
                assert e.errno == errno.EEXIST
                assert self.name_taken(name) and self.model_aliases[alias_id][0] != name
            return
        self.model_aliases[alias_id] = (name, *self.model_aliases[alias_id][1:])

    def retarget(self, alias_id: int, target_vm: int | None, target_alias: int | None) -> None:
        try:
            with self.store.transaction() as tx:
                tx.retarget_alias(alias_id, target_vm, target_alias)
        except VmtreeError as e:
            gone = alias_id not in self.model_aliases
            if gone or not self.target_exists(target_vm, target_alias):
                assert e.errno == errno.ENOENT
            else:
                assert e.errno == errno.ELOOP and self.leads_to(target_alias, alias_id)
            return
        assert not self.leads_to(target_alias, alias_id)
        self.model_aliases[alias_id] = (self.model_aliases[alias_id][0], target_vm, target_alias)

    @rule(alias_id=aliases, vm_id=vms)
    def retarget_to_vm(self, alias_id: int, vm_id: int) -> None:
        self.retarget(alias_id, vm_id, None)

    @rule(alias_id=aliases, target_alias=aliases)
    def retarget_to_alias(self, alias_id: int, target_alias: int) -> None:
        self.retarget(alias_id, None, target_alias)

    @rule(alias_id=aliases)
    def delete_alias(self, alias_id: int) -> None:
        try:
            with self.store.transaction() as tx:
                tx.delete_alias(alias_id)
        except VmtreeError as e:
            if alias_id not in self.model_aliases:
                assert e.errno == errno.ENOENT
            else:
                assert e.errno == errno.EBUSY and self.named_by_alias(None, alias_id)
            return
        assert not self.named_by_alias(None, alias_id)
        del self.model_aliases[alias_id]

    @rule(name=names)
    def failed_transaction(self, name: str) -> None:
        with pytest.raises(Boom), self.store.transaction() as tx:
            tx.allocate_volume_ids(3)
            remaining = dict(self.model_aliases)
            while remaining:  # the aliases nothing names first
                for alias_id in [
                    i for i in remaining if all(a[2] != i for a in remaining.values())
                ]:
                    tx.delete_alias(alias_id)
                    del remaining[alias_id]
            for vm_id in list(self.model_vms):
                tx.delete_vm(vm_id)
            new_vm = tx.insert_vm(name + "-new", 1.0)
            new_alias = tx.insert_alias(name + "-alias", new_vm, None, 1.0)
            tx.insert_alias(name + "-chained", None, new_alias, 1.0)
            raise Boom

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = Store.open(self.db)

    @invariant()
    def matches_model(self) -> None:
        snap = self.store.load()
        assert {v.id: v.name for v in snap.vms} == self.model_vms
        assert {v.id: v.origin_id for v in snap.vms} == self.model_origins
        assert {v.id: (v.vm_id, v.name, v.size) for v in snap.volumes} == self.model_volumes
        assert {
            a.id: (a.name, a.target_vm, a.target_alias) for a in snap.aliases
        } == self.model_aliases
        assert self.store.integrity_check() == []


StoreMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=25, deadline=None)
test_store_matches_model = StoreMachine.TestCase


def test_engine_state_sets_and_deletes_keys_and_sizes_in_one_commit(db: Path) -> None:
    with Store.open(db) as s:
        s.save_engine_state({"a": "1", "b": "2"}, {7: 512, 8: 1024})
        s.save_engine_state({"a": None, "b": "3"}, {7: None, 8: 2048})
    with Store.open(db) as s:  # durable across a reopen
        assert s.load_engine_state() == ({"b": "3"}, {8: 2048})
        with pytest.raises(VmtreeError):
            s.save_engine_state({"c": "1"}, {9: -1})  # a bad size: the key is not kept either
        assert s.load_engine_state() == ({"b": "3"}, {8: 2048})


def test_domains_savestates_and_counters_round_trip(store: Store) -> None:
    with store.transaction() as tx:
        vm = tx.insert_vm("work", 1.0)
        tx.set_domain_xml(vm, "<domain type='qemu'/>")
        a, b = tx.allocate_volume_ids(2)
        ss = tx.insert_savestate(
            vm, "s1", 2.0, "ss-1.save", {"paused": False}, {"root": (a, 512), "private": (b, 1024)}
        )
        assert [tx.next_number("inst:1") for _ in range(3)] == [1, 2, 3]
        assert tx.next_number("disp:1") == 1
    snap = store.load()
    assert snap.domains == {vm: "<domain type='qemu'/>"}
    (row,) = snap.savestates
    assert (row.id, row.vm_id, row.label, row.image, row.info) == (
        ss,
        vm,
        "s1",
        "ss-1.save",
        {"paused": False},
    )
    assert row.volumes == {"root": (a, 512), "private": (b, 1024)}
    with pytest.raises(VmtreeError) as info, store.transaction() as tx:
        tx.insert_savestate(vm, "s1", 3.0, "ss-2.save", {}, {})
    assert info.value.errno == errno.EEXIST
    with store.transaction() as tx:
        assert tx.next_number("inst:1") == 4  # never handed out twice
        tx.set_domain_xml(vm, None)
        tx.delete_savestate(ss)
    snap = store.load()
    assert snap.domains == {} and snap.savestates == []
    with store.transaction() as tx:
        tx.insert_savestate(vm, "s2", 4.0, "ss-3.save", {}, {})
        tx.delete_vm(vm)  # its savestates go with it
    assert store.load().savestates == []


def test_versions_and_templates_round_trip(store: Store) -> None:
    with store.transaction() as tx:
        head = tx.insert_vm("fedora-next", 1.0, props={"versioned": "1"})
        v1 = tx.insert_vm("fedora-v1", 2.0, props={"immutable": "1"})
        tx.insert_version(v1, head, 1)
        alias = tx.insert_alias("fedora", v1, None, 2.0, system=True)
        work = tx.insert_vm("work", 3.0)
        tx.set_template(work, None, alias)
        tx.set_template_used(work, v1)
    snap = store.load()
    assert [(r.vm_id, r.head_id, r.number) for r in snap.versions] == [(v1, head, 1)]
    assert [(t.vm_id, t.target_vm, t.target_alias, t.used) for t in snap.templates] == [
        (work, None, alias, v1)
    ]
    with pytest.raises(VmtreeError) as info, store.transaction() as tx:
        tx.insert_version(tx.insert_vm("fedora-v1b", 4.0), head, 1)
    assert info.value.errno == errno.EEXIST  # one version 1 per head
    for doomed in (head, alias):  # named by a version row / by a template link
        with pytest.raises(VmtreeError) as info, store.transaction() as tx:
            if doomed == head:
                tx.delete_vm(head)
            else:
                tx.retarget_alias(alias, head, None)
                tx.delete_alias(alias)
        assert info.value.errno == errno.EBUSY
    with store.transaction() as tx:
        tx.set_template(work, v1, None)  # now the version itself
        tx.forget_version(v1)
        tx.delete_alias(alias)
        tx.delete_vm(head)
    snap = store.load()
    assert snap.versions == []
    assert [(t.target_vm, t.target_alias, t.used) for t in snap.templates] == [(v1, None, None)]
    with store.transaction() as tx:
        tx.delete_vm(work)  # its template link goes with it
    assert store.load().templates == []
