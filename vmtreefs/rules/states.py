"""Which control command a VM takes in which state, and what it is called then; no I/O.

The table is the whole rule: a command not allowed in the VM's state is EBUSY,
with the states it would be allowed in, so a script's author sees what to wait
for. The words are the ones the ``state`` file shows.
"""

from __future__ import annotations

import errno
import re

from vmtreefs.errors import VmtreeError
from vmtreefs.rules.names import check_savestate_label

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

DEFAULT_SHUTDOWN_TIMEOUT = 60
MAX_SHUTDOWN_TIMEOUT = 3600


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


def parse_shutdown_args(args: tuple[str, ...]) -> int:
    """``shutdown [--timeout SECONDS]``: how long the guest gets before it is forced off."""
    if not args:
        return DEFAULT_SHUTDOWN_TIMEOUT
    if len(args) == 2 and args[0] == "--timeout" and re.fullmatch(r"[0-9]{1,5}", args[1]):
        timeout = int(args[1])
        if timeout <= MAX_SHUTDOWN_TIMEOUT:
            return timeout
    raise VmtreeError(
        errno.EINVAL, f"usage: shutdown [--timeout SECONDS] (0 to {MAX_SHUTDOWN_TIMEOUT})"
    )


def check_no_args(verb: str, args: tuple[str, ...]) -> None:
    if args:
        raise VmtreeError(errno.EINVAL, f"usage: {verb} (it takes no arguments)")


def parse_save_args(args: tuple[str, ...]) -> tuple[str | None, bool]:
    """``save [LABEL] [--stop]``: the label (None: a timestamp) and whether the VM stops."""
    stop = "--stop" in args
    rest = [a for a in args if a != "--stop"]
    if len(rest) > 1 or args.count("--stop") > 1 or any(a.startswith("-") for a in rest):
        raise VmtreeError(errno.EINVAL, "usage: save [LABEL] [--stop]")
    return (check_savestate_label(rest[0]) if rest else None), stop


def parse_restore_args(args: tuple[str, ...]) -> str | None:
    """``restore [LABEL]``: None means the newest savestate."""
    if len(args) > 1:
        raise VmtreeError(errno.EINVAL, "usage: restore [LABEL]")
    return check_savestate_label(args[0]) if args else None
