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


# Schema and pragmas


def test_fresh_store_has_the_current_schema(store: Store, db: Path) -> None:
    assert Store.SCHEMA_VERSION == len(Store.MIGRATIONS) == 1
    assert store.pragma("user_version") == Store.SCHEMA_VERSION
    assert store.pragma("application_id") == APPLICATION_ID
    assert store.pragma("journal_mode") == "wal"
    assert store.pragma("synchronous") == 2  # FULL
    assert store.pragma("foreign_keys") == 1
    with raw(db) as other:
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        tables = {r[0] for r in other.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"meta", "vms", "volumes", "counters", "intents", "events"} <= tables


def test_fresh_store_is_empty_and_sound(store: Store) -> None:
    snap = store.load()
    assert (snap.vms, snap.volumes, snap.open_intents, snap.meta) == ([], [], [], {})
    assert store.integrity_check() == []
    assert store.recent_events() == []


def test_pragma_helper_only_reads(store: Store) -> None:
    with pytest.raises(ValueError):
        store.pragma("user_version = 7")
    assert store.pragma("user_version") == 1


# Migrations and refusals


def test_empty_version_0_database_is_migrated(db: Path) -> None:
    with raw(db) as c:
        c.execute("PRAGMA user_version = 0")
        c.execute("VACUUM")  # make it a real, non-empty database file
    assert db.stat().st_size > 0
    with Store.open(db) as s:
        assert s.pragma("user_version") == 1
        with s.transaction() as tx:
            assert tx.allocate_volume_ids(2) == [1, 2]


_V2 = """
CREATE TABLE aliases (
    name TEXT PRIMARY KEY,
    vm_id INTEGER NOT NULL REFERENCES vms(id) ON DELETE CASCADE
);
INSERT INTO meta (key, value) VALUES ('migrated', 'v2');
"""


class FutureStore(Store):
    MIGRATIONS: ClassVar[tuple[str, ...]] = (*Store.MIGRATIONS, _V2)


class BrokenFutureStore(Store):
    MIGRATIONS: ClassVar[tuple[str, ...]] = (
        *Store.MIGRATIONS,
        "CREATE TABLE half_done (x INTEGER);\nINSERT INTO no_such_table VALUES (1);\n",
    )


def test_pending_migrations_run_and_keep_data(db: Path) -> None:
    with Store.open(db) as s, s.transaction() as tx:
        tx.insert_vm("keep", 1.0)
    assert FutureStore.SCHEMA_VERSION == 2
    with FutureStore.open(db) as s:
        assert s.pragma("user_version") == 2
        assert [v.name for v in s.load().vms] == ["keep"]
        assert s.get_meta("migrated") == "v2"
    with raw(db) as c:
        assert c.execute("SELECT count(*) FROM aliases").fetchone() == (0,)


def test_newer_schema_is_refused(db: Path) -> None:
    FutureStore.open(db).close()
    with pytest.raises(VmtreeError) as e:
        Store.open(db)
    assert e.value.errno == errno.EINVAL
    assert e.value.reason == "store schema version 2 is newer than this vmtreefs (1)"


def test_failed_migration_leaves_the_old_version(db: Path) -> None:
    Store.open(db).close()
    with pytest.raises(VmtreeError) as e:
        BrokenFutureStore.open(db)
    assert "no_such_table" in e.value.reason
    with raw(db) as c:
        assert c.execute("PRAGMA user_version").fetchone() == (1,)
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
    assert (snap.vms, snap.volumes, snap.open_intents, snap.meta) == ([], [], [], {})
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
    assert snap.meta == {"engine": "reflink"}
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

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="vmtree-store-")
        self.db = Path(self.dir) / DB_FILENAME
        self.store = Store.open(self.db)
        self.model_vms: dict[int, str] = {}
        self.model_volumes: dict[int, tuple[int, str, int]] = {}
        self.seen_vm_ids: set[int] = set()
        self.seen_volume_ids: set[int] = set()

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir)

    names = st.sampled_from(["a", "b", "c", "d"])

    @rule(target=vms, name=names)
    def create_vm(self, name: str) -> int:
        try:
            with self.store.transaction() as tx:
                vm_id = tx.insert_vm(name, 1.0)
        except VmtreeError as e:
            assert e.errno == errno.EEXIST
            assert name in self.model_vms.values()
            return -1
        assert name not in self.model_vms.values()
        assert vm_id not in self.seen_vm_ids
        self.seen_vm_ids.add(vm_id)
        self.model_vms[vm_id] = name
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
                assert name in self.model_vms.values() and self.model_vms[vm_id] != name
            return
        self.model_vms[vm_id] = name

    @rule(vm_id=consumes(vms))
    def delete_vm(self, vm_id: int) -> None:
        try:
            with self.store.transaction() as tx:
                tx.delete_vm(vm_id)
        except VmtreeError as e:
            assert e.errno == errno.ENOENT and vm_id not in self.model_vms
            return
        del self.model_vms[vm_id]
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

    @rule(name=names)
    def failed_transaction(self, name: str) -> None:
        with pytest.raises(Boom), self.store.transaction() as tx:
            tx.allocate_volume_ids(3)
            for vm_id in list(self.model_vms):
                tx.delete_vm(vm_id)
            tx.insert_vm(name + "-new", 1.0)
            raise Boom

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = Store.open(self.db)

    @invariant()
    def matches_model(self) -> None:
        snap = self.store.load()
        assert {v.id: v.name for v in snap.vms} == self.model_vms
        assert {v.id: (v.vm_id, v.name, v.size) for v in snap.volumes} == self.model_volumes


StoreMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=25, deadline=None)
test_store_matches_model = StoreMachine.TestCase
