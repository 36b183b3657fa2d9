"""fsck's checks within the namespace: pure, so each broken invariant is built by hand."""

from __future__ import annotations

from vmtreefs.rules.invariants import check_namespace
from vmtreefs.rules.namespace import Namespace
from vmtreefs.rules.objects import Alias, Vm


def test_a_sound_namespace_has_no_findings() -> None:
    ns = Namespace()
    ns.add_vm(Vm(1, "a", 1.0))
    ns.add_vm(Vm(2, "b", 1.0, origin_id=1))
    ns.add_alias(Alias(1, "s", 2, None))
    ns.add_alias(Alias(2, "t", None, 1))
    assert check_namespace(ns) == []


def test_loops_dangling_origins_and_aliases_are_found() -> None:
    ns = Namespace()
    ns.add_vm(Vm(1, "a", 1.0, origin_id=2))
    ns.add_vm(Vm(2, "b", 1.0, origin_id=1))
    ns.add_vm(Vm(3, "c", 1.0, origin_id=99))
    ns.add_alias(Alias(1, "x", None, 2))
    ns.add_alias(Alias(2, "y", None, 1))
    problems = [(f.check, f.problem, f.fix is not None) for f in check_namespace(ns)]
    assert problems == [
        ("lineage", "VM a (id 1) is its own ancestor", True),
        ("lineage", "VM b (id 2) is its own ancestor", True),
        ("lineage", "VM c names a missing origin 99", True),
        ("aliases", "alias x: its chain does not end", False),
        ("aliases", "alias y: its chain does not end", False),
    ]


def test_a_lagging_system_alias_and_an_orphan_version_are_found() -> None:
    ns = Namespace()
    head = Vm(1, "t-next", 1.0, props={"versioned": "1"})
    ns.add_vm(head)
    for vm_id, n in ((2, 1), (3, 2)):
        version = Vm(vm_id, f"t-v{n}", 1.0, props={"immutable": "1"})
        version.version_of, version.version = 1, n
        ns.add_vm(version)
    ns.add_alias(Alias(1, "t", 2, None, system=True))
    stray = Vm(4, "u-v1", 1.0)
    stray.version_of, stray.version = 9, 1
    ns.add_vm(stray)
    problems = [(f.problem, f.repair) for f in check_namespace(ns)]
    assert problems == [
        ("the alias t does not name the newest version t-v2", "point t at t-v2"),
        ("u-v1 is a version of VM 9, which is not versioned", "keep u-v1 as a VM of its own"),
    ]
