"""The orchestrator's decisions, fast: ``core.tree.VmTree`` on a real store (SQLite in a
temporary directory) and the in-memory engine, with no kernel, mount or root.

The fake engine passes the same engine contract suite as the real ones
(tests/engine, param ``memory``). These tests check what the tree decides and
records (names, numbering, what recovery rolls back or forward, what a commit
makes, what collection removes); that the same features work for real is shown
by tests/fs and tests/vm through real mounts, engines and libvirt.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fakes.memory_engine import MemoryEngine
from vmtreefs.core.tree import VmTree
from vmtreefs.errors import VmtreeError
from vmtreefs.store import Store

MiB = 1 << 20


def open_tree(db: Path, engine: MemoryEngine) -> VmTree:
    """What a mount does first: the store, recovery, the namespace loaded."""
    tree = VmTree(Store.open(db), engine)
    tree.recover()
    return tree


@pytest.fixture
async def tree(tmp_path: Path) -> AsyncIterator[VmTree]:
    engine = MemoryEngine()
    engine.start()
    opened = open_tree(tmp_path / "vmtree.db", engine)
    try:
        yield opened
    finally:
        opened.store.close()
        engine.stop()


def volume_ids(tree: VmTree, name: str) -> dict[str, int]:
    return {vol.name: vol.id for vol in tree.ns.get(name).volumes.values()}


async def test_mkdir_records_the_vm_and_makes_its_default_volumes(tree: VmTree) -> None:
    vm = await tree.create_vm("work")
    ids = volume_ids(tree, "work")
    assert sorted(ids) == ["private", "root", "volatile"]
    assert tree.engine.inventory() == {
        ids["root"]: 10 << 30,
        ids["private"]: 2 << 30,
        ids["volatile"]: 1 << 30,
    }
    assert [row.name for row in tree.store.load().vms] == ["work"]
    assert vm.state == "halted"
    assert (
        tree.journal.events.text()
        .rstrip()
        .endswith("mkdir work: root 10.0 GiB, private 2.0 GiB, volatile 1.0 GiB")
    )


async def test_a_clone_shares_every_block_until_written(tree: VmTree) -> None:
    await tree.create_vm("base")
    root = volume_ids(tree, "base")["root"]
    handle = await tree.volumes.open(root, writable=True)
    await tree.volumes.write(handle, 0, b"base data" * 1000)
    handle.close()
    clone = await tree.clone_vm(tree.ns.get("base").id, "test")
    clone_root = volume_ids(tree, "test")["root"]
    assert clone.origin_id == tree.ns.get("base").id
    assert tree.engine.exclusive_bytes(clone_root) == 0
    assert tree.engine.exclusive_bytes(root) == 0
    assert tree.engine.changed_ranges(clone_root, root) == []


async def test_a_refused_name_makes_nothing(tree: VmTree) -> None:
    with pytest.raises(VmtreeError) as refused:
        await tree.create_vm("bad name")
    assert refused.value.errno == errno.EINVAL
    await tree.create_vm("a")
    with pytest.raises(VmtreeError) as taken:
        await tree.create_vm("a")
    assert taken.value.errno == errno.EEXIST
    assert len(tree.engine.inventory()) == 3  # a's volumes only


async def test_disposable_numbers_count_on_and_are_never_reused(tree: VmTree) -> None:
    source = await tree.create_vm("fedora")
    first = await tree.make_instance(source.id, "disp")
    second = await tree.make_instance(source.id, "disp")
    assert (first.name, second.name) == ("fedora-disp1", "fedora-disp2")
    assert first.volatile and second.volatile
    assert first.origin_id == second.origin_id == source.id
    await tree.delete_vm(second.id)
    third = await tree.make_instance(source.id, "disp")
    assert third.name == "fedora-disp3"
    assert (await tree.make_instance(source.id, "inst")).name == "fedora-inst1"


async def test_a_commit_makes_the_version_the_alias_and_the_head(tree: VmTree) -> None:
    work = await tree.create_vm("work")
    await tree.set_property(work.id, "versioned", "1")
    assert sorted(tree.ns.by_name) == ["work-next", "work-v1"]
    assert tree.ns.alias_target_name(tree.ns.get_alias("work")) == "work-v1"
    head = tree.ns.get("work-next")
    root = volume_ids(tree, "work-next")["root"]
    v1_volumes = set(volume_ids(tree, "work-v1").values())
    handle = await tree.volumes.open(root, writable=True)
    await tree.volumes.write(handle, 4096, b"v2 data")
    handle.close()
    assert tree.engine.changed_ranges(root, volume_ids(tree, "work-v1")["root"]) == [(4096, 4096)]
    v2 = await tree.versions.commit_version(head.id)
    assert v2.name == "work-v2" and v2.immutable
    assert tree.ns.alias_target_name(tree.ns.get_alias("work")) == "work-v2"
    assert head.origin_id == v2.id
    assert tree.engine.changed_ranges(root, volume_ids(tree, "work-v2")["root"]) == []
    # preserve_history is not set: the older version goes with its volumes.
    assert sorted(tree.ns.by_name) == ["work-next", "work-v2"]
    assert not v1_volumes & set(tree.engine.inventory())


async def test_collection_removes_a_hidden_vm_once_nothing_needs_it(tree: VmTree) -> None:
    base = await tree.create_vm("base")
    await tree.set_property(base.id, "immutable", "1")
    instance = await tree.make_instance(base.id, "inst")
    tree.ns.set_state(instance, "running")  # what the lifecycle records for a running instance
    await tree.delete_vm(base.id)  # still needed by its running instance: hidden
    hidden = tree.ns.get_by_id(base.id)
    assert hidden.hidden and hidden.name.startswith(".volatile-")
    assert "base" not in tree.ns.by_name
    await tree.collect()
    assert base.id in tree.ns.by_id  # the instance still runs
    tree.ns.set_state(instance, "halted")
    await tree.collect()
    assert base.id not in tree.ns.by_id
    assert set(volume_ids(tree, instance.name).values()) <= set(tree.engine.inventory())


def test_recovery_rolls_back_a_creation_the_crash_cut_short(tmp_path: Path) -> None:
    """A crash after the engine made a volume but before the VM was recorded: the next
    start deletes the volume and closes the intent, and the name is free again."""
    engine = MemoryEngine()
    db = tmp_path / "vmtree.db"
    with Store.open(db) as store, store.transaction() as tx:
        (vol_id,) = tx.allocate_volume_ids(1)
        intent = tx.begin_intent(
            "create", {"what": "mkdir x", "volumes": [{"id": vol_id, "name": "root", "size": 0}]}
        )
    engine.create(vol_id, MiB)
    tree = open_tree(db, engine)
    try:
        assert tree.recovery.rolled_back == [f"intent {intent} (create mkdir x)"]
        assert engine.inventory() == {}
        assert tree.store.load().open_intents == []
        assert len(tree.ns) == 0
    finally:
        tree.store.close()


def stored_vm(db: Path, intent: tuple[str, dict[str, object]] | None = None) -> int:
    """A store as a crash leaves it: VM ``a`` with a 1 MiB root volume, and maybe an open
    intent (``volume_id`` in its payload filled in); the volume's id."""
    with Store.open(db) as store, store.transaction() as tx:
        vm_id = tx.insert_vm("a", 1.0)
        (vol_id,) = tx.allocate_volume_ids(1)
        tx.insert_volume(vol_id, vm_id, "root", MiB, "template", 1.0)
        if intent is not None:
            tx.begin_intent(intent[0], {**intent[1], "volume_id": vol_id})
    return vol_id


def test_recovery_rolls_forward_a_grow_the_crash_cut_short(tmp_path: Path) -> None:
    engine = MemoryEngine()
    db = tmp_path / "vmtree.db"
    vol_id = stored_vm(db, ("resize_volume", {"what": "grow a/root.img", "size": 4 * MiB}))
    engine.create(vol_id, MiB)
    tree = open_tree(db, engine)
    try:
        assert len(tree.recovery.rolled_forward) == 1
        assert engine.size(vol_id) == 4 * MiB
        assert tree.ns.get("a").volumes["root"].size == 4 * MiB
        assert tree.recovery.differences == []
    finally:
        tree.store.close()


def test_recovery_rolls_a_growth_by_writes_forward_to_where_they_reached(
    tmp_path: Path,
) -> None:
    engine = MemoryEngine()
    db = tmp_path / "vmtree.db"
    vol_id = stored_vm(db, ("grow_volume", {"what": "grow a/root.img by writes", "size": MiB}))
    engine.create(vol_id, 3 * MiB + 100)  # the writes went on past what was recorded
    tree = open_tree(db, engine)
    try:
        assert tree.recovery.rolled_forward == [
            "intent 1 (grow_volume grow a/root.img by writes) to 3146240"
        ]
        assert tree.ns.get("a").volumes["root"].size == 3 * MiB + 512
        assert engine.size(vol_id) == 3 * MiB + 512
        assert tree.recovery.differences == []
        assert tree.store.load().open_intents == []
    finally:
        tree.store.close()


async def test_writes_past_the_end_commit_once_and_sync_records_the_size(
    tree: VmTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    await tree.create_vm("imp")
    vol_id = volume_ids(tree, "imp")["private"]
    start = tree.ns.get("imp").volumes["private"].size
    commits = 0
    transaction = tree.store.transaction

    def counted() -> object:
        nonlocal commits
        commits += 1
        return transaction()

    monkeypatch.setattr(tree.store, "transaction", counted)
    handle = await tree.volumes.open(vol_id, writable=True)
    chunk = 128 << 10
    for i in range(64):
        await tree.volumes.write(handle, start + i * chunk, bytes([i + 1]) * chunk)
    grown = start + 64 * chunk
    assert tree.ns.get("imp").volumes["private"].size == grown  # seen at once
    assert commits == 1  # the growth's intent
    assert [i.kind for i in tree.store.load().open_intents] == ["grow_volume"]
    await tree.volumes.sync(handle)
    assert commits == 2
    assert tree.store.load().open_intents == []
    assert {v.id: v.size for v in tree.store.load().volumes}[vol_id] == grown
    assert tree.engine.size(vol_id) == grown
    await tree.volumes.close(handle)
    assert commits == 2


def test_recovery_reports_what_the_engine_and_the_store_disagree_on(tmp_path: Path) -> None:
    engine = MemoryEngine()
    db = tmp_path / "vmtree.db"
    vol_id = stored_vm(db)
    engine.create(77, MiB)  # an orphan; a/root.img itself is missing
    tree = open_tree(db, engine)
    try:
        assert tree.recovery.differences == [
            f"a/volumes/root.img (volume {vol_id}) is missing from the engine",
            "engine volume 77 belongs to no VM or savestate",
        ]
    finally:
        tree.store.close()
