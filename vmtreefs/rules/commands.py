"""The whole ``ctl`` grammar, with no I/O: the command line, and each command's arguments.

A write is one command line. It is checked here once, at the boundary, so the
rest of the code only ever sees a well-formed :class:`Command`; each verb's
arguments are parsed by the function for it below, called where the command is
carried out (after the checks of the VM's state that come first).
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass

from vmtreefs.errors import VmtreeError
from vmtreefs.rules.names import check_savestate_label

MAX_CTL_WRITE = 4096

VM_COMMANDS = frozenset(
    {
        "start",
        "disposable",
        "shutdown",
        "kill",
        "pause",
        "resume",
        "save",
        "restore",
        "commit",
        "revert",
        "clone",
    }
)
GLOBAL_COMMANDS = frozenset({"gc", "grow-pool"})

DEFAULT_SHUTDOWN_TIMEOUT = 60
MAX_SHUTDOWN_TIMEOUT = 3600


@dataclass(frozen=True)
class Command:
    verb: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        return " ".join((self.verb, *self.args))


def parse_command(data: bytes, known: frozenset[str]) -> Command:
    """One command line from one write(2); refusals carry the errno the writer sees."""
    if len(data) > MAX_CTL_WRITE:
        raise VmtreeError(
            errno.EFBIG, f"control write of {len(data)} bytes is over {MAX_CTL_WRITE} bytes"
        )
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise VmtreeError(errno.EINVAL, "control command is not ASCII text") from None
    if text.endswith("\n"):
        text = text[:-1]
    if "\n" in text or "\r" in text or "\0" in text:
        raise VmtreeError(errno.EINVAL, "control write holds more than one line")
    if not text.isprintable():
        raise VmtreeError(errno.EINVAL, "control command holds control characters")
    words = text.split()
    if not words:
        raise VmtreeError(errno.EINVAL, "empty control command")
    verb, *args = words
    if verb not in known:
        raise VmtreeError(
            errno.EINVAL,
            f"unknown command {verb[:32]!r}; known: {', '.join(sorted(known))}",
        )
    return Command(verb, tuple(args))


# Arguments, one function a verb


def parse_clone_args(args: tuple[str, ...]) -> tuple[str, bool]:
    """``clone NEW [--replace]``: the new VM's name (checked by the rules) and --replace."""
    replace = "--replace" in args
    names = [a for a in args if a != "--replace"]
    if len(names) != 1 or any(a.startswith("-") for a in names):
        raise VmtreeError(errno.EINVAL, "usage: clone NEW [--replace]")
    return names[0], replace


def check_usage(verb: str, args: tuple[str, ...]) -> None:
    """``gc`` and ``commit`` take nothing."""
    if args:
        raise VmtreeError(errno.EINVAL, f"usage: {verb}")


def parse_grow_pool_args(args: tuple[str, ...]) -> str | None:
    """``grow-pool [SIZE]``: the size as written (the engine's ``parse_size`` reads it)."""
    if len(args) > 1:
        raise VmtreeError(errno.EINVAL, "usage: grow-pool [SIZE]")
    return args[0] if args else None


def parse_revert_args(args: tuple[str, ...]) -> str:
    """``revert vN``: the one word, read by :func:`parse_version` once the VM may revert."""
    if len(args) != 1:
        raise VmtreeError(errno.EINVAL, "usage: revert vN")
    return args[0]


def parse_version(raw: str) -> int:
    """``vN``: a version number."""
    match = re.fullmatch(r"v([0-9]{1,9})", raw)
    if match is None:
        raise VmtreeError(errno.EINVAL, f"usage: revert vN (not {raw[:20]!r})")
    return int(match.group(1))


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
