"""The tree as a filesystem with no kernel and no pyfuse3: ``fs.view`` over a tree on the
in-memory engine (borg tests its ``vfs`` the same way, before the adapter and a mount).

What is checked here is what ``ls -l``, ``readlink`` and ``cd ..`` would show: every
listed name looks up to the entry listed, every entry names the directory that lists
it as its parent, each kind of entry has the mode and size a user sees, and an entry
whose object is gone answers ENOENT. tests/fs shows the same through a real mount.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fakes.memory_engine import MemoryEngine
from vmtreefs.core.tree import VmTree
from vmtreefs.errors import VmtreeError
from vmtreefs.fs import inodes
from vmtreefs.fs.inodes import ROOT, VmEntry
from vmtreefs.fs.view import (
    AliasLink,
    ChangesDir,
    CloneLink,
    OriginLink,
    QuietError,
    TemplateLink,
    VersionLink,
    View,
    VmDir,
    VolumeFile,
)
from vmtreefs.store import Store

MOUNT_TIME_NS = 1_700_000_000 * 10**9


@pytest.fixture
async def tree(tmp_path: Path) -> AsyncIterator[VmTree]:
    engine = MemoryEngine()
    engine.start()
    opened = VmTree(Store.open(tmp_path / "vmtree.db"), engine)
    opened.recover()
    try:
        yield opened
    finally:
        opened.store.close()
        engine.stop()


@pytest.fixture
def view(tree: VmTree) -> View:
    return View(tree, None, MOUNT_TIME_NS)


def walk(view: View, inode: int = ROOT, path: str = "") -> dict[str, int]:
    """Every path the view lists, as ``find`` would see it, without following symlinks."""
    found = {}
    for child, name in view.children(inode):
        found[f"{path}/{name}"] = child
        if stat.S_ISDIR(view.entry(child).attrs().mode):
            found |= walk(view, child, f"{path}/{name}")
    return found


async def make_a_small_tree(tree: VmTree) -> None:
    """A versioned template, a VM based on it, a clone and an alias: every kind of link."""
    debian = await tree.create_vm("debian")
    await tree.set_property(debian.id, "versioned", "1")
    work = await tree.create_vm("work")
    await tree.versions.set_template(work.id, b"debian")
    await tree.clone_vm(work.id, b"work-test")
    await tree.aliases.create(b"mine", b"work")


async def test_every_listed_name_looks_up_to_what_was_listed_and_back(
    tree: VmTree, view: View
) -> None:
    await make_a_small_tree(tree)
    paths = walk(view)
    assert {
        "/.vmtree/ctl",
        "/mine",
        "/work/template",
        "/work/clones/work-test",
        "/work-test/origin",
        "/work/volumes/root.img",
        "/work/volumes/root.changes",
        "/debian-next/versions/v1",
    } <= set(paths)
    for path, inode in paths.items():
        parent_path, name = path.rsplit("/", 1)
        parent = paths.get(parent_path, ROOT)
        assert view.child(parent, name) == inode, path
        assert view.entry(inode).parent() == parent, path
        assert view.child(inode, ".") == inode
        assert view.child(parent, "..") == view.entry(parent).parent()


async def test_links_read_as_relative_paths_inside_the_mount(tree: VmTree, view: View) -> None:
    await make_a_small_tree(tree)
    paths = walk(view)
    targets = {
        path: view.entry(inode).target()
        for path, inode in paths.items()
        if stat.S_ISLNK(view.entry(inode).attrs().mode)
    }
    assert targets == {
        "/debian": "debian-v1",
        "/mine": "work",
        "/work/template": "../debian",
        "/work-test/template": "../debian",  # a clone keeps its origin's template
        "/work/clones/work-test": "../../work-test",
        "/debian-v1/clones/debian-next": "../../debian-next",  # the head is v1's clone
        "/work-test/origin": "../work",
        "/debian-next/origin": "../debian-v1",
        "/debian-next/versions/v1": "../../debian-v1",
    }
    kinds = {path: type(view.entry(paths[path])) for path in targets}
    assert kinds["/mine"] is AliasLink and kinds["/work/template"] is TemplateLink
    assert kinds["/work/clones/work-test"] is CloneLink
    assert kinds["/work-test/origin"] is OriginLink
    assert kinds["/debian-next/versions/v1"] is VersionLink
    # A symlink's size is its target's length, as lstat shows it.
    for path, target in targets.items():
        assert view.entry(paths[path]).attrs().size == len(target)


async def test_modes_and_sizes_are_what_ls_shows(tree: VmTree, view: View) -> None:
    await make_a_small_tree(tree)
    paths = walk(view)

    def mode(path: str) -> str:
        return stat.filemode(view.entry(paths[path]).attrs().mode)

    assert mode("/work") == "drwxr-xr-x"
    assert mode("/work/ctl") == "-rw-------"
    assert mode("/work/state") == "-r--r--r--"
    assert view.entry(paths["/work/state"]).attrs().size == len("halted\n")
    assert mode("/work/volumes/root.img") == "-rw-------"
    assert view.entry(paths["/work/volumes/root.img"]).attrs().size == 10 << 30
    # A version is immutable: its volumes and description are read-only.
    assert mode("/debian-v1/volumes/root.img") == "-r--------"
    assert mode("/debian-v1/domain.xml") == "-r--------"
    # Aliases can change behind the kernel's back: it must ask each time.
    assert view.entry(paths["/mine"]).attrs().entry_timeout == 0
    assert view.entry(ROOT).attrs().nlink == 3 + len(tree.ns)


async def test_properties_are_on_vm_directories_and_volumes_only(tree: VmTree, view: View) -> None:
    await make_a_small_tree(tree)
    paths = walk(view)
    vm_dir = view.entry(paths["/work"])
    assert isinstance(vm_dir, VmDir)
    values = await vm_dir.property_values("usage")
    assert values is not None and values["usage"] == "0"  # a fresh VM holds no block
    assert values["id"] == str(tree.ns.get("work").id)
    volume = view.entry(paths["/work/volumes/private.img"])
    assert isinstance(volume, VolumeFile)
    assert await volume.property_values("policy") == {"policy": "persistent"}
    assert view.entry(paths["/work/ctl"]).properties is None


async def test_an_entry_whose_object_went_answers_enoent(tree: VmTree, view: View) -> None:
    await make_a_small_tree(tree)
    paths = walk(view)
    await tree.delete_vm(tree.ns.get("work-test").id)
    for path in ("/work-test", "/work-test/volumes/root.img", "/work/clones/work-test"):
        with pytest.raises(QuietError) as info:
            view.entry(paths[path])
        assert info.value.errno == errno.ENOENT, path
    with pytest.raises(QuietError):
        view.child(ROOT, "work-test")
    assert "work-test" not in {name for _, name in view.children(paths["/work/clones"])}


async def test_a_removed_alias_the_kernel_holds_keeps_its_old_target(
    tree: VmTree, view: View
) -> None:
    await make_a_small_tree(tree)
    inode = view.child(ROOT, "mine")
    held = {inode: 1}
    before = view.held_links(held)
    await tree.aliases.remove("mine")
    view.keep_departed(before, held)
    assert view.entry(inode).target() == "work"  # a reader that looked it up just before
    view.forget(inode)  # the kernel dropped it
    with pytest.raises(QuietError):
        view.entry(inode)


async def test_a_change_map_is_named_only_against_a_related_vm(tree: VmTree, view: View) -> None:
    await make_a_small_tree(tree)
    other = await tree.create_vm("other")
    changes = view.entry(
        view.child(view.child(view.child(ROOT, "work-test"), "volumes"), "root.changes")
    )
    assert isinstance(changes, ChangesDir) and changes.children() == []
    first = changes.child("work")
    assert changes.child("work") == first  # one number per pair for the life of the mount
    assert view.entry(first).parent() == changes.inode
    with pytest.raises(QuietError) as info:
        changes.child(other.name)
    assert info.value.errno == errno.ENOENT
    assert "change map of work-test/root.img against other" in tree.journal.events.text()


async def test_only_links_have_a_target(tree: VmTree, view: View) -> None:
    await tree.create_vm("work")
    with pytest.raises(VmtreeError) as info:
        view.entry(inodes.vm_inode(tree.ns.get("work").id, VmEntry.CTL)).target()
    assert info.value.errno == errno.EINVAL
    with pytest.raises(QuietError) as not_dir:
        view.children(inodes.vm_inode(tree.ns.get("work").id, VmEntry.CTL))
    assert not_dir.value.errno == errno.ENOTDIR
