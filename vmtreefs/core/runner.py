"""What the orchestrator needs of whoever runs VMs: a protocol, so core/ never imports runtime/.

``runtime.lifecycle.Lifecycle`` is the one implementation; a tree without one
(``-o libvirt=none``, or fsck) runs no VMs and answers ENOTCONN to a lifecycle
command.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol

from vmtreefs.rules.commands import Command
from vmtreefs.rules.objects import Vm


class Runner(Protocol):
    async def run_command(self, vm: Vm, command: Command) -> str:
        """Carry out a lifecycle command (``rules.states.LIFECYCLE_COMMANDS``); its result line."""
        ...

    def hot_savestate_changed(self, vm: Vm) -> None:
        """The VM's hot savestate is out of date (or wanted, or no longer wanted)."""
        ...

    def held_still(self, vm: Vm) -> AbstractAsyncContextManager[None]:
        """While inside: a running VM is paused, so its volumes can be snapshotted whole."""
        ...
