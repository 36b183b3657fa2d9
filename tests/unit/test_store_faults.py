"""The store's faults: a damaged file refused before any write, SQLite's failures as
errnos, the reserve that lets a deletion be recorded on a full filesystem, and an
intent completed by the next commit with room."""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import cast

import pytest

from vmtreefs.core.journal import Journal
from vmtreefs.engine.base import SnapshotEngine
from vmtreefs.errors import VmtreeError
from vmtreefs.store import DB_FILENAME, Store, Txn
from vmtreefs.store.failures import store_error
from vmtreefs.store.reserve import RESERVE_BYTES


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / DB_FILENAME
    with Store.open(path) as store, store.transaction() as tx:
        for n in range(300):  # several leaves in the events table
            tx.add_event(float(n), f"event number {n} " + "x" * 40)
    return path


def overwrite(db: Path, page: int) -> None:
    with closing(sqlite3.connect(db)) as conn:
        size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    with open(db, "r+b") as f:
        f.seek((page - 1) * size)
        f.write(b"\x5a" * size)


def a_leaf_of(db: Path, table: str) -> int:
    with closing(sqlite3.connect(db)) as conn:
        pages = [
            int(p)
            for (p,) in conn.execute(
                "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf'", (table,)
            )
        ]
    return pages[len(pages) // 2]


def test_a_damaged_page_is_refused_before_anything_is_written(db: Path) -> None:
    overwrite(db, a_leaf_of(db, "events"))
    before = db.read_bytes()
    with pytest.raises(VmtreeError) as e:
        Store.open(db, check=True, ours=True)
    assert e.value.errno == errno.EUCLEAN
    assert f"store {db} is damaged (integrity_check:" in e.value.reason
    assert f"`vmtreefs fsck {db.parent}`" in e.value.reason
    assert db.read_bytes() == before


def test_a_header_sqlite_cannot_read_is_damage_only_in_our_own_store(db: Path) -> None:
    overwrite(db, 1)
    with pytest.raises(VmtreeError) as ours:
        Store.open(db, check=True, ours=True)
    assert ours.value.errno == errno.EUCLEAN and "file is not a database" in ours.value.reason
    with pytest.raises(VmtreeError) as foreign:
        Store.open(db)
    assert foreign.value.errno == errno.EINVAL
    assert "not a vmtreefs store" in foreign.value.reason


@pytest.mark.parametrize(
    ("code", "expected", "says"),
    [
        (sqlite3.SQLITE_FULL, errno.ENOSPC, "the filesystem of the store (SOURCE) is full"),
        (sqlite3.SQLITE_CORRUPT, errno.EUCLEAN, "the store is damaged"),
    ],
)
def test_sqlite_failures_have_one_clear_errno(code: int, expected: int, says: str) -> None:
    failure = sqlite3.OperationalError("what SQLite said")
    failure.sqlite_errorcode = code  # type: ignore[attr-defined]
    error = store_error(failure, "commit a store transaction")
    assert error.errno == expected
    assert says in error.reason and "what SQLite said" in error.reason


def test_the_reserve_is_freed_once_and_taken_again_after_a_commit(db: Path) -> None:
    reserve = db.with_name(db.name + "-reserve")
    with Store.open(db, reserve=True) as store:
        assert reserve.stat().st_size == RESERVE_BYTES
        assert store.release_reserve()
        assert reserve.stat().st_size == 0
        assert not store.release_reserve(), "there was nothing left to free"
        with store.transaction() as tx:
            tx.set_meta("k", "v")
        assert reserve.stat().st_size == RESERVE_BYTES
    with Store.open(db) as store:
        assert not store.release_reserve(), "a store opened without a reserve frees none"


class DeletingEngine:
    def __init__(self) -> None:
        self.deleted: list[int] = []

    def delete(self, vol_id: int, missing_ok: bool = False) -> None:
        self.deleted.append(vol_id)


def test_an_undone_creation_with_no_room_to_say_so_is_recorded_by_the_next_commit(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's volumes go; the commit that completes the intent finds SOURCE
    full; the intent stays open only until a commit has room, not until a remount."""
    engine = DeletingEngine()
    with Store.open(db) as store:
        journal = Journal(store, cast(SnapshotEngine, engine))
        with store.transaction() as tx:
            intent = tx.begin_intent("create", {"what": "mkdir x", "volumes": []})

        @contextmanager
        def full() -> Iterator[Txn]:
            raise VmtreeError(errno.ENOSPC, "commit: the filesystem of the store is full")
            yield  # pragma: no cover

        monkeypatch.setattr(store, "transaction", full)
        journal.drop_and_complete(intent, [7], [])
        monkeypatch.undo()
        assert engine.deleted == [7]
        assert [i.id for i in store.load().open_intents] == [intent]
        with pytest.raises(VmtreeError), store.transaction() as tx:
            tx.set_meta("k", "v")
            raise VmtreeError(errno.ENOSPC, "still full")
        assert [i.id for i in store.load().open_intents] == [intent]
        with store.transaction() as tx:
            tx.set_meta("k", "v")
        assert store.load().open_intents == []
