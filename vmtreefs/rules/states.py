"""Which control command a VM takes in which state, and what it is called then; no I/O.

The table is the whole rule: a command not allowed in the VM's state is EBUSY,
with the states it would be allowed in, so a script's author sees what to wait
for. The words are the ones the ``state`` file shows. What a command's
arguments may be is the grammar's (``rules.commands``).
"""

from __future__ import annotations

import errno

from vmtreefs.errors import VmtreeError

HALTED = "halted"
STARTING = "starting"
RUNNING = "running"
PAUSED = "paused"
SAVED = "saved"
STOPPING = "stopping"
VM_STATES = (HALTED, STARTING, RUNNING, PAUSED, SAVED, STOPPING)
"""Every word the ``state`` file shows, and the only ones a VM's state may be."""

ALLOWED: dict[str, frozenset[str]] = {
    "start": frozenset({HALTED}),
    "disposable": frozenset({HALTED}),
    "shutdown": frozenset({RUNNING, PAUSED, STOPPING}),
    "kill": frozenset({STARTING, RUNNING, PAUSED, STOPPING}),
    "pause": frozenset({RUNNING}),
    "resume": frozenset({PAUSED}),
    "save": frozenset({RUNNING, PAUSED}),
    "restore": frozenset({HALTED}),
}

LIFECYCLE_COMMANDS = frozenset(ALLOWED)
"""The ctl commands that run a VM under the hypervisor (the rest change the tree)."""


def check_command(vm_name: str, verb: str, state: str) -> None:
    allowed = ALLOWED.get(verb)
    if allowed is None:
        raise VmtreeError(errno.EINVAL, f"{verb!r} is not a lifecycle command")
    if state not in allowed:
        raise VmtreeError(
            errno.EBUSY,
            f"cannot {verb} VM {vm_name!r}: it is {state} "
            f"({verb} needs {' or '.join(sorted(allowed))})",
        )
