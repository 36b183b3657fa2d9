"""Hypothesis drives the real mount with random mkdir, rmdir, mv, ln -s, rm and setfattr,
and the pure rules (``vmtreefs.rules``) say what each must answer.

Every step compares the errno (or success) with the model's plan, then the
whole top level: names, kinds and alias targets. Each example runs on a fresh
SOURCE, and ends with ``vmtreefs fsck`` finding it clean.
"""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from tests.fs.test_fsck import fsck
from tests.helpers.tree import Tree
from vmtreefs.errors import VmtreeError
from vmtreefs.rules import commands, properties
from vmtreefs.rules.aliases import plan_create_alias, plan_remove_alias, plan_rename_alias
from vmtreefs.rules.commands import VM_COMMANDS
from vmtreefs.rules.namespace import Namespace
from vmtreefs.rules.objects import DEFAULT_VOLUMES, Alias, Vm, Volume
from vmtreefs.rules.plans import CloneVm, CreateAlias, RenameAlias, RenameVm, ReplaceAlias
from vmtreefs.rules.properties import VM_PROPERTIES
from vmtreefs.rules.vms import (
    plan_clone,
    plan_create_vm,
    plan_delete_vm,
    plan_rename_vm,
    plan_set_property,
)
from vmtreefs.rules.volumes import check_volume_write

GOOD = ["a", "b", "work", "Zed_9"]
BAD = ["bad name", "1x", "x.y", "a-next", "b-v1", "c-inst2", "x" * 65, "é"]
NAMES = st.sampled_from(GOOD + BAD + ["y" * 256])
TARGETS = st.sampled_from([*GOOD, "missing", "../a", "/a", "a/b", ".."])


def outcome(action: Callable[[], object]) -> int:
    """0 for success, else the errno, as a shell would see it."""
    try:
        action()
    except OSError as e:
        return e.errno or -1
    return 0


def predicted(plan: Callable[[], object]) -> tuple[int, object]:
    try:
        return 0, plan()
    except VmtreeError as e:
        return e.errno, None


class ModelAndMount(RuleBasedStateMachine):
    """One fresh tree per example; ``workdir`` is set by the test before it runs."""

    workdir: Path
    counter = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        where = self.workdir / f"example-{next(self.counter)}"
        where.mkdir()
        self.tree = Tree(where)
        self.vms = self.tree.mount()
        self.ns = Namespace()
        self.ids = itertools.count(1)

    def teardown(self) -> None:
        try:
            self.tree.unmount()
            status, out = fsck(self.tree)
            assert status == 0, out
        finally:
            self.tree.unmount()

    # Helpers: what the kernel answers before vmtreefs is asked.

    def kind(self, name: str) -> str | None:
        if name in self.ns.by_name:
            return "vm"
        if name in self.ns.aliases:
            return "alias"
        return None

    @staticmethod
    def too_long(name: str) -> bool:
        return len(name.encode()) > 255

    # Rules

    @rule(name=NAMES)
    def mkdir(self, name: str) -> None:
        if self.too_long(name):
            expected, plan = errno.ENAMETOOLONG, None
        elif self.kind(name) is not None:
            expected, plan = errno.EEXIST, None
        else:
            expected, plan = predicted(lambda: plan_create_vm(self.ns, name))
        got = outcome(lambda: os.mkdir(self.vms / name))
        assert got == expected, f"mkdir {name!r}: {got} != {expected}"
        if plan is not None:
            vm = Vm(next(self.ids), name, 1.0)
            for spec in DEFAULT_VOLUMES:
                vm.volumes[spec.name] = Volume(next(self.ids), spec.name, spec.size, spec.policy, 1)
            self.ns.add_vm(vm)

    @rule(name=NAMES)
    def rmdir(self, name: str) -> None:
        kind = self.kind(name)
        if kind is None:  # also a name too long to exist: FUSE looks it up, and finds nothing
            expected = errno.ENOENT
        elif kind == "alias":
            expected = errno.ENOTDIR
        else:
            expected, _ = predicted(lambda: plan_delete_vm(self.ns, name))
        got = outcome(lambda: os.rmdir(self.vms / name))
        assert got == expected, f"rmdir {name!r}: {got} != {expected}"
        if got == 0:
            self.ns.remove_vm(self.ns.get(name).id)

    @rule(name=NAMES, to=TARGETS)
    def symlink(self, name: str, to: str) -> None:
        if self.too_long(name):
            expected, plan = errno.ENAMETOOLONG, None
        elif self.kind(name) is not None:
            expected, plan = errno.EEXIST, None
        else:
            expected, plan = predicted(lambda: plan_create_alias(self.ns, name, to))
        got = outcome(lambda: os.symlink(to, self.vms / name))
        assert got == expected, f"ln -s {to!r} {name!r}: {got} != {expected}"
        if isinstance(plan, CreateAlias):
            self.ns.add_alias(Alias(next(self.ids), name, plan.target_vm, plan.target_alias))

    @rule(name=NAMES)
    def unlink(self, name: str) -> None:
        kind = self.kind(name)
        if kind is None:
            expected, plan = errno.ENOENT, None
        elif kind == "vm":
            expected, plan = errno.EISDIR, None
        else:
            expected, plan = predicted(lambda: plan_remove_alias(self.ns, name))
        got = outcome(lambda: os.unlink(self.vms / name))
        assert got == expected, f"rm {name!r}: {got} != {expected}"
        if plan is not None:
            self.ns.remove_alias(self.ns.get_alias(name).id)

    @rule(old=NAMES, new=NAMES)
    def rename(self, old: str, new: str) -> None:
        old_kind, new_kind = self.kind(old), self.kind(new)
        plan: object = None
        if old_kind is None:
            expected = errno.ENOENT
        elif old == new:
            expected = 0
        elif old_kind == "vm" and new_kind == "alias":
            expected = errno.ENOTDIR
        elif old_kind == "alias" and new_kind == "vm":
            expected = errno.EISDIR
        elif old_kind == "vm":
            expected, plan = predicted(lambda: plan_rename_vm(self.ns, old, new))
        else:
            expected, plan = predicted(lambda: plan_rename_alias(self.ns, old, new))
        got = outcome(lambda: os.rename(self.vms / old, self.vms / new))
        assert got == expected, f"mv {old!r} {new!r}: {got} != {expected}"
        if isinstance(plan, ReplaceAlias):
            self.ns.apply_replace_alias(plan)
        elif isinstance(plan, RenameVm) and plan.new != plan.old:
            self.ns.apply_rename_vm(plan)
        elif isinstance(plan, RenameAlias) and plan.new != plan.old:
            self.ns.apply_rename_alias(plan)

    @rule(name=st.sampled_from(GOOD), value=st.sampled_from([b"512", b"15", b"abc", b"1024\n"]))
    def set_memory(self, name: str, value: bytes) -> None:
        prop = VM_PROPERTIES["memory"]
        if self.kind(name) is None:
            expected = errno.ENOENT
        else:
            expected, checked = predicted(lambda: properties.check_value(prop, value))
        got = outcome(lambda: os.setxattr(self.vms / name, prop.xattr, value))
        assert got == expected, f"setfattr memory={value!r} {name!r}: {got} != {expected}"
        if got == 0:
            self.ns.resolve(name).props["memory"] = str(checked)

    @rule(
        name=st.sampled_from(GOOD),
        line=st.sampled_from(
            [b"frobnicate\n", b"\n", b"clone\n", b"commit\n", b"x" * 5000, b"\xff\n"]
            + [b"clone " + n.encode() + b"\n" for n in ["a", "b", "bad name", "c-next"]]
        ),
    )
    def write_ctl(self, name: str, line: bytes) -> None:
        """A ctl write: the parser's refusal, or what the model plans for the command."""
        plan: object = None
        if self.kind(name) is None:
            expected = errno.ENOENT
        else:
            vm = self.ns.resolve(name)
            expected, command = predicted(lambda: commands.parse_command(line, VM_COMMANDS))
            if isinstance(command, commands.Command) and command.verb == "commit":
                expected = errno.EINVAL  # not versioned
            elif isinstance(command, commands.Command):
                if len(command.args) != 1:
                    expected = errno.EINVAL  # usage: clone NEW
                else:
                    expected, plan = predicted(
                        lambda: plan_clone(self.ns, vm.name, command.args[0])
                    )
        got = outcome(lambda: (self.vms / name / "ctl").write_bytes(line))
        assert got == expected, f"ctl {name!r} {line[:20]!r}: {got} != {expected}"
        if isinstance(plan, CloneVm):
            clone = Vm(next(self.ids), plan.name, 1.0, plan.source_id, dict(plan.props))
            for _, spec in plan.volumes:
                clone.volumes[spec.name] = Volume(next(self.ids), spec.name, spec.size, "x", 1)
            self.ns.add_vm(clone)

    @rule(name=st.sampled_from(GOOD), flag=st.sampled_from([b"0", b"1"]))
    def set_immutable(self, name: str, flag: bytes) -> None:
        if self.kind(name) is None:
            expected = errno.ENOENT
        else:
            vm = self.ns.resolve(name)
            value = flag.decode()
            expected, _ = predicted(lambda: plan_set_property(self.ns, vm.name, "immutable", value))
        got = outcome(lambda: os.setxattr(self.vms / name, "user.vmtree.immutable", flag))
        assert got == expected, f"setfattr immutable={flag!r} {name!r}: {got} != {expected}"
        if got == 0:
            self.ns.resolve(name).props["immutable"] = flag.decode()

    @rule(name=st.sampled_from(GOOD), data=st.binary(min_size=1, max_size=64))
    def write_volume(self, name: str, data: bytes) -> None:
        if self.kind(name) is None:
            expected = errno.ENOENT
        else:
            expected, _ = predicted(
                lambda: check_volume_write(self.ns, self.ns.resolve(name).name, "private")
            )
        path = self.vms / name / "volumes" / "private.img"

        def write() -> None:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, data, 0)
            finally:
                os.close(fd)

        got = outcome(write)
        assert got == expected, f"write {name!r}/private.img: {got} != {expected}"
        if got == 0:
            with open(path, "rb") as f:
                assert f.read(len(data)) == data

    # What the whole top level looks like

    @invariant()
    def the_top_level_matches(self) -> None:
        shown = {n for n in os.listdir(self.vms) if not n.startswith(".")}
        assert shown == set(self.ns.by_name) | set(self.ns.aliases)
        for alias in self.ns.aliases.values():
            assert os.readlink(self.vms / alias.name) == self.ns.alias_target_name(alias)
        for vm in self.ns.by_name.values():
            memory = os.getxattr(self.vms / vm.name, "user.vmtree.memory").decode()
            assert memory == vm.props.get("memory", "256")


def test_model_and_mount_agree(workdir: Path) -> None:
    ModelAndMount.workdir = workdir
    run_state_machine_as_test(
        ModelAndMount,
        settings=settings(
            max_examples=int(os.environ.get("VMTREE_MODEL_EXAMPLES", "20")),
            stateful_step_count=25,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        ),
    )
