"""The one ``ctl`` dispatcher: a parsed command goes to the tree or to the lifecycle.

``rules.commands`` parses what was written; this decides who carries it out:
``clone`` and ``commit``/``revert`` go to the orchestrator (``core/``), the
global ``gc`` and ``grow-pool`` too, and the lifecycle commands
(``rules.states.LIFECYCLE_COMMANDS``) to the lifecycle (``runtime/``), under the
VM's lock except for the ones that must get through while it is held.
"""

from __future__ import annotations

import errno
import time

from vmtreefs.core.journal import in_thread
from vmtreefs.core.tree import VmTree
from vmtreefs.engine.select import format_size, parse_size
from vmtreefs.errors import VmtreeError
from vmtreefs.rules.commands import (
    Command,
    check_usage,
    parse_clone_args,
    parse_grow_pool_args,
    parse_revert_args,
)
from vmtreefs.rules.states import LIFECYCLE_COMMANDS
from vmtreefs.rules.vms import collectable
from vmtreefs.runtime.lifecycle import Lifecycle


class CtlDispatcher:
    """Carries out what is written to the ``ctl`` files of one tree."""

    def __init__(self, tree: VmTree, lifecycle: Lifecycle | None) -> None:
        self.tree = tree
        self.lifecycle = lifecycle

    async def run(self, vm_id: int | None, command: Command) -> str:
        """Carry out one ctl command; the returned line is read back from the same open file."""
        if vm_id is not None and command.verb == "clone":
            name, replace = parse_clone_args(command.args)
            return (await self.tree.clone_vm(vm_id, name, replace)).name
        if vm_id is None and command.verb == "gc":
            check_usage("gc", command.args)
            waiting = {vm.id: vm.name for vm in collectable(self.tree.ns)}
            await self.tree.collect()
            gone = sorted(
                name for vm_id, name in waiting.items() if vm_id not in self.tree.ns.by_id
            )
            result = f"destroyed {', '.join(gone)}" if gone else "nothing to collect"
            self.tree.journal.publish(f"gc: {result}", time.time())
            return result
        if vm_id is None and command.verb == "grow-pool":
            size_text = parse_grow_pool_args(command.args)
            wanted = parse_size(size_text) if size_text is not None else None
            size = await in_thread(self.tree.engine.grow_pool, wanted)
            what = f"grew the pool to {format_size(size)}"
            self.tree.journal.publish(what, await self.tree.journal.commit(what))
            return f"pool size {size}"
        vm = self.tree.ns.get_by_id(vm_id) if vm_id is not None else None
        if vm is not None and command.verb in ("commit", "revert"):
            head = self.tree.ns.head_of(vm) or vm
            if not head.versioned:
                raise VmtreeError(
                    errno.EINVAL,
                    f"{command.verb}: VM {vm.name!r} is not versioned "
                    "(set user.vmtree.versioned to 1 first)",
                )
            if head is not vm:
                raise VmtreeError(
                    errno.EROFS,
                    f"{command.verb}: {vm.name!r} is a version; write it to {head.name}/ctl",
                )
            if command.verb == "commit":
                check_usage("commit", command.args)
                return (await self.tree.versions.commit_version(vm.id)).name
            return await self.tree.versions.revert(vm.id, parse_revert_args(command.args))
        if vm is not None and command.verb in LIFECYCLE_COMMANDS:
            if self.lifecycle is None:
                raise VmtreeError(errno.ENOTCONN, "this mount runs no VMs")
            # Not under the VM's lock: a shutdown waits long and kill must get through
            # meanwhile; an instance locks its source while it is made, then itself.
            if command.verb in ("shutdown", "kill", "disposable") or (
                command.verb == "start" and vm.immutable
            ):
                return await self.lifecycle.run_command(vm, command)
            async with self.tree.locked(vm.id) as locked:
                return await self.lifecycle.run_command(locked, command)
        target = f"VM {vm.name!r}" if vm else "the tree"
        raise VmtreeError(
            errno.EINVAL,
            f"command {command.verb!r} for {target} needs running VMs, which are not "
            "available in this version of vmtreefs",
        )
