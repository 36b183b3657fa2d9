"""The pure rules of the tree, checked without any I/O."""

from __future__ import annotations

import errno

import pytest

from vmtreefs.rules.aliases import plan_create_alias, plan_remove_alias, plan_rename_alias
from vmtreefs.rules.names import (
    MAX_ALIAS_CHAIN,
    MAX_VOLUME_SIZE,
    GiB,
    ModelError,
    check_vm_name,
    check_volume_filename,
    check_volume_size,
    round_up_to_sector,
)
from vmtreefs.rules.namespace import Namespace
from vmtreefs.rules.objects import (
    DEFAULT_VOLUMES,
    Alias,
    Savestate,
    TemplateLink,
    Vm,
    Volume,
    VolumeSpec,
)
from vmtreefs.rules.plans import RenameAlias, ReplaceAlias
from vmtreefs.rules.properties import VOLUME_POLICIES
from vmtreefs.rules.versions import plan_set_template, plan_unversion, plan_version, prunable
from vmtreefs.rules.vms import (
    collectable,
    needs_of,
    plan_clone,
    plan_create_vm,
    plan_delete_vm,
    plan_hide,
    plan_instance,
    plan_rename_vm,
    plan_set_property,
)
from vmtreefs.rules.volumes import (
    check_volume_write,
    plan_create_volume,
    plan_delete_volume,
    plan_rename_volume,
    plan_resize_volume,
)


def errno_of(fn: object, *args: object) -> int:
    with pytest.raises(ModelError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.errno


@pytest.mark.parametrize(
    "name",
    ["a", "Work", "fedora-39", "my_vm", "x" * 64, "a-v", "a-vx", "a-next2", "next", "v1", "a-inst"],
)
def test_good_vm_names_are_accepted(name: str) -> None:
    assert check_vm_name(name) == name
    assert check_vm_name(name.encode()) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "1abc",
        "-a",
        "_a",
        "a b",
        "a/b",
        "a.b",
        "x" * 65,
        "x" * 255,
        "fedora-next",
        "fedora-v7",
        "fedora-v0",
        "a-inst3",
        "a-disp12",
        "a\nb",
    ],
)
def test_bad_vm_names_are_einval(name: str) -> None:
    assert errno_of(check_vm_name, name) == errno.EINVAL


def test_non_ascii_names_are_einval() -> None:
    assert errno_of(check_vm_name, "café") == errno.EINVAL
    assert errno_of(check_vm_name, b"caf\xe9") == errno.EINVAL


def test_names_over_255_bytes_are_enametoolong() -> None:
    assert errno_of(check_vm_name, "x" * 256) == errno.ENAMETOOLONG
    assert errno_of(check_vm_name, "é" * 128) == errno.ENAMETOOLONG  # 256 bytes in UTF-8


def test_reserved_suffix_reason_names_the_suffix() -> None:
    with pytest.raises(ModelError, match="'-v7'"):
        check_vm_name("fedora-v7")


def test_volume_filenames() -> None:
    assert check_volume_filename("root.img") == "root"
    assert check_volume_filename(b"data-2.img") == "data-2"
    for bad in ["root", "root.raw", ".img", "a b.img", "1a.img", "x" * 65 + ".img"]:
        assert errno_of(check_volume_filename, bad) == errno.EINVAL
    assert errno_of(check_volume_filename, "x" * 256) == errno.ENAMETOOLONG


def test_volume_sizes() -> None:
    check_volume_size(0)
    check_volume_size(512)
    check_volume_size(MAX_VOLUME_SIZE)
    assert errno_of(check_volume_size, 513) == errno.EINVAL
    assert errno_of(check_volume_size, -512) == errno.EINVAL
    assert errno_of(check_volume_size, MAX_VOLUME_SIZE + 512) == errno.EFBIG
    assert round_up_to_sector(1) == 512
    assert round_up_to_sector(512) == 512
    assert round_up_to_sector(0) == 0


def test_default_volumes_match_the_contract() -> None:
    assert [(v.name, v.size) for v in DEFAULT_VOLUMES] == [
        ("root", 10 * GiB),
        ("private", 2 * GiB),
        ("volatile", 1 * GiB),
    ]
    assert all(v.policy in VOLUME_POLICIES for v in DEFAULT_VOLUMES)


def make_vm(ns: Namespace, vm_id: int, name: str, first_volume_id: int | None = None) -> Vm:
    plan = plan_create_vm(ns, name)
    vm = Vm(vm_id, plan.name, created=1.0)
    base = first_volume_id if first_volume_id is not None else vm_id * 10
    for i, spec in enumerate(plan.volumes):
        vm.volumes[spec.name] = Volume(base + i, spec.name, spec.size, spec.policy, 1.0)
    ns.add_vm(vm)
    return vm


def test_create_reserves_the_name_until_added_or_released() -> None:
    ns = Namespace()
    plan = plan_create_vm(ns, "work")
    assert plan.volumes == DEFAULT_VOLUMES
    assert errno_of(plan_create_vm, ns, "work") == errno.EEXIST  # racing mkdir
    ns.release("work")
    plan_create_vm(ns, "work")
    ns.add_vm(Vm(1, "work", 1.0))
    assert "work" not in ns.reserved
    assert errno_of(plan_create_vm, ns, "work") == errno.EEXIST


def test_add_vm_twice_is_refused() -> None:
    ns = Namespace()
    make_vm(ns, 1, "a")
    assert errno_of(ns.add_vm, Vm(1, "b", 1.0)) == errno.EEXIST


def test_lookup_of_missing_vm_and_volume() -> None:
    ns = Namespace()
    assert errno_of(ns.get, "nope") == errno.ENOENT
    assert errno_of(ns.get_by_id, 7) == errno.ENOENT
    vm = make_vm(ns, 1, "a")
    assert errno_of(ns.volume, vm, "nope") == errno.ENOENT
    assert errno_of(ns.volume_by_id, 999) == errno.ENOENT


def test_volume_index_follows_adds_and_removals() -> None:
    ns = Namespace()
    vm = make_vm(ns, 1, "a")
    assert ns.volume_count() == 3
    root = vm.volumes["root"]
    assert ns.volume_by_id(root.id) == (vm, root)
    ns.add_volume(1, Volume(99, "data", 0, "persistent", 1.0))
    assert ns.volume_by_id(99)[1].name == "data"
    assert errno_of(ns.add_volume, 1, Volume(100, "data", 0, "persistent", 1.0)) == errno.EEXIST
    ns.remove_volume(1, "data")
    assert errno_of(ns.volume_by_id, 99) == errno.ENOENT
    ns.remove_vm(1)
    assert errno_of(ns.volume_by_id, root.id) == errno.ENOENT
    assert ns.volume_count() == 0 and len(ns) == 0


def test_delete_plan_lists_every_volume() -> None:
    ns = Namespace()
    vm = make_vm(ns, 1, "a")
    plan = plan_delete_vm(ns, "a")
    assert plan.vm_id == 1
    assert sorted(plan.volume_ids) == sorted(v.id for v in vm.volumes.values())
    vm.state = "running"
    assert errno_of(plan_delete_vm, ns, "a") == errno.EBUSY
    assert errno_of(plan_delete_vm, ns, "b") == errno.ENOENT


def test_removing_an_origin_reparents_its_clones() -> None:
    ns = Namespace()
    make_vm(ns, 1, "base")
    mid = make_vm(ns, 2, "mid")
    leaf = make_vm(ns, 3, "leaf")
    mid.origin_id = 1
    leaf.origin_id = 2
    ns.remove_vm(2)
    assert leaf.origin_id == 1


def test_rename_plans() -> None:
    ns = Namespace()
    make_vm(ns, 1, "a")
    make_vm(ns, 2, "b")
    assert errno_of(plan_rename_vm, ns, "a", "b") == errno.EEXIST
    assert errno_of(plan_rename_vm, ns, "a", "b-v1") == errno.EINVAL
    assert errno_of(plan_rename_vm, ns, "zz", "c") == errno.ENOENT
    same = plan_rename_vm(ns, "a", "a")
    assert same.new == same.old == "a"
    plan = plan_rename_vm(ns, "a", "c")
    assert errno_of(plan_create_vm, ns, "c") == errno.EEXIST  # reserved while in flight
    ns.apply_rename_vm(plan)
    assert ns.get("c").id == 1
    assert errno_of(ns.get, "a") == errno.ENOENT
    assert "c" not in ns.reserved


def test_volume_plans_and_their_application() -> None:
    ns = Namespace()
    vm = make_vm(ns, 1, "a")
    create = plan_create_volume(ns, "a", "data.img")
    assert create.spec == VolumeSpec("data", 0, "persistent")
    assert errno_of(plan_create_volume, ns, "a", "root.img") == errno.EEXIST
    assert errno_of(plan_create_volume, ns, "a", "bad name.img") == errno.EINVAL

    rename = plan_rename_volume(ns, "a", "private", "home.img")
    ns.apply_rename_volume(rename)
    assert "home" in vm.volumes and "private" not in vm.volumes
    assert vm.volumes["home"].filename == "home.img"
    assert errno_of(plan_rename_volume, ns, "a", "home", "root.img") == errno.EEXIST

    delete = plan_delete_volume(ns, "a", "home")
    assert delete.volume_id == vm.volumes["home"].id
    assert errno_of(plan_delete_volume, ns, "a", "nope") == errno.ENOENT


def test_resize_plans_grow_only() -> None:
    ns = Namespace()
    vm = make_vm(ns, 1, "a")
    size = vm.volumes["root"].size
    plan = plan_resize_volume(ns, "a", "root", size + GiB)
    assert (plan.old_size, plan.new_size) == (size, size + GiB)
    ns.apply_resize_volume(plan)
    assert vm.volumes["root"].size == size + GiB
    assert errno_of(plan_resize_volume, ns, "a", "root", size) == errno.EINVAL
    assert errno_of(plan_resize_volume, ns, "a", "root", size + GiB + 1) == errno.EINVAL
    same = plan_resize_volume(ns, "a", "root", size + GiB)
    assert same.old_size == same.new_size


def test_writes_need_a_halted_mutable_vm() -> None:
    ns = Namespace()
    vm = make_vm(ns, 1, "a")
    assert check_volume_write(ns, "a", "root").name == "root"
    vm.state = "running"
    assert errno_of(check_volume_write, ns, "a", "root") == errno.EBUSY
    assert errno_of(plan_create_volume, ns, "a", "x.img") == errno.EBUSY
    assert errno_of(plan_delete_volume, ns, "a", "root") == errno.EBUSY
    vm.state = "halted"
    vm.props["immutable"] = "1"
    assert vm.immutable
    assert errno_of(check_volume_write, ns, "a", "root") == errno.EROFS
    assert errno_of(plan_resize_volume, ns, "a", "root", 20 * GiB) == errno.EROFS
    assert errno_of(plan_rename_volume, ns, "a", "root", "r.img") == errno.EROFS


# Clones, aliases and properties


def make_alias(ns: Namespace, alias_id: int, name: str, target: str, system: bool = False) -> None:
    plan = plan_create_alias(ns, name, target)
    ns.add_alias(Alias(alias_id, plan.name, plan.target_vm, plan.target_alias, system=system))


def test_clone_plan_snapshots_every_volume_and_filters_properties() -> None:
    ns = Namespace()
    src = make_vm(ns, 1, "src")
    src.props.update({"memory": "1024", "immutable": "1", "versioned": "0"})
    plan = plan_clone(ns, "src", "c")
    assert plan.source_id == 1
    assert sorted(s for s, _ in plan.volumes) == sorted(v.id for v in src.volumes.values())
    assert plan.props == {"memory": "1024"}
    assert plan.reparent == ()
    assert errno_of(plan_clone, ns, "src", "c") == errno.EEXIST  # reserved meanwhile
    assert errno_of(plan_clone, ns, "nope", "d") == errno.ENOENT
    assert errno_of(plan_clone, ns, "src", "d-next") == errno.EINVAL


def test_replace_clone_takes_over_the_other_clones() -> None:
    ns = Namespace()
    make_vm(ns, 1, "src")
    for vm_id, name in ((2, "a"), (3, "b")):
        make_vm(ns, vm_id, name).origin_id = 1
    assert plan_clone(ns, "src", "new", replace=True).reparent == (2, 3)
    ns.set_origin(2, 4)
    assert [c.name for c in ns.clones_of(ns.get("src"))] == ["b"]


def test_alias_targets() -> None:
    ns = Namespace()
    make_vm(ns, 1, "work")
    make_alias(ns, 1, "stable", "work")
    make_alias(ns, 2, "prod", "stable")
    assert ns.resolve("prod").name == "work"
    assert ns.alias_target_name(ns.get_alias("prod")) == "stable"
    for bad in ("/work", "../work", "work/x", ".", "..", "nothing"):
        assert errno_of(plan_create_alias, ns, "x", bad) == errno.EINVAL
    assert errno_of(plan_create_alias, ns, "work", "work") == errno.EEXIST
    assert errno_of(plan_create_alias, ns, "stable", "work") == errno.EEXIST
    assert errno_of(plan_create_vm, ns, "stable") == errno.EEXIST
    assert errno_of(ns.get_alias, "nope") == errno.ENOENT


def test_alias_removal_rules() -> None:
    ns = Namespace()
    make_vm(ns, 1, "work")
    make_alias(ns, 1, "stable", "work")
    make_alias(ns, 2, "prod", "stable")
    make_alias(ns, 3, "work-latest", "work", system=True)
    assert errno_of(plan_remove_alias, ns, "stable") == errno.EBUSY
    assert errno_of(plan_remove_alias, ns, "work-latest") == errno.EPERM
    assert plan_remove_alias(ns, "prod").alias_id == 2


def test_alias_rename_and_replace() -> None:
    ns = Namespace()
    make_vm(ns, 1, "v1")
    make_vm(ns, 2, "v2")
    make_alias(ns, 1, "latest", "v1")
    make_alias(ns, 2, "tmp", "v2")
    make_alias(ns, 3, "prod", "latest")
    plan = plan_rename_alias(ns, "tmp", "latest")
    assert isinstance(plan, ReplaceAlias)
    assert (plan.keep_id, plan.drop_id, plan.retarget) == (2, 1, (3,))
    ns.apply_replace_alias(plan)
    assert ns.resolve("prod").name == "v2"
    assert "tmp" not in ns.aliases
    rename = plan_rename_alias(ns, "latest", "newest")
    assert isinstance(rename, RenameAlias)
    ns.apply_rename_alias(rename)
    assert ns.alias_target_name(ns.get_alias("prod")) == "newest"
    assert isinstance(plan_rename_alias(ns, "newest", "newest"), RenameAlias)
    assert errno_of(plan_rename_alias, ns, "newest", "v1") == errno.EEXIST


def test_a_replace_that_would_loop_is_refused() -> None:
    ns = Namespace()
    make_vm(ns, 1, "work")
    make_alias(ns, 1, "a", "work")
    make_alias(ns, 2, "b", "a")
    make_alias(ns, 3, "tmp", "b")
    assert errno_of(plan_rename_alias, ns, "tmp", "a") == errno.EINVAL
    make_alias(ns, 4, "tmp2", "a")
    assert errno_of(plan_rename_alias, ns, "tmp2", "a") == errno.EINVAL


def test_system_aliases_cannot_be_moved_or_replaced() -> None:
    ns = Namespace()
    make_vm(ns, 1, "work")
    make_alias(ns, 1, "sys", "work", system=True)
    make_alias(ns, 2, "mine", "work")
    assert errno_of(plan_rename_alias, ns, "sys", "other") == errno.EPERM
    assert errno_of(plan_rename_alias, ns, "mine", "sys") == errno.EPERM


def test_deleting_a_vm_takes_its_aliases_dependents_first() -> None:
    ns = Namespace()
    make_vm(ns, 1, "work")
    make_vm(ns, 2, "other")
    make_alias(ns, 1, "stable", "work")
    make_alias(ns, 2, "prod", "stable")
    make_alias(ns, 3, "keep", "other")
    plan = plan_delete_vm(ns, "work")
    assert plan.aliases == (2, 1)
    ns.remove_vm(1)
    assert sorted(ns.aliases) == ["keep"]


def test_alias_chains_are_bounded() -> None:
    ns = Namespace()
    make_vm(ns, 1, "work")
    make_alias(ns, 1, "a0", "work")
    for i in range(1, MAX_ALIAS_CHAIN + 2):
        make_alias(ns, i + 1, f"a{i}", f"a{i - 1}")
    assert errno_of(ns.resolve, f"a{MAX_ALIAS_CHAIN + 1}") == errno.ELOOP


def test_property_plans() -> None:
    ns = Namespace()
    vm = make_vm(ns, 1, "work")
    plan = plan_set_property(ns, "work", "memory", "512")
    ns.apply_set_property(plan)
    assert vm.props == {"memory": "512"}
    ns.apply_set_property(plan_set_property(ns, "work", "memory", None))
    assert vm.props == {}
    vm.state = "running"
    assert errno_of(plan_set_property, ns, "work", "immutable", "1") == errno.EBUSY


# Versions, templates, and what keeps a removed VM


def commit(ns: Namespace, head_id: int, number: int, vm_id: int, alias_id: int = 90) -> Vm:
    """What the tree does for a commit, without the store and the engine."""
    plan = plan_version(ns, head_id, number)
    version = Vm(vm_id, plan.name, 1.0, plan.origin, dict(plan.props))
    for i, (_, spec) in enumerate(plan.volumes):
        version.volumes[spec.name] = Volume(vm_id * 10 + i, spec.name, spec.size, spec.policy, 1.0)
    ns.add_vm(version)
    for child in plan.reparent:
        ns.set_origin(child, version.id)
    alias = None
    if plan.alias_id is None:
        alias = Alias(alias_id, plan.base, version.id, None, system=True)
    ns.apply_version(plan, version, alias)
    return version


def test_version_plans_name_the_head_the_versions_and_the_alias() -> None:
    ns = Namespace()
    make_vm(ns, 1, "fedora")
    make_vm(ns, 2, "work").origin_id = 1
    plan = plan_version(ns, 1, 1)
    assert (plan.base, plan.name, plan.head_name, plan.alias_id) == (
        "fedora",
        "fedora-v1",
        "fedora-next",
        None,
    )
    assert plan.props == {"immutable": "1"} and plan.reparent == (2,)
    assert errno_of(plan_create_vm, ns, "fedora-v1") == errno.EINVAL  # a system name anyway
    ns.release("fedora-v1")
    ns.release("fedora-next")
    v1 = commit(ns, 1, 1, 3)
    head = ns.get("fedora-next")
    assert head.versioned and head.origin_id == 3 and ns.get("work").origin_id == 3
    assert ns.resolve("fedora") is v1 and ns.newest_version(head) is v1
    v2 = commit(ns, 1, 2, 4)
    assert v2.origin_id == 3 and head.origin_id == 4 and ns.get_alias("fedora").target_vm == 4
    assert [v.version for v in ns.versions_of(head)] == [1, 2]
    assert prunable(ns, head) == [v1]
    assert errno_of(plan_version, ns, 3, 9) == errno.EROFS  # a version is not a head
    assert errno_of(plan_delete_vm, ns, "fedora-next") == errno.EBUSY
    assert errno_of(plan_delete_vm, ns, "fedora-v2") == errno.EBUSY  # the newest
    assert plan_delete_vm(ns, "fedora-v1").vm_id == 3
    assert errno_of(plan_rename_vm, ns, "fedora-v1", "old") == errno.EPERM
    assert errno_of(plan_set_property, ns, "fedora-v1", "immutable", "0") == errno.EROFS
    assert ns.instance_stem(v2) == ("fedora", 1)
    assert plan_instance(ns, "fedora-v2", "disp", 4).name == "fedora-disp4"


def test_what_keeps_a_version_and_when_it_is_free() -> None:
    ns = Namespace()
    make_vm(ns, 1, "t")
    v1 = commit(ns, 1, 1, 2)
    commit(ns, 1, 2, 3)
    assert needs_of(ns, v1) == []
    disp = make_vm(ns, 4, "x")  # stands for t-disp1, made by the system
    ns.remove_vm(4)
    disp.name, disp.origin_id, disp.state = "t-disp1", v1.id, "running"
    ns.add_vm(disp)
    assert needs_of(ns, v1) == ["its instance t-disp1 is running"]
    hide = plan_hide(ns, "t-v1")
    assert hide.reparent == (3,)  # t-v2 moves on; the running instance stays: it keeps it
    ns.apply_hide(hide)
    assert v1.hidden and collectable(ns) == []
    disp.state = "halted"
    assert collectable(ns) == [v1]
    user = make_vm(ns, 5, "work")
    user.template, user.template_used, user.state = TemplateLink(None, 90), v1.id, "running"
    assert needs_of(ns, v1) == ["work runs from it as its template"]
    user.state = "halted"
    user.savestates["s"] = Savestate(7, "s", 1.0, "i", {"template_version": v1.id}, {})
    assert needs_of(ns, v1) == ["savestate work/s records it"]


def test_unversion_is_refused_while_versions_are_used() -> None:
    ns = Namespace()
    make_vm(ns, 1, "t")
    commit(ns, 1, 1, 2)
    work = make_vm(ns, 3, "work")
    work.template = plan_set_template(ns, 3, "../t")
    assert work.template == TemplateLink(None, 90)
    assert errno_of(plan_unversion, ns, 1) == errno.EBUSY
    assert errno_of(plan_remove_alias, ns, "t") == errno.EPERM
    work.template = None
    plan = plan_unversion(ns, 1)
    assert (plan.base, plan.alias_id, plan.versions, plan.keep_history) == ("t", 90, (2,), False)
    ns.apply_unversion(plan)
    assert ns.get("t").id == 1 and "t" not in ns.aliases and ns.get("t-v1").version_of is None


def test_template_link_plans() -> None:
    ns = Namespace()
    make_vm(ns, 1, "base")
    work = make_vm(ns, 2, "work")
    assert plan_set_template(ns, 2, "../base") == TemplateLink(1, None)
    assert plan_set_template(ns, 2, b"base") == TemplateLink(1, None)
    for bad in ("../work", "/base", "../../base", "..", "", "../nothing", "../base/x"):
        assert errno_of(plan_set_template, ns, 2, bad) == errno.EINVAL, bad
    work.template = TemplateLink(1, None)
    assert ns.resolve_template(work) is ns.get("base")
    assert errno_of(plan_delete_vm, ns, "base") == errno.EBUSY
    work.state = "running"
    assert errno_of(plan_set_template, ns, 2, "base") == errno.EBUSY
    work.state, work.props["immutable"] = "halted", "1"
    assert errno_of(plan_set_template, ns, 2, "base") == errno.EROFS
